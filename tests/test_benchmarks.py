"""The GPU benchmark runs (tiny, on a CPU) and prints every figure it promises."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_step_smoke_prints_every_method_and_mode():
    done = subprocess.run([sys.executable, "benchmarks/gpu_step.py", "--smoke"], cwd=ROOT,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^(lsq|lsq_sagm|fqat)\s+(float32|bfloat16)\s+([\d.]+) ms\s+([\d.]+) img/s",
                      done.stdout, re.M)
    assert sorted((m, mode) for m, mode, _, _ in rows) == sorted(
        (m, mode) for m in ("lsq", "lsq_sagm", "fqat") for mode in ("float32", "bfloat16"))
    assert all(float(ms) > 0 and float(ips) > 0 for _, _, ms, ips in rows)
    assert len(re.findall(r"fqat/lsq = [\d.]+, fqat/lsq_sagm = [\d.]+", done.stdout)) == 2
