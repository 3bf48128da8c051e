"""What `bincount pipeline run` shows while kfp.local runs the pipeline: one line per step (name, status, seconds,
the step's one-line result) and the step's own output under its name. kfp.local's own logging (each step's
executor input as JSON, its output artifacts, separators) and its warnings go only to the run's log file, which
gets everything; `verbose` shows everything as well.

kfp.local writes it all to `sys.stdout`: its records as `HH:MM:SS.mmm - LEVEL - message`, then each step's own
output (stdout and stderr) with every line indented by four spaces. A step states its one-line result in a line
that starts with `stages.RESULT`. A progress bar arrives as one line per update; the console shows one every
`PROGRESS_EVERY` seconds, and the finished bar.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
import warnings
from collections.abc import Iterator
from typing import TextIO

from bincount.kfp.stages import RESULT

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} - [A-Z]+ - (.*)$")
STARTED = re.compile(r"^Executing task '(.+)'$")
FINISHED = re.compile(r"^Task '(.+)' finished with status (\w+)")
STEP_INDENT = "    "
EXECUTOR = "[KFP Executor "
EXECUTOR_INPUT = "Got executor_input:"
STEP_ERROR = "bincount: error:"               # the step's failure, which the command reports once at its end
BAR = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")          # tqdm's: `desc:  42%|████▏     | 25/60 [00:00<00:00, …]`
PROGRESS_EVERY = 10.0


class Console:
    """A text stream standing in for `sys.stdout`: everything to `log`, the steps' view to `out`."""

    def __init__(self, log: TextIO, out: TextIO, verbose: bool):
        self.log, self.out, self.verbose = log, out, verbose
        self.pending = ""
        self.step: str | None = None
        self.started = self.bar_shown = 0.0
        self.result = ""
        self.in_json = False

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            self.out.write(text)
            return len(text)
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self._line(ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.out.flush()

    def isatty(self) -> bool:
        return False

    def finish(self) -> None:
        """A step still running when the run stopped failed (kfp.local raises instead of reporting it)."""
        if self.step is not None and not self.verbose:
            self._step_done("failed")

    def _line(self, line: str) -> None:
        record = RECORD.match(line)
        if record:
            self._record(record.group(1))
        elif self.step is not None and line.startswith(STEP_INDENT):
            self._step_line(line[len(STEP_INDENT):])

    def _record(self, message: str) -> None:
        started, finished = STARTED.match(message), FINISHED.match(message)
        if started:
            self.step, self.result, self.in_json = started.group(1), "", False
            self.started = self.bar_shown = time.monotonic()
        elif finished and finished.group(1) == self.step:
            self._step_done("succeeded" if finished.group(2) == "SUCCESS" else "failed")

    def _step_line(self, line: str) -> None:
        if self.in_json:
            self.in_json = line != "}"
        elif line.startswith(EXECUTOR):
            self.in_json = line.endswith(EXECUTOR_INPUT)
        elif line.startswith(RESULT):
            self.result = line[len(RESULT):]
        elif line.strip() and not line.startswith(STEP_ERROR) and self._shown(line):
            self.out.write(f"  {self.step} | {line}\n")

    def _shown(self, line: str) -> bool:
        if not BAR.search(line) or "100%|" in line:
            return True
        if time.monotonic() - self.bar_shown < PROGRESS_EVERY:
            return False
        self.bar_shown = time.monotonic()
        return True

    def _step_done(self, status: str) -> None:
        self.out.write(f"{self.step:<12} {status:<9} {time.monotonic() - self.started:6.1f} s  {self.result}".rstrip()
                       + "\n")
        self.out.flush()
        self.step = None


@contextlib.contextmanager
def showing_steps(log: TextIO, verbose: bool) -> Iterator[Console]:
    """`sys.stdout` and Python's warnings go through a Console for the duration."""
    console, stderr = Console(log, sys.stdout, verbose), sys.stderr

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        log.write(text)
        if verbose:
            stderr.write(text)

    with warnings.catch_warnings(), contextlib.redirect_stdout(console):
        warnings.showwarning = show_warning
        try:
            yield console
        finally:
            console.finish()
