"""`int8_storage_model` moved to the library (`fqat_tf.storage`); kept here for its users."""
from fqat_tf.storage import int8_storage_model

__all__ = ["int8_storage_model"]
