"""fqat_tf: flatness-oriented quantization-aware training (FQAT) for Keras 3 / TensorFlow."""
from fqat_tf.calibration import calibrate_scales
from fqat_tf.quantize import QuantizeWrapper, quantize_model, scale_variables
from fqat_tf.quantizers import EWGSQuantizer, LSQQuantizer

__version__ = "0.1.0"
