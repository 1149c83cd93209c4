"""The lower bound of a signed b-bit grid clipped by a fused activation instead of a MUL.

A learned signed grid `[lo, hi] * step` (`lo = -2^(b-1)`, `hi = 2^(b-1) - 1`) sits in its int8
tensor with its top at the tensor's top (saturation clips it there); its bottom needs a clip,
which `export.emitter` makes by saturation too: an exact MUL by one moves the tensor to a
layout whose int8 minimum is `lo` (XNNPACK has no int8 MINIMUM / MAXIMUM that stays in its
partition). That MUL costs as much as a residual ADD.

TFLite's fused activation RELU_N1_TO_1 clamps an op's output to the real values [-1, 1]. The
int8 tensor that holds grid value g as integer `zero_point + g` can claim the scale
`1 / 2^(b-1)` instead of `step`: the real value -1 is then g = lo, and the clamp is exactly the
grid's lower bound, while its upper bound (g = 2^(b-1)) lies past the int8 top. The integers
stay the same; only the scale the tensor claims changes, by `c = (1 / 2^(b-1)) / step`. Each
op around it takes that factor into a per-channel scale it is free to choose:
- the producer (a convolution, fully-connected layer, or the MUL by a constant that
  requantized the tensor) multiplies its kernel (or constant) scale by `c`, so its
  requantization multiplier `input scale * kernel scale / output scale` is unchanged;
- each reader (a convolution or fully-connected layer) divides its kernel scale by `c`; its
  bias scale, `input scale * kernel scale`, is unchanged.
No integer changes, and XNNPACK, which computes each multiplier in float32 as `input scale *
kernel scale / output scale`, gets every multiplier bit for bit: a reader's new kernel scale
is `float32(step * kernel scale) / 2^-(b-1)`, exact since the claimed scale is a power of two;
the producer's is searched for among the float32 values next to the ideal one, and where none
gives its multiplier exactly (products of a float32 scale can step over a value) the MUL stays.
So the XNNPACK outputs are those of the file with the MULs. LiteRT's built-in kernels compute
the multipliers in double from the same scales, which may differ in the last bits of their
31-bit fixed-point multipliers: a result can then differ on an exact rounding tie.
`fuse_lower_clips` removes every such MUL whose producer and readers are of those kinds. A
clip after a residual ADD stays: the ADD's inputs would have to claim the new scale too, along
the whole residual chain.
"""
import numpy as np

from export import flatbuffer

LINEAR_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# How many float32 steps around the nearest kernel scale `_matching_scale` tries.
_SEARCH_ULPS = 4


def _quantization(graph, index):
    """`(scales, zero_points)` of tensor `index` as float64 / int64 arrays, or None."""
    q = graph.tensors[index].quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    return np.asarray(q.scale, np.float64), np.asarray(q.zeroPoint, np.int64)


def _constant(model, graph, index):
    """The data of tensor `index` if it is a constant, else None."""
    data = model.buffers[graph.tensors[index].buffer].data
    return None if data is None else data


def _matching_scale(a, product):
    """A float32 `x` with `float32(a * x) == product`, searched within `_SEARCH_ULPS` float32
    steps of `product / a`, or None (products of `a` can step over `product`)."""
    a, product = np.float32(a), np.float32(product)
    lo = hi = np.float32(np.float64(product) / np.float64(a))
    candidates = [lo]
    for _ in range(_SEARCH_ULPS):
        lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))
        candidates += [lo, hi]
    return next((x for x in candidates if np.float32(a * x) == product), None)


def _per_tensor(graph, index):
    """`(scale, zero_point)` of a per-tensor quantized tensor, else None."""
    q = _quantization(graph, index)
    return None if q is None or len(q[0]) != 1 else (float(q[0][0]), int(q[1][0]))


class _Ops:
    """One subgraph's ops by kind, with who produces and who reads each tensor."""

    def __init__(self, model, graph):
        utils, _ = flatbuffer.modules()
        self.model, self.graph = model, graph
        self.names = [utils.opcode_to_name(model, op.opcodeIndex) for op in graph.operators]
        self.producer, self.readers = {}, {}
        for index, op in enumerate(graph.operators):
            for t in op.outputs:
                self.producer[t] = index
            for t in op.inputs:
                if t >= 0:
                    self.readers.setdefault(t, []).append(index)
        self.outputs = set(graph.outputs)

    def op(self, index):
        return self.graph.operators[index]

    def activation(self, index):
        return getattr(self.op(index).builtinOptions, "fusedActivationFunction", None)

    def constant_operand(self, index):
        """`(constant, other)` inputs of a two-input op whose one constant is a scalar read by
        it alone, else None."""
        inputs = list(self.op(index).inputs)
        consts = [t for t in inputs if _constant(self.model, self.graph, t) is not None]
        if len(inputs) != 2 or len(consts) != 1 or self.readers[consts[0]] != [index]:
            return None
        if int(np.prod(self.graph.tensors[consts[0]].shape)) != 1:
            return None
        return consts[0], next(t for t in inputs if t != consts[0])

    def linear_kernel(self, index):
        """The kernel tensor of a linear op read by it alone, else None."""
        if self.names[index] not in LINEAR_OPS:
            return None
        kernel = self.op(index).inputs[1]
        if self.readers.get(kernel) != [index] or _quantization(self.graph, kernel) is None:
            return None
        return kernel


def _lower_clip(ops, index):
    """`(x, y, lo)` if op `index` is a MUL by an exact one from the top layout `x` of a signed
    grid to its bottom layout `y` (same scale; `y`'s int8 minimum is the grid's `lo`), else
    None."""
    if ops.names[index] != "MUL" or ops.activation(index) != 0:
        return None
    operands = ops.constant_operand(index)
    if operands is None:
        return None
    one, x = operands
    y = ops.op(index).outputs[0]
    qk, qx, qy = (_per_tensor(ops.graph, t) for t in (one, x, y))
    if qk is None or qx is None or qy is None or qx[0] != qy[0] or qy[1] >= qx[1]:
        return None
    code = int(np.frombuffer(bytes(bytearray(_constant(ops.model, ops.graph, one))), np.int8)[0])
    lo, hi = -128 - qy[1], 127 - qx[1]
    if abs((code - qk[1]) * qk[0] - 1.0) > 1e-6 or lo >= 0 or (-lo) & (-lo - 1) or -lo < hi:
        return None
    return x, y, lo


def _set_scales(graph, index, scales):
    graph.tensors[index].quantization.scale = np.asarray(scales, np.float32)


def _scales(graph, index):
    return np.asarray(graph.tensors[index].quantization.scale, np.float32)


def _claim_producer(ops, producer, x, sigma):
    """Makes op `producer` write `x` with scale `sigma` and the same integers (module
    docstring); False, changing nothing, if it is not of a kind that can."""
    graph = ops.graph
    s = np.float32(_per_tensor(graph, x)[0])
    if ops.activation(producer) != 0:
        return False
    kernel = ops.linear_kernel(producer)
    if kernel is not None:
        source = ops.op(producer).inputs[0]
    else:
        operands = None if ops.names[producer] != "MUL" else ops.constant_operand(producer)
        if operands is None:
            return False
        kernel, source = operands
    if _per_tensor(graph, source) is None:
        return False
    a = np.float32(_per_tensor(graph, source)[0])
    # The multiplier XNNPACK computes, `float32(a * k) / s`, kept: `a * k'` must be
    # `multiplier * sigma` (sigma is a power of two, so the division by it is exact).
    targets = [np.float32(np.float32(a * k) / s) * np.float32(sigma)
               for k in _scales(graph, kernel)]
    new = [_matching_scale(a, t) for t in targets]
    if any(x is None for x in new):
        return False
    new = np.array(new, np.float32)
    _set_scales(graph, kernel, new)
    inputs = ops.op(producer).inputs
    if kernel == inputs[1] and len(inputs) > 2 and inputs[2] >= 0:
        _set_scales(graph, inputs[2], np.float32(a) * new)
    _set_scales(graph, x, [sigma])
    _, schema = flatbuffer.modules()
    ops.op(producer).builtinOptions.fusedActivationFunction = (
        schema.ActivationFunctionType.RELU_N1_TO_1)
    return True


def _claim_readers(ops, readers, s, sigma):
    """Divides each reader's kernel scales by `sigma / s`, keeping `input scale * kernel scale`
    as XNNPACK computes it in float32 (`sigma` is a power of two)."""
    for reader in readers:
        kernel = ops.op(reader).inputs[1]
        _set_scales(ops.graph, kernel, np.float32(s) * _scales(ops.graph, kernel)
                    / np.float32(sigma))


def _drop_unused_tensors(graph):
    """Removes the tensors no op, input or output of `graph` refers to, renumbering the rest."""
    used = set(graph.inputs) | set(graph.outputs)
    for op in graph.operators:
        used.update(t for t in list(op.inputs) + list(op.outputs) if t >= 0)
    new_index = {old: new for new, old in enumerate(sorted(used))}
    graph.tensors = [graph.tensors[old] for old in sorted(used)]
    renumber = lambda indices: np.array([new_index.get(t, t) for t in indices], np.int32)  # noqa: E731
    for op in graph.operators:
        op.inputs, op.outputs = renumber(op.inputs), renumber(op.outputs)
    graph.inputs, graph.outputs = renumber(graph.inputs), renumber(graph.outputs)


def fuse_lower_clips(model):
    """Replaces each lower-bound clip MUL of `model` (an object tree, `export.flatbuffer.read`)
    by a RELU_N1_TO_1 fused into the op before it, where that op and the MUL's readers can
    take the scale (module docstring). Changes `model` in place.

    Returns:
      The number of MULs removed.
    """
    removed = 0
    for graph in model.subgraphs:
        ops = _Ops(model, graph)
        dropped = set()
        for index in range(len(graph.operators)):
            clip = _lower_clip(ops, index)
            if clip is None:
                continue
            x, y, lo = clip
            producer, readers = ops.producer.get(x), ops.readers.get(y, [])
            if (producer is None or x in ops.outputs or y in ops.outputs
                    or ops.readers[x] != [index] or not readers
                    or any(ops.linear_kernel(r) is None or list(ops.op(r).inputs).count(y) != 1
                           or ops.op(r).inputs[0] != y for r in readers)):
                continue
            s, sigma = _per_tensor(graph, x)[0], np.float32(1.0 / -lo)
            if not _claim_producer(ops, producer, x, sigma):
                continue
            _claim_readers(ops, readers, s, sigma)
            for r in readers:
                ops.op(r).inputs[0] = x
            ops.readers[x] = readers
            dropped.add(index)
        graph.operators = [op for i, op in enumerate(graph.operators) if i not in dropped]
        _drop_unused_tensors(graph)
        removed += len(dropped)
    return removed
