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


def test_tflite_latency_prints_its_figures_and_the_cost_of_requantizing():
    done = subprocess.run(
        [sys.executable, "benchmarks/tflite_latency.py", "--backbone", "resnet18", "--width", "8",
         "--input_shape", "32,32,3", "--threads", "1", "--runs", "3", "--warmup", "1",
         "--requantization_cost"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
        timeout=1200)
    # The exit status says whether the targets are met; a tiny network need not meet them.
    assert done.returncode in (0, 1), done.stderr[-3000:]
    # A residual network's block inputs are read on two grids: some MULs are cut out.
    cut = re.search(r"\((\d+) requantizing MULs cut out", done.stdout)
    assert cut and int(cut.group(1)) > 0, done.stdout
    row = re.search(r"^\| 1 \|((?: [\d.]+ \|){9})$", done.stdout, re.M)
    assert row and all(float(v) > 0 for v in row.group(1).split("|")[:-1]), done.stdout
    assert re.search(r"^1 thread\(s\): int8 without requantizations / PTQ [\d.]+, int8 / int8 "
                     r"without requantizations [\d.]+$", done.stdout, re.M)
    assert re.search(r"^partitions: float 1, int8 1, int4 weights 1, converter PTQ int8 1, "
                     r"int8 without requantizations 1$", done.stdout, re.M)
    assert re.search(r"^targets: .*int4 size <= 0.15x (met|NOT met)$", done.stdout, re.M)
