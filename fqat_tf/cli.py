"""What every command-line program of the project does with errors, logging and exit codes.

    python -m fqat_tf.report RUNS --out table.md          # exit 0
    fqat_tf.report: error: RUNS: no such folder            # exit 1: bad input, named
    fqat_tf.report: error: --error=sem2: invalid choice    # exit 2: usage, then a hint
    fqat_tf.report: run with --help for usage

A user error (`fqat_tf.errors.UserError`, or an `OSError` naming a file) ends in one line on
stderr that names the file, flag or value, and exit status 1; a usage error in that line
followed by a hint, and status 2; an interrupt in status 130. No traceback is printed unless
`--verbosity=debug`, which also turns TensorFlow's and absl's own logging back on.
"""
import argparse
import logging
import os
import sys
import traceback

from absl import app

from fqat_tf.errors import UserError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
VERBOSITIES = ("debug", "info", "warning", "error")
# info: the project's own messages and every warning; TensorFlow's and absl's own INFO lines
# and native logs only with debug.
DEFAULT_VERBOSITY = "info"
# absl's own levels (its --verbosity flag takes integers).
ABSL_LEVELS = {"debug": 1, "info": 0, "warning": -1, "error": -2}
# TF_CPP_MIN_LOG_LEVEL: 0 everything, 1 no INFO, 2 no WARNING, 3 no ERROR. TensorFlow's C++
# errors that matter reach Python as exceptions; the ones it only logs at start-up (a failed
# cuInit on a machine without a GPU) are noise, so the default shows none.
_TF_CPP_LEVELS = {"debug": "0", "info": "3", "warning": "3", "error": "3"}


class UsageError(UserError, app.UsageError):
    """A command line that cannot be parsed or a flag value out of its range (exit 2)."""


def message(error):
    """The one-line text of an error: an OSError as 'FILE: reason', others as raised."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return str(error).strip() or type(error).__name__


def _verbosity_of(value):
    """The verbosity a `--verbosity` value names: a name, or absl's integer (above 1: debug).

    A value that is neither keeps the default here; the flag parser then refuses it.
    """
    if value in VERBOSITIES:
        return value
    try:
        level = int(value)
    except ValueError:
        return DEFAULT_VERBOSITY
    return next((k for k, v in ABSL_LEVELS.items() if v == level),
                "debug" if level > 1 else "error")


def quiet_native_logging(argv):
    """Sets TensorFlow's C++ log level from the `--verbosity` in `argv`, before TF loads.

    The package's `__init__` calls this when Python starts one of its programs (`python -m
    fqat_tf.<program>`), because TensorFlow reads the level once, when it is imported.
    A level already set in the environment is kept.
    """
    verbosity = DEFAULT_VERBOSITY
    for arg in argv:
        if arg.startswith("--verbosity="):
            value = arg.split("=", 1)[1]
            verbosity = _verbosity_of(value)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_LEVELS[verbosity])
    if verbosity == "debug" or "tensorflow" in sys.modules:
        return
    # TensorFlow's native libraries log a few INFO lines while they load, before any log level
    # applies (absl's pre-initialisation logging): the import runs with stderr closed. An import
    # error still raises, and its traceback prints once stderr is back.
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def configure_logging(verbosity=DEFAULT_VERBOSITY):
    """The project's messages at `verbosity`; TensorFlow's and absl's INFO only with debug."""
    level = getattr(logging, verbosity.upper())
    from absl import logging as absl_logging

    absl_logging.set_verbosity(ABSL_LEVELS[verbosity])
    noisy = level if verbosity == "debug" else max(level, logging.WARNING)
    for name in ("tensorflow", "absl", "keras"):
        logging.getLogger(name).setLevel(noisy)
    logging.getLogger("fqat_tf").setLevel(level)
    if verbosity != "debug":
        absl_logging.get_absl_handler().setFormatter(_PlainFormatter())


class _PlainFormatter(logging.Formatter):
    """Messages as a person reads them: INFO lines bare, others behind their level."""

    def format(self, record):
        text = record.getMessage()
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"


def verbosity_name(level):
    """absl's integer verbosity as one of VERBOSITIES (debug for 1 and above)."""
    level = int(level)
    if level >= 1:
        return "debug"
    return {0: "info", -1: "warning"}.get(level, "error")


def absl_argv(argv):
    """`argv` with `--verbosity=<name>` given as absl's integer, which is all absl accepts."""
    return [f"--verbosity={ABSL_LEVELS[a.split('=', 1)[1]]}"
            if a.startswith("--verbosity=") and a.split("=", 1)[1] in ABSL_LEVELS else a
            for a in argv]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: the error first, then a hint, exit 2; and a
    `--verbosity` option on every program."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--verbosity", choices=VERBOSITIES, default=DEFAULT_VERBOSITY,
                          help="debug also prints tracebacks and TensorFlow's own logging")

    def error(self, text):
        usage_error(self.prog, text)


def usage_error(prog, text):
    """Prints a usage error and its hint, and exits with status 2."""
    print(f"{prog}: error: {text}", file=sys.stderr)
    print(f"{prog}: run with --help for usage", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run(prog, body, verbosity=DEFAULT_VERBOSITY):
    """Calls `body()` and turns what it raises into the project's exit codes.

    Args:
        prog: the program's name as its messages show it ("fqat_tf.train").
        body: a zero-argument callable returning an exit code (None means 0).
        verbosity: "debug" re-raises unexpected errors with their traceback.

    Returns:
        The exit code.
    """
    try:
        code = body()
    except UsageError as e:
        usage_error(prog, message(e))
    except (UserError, OSError) as e:
        if verbosity == "debug":
            traceback.print_exc()
        print(f"{prog}: error: {message(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last line of defence of a command line
        if verbosity == "debug":
            raise
        print(f"{prog}: error: {type(e).__name__}: {message(e)} (an unexpected error; rerun "
              f"with --verbosity=debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK if code is None else code
