"""`quantization_summary`: what a quantized model quantizes, one row per quantized layer.

    print(fqat_tf.quantization_summary(qmodel))

Columns: the layer, what is quantized ("weights", "input" or "weights+input"), the weight and
activation bit widths, the quantizer (its registry name, with the input grid's sign), and the
learned steps: a per-tensor step as its value, a per-channel one as min/median/max over its
channels. Layers a `QuantizeWrapper` leaves float (the classifier, layers `filters` leave out)
have no row.
"""
import keras
import numpy as np

from fqat_tf.wrapper import quantize_wrappers
from fqat_tf.quantizers import QUANTIZERS

COLUMNS = ("Layer", "Quantized", "W bits", "A bits", "Quantizer", "Weight step", "Input step")


def format_step(step):
    """A step variable as text: `0.0123` per tensor, `min/median/max` (and the channel count)
    per channel."""
    values = np.asarray(keras.ops.convert_to_numpy(step), np.float64)
    if values.ndim == 0:
        return f"{float(values):.4g}"
    lo, med, hi = np.min(values), np.median(values), np.max(values)
    return f"{lo:.4g}/{med:.4g}/{hi:.4g} ({values.size} ch)"


def _quantizer_name(quantizer):
    names = [name for name, cls in QUANTIZERS.items() if type(quantizer) is cls]
    return names[0] if names else type(quantizer).__name__


def _row(wrapper):
    cfg = wrapper.quantize_config
    wq, iq = cfg.weight_quantizer, cfg.input_quantizer
    parts = [p for p, q in (("weights", wq), ("input", iq)) if q is not None]
    kinds = sorted({_quantizer_name(q) for q in (wq, iq) if q is not None})
    quantizer = "/".join(kinds)
    if iq is not None:
        quantizer += f" ({'signed' if iq.signed else 'unsigned'} input)"
    return (wrapper.name, "+".join(parts),
            "-" if wq is None else str(wq.num_bits),
            "-" if iq is None else str(iq.num_bits),
            quantizer,
            "-" if wq is None else format_step(wrapper.weight_variables["step"]),
            "-" if iq is None else format_step(wrapper.input_variables["step"]))


def quantization_summary(qmodel, print_fn=None):
    """A table of what `qmodel` quantizes and with which steps.

    Args:
      qmodel: a model from `fqat_tf.quantize_model` (or any model holding `QuantizeWrapper`s).
      print_fn: optional callable given the table (e.g. `print` or `logging.info`), as Keras's
        `Model.summary(print_fn=...)`.

    Returns:
      The table as a string: a header line, a rule, one line per quantized layer in layer
      order, and a closing line counting the layers and scale variables.
    """
    wrappers = [w for w in quantize_wrappers(qmodel) if not w.quantize_config.is_float]
    rows = [COLUMNS] + [_row(w) for w in wrappers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    steps = sum(len(w.scale_variables) for w in wrappers)
    lines.append(f"{len(wrappers)} quantized layers, {steps} scale variables")
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text
