"""Single-image latency and file size of the int8 TFLite model against the float one.

    python benchmarks/tflite_latency.py                          # ResNet-18, 224x224, W4A4
    python benchmarks/tflite_latency.py runs/quickstart/qat      # a trained run directory
    python benchmarks/tflite_latency.py --backbone mnist_cnn --input_shape 28,28,1 --bits 4

Both models are the same network with BatchNorm folded: the int8 one from `export.tflite`, the
float one from `export.tflite.convert_float` (no fake-quant ops). Each is run on one image with
XNNPACK, the default delegate of `ai_edge_litert`, at 1 and 2 threads; the median of
`--runs` timed invocations after `--warmup` untimed ones is reported. Targets: int8 latency at
most 0.5x float, size at most 0.27x. A third column times the converter's own post-training
int8 model of the float network (one XNNPACK partition, no clip ops): what int8 can reach on
this CPU. A network built here (no run directory) has random weights, calibrated on random
images: latency and size do not depend on the values.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from fqat_tf import defaults  # noqa: E402

LATENCY_TARGET = 0.5
SIZE_TARGET = 0.27


def median_latency_ms(content, threads, runs, warmup, seed=0):
    """Median wall time of one single-image invocation, in milliseconds."""
    from export.verify import TFLiteModel

    model = TFLiteModel(content, num_threads=threads)
    shape = [1] + [int(d) for d in model.input["shape_signature"][1:]]
    image = model.quantize_input(np.random.default_rng(seed).normal(size=shape))
    for _ in range(warmup):
        model.invoke(image)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def post_training_int8(model, batches):
    """The TFLite converter's own full-int8 model of the float network (the reference)."""
    import tensorflow as tf

    from export.graph import ExportGraph

    graph = ExportGraph(model, allow_float=True)
    spec = tf.TensorSpec((None,) + graph.input_shape[1:], tf.float32)
    fn = tf.function(lambda x: graph.build(x, "float"), input_signature=[spec], autograph=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([b[i:i + 1]] for b in batches
                                                for i in range(len(b)))
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


def build_models(args):
    """(int8 bytes, float bytes, description) for the requested network."""
    import keras

    import fqat_tf
    from export import tflite as export_lib
    from fqat_tf import models, rundir

    if args.source:
        if os.path.isdir(args.source):
            model = export_lib.load_model(os.path.join(args.source, rundir.MODEL))
            batches = export_lib.representative_batches(export_lib.read_flags(args.source))
        else:
            raise SystemExit(f"{args.source}: expected a run directory")
        name = args.source
    else:
        shape = tuple(int(d) for d in args.input_shape.split(","))
        keras.utils.set_random_seed(0)
        float_model = models.build_backbone(args.backbone, args.num_classes, shape, args.width)
        model = fqat_tf.quantize_model(float_model, weight_bits=args.bits,
                                       activation_bits=args.bits)
        rng = np.random.default_rng(0)
        batches = [rng.normal(size=(8,) + shape).astype(np.float32) for _ in range(2)]
        fqat_tf.calibrate_scales(model, batches, num_batches=2)
        name = (f"{args.backbone} width {args.width or 'default'} {args.input_shape} "
                f"W{args.bits}A{args.bits}")
    int8 = export_lib.convert(model, batches, int8_io=True, max_batches=None)
    return int8, export_lib.convert_float(model), post_training_int8(model, batches), name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", nargs="?", help="run directory (default: build --backbone)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--input_shape", default="224,224,3")
    p.add_argument("--num_classes", type=int, default=7)
    p.add_argument("--bits", type=int, default=defaults.WEIGHT_BITS)
    p.add_argument("--threads", default=",".join(str(t) for t in defaults.LATENCY_THREADS))
    p.add_argument("--runs", type=int, default=defaults.LATENCY_RUNS)
    p.add_argument("--warmup", type=int, default=defaults.LATENCY_WARMUP)
    p.add_argument("--save_dir", help="also write int8.tflite and float.tflite here")
    args = p.parse_args(argv)
    int8, flt, ptq, name = build_models(args)
    if args.save_dir:
        from fqat_tf import rundir

        for fname, content in (("int8.tflite", int8), ("float.tflite", flt)):
            rundir.atomic_write(os.path.join(args.save_dir, fname), content, mode="wb")
    print(f"# {name}: median of {args.runs} single-image runs, XNNPACK")
    print("| threads | float ms | int8 ms | int8/float | converter PTQ int8 ms |")
    print("|---|---|---|---|---|")
    ratios = []
    for threads in (int(t) for t in args.threads.split(",")):
        f_ms, i_ms, p_ms = (median_latency_ms(c, threads, args.runs, args.warmup)
                            for c in (flt, int8, ptq))
        ratios.append(i_ms / f_ms)
        print(f"| {threads} | {f_ms:.2f} | {i_ms:.2f} | {i_ms / f_ms:.3f} | {p_ms:.2f} |")
    size = len(int8) / len(flt)
    print(f"size: float {len(flt)} B, int8 {len(int8)} B, int8/float {size:.3f}")
    ok = max(ratios) <= LATENCY_TARGET and size <= SIZE_TARGET
    print(f"targets (latency <= {LATENCY_TARGET}x, size <= {SIZE_TARGET}x): "
          f"{'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
