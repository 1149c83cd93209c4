"""Single-image latency and file size of the int8 and int4-weight TFLite models against the
float one and the converter's own post-training int8 model.

    python benchmarks/tflite_latency.py                          # ResNet-18, 224x224, W4A4
    python benchmarks/tflite_latency.py runs/quickstart/qat      # a trained run directory
    python benchmarks/tflite_latency.py --backbone mnist_cnn --input_shape 28,28,1 --bits 4
    python benchmarks/tflite_latency.py --application MobileNetV2   # a keras.applications model
    python benchmarks/tflite_latency.py --requantization_cost       # what requantizing costs
    python benchmarks/tflite_latency.py --shared_inputs=stored      # no requantizing op at all

All four are the same network with BatchNorm folded: ours from `export.tflite` (int8 weights,
and `--weight_storage=int4`), the float one from `export.tflite.convert_float` (no fake-quant
ops), and the converter's post-training int8 model of the float network (calibrated on the same
images; no clip or requantization ops: what int8 can reach). Each is run on one image with
XNNPACK, the default delegate of `ai_edge_litert`; the four are invoked in turn, `--runs`
times after `--warmup` rounds, so a machine shared with other work slows them alike, and the
median of each is reported with the number of XNNPACK partitions (an op the delegate does not
take splits the graph and runs on LiteRT's built-in kernels). Targets: int8 at most 0.35x float
and no slower than the converter's int8; size at most 0.27x float (int8 weights) and 0.15x
(int4 weights). A network built here (no run directory) has random weights, calibrated on
random images: latency and size do not depend on the values. A keras.applications model
(`--application`) is quantized with per-channel steps and int8 storage (its activations need
it), its steps fitted on the quantized network.
"""
import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from fqat_tf import defaults  # noqa: E402
from fqat_tf.quantize import SHARED_INPUTS  # noqa: E402

LATENCY_TARGET = 0.35            # int8 / float
PTQ_TARGET = 1.0                 # int8 / the converter's post-training int8
SIZE_TARGET = 0.27               # int8 weights / float
INT4_SIZE_TARGET = 0.15          # int4 weights / float
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16")
NO_REQUANTIZATION = "int8 without requantizations"
SAME_SCALE_OPS = ("PAD", "PADV2", "RESHAPE", "MAX_POOL_2D", "SQUEEZE", "EXPAND_DIMS")


def machine():
    """The CPU's model name and the vector extensions that matter for int8 kernels."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cpus, flags: {' '.join(f for f in CPU_FLAGS if f in flags)}"


def partitions(content):
    """Number of XNNPACK partitions of a model (delegate nodes after delegation)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=content)
    it.allocate_tensors()
    return [op["op_name"] for op in it._get_ops_details()].count("DELEGATE")


def interleaved_latency_ms(contents, threads, runs, warmup, seed=0):
    """Median wall time of one single-image invocation of each model, in milliseconds; the
    models take turns, run after run."""
    from export.verify import TFLiteModel

    models = [TFLiteModel(c, num_threads=threads) for c in contents]
    for model in models:
        shape = [1] + [int(d) for d in model.input["shape_signature"][1:]]
        model.invoke(model.quantize_input(np.random.default_rng(seed).normal(size=shape)))
    times = [[] for _ in models]
    for r in range(warmup + runs):
        for model, spent in zip(models, times):
            start = time.perf_counter()
            model.interpreter.invoke()
            if r >= warmup:
                spent.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def without_requantizations(content):
    """The int8 model with every requantizing MUL cut out (a MUL by a constant scalar: the exact
    one `export.emitter` multiplies by to move a tensor onto another grid), its readers reading
    the MUL's input instead. The values are wrong and the graph is otherwise the same: its time
    against the int8 model's is what those MULs cost.

    Returns:
      `(flatbuffer, number of MULs cut out)`.
    """
    from export import flatbuffer

    utils, _ = flatbuffer.modules()
    model = flatbuffer.read(content)
    cut = 0
    for graph in model.subgraphs:
        source, kept = {}, []
        for op in graph.operators:
            op.inputs = [source.get(i, i) for i in op.inputs]
            op_name = utils.opcode_to_name(model, op.opcodeIndex)
            consts = [i for i in op.inputs
                      if model.buffers[graph.tensors[i].buffer].data is not None
                      and int(np.prod(graph.tensors[i].shape)) == 1]
            if op_name == "MUL" and len(consts) == 1:
                source[op.outputs[0]] = next(i for i in op.inputs if i != consts[0])
                cut += 1
                continue
            if op_name in SAME_SCALE_OPS:
                # These ops take one scale on both sides: the output follows the new input.
                graph.tensors[op.outputs[0]].quantization = graph.tensors[
                    op.inputs[0]].quantization
            kept.append(op)
        graph.operators = kept
        graph.outputs = [source.get(i, i) for i in graph.outputs]
    return flatbuffer.write(model), cut


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
    """`({name: flatbuffer}, description)` for the requested network."""
    import keras

    import fqat_tf
    from export import tflite as export_lib
    from fqat_tf import models, rundir

    if args.source:
        if not os.path.isdir(args.source):
            raise SystemExit(f"{args.source}: expected a run directory")
        model = export_lib.load_model(os.path.join(args.source, rundir.MODEL))
        batches = export_lib.representative_batches(export_lib.read_flags(args.source))
        name = args.source
    else:
        shape = tuple(int(d) for d in args.input_shape.split(","))
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        batches = [rng.normal(size=(8,) + shape).astype(np.float32) for _ in range(2)]
        if args.application:
            from fqat_tf.storage import int8_storage_model

            float_model = getattr(keras.applications, args.application)(
                weights=None, input_shape=shape, classes=args.num_classes)
            model = int8_storage_model(fqat_tf.quantize_model(
                float_model, weight_bits=args.bits, activation_bits=args.bits, per_channel=True,
                shared_inputs=args.shared_inputs))
            fqat_tf.calibrate_scales(model, batches, num_batches=2, source="quantized")
            fqat_tf.calibrate_ranges(model, batches, num_batches=2)
            name = (f"{args.application} {args.input_shape} W{args.bits}A{args.bits} "
                    f"shared inputs {args.shared_inputs}")
        else:
            float_model = models.build_backbone(args.backbone, args.num_classes, shape,
                                                args.width)
            model = fqat_tf.quantize_model(float_model, weight_bits=args.bits,
                                           activation_bits=args.bits,
                                           shared_inputs=args.shared_inputs)
            fqat_tf.calibrate_scales(model, batches, num_batches=2)
            name = (f"{args.backbone} width {args.width or 'default'} {args.input_shape} "
                    f"W{args.bits}A{args.bits} shared inputs {args.shared_inputs}")
    contents = {
        "float": export_lib.convert_float(model),
        "int8": export_lib.export(model, batches, max_batches=None).tflite,
        "int4 weights": export_lib.export(model, batches, max_batches=None,
                                          weight_storage="int4").tflite,
        "converter PTQ int8": post_training_int8(model, batches),
    }
    if args.requantization_cost:
        contents[NO_REQUANTIZATION], cut = without_requantizations(contents["int8"])
        name += f" ({cut} requantizing MULs cut out of '{NO_REQUANTIZATION}')"
    return contents, name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", nargs="?", help="run directory (default: build --backbone)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--application", help="a keras.applications model (e.g. MobileNetV2) "
                                          "instead of --backbone")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--input_shape", default="224,224,3")
    p.add_argument("--num_classes", type=int, default=7)
    p.add_argument("--bits", type=int, default=defaults.WEIGHT_BITS)
    p.add_argument("--threads", default=",".join(str(t) for t in defaults.LATENCY_THREADS))
    p.add_argument("--runs", type=int, default=defaults.LATENCY_RUNS)
    p.add_argument("--warmup", type=int, default=defaults.LATENCY_WARMUP)
    p.add_argument("--save_dir", help="also write the .tflite files here")
    p.add_argument("--shared_inputs", choices=SHARED_INPUTS,
                   default=defaults.SHARED_INPUTS,
                   help="how a layer reads an input other layers read too (fqat_tf."
                        "quantize_model); ignored for a run directory, which has its own")
    p.add_argument("--requantization_cost", action="store_true",
                   help="also time the int8 model with its requantizing MULs cut out (wrong "
                        "values, timing only): what they cost against the converter's model")
    args = p.parse_args(argv)
    contents, name = build_models(args)
    if args.save_dir:
        from fqat_tf import rundir

        for key, content in contents.items():
            rundir.atomic_write(os.path.join(args.save_dir, key.replace(" ", "_") + ".tflite"),
                                content, mode="wb")
    names = list(contents)
    print(f"# {name}: median of {args.runs} single-image runs each, XNNPACK, models in turn")
    print(f"# machine: {machine()}")
    print("| threads | " + " | ".join(f"{n} ms" for n in names)
          + " | int8/float | int8/PTQ | int4/float | int4/PTQ |")
    print("|---" * (len(names) + 5) + "|")
    worst = {"int8/float": 0.0, "int8/PTQ": 0.0}
    for threads in (int(t) for t in args.threads.split(",")):
        ms = dict(zip(names, interleaved_latency_ms(list(contents.values()), threads,
                                                    args.runs, args.warmup)))
        ratios = (ms["int8"] / ms["float"], ms["int8"] / ms["converter PTQ int8"],
                  ms["int4 weights"] / ms["float"],
                  ms["int4 weights"] / ms["converter PTQ int8"])
        worst = {k: max(worst[k], r) for k, r in zip(worst, ratios)}
        print(f"| {threads} | " + " | ".join(f"{ms[n]:.2f}" for n in names) + " | "
              + " | ".join(f"{r:.3f}" for r in ratios) + " |")
        if NO_REQUANTIZATION in ms:
            print(f"{threads} thread(s): {NO_REQUANTIZATION} / PTQ "
                  f"{ms[NO_REQUANTIZATION] / ms['converter PTQ int8']:.3f}, int8 / "
                  f"{NO_REQUANTIZATION} {ms['int8'] / ms[NO_REQUANTIZATION]:.3f}")
    print("partitions: " + ", ".join(f"{n} {partitions(c)}" for n, c in contents.items()))
    size = {n: len(c) / len(contents["float"]) for n, c in contents.items()}
    print("size: " + ", ".join(f"{n} {len(c)} B ({size[n]:.3f}x)" for n, c in contents.items()))
    checks = {f"int8 <= {LATENCY_TARGET}x float": worst["int8/float"] <= LATENCY_TARGET,
              f"int8 <= {PTQ_TARGET}x PTQ": worst["int8/PTQ"] <= PTQ_TARGET,
              f"int8 size <= {SIZE_TARGET}x": size["int8"] <= SIZE_TARGET,
              f"int4 size <= {INT4_SIZE_TARGET}x": size["int4 weights"] <= INT4_SIZE_TARGET}
    print("targets: " + ", ".join(f"{k} {'met' if ok else 'NOT met'}"
                                  for k, ok in checks.items()))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
