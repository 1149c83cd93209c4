"""What an integer model stores, decided once for training and export.

An int8 model (TFLite) keeps every tensor on an 8-bit grid. `plan.StoragePlan` analyses a
fake-quant Keras model and decides, per tensor, which grid that is (a learned quantizer's, a
range of its own, none because a fused reader carries it, ...), which BatchNorms fold into their
convolution and which kernels become int8. `rebuild.int8_storage_model` turns that plan into a
Keras model that trains with the storage simulated (`fqat_tf.int8_storage` holds its layers);
the exporter (`export/`) reads the same plan to emit the integer model, so the two cannot
disagree. `kinds` says what each Keras layer type is in an integer model.

    qmodel = fqat_tf.quantize_model(model, weight_bits=4, activation_bits=4)
    qmodel = fqat_tf.storage.int8_storage_model(qmodel)
"""
from fqat_tf.storage.plan import (INPUT_KEY, Bounds, Fixed, Range, Spec, StoragePlan,
                                  UnsupportedLayerError)
from fqat_tf.storage.rebuild import int8_storage_model, sync_input_scales

__all__ = ["INPUT_KEY", "Bounds", "Fixed", "Range", "Spec", "StoragePlan",
           "UnsupportedLayerError", "int8_storage_model", "sync_input_scales"]
