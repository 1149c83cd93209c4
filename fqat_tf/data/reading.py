"""Reading the examples of a source, and naming the file when a read fails during training.

Files are checked once before training (`folder`), but a file can be deleted or damaged while a
run goes on. TensorFlow's error for a file that no longer decodes does not name the file, so
every stream of files runs its reads under a guard: a failed read or decode drops its element
(`Dataset.ignore_errors`), the next element then arrives where the dropped one was expected, and
the guard raises an error that names the example expected there. `explain_input_error` turns
that error (or TensorFlow's own error for a missing file) into one `DataError` naming the file.
"""
import dataclasses
import os
import re
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from fqat_tf.data.registry import DataError

# The guard's message is `_OPEN[kind] + name + _CLOSE`, on one line of the error (a name with
# ">>" in it is read up to its last ">>").
_OPEN = {"file": "fqat_tf input: cannot read or decode file <<",
         "example": "fqat_tf input: cannot read or decode an example of <<"}
_CLOSE = ">>"
_GUARD_RE = re.compile(r"fqat_tf input: cannot read or decode (file|an example of) <<(.*)>>")
# TensorFlow's ReadFile error: "{{function_node ...}} [context: ]PATH; No such file or directory".
_READ_FILE_RE = re.compile(r"([^\n]*?); (?:No such file or directory|Permission denied)")
_FUNCTION_NODE_RE = re.compile(r"\{\{[^}]*\}\}\s*")


@dataclasses.dataclass(frozen=True)
class Reader:
    """How the examples of one source are read.

    Attributes:
        positional: examples are read by their index (files, arrays); False for TFDS, whose
            records come in file order (`records`).
        encoded: `fetch` gives encoded bytes (files, TFDS) rather than uint8 pixels (arrays).
        fetch: handle -> (payload, int64 label); the handle is an example index for positional
            sources and the `(encoded, label)` record for TFDS.
        describe: example index (TFDS: stream position) -> scalar string naming the example
            in errors: its file, or for TFDS, whose records have no file of their own, the
            domain; None where a read cannot fail (arrays).
        kind: what `describe` names: "file" or "example" (of a TFDS domain).
        records: TFDS only: () -> the `(encoded, label)` records in file order.
    """

    positional: bool
    encoded: bool
    fetch: Callable
    describe: Optional[Callable]
    kind: str
    records: Optional[Callable] = None


def _tfds_records(source):
    """(encoded image, label) of the members of a TFDS source, in file order."""
    from fqat_tf.data import tfds_builders  # Imports TFDS, which is slow; only here.

    last = int(source.indices.max())
    member = np.zeros(last + 1, bool)
    member[source.indices] = True
    member = tf.constant(member)
    ds = tfds_builders.open_tfds(source).take(last + 1).enumerate()
    return ds.filter(lambda i, record: member[i]).map(lambda i, record: record)


def reader(source) -> Reader:
    """The `Reader` of a `splits.Source`."""
    if source.tfds is not None:
        name, split, _ = source.tfds
        where = f"domain {source.domain!r} (TFDS {name}, split {split!r})"
        return Reader(positional=False, encoded=True, fetch=lambda record: record,
                      describe=lambda unused: tf.constant(where), kind="example",
                      records=lambda: _tfds_records(source))
    labels = tf.constant(source.labels[source.indices], tf.int64)
    if source.paths is not None:
        paths = tf.constant(source.paths[source.indices])
        return Reader(positional=True, encoded=True,
                      fetch=lambda i: (tf.io.read_file(paths[i]), labels[i]),
                      describe=lambda i: paths[i], kind="file")
    images = tf.constant(source.images[source.indices])
    return Reader(positional=True, encoded=False,
                  fetch=lambda i: (images[i], labels[i]), describe=None, kind="example")


@tf.autograph.experimental.do_not_convert
def drop_position(*element):
    """`(..., position)` -> the element without its position."""
    return element[:-1]


def guard(ds: tf.data.Dataset, expected: Callable, describe: Callable, kind: str,
          end: Optional[int] = None) -> tf.data.Dataset:
    """Names the example whose read failed.

    Args:
        ds: elements `(..., position)` whose map may fail; the position is dropped.
        expected: k -> the position the k-th element must have.
        describe: position -> scalar string naming that position's example (no newline).
        kind: "file" or "example", as `Reader.kind`.
        end: for a finite stream, the position after its last element, so that a failure of
            the last element is noticed too.

    Returns:
        `ds` without the positions, raising `tf.errors.InvalidArgumentError` with the
        guard's message at the first element whose read failed.
    """
    ds = ds.ignore_errors()
    if end is not None:
        sentinel = tf.nest.map_structure(lambda spec: tf.zeros(
            [d if d is not None else 0 for d in spec.shape], spec.dtype), ds.element_spec[:-1])
        ds = ds.concatenate(tf.data.Dataset.from_tensors(
            (*sentinel, tf.constant(end, tf.int64))))

    def check(k, element):
        *values, position = element
        want = expected(k)

        def fail():
            message = tf.strings.join([_OPEN[kind], describe(want), _CLOSE])
            with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
                return tf.identity(position)

        position = tf.cond(tf.equal(position, want), lambda: position, fail)
        if end is not None:
            return (*values, position)
        with tf.control_dependencies([position]):
            return tuple(tf.identity(v) for v in values)

    ds = ds.enumerate().map(check, num_parallel_calls=tf.data.AUTOTUNE)
    if end is None:
        return ds
    ds = ds.filter(lambda *element: element[-1] < end)
    return ds.map(drop_position)


def _path_in(text: str) -> str:
    """The path at the end of "context: context: PATH": the longest such tail that is an
    absolute or existing path (a path may hold ": " itself), else the last one."""
    pieces = text.split(": ")
    tails = [": ".join(pieces[i:]) for i in range(len(pieces))]
    return next((t for t in tails if os.path.isabs(t) or os.path.exists(t)), tails[-1])


def explain_input_error(error: tf.errors.OpError) -> Optional[DataError]:
    """The `DataError` naming the input file behind a TensorFlow error raised while reading.

    The trainer calls this on a `tf.errors.OpError` from a training or evaluation step; the
    error comes from the guard of a stream of files (a file deleted, truncated or damaged after
    the run started) or from TensorFlow's own file reading.

    Returns:
        A `DataError` that names the file (or the TFDS domain) and says what is wrong with it
        now, or None when the error names no input file (it is then not a data error, and the
        caller should let it propagate).
    """
    text = getattr(error, "message", None) or str(error)
    match = _GUARD_RE.search(text)
    if match is not None and match.group(1) != "file":
        return DataError(f"an example of {match.group(2)} could not be read or decoded during "
                         f"the run: its TFDS files changed or were damaged after it started")
    if match is not None:
        name = match.group(2)
    else:
        match = _READ_FILE_RE.search(_FUNCTION_NODE_RE.sub("", text))
        if match is None:
            return None
        name = _path_in(match.group(1))
    if not os.path.exists(name):
        return DataError(f"image file {name} no longer exists: it was deleted or moved after "
                         f"the run started")
    return DataError(f"image file {name} could not be read or decoded during the run: it was "
                     f"changed or damaged after the run started ({os.path.getsize(name)} bytes "
                     f"now); replace it, or remove it and start again")
