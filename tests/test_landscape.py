"""fqat_tf.landscape: filter-normalised directions, the surface against numpy, exact restore."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from matplotlib.contour import ContourSet

import fqat_tf
from fqat_tf import landscape, plots, rundir
from fqat_tf.models.mnist_cnn import mnist_cnn


def _snapshot(model):
    """Every variable's bytes, so a comparison is bit-exact (NaN- and -0.0-proof)."""
    return {v.path: keras.ops.convert_to_numpy(v).tobytes() for v in model.weights}


def _linear_bowl(seed=0):
    """A Dense model and targets equal to its own outputs: the MSE surface is a bowl at 0."""
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="dense")])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(12, 5)).astype("float32")
    y = keras.ops.convert_to_numpy(model(x))
    return model, [(x[:8], y[:8]), (x[8:], y[8:])], x, y


def _mse(y, pred):
    return tf.reduce_mean(tf.square(pred - y))


def test_filter_normalized_matches_each_filter_norm():
    rng = np.random.default_rng(0)
    w, d = rng.normal(size=(3, 3, 4, 6)), rng.normal(size=(3, 3, 4, 6))
    out = landscape.filter_normalized(d, w)
    for f in range(6):
        assert np.linalg.norm(out[..., f]) == pytest.approx(np.linalg.norm(w[..., f]))
        # Only the length changes: the filter keeps its direction.
        cos = np.sum(out[..., f] * d[..., f]) / (np.linalg.norm(out[..., f])
                                                  * np.linalg.norm(d[..., f]))
        assert cos == pytest.approx(1.0)


def test_surface_matches_numpy_and_is_lowest_at_the_centre():
    model, batches, x, y = _linear_bowl()
    before = _snapshot(model)
    alphas, betas, losses = landscape.loss_surface(model, batches, grid=5, span=0.5, seed=3,
                                                   loss_fn=_mse)
    np.testing.assert_array_equal(alphas, [-0.5, -0.25, 0.0, 0.25, 0.5])
    np.testing.assert_array_equal(betas, alphas)
    assert _snapshot(model) == before
    # Independent reference: the same Gaussian draws, normalised per output column by hand.
    kernel = keras.ops.convert_to_numpy(model.get_layer("dense").kernel).astype(np.float64)
    bias = keras.ops.convert_to_numpy(model.get_layer("dense").bias)
    rng = np.random.default_rng(3)
    raw1, raw2 = rng.standard_normal(kernel.shape), rng.standard_normal(kernel.shape)
    cols = [np.linalg.norm(kernel[:, j]) for j in range(3)]
    d1 = np.stack([raw1[:, j] / np.linalg.norm(raw1[:, j]) * cols[j] for j in range(3)], 1)
    d2 = np.stack([raw2[:, j] / np.linalg.norm(raw2[:, j]) * cols[j] for j in range(3)], 1)
    expected = np.array([[np.mean((x @ (kernel + a * d1 + b * d2) + bias - y) ** 2)
                          for b in betas] for a in alphas])
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-6)
    assert losses[2, 2] == pytest.approx(0.0, abs=1e-10)
    assert np.all(np.delete(losses.ravel(), 12) > 1e-4)
    assert np.unravel_index(np.argmin(losses), losses.shape) == (2, 2)


def test_bias_and_norm_parameters_get_no_direction():
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="c"),
                              keras.layers.BatchNormalization(name="bn"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="d")])
    moved = [v.path.split("/", 1)[1] for v, _, _ in landscape.directions(model, seed=0)]
    assert moved == ["c/kernel", "d/kernel"]


def test_a_scale_of_any_rank_is_excluded(monkeypatch):
    # Quantizer steps are rank 0 or 1 today; the exclusion must not rest on their rank.
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"),
                              keras.layers.Dense(2, name="b")])
    monkeypatch.setattr(fqat_tf, "scale_variables", lambda m: [m.get_layer("a").kernel])
    moved = [v.path.split("/", 1)[1] for v, _, _ in landscape.directions(model, seed=0)]
    assert moved == ["b/kernel"]


def _quantized_model():
    model = fqat_tf.quantize_model(mnist_cnn(10, width=8), weight_bits=4, activation_bits=4)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(6, 28, 28, 1)).astype("float32")
    return model, x, rng.integers(0, 10, size=6).astype("int32")


def test_quantizer_scales_are_never_perturbed():
    model, x, y = _quantized_model()
    scales = fqat_tf.scale_variables(model)
    assert scales
    frozen = [tf.constant(keras.ops.convert_to_numpy(s)) for s in scales]
    scale_ids = {id(s) for s in scales}
    assert not scale_ids & {id(v) for v, _, _ in landscape.directions(model)}

    def checked_loss(labels, logits):
        # Runs at every grid point: any perturbed step would fail the evaluation.
        checks = [tf.debugging.assert_equal(s.value, f) for s, f in zip(scales, frozen)]
        with tf.control_dependencies(checks):
            return landscape.cross_entropy(labels, logits)

    before = _snapshot(model)
    centre = float(landscape.cross_entropy(y, model(x, training=False)))
    _, _, losses = landscape.loss_surface(model, [(x, y)], grid=3, span=0.2,
                                          loss_fn=checked_loss)
    assert _snapshot(model) == before
    assert losses[1, 1] == pytest.approx(centre, rel=1e-6)
    assert np.ptp(losses) > 0


@pytest.mark.parametrize("grid, span, match", [(4, 1.0, "odd int"), (1, 1.0, "odd int"),
                                               (5, 0.0, "span=0.0")])
def test_bad_grid_or_span(grid, span, match):
    model, batches, _, _ = _linear_bowl()
    with pytest.raises(ValueError, match=match):
        landscape.loss_surface(model, batches, grid=grid, span=span)


def test_cli_on_a_run_directory(tmp_path, capsys):
    model, _, _ = _quantized_model()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(str(run_dir / rundir.MODEL))
    flags = {"dataset": "rotated_mnist_5k", "data_dir": None, "test_domains": ["0"],
             "seed": 0, "holdout_fraction": 0.2, "batch_per_domain": 4, "method": "fqat"}
    (run_dir / rundir.FLAGS_JSON).write_text(json.dumps(flags))
    assert landscape.main([str(run_dir), "--grid", "3", "--batches", "2"]) == 0
    with open(run_dir / "landscape.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    grid = np.load(run_dir / "landscape.npz")
    assert grid["losses"].shape == (3, 3) and np.all(np.isfinite(grid["losses"]))
    np.testing.assert_array_equal(grid["alphas"], [-1.0, 0.0, 1.0])
    batches = landscape.validation_batches(flags, 2)
    assert [int(b[1].shape[0]) for b in batches] == [4, 4]
    assert not [n for n in os.listdir(run_dir) if n.startswith(".")]
    assert "wrote" in capsys.readouterr().out

    assert landscape.main([str(tmp_path / "absent")]) == 1
    assert "absent: no such run directory" in capsys.readouterr().err
    os.remove(run_dir / "landscape.npz")
    os.rename(run_dir / rundir.MODEL, run_dir / "kept.keras")
    assert landscape.main([str(run_dir)]) == 1
    assert "model.keras: no such file" in capsys.readouterr().err
    os.rename(run_dir / "kept.keras", run_dir / rundir.MODEL)
    del flags["holdout_fraction"]
    (run_dir / rundir.FLAGS_JSON).write_text(json.dumps(flags))
    assert landscape.main([str(run_dir), "--grid", "3"]) == 1
    assert "missing key(s) ['holdout_fraction']" in capsys.readouterr().err


def test_several_runs_share_one_colour_scale(tmp_path, monkeypatch):
    figures = []
    original = plots.save_figure
    monkeypatch.setattr(plots, "save_figure",
                        lambda fig, path: figures.append(fig) or original(fig, path))
    flags = {"dataset": "rotated_mnist_5k", "data_dir": None, "test_domains": ["0"],
             "seed": 0, "holdout_fraction": 0.2, "batch_per_domain": 4, "method": "fqat"}
    run_dirs = []
    for i in range(2):
        keras.utils.set_random_seed(i)
        model, _, _ = _quantized_model()
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        model.save(str(run_dir / rundir.MODEL))
        (run_dir / rundir.FLAGS_JSON).write_text(json.dumps(flags))
        run_dirs.append(str(run_dir))
    out = str(tmp_path / "fig7.png")
    assert landscape.main([*run_dirs, "--out", out, "--grid", "3", "--batches", "1"]) == 0
    grid = np.load(tmp_path / "fig7.npz")
    assert grid["losses"].shape == (2, 3, 3) and list(grid["run_dirs"]) == run_dirs
    # The two models differ, so do their surfaces; the colour scale spans both.
    assert not np.array_equal(grid["losses"][0], grid["losses"][1])
    (fig,) = figures
    sets = [c for ax in fig.axes for c in ax.collections if isinstance(c, ContourSet)
            and c.filled]
    assert len(sets) == 2
    np.testing.assert_array_equal(sets[0].levels, sets[1].levels)
    assert sets[0].levels[0] == pytest.approx(np.min(grid["losses"]))
    assert sets[0].levels[-1] == pytest.approx(np.max(grid["losses"]), abs=1e-9)
    assert (sets[0].norm.vmin, sets[0].norm.vmax) == (sets[1].norm.vmin, sets[1].norm.vmax)
    # Each surface is the single-run surface of its model (same seed of directions).
    model = keras.saving.load_model(os.path.join(run_dirs[1], rundir.MODEL))
    _, _, alone = landscape.loss_surface(model, landscape.validation_batches(flags, 1), grid=3)
    np.testing.assert_array_equal(alone, grid["losses"][1])
    with pytest.raises(SystemExit) as exit_info:
        landscape.main(run_dirs)  # several runs need --out
    assert exit_info.value.code == 2
