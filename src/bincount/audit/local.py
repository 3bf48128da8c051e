"""A planned audit's workers on this machine: `workers` processes (one runs in this process) auditing every
`workers`-th shard each. Several processes split the CPU's cores between them."""

from __future__ import annotations

import os
import subprocess
import sys

from bincount.audit.worker import run_worker
from bincount.config import AuditConfig
from bincount.errors import BincountError


def worker_argv(cfg: AuditConfig, name: str, index: int | None, count: int) -> list[str]:
    """`bincount audit worker` for one worker; with index None the worker reads JOB_COMPLETION_INDEX (a pod of an
    indexed Job)."""
    argv = ["audit", "worker", "--store", cfg.store, "--name", name, "--count", str(count),
            "--batch-size", str(cfg.batch_size), "--threads", str(cfg.threads), "--device", cfg.device]
    return argv + ([] if index is None else ["--index", str(index)])


def run_workers(cfg: AuditConfig, name: str) -> None:
    if cfg.workers == 1:
        run_worker(cfg, name)
        return
    # The cores to share: OMP_NUM_THREADS where set (a pod's CPU limit), else this machine's.
    cores = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // cfg.workers)))
    # Their progress bars and errors go to this process's stderr as they happen.
    procs = [subprocess.Popen([sys.executable, "-m", "bincount.cli", *worker_argv(cfg, name, i, cfg.workers)],
                              env=env, stdin=subprocess.DEVNULL) for i in range(cfg.workers)]
    failed = [f"worker {i} (exit status {code})" for i, code in enumerate(p.wait() for p in procs) if code]
    if failed:
        raise BincountError(f"audit {name}: {', '.join(failed)} failed, as reported above; rerun to resume")
