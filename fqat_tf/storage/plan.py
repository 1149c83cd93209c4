"""The storage plan of a fake-quant Keras model: which 8-bit grid each tensor of its integer
model lives on (docs/algorithm.md §5).

Every tensor gets exactly one representation:

* "spec": its one reader quantizes it with a learned quantizer `s * round(clip(x/s, l, u))`;
  the integer model stores it on the int8 grid of step `s` (the b-bit grid is a subset of it).
  The quantizer is moved up through padding, max pooling and reshapes, which commute with it,
  so the model input of a network whose first conv quantizes its input is quantized exactly.
* "range": the Keras model keeps it float (a BatchNorm-ed residual branch, a sum, the pooled
  features, the logits, a GroupNorm intermediate), or readers disagree; it is stored on an 8-bit
  range of its own. A learned quantizer reading it then requantizes it.
* "fixed": the output of an activation whose int8 kernel fixes its grid (sigmoid, softmax,
  tanh, hard-sigmoid; `fqat_tf.activations`).
* "stored": an int8 storage layer put its output on its grid itself (an `Int8Activation`).
* "none": a conv, sum or affine whose only reader is a ReLU or ReLU6 (TFLite fuses the two; the
  activation's output carries the quantization), a conv whose BatchNorm is folded into it, or
  a tensor every reader of which stores it on a range of its own (`fqat_tf.RangeQuantize`,
  `fqat_tf.int8_activations` layers), or quantizes it with its own output (a concatenation).
* "inherit": the output of padding, max pooling or a reshape carries its input's grid again
  (TFLite runs these with one scale on both sides).

A tensor read by several quantizers (a residual block's input) gets a range and each reader
requantizes it, whatever their steps are now: they train apart. A BatchNormalization directly
after a linear convolution (its only reader) folds into it; any other is a per-channel affine.

`bounds` says what the graph proves about a tensor's values (from the activations that make
it); the exporter places a learned grid in its int8 tensor so that the bounds spare clip ops.
"""
import dataclasses
import math

import keras

from fqat_tf import int8_activations, int8_kernels, int8_storage, layer_types
from fqat_tf.errors import UserError
from fqat_tf.wrapper import QuantizeWrapper
from fqat_tf.storage import kinds

INPUT_KEY = "(input)"
INF = math.inf


class UnsupportedLayerError(UserError):
    """A layer the integer model cannot keep integer."""


OWN_RANGE = "own range"     # the use of a reader that keeps the tensor on a range of its own


@dataclasses.dataclass(frozen=True)
class Spec:
    """A learned quantizer: `step * round(clip(x / step, lo, hi))`."""

    step: float
    lo: int
    hi: int


@dataclasses.dataclass(frozen=True)
class Range:
    """An 8-bit range of its own, by name: a tensor key, or "layer/part" for a range a storage
    layer keeps (its input, its output, a GroupNorm intermediate)."""

    name: str


@dataclasses.dataclass(frozen=True)
class Fixed:
    """An 8-bit grid fixed by the kernel that makes the tensor: FakeQuant `[lo, hi]`."""

    lo: float
    hi: float


@dataclasses.dataclass(frozen=True)
class Bounds:
    """What the graph proves about a tensor's values in the integer model: `lo <= x <= hi`
    for the exact function, less half a step of the grid of each tensor in `rounded` (roundings
    between the bounded op and this tensor; none matter for a bound of 0, which every grid
    holds exactly)."""

    lo: float
    hi: float
    rounded: tuple = ()


@dataclasses.dataclass
class Node:
    """One layer call: the layer, the keys of its input tensors, its output key and the input
    shapes. The model input is `INPUT_KEY`, every other tensor is named by its layer."""

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


def functional(model):
    """`model` as a functional model with one fixed-shape input and one output."""
    model = layer_types.functional_view(model, "an integer model")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ValueError(f"an integer model needs one input and one output, model "
                         f"{model.name!r} has {len(model.inputs)} and {len(model.outputs)}")
    shape = tuple(model.inputs[0].shape)
    if None in shape[1:]:
        raise ValueError(f"an integer model needs a fixed input shape apart from the batch, "
                         f"got {shape}")
    return model


class StoragePlan:
    """A Keras fake-quant model analysed for integer storage.

    Args:
      model: a functional or Sequential Keras model, usually from `fqat_tf.quantize_model`.
      allow_float: leave layers that have no integer lowering float (named in `float_layers`)
        instead of raising `UnsupportedLayerError`.
    """

    def __init__(self, model, *, allow_float=False):
        self.model = functional(model)
        self.input_shape = tuple(self.model.inputs[0].shape)
        self.float_layers = []
        self._nodes, self._output_key = self._topology()
        self._by_output = {n.output: n for n in self._nodes}
        self._check_supported(allow_float)
        self._fold_into = self._find_folds()
        # Read once, eagerly: the steps are constants of the integer model.
        self._input_specs = {n.layer.name: _input_spec(n.layer) for n in self._nodes}
        self._uses = self._collect_uses()
        self.rep, self._applied = self._decide_representations()
        self._bounds = self._find_bounds()

    @property
    def nodes(self):
        """Every layer call (`Node`), in topological order."""
        return list(self._nodes)

    @property
    def folds(self):
        """`{conv layer name: the BatchNormalization folded into it}`."""
        return dict(self._fold_into)

    @property
    def output_key(self):
        """The key of the model's output tensor."""
        return self._output_key

    def producer(self, key):
        """The `Node` that makes tensor `key`, or None for the model input."""
        return self._by_output.get(key)

    def consumers(self, key):
        """The `Node`s that read tensor `key`."""
        return [n for n in self._nodes if key in n.inputs]

    def stores_input(self, layer):
        """`layer` keeps its input on an 8-bit range of its own (`kinds.stores_input`), named
        "<layer>/input" unless it is a `RangeQuantize` (its range is its output's)."""
        return kinds.stores_input(layer) and layer not in self._fold_into.values()

    def input_spec(self, layer):
        """The learned quantizer of `layer`'s input (a `Spec`), or None."""
        return self._input_specs[layer.name]

    def applied(self, key):
        """The learned quantizer tensor `key` is stored with, or None (range, none)."""
        return self._applied[key]

    def spec_for(self, key):
        """The learned quantizer of the one reader of `key`, or None."""
        uses = self._uses[key]
        return uses[0] if len(uses) == 1 and isinstance(uses[0], Spec) else None

    def grid(self, key):
        """The grid tensor `key` is stored on: a `Spec`, a `Range`, a `Fixed`, or None where
        it is not quantized itself ("none": a reader or a fused op carries it)."""
        key = self.inherit_source(key)
        rep = self.rep[key]
        if rep == "spec":
            return self.spec_for(key)
        if rep == "range":
            return Range(key)
        layer = self.producer(key).layer if rep in ("fixed", "stored") else None
        if rep == "stored" and kinds.owns_output_range(layer):
            return Range(f"{layer.name}/output")
        if rep in ("fixed", "stored"):
            return Fixed(*kinds.fixed_output_range(layer))
        return None

    def bounds(self, key):
        """The `Bounds` of tensor `key`, or None where the graph proves nothing."""
        return self._bounds.get(key)

    def inherit_source(self, key):
        """The tensor a chain of passthrough layers starts from."""
        while self.rep[key] == "inherit":
            key = self.producer(key).inputs[0]
        return key

    def stored_ranges(self):
        """`{name: (min, max)}` of the ranges the Keras model keeps itself (its
        `fqat_tf.int8_storage` layers), named as `grid` names them: a `RangeQuantize` by its
        layer, any other range "layer/part".

        Raises:
          ValueError: a storage layer's ranges were never set.
        """
        ranges = {}
        for node in self._nodes:
            layer = node.layer
            if not isinstance(layer, int8_storage.StorageLayerMixin):
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

    def stored_input_scales(self):
        """`{layer name: scale}` of the int8 grid each layer that reads its input as stored
        (`QuantizeWrapper.reads_stored_input`) reads it on, from the ranges the model keeps or
        the grid an activation's kernel fixes."""
        readers = [n for n in self._nodes
                   if isinstance(n.layer, QuantizeWrapper) and n.layer.reads_stored_input]
        if not readers:
            return {}
        ranges = self.stored_ranges()
        scales = {}
        for node in readers:
            grid = self.grid(node.inputs[0])
            if isinstance(grid, Range):
                lo, hi = ranges[grid.name]
            elif isinstance(grid, Fixed):
                lo, hi = grid.lo, grid.hi
            else:
                raise ValueError(f"layer {node.layer.name!r} reads its input as stored, but "
                                 f"tensor {node.inputs[0]!r} is stored on {grid!r}, not on an "
                                 f"8-bit range")
            scale, _ = int8_kernels.quantization_params(lo, hi)
            scales[node.layer.name] = float(keras.ops.convert_to_numpy(scale))
        return scales

    @property
    def requantized(self):
        """Quantized layers whose input tensor first had to be quantized on another grid."""
        return [n.layer.name for n in self._nodes
                if self.input_spec(n.layer) is not None
                and self._applied[n.inputs[0]] != self.input_spec(n.layer)]

    # --- analysis --------------------------------------------------------------------------
    def _topology(self):
        model = self.model
        keys = {id(model.inputs[0]): INPUT_KEY}
        nodes = []
        seen = set()
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                layer = node.operation
                if node.is_input or isinstance(layer, keras.layers.InputLayer):
                    continue
                if isinstance(layer, keras.Model):
                    raise UnsupportedLayerError(
                        f"layer {layer.name!r} is a nested model; an integer model needs a flat "
                        f"functional model (fqat_tf.quantize_model flattens it)")
                if len(node.outputs) != 1 or id(layer) in seen:
                    raise UnsupportedLayerError(f"layer {layer.name!r} is shared or has several "
                                                f"outputs; an integer model needs one call per "
                                                f"layer")
                seen.add(id(layer))
                ins = [keys[id(t)] for t in node.input_tensors]
                keys[id(node.outputs[0])] = layer.name
                nodes.append(Node(layer, ins, layer.name,
                                  [tuple(t.shape) for t in node.input_tensors]))
        return nodes, keys[id(model.outputs[0])]

    def _check_supported(self, allow_float):
        for node in self._nodes:
            layer = node.layer
            if isinstance(layer, keras.layers.BatchNormalization) and self._foldable(node):
                continue
            reason = kinds.unsupported_reason(layer, node.input_shapes)
            if reason is None:
                continue
            if not allow_float:
                raise UnsupportedLayerError(
                    f"layer {layer.name!r} ({type(layer).__name__}) cannot be kept integer: "
                    f"{reason}; pass allow_float=True (--allow_float) to leave it float")
            self.float_layers.append(f"{layer.name} ({type(layer).__name__}: {reason})")

    def _foldable(self, bn_node):
        key = bn_node.inputs[0]
        prod = self.producer(key)
        return (prod is not None and kinds.is_conv(prod.layer)
                and layer_types.is_linear(kinds.inner_layer(prod.layer))
                and len(self.consumers(key)) == 1 and key != self._output_key)

    def _find_folds(self):
        return {self.producer(n.inputs[0]).layer.name: n.layer for n in self._nodes
                if isinstance(n.layer, keras.layers.BatchNormalization) and self._foldable(n)}

    def _collect_uses(self):
        """For each tensor, how each reader uses it: a `Spec`, `OWN_RANGE` (the reader keeps it
        on a range of its own, or a concatenation on its output's grid) or None (a float
        read)."""
        uses = {INPUT_KEY: []}
        for node in self._nodes:
            uses.setdefault(node.output, [])
            stored = (self.stores_input(node.layer)
                      or isinstance(node.layer, keras.layers.Concatenate))
            spec = self.input_spec(node.layer)
            for i, key in enumerate(node.inputs):
                uses[key].append(OWN_RANGE if stored else spec if i == 0 else None)
        uses[self._output_key].append(None)
        return uses

    def _fusable_producer(self, key):
        """`key` comes from an op TFLite can fuse a ReLU or ReLU6 into."""
        producer = self.producer(key)
        if producer is None:
            return False
        layer = producer.layer
        return (kinds.is_weighted(layer) or kinds.is_affine(layer)
                or isinstance(layer, keras.layers.Add) or producer.inputs[0] in self._fold_into)

    def _representation(self, key):
        uses = self._uses[key]
        readers = self.consumers(key)
        producer = self.producer(key)
        layer = None if producer is None else producer.layer
        if isinstance(layer, int8_storage.RangeQuantize):
            return "range"              # on the range it trained
        if isinstance(layer, int8_activations.Int8Activation) and (
                kinds.fixed_output_range(layer) or kinds.owns_output_range(layer)):
            return "stored"
        if layer is not None and kinds.fixed_output_range(layer):
            return "fixed"
        if key != self._output_key and uses and all(u == OWN_RANGE for u in uses):
            return "none"               # stored by its readers
        if key in self._fold_into:
            return "none"
        if len(uses) == 1 and isinstance(uses[0], Spec):
            # One reader: its steps train on their own, so two readers with equal steps today
            # are two grids tomorrow.
            return "spec"
        if (key != self._output_key and len(readers) == 1
                and kinds.is_fused_activation(readers[0].layer) and self._fusable_producer(key)):
            return "none"
        return "range"

    def _decide_representations(self):
        """Picks each tensor's representation (module docstring) and the spec it carries."""
        rep = {}
        for node in reversed(self._nodes):
            if isinstance(node.layer, layer_types.PASSTHROUGH_TYPES):
                # TFLite runs these with one scale on both sides: the output keeps the input's
                # quantization, and the input's only reader hands its uses up to it.
                rep[node.output] = "inherit"
                if len(self._uses[node.inputs[0]]) == 1:
                    self._uses[node.inputs[0]] = list(self._uses[node.output])
        for key in [INPUT_KEY] + [n.output for n in self._nodes]:
            if key not in rep:
                rep[key] = self._representation(key)
        applied = {INPUT_KEY: self.spec_for(INPUT_KEY) if rep[INPUT_KEY] == "spec" else None}
        for node in self._nodes:
            r = rep[node.output]
            applied[node.output] = (applied[node.inputs[0]] if r == "inherit" else
                                    self.spec_for(node.output) if r == "spec" else None)
        return rep, applied

    def _find_bounds(self):
        """Bounds from activations (`fqat_tf.activations`), carried through the layers that
        keep them: shape and pooling layers, concatenations, a product with a gate in [0, 1],
        and sums and products of non-negative tensors."""
        bounds = {}
        for node in self._nodes:
            layer = node.layer
            ins = [bounds.get(k) for k in node.inputs]
            b = None
            own = kinds.output_bounds(layer)
            if own is not None:
                lo, hi = own
                if lo > -INF or hi < INF:
                    b = Bounds(lo, hi, () if lo == 0.0 else (node.output,))
            elif isinstance(layer, layer_types.PASSTHROUGH_TYPES + (int8_storage.RangeQuantize,)):
                b = ins[0]
            elif isinstance(layer, kinds.POOLING_TYPES) and ins[0] is not None:
                b = Bounds(ins[0].lo, ins[0].hi, ins[0].rounded + (node.output,))
            elif all(i is not None and i.lo >= 0.0 for i in ins) and isinstance(
                    layer, (keras.layers.Add, keras.layers.Multiply)):
                b = Bounds(0.0, INF)
            elif isinstance(layer, keras.layers.Concatenate) and None not in ins:
                b = Bounds(min(i.lo for i in ins), max(i.hi for i in ins),
                           tuple(k for i in ins for k in i.rounded))
            elif isinstance(layer, keras.layers.Multiply) and None not in ins:
                gate, x = sorted(ins, key=lambda i: i.hi)
                if gate.lo >= 0.0 and gate.hi <= 1.0 and x.lo <= 0.0:
                    b = Bounds(x.lo, x.hi, x.rounded + (node.output,))
            bounds[node.output] = b
        return bounds
