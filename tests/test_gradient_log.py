"""gradients.csv and disorder.csv of a run against the values of every single step
(docs/algorithm.md §6: paper Fig. 2-5)."""
import os

import numpy as np
import pytest
from absl import flags

from fqat_tf import rundir, train, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 3
RUN = ["--flagfile=experiments/quickstart.cfg", "--erm_steps=4", "--steps=9", "--eval_every=9",
       "--batch_per_domain=4", f"--freeze_interval={K}", "--freeze_threshold=0.6",
       "--calibration_batches=1", "--eval_batch_size=512", "--verbose=0"]


def _run(out, erm, *extra):
    flags.FLAGS.unparse_flags()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        flags.FLAGS(["fqat_tf.train", *RUN, f"--output_dir={out}", f"--erm_cache_dir={erm}",
                     *extra])
        settings = train.settings_from_flags()
    finally:
        os.chdir(cwd)
    trainer.run(settings)
    rows = rundir.read_csv(os.path.join(out, rundir.GRADIENTS_CSV), trainer.GRADIENTS_HEADER)
    return {(int(r[0]), r[1]): np.array(r[2:], np.float64) for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gradients")
    erm = str(base / "erm")
    every = _run(str(base / "every"), erm, "--gradient_window=1")
    windows = _run(str(base / "windows"), erm)
    return every, windows, str(base / "every")


def test_window_rows_are_the_sums_of_the_steps(runs):
    every, windows, _ = runs
    names = sorted({name for _, name in windows})
    assert sorted(windows) == sorted((step, n) for step in (3, 6, 9) for n in names)
    # By hand on the first two windows, then all of them.
    for end in (3, 6):
        for name in names:
            steps = [every[(step, name)] for step in range(end - K + 1, end + 1)]
            np.testing.assert_allclose(windows[(end, name)], np.sum(steps, axis=0), rtol=1e-5,
                                       atol=1e-9, err_msg=f"{name} at {end}")
    for (end, name), value in windows.items():
        total = sum(every[(step, name)] for step in range(end - K + 1, end + 1))
        np.testing.assert_allclose(value, total, rtol=1e-5, atol=1e-9)


def test_applied_gradient_follows_the_masks_in_force(runs):
    every, _, run_dir = runs
    decisions = rundir.read_csv(os.path.join(run_dir, rundir.DISORDER_CSV),
                                trainer.DISORDER_HEADER)
    mask_after = {(int(r[0]), r[1]): float(r[4]) for r in decisions}
    frozen = 0
    for (step, name), (g_va, g_flat, applied) in every.items():
        # The mask decided at the end of the previous window holds for this step.
        decided = (step - 1) // K * K
        mask = mask_after.get((decided, name), 1.0)
        frozen += mask == 0
        np.testing.assert_allclose(applied, (mask * g_va + g_flat) / 2, rtol=1e-5, atol=1e-9,
                                   err_msg=f"{name} at {step}")
    assert frozen, "no scale was frozen: the test would not see the mask"
