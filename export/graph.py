"""The export graph: a fake-quant Keras model rebuilt from TensorFlow ops the TFLite converter
turns into an all-int8 model (ALGORITHM.md §5).

Every tensor of the rebuilt graph carries exactly one fake-quant op, decided once per tensor:

* "spec": every reader quantizes it with the same learned quantizer `s * round(clip(x/s, l, u))`.
  It is clipped at the b-bit bounds and then fake-quantized at 8 bits with step `s`, so the b-bit
  grid is a subset of the int8 grid (8-bit FakeQuant is all the converter accepts on
  activations). The quantizer is moved up through padding, max pooling and reshapes, which
  commute with it, so the model input of a network whose first conv quantizes its input is
  quantized exactly.
* "range": the Keras model keeps it float (a BatchNorm-ed residual branch, a sum, the pooled
  features, the logits, a GroupNorm intermediate), or readers disagree; 8-bit FakeQuant on the
  range the representative data shows. A learned quantizer reading it then requantizes it.
* "none": a conv or sum whose only reader is a ReLU (the converter fuses the two; the ReLU's
  output carries the quantization), or a conv whose BatchNorm is folded into it.
* "inherit": the output of padding, max pooling or a reshape carries its input's fake-quant
  again (TFLite runs these with one scale on both sides).

Two FakeQuants in a row, or one tensor read under several scales, are merged by the converter
into one scale; so a tensor read by several different quantizers (a residual block's input)
gets a "range" fake-quant and each reader requantizes it behind its own clip op.

Kernels: a learned b-bit kernel is folded with its BatchNorm into per-channel int8 scales that
hold the same integers (`export.fold`); float kernels (the first conv, the classifier) get
symmetric 8-bit scales from their largest value, per channel for convs and per tensor for
Dense, where the converter rejects per-axis FakeQuant.

Modes of the same graph: "observe" reproduces the Keras fake-quant model (learned quantizers
only) and records the range of every "range" tensor; "int8" adds every fake-quant op for
conversion; "float" has none (the float TFLite baseline).
"""
import dataclasses
from typing import Optional

import keras
import numpy as np

from export import fold, layers as emit
from export.emitter import Emitter
from fqat_tf import int8_storage
from fqat_tf.errors import UserError
from fqat_tf.quantize import QuantizeWrapper

MODES = ("observe", "int8", "float")
INPUT_KEY = "(input)"


class UnsupportedLayerError(UserError):
    """A layer the exporter cannot keep integer."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """A learned quantizer: `step * round(clip(x / step, lo, hi))`."""

    step: float
    lo: int
    hi: int


@dataclasses.dataclass
class Weights:
    """A conv or dense layer's export weights (float64 numpy, BatchNorm folded)."""

    kernel: np.ndarray
    bias: Optional[np.ndarray]
    scales: np.ndarray          # int8 scale per channel, or a scalar (per tensor)
    depthwise: bool
    learned: bool               # the integers are the learned b-bit grid
    as_conv: bool = False       # a Dense with per-channel scales, run as a 1x1 conv
    moved: int = 0              # integers outside [-127, 127], stored one step inward


@dataclasses.dataclass
class _Node:
    layer: keras.layers.Layer
    inputs: list
    output: str
    input_shapes: list


def _spec_of(quantizer, variables):
    lo, hi = quantizer.qrange
    return Spec(float(keras.ops.convert_to_numpy(variables["step"])), int(lo), int(hi))


def _input_spec(layer):
    """The learned quantizer of a layer's input, or None."""
    if isinstance(layer, QuantizeWrapper) and layer.quantize_config.input_quantizer:
        return _spec_of(layer.quantize_config.input_quantizer, layer.input_variables)
    return None


def nested_range(lo, hi, step):
    """An 8-bit range covering `[lo, hi]` whose step is `step / m`, `m` odd, or None.

    The largest odd `m` is taken (the finest grid), zero stays on the grid.
    """
    m = int(np.floor(255.0 * step / (hi - lo)))
    m -= 1 - m % 2
    while m >= 1:
        s0 = step / m
        new_lo = -np.ceil(-lo / s0 - 1e-9) * s0
        if new_lo + 255 * s0 >= hi:
            return float(new_lo), float(new_lo + 255 * s0)
        m -= 2
    return None


def _functional(model):
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential) or not isinstance(model, Functional):
        if not getattr(model, "inputs", None):
            raise ValueError("export needs a functional or Sequential model built on an Input")
        model = keras.Model(model.inputs, model.outputs)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"export needs one input and one output, model {model.name!r} has "
                         f"{len(model.inputs)} and {len(model.outputs)}")
    shape = tuple(model.inputs[0].shape)
    if None in shape[1:]:
        raise ValueError(f"export needs a fixed input shape apart from the batch, got {shape}")
    return model


class ExportGraph:
    """A Keras fake-quant model analysed for integer export.

    Args:
      model: a functional or Sequential Keras model, usually from `fqat_tf.quantize_model`.
      allow_float: leave layers that have no integer lowering float (named in `float_layers`)
        instead of raising `UnsupportedLayerError`.
    """

    def __init__(self, model, *, allow_float=False):
        self.model = _functional(model)
        self.input_shape = tuple(self.model.inputs[0].shape)
        self.float_layers = []
        self._nodes, self._input_key, self._output_key = self._topology()
        self._check_supported(allow_float)
        self._fold_into = self._find_folds()
        # Read once, eagerly: the steps are constants of the exported graph.
        self._input_specs = {n.layer.name: _input_spec(n.layer) for n in self._nodes}
        self._constants = {n.layer.name: emit.constants(n.layer) for n in self._nodes}
        self.weights = {n.layer.name: self._prepare_weights(n) for n in self._nodes
                        if type(emit.inner_layer(n.layer)) in emit.WEIGHTED_TYPES}
        self.stored_ranges = self._read_stored_ranges()
        self._uses = self._collect_uses()
        self.rep, self._applied = self._decide_representations()
        for node in self._nodes:
            spec = self._spec_for(node.output) if self.rep[node.output] == "spec" else None
            if spec is not None:
                self._constants[node.layer.name]["output_clip"] = (spec.lo * spec.step,
                                                                   spec.hi * spec.step)

    @property
    def nodes(self):
        """`(layer, input keys, output key)` of every layer call, in topological order; the
        model input is `INPUT_KEY`, every other tensor is named by the layer that makes it."""
        return [(n.layer, list(n.inputs), n.output) for n in self._nodes]

    @property
    def folds(self):
        """`{conv layer name: the BatchNormalization folded into it}`."""
        return dict(self._fold_into)

    @property
    def output_key(self):
        """The key of the model's output tensor."""
        return self._output_key

    # --- analysis --------------------------------------------------------------------------
    def _topology(self):
        model = self.model
        keys = {id(model.inputs[0]): INPUT_KEY}
        nodes = []
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                layer = node.operation
                if node.is_input or isinstance(layer, keras.layers.InputLayer):
                    continue
                if isinstance(layer, keras.Model):
                    raise UnsupportedLayerError(f"layer {layer.name!r} is a nested model; "
                                                f"export needs a flat functional model")
                if len(node.outputs) != 1 or any(n.layer is layer for n in nodes):
                    raise UnsupportedLayerError(f"layer {layer.name!r} is shared or has several "
                                                f"outputs; export needs one call per layer")
                ins = [keys[id(t)] for t in node.input_tensors]
                keys[id(node.outputs[0])] = layer.name
                nodes.append(_Node(layer, ins, layer.name,
                                   [tuple(t.shape) for t in node.input_tensors]))
        return nodes, INPUT_KEY, keys[id(model.outputs[0])]

    def _consumers(self, key):
        return [n for n in self._nodes if key in n.inputs]

    def _check_supported(self, allow_float):
        for node in self._nodes:
            layer = node.layer
            if isinstance(layer, keras.layers.BatchNormalization) and self._foldable(node):
                continue
            reason = emit.unsupported_reason(layer, node.input_shapes)
            if reason is None:
                continue
            if not allow_float:
                raise UnsupportedLayerError(
                    f"layer {layer.name!r} ({type(layer).__name__}) cannot be kept integer: "
                    f"{reason}; pass allow_float=True (--allow_float) to leave it float")
            self.float_layers.append(f"{layer.name} ({type(layer).__name__}: {reason})")

    def _producer(self, key):
        return next((n for n in self._nodes if n.output == key), None)

    def _foldable(self, bn_node):
        key = bn_node.inputs[0]
        prod = self._producer(key)
        return (prod is not None and type(emit.inner_layer(prod.layer)) in emit.CONV_TYPES
                and emit.activation_name(prod.layer) == "linear"
                and len(self._consumers(key)) == 1 and key != self._output_key)

    def _find_folds(self):
        return {self._producer(n.inputs[0]).layer.name: n.layer for n in self._nodes
                if isinstance(n.layer, keras.layers.BatchNormalization) and self._foldable(n)}

    def _prepare_weights(self, node):
        layer = node.layer
        inner = emit.inner_layer(layer)
        depthwise = isinstance(inner, keras.layers.DepthwiseConv2D)
        dense = isinstance(inner, keras.layers.Dense)
        kernel = keras.ops.convert_to_numpy(inner.kernel).astype(np.float64)
        wrapped = isinstance(layer, QuantizeWrapper)
        bias = (keras.ops.convert_to_numpy(layer.quantized_bias() if wrapped else inner.bias)
                if inner.use_bias else None)
        channels = fold.num_channels(kernel.shape, depthwise)
        f, offset = np.ones(channels), np.zeros(channels)
        bn = self._fold_into.get(layer.name)
        if bn is None and isinstance(layer, QuantizeWrapper):
            bn = layer.batchnorm            # folded in the Keras model already (int8 storage)
        if bn is not None:
            f, offset = fold.batchnorm_affine(bn, len(node.input_shapes[0]))
        wq = layer.quantize_config.weight_quantizer if wrapped else None
        stored = wrapped and wq is None and layer.int8_storage
        if wq is not None or stored:
            # A learned grid, or a float kernel trained on its int8 grid (`int8_storage`):
            # either way the integers are kept.
            step = keras.ops.convert_to_numpy(layer.kernel_scales())
            if depthwise and np.ndim(step):
                step = step.reshape(kernel.shape[2:])
            num_bits = 8 if stored else wq.num_bits
            ints = fold.grid_integers(keras.ops.convert_to_numpy(layer.quantized_kernel()),
                                      step, num_bits)
            kernel, scales, moved = fold.folded_grid_kernel(ints, step, f, depthwise)
            if isinstance(layer, QuantizeWrapper) and layer.batchnorm is not None:
                # The bias the Keras model adds (on its integer grid with int8 storage).
                bias = keras.ops.convert_to_numpy(layer.folded_bias()).astype(np.float64)
            else:
                bias = (np.zeros(channels) if bias is None else bias) * f + offset
            per_tensor = np.allclose(scales, scales[0], rtol=1e-7, atol=0.0)
            if dense and per_tensor:
                scales = np.float64(scales[0])
            return Weights(kernel, bias, scales, depthwise, True,
                           as_conv=dense and not per_tensor, moved=moved)
        if bn is not None:
            kernel, bias = fold.fold_batchnorm(kernel, bias, f, offset, depthwise)
        return Weights(kernel, bias, fold.max_abs_scales(kernel, depthwise, per_channel=not dense),
                       depthwise, False)

    def _collect_uses(self):
        """For each tensor, how each reader uses it: a `Spec`, or None for a float read."""
        uses = {INPUT_KEY: []}
        for node in self._nodes:
            uses.setdefault(node.output, [])
            spec = self._input_spec(node.layer)
            for i, key in enumerate(node.inputs):
                uses[key].append(spec if i == 0 else None)
        uses[self._output_key].append(None)
        return uses

    def _fusable_producer(self, key):
        producer = self._producer(key)
        if producer is None:
            return False
        layer = producer.layer
        return (type(emit.inner_layer(layer)) in emit.WEIGHTED_TYPES
                or isinstance(layer, keras.layers.Add)
                or producer.inputs[0] in self._fold_into)

    def _decide_representations(self):
        """Picks each tensor's fake-quant (module docstring) and which spec it already has."""
        rep = {}
        for node in reversed(self._nodes):
            if isinstance(node.layer, emit.PASSTHROUGH_TYPES):
                # TFLite runs these with one scale on both sides: the output keeps the input's
                # quantization, and the input's only reader hands its uses up to it.
                rep[node.output] = "inherit"
                if len(self._uses[node.inputs[0]]) == 1:
                    self._uses[node.inputs[0]] = list(self._uses[node.output])
        for key in [INPUT_KEY] + [n.output for n in self._nodes]:
            if key in rep:
                continue
            uses = self._uses[key]
            readers = self._consumers(key)
            producer = self._producer(key)
            if producer is not None and isinstance(producer.layer, int8_storage.RangeQuantize):
                rep[key] = "range"      # on the range it trained (`stored_ranges`)
            elif (readers and key != self._output_key
                  and all(isinstance(r.layer, int8_storage.RangeQuantize) for r in readers)):
                rep[key] = "none"       # stored by its reader
            elif key in self._fold_into:
                rep[key] = "none"
            elif len(set(uses)) == 1 and uses[0] is not None:
                rep[key] = "spec"
            elif (key != self._output_key and len(readers) == 1
                  and emit.is_plain_relu(readers[0].layer) and self._fusable_producer(key)):
                rep[key] = "none"
            else:
                rep[key] = "range"
        applied = {INPUT_KEY: self._spec_for(INPUT_KEY) if rep[INPUT_KEY] == "spec" else None}
        for node in self._nodes:
            r = rep[node.output]
            applied[node.output] = (applied[node.inputs[0]] if r == "inherit" else
                                    self._spec_for(node.output) if r == "spec" else None)
        return rep, applied

    @property
    def requantized(self):
        """Quantized layers whose input tensor first had to be quantized on another grid."""
        return [n.layer.name for n in self._nodes
                if self._input_spec(n.layer) is not None
                and self._applied[n.inputs[0]] != self._input_spec(n.layer)]

    def _input_spec(self, layer):
        return self._input_specs[layer.name]

    def align_ranges(self, ranges):
        """Ranges whose grid nests in the grid of a learned quantizer that requantizes them.

        A tensor quantized with step `s0` and requantized to a learned step `s1 = m * s0`, `m`
        odd, rounds exactly as if quantized to `s1` directly: every boundary of the `s1` grid
        lies midway between two points of the `s0` grid, so the first rounding never crosses
        it. Each range tensor is aligned to its first requantizing reader whose step allows an
        odd `m` with the range still covered; others keep their range (and double rounding).

        Args:
          ranges: `{name: (min, max)}` from `export.tflite.observe_ranges`.

        Returns:
          A new dict.
        """
        aligned = dict(ranges)
        done = set()
        for node in self._nodes:
            spec = self._input_spec(node.layer)
            key = node.inputs[0]
            if spec is None or self._applied[key] == spec:
                continue
            source = self._inherit_source(key) if self.rep[key] == "inherit" else key
            if source in done or source not in ranges or source in self.stored_ranges:
                continue
            nested = nested_range(*ranges[source], spec.step)
            if nested is not None:
                aligned[source] = nested
                done.add(source)
        return aligned

    def _read_stored_ranges(self):
        """`{name: (min, max)}` of the range tensors the Keras model quantizes itself
        (`fqat_tf.int8_storage` layers), named as `export.tflite.observe_ranges` names them."""
        ranges = {}
        for node in self._nodes:
            layer = node.layer
            if not isinstance(layer, (int8_storage.RangeQuantize,
                                      int8_storage.Int8GroupNormalization)):
                continue
            stored = layer.stored_ranges
            if not stored:
                raise ValueError(f"layer {layer.name!r} ({type(layer).__name__}): its int8 "
                                 f"ranges were never set; call fqat_tf.calibrate_ranges(model, "
                                 f"batches) (or train in training mode) before exporting")
            if isinstance(layer, int8_storage.RangeQuantize):
                ranges[layer.name] = stored["output"]
            else:
                ranges.update({f"{layer.name}/{part}": r for part, r in stored.items()})
        return ranges

    @property
    def moved_weights(self):
        """Kernel integers stored one step inward, by layer (only 8-bit grids can have any)."""
        return {name: w.moved for name, w in self.weights.items() if w.moved}

    # --- building ---------------------------------------------------------------------------
    def build(self, x, mode, ranges=None):
        """Runs the graph on `x` (inside a `tf.function` for conversion).

        Args:
          x: input batch, float32.
          mode: "observe", "int8" or "float" (module docstring).
          ranges: `{name: (min, max)}` from `observe`; needed by "int8".

        Returns:
          The output; in "observe" mode `(output, {name: (batch min, batch max)})`.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        em = Emitter(mode, ranges, self.stored_ranges)
        values = {INPUT_KEY: em.materialize(INPUT_KEY, x, self.rep[INPUT_KEY],
                                            self._spec_for(INPUT_KEY))}
        for node in self._nodes:
            inputs = [values[k] for k in node.inputs]
            spec = self._input_spec(node.layer)
            if spec is not None and self._applied[node.inputs[0]] != spec:
                inputs[0] = em.spec(inputs[0], spec, requantize=True)
            y = self._emit(node, inputs, em)
            key, rep, out_spec = node.output, self.rep[node.output], self._spec_for(node.output)
            if rep == "inherit":
                # The input's fake-quant once more, explicitly: left to itself the converter
                # may give the output a reader's scale, which TFLite cannot run.
                key, out_spec = self._inherit_source(key), self._applied[node.output]
                rep = "range" if out_spec is None else "spec"
            values[node.output] = em.materialize(key, y, rep, out_spec,
                                                 on_grid=self.rep[node.output] == "inherit")
        out = values[self._output_key]
        return (out, em.observed) if mode == "observe" else out

    def _inherit_source(self, key):
        """The tensor a chain of passthrough layers starts from."""
        while self.rep[key] == "inherit":
            key = self._producer(key).inputs[0]
        return key

    def _spec_for(self, key):
        uses = self._uses[key]
        return uses[0] if uses and uses[0] is not None and len(set(uses)) == 1 else None

    def _emit(self, node, inputs, em):
        layer = node.layer
        if isinstance(layer, keras.layers.BatchNormalization) and layer in self._fold_into.values():
            return inputs[0]
        if layer.name in self.weights:
            return emit.weighted(layer, inputs, em, self.weights[layer.name])
        fn = emit.emitter_for(layer)
        if fn is None or emit.unsupported_reason(layer, node.input_shapes) is not None:
            return layer(*inputs, training=False)
        return fn(layer, inputs, em, self._constants[layer.name])
