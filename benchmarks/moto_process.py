"""moto's S3 server in a process of its own for the shard benchmarks: it does not share their GIL, and its
access log (one line a request, on stderr) is kept to count the requests each path makes."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from bincount.processes import free_port

# werkzeug colours some status lines (206 partial content among them): the escape codes may precede the verb
GET_LINE = re.compile(rb'"(?:\x1b\[[0-9;]*m)*GET /')


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    """The server and its `host:port`, once it accepts connections."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto's server did not start within 30 s")


def count_gets(log: Path) -> int:
    return len(GET_LINE.findall(log.read_bytes()))
