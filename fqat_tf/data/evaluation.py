"""Accuracy per domain and DomainBed's training-domain validation model selection.

`evaluate` reports the accuracy of every validation split (the hold-out of each training
domain: in-distribution) and of every test domain (out-of-distribution), and their unweighted
means over domains, as DomainBed's `IIDAccuracySelectionMethod` averages the per-environment
validation accuracies. `select_best` picks the checkpoint whose mean training-domain
validation accuracy is highest; test accuracy never takes part in the choice.
"""
import math
import weakref
from typing import Dict, List, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from fqat_tf.data.registry import DataError

_PARTS = ("val", "test")
# One traced prediction function per model, so evaluating every few hundred steps does not
# retrace the network each time.
_PREDICT_FNS = weakref.WeakKeyDictionary()


def _predict_fn(model):
    fn = _PREDICT_FNS.get(model)
    if fn is None:
        # A weak reference: a cached function holding the model would keep it alive forever.
        model_ref = weakref.ref(model)

        @tf.function(reduce_retracing=True)
        def fn(images):
            logits = model_ref()(images, training=False)
            return tf.argmax(logits, axis=-1, output_type=tf.int64)
        _PREDICT_FNS[model] = fn
    return fn


def _num_batches(ds: tf.data.Dataset):
    n = int(ds.cardinality())
    return n if n >= 0 else None


def evaluate(model, streams: Mapping[str, Mapping[str, tf.data.Dataset]], verbose: int = 1
             ) -> Dict[str, float]:
    """Accuracy of `model` on every evaluation stream.

    Args:
        model: any Keras model (or callable taking `training=`) mapping images to logits.
        streams: `{"val": {domain: ds}, "test": {domain: ds}}` as `eval_streams` returns; each
            dataset yields `(images, labels)` batches.
        verbose: 1 shows a `keras.utils.Progbar` over all batches; 0 is silent.

    Returns:
        `val/<domain>` and `test/<domain>` accuracies in [0, 1], and `val_avg` and `test_avg`,
        the unweighted means over domains (present when that part has domains).

    Raises:
        DataError: an unknown part name, or a stream with no examples.
    """
    unknown = sorted(set(streams) - set(_PARTS))
    if unknown:
        raise DataError(f"unknown evaluation part(s) {unknown}; expected {list(_PARTS)}")
    predict = _predict_fn(model)
    counts = [_num_batches(ds) for part in _PARTS for ds in streams.get(part, {}).values()]
    total = None if None in counts else sum(counts)
    progbar = keras.utils.Progbar(total, verbose=verbose, unit_name="batch") if verbose else None
    seen, results = 0, {}
    for part in _PARTS:
        for domain, ds in streams.get(part, {}).items():
            correct = examples = 0
            for batch in ds:
                images, labels = batch[0], batch[1]
                predictions = predict(images)
                correct += int(tf.reduce_sum(tf.cast(
                    tf.equal(predictions, tf.cast(labels, tf.int64)), tf.int64)))
                examples += int(tf.size(labels))
                seen += 1
                if progbar is not None:
                    progbar.update(seen)
            if examples == 0:
                raise DataError(f"evaluation stream {part}/{domain} has no examples")
            results[f"{part}/{domain}"] = correct / examples
        accuracies = [v for k, v in results.items() if k.startswith(part + "/")]
        if accuracies:
            results[f"{part}_avg"] = float(np.mean(accuracies))
    if progbar is not None and total is None:
        progbar.update(seen, finalize=True)
    return results


def select_best(records: Sequence[Mapping], key: str = "val_avg") -> Mapping:
    """Model selection by training-domain validation accuracy over saved checkpoints.

    Args:
        records: one evaluation record per checkpoint, each with a "step" and `key`.
        key: the validation accuracy to maximise ("val_avg" or a "val/<domain>" entry).
            Test-domain keys are refused: choosing by them would select on the test domain.

    Returns:
        The record with the highest `key`; among equals, the earliest step.

    Raises:
        DataError: no records, a test-domain key, or a record without "step" or `key`, or
            whose `key` is not a finite number.
    """
    if not key.startswith("val"):
        raise DataError(f"select_best key {key!r}: model selection uses training-domain "
                        f"validation accuracy only ('val_avg' or 'val/<domain>')")
    if not records:
        raise DataError("select_best: no evaluation records")
    checked: List[Mapping] = []
    for i, record in enumerate(records):
        if "step" not in record:
            raise DataError(f"evaluation record {i} has no 'step': {sorted(record)}")
        if key not in record:
            raise DataError(f"evaluation record at step {record['step']} has no {key!r}: "
                            f"{sorted(record)}")
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                or not math.isfinite(float(value)):
            raise DataError(f"evaluation record at step {record['step']}: {key}={value!r} is "
                            f"not a finite number")
        checked.append(record)
    ordered = sorted(checked, key=lambda r: r["step"])
    return max(ordered, key=lambda r: float(r[key]))
