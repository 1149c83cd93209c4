"""Step cost of lsq, lsq_sagm and fqat on a quantized ResNet-18, measured in one process.

Two passes make 2.0 the floor of fqat/lsq (target <= 2.10); the freezing bookkeeping (sign
recording, mask reads, the callback) should make fqat/lsq_sagm <= 1.03. The methods run in
interleaved rounds so a change in machine load hits all three alike; each step is timed from
`on_train_batch_begin` to `on_train_batch_end`, after the logs are fetched (so the step has
finished), in wall time and in this process's CPU time. The peer figure for tfmot's default
8-bit QAT comes from `tfmot_step.py`, run in its own environment.

Usage (from the repository root):
    python benchmarks/step_cost.py                 # graph mode
    python benchmarks/step_cost.py --jit_compile   # XLA
"""
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fqat_tf  # noqa: E402
from fqat_tf import defaults  # noqa: E402
from fqat_tf import models  # noqa: E402
from fqat_tf.fqat_model import FQATModel  # noqa: E402
from fqat_tf.freeze import DisorderFreezeCallback  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_integer("image_size", 64, "Input height and width.")
flags.DEFINE_integer("domains", 3, "Training domains; one batch per domain per step.")
flags.DEFINE_integer("batch_per_domain", defaults.BATCH_PER_DOMAIN,
                     "Images per domain per step.")
flags.DEFINE_integer("num_classes", 7, "Classifier outputs (PACS: 7).")
flags.DEFINE_integer("weight_bits", 4, "Weight bits.")
flags.DEFINE_integer("activation_bits", 4, "Activation bits.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per method (tracing, first-step allocation).")
flags.DEFINE_integer("rounds", 4, "Interleaved rounds.")
flags.DEFINE_integer("steps", 4, "Timed steps per method per round.")
flags.DEFINE_integer("freeze_interval", 5, "K for fqat: small, so mask updates fall inside the "
                     "timed steps (they count in the mean, not in the median).")
flags.DEFINE_list("methods", ["lsq", "lsq_sagm", "fqat"], "Methods to time.")


class StepTimer(keras.callbacks.Callback):
    """Wall and process CPU time of every step.

    CallbackList fetches the logs before `on_train_batch_end`, so the step has finished. The CPU
    time (all threads of this process) is the work a step costs; on a shared machine it moves
    far less with other processes' load than the wall time does.
    """

    def __init__(self):
        super().__init__()
        self.times, self.cpu_times = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def build(method, base):
    qmodel = fqat_tf.quantize_model(base, weight_bits=FLAGS.weight_bits,
                                    activation_bits=FLAGS.activation_bits)
    model = FQATModel(qmodel, method, freeze_interval=max(FLAGS.freeze_interval, 2))
    model.compile(optimizer=keras.optimizers.Adam(defaults.LR,
                                                  weight_decay=defaults.WEIGHT_DECAY),
                  scale_optimizer=keras.optimizers.Adam(defaults.SCALE_LR),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  jit_compile=FLAGS.jit_compile)
    return model


def run_steps(model, data, steps, timer):
    callbacks = [timer]
    if model.method.mask_rule is not None:
        callbacks.append(DisorderFreezeCallback(interval=FLAGS.freeze_interval,
                                                threshold=defaults.FREEZE_THRESHOLD))
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False,
              callbacks=callbacks)


def main(argv):
    del argv
    keras.utils.set_random_seed(0)
    batch = FLAGS.domains * FLAGS.batch_per_domain
    shape = (FLAGS.image_size, FLAGS.image_size, 3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch,) + shape, dtype=np.float32)
    y = rng.integers(0, FLAGS.num_classes, batch)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    base = models.resnet18(FLAGS.num_classes, input_shape=shape)
    built = {m: build(m, base) for m in FLAGS.methods}
    print(f"ResNet-18 W{FLAGS.weight_bits}A{FLAGS.activation_bits}, input {shape}, batch "
          f"{FLAGS.domains}x{FLAGS.batch_per_domain}, "
          f"{len(fqat_tf.scale_variables(built[FLAGS.methods[0]].qmodel))} scale variables, "
          f"jit_compile={FLAGS.jit_compile}")
    print(f"TF {tf.__version__}, Keras {keras.__version__}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores, load before {os.getloadavg()}")
    timers = {m: StepTimer() for m in FLAGS.methods}
    for m, model in built.items():
        run_steps(model, data, FLAGS.warmup, StepTimer())
    for _ in range(FLAGS.rounds):
        for m, model in built.items():
            run_steps(model, data, FLAGS.steps, timers[m])
    wall, cpu = {}, {}
    for m in FLAGS.methods:
        t, c = timers[m].times, timers[m].cpu_times
        wall[m], cpu[m] = statistics.median(t), statistics.median(c)
        print(f"{m:10s} wall median {1e3 * wall[m]:8.0f} ms (mean {1e3 * statistics.mean(t):8.0f},"
              f" min {1e3 * min(t):8.0f})  cpu median {1e3 * cpu[m]:8.0f} ms  ({len(t)} steps)")
    if "fqat" in wall:
        for other in ("lsq", "lsq_sagm"):
            if other in wall:
                print(f"fqat/{other} = {wall['fqat'] / wall[other]:.3f} (wall), "
                      f"{cpu['fqat'] / cpu[other]:.3f} (cpu)")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    app.run(main)
