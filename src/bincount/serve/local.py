"""`bincount serve` in a child process, as the local backend deploys it: start, wait until ready, stop.

kserve's ModelServer owns its process (signal handlers, its event loop), so a caller that wants to keep
running starts it as a child. The config travels as a YAML file, so every setting reaches the child as is.
The child runs in its own session: a deployment outlives the command that made it (`bincount pipeline run`
ends with the model served). Its pid is kept in the workdir, and starting again in the same workdir replaces
the server found there, as a redeployed InferenceService replaces its predictor.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bincount import processes
from bincount.config import ServeConfig, to_dict
from bincount.errors import BincountError


@dataclass
class LocalServer:
    proc: subprocess.Popen
    port: int
    name: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def predict_url(self) -> str:
        return f"{self.url}/v1/models/{self.name}:predict"

    def stop(self, timeout_s: float = 30) -> None:
        """The server drains its requests on SIGTERM and exits."""
        processes.stop(self.proc, timeout_s)


def start(cfg: ServeConfig, workdir: Path, timeout_s: float = 180) -> LocalServer:
    """The server for `cfg` once its model answers ready; `cfg.port` 0 keeps the port of the server it replaces
    (a redeployed endpoint keeps its address), else picks a free one. `workdir` receives serve.yaml and serve.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    config, log, pid_file = workdir / "serve.yaml", workdir / "serve.log", workdir / "serve.pid"
    _stop_previous(pid_file, config, timeout_s=30)
    if cfg.port == 0:
        cfg = dataclasses.replace(cfg, port=_previous_port(config) or processes.free_port())
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bincount.cli", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    pid_file.write_text(f"{proc.pid}\n")
    server = LocalServer(proc, cfg.port, cfg.name, log)
    deadline = time.monotonic() + timeout_s
    while not _ready(server):
        if proc.poll() is not None:
            raise BincountError(f"bincount serve exited with status {proc.returncode}: {_last_line(log)}")
        if time.monotonic() > deadline:
            server.stop()
            raise BincountError(f"bincount serve was not ready after {timeout_s:g} s; see {log}")
        time.sleep(0.2)
    return server


def _stop_previous(pid_file: Path, config: Path, timeout_s: float) -> None:
    """Stop the server an earlier `start` left in this workdir, if that pid still runs it (pids are reused:
    only a process whose command line names this workdir's serve.yaml is ours)."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if os.fsencode(str(config)) not in cmdline:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(pid):
        os.kill(pid, signal.SIGKILL)


def _previous_port(config: Path) -> int | None:
    """The port the workdir's last server listened on, if nothing listens there now."""
    try:
        port = int(yaml.safe_load(config.read_text())["port"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None
    return port if processes.port_is_free(port) else None


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _ready(server: LocalServer) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
    try:
        conn.request("GET", f"/v2/models/{server.name}/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else f"no output (see {log})"
