"""The training program's progress line: the metrics' own values, plain when not a terminal.

Keras's metrics are already running means over the evaluation window, so the line shows each
value as it is (Keras's Progbar would average them once more). On a terminal the line is
rewritten in place; in a log file (not a TTY) one plain line is written every `every` steps
and at the end, without carriage returns or colours.
"""
import sys
import time


def format_value(name, value, num_scales=None):
    """One metric as the line shows it: `frozen` as k/n scales, others with 4 decimals."""
    if name == "frozen":
        return f"frozen {round(value * num_scales)}/{num_scales}" if num_scales else ""
    return f"{name} {value:.4f}"


class Progress:
    """Progress of one stage.

    Args:
        total: the stage's last step.
        verbose: 0 prints nothing.
        num_scales: scale variables of the model (for `frozen k/n`); None for float runs.
        every: steps between lines when the output is not a terminal.
        stream: where to write (default stdout).
    """

    def __init__(self, total, verbose=1, num_scales=None, every=100, stream=None):
        self.total, self.verbose, self.num_scales = total, verbose, num_scales
        self.every = max(int(every), 1)
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start, self._start_step = None, 0

    def update(self, step, logs):
        """Reports step `step` of `total` with the metrics `logs` (floats)."""
        if not self.verbose:
            return
        if self._start is None:
            self._start, self._start_step = time.time(), step - 1
        done = step >= self.total
        if not self.tty and not done and step % self.every:
            return
        rate = (time.time() - self._start) / max(step - self._start_step, 1)
        parts = [f"step {step}/{self.total}"] + [
            format_value(k, v, self.num_scales) for k, v in logs.items()] + [
            f"{rate:.2f} s/step"]
        line = "  ".join(p for p in parts if p)
        if self.tty:
            self.stream.write("\r" + line.ljust(getattr(self, "_width", 0)))
            self._width = len(line)
            if done:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text):
        """A line of its own (an evaluation, a warning), after the progress line."""
        if self.verbose:
            if self.tty and getattr(self, "_width", 0):
                self.stream.write("\n")
                self._width = 0
            self.stream.write(text + "\n")
            self.stream.flush()
