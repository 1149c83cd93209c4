"""What each activation is to the quantizers and to an integer model.

One table answers, per Keras activation: the interval its output lies in (the signedness
analysis of `quantize_model` and the clip analysis of the integer model read it), whether
TFLite fuses it into the op before it, and which int8 grid TFLite's kernel fixes for its output
(LOGISTIC and SOFTMAX: scale 1/256, zero point -128; TANH: 1/128, 0). Activations outside the
table have no int8 kernel here.
"""
import dataclasses
import math
from typing import Optional

import keras

INF = math.inf
# min of x * sigmoid(x), at x = -1.27846...; a hair lower, so the bound holds in float32.
SILU_MIN = -0.2785


@dataclasses.dataclass(frozen=True)
class Activation:
    """An activation as the integer model runs it.

    Attributes:
      name: Keras's name of the function ("relu", "hard_silu", ...).
      bounds: `(lo, hi)`, the interval every output lies in.
      fused: TFLite applies it inside the conv, add or depthwise op before it (RELU, RELU6).
      output_range: the `(min, max)` of the int8 grid TFLite's kernel fixes for the output,
        or None where the output has a grid of its own.
      own_output: the int8 kernel computes its output integers from the output scale itself
        (HARD_SWISH's fixed-point arithmetic), so int8 storage keeps an output range for it.
    """

    name: str
    bounds: tuple
    fused: bool = False
    output_range: Optional[tuple] = None
    own_output: bool = False


ACTIVATIONS = {a.name: a for a in (
    Activation("linear", (-INF, INF), fused=True),
    Activation("relu", (0.0, INF), fused=True),
    Activation("relu6", (0.0, 6.0), fused=True),
    Activation("sigmoid", (0.0, 1.0), output_range=(0.0, 255.0 / 256.0)),
    Activation("softmax", (0.0, 1.0), output_range=(0.0, 255.0 / 256.0)),
    Activation("tanh", (-1.0, 1.0), output_range=(-1.0, 127.0 / 128.0)),
    # relu6(x + 3) / 6 as one depthwise op whose int8 output on [0, 1] saturates where the
    # clip does.
    Activation("hard_sigmoid", (0.0, 1.0), output_range=(0.0, 1.0)),
    Activation("hard_silu", (-0.375, INF), own_output=True),
    Activation("silu", (SILU_MIN, INF)),
)}


def function_name(fn):
    """Keras's name of an activation function (aliases resolved: "swish" is "silu")."""
    if fn is None:
        return "linear"
    if isinstance(fn, str):
        fn = keras.activations.get(fn)
    return getattr(fn, "__name__", str(fn))


def of_layer(layer):
    """The name of the activation `layer` applies, or None if it is no activation layer.

    Activation layers give their function's name; a ReLU layer "relu" or "relu6" (None when
    leaky, thresholded or capped elsewhere); a conv or dense the activation fused into it.
    """
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold or 0.0) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    inner = getattr(layer, "layer", layer)         # a QuantizeWrapper's float layer
    if isinstance(layer, keras.layers.Activation) or hasattr(inner, "activation"):
        return function_name(getattr(inner, "activation", None))
    return None


def get(name):
    """The `Activation` of a name, or None for one with no int8 kernel here."""
    return ACTIVATIONS.get(name)


def bounds(layer):
    """`(lo, hi)` of the output of an activation layer, or None if `layer` is none or unknown.

    A ReLU capped at another value than 6 gives `(0, max_value)`.
    """
    if isinstance(layer, keras.layers.ReLU) and of_layer(layer) is None:
        if float(layer.negative_slope) == 0.0 and float(layer.threshold or 0.0) >= 0.0:
            return (0.0, INF if layer.max_value is None else float(layer.max_value))
        return None
    act = get(of_layer(layer))
    return None if act is None else act.bounds
