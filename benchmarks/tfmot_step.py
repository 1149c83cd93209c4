"""The peer figure: the same ResNet-18 step under tfmot's default 8-bit QAT (tf_keras).

tfmot accepts only tf_keras models and switches the whole process to tf_keras
(`TF_USE_LEGACY_KERAS=1`), so this runs in its own environment, apart from fqat_tf's Keras 3.
The network mirrors `fqat_tf.models.resnet18` layer for layer (torchvision layout: explicit
padding before strided convs, bias-free convs, BN, separate ReLUs, a 1x1 conv + BN shortcut when
downsampling); the batch, the timing and the optimizer match `step_cost.py`.

Set-up, once (the one command):
    python3 -m venv /tmp/tfmot_venv && /tmp/tfmot_venv/bin/pip install tensorflow==2.21.0 \
        tf_keras==2.21.0 tensorflow-model-optimization==0.8.1

Usage (from the repository root):
    /tmp/tfmot_venv/bin/python benchmarks/tfmot_step.py
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

# fqat_tf.defaults, restated: this environment cannot import the Keras 3 package.
LR, WEIGHT_DECAY, BN_MOMENTUM, BN_EPSILON = 3e-5, 1e-4, 0.9, 1e-5


def _conv(x, filters, kernel_size, stride, name):
    pad = kernel_size // 2
    if pad and stride > 1:
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same" if pad else "valid"
    return keras.layers.Conv2D(filters, kernel_size, strides=stride, padding=padding,
                               use_bias=False, name=name)(x)


def _bn(x, name):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                           name=name)(x)


def _basic_block(x, planes, stride, name):
    shortcut = x
    if stride != 1 or x.shape[-1] != planes:
        shortcut = _bn(_conv(x, planes, 1, stride, f"{name}_downsample_conv"),
                       f"{name}_downsample_bn")
    y = _conv(x, planes, 3, stride, f"{name}_conv1")
    y = keras.layers.ReLU(name=f"{name}_relu1")(_bn(y, f"{name}_bn1"))
    y = _bn(_conv(y, planes, 3, 1, f"{name}_conv2"), f"{name}_bn2")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu2")(y)


def resnet18(num_classes, input_shape, width=64):
    """ResNet-18 (basic blocks 2-2-2-2), as `fqat_tf.models.resnet18`."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.ReLU(name="relu")(_bn(_conv(inputs, width, 7, 2, "conv1"), "bn1"))
    x = keras.layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="valid", name="maxpool")(x)
    for stage in range(4):
        for index in range(2):
            stride = 2 if stage > 0 and index == 0 else 1
            x = _basic_block(x, width * 2 ** stage, stride, f"layer{stage + 1}_{index}")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="classifier")(x))


class StepTimer(keras.callbacks.Callback):
    """Wall and process CPU time of every step, taken once the step's logs are available."""

    def __init__(self):
        super().__init__()
        self.times, self.cpu_times = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jit_compile", action="store_true", help="XLA-compile the step.")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=96, help="3 domains x 32.")
    parser.add_argument("--num_classes", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    tf.keras.utils.set_random_seed(0)
    shape = (args.image_size, args.image_size, 3)
    model = tfmot.quantization.keras.quantize_model(resnet18(args.num_classes, shape))
    model.compile(optimizer=keras.optimizers.AdamW(LR, weight_decay=WEIGHT_DECAY),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=args.jit_compile)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch,) + shape, dtype=np.float32)
    y = rng.integers(0, args.num_classes, args.batch)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    print(f"tfmot {tfmot.__version__} default 8-bit QAT, ResNet-18, input {shape}, batch "
          f"{args.batch}, jit_compile={args.jit_compile}; TF {tf.__version__}, tf_keras "
          f"{keras.__version__}; load before {os.getloadavg()}")
    model.fit(data, steps_per_epoch=args.warmup, verbose=0)
    timer = StepTimer()
    model.fit(data, steps_per_epoch=args.steps, verbose=0, callbacks=[timer])
    t, c = timer.times, timer.cpu_times
    print(f"tfmot_8bit wall median {1e3 * statistics.median(t):8.0f} ms (mean "
          f"{1e3 * statistics.mean(t):8.0f}, min {1e3 * min(t):8.0f})  cpu median "
          f"{1e3 * statistics.median(c):8.0f} ms  ({len(t)} steps)")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
