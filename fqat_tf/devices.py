"""The GPUs a sweep hands to its runs: found without starting TensorFlow, grouped, isolated.

    groups = device_groups("all", gpus_per_run=2)   # [("0", "1"), ("2", "3")] on 4 GPUs
    env = child_env(groups[0])                      # CUDA_VISIBLE_DEVICES=0,1, allow growth

GPUs are named by the indices `nvidia-smi -L` lists (the machine's own numbering, whatever
CUDA_VISIBLE_DEVICES the sweep itself runs under). Where nvidia-smi is missing, a child Python
asks TensorFlow, so the sweep process never initialises CUDA itself: a runtime started there
would hold memory on every GPU for the whole sweep.
"""
import os
import re
import subprocess
import sys

from fqat_tf.errors import UserError

NVIDIA_SMI = ("nvidia-smi", "-L")
_TF_PROBE = (sys.executable, "-c", "import tensorflow as tf; "
             "print(len(tf.config.list_physical_devices('GPU')))")
_GPU_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)
ALLOW_GROWTH = {"TF_FORCE_GPU_ALLOW_GROWTH": "true"}


class DeviceError(UserError):
    """A `--devices` / `--gpus_per_run` request this machine cannot serve, named."""


def list_gpus(command=NVIDIA_SMI, probe=_TF_PROBE):
    """The GPU indices of this machine, as text ("0", "1", ...); empty when there is none.

    Args:
        command: the listing command (`nvidia-smi -L`: one "GPU <i>: <name> (UUID: ...)" line
            per GPU).
        probe: run when `command` is missing or fails; prints TensorFlow's GPU count.
    """
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return _GPU_LINE.findall(proc.stdout)
    except (FileNotFoundError, PermissionError, subprocess.TimeoutExpired):
        pass
    proc = subprocess.run(probe, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.strip().splitlines()
    count = int(lines[-1]) if proc.returncode == 0 and lines and lines[-1].isdigit() else 0
    return [str(i) for i in range(count)]


def device_groups(spec, gpus_per_run=1, available=None):
    """Splits the GPUs `spec` names into groups of `gpus_per_run`, one group per running run.

    Args:
        spec: "all" or a comma list of GPU indices ("0,1,2,3").
        gpus_per_run: GPUs each run gets (consecutive in `spec` order).
        available: the machine's GPU indices; None asks `list_gpus()`.

    Returns:
        A list of tuples of index texts.

    Raises:
        DeviceError: a malformed or repeated index, a GPU the machine does not have, no GPU
            for "all", or a count that does not split into groups of `gpus_per_run`.
    """
    if isinstance(gpus_per_run, bool) or not isinstance(gpus_per_run, int) or gpus_per_run < 1:
        raise DeviceError(f"--gpus_per_run={gpus_per_run!r}: expected a positive int")
    if spec != "all":
        wanted = [d.strip() for d in str(spec).split(",")]
        bad = [d for d in wanted if not d.isdigit()]
        if bad:
            raise DeviceError(f"--devices={spec}: {bad[0]!r} is not a GPU index; give 'all' "
                              f"or indices as `nvidia-smi -L` lists them, e.g. 0,1")
        wanted = [str(int(d)) for d in wanted]
        if len(set(wanted)) != len(wanted):
            raise DeviceError(f"--devices={spec}: a GPU named twice")
    available = list_gpus() if available is None else list(available)
    if spec == "all":
        if not available:
            raise DeviceError("--devices=all: no GPU found (`nvidia-smi -L` and TensorFlow "
                              "list none)")
        wanted = available
    missing = [d for d in wanted if d not in available]
    if missing:
        raise DeviceError(f"--devices={spec}: no GPU {', '.join(missing)} on this machine "
                          f"(it has {', '.join(available) or 'none'})")
    if len(wanted) % gpus_per_run:
        raise DeviceError(f"--devices={spec}: {len(wanted)} GPU(s) do not split into groups "
                          f"of --gpus_per_run={gpus_per_run}")
    return [tuple(wanted[i:i + gpus_per_run]) for i in range(0, len(wanted), gpus_per_run)]


def child_env(group, base=None):
    """The environment of a run on `group`: only those GPUs visible, memory grown on demand.

    Allow-growth keeps a run from reserving a whole GPU up front, so a run's evaluation or a
    landscape started beside it still finds memory.
    """
    env = dict(os.environ if base is None else base)
    env.update(ALLOW_GROWTH, CUDA_VISIBLE_DEVICES=",".join(group))
    return env
