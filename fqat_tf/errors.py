"""The error a user can fix: bad input named by its file, flag or value.

Every module that checks user input raises a subclass of `UserError` (`fqat_tf.data.DataError`,
`fqat_tf.trainer.RunError`, `export.tflite.ExportError`, `fqat_tf.report.ReportError`, ...),
with a message that names the culprit. The command-line programs (`fqat_tf.cli`) print that
message alone and exit 1; anything else is a defect of the program and keeps its traceback
under `--verbosity=debug`.
"""


class UserError(ValueError):
    """Bad input: a missing or unreadable file, a bad flag value, a run that cannot be used.

    A `ValueError`, so callers that caught the project's earlier value errors keep working.
    """
