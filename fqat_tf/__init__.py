"""fqat_tf: flatness-oriented quantization-aware training (FQAT) for Keras 3 / TensorFlow.

    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    fqat_tf.calibrate_scales(qmodel, dataset, num_batches=8)
    model = fqat_tf.FQATModel(qmodel, method="fqat", rho=0.05, alpha=0.001)
    model.compile(optimizer=..., scale_optimizer=..., loss=..., metrics=[...])
    model.fit(dataset, callbacks=[fqat_tf.DisorderFreezeCallback(interval=300, threshold=0.3)])

For an integer TFLite model that matches the trained one, train the 8-bit storage too:
`qmodel = fqat_tf.storage.int8_storage_model(qmodel)`, then `calibrate_scales` and
`fqat_tf.calibrate_ranges(qmodel, dataset)` before training (`fqat_tf.int8_storage`).
"""
import sys

if sys.argv[:1] == ["-m"]:
    # Python is starting one of the package's programs (`python -m fqat_tf.<program>`; argv[0]
    # is "-m" while the module is located): TensorFlow's C++ log level must be set before the
    # imports below load TensorFlow.
    from fqat_tf import cli as _cli

    _cli.quiet_native_logging(sys.argv[1:])

from fqat_tf.calibration import calibrate_ranges, calibrate_scales
from fqat_tf.fqat_model import FQATModel
from fqat_tf.freeze import DisorderFreezeCallback, gradient_disorder
# Importing the package registers every serializable layer, so a saved model loads after
# `import fqat_tf` alone.
from fqat_tf.int8_activations import Int8Activation, Int8Affine
from fqat_tf.int8_storage import Int8GroupNormalization, RangeQuantize
from fqat_tf.methods import METHODS
from fqat_tf.quantize import quantize_model
from fqat_tf.quantizers import EWGSQuantizer, LSQQuantizer
from fqat_tf.sagm import sagm_gradients
from fqat_tf.summary import quantization_summary
from fqat_tf.wrapper import QuantizeWrapper, scale_variables

__version__ = "0.1.0"

__all__ = ["DisorderFreezeCallback", "EWGSQuantizer", "FQATModel", "Int8Activation", "Int8Affine",
           "Int8GroupNormalization", "LSQQuantizer", "METHODS", "QuantizeWrapper", "RangeQuantize",
           "calibrate_ranges", "calibrate_scales", "gradient_disorder", "quantization_summary",
           "quantize_model", "sagm_gradients", "scale_variables"]
