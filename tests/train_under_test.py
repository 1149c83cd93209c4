"""Runs `python -m fqat_tf.train` for the tests: killed with SIGKILL at a chosen point, and/or
on several logical CPU devices (what `--strategy=mirrored` uses on a machine without a GPU).

    python tests/train_under_test.py [--kill=POINT] [--logical_cpus=N] -- <fqat_tf.train flags>

POINT is one of
    calibration        while the QAT stage calibrates its steps (after the kernel steps)
    step:N             right after step N was applied (before anything of it is written)
    after_eval:N       right after the evaluation at step N (before its files and checkpoint)
    checkpoint:N       while checkpoint N is written (its shards exist, not yet merged)
    final              while the results are written (after the plots, before results.json)

The training program runs unchanged in this process; only the function at the kill point is
wrapped, so what a resumed run finds on disk is what a real crash leaves.
"""
import os
import signal
import sys


def _die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(point, output_dir):
    name, _, arg = point.partition(":")
    n = int(arg) if arg else None
    if name == "calibration":
        from fqat_tf import calibration

        fit = calibration._fit_steps
        calls = []

        def fit_steps(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                _die()
            return fit(*args, **kwargs)

        calibration._fit_steps = fit_steps
    elif name == "step":
        from fqat_tf.fqat_model import FQATModel

        make = FQATModel.make_train_function

        def make_train_function(self, force=False):
            train_fn = make(self, force)

            def wrapped(iterator):
                logs = train_fn(iterator)
                if self.method.quantized and int(self.freeze_state.step.numpy()) == n:
                    _die()
                return logs
            return wrapped

        FQATModel.make_train_function = make_train_function
    elif name == "after_eval":
        from fqat_tf import data, trainer

        evaluate = data.evaluate

        def evaluate_then_die(model, streams, verbose=0):
            record = evaluate(model, streams, verbose=verbose)
            frame = sys._getframe(1)
            while frame is not None and not isinstance(frame.f_locals.get("self"),
                                                       trainer._Stage):
                frame = frame.f_back
            stage = frame.f_locals["self"] if frame is not None else None
            if stage is not None and stage.is_q and int(stage.state["step"].numpy()) == n:
                _die()
            return record

        data.evaluate = evaluate_then_die
    elif name == "checkpoint":
        from tensorflow.python.checkpoint import functional_saver

        merge = functional_saver.gen_io_ops.merge_v2_checkpoints

        target = os.path.abspath(os.path.join(output_dir, "checkpoints", f"ckpt-{n}"))

        def merge_or_die(prefixes, prefix, *args, **kwargs):
            written = prefix.numpy().decode() if hasattr(prefix, "numpy") else str(prefix)
            if os.path.abspath(written) == target:
                _die()
            return merge(prefixes, prefix, *args, **kwargs)

        functional_saver.gen_io_ops.merge_v2_checkpoints = merge_or_die
    elif name == "final":
        from fqat_tf import rundir

        write_json = rundir.write_json

        def write_or_die(path, obj):
            if os.path.basename(path) == rundir.RESULTS and obj.get("method") != "erm":
                _die()
            return write_json(path, obj)

        rundir.write_json = write_or_die
    else:
        raise SystemExit(f"train_under_test.py: unknown point {point!r}")


def main():
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    split = sys.argv.index("--")
    own, train_argv = sys.argv[1:split], sys.argv[split + 1:]
    options = dict(arg.lstrip("-").split("=", 1) for arg in own)
    if "logical_cpus" in options:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * int(options["logical_cpus"]))
    if "kill" in options:
        output_dir = [a.split("=", 1)[1] for a in train_argv if a.startswith("--output_dir=")]
        _install(options["kill"], output_dir[-1] if output_dir else None)
    from absl import app

    from fqat_tf import train

    sys.argv = ["fqat_tf.train"] + train_argv
    app.run(train.main, flags_parser=train.parse_flags)


if __name__ == "__main__":
    main()
