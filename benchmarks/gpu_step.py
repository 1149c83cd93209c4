"""Step time, throughput, peak memory and MFU of lsq, lsq_sagm and fqat on a GPU.

    python benchmarks/gpu_step.py                    # ResNet-50, 224 px, batch 3 x 32, W4A4
    python benchmarks/gpu_step.py --smoke            # seconds on a CPU: checks the script runs

For each method and each mode (float32; bfloat16 with `mixed_bfloat16`; float32 with XLA;
bfloat16 with XLA) it builds the quantized network, trains `--warmup` untimed steps and
`--steps` timed ones (the last figure of each step fetched, so the step has finished), and
prints the median step time, images/s, peak GPU memory and the model FLOP utilisation: the
network's training FLOPs per step (forward multiply-adds x 2 x 3 for forward and backward,
x 2 for the two-pass methods) over the step time, divided by the GPU's dense peak for the
mode's dtype (`--peak_tflops`, or the table below by GPU name). With two or more GPUs it also
times fqat under MirroredStrategy over two of them. Targets: fqat / lsq <= 2.05, and MFU
>= 30% in bfloat16. Never part of the tests, except `--smoke`.
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fqat_tf  # noqa: E402
from fqat_tf import defaults, models  # noqa: E402

METHODS = ("lsq", "lsq_sagm", "fqat")
# mode: (mixed precision, XLA)
MODES = {"float32": (False, False), "bfloat16": (True, False), "float32+xla": (False, True),
         "bfloat16+xla": (True, True)}
# Dense peak TFLOP/s per GPU name fragment: (bfloat16, float32 through TF32 tensor cores,
# which TensorFlow uses for float32 matmuls and convolutions by default).
PEAK_TFLOPS = {"H200": (989.4, 494.7), "H100": (989.4, 494.7), "A100": (312.0, 156.0),
               "L40S": (362.1, 183.2), "A10G": (70.0, 35.0), "V100": (125.0, 15.7)}


def forward_macs(model):
    """Multiply-adds of one example's forward pass through the model's convs and dense layers."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * c * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += h * w * c * kh * kw * layer.kernel.shape[2]
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return int(total)


def peak_tflops(args, bfloat16):
    if args.peak_tflops:
        return args.peak_tflops
    gpus = tf.config.list_physical_devices("GPU")
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "") if gpus \
        else ""
    for fragment, (bf16, fp32) in PEAK_TFLOPS.items():
        if fragment in name:
            return bf16 if bfloat16 else fp32
    return None


def build(method, mixed, xla, args, strategy):
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if mixed else "float32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        base = models.build_backbone(args.backbone, args.num_classes,
                                     (args.image_size, args.image_size, 3), width=args.width)
        qmodel = fqat_tf.quantize_model(base, weight_bits=args.bits, activation_bits=args.bits)
        model = fqat_tf.FQATModel(qmodel, method, freeze_interval=args.freeze_interval,
                                  weight_decay=defaults.WEIGHT_DECAY)
        model.compile(optimizer=keras.optimizers.Adam(defaults.LR),
                      scale_optimizer=keras.optimizers.Adam(defaults.SCALE_LR),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=xla)
    return base, model


def time_steps(model, data, args):
    callback = fqat_tf.DisorderFreezeCallback(interval=args.freeze_interval)
    train_fn = model.make_train_function()
    iterator = iter(data)
    callback.set_model(model)
    callback.on_train_begin()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        logs = train_fn(iterator)
        float(np.asarray(logs["loss"]))
        callback.on_train_batch_end(i)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(method, mode, args, strategy=None, label=None):
    mixed, xla = MODES[mode]
    strategy = strategy or tf.distribute.get_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        tf.config.experimental.reset_memory_stats(gpus[0].name)
    base, model = build(method, mixed, xla, args, strategy)
    batch = args.domains * args.batch_per_domain
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, args.image_size, args.image_size, 3), dtype=np.float32)
    y = rng.integers(0, args.num_classes, batch)
    data = tf.data.Dataset.from_tensors((x, y)).repeat()
    if strategy is not tf.distribute.get_strategy():
        data = strategy.experimental_distribute_dataset(data)
    step = time_steps(model, data, args)
    passes = 1 if method == "lsq" else 2
    flops = 2 * 3 * passes * forward_macs(base) * batch
    peak = peak_tflops(args, mixed)
    mfu = f"{100 * flops / step / (peak * 1e12):5.1f}%" if peak else "  n/a"
    memory = (tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 2 ** 30
              if gpus else float("nan"))
    print(f"{label or method:22s} {mode:13s} {1e3 * step:9.1f} ms {batch / step:9.1f} img/s "
          f"{memory:7.2f} GiB  MFU {mfu}", flush=True)
    keras.backend.clear_session()
    return step


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true",
                   help="a tiny network, two steps per setting, no XLA: checks the script on a "
                        "CPU")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--image_size", type=int, default=defaults.IMAGE_SIZE)
    p.add_argument("--domains", type=int, default=3)
    p.add_argument("--batch_per_domain", type=int, default=defaults.BATCH_PER_DOMAIN)
    p.add_argument("--num_classes", type=int, default=7)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--freeze_interval", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="dense peak of the GPU for the modes' dtype (default: by GPU name)")
    args = p.parse_args(argv)
    if args.smoke:
        # The smallest backbone: tracing six two-pass ResNet steps took over a minute on a CPU.
        args.backbone, args.width, args.image_size = "mnist_cnn", None, 28
        args.batch_per_domain, args.warmup, args.steps = 2, 1, 2
        # XLA compiles each two-pass step for minutes on a CPU.
        args.modes = "float32,bfloat16"
    return args


def main(argv=None):
    args = parse(argv)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name") if gpus \
        else "CPU (no GPU)"
    print(f"{args.backbone} W{args.bits}A{args.bits} {args.image_size}px, batch "
          f"{args.domains}x{args.batch_per_domain}, {name}, TF {tf.__version__}, Keras "
          f"{keras.__version__}")
    steps = {}
    for mode in args.modes.split(","):
        for method in METHODS:
            steps[mode, method] = measure(method, mode, args)
        print(f"{'':22s} {mode:13s} fqat/lsq = {steps[mode, 'fqat'] / steps[mode, 'lsq']:.3f}, "
              f"fqat/lsq_sagm = {steps[mode, 'fqat'] / steps[mode, 'lsq_sagm']:.3f}",
              flush=True)
    if len(gpus) >= 2:
        mirrored = tf.distribute.MirroredStrategy([d.name for d in
                                                   tf.config.list_logical_devices("GPU")[:2]])
        measure("fqat", "bfloat16", args, mirrored, label="fqat, 2 GPUs mirrored")


if __name__ == "__main__":
    main()
