"""What a person reads from the training program: one line per stage, the metrics' own values,
plain lines in a log file, no TensorFlow or absl noise, and TensorBoard with the freezing."""
import glob
import io
import os
import re
import subprocess
import sys

import tensorflow as tf

from fqat_tf.progress import Progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_shows_each_metric_as_it_is():
    out = io.StringIO()
    progress = Progress(10, num_scales=7, every=5, stream=out)
    for step in range(1, 11):
        progress.update(step, {"loss": 0.25, "accuracy": 0.9, "frozen": 2 / 7})
    lines = out.getvalue().splitlines()
    # Not a terminal: a plain line every 5 steps, no carriage return, no colour.
    assert [line.split("  ")[0] for line in lines] == ["step 5/10", "step 10/10"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert "loss 0.2500  accuracy 0.9000  frozen 2/7" in lines[-1]


def test_progress_on_a_terminal_rewrites_one_line():
    out = _Terminal()
    progress = Progress(3, num_scales=None, stream=out)
    for step in range(1, 4):
        progress.update(step, {"loss": 1.0 / step, "frozen": 0.0})
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and "frozen" not in text
    assert "step 3/3  loss 0.3333" in text


def test_a_quickstart_run_is_quiet_and_logs_freezing_to_tensorboard(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = tmp_path / "qat"
    done = subprocess.run(
        [sys.executable, "-m", "fqat_tf.train", "--flagfile=experiments/quickstart.cfg",
         "--erm_steps=4", "--steps=6", "--eval_every=3", "--freeze_interval=3",
         "--batch_per_domain=4", f"--output_dir={out}", f"--erm_cache_dir={tmp_path / 'erm'}"],
        cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    both = done.stdout + done.stderr
    # absl's and TensorFlow's own line prefixes (I1130 12:00:00.0 ..., I0000 00:00:...).
    assert not re.search(r"^[IWE]\d{4} \d\d:\d\d:\d\d", both, re.M), both[-3000:]
    assert "oneDNN" not in both and "cuInit" not in both and "\r" not in both
    stages = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert stages == [f"[ERM] 4 steps, test 75, seed 0 -> {line.split(' -> ')[1]}"
                      for line in stages[:1]] + [f"[fqat lsq W4A4] 6 steps, test 75, seed 0 -> "
                                                 f"{out}"]
    tags = set()
    for events in glob.glob(str(out / "tb" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(events):
            tags.update(v.tag for v in event.summary.value)
    for prefix in ("disorder/", "flat_disorder/", "mask/", "scale/", "train/loss", "val_avg"):
        assert any(t.startswith(prefix) for t in tags), (prefix, sorted(tags))
    assert "conv2/kernel_step" in " ".join(tags)
