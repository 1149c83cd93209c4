"""Checks an exported TFLite model against the Keras fake-quant model it came from.

    python -m export.verify model.tflite RUN_DIR

Runs the .tflite with `ai_edge_litert`'s interpreter (XNNPACK, as on a device) and the Keras
model on the run's test domain(s), and reports top-1 agreement, both accuracies and the largest
logit difference in steps of the int8 output. Fails (exit 1) when a tensor other than the
model's declared input and output is float, or when the agreement is below `--min_agreement`.
"""
import json
import os
import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from fqat_tf import cli, defaults, rundir, storage
from fqat_tf.wrapper import quantize_wrappers

_FLOAT_TYPES = (np.float16, np.float32, np.float64)


def _reference_interpreter(content):
    """An interpreter without delegates: the graph as written, for inspection."""
    return Interpreter(model_content=content,
                       experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)


def float_tensors(content):
    """Names of the float tensors of a flatbuffer other than its declared input and output."""
    it = _reference_interpreter(content)
    declared = {d["index"] for d in it.get_input_details() + it.get_output_details()}
    return [f"{t['name'] or '#' + str(t['index'])} ({np.dtype(t['dtype']).name})"
            for t in it.get_tensor_details()
            if t["index"] not in declared and t["dtype"] in _FLOAT_TYPES]


def output_step(content):
    """The scale of the int8 logits: the output's, or that of the tensor a float output
    is dequantized from."""
    it = _reference_interpreter(content)
    out = it.get_output_details()[0]
    if out["dtype"] == np.int8:
        return float(out["quantization"][0])
    details = {t["index"]: t for t in it.get_tensor_details()}
    for op in it._get_ops_details():
        if out["index"] in op["outputs"] and op["op_name"] == "DEQUANTIZE":
            return float(details[op["inputs"][0]]["quantization"][0])
    raise ValueError("the model output is neither int8 nor dequantized from int8")


class TFLiteModel:
    """A .tflite model callable on float image batches, returning float logits.

    Int8 inputs are quantized and int8 outputs dequantized with the tensors' own parameters.

    Args:
      content: the flatbuffer bytes.
      num_threads: interpreter threads (XNNPACK is applied by default).
    """

    def __init__(self, content, num_threads=None):
        self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = None

    def quantize_input(self, images):
        images = np.asarray(images, np.float32)
        if self.input["dtype"] != np.int8:
            return images
        scale, zero = self.input["quantization"]
        return np.clip(np.round(images / scale) + zero, -128, 127).astype(np.int8)

    def invoke(self, tensor):
        """Runs one prepared input (from `quantize_input`); returns the raw output tensor."""
        it = self.interpreter
        if self._batch != tensor.shape[0]:
            it.resize_tensor_input(self.input["index"], list(tensor.shape))
            it.allocate_tensors()
            self._batch = tensor.shape[0]
        it.set_tensor(self.input["index"], tensor)
        it.invoke()
        return it.get_tensor(self.output["index"])

    def __call__(self, images):
        raw = self.invoke(self.quantize_input(images)).astype(np.float32)
        if self.output["dtype"] == np.int8:
            scale, zero = self.output["quantization"]
            return (raw - zero) * scale
        return raw


def verify(tflite_path, model, dataset, *, max_batches=None):
    """Compares a .tflite model with a Keras model on labelled batches.

    Args:
      tflite_path: the .tflite file.
      model: the Keras fake-quant model (run with `training=False`). Layers that read their
        input as stored first get that input's current scale, as `export.tflite` gives them
        (`fqat_tf.storage.sync_input_scales`).
      dataset: iterable of `(images, labels)` batches.
      max_batches: stop after this many batches (None: all).

    Returns:
      dict: "images", "agreement" (top-1, TFLite vs Keras), "keras_accuracy",
      "tflite_accuracy", "max_logit_diff_steps" (in steps of the int8 logits),
      "output_step", "float_tensors" (names), "input_dtype", "output_dtype".

    Raises:
      ValueError: the dataset is empty.
    """
    with open(tflite_path, "rb") as f:
        content = f.read()
    if any(w.reads_stored_input for w in quantize_wrappers(model)):
        storage.sync_input_scales(model)
    runner = TFLiteModel(content)
    step = output_step(content)
    agree = keras_ok = tflite_ok = total = 0
    max_diff = 0.0
    for i, (images, labels) in enumerate(dataset):
        if max_batches is not None and i >= max_batches:
            break
        images, labels = np.asarray(images, np.float32), np.asarray(labels).reshape(-1)
        ref = np.asarray(model(images, training=False), np.float32)
        got = runner(images)
        agree += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
        keras_ok += int(np.sum(ref.argmax(-1) == labels))
        tflite_ok += int(np.sum(got.argmax(-1) == labels))
        max_diff = max(max_diff, float(np.abs(ref - got).max()) / step)
        total += len(labels)
    if not total:
        raise ValueError("verify: the dataset is empty")
    return {"images": total, "agreement": agree / total, "keras_accuracy": keras_ok / total,
            "tflite_accuracy": tflite_ok / total, "max_logit_diff_steps": max_diff,
            "output_step": step, "float_tensors": float_tensors(content),
            "input_dtype": np.dtype(runner.input["dtype"]).name,
            "output_dtype": np.dtype(runner.output["dtype"]).name}


def _parse(argv):
    p = cli.ArgumentParser(prog="python -m export.verify", description=__doc__.split("\n")[0])
    p.add_argument("tflite", help="the exported .tflite file")
    p.add_argument("run_dir", help="the run directory it was exported from")
    p.add_argument("--batch_size", type=int, default=defaults.EXPORT_VERIFY_BATCH)
    p.add_argument("--max_batches", type=int, default=None,
                   help="batches per test domain (default: every image)")
    p.add_argument("--min_agreement", type=float, default=defaults.EXPORT_MIN_AGREEMENT,
                   help="fail below this top-1 agreement (0 to only report)")
    return p.parse_args(argv)


def _run(args):
    from export import tflite as export_lib

    if not os.path.isfile(args.tflite):
        raise export_lib.ExportError(f"{args.tflite}: no such .tflite file")
    if not os.path.isdir(args.run_dir):
        raise export_lib.ExportError(f"{args.run_dir}: no such run directory")
    if args.batch_size < 1:
        raise export_lib.ExportError(f"--batch_size={args.batch_size}: must be >= 1")
    with open(args.tflite, "rb") as f:
        content = f.read()
    try:
        _reference_interpreter(content)
    except ValueError as e:          # checked before the Keras model and the data load
        raise export_lib.ExportError(f"{args.tflite}: cannot be read as a TFLite model "
                                     f"({e})") from None
    flags = export_lib.read_flags(args.run_dir)
    model = export_lib.load_model(os.path.join(args.run_dir, rundir.MODEL))
    from fqat_tf import data

    streams = data.eval_streams(export_lib.load_splits(flags), args.batch_size)["test"]
    if not streams:
        raise export_lib.ExportError(f"{args.run_dir}: the run has no test domain")
    try:
        report = {domain: verify(args.tflite, model, ds, max_batches=args.max_batches)
                  for domain, ds in streams.items()}
    except ValueError as e:          # an empty domain, a .tflite it cannot read
        raise export_lib.ExportError(str(e)) from None
    print(json.dumps(report, indent=2, sort_keys=True))
    failed = [f"{d}: float tensors {r['float_tensors']}" for d, r in report.items()
              if r["float_tensors"]]
    failed += [f"{d}: agreement {r['agreement']:.4f} < {args.min_agreement}"
               for d, r in report.items() if r["agreement"] < args.min_agreement]
    for line in failed:
        print(f"export.verify: FAIL {line}", file=sys.stderr)
    if any(r["agreement"] < args.min_agreement for r in report.values()):
        from fqat_tf import int8_storage

        if not int8_storage.storage_layers(model):
            print("export.verify: the model was trained without the integer model's 8-bit "
                  "storage; train it with --int8_storage for an export that matches it",
                  file=sys.stderr)
    return 1 if failed else 0


def main(argv=None):
    args = _parse(argv)
    return cli.run("export.verify", lambda: _run(args), args.verbosity)


if __name__ == "__main__":
    sys.exit(main())
