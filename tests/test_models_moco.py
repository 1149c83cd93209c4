"""MoCo-v2 import: a random MoCo-shaped checkpoint, converted, must compute what PyTorch computes.

The PyTorch side is written with plain ``torch.nn.functional`` ops from the state dict, so it
shares nothing with the Keras model or the converter except the tensors.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the MoCo-v2 import needs PyTorch (pip install 'fqat_tf[torch]')")
F = torch.nn.functional

from fqat_tf.models import convert_moco, load_init, resnet18, resnet50  # noqa: E402

RESNET50 = ((3, 4, 6, 3), True)
RESNET18 = ((2, 2, 2, 2), False)
PREFIX = "module.encoder_q."


def random_state_dict(arch, width, rng):
    """A torchvision-keyed ResNet state dict with random, numerically tame values."""
    (blocks, bottleneck), sd = arch, {}

    def conv(key, c_out, c_in, k):
        sd[key + ".weight"] = rng.normal(0, np.sqrt(2.0 / (c_in * k * k)), (c_out, c_in, k, k))

    def bn(key, c, gain=1.0):
        sd[key + ".weight"] = gain * rng.uniform(0.5, 1.0, c)
        sd[key + ".bias"] = rng.normal(0, 0.1, c)
        sd[key + ".running_mean"] = rng.normal(0, 0.1, c)
        sd[key + ".running_var"] = rng.uniform(0.5, 1.5, c)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    c_in, expansion = width, 4 if bottleneck else 1
    for stage, n in enumerate(blocks):
        planes = width * 2 ** stage
        for i in range(n):
            p = f"layer{stage + 1}.{i}"
            if bottleneck:
                conv(p + ".conv1", planes, c_in, 1)
                bn(p + ".bn1", planes)
                conv(p + ".conv2", planes, planes, 3)
                bn(p + ".bn2", planes)
                conv(p + ".conv3", planes * 4, planes, 1)
                bn(p + ".bn3", planes * 4, gain=0.3)  # keeps 16 residual sums of order one
            else:
                conv(p + ".conv1", planes, c_in, 3)
                bn(p + ".bn1", planes)
                conv(p + ".conv2", planes, planes, 3)
                bn(p + ".bn2", planes, gain=0.3)
            if i == 0 and (stage > 0 or c_in != planes * expansion):
                conv(p + ".downsample.0", planes * expansion, c_in, 1)
                bn(p + ".downsample.1", planes * expansion)
            c_in = planes * expansion
    return {k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()}


def torch_resnet(sd, x, arch):
    """torchvision's ResNet forward in eval mode, up to the pooled features, from plain ops."""
    blocks, bottleneck = arch

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"],
                            sd[p + ".weight"], sd[p + ".bias"], training=False, eps=1e-5)

    x = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for stage, n in enumerate(blocks):
        for i in range(n):
            p, stride = f"layer{stage + 1}.{i}", (2 if stage > 0 and i == 0 else 1)
            identity = x
            if p + ".downsample.0.weight" in sd:
                identity = bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride),
                              p + ".downsample.1")
            if bottleneck:
                y = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"]), p + ".bn1"))
                y = F.relu(bn(F.conv2d(y, sd[p + ".conv2.weight"], stride=stride, padding=1),
                              p + ".bn2"))
                y = bn(F.conv2d(y, sd[p + ".conv3.weight"]), p + ".bn3")
            else:
                y = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"], stride=stride, padding=1),
                              p + ".bn1"))
                y = bn(F.conv2d(y, sd[p + ".conv2.weight"], padding=1), p + ".bn2")
            x = F.relu(y + identity)
    return x.mean(dim=(2, 3))


def moco_checkpoint(path, encoder, rng):
    """Saves ``encoder`` the way MoCo's main_moco.py does, with the parts the import must skip."""
    sd = {PREFIX + k: v for k, v in encoder.items()}
    for key in [k for k in encoder if k.endswith(".running_var")]:
        sd[PREFIX + key.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    feat = encoder["bn1.weight"].shape[0] * 32
    sd[PREFIX + "fc.0.weight"] = torch.zeros(feat, feat)  # MoCo-v2's MLP projection head
    sd[PREFIX + "fc.0.bias"] = torch.zeros(feat)
    sd[PREFIX + "fc.2.weight"] = torch.zeros(128, feat)
    sd[PREFIX + "fc.2.bias"] = torch.zeros(128)
    sd["module.encoder_k.conv1.weight"] = torch.zeros(encoder["conv1.weight"].shape)
    sd["module.queue"] = torch.from_numpy(rng.normal(size=(128, 16)).astype(np.float32))
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": sd}, path)


def keras_and_torch(model, sd, arch, x_nhwc):
    logits = model(x_nhwc, training=False).numpy()
    kernel, bias = (torch.from_numpy(w) for w in model.get_layer("classifier").get_weights())
    with torch.no_grad():
        features = torch_resnet(sd, torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), arch)
        expected = F.linear(features, kernel.T, bias).numpy()
    return logits, expected


def test_moco_resnet50_converted_file_matches_torch_forward(tmp_path):
    rng = np.random.default_rng(0)
    sd = random_state_dict(RESNET50, 64, rng)
    moco_checkpoint(tmp_path / "moco.pth.tar", sd, rng)
    out = str(tmp_path / "resnet50_mocov2.weights.h5")
    convert_moco.main(["--checkpoint", str(tmp_path / "moco.pth.tar"), "--out", out])
    assert sorted(os.listdir(tmp_path)) == ["moco.pth.tar", "resnet50_mocov2.weights.h5"]

    model = resnet50(7, input_shape=(64, 64, 3))
    classifier_before = model.get_layer("classifier").get_weights()
    assert "mocov2: 265 backbone tensors" in load_init(model, f"mocov2:{out}")
    # 53 conv kernels + 53 BatchNorms x 4 tensors; the classifier is not touched.
    for before, after in zip(classifier_before, model.get_layer("classifier").get_weights()):
        np.testing.assert_array_equal(before, after)
    x = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    logits, expected = keras_and_torch(model, sd, RESNET50, x)
    assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero vectors
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_pth_tar_is_converted_in_memory_and_resnet18_layout_matches(tmp_path):
    rng = np.random.default_rng(1)
    sd = random_state_dict(RESNET50, 8, rng)
    moco_checkpoint(tmp_path / "small.pth.tar", sd, rng)
    model = resnet50(3, input_shape=(48, 48, 3), width=8)
    load_init(model, f"mocov2:{tmp_path / 'small.pth.tar'}")
    x = rng.normal(size=(2, 48, 48, 3)).astype(np.float32)
    np.testing.assert_allclose(*keras_and_torch(model, sd, RESNET50, x), atol=1e-4, rtol=0)

    # ResNet-18 shares the naming, so the same mapping checks its basic-block layout; an odd
    # input size checks the padding of every stride-2 conv.
    sd18 = random_state_dict(RESNET18, 8, rng)
    model18 = resnet18(5, input_shape=(37, 37, 3), width=8)
    assert convert_moco.assign_state_dict(model18, {k: v.numpy() for k, v in sd18.items()},
                                          "resnet18 state") == 20 * 5
    x = rng.normal(size=(2, 37, 37, 3)).astype(np.float32)
    np.testing.assert_allclose(*keras_and_torch(model18, sd18, RESNET18, x), atol=1e-4, rtol=0)


def _convert_fails(tmp_path, payload, match):
    ckpt, out = tmp_path / "bad.pth.tar", tmp_path / "out.weights.h5"
    torch.save(payload, ckpt)
    with pytest.raises(ValueError, match=match) as info:
        convert_moco.convert(str(ckpt), str(out), width=8)
    assert os.listdir(tmp_path) == ["bad.pth.tar"]  # nothing written, no temporary left over
    return str(info.value)


def test_missing_and_extra_keys_are_named_before_writing(tmp_path):
    sd = {PREFIX + k: v for k, v in random_state_dict(RESNET50, 8, np.random.default_rng(2)).items()}
    del sd[PREFIX + "layer2.1.bn2.running_var"]
    sd[PREFIX + "layer5.0.conv1.weight"] = torch.zeros(1)
    message = _convert_fails(tmp_path, {"state_dict": sd}, "does not fit")
    assert "missing keys (1): layer2.1.bn2.running_var" in message
    assert "unexpected keys (1): layer5.0.conv1.weight" in message
    assert str(tmp_path / "bad.pth.tar") in message


def test_wrong_shapes_are_named_with_both_shapes(tmp_path):
    sd = random_state_dict(RESNET50, 8, np.random.default_rng(3))
    sd["layer3.0.conv2.weight"] = torch.zeros(32, 32, 1, 1)
    sd["bn1.running_mean"] = torch.zeros(9)
    message = _convert_fails(tmp_path, {"state_dict": {PREFIX + k: v for k, v in sd.items()}},
                             "wrong shapes")
    assert "wrong shapes (2)" in message
    assert "layer3.0.conv2.weight checkpoint (32, 32, 1, 1) vs model (32, 32, 3, 3)" in message
    assert "bn1.running_mean checkpoint (9,) vs model (8,)" in message
    assert "missing" not in message


def test_checkpoint_of_another_width_gets_a_hint(tmp_path):
    sd = random_state_dict(RESNET50, 8, np.random.default_rng(4))
    ckpt = tmp_path / "w8.pth.tar"
    torch.save({"state_dict": {PREFIX + k: v for k, v in sd.items()}}, ckpt)
    with pytest.raises(ValueError, match="8 output channels, the model has width 64; pass "
                                         "--width 8"):
        convert_moco.convert(str(ckpt), str(tmp_path / "out.weights.h5"))
    assert os.listdir(tmp_path) == ["w8.pth.tar"]


@pytest.mark.parametrize("payload, match", [
    ([torch.zeros(3)], "not a state dict .*got list"),
    ({"state_dict": {PREFIX + "conv1.weight": 3}}, "not a state dict"),
    ({"state_dict": {"encoder.conv1.weight": torch.zeros(1)}},
     "no key starts with 'module.encoder_q.'"),
])
def test_non_state_dicts_are_refused(tmp_path, payload, match):
    _convert_fails(tmp_path, payload, match)


class _RunsCode:
    """Unpickling this would create a directory: the stand-in for a malicious checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_code_is_refused_without_running_it(tmp_path):
    payload = {"state_dict": {"x": _RunsCode(str(tmp_path / "executed"))}}
    message = _convert_fails(tmp_path, payload,
                             "weights_only loading refused it")
    assert "will likely succeed" not in message  # torch's advice to disable the guard is cut
    assert not (tmp_path / "executed").exists()


def test_cli_reports_errors_and_checks_the_output_name(tmp_path, capsys):
    def refused(checkpoint, out, culprit):
        code = convert_moco.main(["--checkpoint", str(tmp_path / checkpoint),
                                  "--out", str(tmp_path / out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith(f"{convert_moco.PROG}: error: ") and culprit in err[0], err

    refused("nope.pth.tar", "x.weights.h5", "checkpoint not found")
    (tmp_path / "garbage.pth.tar").write_bytes(b"not a checkpoint" * 4)
    refused("garbage.pth.tar", "x.weights.h5", "refused it")
    refused("garbage.pth.tar", "x.h5", "must end in .weights.h5")
    assert sorted(os.listdir(tmp_path)) == ["garbage.pth.tar"]
