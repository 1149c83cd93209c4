"""`QuantizeWrapper`: a weighted layer run on its fake-quantized input and kernel.

The wrapper owns the quantizer variables and applies what its quantize config
(`fqat_tf.quantize_configs`) says: which quantizer the kernel and the input get, and how the
wrapped layer type shows its kernel and runs with the quantized one. It optionally simulates
the integer model's storage (`fqat_tf.int8_storage`) and a BatchNorm folded into it.
`fqat_tf.quantize.quantize_model` builds models of these wrappers.
"""
import keras

from fqat_tf import affine, int8_kernels, int8_storage, layer_types


@keras.saving.register_keras_serializable(package="fqat_tf")
class QuantizeWrapper(keras.layers.Wrapper):
    """Runs a weighted layer on fake-quantized input and kernel.

    The wrapper owns the quantizer variables; the inner layer keeps its own kernel and bias, so
    the float weights are the latent weights QAT trains. Everything that depends on the layer
    type comes from the quantize config (`QuantizeConfig.kernel_ops`), as in tfmot.

    Args:
      layer: the Keras layer to wrap (a type `fqat_tf.quantize_configs.KERNEL_OPS` knows).
      quantize_config: a `QuantizeConfig` naming the kernel and input quantizers.
      int8_storage: the weights as an integer model stores them (`fqat_tf.int8_storage`): a
        kernel the config leaves float on its symmetric int8 grid (per output channel; per
        tensor for Dense), an 8-bit learned kernel without its -128, and, where the input is
        quantized, the bias on the int32 grid of input step times kernel scale.
      batchnorm: a `keras.layers.BatchNormalization` applied to the (linear) output, as an
        integer model folds it into the kernel and bias: with inference statistics the output
        is `conv(x, W) * f + (b * f + beta - mean * f)`, and with `int8_storage` that offset
        sits on the int32 grid of input step times kernel scale times `|f|` (TFLite's folded
        bias). Training-mode statistics apply it as a plain BatchNorm.

    A layer with `int8_storage` whose kernel is learned and whose input is not
    (`WeightOnlyQuantizeConfig`) reads its input as the integer model stores it, on an 8-bit
    range another layer keeps; `input_storage_scale` holds that range's scale, which
    `fqat_tf.storage.sync_input_scales` sets, so that the bias sits on its int32 grid too.
    """

    def __init__(self, layer, quantize_config, int8_storage=False, batchnorm=None, **kwargs):
        ops = quantize_config.kernel_ops(layer)
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.quantize_config = quantize_config
        object.__setattr__(self, "_ops", ops)
        self.int8_storage = bool(int8_storage)
        if batchnorm is not None and not isinstance(batchnorm, keras.layers.BatchNormalization):
            raise ValueError(f"layer {layer.name!r}: batchnorm must be a BatchNormalization, "
                             f"got {type(batchnorm).__name__}")
        if batchnorm is not None and not layer_types.is_linear(layer):
            raise ValueError(f"layer {layer.name!r}: a BatchNormalization folds only into a "
                             f"linear layer")
        self.batchnorm = batchnorm

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        cfg = self.quantize_config
        # Plain attributes (not tracked collections): add_weight already tracks the variables.
        object.__setattr__(self, "_weight_vars", None if cfg.weight_quantizer is None else
                           cfg.weight_quantizer.build(self, self.kernel_view().shape, "kernel"))
        object.__setattr__(self, "_input_vars", None if cfg.input_quantizer is None else
                           cfg.input_quantizer.build(self, input_shape, "input"))
        if self.batchnorm is not None and not self.batchnorm.built:
            self.batchnorm.build(self.layer.compute_output_shape(input_shape))
        self._stored_scale = None
        if self.reads_stored_input:
            # 0 until synced: the bias stays float.
            self._stored_scale = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                                 autocast=False, name="input_storage_scale")
        self.built = True

    @property
    def reads_stored_input(self):
        """With `int8_storage`, the input has no learned quantizer but the kernel has: the
        layer reads the input on the 8-bit range the integer model stores it on."""
        cfg = self.quantize_config
        return (self.int8_storage and cfg.weight_quantizer is not None
                and cfg.input_quantizer is None)

    @property
    def input_storage_scale(self):
        """The variable holding the scale of the stored input's int8 grid (0 until set by
        `fqat_tf.storage.sync_input_scales`), or None where `reads_stored_input` is False."""
        return self._stored_scale

    @property
    def scale_variables(self):
        """The learnable steps of this layer: kernel step first, then input step."""
        return [v["step"] for v in (self._weight_vars, self._input_vars) if v is not None]

    @property
    def weight_variables(self):
        """Kernel quantizer variables by role (None if the kernel is float)."""
        return self._weight_vars

    @property
    def input_variables(self):
        """Input quantizer variables by role (None if the input is float)."""
        return self._input_vars

    def kernel_view(self):
        """The kernel as its quantizer sees it: one output channel per index of the last axis
        (`KernelOps.kernel_view`; a depthwise kernel `[kh, kw, in, multiplier]` is
        `[kh, kw, 1, in * multiplier]`), so a per-channel step has one value per channel."""
        return self._ops.kernel_view(self.layer.kernel)

    def quantized_kernel(self):
        """The kernel as the forward pass sees it (fake-quantized, or float)."""
        q = self.quantize_config.weight_quantizer
        kernel = self.layer.kernel
        if q is not None:
            kq = q(self.kernel_view(), self._weight_vars)
            if self.int8_storage and q.signed and q.num_bits == 8:
                # TFLite's int8 weights are symmetric: the 8-bit grid's -128 is stored as -127.
                step = keras.ops.convert_to_tensor(self._weight_vars["step"])
                kq = keras.ops.maximum(kq, -int8_storage.INT8_WEIGHT_MAX * step)
            return keras.ops.reshape(kq, kernel.shape)
        if self.int8_storage:
            kq = int8_storage.int8_kernel(self.kernel_view(), self._ops.int8_per_channel)
            return keras.ops.reshape(kq, kernel.shape)
        return kernel

    def kernel_scales(self):
        """Per output channel (`[channels]`) or scalar scale of the kernel's integers: the
        learned step, the int8 scale of an `int8_storage` float kernel, or None (float)."""
        if self.quantize_config.weight_quantizer is not None:
            step = self._weight_vars["step"]
        elif self.int8_storage:
            step = int8_storage.abs_max_scales(self.kernel_view(), self._ops.int8_per_channel)
        else:
            return None
        step = keras.ops.convert_to_tensor(step)
        if len(step.shape) == 0:
            return step
        return keras.ops.broadcast_to(step, [self.kernel_view().shape[-1]])

    def quantized_bias(self):
        """The bias as the forward pass sees it: on the int32 grid of input step times kernel
        scale with `int8_storage` and a quantized input and kernel (TFLite's bias), else float;
        None without a bias."""
        inner = self.layer
        if not inner.use_bias:
            return None
        scales = (self.kernel_scales() if self.int8_storage and self.batchnorm is None
                  else None)
        return self._bias_on_grid(inner.bias, scales)

    def _bias_on_grid(self, bias, scales, folded=None):
        """`bias` on TFLite's int32 grid of input scale times kernel `scales` (times the
        BatchNorm factors `folded`) where the input's scale is known (a learned step, or the
        synced scale of a stored input), else float. The grid is a `scale_product`, so that no
        graph rewrite of its order changes the result."""
        if scales is None:
            return bias
        if self.quantize_config.input_quantizer is not None:
            return int8_storage.on_grid(
                bias, int8_storage.scale_product(self._input_vars["step"], scales, folded))
        if self._stored_scale is None:
            return bias
        bias = keras.ops.cast(bias, "float32")
        scale = keras.ops.convert_to_tensor(self._stored_scale)
        weights = keras.ops.cast(int8_storage.scale_product(scales, folded), "float32")
        rounded = int8_kernels.bias_on_grid(bias, keras.ops.maximum(scale, 1e-30), weights)
        return keras.ops.where(scale > 0.0, rounded, bias)

    def call(self, inputs, training=None):
        q = self.quantize_config.input_quantizer
        x = inputs if q is None else q(inputs, self._input_vars)
        inner = self.layer
        if getattr(inner, "data_format", "channels_last") == "channels_first":
            raise ValueError(f"layer {inner.name!r}: channels_first is not supported")
        bn = self.batchnorm
        if bn is not None and training and bn.trainable:
            y = self._linear(x)
            if inner.use_bias:
                y = keras.ops.add(y, inner.bias)
            return bn(y, training=True)
        if bn is not None:
            f, bias = self._folded_batchnorm()
            y = self._linear(x, f)
            return keras.ops.add(y, keras.ops.cast(bias, y.dtype))
        y = self._linear(x)
        if inner.use_bias:
            y = keras.ops.add(y, self.quantized_bias())
        if inner.activation is not None:
            y = inner.activation(y)
        return y

    def _linear(self, x, factor=None):
        """The layer's linear op on its quantized input and kernel, times the per-channel
        `factor` (the folded BatchNorm's) where given.

        With `int8_storage`, where the input's grid is known (a learned step, or the synced
        scale of a stored input whose values lie on it), the op runs on the grids' integers and
        scales the result once, by one per-channel multiplier, as the integer model accumulates
        in int32 and requantizes: float32 holds every integer sum below 2^24 exactly, so the
        result no longer depends on the order in which a convolution algorithm adds its
        products. The multiplier is computed so that no graph rewrite changes it: a graph call
        (`predict()`) gives the eager call's bits (docs/algorithm.md §5). The integers pass
        gradients straight through, so the gradients are those of the float products up to
        rounding.
        """
        kernel = self.quantized_kernel()
        if self.int8_storage and self.quantize_config.input_quantizer is not None:
            return self._integer_linear(x, kernel, self._input_vars["step"], factor)
        if not self.int8_storage or self._stored_scale is None:
            return self._float_linear(x, kernel, factor)
        # A stored input's scale is a copy (`sync_input_scales`): used only while the input's
        # values are its integers, as they are once it is synced with the range it reads.
        scale = keras.ops.convert_to_tensor(self._stored_scale)
        ratio = keras.ops.cast(x, "float32") / keras.ops.maximum(scale, 1e-30)
        off_grid = keras.ops.max(keras.ops.abs(ratio - keras.ops.round(ratio)))
        return keras.ops.cond(
            keras.ops.logical_and(scale > 0.0, off_grid <= int8_storage.ON_GRID_TOLERANCE),
            lambda: self._integer_linear(x, kernel, scale, factor),
            lambda: self._float_linear(x, kernel, factor))

    def _float_linear(self, x, kernel, factor):
        y = self._ops.linear(self.layer, x, kernel)
        return y if factor is None else y * keras.ops.cast(factor, y.dtype)

    def _integer_linear(self, x, kernel, input_scale, factor):
        """`linear(x, kernel) * factor` computed as `linear(x / input_scale, kernel /
        kernel_scales)` on the rounded integers, times the one multiplier `input_scale *
        kernel_scales * factor`. The scales are constants here: a step's gradient comes
        through the quantized operands alone, as with the float products."""
        input_scale = keras.ops.stop_gradient(keras.ops.convert_to_tensor(input_scale, "float32"))
        scales = keras.ops.stop_gradient(
            keras.ops.convert_to_tensor(self.kernel_scales(), "float32"))
        x_int = _integers(keras.ops.cast(x, "float32"), input_scale)
        view = keras.ops.cast(self._ops.kernel_view(kernel), "float32")
        k_int = keras.ops.reshape(_integers(view, scales), kernel.shape)
        y = self._ops.linear(self.layer, keras.ops.cast(x_int, x.dtype),
                             keras.ops.cast(k_int, kernel.dtype))
        multiplier = int8_storage.scale_product(input_scale, scales, factor)
        return y * keras.ops.cast(multiplier, y.dtype)

    def folded_bias(self):
        """The bias after folding `batchnorm` (inference statistics): `b * f + offset`, on the
        int32 grid of input step times kernel scale times `|f|` with `int8_storage`."""
        return self._folded_batchnorm()[1]

    def _folded_batchnorm(self):
        """`(f, folded_bias())`, `f` the BatchNorm's float64 factors."""
        f, offset = affine.batchnorm_affine(self.batchnorm, "float64")
        if self.layer.use_bias:
            offset = offset + keras.ops.cast(self.layer.bias, "float64") * f
        scales = self.kernel_scales() if self.int8_storage else None
        bias = self._bias_on_grid(offset, scales, keras.ops.abs(f))
        return f, keras.ops.cast(bias, "float32")

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config["quantize_config"] = keras.saving.serialize_keras_object(self.quantize_config)
        config["int8_storage"] = self.int8_storage
        if self.batchnorm is not None:
            config["batchnorm"] = keras.saving.serialize_keras_object(self.batchnorm)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"),
                                                      custom_objects=custom_objects)
        quantize_config = keras.saving.deserialize_keras_object(config.pop("quantize_config"))
        if config.get("batchnorm") is not None:
            config["batchnorm"] = keras.saving.deserialize_keras_object(config["batchnorm"])
        return cls(layer, quantize_config, **config)



def _integers(values, scale):
    """`values / scale` rounded to the integers it lies on; the gradient passes straight
    through the rounding."""
    ratio = values / scale
    return ratio + keras.ops.stop_gradient(keras.ops.round(ratio) - ratio)


def quantize_wrappers(model):
    """Every `QuantizeWrapper` of `model` (nested models included), in layer order."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, QuantizeWrapper)]


def scale_variables(model):
    """The learnable quantizer steps of a quantized model, one per quantized tensor.

    The trainer treats these apart from every other trainable variable (the weights theta).
    """
    return [v for w in quantize_wrappers(model) for v in w.scale_variables]
