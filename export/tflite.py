"""Full-integer TFLite export of a trained fake-quant model.

    python -m export.tflite RUN_DIR --out model.tflite
    python -m export.tflite RUN_DIR --out model.tflite --weight_storage=int4
    python -m export.tflite model.keras --out model.tflite --dataset rotated_mnist_5k \
        --test_domains 0

The network is rebuilt by `export.graph` (BatchNorm folded, learned grids kept, 8-bit
fake-quant on every other tensor from ranges seen on a representative sample of the training
domains) and converted without a representative dataset: every scale is already in the graph.
A run directory supplies the sample through its flags.json; a bare .keras file needs the data
options, or `--random_representative` (random images: ranges that fit no real input).
`--weight_storage=int4` stores the learned kernels whose integers fit in 4 bits as INT4 where
XNNPACK runs them so (dense layers and 1x1 convs, `export.int4`); the others stay int8 and are
reported. The flatbuffer stores each distinct quantization vector once (`export.flatbuffer`).
Nothing is written unless the whole export succeeds, and the .tflite is written atomically.
"""
import dataclasses
import json
import os
import sys
import warnings

import numpy as np
import tensorflow as tf

from export import flatbuffer, int4, xnnpack
from export.graph import ExportGraph
from fqat_tf import cli, defaults, int8_storage, rundir
from fqat_tf.errors import UserError

WEIGHT_STORAGES = ("int8", "int4")

FLAG_KEYS = ("dataset", "data_dir", "test_domains", "seed", "holdout_fraction",
             "batch_per_domain")


class ExportError(UserError):
    """Bad input to the exporter (a path, a flag, a model it cannot convert)."""


@dataclasses.dataclass
class ExportResult:
    """A converted model and what the conversion had to approximate.

    Attributes:
      tflite: the flatbuffer.
      float_layers: layers left float (only with `allow_float`).
      requantized: quantized layers whose input was quantized on another grid first (a tensor
        read by several quantizers, or also read as float); exact where that grid nests in
        the layer's own (`ExportGraph.align_ranges`).
      moved_weights: per layer, 8-bit kernel integers of -128 stored as -127.
      ranges: `{tensor: (min, max)}` of the range-quantized tensors, as converted.
      trained_ranges: how many of them the model trained itself (int8 storage); the others
        come from the representative data.
      weight_storage: "int8", or "int4" with `int4` saying which kernels are.
      int4: the `export.int4.Int4Result` of an int4 export (without its flatbuffer), or None.
    """

    tflite: bytes
    float_layers: list
    requantized: list
    moved_weights: dict
    ranges: dict
    trained_ranges: int = 0
    weight_storage: str = "int8"
    int4: object = None

    def summary(self):
        """The result as a JSON-friendly dict, without the flatbuffer and the ranges."""
        out = {"bytes": len(self.tflite), "float_layers": self.float_layers,
               "requantized": self.requantized, "moved_weights": self.moved_weights,
               "range_tensors": len(self.ranges), "trained_ranges": self.trained_ranges,
               "weight_storage": self.weight_storage}
        if self.int4 is not None:
            out.update({"int4_kernels": self.int4.int4, "int8_kernels": self.int4.int8,
                        "int4_as_fully_connected": self.int4.as_fully_connected})
        return out


def _images(element):
    x = element[0] if isinstance(element, (tuple, list)) else element
    return np.asarray(x, np.float32)


def observe_ranges(graph, representative_data, max_batches=None):
    """Per-tensor `(min, max)` of the tensors the Keras model keeps float, over the sample.

    The extremes seen, widened to contain 0 (FakeQuant's grid holds zero exactly) and to a
    width of at least 1e-6. (A range shrunk to the least-squares clip of each tensor lost
    agreement on the GroupNorm networks: it clips the values the group statistics need.)
    """
    fn = tf.function(lambda x: graph.build(x, "observe")[1], reduce_retracing=True,
                     autograph=False)
    lows, highs = {}, {}
    count = 0
    for element in representative_data:
        if max_batches is not None and count >= max_batches:
            break
        for name, (lo, hi) in fn(tf.constant(_images(element))).items():
            lows[name] = min(lows.get(name, 0.0), float(lo))
            highs[name] = max(highs.get(name, 0.0), float(hi))
        count += 1
    if not count:
        raise ExportError("the representative data is empty")
    return {k: int8_storage.effective_range(lows[k], highs[k]) for k in lows}


def _to_tflite(graph, mode, ranges, int8_io):
    spec = tf.TensorSpec((None,) + graph.input_shape[1:], tf.float32, name="image")
    fn = tf.function(lambda x: graph.build(x, mode, ranges), input_signature=[spec],
                     autograph=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    if mode == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        io_type = tf.int8 if int8_io else tf.float32
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    with warnings.catch_warnings():
        # The input's scale comes from its FakeQuant; no separate statistics are needed.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


def export(model, representative_data, *, int8_io=True, allow_float=False,
           max_batches=defaults.EXPORT_REPRESENTATIVE_BATCHES,
           weight_storage=defaults.EXPORT_WEIGHT_STORAGE):
    """Converts a fake-quant Keras model to a full-integer TFLite model.

    Args:
      model: a Keras model from `fqat_tf.quantize_model` (or any model of supported layers).
      representative_data: iterable of image batches or `(images, labels)` batches from the
        training domains; sets the ranges of the tensors the Keras model keeps float.
      int8_io: int8 model input and output (True) or float ones with (de)quantize ops inside.
      allow_float: leave layers with no integer lowering float instead of raising.
      max_batches: batches taken from `representative_data` (None: all).
      weight_storage: "int8", or "int4" to store the kernels whose integers fit in 4 bits
        as INT4 where XNNPACK runs them so (`export.int4`; the others stay int8 and are
        reported).

    Returns:
      An `ExportResult`.

    Raises:
      export.graph.UnsupportedLayerError: a layer cannot be kept integer (and `allow_float`
        is False).
      ExportError: the representative data is empty, `weight_storage` is unknown, or a layer's
        requantization is one XNNPACK cannot run (`export.xnnpack`: a dead output tensor).
    """
    if weight_storage not in WEIGHT_STORAGES:
        raise ExportError(f"weight_storage={weight_storage!r}: choose from {WEIGHT_STORAGES}")
    graph = ExportGraph(model, allow_float=allow_float)
    ranges = graph.align_ranges(observe_ranges(graph, representative_data, max_batches))
    ranges.update(graph.stored_ranges)
    tflite = _to_tflite(graph, "int8", ranges, int8_io)
    _check_runnable(tflite)
    packed = None
    if weight_storage == "int4":
        # The rewrite writes the file with `export.flatbuffer.write` itself.
        packed = int4.pack_int4_weights(tflite)
        tflite = packed.tflite
        packed = dataclasses.replace(packed, tflite=b"")
    else:
        tflite = flatbuffer.compact(tflite)
    return ExportResult(tflite, list(graph.float_layers), graph.requantized,
                        graph.moved_weights, ranges, len(graph.stored_ranges), weight_storage,
                        packed)


def _check_runnable(content):
    problems = xnnpack.requantization_problems(content)
    if not problems:
        return
    p = problems[0]
    lo, hi = xnnpack.MULTIPLIER_RANGE
    raise ExportError(
        f"layer {p['layer']!r} ({p['op']}): requantization multiplier up to "
        f"{p['multiplier'][1]:.3g} (input scale x kernel scale / output scale), outside "
        f"[{lo:.3g}, {hi:g}) that XNNPACK (LiteRT's CPU runtime) can run; its output range "
        f"[{p['output_range'][0]:.3g}, {p['output_range'][1]:.3g}] is narrower than one "
        f"accumulator step, so the layer's output is (nearly) constant"
        f"{f' (and {len(problems) - 1} more layer(s))' if len(problems) > 1 else ''}. At 3-4 "
        f"bits this is the signal dying in the quantized network: fit the input steps on it "
        f"(fqat_tf.calibrate_scales(source='quantized'), --calibration_source=quantized) "
        f"or train longer")


def convert(model, representative_data, *, int8_io=True, allow_float=False,
            max_batches=defaults.EXPORT_REPRESENTATIVE_BATCHES):
    """`export(...)` returning only the flatbuffer bytes."""
    return export(model, representative_data, int8_io=int8_io, allow_float=allow_float,
                  max_batches=max_batches).tflite


def convert_float(model):
    """The float TFLite model of the same network (BatchNorm folded, no fake-quant ops)."""
    return _to_tflite(ExportGraph(model, allow_float=True), "float", None, False)


# --- run directories and the command line ----------------------------------------------------
def load_model(path):
    """Loads a fake-quant `.keras` model (safe mode), with a clear error if it cannot."""
    import keras

    import fqat_tf  # noqa: F401  (registers the quantization layers for deserialisation)

    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such model file")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ExportError(f"{path}: cannot load the Keras model ({e})") from None


def read_flags(run_dir):
    """The run's flags.json, checked to hold the keys the data needs."""
    path = os.path.join(run_dir, rundir.FLAGS_JSON)
    try:
        flags = rundir.read_json(path)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(str(e)) from None
    missing = [k for k in FLAG_KEYS if k not in flags]
    if missing:
        raise ExportError(f"{path}: missing key(s) {missing}")
    return flags


def load_splits(flags):
    """The run's leave-domains-out splits, from a flags dict (see `FLAG_KEYS`)."""
    from fqat_tf import data

    tests = flags["test_domains"]
    tests = [t for t in tests.split(",") if t] if isinstance(tests, str) else list(tests)
    try:
        return data.load_splits(flags["dataset"], data_dir=flags["data_dir"], test_domains=tests,
                                holdout_fraction=flags["holdout_fraction"], seed=flags["seed"],
                                image_size=flags.get("image_size"))
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(f"cannot load the run's data: {e}") from None


def representative_batches(flags, num_batches=defaults.EXPORT_REPRESENTATIVE_BATCHES):
    """Batches of the training stream of a run (every training domain, no augmentation)."""
    from fqat_tf import data

    splits = load_splits(flags)
    stream = data.train_stream(splits, int(flags["batch_per_domain"]), seed=int(flags["seed"]),
                               augment=False)
    return [x.numpy() for x, _ in stream.take(num_batches)]


PROG = "export.tflite"


def _parse(argv):
    p = cli.ArgumentParser(prog="python -m export.tflite", description=__doc__.split("\n")[0])
    p.add_argument("source", help="run directory (model.keras + flags.json) or a .keras file")
    p.add_argument("--out", required=True, help="the .tflite file to write")
    p.add_argument("--io", choices=("int8", "float"), default=defaults.EXPORT_IO,
                   help="type of the model's input and output tensors")
    p.add_argument("--representative_batches", type=int,
                   default=defaults.EXPORT_REPRESENTATIVE_BATCHES)
    p.add_argument("--allow_float", action="store_true",
                   help="leave layers with no integer lowering float (they are reported)")
    p.add_argument("--weight_storage", choices=WEIGHT_STORAGES,
                   default=defaults.EXPORT_WEIGHT_STORAGE,
                   help="int4: learned kernels whose integers fit in 4 bits as INT4 tensors, where "
                        "XNNPACK runs them (dense layers, 1x1 convs)")
    data = p.add_argument_group("data for a bare .keras file (a run directory has flags.json)")
    data.add_argument("--dataset")
    data.add_argument("--data_dir")
    data.add_argument("--test_domains", help="comma-separated test domains")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--holdout_fraction", type=float, default=defaults.HOLDOUT_FRACTION)
    data.add_argument("--batch_per_domain", type=int, default=defaults.BATCH_PER_DOMAIN)
    data.add_argument("--random_representative", action="store_true",
                      help="use random images for the ranges (no data; a poor model)")
    return p.parse_args(argv)


def _source(args):
    """(model path, flags or None), every path and flag checked before any work."""
    if args.representative_batches < 1:
        raise ExportError(f"--representative_batches={args.representative_batches}: must be >= 1")
    out = os.path.abspath(args.out)
    if os.path.isdir(out) or not os.path.isdir(os.path.dirname(out)):
        raise ExportError(f"--out={args.out}: not a file path in an existing folder")
    owner = rundir.owning_run(out)
    if owner is not None:
        raise ExportError(f"--out={args.out}: is one of the files of run directory {owner}; "
                          f"write the model beside them (e.g. {owner}/model.tflite)")
    if os.path.isdir(args.source):
        model_path = os.path.join(args.source, rundir.MODEL)
        if not os.path.isfile(model_path):
            raise ExportError(f"{args.source}: not a run directory (no {rundir.MODEL})")
        return model_path, read_flags(args.source)
    if not os.path.exists(args.source):
        raise ExportError(f"{args.source}: no such run directory or .keras file")
    if not args.source.endswith(".keras"):
        raise ExportError(f"{args.source}: expected a run directory or a .keras file")
    if args.dataset:
        return args.source, {"dataset": args.dataset, "data_dir": args.data_dir,
                             "test_domains": args.test_domains or "", "seed": args.seed,
                             "holdout_fraction": args.holdout_fraction,
                             "batch_per_domain": args.batch_per_domain}
    if not args.random_representative:
        raise ExportError(f"{args.source}: a .keras file needs --dataset (and --data_dir, "
                          f"--test_domains) for its representative data, or "
                          f"--random_representative")
    return args.source, None


def _run(args):
    model_path, flags = _source(args)
    model = load_model(model_path)
    if flags is None:
        print("WARNING: --random_representative: activation ranges come from random "
              "images, not from the training domains; the model will be inaccurate.",
              file=sys.stderr)
        rng = np.random.default_rng(0)
        shape = (defaults.BATCH_PER_DOMAIN,) + tuple(model.inputs[0].shape[1:])
        batches = [rng.normal(size=shape).astype(np.float32)
                   for _ in range(args.representative_batches)]
    else:
        batches = representative_batches(flags, args.representative_batches)
    try:
        result = export(model, batches, int8_io=args.io == "int8",
                        allow_float=args.allow_float, max_batches=None,
                        weight_storage=args.weight_storage)
    except ValueError as e:          # a model the exporter cannot take (not a defect)
        raise ExportError(str(e)) from None
    rundir.atomic_write(args.out, result.tflite, mode="wb")
    print(json.dumps({"out": args.out, **result.summary()}, indent=2, sort_keys=True))
    if result.float_layers:
        print("WARNING: layers left float: " + "; ".join(result.float_layers), file=sys.stderr)
    if result.ranges and not result.trained_ranges:
        print("NOTE: the model was trained without the int8 model's 8-bit storage, so the two "
              "differ where it stores a tensor the model kept float; train with --int8_storage "
              "(fqat_tf.storage) for an export that matches it", file=sys.stderr)
    return 0


def main(argv=None):
    args = _parse(argv)
    return cli.run(PROG, lambda: _run(args), args.verbosity)


if __name__ == "__main__":
    sys.exit(main())
