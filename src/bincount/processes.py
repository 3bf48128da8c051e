"""Local child processes (torchrun trials, the ModelServer): how they are stopped."""

from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, so the child can drain or forward it to its workers; SIGKILL if it has not exited in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
