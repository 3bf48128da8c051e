"""The audit on a cluster: the indexed Job and the CronJob from the builders, validated strictly against the
Kubernetes schemas (and by checkov where installed), and `KubernetesBackend.audit` against the STUB Kubernetes API
server (tests/k8s_stub.py; no control plane runs here), whose "pods" are the Job's own commands run here, each
with its JOB_COMPLETION_INDEX, against a real S3 server (moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from k8s_validation import CRDS, Validator

from bincount import cli
from bincount.audit import audit
from bincount.audit.kubernetes import job_name
from bincount.audit.local import worker_argv
from bincount.backends import KubernetesBackend
from bincount.config import AuditConfig, ClusterConfig, JobResources
from bincount.errors import ConfigError
from bincount.k8s import manifests, platform
from bincount.k8s.resources import audit_cronjob, audit_job
from bincount.store import open_store
from serve_support import export_model, real_photos
from test_manifests import tool
from training_data import subprocess_env

CLUSTER = ClusterConfig()
CFG = AuditConfig(store="s3://bincount", model="bincount-train", all=True, workers=3)


def test_the_indexed_job_splits_the_shards_among_its_pods_and_is_valid():
    job = audit_job("audit-x-123456", worker_argv(CFG, "x", None, 3), JobResources(workers=3), CLUSTER)
    assert Validator().errors(job) == []
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"      # backoffLimitPerIndex requires it
    container = pod["containers"][0]
    args = cli.build_parser().parse_args(container["args"])
    assert args.func is cli.cmd_audit_worker and args.index is None and args.count == 3   # index from the pod
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "S3_ENDPOINT" in env and not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    # the S3 Secret is mounted as files, and the store reads the paths from AWS_*_FILE
    mount = next(m for m in container["volumeMounts"] if m["name"] == "s3-credentials")
    volume = next(v for v in pod["volumes"] if v["name"] == "s3-credentials")
    assert volume["secret"]["secretName"] == CLUSTER.s3_secret and mount["readOnly"]
    assert env["AWS_SECRET_ACCESS_KEY_FILE"] == f"{mount['mountPath']}/AWS_SECRET_ACCESS_KEY"
    assert env["AWS_ACCESS_KEY_ID_FILE"] == f"{mount['mountPath']}/AWS_ACCESS_KEY_ID"


def test_the_cronjob_runs_the_whole_audit_each_night_and_is_valid():
    resources = manifests.profiles(CLUSTER)["default"].audit
    cron = audit_cronjob("bincount-audit", "0 2 * * *", manifests.audit_args(resources, CLUSTER), resources, CLUSTER)
    assert Validator().errors(cron) == []
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    args = cli.build_parser().parse_args(container["args"])
    assert args.func is cli.cmd_audit and args.all and args.workers == resources.workers
    assert args.name == "nightly-{date}" and args.modified_after == "1d"


def test_a_planted_typo_in_the_job_is_caught():
    job = audit_job("a", ["audit", "worker"], JobResources(), CLUSTER)
    job["spec"]["completionMod"] = "Indexed"
    errors = Validator().errors(job)
    assert errors and all("completionMod" in e for e in errors)


def test_job_names_are_dns_labels():
    for audit_name in ("nightly-2026-01-02", "Audit_Of.SOMETHING" * 5, "___"):
        name = job_name(audit_name)
        assert len(name) <= 63 and name[0].isalpha() and all(c.isalnum() or c == "-" for c in name), name
    assert job_name("x") != job_name("x")


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"the shared CRDs are not at {CRDS}")
def test_checkov_finds_nothing_to_fix_in_the_audit_job_and_cronjob(tmp_path):
    binary = tool("checkov", "CHECKOV")
    resources = JobResources(workers=2)
    docs = [audit_job("audit-x-123456", worker_argv(CFG, "x", None, 2), resources, CLUSTER),
            audit_cronjob("bincount-audit", "0 2 * * *", manifests.audit_args(resources, CLUSTER), resources, CLUSTER),
            platform.audit_policy(CLUSTER)]
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    done = subprocess.run([binary, "--skip-download", "--compact", "--output", "json", "--framework", "kubernetes",
                           "-f", str(path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    report = json.loads(done.stdout)
    assert report["summary"]["passed"] > 0
    assert [c["check_id"] for c in report["results"]["failed_checks"]] == []
    skipped = report["results"]["skipped_checks"]
    assert {c["check_id"] for c in skipped} == {"CKV_K8S_43"}
    assert all(len(c["check_result"]["suppress_comment"]) >= 30 for c in skipped)


def test_the_kubernetes_backend_runs_the_audit_as_an_indexed_job(api, cluster, s3_env, abid_sample, tmp_path):
    bucket = s3_env.new_bucket("audit")
    store = open_store(f"s3://{bucket}")
    keys = sorted(p.stem for p in (abid_sample / "metadata").glob("*.json"))[-10:]
    for key in keys:
        store.put(f"raw/bin-images/{key}.jpg", (abid_sample / "bin-images" / f"{key}.jpg").read_bytes())
        store.put(f"raw/metadata/{key}.json", (abid_sample / "metadata" / f"{key}.json").read_bytes())
    model = Path(export_model(tmp_path, real_photos(abid_sample, 2)))
    for name in ("model.pt", "model.json"):
        store.put(f"models/test/{name}", (model / name).read_bytes())

    ran: list[int] = []

    def kubelet() -> None:
        """Runs each index's pod as the cluster would: the container's command, JOB_COMPLETION_INDEX set."""
        while not api.created:
            threading.Event().wait(0.05)
        job = api.created[0]
        container = job["spec"]["template"]["spec"]["containers"][0]
        for index in range(job["spec"]["completions"]):
            env = {**subprocess_env(), **s3_env.env(), "JOB_COMPLETION_INDEX": str(index)}
            argv = [sys.executable, "-m", "bincount.cli", *container["args"]]
            assert container["command"] == ["bincount"]
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            ran.append(index)
        api.script("jobs", job["metadata"]["name"], [{"succeeded": 2, "conditions": [
            {"type": "Complete", "status": "True"}]}])

    pods = threading.Thread(target=kubelet, daemon=True)
    pods.start()
    cfg = AuditConfig(store=f"s3://{bucket}", model="test", ids=keys, name="k8s", workers=2, shard_size=3,
                      precision="fp32", poll=0.05, timeout=300)
    result = audit(cfg, KubernetesBackend(cluster))
    pods.join(10)
    assert ran == [0, 1]
    job = api.created[0]
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert result.summary["audited"] == 10 and result.summary["bins"] == 10
    shards = sorted(info.key for info in store.list("audits/k8s/shards/"))
    assert len(shards) == 4 and store.exists("audits/k8s/report.html")


def test_the_kubernetes_backend_refuses_what_its_pods_cannot_read_before_any_plan(s3_env, tmp_path):
    local = tmp_path / "store"
    (local / "models" / "test").mkdir(parents=True)
    with pytest.raises(ConfigError, match="needs an s3:// store that the pods reach"):
        audit(AuditConfig(store=str(local), model="test", all=True), KubernetesBackend())
    assert not (local / "audits").exists()
    bucket = s3_env.new_bucket("audit-local-model")
    with pytest.raises(ConfigError, match="needs a model the pods reach"):
        audit(AuditConfig(store=f"s3://{bucket}", model=str(local / "models" / "test"), all=True),
              KubernetesBackend())
    assert list(open_store(f"s3://{bucket}").list("audits/")) == []
