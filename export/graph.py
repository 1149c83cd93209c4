"""The export graph: a fake-quant Keras model rebuilt from TensorFlow ops the TFLite converter
turns into an all-int8 model (docs/algorithm.md §5).

Which 8-bit grid every tensor lives on is the model's `fqat_tf.storage.StoragePlan` (the same
plan `fqat_tf.storage.int8_storage_model` trains with); this module turns it into fake-quant
ops. "spec" tensors are clipped at the b-bit bounds and then fake-quantized at 8 bits with step
`s`, so the b-bit grid is a subset of the int8 grid (8-bit FakeQuant is all the converter
accepts on activations); "range" tensors get an 8-bit FakeQuant on the range the model trained
(int8 storage) or the representative data shows; "inherit" tensors carry their source's
fake-quant once more. Two FakeQuants in a row, or one tensor read under several scales, are
merged by the converter into one scale; so a tensor read by several different quantizers (a
residual block's input) gets a "range" fake-quant and each reader requantizes it onto its own
grid.

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
from export.emitter import Emitter, Layout
from fqat_tf import int8_storage
from fqat_tf import quantize_configs as qc
from fqat_tf.wrapper import QuantizeWrapper
from fqat_tf.storage import kinds
from fqat_tf.storage.plan import (INPUT_KEY, Fixed, Range, Spec, StoragePlan,
                                  UnsupportedLayerError)

MODES = ("observe", "int8", "float")
__all__ = ["ExportGraph", "INPUT_KEY", "MODES", "Spec", "UnsupportedLayerError", "Weights",
           "nested_range"]


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



class ExportGraph:
    """A Keras fake-quant model analysed for integer export: its `StoragePlan` (same
    arguments) and the weights, constants and stored ranges the exported graph needs."""

    def __init__(self, model, *, allow_float=False):
        self.plan = StoragePlan(model, allow_float=allow_float)
        self.model = self.plan.model
        self.input_shape = self.plan.input_shape
        self.float_layers = self.plan.float_layers
        self.rep = self.plan.rep
        self._fold_into = self.plan.folds
        # A layer reading its input as stored rounds its bias with that input's scale, which
        # moves with the range when BatchNorm trains: given the current one, the Keras model
        # rounds as the file does (`fqat_tf.storage.sync_input_scales`); the biases read
        # below are rounded with it.
        for name, scale in self.plan.stored_input_scales().items():
            self.model.get_layer(name).input_storage_scale.assign(scale)
        # Read once, eagerly: the weights and constants are constants of the exported graph.
        self._constants = {n.layer.name: emit.constants(n.layer, n.input_shapes)
                           for n in self.plan.nodes}
        self.weights = {n.layer.name: self._prepare_weights(n) for n in self.plan.nodes
                        if kinds.is_weighted(n.layer)}
        self.stored_ranges = self.plan.stored_ranges()
        for node in self.plan.nodes:
            spec = self.plan.spec_for(node.output) if self.rep[node.output] == "spec" else None
            if spec is not None:
                self._constants[node.layer.name]["output_clip"] = (spec.lo * spec.step,
                                                                   spec.hi * spec.step)

    @property
    def nodes(self):
        """`(layer, input keys, output key)` of every layer call, in topological order; the
        model input is `INPUT_KEY`, every other tensor is named by the layer that makes it."""
        return [(n.layer, list(n.inputs), n.output) for n in self.plan.nodes]

    @property
    def folds(self):
        """`{conv layer name: the BatchNormalization folded into it}`."""
        return dict(self._fold_into)

    @property
    def output_key(self):
        """The key of the model's output tensor."""
        return self.plan.output_key

    @property
    def requantized(self):
        """Quantized layers whose input tensor first had to be quantized on another grid."""
        return self.plan.requantized

    @property
    def moved_weights(self):
        """Kernel integers stored one step inward, by layer (only 8-bit grids can have any)."""
        return {name: w.moved for name, w in self.weights.items() if w.moved}

    def _prepare_weights(self, node):
        layer = node.layer
        inner = kinds.inner_layer(layer)
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
        view = keras.ops.convert_to_numpy(qc.kernel_ops(inner).kernel_view(kernel))
        return Weights(kernel, bias, int8_storage.abs_max_scales(view, per_channel=not dense),
                       depthwise, False)

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
        plan = self.plan
        aligned = dict(ranges)
        done = set()
        for node in plan.nodes:
            spec = plan.input_spec(node.layer)
            key = node.inputs[0]
            if spec is None or plan.applied(key) == spec:
                continue
            source = plan.inherit_source(key)
            if source in done or source not in ranges or source in self.stored_ranges:
                continue
            nested = nested_range(*ranges[source], spec.step)
            if nested is not None:
                aligned[source] = nested
                done.add(source)
        return aligned

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
        plan = self.plan
        em = Emitter(mode, ranges, self.stored_ranges)
        layout = (lambda key, spec, **kw: self.layout(key, spec, ranges, **kw)) if (
            mode == "int8") else (lambda key, spec, **kw: None)

        def on_grid(key, y):
            grid = plan.grid(key)
            rep = self.rep[key]
            if rep == "none":
                return y
            # An inherited grid is put on once more, explicitly: left to itself the converter
            # may give the output a reader's scale, which TFLite cannot run.
            source = plan.inherit_source(key)
            lay = layout(source, grid) if isinstance(grid, Spec) else None
            return em.grid(y, grid, lay, on_grid=rep == "inherit")

        values = {INPUT_KEY: on_grid(INPUT_KEY, x)}
        for node in plan.nodes:
            layer, key = node.layer, node.inputs[0]
            inputs = [values[k] for k in node.inputs]
            spec = plan.input_spec(layer)
            if spec is not None and plan.applied(key) != spec:
                inputs[0] = em.spec(inputs[0], spec, layout(key, spec, requantized=True),
                                    requantize=True)
            if plan.stores_input(layer) and not isinstance(layer, int8_storage.RangeQuantize):
                inputs[0] = em.stored_input(f"{layer.name}/input", inputs[0],
                                            self._carried(key, ranges))
            y = self._emit(node, inputs, em)
            values[node.output] = on_grid(node.output, y)
        out = values[plan.output_key]
        return (out, em.observed) if mode == "observe" else out

    def _carried(self, key, ranges):
        """The `(min, max)` of the 8-bit grid tensor `key` is on in "int8" mode, or None."""
        grid = self.plan.grid(key)
        if isinstance(grid, Range):
            return None if ranges is None else tuple(ranges[grid.name])
        if isinstance(grid, Fixed):
            return (grid.lo, grid.hi)
        if isinstance(grid, Spec) and ranges is not None:
            lay = self.layout(self.plan.inherit_source(key), grid, ranges)
            return (lay.lo8 * grid.step, lay.hi8 * grid.step)
        return None

    def _step(self, key, ranges):
        """The step of the 8-bit grid tensor `key` is rounded onto (0 where it is not)."""
        lo_hi = self._carried(key, ranges)
        return 0.0 if lo_hi is None else (lo_hi[1] - lo_hi[0]) / 255.0

    def layout(self, key, spec, ranges, requantized=False):
        """Where learned grid `spec` sits in the int8 tensor that stores tensor `key`.

        An 8-bit grid fills the int8 tensor. A narrower one sits at the top of it (the int8
        maximum is the b-bit maximum: saturation clips there) when the graph proves the values
        never fall below the b-bit minimum (`StoragePlan.bounds`: a ReLU output for an
        unsigned grid, a hard-swish output above `lo * step`), so one tensor clips it;
        otherwise at the bottom, the top clipped by a tensor before it (`Emitter.spec`: one
        more exact requantization). The bounds lose half a grid
        step to each rounding on the way (`requantized`: `key`'s own grid is another one, so
        its rounding counts too).
        """
        if spec.hi - spec.lo >= 255:
            return Layout(spec.lo, spec.hi, False)
        b = self.plan.bounds(key)
        if b is not None:
            rounded = [k for k in b.rounded if requantized or k != key]
            floor = b.lo - sum(self._step(k, ranges) for k in rounded) / 2 if b.lo else 0.0
            if floor >= spec.lo * spec.step:
                return Layout(spec.hi - 255, spec.hi, False)
        return Layout(spec.lo, spec.lo + 255, True)

    def _emit(self, node, inputs, em):
        layer = node.layer
        if isinstance(layer, keras.layers.BatchNormalization) and layer in self._fold_into.values():
            return inputs[0]
        if layer.name in self.weights:
            return emit.weighted(layer, inputs, em, self.weights[layer.name])
        fn = emit.emitter_for(layer)
        if fn is None or kinds.unsupported_reason(layer, node.input_shapes) is not None:
            return layer(*inputs, training=False)
        return fn(layer, inputs, em, self._constants[layer.name])
