"""Integer TFLite export of fqat_tf models (`python -m export.tflite`, `python -m export.verify`).

`export.graph` rebuilds a fake-quant Keras model from ops the TFLite converter keeps int8,
following the model's storage plan (`fqat_tf.storage.StoragePlan`: BatchNorm folded by
`export.fold`, layers lowered by `export.layers`, fake-quant ops placed by `export.emitter`);
`export.tflite` converts it; `export.int4` stores 4-bit kernels in 4 bits; `export.verify`
checks the result against the Keras model.
"""
