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

from fqat_tf.errors import UserError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
VERBOSITIES = ("debug", "info", "warning", "error")
DEFAULT_VERBOSITY = "warning"
# absl's own levels (its --verbosity flag takes integers).
ABSL_LEVELS = {"debug": 1, "info": 0, "warning": -1, "error": -2}
# TF_CPP_MIN_LOG_LEVEL: 0 everything, 1 no INFO, 2 no WARNING, 3 no ERROR.
_TF_CPP_LEVELS = {"debug": "0", "info": "1", "warning": "2", "error": "3"}


class UsageError(UserError):
    """A command line that cannot be parsed or a flag value out of its range (exit 2)."""


def message(error):
    """The one-line text of an error: an OSError as 'FILE: reason', others as raised."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return str(error).strip() or type(error).__name__


def configure_logging(verbosity=DEFAULT_VERBOSITY):
    """Quiets TensorFlow's C++ and Python logging and absl's below `verbosity`.

    The C++ level is read when TensorFlow loads, so call this before importing it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", _TF_CPP_LEVELS[verbosity])
    if verbosity != "debug":
        # XLA and the CUDA plugin log through absl's C++ logger before TF's own level applies.
        os.environ.setdefault("ABSL_MIN_LOG_LEVEL", _TF_CPP_LEVELS[verbosity])
    level = getattr(logging, verbosity.upper())
    from absl import logging as absl_logging

    absl_logging.set_verbosity(ABSL_LEVELS[verbosity])
    logging.getLogger("tensorflow").setLevel(level)
    logging.getLogger("fqat_tf").setLevel(level)


def verbosity_from_argv(argv):
    """The `--verbosity` value in `argv` (last one wins), or the default; names or absl ints."""
    value = DEFAULT_VERBOSITY
    for i, arg in enumerate(argv):
        if arg.startswith("--verbosity="):
            value = arg.split("=", 1)[1]
        elif arg in ("--verbosity", "-v") and i + 1 < len(argv):
            value = argv[i + 1]
    by_int = {str(v): k for k, v in ABSL_LEVELS.items()}
    return by_int.get(value, value if value in VERBOSITIES else DEFAULT_VERBOSITY)


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
