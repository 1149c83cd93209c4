"""Backbone layouts: what the quantize policy relies on, torchvision/DomainBed sizes, frozen BN."""
import keras
import numpy as np
import pytest

from fqat_tf.models import BACKBONES, build_backbone, mnist_cnn, resnet18, resnet50

SMALL = {
    "resnet50": dict(num_classes=5, input_shape=(32, 32, 3), width=8),
    "resnet18": dict(num_classes=5, input_shape=(32, 32, 3), width=8),
    "mnist_cnn": dict(num_classes=5, input_shape=(28, 28, 1), width=8),
}
# One ReLU after the stem, then per block: 3 (bottleneck) or 2 (basic); DomainBed: 4.
RELUS = {"resnet50": 1 + 16 * 3, "resnet18": 1 + 8 * 2, "mnist_cnn": 4}


def test_registry_lists_every_backbone():
    assert sorted(BACKBONES) == ["mnist_cnn", "resnet18", "resnet50"]
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg16'.*'mnist_cnn', 'resnet18'"):
        build_backbone("vgg16", 10, (32, 32, 3))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_layout_the_quantize_policy_relies_on(name):
    args = SMALL[name]
    model = build_backbone(name, args["num_classes"], args["input_shape"], width=args["width"])
    assert type(model).__name__ == "Functional"
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs[0].name == "conv1" and convs[0].filters == 8
    head = model.layers[-1]
    assert isinstance(head, keras.layers.Dense) and head.name == "classifier"
    assert model.outputs[0] is head.output and tuple(model.output.shape) == (None, 5)
    assert head.activation is keras.activations.linear
    assert all(conv.activation is keras.activations.linear for conv in convs)
    assert sum(isinstance(layer, keras.layers.ReLU) for layer in model.layers) == RELUS[name]
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    if name == "mnist_cnn":
        assert all(conv.use_bias for conv in convs)
        norms = [layer for layer in model.layers
                 if isinstance(layer, keras.layers.GroupNormalization)]
        assert [(n.groups, n.epsilon) for n in norms] == [(8, 1e-5)] * 4
    else:
        assert not any(conv.use_bias for conv in convs)
        norms = [layer for layer in model.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
        assert len(norms) == len(convs)
        assert {(n.epsilon, n.momentum) for n in norms} == {(1e-5, 0.9)}


def test_torchvision_parameter_counts():
    # torchvision.models.resnet50() / resnet18() with 1000 classes: sum of p.numel() over
    # parameters() (buffers such as running statistics excluded).
    for builder, expected in ((resnet50, 25_557_032), (resnet18, 11_689_512)):
        model = builder(1000, input_shape=(32, 32, 3))
        assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == expected


def test_stride_sits_on_the_3x3_conv_with_symmetric_padding():
    model = resnet50(None, input_shape=(32, 32, 3), width=8)
    assert tuple(model.output.shape) == (None, 8 * 4 * 8)
    assert model.get_layer("layer2_0_conv1").strides == (1, 1)
    assert model.get_layer("layer2_0_conv2").strides == (2, 2)
    assert model.get_layer("layer2_0_conv2").padding == "valid"
    assert model.get_layer("layer2_0_conv2_pad").padding == ((1, 1), (1, 1))
    assert model.get_layer("layer2_0_downsample_conv").strides == (2, 2)
    assert model.get_layer("layer2_0_downsample_conv").kernel.shape == (1, 1, 32, 64)
    assert model.get_layer("layer1_0_downsample_conv").strides == (1, 1)
    assert model.get_layer("conv1_pad").padding == ((3, 3), (3, 3))


def test_resnet18_shapes_follow_torch_output_size_formula():
    # torch: out = floor((in + 2 * pad - kernel) / stride) + 1. For 65x65: stem 7/2/3 -> 33,
    # max pool 3/2/1 -> 17, layer1 keeps 17, then 3/2/1 per stage -> 9, 5, 3.
    model = resnet18(4, input_shape=(65, 65, 3), width=8)
    shapes = {name: tuple(model.get_layer(name).output.shape[1:]) for name in (
        "conv1", "maxpool", "layer1_1_relu2", "layer2_1_relu2", "layer3_1_relu2",
        "layer4_1_relu2")}
    assert shapes == {"conv1": (33, 33, 8), "maxpool": (17, 17, 8), "layer1_1_relu2": (17, 17, 8),
                      "layer2_1_relu2": (9, 9, 16), "layer3_1_relu2": (5, 5, 32),
                      "layer4_1_relu2": (3, 3, 64)}
    assert model.get_layer("layer1_0_conv1").input.shape == model.get_layer("maxpool").output.shape
    with pytest.raises(ValueError, match="layer1_0_downsample"):
        model.get_layer("layer1_0_downsample_conv")  # basic blocks keep the identity there


def test_batchnorm_frozen_with_training_false_and_momentum_with_training_true():
    model = resnet18(3, input_shape=(16, 16, 3), width=8)
    bn = model.get_layer("bn1")
    rng = np.random.default_rng(0)
    mean, var = rng.normal(size=8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    bn.set_weights([gamma, beta, mean, var])
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    conv = keras.Model(model.input, model.get_layer("conv1").output)(x).numpy()
    stem = keras.Model(model.input, model.get_layer("relu").output)

    expected = np.maximum(gamma * (conv - mean) / np.sqrt(var + 1e-5) + beta, 0)
    np.testing.assert_allclose(stem(x, training=False).numpy(), expected, atol=1e-5)
    model(x, training=False)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), var)

    model(x, training=True)
    # Keras momentum 0.9 = torch momentum 0.1; Keras updates with the biased batch variance.
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.9 * mean + 0.1 * conv.mean((0, 1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.9 * var + 0.1 * conv.var((0, 1, 2)),
                               rtol=1e-4)


def test_mnist_cnn_has_domainbed_sizes():
    model = mnist_cnn()
    # conv1 3*3*1*64+64 = 640; conv2 3*3*64*128+128 = 73,856; conv3 = conv4 = 3*3*128*128+128 =
    # 147,584; GroupNorm gamma+beta 2*64 + 3*2*128 = 896; classifier 128*10+10 = 1,290.
    assert model.count_params() == 640 + 73_856 + 2 * 147_584 + 896 + 1_290 == 371_850
    assert not model.non_trainable_weights
    assert tuple(model.get_layer("conv2").output.shape) == (None, 14, 14, 128)
    assert tuple(model.output.shape) == (None, 10)
    assert tuple(build_backbone("mnist_cnn", 6, (27, 27, 2)).get_layer("conv4").output.shape) \
        == (None, 14, 14, 128)


def test_mnist_cnn_matches_domainbed_forward_in_torch_ops():
    torch = pytest.importorskip("torch", reason="the reference forward is written in torch ops")
    functional = torch.nn.functional
    model = mnist_cnn(num_classes=3, input_shape=(28, 28, 1), width=8)
    rng = np.random.default_rng(0)
    for norm in ("bn0", "bn1", "bn2", "bn3"):  # non-trivial affine GroupNorm parameters
        layer = model.get_layer(norm)
        layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32)
                           for w in layer.get_weights()])
    x = rng.normal(size=(2, 28, 28, 1)).astype(np.float32)
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    for index, stride in enumerate((1, 2, 1, 1)):
        kernel, bias = model.get_layer(f"conv{index + 1}").get_weights()
        t = functional.conv2d(t, torch.from_numpy(kernel.transpose(3, 2, 0, 1)),
                              torch.from_numpy(bias), stride=stride, padding=1)
        gamma, beta = (torch.from_numpy(w) for w in model.get_layer(f"bn{index}").get_weights())
        t = functional.group_norm(functional.relu(t), 8, gamma, beta, eps=1e-5)
    kernel, bias = (torch.from_numpy(w) for w in model.get_layer("classifier").get_weights())
    expected = functional.linear(t.mean(dim=(2, 3)), kernel.T, bias).detach().numpy()
    np.testing.assert_allclose(model(x, training=False).numpy(), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(model(x, training=True).numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("builder, kwargs, match", [
    (mnist_cnn, dict(width=12), "multiple of 8"),
    (resnet50, dict(num_classes=0), "num_classes must be a positive int"),
    (resnet18, dict(num_classes=3, width=0), "width must be a positive int"),
    (resnet18, dict(num_classes=3, input_shape=(32, 32)), r"input_shape must be \(height"),
])
def test_bad_arguments_are_named(builder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        builder(**kwargs)
