"""The `bin-audit` pipeline: its compiled spec (drift-tested with the others in test_pipeline.py) loads as KFP users
load it, and the real kfp.local runner runs plan → count → report on real ABID photos with the local backend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from bincount.kfp.compile import AUDIT_PIPELINE_FILE
from bincount.kfp.pipeline import bin_audit
from serve_support import export_model, real_photos

REPO = Path(__file__).resolve().parents[1]


def test_the_compiled_audit_pipeline_loads_and_chains_plan_count_report():
    from kfp import components

    loaded = components.load_component_from_file(str(REPO / AUDIT_PIPELINE_FILE))
    assert loaded.name == "bin-audit"
    assert loaded.component_spec.inputs.keys() == bin_audit.component_spec.inputs.keys()
    spec = next(yaml.safe_load_all((REPO / AUDIT_PIPELINE_FILE).read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["audit-count"]["dependentTasks"] == ["audit-plan"]
    assert tasks["audit-report"]["dependentTasks"] == ["audit-count"]


@pytest.mark.filterwarnings("ignore:.*non-Python base image")
def test_bin_audit_runs_under_kfp_local(abid_sample, tmp_path):
    from kfp import local

    store = tmp_path / "store"
    keys = sorted(p.stem for p in (abid_sample / "metadata").glob("*.json"))[-12:]
    for key in keys:
        for folder, suffix in (("bin-images", ".jpg"), ("metadata", ".json")):
            (store / "raw" / folder).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(abid_sample / folder / f"{key}{suffix}", store / "raw" / folder / f"{key}{suffix}")
    export_model(store, real_photos(abid_sample, 2))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    run = bin_audit(store=str(store), model="test", name="kfp", shard_size=5, workers=2, backend="local", top=4)
    summary = json.loads((store / "audits/kfp/summary.json").read_text())
    assert summary["bins"] == summary["audited"] == 12 and len(list((store / "audits/kfp/shards").iterdir())) == 3
    assert run.outputs["flagged"] == summary["flagged"]
    assert Path(run.outputs["report"].path).read_text() == (store / "audits/kfp/report.html").read_text()
    assert run.outputs["summary"].metadata["audited"] == 12
