"""Weight decay as the reference code applies it: coupled L2 on the final combined gradient of
the weights, never on the perturbation or the scales (docs/algorithm.md §2)."""
import keras
import numpy as np
import pytest

from fqat_tf import trainer
from fqat_tf.fqat_model import FQATModel
from helpers import np_sagm, smooth_model, split

torch = pytest.importorskip("torch", reason="the reference is torch.optim.Adam")

X = np.random.RandomState(3).randn(8, 4).astype("float32")
Y = np.random.RandomState(4).randint(0, 3, 8)


def _inner_product(y_true, y_pred):
    # dL/dy_pred = y_true: the gradient of each step is scripted through the targets.
    return keras.ops.sum(y_true * y_pred, axis=-1)


def test_coupled_l2_equals_torch_adam_weight_decay():
    rng = np.random.RandomState(0)
    steps, units, lr, wd = 12, 5, 0.01, 0.05
    grads = rng.randn(steps, units).astype("float32") * np.logspace(-3, 0, steps)[:, None]
    inp = keras.Input((1,))
    dense = keras.layers.Dense(units, use_bias=False)
    model = FQATModel(keras.Model(inp, dense(inp)), "erm", weight_decay=wd)
    # A negligible epsilon: Keras adds it to sqrt(v), torch to sqrt(v / (1 - beta2^t)), which
    # differs by far more than the tolerance when gradients are small.
    model.compile(optimizer=keras.optimizers.Adam(lr, epsilon=1e-12), loss=_inner_product)
    w0 = dense.kernel.numpy().copy()
    # Input 1: the kernel's gradient is the target row.
    model.fit(np.ones((steps, 1), "float32"), grads, batch_size=1, shuffle=False, verbose=0)

    p = torch.tensor(w0.astype(np.float64), requires_grad=True)
    opt = torch.optim.Adam([p], lr=lr, eps=1e-12, weight_decay=wd)
    for g in grads:
        p.grad = torch.tensor(g[None, :].astype(np.float64))
        opt.step()
    np.testing.assert_allclose(dense.kernel.numpy(), p.detach().numpy(), rtol=0, atol=1e-6)
    # And the decay mattered: without it the result moves by more than the tolerance.
    assert np.max(np.abs(p.detach().numpy() - w0)) > 1e-3


def test_perturbation_and_scales_see_no_decay():
    lr, scale_lr, wd, rho, alpha = 0.1, 0.2, 0.3, 0.3, 0.01
    q = smooth_model()
    model = FQATModel(q, "fqat", rho=rho, alpha=alpha, scale_vars=split(q)[1],
                      weight_decay=wd)
    model.compile(optimizer=keras.optimizers.SGD(lr), scale_optimizer=keras.optimizers.SGD(
        scale_lr), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    theta, scales = split(q)
    W, b = (v.numpy().astype(np.float64) for v in theta)
    s = float(scales[0].numpy())
    gW, gb, g_va, g_flat = np_sagm(W, b, s, X.astype(np.float64), Y, "softmax", rho, alpha)
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(theta[0].numpy(), W - lr * (gW + wd * W), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(theta[1].numpy(), b - lr * (gb + wd * b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scales[0].numpy(), s - scale_lr * (g_va + g_flat) / 2,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode,model_decay,optimizer_decay", [
    ("coupled", 1e-4, None), ("decoupled", 0.0, 1e-4)])
def test_the_training_program_applies_the_mode_it_is_given(mode, model_decay, optimizer_decay):
    s = {"method": "lsq", "rho": 0.0, "alpha": 0.0, "freeze_interval": 2, "lr": 1e-3,
         "scale_lr": 1e-3, "weight_decay": 1e-4, "weight_decay_mode": mode,
         "jit_compile": False, "smoke": True}
    from fqat_tf import quantize_model

    inp = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    out = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Conv2D(4, 3)(conv)))
    fq = trainer._compile(s, quantize_model(keras.Model(inp, out), weight_bits=4,
                                            activation_bits=4))
    assert fq.weight_decay == model_decay
    assert fq.optimizer.weight_decay == optimizer_decay
    assert fq.scale_optimizer.weight_decay is None
