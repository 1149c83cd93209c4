"""The 2-D loss surface around a trained model (Li et al. 2018; paper Fig. 1 and 7).

    python -m fqat_tf.landscape RUN_DIR [--out PNG] [--grid 21] [--span 1.0] [--batches 4]

The surface is `L(theta + a * d1 + b * d2)` over a grid of (a, b) in [-span, span]^2, for two
random Gaussian directions d1, d2 that are filter-normalised: each filter of a direction (a
slice along the kernel's last axis, the output channel of a Keras Conv2D or Dense kernel) is
rescaled to the norm of the matching weight filter, so the plot does not depend on the scale
invariance that BN or quantizer steps give the weights. Biases, normalisation parameters and
other 1-D variables get a zero direction (Li et al.'s `ignore biasbn`), and the quantizer steps
(`fqat_tf.scale_variables`) are never perturbed. The model is called with training=False; the
loss is the mean cross-entropy over a bounded number of training-domain validation batches.
Every weight is restored bit-exactly afterwards.
"""
import argparse
import io
import os
import sys

import keras
import numpy as np
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import fqat_tf  # registers the quantization layers for deserialisation
from fqat_tf import data
from fqat_tf import defaults
from fqat_tf import rundir

NPZ_SUFFIX = ".npz"
_FLAG_KEYS = ("dataset", "data_dir", "test_domains", "seed", "holdout_fraction",
              "batch_per_domain")


def cross_entropy(labels, logits):
    """Mean sparse cross-entropy of integer labels and logits."""
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
        labels, logits, from_logits=True))


def filter_normalized(direction, weights):
    """Rescales each filter (slice along the last axis) of `direction` to the norm of `weights`'s.

    Args:
        direction: random array with the shape of `weights` (at least 2-D).
        weights: the variable's value.

    Returns:
        The normalised direction (float64 array).
    """
    d = np.asarray(direction, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    axes = tuple(range(w.ndim - 1))
    d_norm = np.sqrt(np.sum(d * d, axis=axes, keepdims=True))
    w_norm = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
    return d * w_norm / (d_norm + 1e-10)


def directions(model, seed=defaults.LANDSCAPE_SEED):
    """The two filter-normalised directions, for the variables that get a non-zero one.

    Returns:
        A list of (variable, d1, d2): every trainable variable of rank >= 2 that is not a
        quantizer step, in `model.trainable_variables` order, with float64 directions.
    """
    scales = {id(v) for v in fqat_tf.scale_variables(model)}
    rng = np.random.default_rng(seed)
    out = []
    for v in model.trainable_variables:
        if id(v) in scales or len(v.shape) < 2:
            continue
        w = keras.ops.convert_to_numpy(v)
        out.append((v, filter_normalized(rng.standard_normal(w.shape), w),
                    filter_normalized(rng.standard_normal(w.shape), w)))
    if not out:
        raise ValueError(f"model {model.name!r} has no trainable weight of rank >= 2 to perturb")
    return out


def loss_surface(model, batches, grid=defaults.LANDSCAPE_GRID, span=defaults.LANDSCAPE_SPAN,
                 seed=defaults.LANDSCAPE_SEED, loss_fn=cross_entropy):
    """The loss on a grid around the model's weights along two filter-normalised directions.

    Args:
        model: a Keras model mapping images to logits (float or fake-quantized).
        batches: a list of (inputs, labels) batches; the loss is their example-weighted mean.
        grid: points per direction, odd (>= 3), so that the centre is the model itself.
        span: the coordinates run over [-span, span].
        seed: the seed of the directions.
        loss_fn: `(labels, outputs) -> scalar` mean loss of a batch.

    Returns:
        (alphas, betas, losses): the coordinates along d1 and d2 ([grid] each) and the losses,
        `losses[i, j]` at `theta + alphas[i] * d1 + betas[j] * d2` (float64 [grid, grid]).

    Raises:
        ValueError: an even or too small grid, a non-positive span, no batches.
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 3 or grid % 2 == 0:
        raise ValueError(f"grid={grid!r}: expected an odd int >= 3 (the centre is the model)")
    if not span > 0:
        raise ValueError(f"span={span!r}: expected a positive number")
    batches = [(tf.convert_to_tensor(x), tf.convert_to_tensor(y)) for x, y in batches]
    if not batches:
        raise ValueError("no batches to evaluate the loss on")
    triples = directions(model, seed)
    originals = [tf.identity(v.value) for v, _, _ in triples]
    d1s = [tf.constant(d1, dtype=v.dtype) for v, d1, _ in triples]
    d2s = [tf.constant(d2, dtype=v.dtype) for v, _, d2 in triples]

    @tf.function
    def move(a, b):
        for (v, _, _), w, d1, d2 in zip(triples, originals, d1s, d2s):
            v.assign(w + tf.cast(a, v.dtype) * d1 + tf.cast(b, v.dtype) * d2)

    @tf.function(reduce_retracing=True)
    def batch_loss(x, y):
        return loss_fn(y, model(x, training=False))

    sizes = np.array([int(tf.shape(y)[0]) for _, y in batches], dtype=np.float64)
    alphas = span * np.linspace(-1.0, 1.0, grid)
    alphas[grid // 2] = 0.0  # exactly: the centre must be the unperturbed model
    betas = alphas.copy()
    losses = np.zeros((grid, grid))
    try:
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                move(tf.constant(a, tf.float32), tf.constant(b, tf.float32))
                values = np.array([float(batch_loss(x, y)) for x, y in batches])
                losses[i, j] = float(np.sum(values * sizes) / np.sum(sizes))
    finally:
        for (v, _, _), w in zip(triples, originals):
            v.assign(w)
    return alphas, betas, losses


def validation_batches(flags, count=defaults.LANDSCAPE_BATCHES, split="val"):
    """Up to `count` batches of a run's training-domain validation (or test) split.

    The batches are taken from the domains in turn, so that every domain is represented.

    Args:
        flags: the run's flags.json as a dict (dataset, data_dir, test_domains, seed,
            holdout_fraction, batch_per_domain; image_size if the run set one).
        count: the most batches to take.
        split: "val" (training-domain validation) or "test" (the held-out domains).
    """
    missing = [k for k in _FLAG_KEYS if k not in flags]
    if missing:
        raise ValueError(f"{rundir.FLAGS_JSON}: missing key(s) {missing}")
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r}: expected 'val' or 'test'")
    tests = flags["test_domains"]
    tests = [t for t in tests.split(",") if t] if isinstance(tests, str) else list(tests)
    splits = data.load_splits(flags["dataset"], data_dir=flags["data_dir"], test_domains=tests,
                              holdout_fraction=flags["holdout_fraction"], seed=flags["seed"],
                              image_size=flags.get("image_size"))
    streams = data.eval_streams(splits, int(flags["batch_per_domain"]))[split]
    if not streams:
        raise ValueError(f"the run has no {split} split (holdout_fraction="
                         f"{flags['holdout_fraction']})")
    iterators = [iter(ds) for ds in streams.values()]
    batches = []
    while iterators and len(batches) < count:
        for it in list(iterators):
            batch = next(it, None)
            if batch is None:
                iterators.remove(it)
            elif len(batches) < count:
                batches.append(batch)
    return batches


def plot_surface(alphas, betas, losses, png_path, title="Loss landscape"):
    """Writes a filled contour plot of the surface (blue low, red high) atomically."""
    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax = fig.subplots()
    levels = np.linspace(np.min(losses), np.max(losses) + 1e-12, 30)
    filled = ax.contourf(alphas, betas, losses.T, levels=levels, cmap="coolwarm")
    lines = ax.contour(alphas, betas, losses.T, levels=levels[::3], colors="k", linewidths=0.4)
    ax.clabel(lines, fontsize=6, fmt="%.2f")
    ax.plot([0.0], [0.0], marker="*", color="k", markersize=9, label="trained model")
    fig.colorbar(filled, ax=ax, label="cross-entropy loss", format="%.3g")
    ax.set(xlabel="direction 1 (filter-normalised)", ylabel="direction 2 (filter-normalised)",
           title=title)
    ax.legend(loc="upper right", fontsize=7)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    rundir.atomic_write(png_path, buffer.getvalue(), mode="wb")


def save_grid(path, alphas, betas, losses):
    """Writes the grid as .npz (alphas, betas, losses) atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, alphas=alphas, betas=betas, losses=losses)
    rundir.atomic_write(path, buffer.getvalue(), mode="wb")


def run(run_dir, out=None, grid=defaults.LANDSCAPE_GRID, span=defaults.LANDSCAPE_SPAN,
        batches=defaults.LANDSCAPE_BATCHES, seed=defaults.LANDSCAPE_SEED, split="val"):
    """Draws the loss landscape of a run's selected model; returns (png path, npz path)."""
    model_path = os.path.join(run_dir, rundir.MODEL)
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{model_path}: no such file (has the run finished?)")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches={batches!r}: expected a positive int")
    flags = rundir.read_json(os.path.join(run_dir, rundir.FLAGS_JSON))
    model = keras.saving.load_model(model_path, safe_mode=True)
    alphas, betas, losses = loss_surface(model, validation_batches(flags, batches, split),
                                         grid, span, seed)
    png = out or os.path.join(run_dir, "landscape.png")
    npz = os.path.splitext(png)[0] + NPZ_SUFFIX
    tests = flags["test_domains"]
    tests = tests if isinstance(tests, str) else ",".join(tests)
    plot_surface(alphas, betas, losses, png,
                 title=f"{flags.get('method', '')} {flags['dataset']} (test {tests}): "
                       f"{split} loss")
    save_grid(npz, alphas, betas, losses)
    return png, npz


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fqat_tf.landscape",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    parser.add_argument("--out", help="the PNG (default RUN_DIR/landscape.png); the grid goes "
                                      "beside it as .npz")
    parser.add_argument("--grid", type=int, default=defaults.LANDSCAPE_GRID)
    parser.add_argument("--span", type=float, default=defaults.LANDSCAPE_SPAN)
    parser.add_argument("--batches", type=int, default=defaults.LANDSCAPE_BATCHES)
    parser.add_argument("--seed", type=int, default=defaults.LANDSCAPE_SEED)
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="val: training-domain validation (default); test: held-out domains")
    args = parser.parse_args(argv)
    try:
        png, npz = run(args.run_dir, args.out, args.grid, args.span, args.batches, args.seed,
                       args.split)
    except (ValueError, FileNotFoundError) as e:
        print(f"fqat_tf.landscape: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {png} and {npz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
