"""The inventory audit: count bins in the store with an exported model and rank them by how likely their expected
quantity is wrong. `plan` fixes the work list, `worker` audits shards of it (resumably, in parallel), `report`
merges the shards; a backend runs the workers (`local`: processes, `kubernetes`: an indexed Job)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bincount.audit.flagging import Policy
from bincount.audit.plan import make_plan
from bincount.audit.report import AuditResult, write_report
from bincount.config import AuditConfig
from bincount.model.exported import resolve_location

if TYPE_CHECKING:
    from bincount.backends import Backend


def audit(cfg: AuditConfig, backend: Backend) -> AuditResult:
    """Plan (or resume), let the backend's workers count every shard, then merge them into the report."""
    backend.check_audit(cfg.store, resolve_location(cfg.model, cfg.store))
    plan = make_plan(cfg)
    backend.audit(cfg, plan.name)
    return write_report(cfg.store, plan.name, Policy.choose(cfg.review, cfg.threshold, cfg.target_precision),
                        cfg.top, cfg.error_rate)
