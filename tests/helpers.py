"""Helpers shared by several test modules (models, data, run directories, stand-ins).

Imported by `conftest.py`; a test module imports what it needs with `from helpers import ...`.
"""
import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl import flags as absl_flags

import fqat_tf
from fqat_tf import rundir
from fqat_tf.storage import int8_storage_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- results of finished runs (fqat_tf.report, search, sweeps) -------------------------------
PACS = ("art_painting", "cartoon", "photo", "sketch")
FQAT_HP = {"lr": 3e-5, "rho": 0.05, "alpha": 0.001, "freeze_interval": 350,
           "freeze_threshold": 0.3}


def make_run(root, name, test, seed, val_avg, test_acc, method="fqat", dataset="pacs",
             hparams=None, bits=4):
    """Writes a finished run; `test` is a domain or a list, `test_acc` one value per domain."""
    tests = [test] if isinstance(test, str) else list(test)
    accs = [test_acc] * len(tests) if np.isscalar(test_acc) else list(test_acc)
    quantized = method not in ("erm", "sagm")
    results = {
        "dataset": dataset, "method": method, "quantizer": "lsq" if quantized else None,
        "weight_bits": bits if quantized else None,
        "activation_bits": bits if quantized else None, "test_domains": tests, "seed": seed,
        "hparams": dict(FQAT_HP if hparams is None else hparams, seed=seed),
        "selection": "best training-domain validation accuracy (val_avg) over evaluations",
        "selected_step": 100, "val": {"x": val_avg}, "test": dict(zip(tests, accs)),
        "val_avg": val_avg, "test_avg": float(np.mean(accs)), "wall_time_s": 1.0,
        "steps": 100, "final_masks": {}}
    run_dir = os.path.join(root, name, "+".join(tests), f"seed{seed}")
    rundir.write_json(os.path.join(run_dir, rundir.RESULTS), results)
    return run_dir


# --- a stand-in training program and flagfiles (fqat_tf.sweep, search) -----------------------
# A stand-in for fqat_tf.train. `--check_only` answers as the training program does (0: free or
# the same settings, 3: other settings); a run logs its argv, GPU environment and times, fails
# for --fail_seed, else writes flags.json and a results.json whose validation accuracy peaks at
# lr 3e-5 (and grows with r).
FAKE_TRAIN = """\
import json, os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
out = args["output_dir"]
settings = {k: v for k, v in args.items()
            if k not in ("output_dir", "calls_log", "fail_seed", "sleep")}
if "--check_only" in sys.argv:
    path = os.path.join(out, "flags.json")
    old = json.load(open(path)) if os.path.exists(path) else settings
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differ:
        sys.stderr.write(f"fake_train: error: {out} holds a run with other settings "
                         f"({', '.join(differ)})\\n")
        sys.exit(3)
    sys.exit(0)
start = time.time()
time.sleep(float(args.get("sleep", 0)))
with open(args["calls_log"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                        "growth": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"),
                        "start": start, "end": time.time()}) + "\\n")
if args["seed"] == args.get("fail_seed"):
    sys.exit(3)
os.makedirs(out, exist_ok=True)
json.dump(settings, open(os.path.join(out, "flags.json"), "w"))
method = [l.split("=", 1)[1].strip() for l in open(args["flagfile"]) if l.startswith("--method=")]
lr, r = float(args.get("lr", 3e-5)), float(args.get("freeze_threshold", 0.3))
tests = args["test_domains"].split(",")
json.dump({"dataset": "pacs", "method": method[0], "quantizer": "lsq", "weight_bits": 4,
           "activation_bits": 4, "test_domains": tests, "seed": int(args["seed"]),
           "hparams": {"lr": lr, "freeze_threshold": r,
                       "freeze_interval": int(args.get("freeze_interval", 300))},
           "test": {d: 0.5 for d in tests}, "val_avg": 0.8 - 1000 * abs(lr - 3e-5) + 0.01 * r},
          open(os.path.join(out, "results.json"), "w"))
"""


def flagfile(tmp_path, dataset="pacs", weight_bits=4, name="cell.cfg", method="fqat"):
    """An experiment flagfile that includes a base file, as experiments/*.cfg do."""
    base = tmp_path / f"base_{name}"
    base.write_text(f"# shared settings\n--dataset={dataset}\n--seed=0\n--test_domains=0\n")
    cell = tmp_path / name
    cell.write_text(f"# Paper cell\n--flagfile={base}\n--method={method}\n"
                    f"--weight_bits={weight_bits}\n--freeze_interval=350\n")
    return str(cell)


def read_calls(log):
    """The calls a stand-in program logged (`FAKE_TRAIN`), in order."""
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [json.loads(line) for line in f]


# --- small models for the two-pass step (fqat_tf.sagm, FQATModel, freezing) ------------------
class Scale(keras.layers.Layer):
    """Multiplies its input by a learnable scalar: a smooth stand-in for a quantizer step."""

    def __init__(self, init=0.7, **kwargs):
        super().__init__(**kwargs)
        self.init = init

    def build(self, input_shape):
        self.step = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.init),
                                    name="step")

    def call(self, x):
        return x * self.step

def _lsq(v, s, lo, hi):
    # LSQ fake quantization with a straight-through round: d/ds is round(v/s) - v/s inside.
    vs = tf.clip_by_value(v / s, lo, hi)
    return s * (vs + tf.stop_gradient(tf.round(vs) - vs))

class ToyQuantDense(keras.layers.Layer):
    """Dense with 3-bit LSQ-quantized kernel and input: a small non-smooth quantized layer."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.kernel_step = self.add_weight(shape=(), initializer=keras.initializers.Constant(0.1),
                                           name="kernel_step")
        self.input_step = self.add_weight(shape=(), initializer=keras.initializers.Constant(0.3),
                                          name="input_step")

    def call(self, x):
        return _lsq(x, self.input_step, -4.0, 3.0) @ _lsq(self.kernel, self.kernel_step, -4.0, 3.0)

def smooth_model(n_in=4, n_out=3):
    inp = keras.Input((n_in,))
    out = Scale(name="scale")(keras.layers.Dense(n_out, name="dense")(inp))
    return keras.Model(inp, out)

def toy_quant_model():
    inp = keras.Input((5,))
    h = keras.layers.Dense(6, activation="relu", name="fp")(inp)
    return keras.Model(inp, ToyQuantDense(3, name="q")(h))

def split(model):
    scales = [v for v in model.trainable_variables if "step" in v.path]
    theta = [v for v in model.trainable_variables if "step" not in v.path]
    return theta, scales

def np_grads(W, b, s, x, target, loss):
    """Analytic gradients of the smooth model: logits = s * (x W + b)."""
    z = x @ W + b
    logits = s * z
    n = x.shape[0]
    if loss == "softmax":
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d = (p - np.eye(W.shape[1])[target]) / n
    else:
        d = 2.0 * (logits - target) / logits.size
    return x.T @ (d * s), (d * s).sum(0), float((d * z).sum())

def np_sagm(W, b, s, x, target, loss, rho, alpha, eps=1e-12):
    gW, gb, g_va = np_grads(W, b, s, x, target, loss)
    c = rho / (np.sqrt((gW ** 2).sum() + (gb ** 2).sum()) + eps) - alpha
    pW, pb, g_flat = np_grads(W + c * gW, b + c * gb, s, x, target, loss)
    return (gW + pW) / 2, (gb + pb) / 2, g_va, g_flat


_STRATEGY = []


def mirrored(collective=False):
    """One MirroredStrategy per process: new ones reuse collective keys and can deadlock."""
    if collective:
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    if not _STRATEGY:
        _STRATEGY.append(tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()))
    return _STRATEGY[0]


# --- models and data for integer export -------------------------------------------------
NUM_CLASSES = 3


def resnet_like():
    """Padded stem with max pooling, one residual block with a strided 1x1 downsample."""
    x = keras.Input((16, 16, 3))
    h = keras.layers.ZeroPadding2D(1, name="stem_pad")(x)
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv1")(h)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.MaxPooling2D(2, name="pool1")(h)
    r = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="block_conv1")(h)
    r = keras.layers.BatchNormalization(name="block_bn1")(r)
    r = keras.layers.ReLU(name="block_relu1")(r)
    r = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False,
                            name="block_conv2")(r)
    r = keras.layers.BatchNormalization(name="block_bn2")(r)
    d = keras.layers.Conv2D(16, 1, strides=2, use_bias=False, name="downsample")(h)
    d = keras.layers.BatchNormalization(name="downsample_bn")(d)
    h = keras.layers.ReLU(name="relu_out")(keras.layers.Add(name="add")([r, d]))
    h = keras.layers.GlobalAveragePooling2D(name="avgpool")(h)
    return keras.Model(x, keras.layers.Dense(NUM_CLASSES, name="classifier")(h))

def randomize_batchnorm(model, seed):
    """Moving statistics and affine parameters far from identity, some gammas negative."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, c).astype("float32"))
            gamma = rng.uniform(0.5, 1.5, c) * np.where(rng.random(c) < 0.25, -1, 1)
            layer.gamma.assign(gamma.astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, c).astype("float32"))

def task(n, seed):
    """Noise images; the class is the channel that carries an extra positive offset."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, size=n).astype("int32")
    x = rng.normal(0, 1, size=(n, 16, 16, 3)).astype("float32")
    x[np.arange(n), :, :, y] += 0.8
    return x, y

def compile_fit(model, x, y, lr, epochs):
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)


def storage_resnet(bits):
    """A trained, calibrated `resnet_like` at `bits`: `(qmodel, its int8 storage model, x, y)`."""
    keras.utils.set_random_seed(bits)
    model = resnet_like()
    randomize_batchnorm(model, 0)
    x, y = task(384, 0)
    compile_fit(model, x, y, 1e-2, 2)
    qmodel = fqat_tf.quantize_model(model, weight_bits=bits, activation_bits=bits)
    # Calibrated, the two convs reading the stem output have different steps.
    fqat_tf.calibrate_scales(qmodel, [x[:128]], num_batches=1)
    return qmodel, int8_storage_model(qmodel), x, y


# --- a run directory as the training program leaves it (export programs) ----------------------
RUN_FLAGS = {"dataset": "rotated_mnist_5k", "data_dir": None, "test_domains": ["75"], "seed": 0,
             "holdout_fraction": 0.2, "batch_per_domain": 4}


def tiny_cnn(norm=None):
    """A 28x28x1 CNN with BatchNorm (or the given normalisation layer) and a 10-way head."""
    x = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv1")(x)
    h = (norm or keras.layers.BatchNormalization(name="bn1"))(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv2")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="avgpool")(h)
    return keras.Model(x, keras.layers.Dense(10, name="classifier")(h))


def make_model_run(root, model=None, flags=RUN_FLAGS):
    """A run directory as the training program leaves it: model.keras and flags.json."""
    keras.utils.set_random_seed(0)
    qmodel = fqat_tf.quantize_model(model or tiny_cnn(), weight_bits=4, activation_bits=4)
    x = np.random.default_rng(0).uniform(0, 1, size=(16, 28, 28, 1)).astype("float32")
    fqat_tf.calibrate_scales(qmodel, [x], num_batches=1)
    os.makedirs(root, exist_ok=True)
    qmodel.save(os.path.join(root, "model.keras"))
    with open(os.path.join(root, "flags.json"), "w") as f:
        json.dump(flags, f)
    return root


def parse_train_flags(args):
    """Parses `fqat_tf.train`'s flags in this process (from the repo root, as the README runs
    them) into its settings."""
    from fqat_tf import train

    absl_flags.FLAGS.unparse_flags()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        absl_flags.FLAGS(["fqat_tf.train", *args])
        return train.settings_from_flags()
    finally:
        os.chdir(cwd)


def builtin_outputs(content, x):
    """The outputs of TFLite model `content` on images `x` from LiteRT's built-in kernels (no
    XNNPACK), input and output converted as `export.verify.TFLiteModel` does."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from export import verify as verify_lib

    runner = verify_lib.TFLiteModel(content)
    runner.interpreter = Interpreter(
        model_content=content,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return runner(x)
