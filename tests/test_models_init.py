"""``load_init``: the spec grammar, converted weight files, and the ImageNet weight mapping."""
import sys

import keras
import numpy as np
import pytest

from fqat_tf.models import init as init_lib
from fqat_tf.models import load_init, mnist_cnn, resnet18, resnet50

# keras.applications' Caffe preprocessing: BGR order, 0..255, minus this mean.
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def test_none_keeps_the_random_initialisation():
    model = resnet18(3, input_shape=(32, 32, 3), width=8)
    before = [w.numpy().copy() for w in model.weights]
    assert load_init(model, "none").startswith("none")
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, new.numpy())


@pytest.mark.parametrize("spec, error, match", [
    ("moco", ValueError, r"--init='moco': expected 'none', 'imagenet' or 'mocov2:PATH'"),
    ("mocov2:", ValueError, "needs a PATH"),
    ("mocov2:/no/such/file.weights.h5", FileNotFoundError, "/no/such/file.weights.h5"),
])
def test_bad_specs_are_named(spec, error, match):
    with pytest.raises(error, match=match):
        load_init(resnet50(3, input_shape=(32, 32, 3), width=8), spec)


def test_resnet50_weights_are_refused_for_other_backbones(tmp_path):
    for model in (mnist_cnn(), resnet18(3, input_shape=(32, 32, 3), width=8)):
        with pytest.raises(ValueError, match=f"model '{model.name}' is not a resnet50"):
            load_init(model, f"mocov2:{tmp_path / 'x.weights.h5'}")


def test_converted_weights_file_is_copied_by_layer_name(tmp_path):
    path = str(tmp_path / "backbone.weights.h5")
    source = resnet50(None, input_shape=(None, None, 3), width=8)
    source.save_weights(path)
    model = resnet50(4, input_shape=(40, 40, 3), width=8)
    head = [w.copy() for w in model.get_layer("classifier").get_weights()]
    assert load_init(model, f"mocov2:{path}").startswith("mocov2: 265 backbone tensors")
    for layer in source.layers:
        for expected, got in zip(layer.get_weights(), model.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(expected, got)
    for expected, got in zip(head, model.get_layer("classifier").get_weights()):
        np.testing.assert_array_equal(expected, got)

    with pytest.raises(ValueError, match="not a converted ResNet-50 of width 16"):
        load_init(resnet50(4, input_shape=(40, 40, 3), width=16), f"mocov2:{path}")
    (tmp_path / "junk.weights.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="junk.weights.h5: not a converted ResNet-50"):
        load_init(model, f"mocov2:{tmp_path / 'junk.weights.h5'}")


def test_pth_tar_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
    checkpoint = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    checkpoint.write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"moco_v2_800ep_pretrain.pth.tar needs torch: "
                                          r"pip install 'fqat_tf\[torch\]'"):
        load_init(resnet50(3, input_shape=(32, 32, 3), width=8), f"mocov2:{checkpoint}")


def test_imagenet_download_failure_is_reported(monkeypatch):
    from keras.src.utils import file_utils  # the module keras.applications downloads through

    def offline(fname, origin, **kwargs):
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -3] name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(RuntimeError, match=r"could not obtain keras.applications ResNet50 "
                                           r"ImageNet weights \(URL fetch failure"):
        load_init(resnet50(3, input_shape=(32, 32, 3)), "imagenet")


def test_imagenet_needs_the_full_width_rgb_resnet50(monkeypatch):
    monkeypatch.setattr(init_lib, "_fetch_imagenet_resnet50", lambda: pytest.fail("fetched"))
    with pytest.raises(ValueError, match="full-width"):
        load_init(resnet50(3, input_shape=(32, 32, 3), width=8), "imagenet")


def _randomised_keras_app(rng):
    app = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    for layer in app.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.bias.assign(rng.normal(0, 1.0, layer.bias.shape))
        elif isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape
            layer.set_weights([rng.uniform(0.5, 1.0, c), rng.normal(0, 0.1, c),
                               rng.normal(0, 1.0, c), rng.uniform(0.5, 1.5, c)])
    return app


def test_imagenet_mapping_reproduces_keras_applications_first_stage(monkeypatch):
    rng = np.random.default_rng(0)
    app = _randomised_keras_app(rng)
    monkeypatch.setattr(init_lib, "_fetch_imagenet_resnet50", lambda: app)
    model = resnet50(3, input_shape=(96, 96, 3))
    assert "leaks" in load_init(model, "imagenet")

    # Same tensors where the layouts agree; each conv bias went into the next moving mean.
    conv = app.get_layer("conv3_block1_2_conv")
    np.testing.assert_array_equal(model.get_layer("layer2_0_conv2").kernel.numpy(),
                                  conv.kernel.numpy())
    np.testing.assert_allclose(model.get_layer("layer2_0_bn2").moving_mean.numpy(),
                               app.get_layer("conv3_block1_2_bn").moving_mean.numpy()
                               - conv.bias.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(model.get_layer("layer4_0_downsample_conv").kernel.numpy(),
                                  app.get_layer("conv5_block1_0_conv").kernel.numpy())

    # Stage 1 has stride 1 in both layouts, so it must compute the same function of the same
    # image: ours on normalised RGB, keras.applications on Caffe-preprocessed BGR.
    z = rng.normal(size=(2, 96, 96, 3)).astype(np.float32)
    caffe = (255.0 * (IMAGENET_STD * z + IMAGENET_MEAN))[..., ::-1] - CAFFE_MEAN_BGR
    ours = keras.Model(model.input, model.get_layer("layer1_2_relu3").output)(z).numpy()
    theirs = keras.Model(app.input, app.get_layer("conv2_block3_out").output)(
        caffe.astype(np.float32)).numpy()
    # Stem outputs 2..46 of 48 never see the padding (which means different pixels in the two
    # input conventions); the max pool keeps 2..22 of 24 clean and each of the three 3x3 convs
    # of stage 1 loses one more pixel, leaving 5..19.
    ours, theirs = ours[:, 5:20, 5:20], theirs[:, 5:20, 5:20]
    scale = np.abs(theirs).max()
    assert scale > 1.0
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * scale)
