"""The one exception type a user sees as a single clear line, and the exit status every entry point returns."""

from __future__ import annotations

import sys
from collections.abc import Callable


# A command that ran to its end and found what it is there to catch (a promotion gate's refusal, drift) exits with
# this, not 1, so a script, a CronJob or a pipeline can tell a finding from a failure.
ALERT_EXIT = 2


class BincountError(Exception):
    """A failure the user can act on; its message is the whole story, no traceback needed."""


class ConfigError(BincountError):
    """Bad configuration or command-line input."""


def exit_status(command: Callable[[], int | None]) -> int:
    """Runs `command`: its own status (None is 0), 1 with a `BincountError` as one line on stderr (unless the error
    is `silent`: another process reports it), or 130 on Ctrl-C. The CLI and the trainer's entry both end here."""
    try:
        return command() or 0
    except BincountError as e:
        if not getattr(e, "silent", False):
            print(f"bincount: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bincount: interrupted", file=sys.stderr)
        return 130
