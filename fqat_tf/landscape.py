"""The 2-D loss surface around a trained model (Li et al. 2018; paper Fig. 1, 7, 8).

    python -m fqat_tf.landscape RUN_DIR [--out PNG] [--grid 21] [--span 1.0] [--batches 4]
    python -m fqat_tf.landscape RUN_A RUN_B ... --out fig.png   # one panel each (Fig. 7, 8)

The surface is `L(theta + a * d1 + b * d2)` over a grid of (a, b) in [-span, span]^2, for two
random Gaussian directions d1, d2 that are filter-normalised: each filter of a direction (a
slice along the kernel's last axis, the output channel of a Keras Conv2D or Dense kernel) is
rescaled to the norm of the matching weight filter, so the plot does not depend on the scale
invariance that BN or quantizer steps give the weights. Biases, normalisation parameters and
other 1-D variables get a zero direction (Li et al.'s `ignore biasbn`), and the quantizer steps
(`fqat_tf.scale_variables`) are never perturbed. The model is called with training=False; the
loss is the mean cross-entropy over a bounded number of training-domain validation batches.
Every weight is restored bit-exactly afterwards. Several runs make one figure, a panel each,
with one colour scale and one set of contour levels, so the panels compare
(docs/algorithm.md §6).
"""
import argparse
import io
import os
import sys

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

import fqat_tf  # registers the quantization layers for deserialisation
from fqat_tf import cli
from fqat_tf import data
from fqat_tf import defaults
from fqat_tf import plots
from fqat_tf import rundir
from fqat_tf.errors import UserError

NPZ_SUFFIX = ".npz"
_FLAG_KEYS = ("dataset", "data_dir", "test_domains", "seed", "holdout_fraction",
              "batch_per_domain")


class LandscapeError(UserError):
    """A run or an argument the landscape cannot use, named."""


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
        raise LandscapeError(f"model {model.name!r} has no trainable weight of rank >= 2 to "
                             f"perturb")
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
        LandscapeError: an even or too small grid, a non-positive span, no batches.
    """
    check_arguments(grid, span)
    batches = [(tf.convert_to_tensor(x), tf.convert_to_tensor(y)) for x, y in batches]
    if not batches:
        raise LandscapeError("no batches to evaluate the loss on")
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
        raise LandscapeError(f"{rundir.FLAGS_JSON}: missing key(s) {missing}")
    if split not in ("val", "test"):
        raise LandscapeError(f"split={split!r}: expected 'val' or 'test'")
    tests = flags["test_domains"]
    tests = [t for t in tests.split(",") if t] if isinstance(tests, str) else list(tests)
    splits = data.load_splits(flags["dataset"], data_dir=flags["data_dir"], test_domains=tests,
                              holdout_fraction=flags["holdout_fraction"], seed=flags["seed"],
                              image_size=flags.get("image_size"))
    streams = data.eval_streams(splits, int(flags["batch_per_domain"]))[split]
    if not streams:
        raise LandscapeError(f"the run has no {split} split (holdout_fraction="
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


def plot_surfaces(surfaces, png_path):
    """Writes filled contour plots of several surfaces side by side (blue low, red high).

    Every panel shares one colour scale and one set of contour levels (the minimum and
    maximum over all surfaces), so equal colours mean equal losses across panels (paper Fig. 7
    and 8 compare runs this way).

    Args:
        surfaces: a list of (alphas, betas, losses, title).
        png_path: where the PNG goes (written atomically).
    """
    if not surfaces:
        raise LandscapeError("no loss surface to draw")
    low = min(float(np.min(s[2])) for s in surfaces)
    high = max(float(np.max(s[2])) for s in surfaces)
    levels = np.linspace(low, high + 1e-12, 30)
    fig = Figure(figsize=(5.2 * len(surfaces) + 1.2, 5.2), layout="constrained")
    axes = fig.subplots(1, len(surfaces), squeeze=False)[0]
    for ax, (alphas, betas, losses, title) in zip(axes, surfaces):
        filled = ax.contourf(alphas, betas, losses.T, levels=levels, cmap="coolwarm")
        lines = ax.contour(alphas, betas, losses.T, levels=levels[::3], colors="k",
                           linewidths=0.4)
        ax.clabel(lines, fontsize=6, fmt="%.2f")
        ax.plot([0.0], [0.0], marker="*", color="k", markersize=9, label="trained model")
        ax.set(xlabel="direction 1 (filter-normalised)", ylabel="direction 2 (filter-normalised)",
               title=title)
        ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(filled, ax=list(axes), label="cross-entropy loss", format="%.3g")
    plots.save_figure(fig, png_path)


def plot_surface(alphas, betas, losses, png_path, title="Loss landscape"):
    """Writes a filled contour plot of one surface (blue low, red high) atomically."""
    plot_surfaces([(alphas, betas, losses, title)], png_path)


def save_grid(path, alphas, betas, losses, run_dirs=None):
    """Writes the grid as .npz (alphas, betas, losses; run_dirs for several) atomically."""
    arrays = dict(alphas=alphas, betas=betas, losses=losses)
    if run_dirs is not None:
        arrays["run_dirs"] = np.array(run_dirs)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    rundir.atomic_write(path, buffer.getvalue(), mode="wb")


def _open_run(run_dir):
    """The run's flags; refuses a run without a selected model or with incomplete flags."""
    model_path = os.path.join(run_dir, rundir.MODEL)
    if not os.path.isdir(run_dir):
        raise LandscapeError(f"{run_dir}: no such run directory")
    if not os.path.isfile(model_path):
        raise LandscapeError(f"{model_path}: no such file (has the run finished?)")
    try:
        flags = rundir.read_json(os.path.join(run_dir, rundir.FLAGS_JSON))
    except (FileNotFoundError, ValueError) as e:
        raise LandscapeError(str(e)) from None
    missing = [k for k in _FLAG_KEYS if k not in flags]
    if missing:
        raise LandscapeError(f"{os.path.join(run_dir, rundir.FLAGS_JSON)}: missing key(s) "
                             f"{missing}")
    return flags


def run(run_dirs, out=None, grid=defaults.LANDSCAPE_GRID, span=defaults.LANDSCAPE_SPAN,
        batches=defaults.LANDSCAPE_BATCHES, seed=defaults.LANDSCAPE_SEED, split="val"):
    """Draws the loss landscape of one or several runs' selected models.

    Args:
        run_dirs: a finished run directory, or a list of them (one panel each, one shared
            colour scale; the same directions seed for every run).
        out: the PNG; default RUN_DIR/landscape.png for one run, required for several. The
            grid goes beside it as .npz (losses [grid, grid], or [runs, grid, grid] with the
            run_dirs).
        grid, span, batches, seed, split: see `loss_surface` and `validation_batches`.

    Returns:
        (png path, npz path).
    """
    several = not isinstance(run_dirs, str)
    run_dirs = list(run_dirs) if several else [run_dirs]
    check_arguments(grid, span, batches)
    if several and not out:
        raise LandscapeError("several runs need --out (the figure holds one panel per run)")
    flags = [_open_run(d) for d in run_dirs]  # every run is checked before any is evaluated
    surfaces = []
    for run_dir, f in zip(run_dirs, flags):
        model = keras.saving.load_model(os.path.join(run_dir, rundir.MODEL), safe_mode=True)
        alphas, betas, losses = loss_surface(model, validation_batches(f, batches, split),
                                             grid, span, seed)
        tests = f["test_domains"]
        tests = tests if isinstance(tests, str) else ",".join(tests)
        title = f"{f.get('method', '')} {f['dataset']} (test {tests}): {split} loss"
        surfaces.append((alphas, betas, losses,
                         title + (f"\n{_short(run_dir)}" if several else "")))
    png = out or os.path.join(run_dirs[0], "landscape.png")
    npz = os.path.splitext(png)[0] + NPZ_SUFFIX
    plot_surfaces(surfaces, png)
    if several:
        save_grid(npz, surfaces[0][0], surfaces[0][1], np.stack([s[2] for s in surfaces]),
                  run_dirs)
    else:
        save_grid(npz, *surfaces[0][:3])
    return png, npz


def _short(path, width=40):
    return path if len(path) <= width else "..." + path[-(width - 3):]


def check_arguments(grid, span, batches=1):
    """Refuses an even or too small grid, a non-positive span or batch count (LandscapeError)."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 3 or grid % 2 == 0:
        raise LandscapeError(f"grid={grid!r}: expected an odd int >= 3 (the centre is the "
                             f"model)")
    if not span > 0:
        raise LandscapeError(f"span={span!r}: expected a positive number")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise LandscapeError(f"batches={batches!r}: expected a positive int")


def _checked(convert, name):
    """An argparse type: `convert` the text, then `check_arguments` on it as `name`."""
    def parse(text):
        try:
            value = convert(text)
            check_arguments(**dict(dict(grid=3, span=1.0, batches=1), **{name: value}))
        except ValueError as e:  # LandscapeError is one
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


PROG = "fqat_tf.landscape"


def main(argv=None):
    parser = cli.ArgumentParser(prog=PROG,
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="finished run directories: one panel each, one colour scale")
    parser.add_argument("--out", help="the PNG (default RUN_DIR/landscape.png for one run; "
                                      "required for several); the grid goes beside it as .npz")
    parser.add_argument("--grid", type=_checked(int, "grid"), default=defaults.LANDSCAPE_GRID)
    parser.add_argument("--span", type=_checked(float, "span"), default=defaults.LANDSCAPE_SPAN)
    parser.add_argument("--batches", type=_checked(int, "batches"),
                        default=defaults.LANDSCAPE_BATCHES)
    parser.add_argument("--seed", type=int, default=defaults.LANDSCAPE_SEED)
    parser.add_argument("--split", choices=("val", "test"), default="val",
                        help="val: training-domain validation (default); test: held-out domains")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if len(args.run_dirs) > 1 and not args.out:
        parser.error("several RUN_DIRs need --out (one figure, one panel per run)")

    def body():
        png, npz = run(args.run_dirs if len(args.run_dirs) > 1 else args.run_dirs[0],
                       args.out, args.grid, args.span, args.batches, args.seed, args.split)
        print(f"wrote {png} and {npz}")

    cli.configure_logging(args.verbosity)
    return cli.run(PROG, body, args.verbosity)


if __name__ == "__main__":
    sys.exit(main())
