"""A planned audit's workers on a cluster: an indexed Job of `workers` pods, each auditing its own share of the
shards (a failed pod is retried alone), followed to its end. The plan and the report are made by the caller."""

from __future__ import annotations

import math
import re
import sys
import uuid
from dataclasses import replace

from bincount.audit.local import worker_argv
from bincount.audit.plan import Plan, shard_key
from bincount.config import AuditConfig, ClusterConfig, JobResources
from bincount.k8s.launch import Cluster
from bincount.k8s.resources import audit_job
from bincount.store import open_store


def job_name(audit: str) -> str:
    """A DNS-1123 name of at most 63 characters, new for every launch (a resumed audit gets a fresh Job)."""
    stem = re.sub(r"[^a-z0-9-]+", "-", audit.lower()).strip("-")[:50].strip("-")
    return f"audit-{stem}-{uuid.uuid4().hex[:6]}" if stem else f"audit-{uuid.uuid4().hex[:6]}"


def run_job(cfg: AuditConfig, plan: Plan, cluster: Cluster, config: ClusterConfig, resources: JobResources) -> None:
    store = open_store(cfg.store)
    if all(store.exists(shard_key(plan.name, s)) for s in range(plan.shards)):
        return
    body = audit_job(job_name(plan.name), worker_argv(cfg, plan.name, None, cfg.workers),
                     replace(resources, workers=cfg.workers), config)
    cluster.run(body, timeout=cfg.timeout or math.inf, poll=cfg.poll, progress=_say, on_log=print)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
