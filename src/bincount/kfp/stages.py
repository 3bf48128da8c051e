"""What each pipeline step does, as library code over typed configs.

The `@dsl.component` functions in `components.py` are compiled into YAML and run from their source text, so
each one only imports this module and calls one function here. Artifacts are duck-typed (`path`, `metadata`,
`log_metric`, `log_confusion_matrix`): the same calls work in kfp.local and in a KFP pod. The data itself stays
in the store; artifacts carry its location in their metadata plus small copies worth seeing in the KFP UI
(split manifests, reports, best hyperparameters, the exported model).

A step that fails with a `BincountError` prints one `bincount: error:` line and exits 1, without a traceback;
when `BINCOUNT_STAGE_ERRORS` names a directory (`bincount pipeline run` sets it) the message is also written
there, so the local run can name the failed stage and its reason. A step that succeeds ends with one
`bincount: step result:` line, which the local run shows on the step's line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bincount.config import (AuditConfig, ClusterConfig, DownloadConfig, EdaConfig, EvaluateConfig, JobResources,
                             PrepareConfig, ShardConfig, SyntheticConfig, TrainJob, TuneJob, from_dict,
                             load_train_config, to_dict)
from bincount.errors import BincountError, ConfigError
from bincount.store import Store, open_store

STAGE_ERRORS_ENV = "BINCOUNT_STAGE_ERRORS"
RESULT = "bincount: step result: "
SOURCES = ("abid", "synthetic")
RUN_RE = re.compile(r"^[a-z]([-a-z0-9]{0,28}[a-z0-9])?$")
F = TypeVar("F", bound=Callable[..., Any])


def stage(fn: F) -> F:
    """A step's user-facing failure as one line (and a file for the local run), not a traceback."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BincountError as e:
            print(f"bincount: error: {fn.__name__}: {e}", file=sys.stderr, flush=True)
            errors = os.environ.get(STAGE_ERRORS_ENV)
            if errors:
                Path(errors, f"{fn.__name__}.txt").write_text(str(e))
            raise SystemExit(1) from None
    return run  # type: ignore[return-value]


def _result(line: str) -> None:
    print(RESULT + line, flush=True)


def run_id(run_name: str, job_id: str) -> str:
    """The run's name in the store and on the cluster: the given one, or one derived from the pipeline job, so
    a retried KFP run resumes its own checkpoints. It names training jobs and Katib trials, hence a DNS label."""
    run = run_name or "bc-" + re.sub(r"[^a-z0-9]", "", job_id.lower())[:8]
    if not RUN_RE.match(run):
        raise ConfigError(f"run name {run!r} must be a lower-case DNS label of at most 30 characters starting with "
                          "a letter (it names the training job, the Katib experiment and its trials)")
    return run


def _store(artifact: Any) -> str:
    return artifact.metadata["store"]


def _fetch(store: Store, files: dict[Path, str]) -> None:
    """Store objects → files of artifacts (path → key), all through one store client."""
    for path, key in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get(key))


@stage
def download(source: str, store: str, images: int, file_list: str, source_endpoint: str, source_bucket: str,
             seed: int, raw: Any) -> None:
    if source == "synthetic":
        from bincount.data.synthetic import generate

        result = generate(SyntheticConfig(dest=store, n=images, seed=seed, workers=os.cpu_count() or 1))
        print(result.summary(), flush=True)
        counts = {str(c): n for c, n in sorted(result.counts.items())}
    elif source == "abid":
        from bincount.data.abid import download as copy_pairs

        selection: dict[str, Any] = ({"file_list": file_list} if file_list else
                                     {"quantities": (1, 5), "per_class": math.ceil(images / 5)})
        endpoint = {"source_endpoint": source_endpoint} if source_endpoint else {}
        summary = copy_pairs(DownloadConfig(dest=store, limit=images, source_bucket=source_bucket, **selection,
                                            **endpoint))
        print(summary.report(), flush=True)
        if summary.failed:
            raise BincountError(f"{summary.failed} pair(s) could not be copied; rerun the pipeline to retry them")
        counts = {str(c): n for c, n in sorted(summary.labels.items())}
    else:
        raise ConfigError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    url = open_store(store).uri
    raw.metadata.update({"store": url, "source": source, "images": sum(counts.values()), "per_class": counts})
    Path(raw.path).write_text(json.dumps({"store": url, "prefix": "raw/", "source": source,
                                          "per_class": counts}, indent=2) + "\n")
    _result(f"{sum(counts.values())} {source} image pairs in {open_store(store).url('raw/')}")


@stage
def prepare(raw: Any, name: str, balance: str, split: str, seed: int, splits: Any, eda_html: Any,
            eda_markdown: Any) -> None:
    from bincount.data.eda import build_report, report_prefix
    from bincount.data.prepare import SPLITS, dataset_key, prepare as prepare_dataset

    store = _store(raw)
    cfg = from_dict(PrepareConfig, {"store": store, "name": name, "balance": balance, "split": split, "seed": seed},
                    "prepare")
    result = prepare_dataset(cfg)
    print(result.summary(), flush=True)
    report = build_report(EdaConfig(store=store, name=name))
    print(report.summary(), flush=True)
    source = open_store(store)
    _fetch(source, {Path(splits.path) / file: dataset_key(name, file)
                    for file in [f"{s}.jsonl" for s in SPLITS] + ["stats.json"]})
    sizes = {s: sum(result.stats["counts"]["splits"][s].values()) for s in SPLITS}
    splits.metadata.update({"store": store, "dataset": name, "uri": result.uri, **sizes})
    _fetch(source, {Path(eda_html.path): f"{report_prefix(name)}/report.html",
                    Path(eda_markdown.path): f"{report_prefix(name)}/report.md"})
    eda_html.metadata["uri"] = report.uri
    _result(f"dataset {name}: train {sizes['train']}, val {sizes['val']}, test {sizes['test']}; EDA report "
            f"{report.uri}")


@stage
def shard(splits: Any, recipe: str, image_size: int, min_images: int, shard_index: Any, shard_report: Any) -> None:
    """Shards at the training size once the train split reaches `min_images`; below it the trainer's node-local
    image cache is the faster path (one small fetch, no packing), and the step says so."""
    from bincount.data.shards import pack

    store, name, train_images = _store(splits), splits.metadata["dataset"], int(splits.metadata["train"])
    size = image_size or load_train_config(None, {"store": store, "dataset": name, "run": "x",
                                                  "recipe": recipe}).image_size
    shard_index.metadata.update({"store": store, "dataset": name, "image_size": size})
    if train_images < min_images:
        why = (f"skipped: {train_images} training images, under shard_min_images {min_images}; training fills "
               "the node-local image cache instead")
        shard_index.metadata["skipped"] = True
        Path(shard_index.path).write_text(json.dumps({"skipped": why}) + "\n")
        Path(shard_report.path).write_text(f"# Shards of {name}\n\n{why}.\n")
        _result(why)
        return
    result = pack(from_dict(ShardConfig, {"store": store, "name": name, "image_size": size}, "shard"))
    print(result.summary(), flush=True)
    rows = [{"split": r.split, "shards": r.shards, "samples": r.samples, "bytes": r.bytes, "skipped": r.skipped,
             "index": r.index_uri} for r in result.splits]
    shard_index.metadata.update({"skipped": False, **{f"{r['split']}_{k}": r[k] for r in rows
                                                      for k in ("shards", "samples", "bytes")}})
    Path(shard_index.path).write_text(json.dumps(rows, indent=2) + "\n")
    Path(shard_report.path).write_text("\n".join([
        f"# Shards of {name} ({size} px)", "", "| split | shards | samples | MiB | photos skipped | index |",
        "|---|---:|---:|---:|---:|---|",
        *(f"| {r['split']} | {r['shards']} | {r['samples']} | {r['bytes'] / 2**20:.1f} | {r['skipped']} | "
          f"{r['index']} |" for r in rows)]) + "\n")
    _result(", ".join(f"{r['split']} {r['samples']} in {r['shards']} shard(s)" for r in rows))


def search_space(path: str, experiment: str, trials: int, parallel_trials: int, trial: dict[str, Any],
                 resources: JobResources) -> Any:
    """A search space's parameters, objective and algorithm; the pipeline's model, sizes and resources. A setting
    the space searches stays searched."""
    from bincount.tune.space import load_space

    space = load_space(path)
    searched = {p.name for p in space.parameters}
    fixed = {k: v for k, v in trial.items() if k not in searched}
    return dataclasses.replace(space, name=experiment, max_trials=trials, parallel_trials=parallel_trials,
                               trial={**space.trial, **fixed}, resources=resources)


def model_settings(recipe: str, arch: str, weights: str, freeze: str, image_size: int) -> dict[str, Any]:
    """The pipeline's model parameters as trainer settings; empty ones (and image size 0) leave the recipe's."""
    given = {"recipe": recipe, "arch": arch, "weights": weights, "freeze": freeze, "image_size": image_size}
    return {k: v for k, v in given.items() if v}


@stage
def tune(splits: Any, backend: str, training_api: str, run_name: str, job_id: str, space: str, recipe: str, arch: str,
         weights: str, freeze: str, image_size: int, trial_epochs: int, trials: int, parallel_trials: int,
         workers: int, gpus_per_worker: int, procs_per_worker: int, best: Any, tuning_report: Any) -> None:
    from bincount.backends import get_backend
    from bincount.tune.results import best_json

    experiment = f"{run_id(run_name, job_id)}-hpo"
    trial = {**model_settings(recipe, arch, weights, freeze, image_size), "epochs": trial_epochs,
             "precision": "auto"}
    sized = search_space(space, experiment, trials, parallel_trials, trial,
                         JobResources.sized(workers, gpus_per_worker, procs_per_worker))
    with tempfile.TemporaryDirectory(prefix="bincount-space-") as tmp:
        path = Path(tmp, "tuning.yaml")
        path.write_text(yaml.safe_dump(to_dict(sized), sort_keys=False))
        job = TuneJob(store=_store(splits), dataset=splits.metadata["dataset"], space=str(path), experiment=experiment)
        result = get_backend(backend, ClusterConfig(training_api=training_api)).tune(job)
    print(result.table(), flush=True)
    if result.best is None:
        raise BincountError(f"experiment {experiment}: no trial succeeded; trials in {result.location}/trials.csv")
    chosen = best_json(result)
    Path(best.path).write_text(json.dumps(chosen, indent=2) + "\n")
    best.metadata.update({"experiment": experiment, "location": result.location, **chosen["parameters"],
                          chosen["objective"]["metric"]: chosen["objective"]["value"]})
    Path(tuning_report.path).write_text(
        f"# Hyperparameter search {experiment}\n\n{len(result.trials)} trials on the {backend} backend, "
        f"objective {chosen['objective']['metric']} ({chosen['objective']['goal']}); results in "
        f"`{result.location}`.\n\n```\n{result.table()}\n```\n")
    objective = chosen["objective"]
    _result(f"best of {len(result.trials)} trials: {_settings(chosen['parameters'])}, {objective['metric']} "
            f"{objective['value']:.4f}")


@stage
def train(splits: Any, best: Any, backend: str, training_api: str, run_name: str, job_id: str, epochs: int,
          workers: int, gpus_per_worker: int, procs_per_worker: int, model: Any, metrics: Any) -> None:
    """The best trial's settings, for `epochs` (0: the recipe's)."""
    from bincount.backends import get_backend
    from bincount.model.exported import META_FILE, MODEL_FILE

    run = run_id(run_name, job_id)
    settings = {k: v for k, v in json.loads(Path(best.path).read_text())["train"].items() if k != "epochs"}
    store = _store(splits)
    cfg = load_train_config(None, {**settings, "store": store, "dataset": splits.metadata["dataset"], "run": run,
                                   "epochs": epochs or None})
    resources = JobResources.sized(workers, gpus_per_worker, procs_per_worker)
    outcome = get_backend(backend, ClusterConfig(training_api=training_api)).train(TrainJob(cfg, resources))
    _fetch(open_store(outcome.model), {Path(model.path) / file: file for file in (MODEL_FILE, META_FILE)})
    meta = json.loads((Path(model.path) / META_FILE).read_text())
    model.metadata.update({"store_uri": outcome.model, "store": store, "run": run, "arch": meta["arch"],
                           "input_size": meta["preprocessing"]["size"], "best_epoch": meta["best_epoch"],
                           "epochs": meta["epochs"], **{f"inference_{k}": v for k, v in meta["inference"].items()},
                           "reports": open_store(store).url(f"reports/{run}")})
    for name, value in outcome.metrics.items():
        metrics.log_metric(name, value)
    _result(f"model {outcome.model}, best epoch {meta['best_epoch']}: "
            f"{_settings({k: v for k, v in outcome.metrics.items() if k.startswith('val_')})}")


@stage
def evaluate(splits: Any, model: Any, test_metrics: Any, confusion_matrix: Any, evaluation_report: Any) -> float:
    from bincount.evaluate import evaluate as run_evaluation, report_prefix

    store = _store(splits)
    run = model.metadata["run"]
    result = run_evaluation(EvaluateConfig(store=store, model=model.metadata["store_uri"],
                                           dataset=splits.metadata["dataset"], split="test",
                                           out=open_store(store).url(report_prefix(run))))
    print(result.summary(), flush=True)
    m = result.metrics
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "within_one_accuracy", "mae", "rmse"):
        test_metrics.log_metric(name, m[name])
    test_metrics.metadata["samples"] = m["samples"]
    confusion_matrix.log_confusion_matrix(list(m["per_class"]), m["confusion_matrix"])
    rows = "\n".join(f"| {c} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                     for c, v in m["per_class"].items())
    Path(evaluation_report.path).write_text(
        f"# Test metrics of {run}\n\n{result.summary()}\n\n| items | precision | recall | F1 | images |\n"
        f"|---|---|---|---|---|\n{rows}\n")
    _result(f"test accuracy {m['accuracy']:.4f}, MAE {m['mae']:.3f} on {m['samples']} images")
    return float(m["accuracy"])


@stage
def gate(splits: Any, model: Any, endpoint: str, accuracy: float, deploy_threshold: float, mae_margin: float,
         balanced_accuracy_margin: float, confidence: float, gate_report: Any, gate_markdown: Any) -> tuple[bool, str]:
    """The new model against the endpoint's champion on the test split; a first model (or the champion itself)
    is judged by the deploy threshold alone. A refusal is written to the endpoint's history."""
    from bincount.config import CompareConfig, GateRule
    from bincount.document import Heading, Para, render_html, render_markdown
    from bincount.rollout import registry
    from bincount.rollout.gate import Refused, compare

    store, run = _store(splits), model.metadata["run"]
    source = open_store(store)
    record = registry.load(source, endpoint)
    champion = record.champion
    rule = GateRule(confidence=confidence, mae_margin=mae_margin, balanced_accuracy_margin=balanced_accuracy_margin,
                    min_accuracy=deploy_threshold)
    if champion is None or champion.run == run:
        passed = accuracy >= deploy_threshold
        why = (f"no champion serves endpoint {endpoint} yet, so {run} is its first model" if champion is None
               else f"{run} already is the champion of endpoint {endpoint}")
        decision = (f"{'passed' if passed else 'refused by the min_accuracy rule'}: {why}; test accuracy "
                    f"{accuracy:.4f} {'≥' if passed else '<'} the deploy threshold {deploy_threshold:.4f}")
        blocks = [Heading(f"Promotion gate: {run}", 1), Para(decision[0].upper() + decision[1:] + ".")]
        Path(gate_report.path).write_text(render_html(blocks, {}, f"Promotion gate: {run}"))
        Path(gate_markdown.path).write_text(render_markdown(blocks))
    else:
        try:
            result = compare(CompareConfig(store=store, champion=champion.model, challenger=model.metadata["store_uri"],
                                           dataset=splits.metadata["dataset"], split="test", rule=rule))
            passed, decision = result.passed, result.decision
            report = open_store(result.uri)
            _fetch(report, {Path(gate_report.path): "report.html", Path(gate_markdown.path): "report.md"})
            gate_report.metadata["uri"] = report.url("report.html")
        except Refused as e:
            passed, decision = False, f"refused: {e}"
            Path(gate_report.path).write_text(render_html([Para(decision)], {}, f"Promotion gate: {run}"))
            Path(gate_markdown.path).write_text(decision + "\n")
    if not passed:
        record.log("refused", run, decision, registry.evaluation_metrics(source, run))
        registry.save(source, record)
    gate_report.metadata.update(passed=passed, decision=decision, champion=champion.run if champion else "")
    _result(f"{'deploy' if passed else 'do not deploy'} {run}: {decision}")
    return passed, decision


@stage
def deploy(model: Any, backend: str, name: str, decision: str, canary_percent: int) -> str:
    from bincount.backends import get_backend
    from bincount.config import DeployConfig
    from bincount.rollout.deploy import deploy as step

    cfg = DeployConfig(store=model.metadata["store"], endpoint=name, model=model.metadata["run"],
                       canary=canary_percent or None, reason=f"pipeline gate {decision}")
    result = step(cfg, get_backend(backend), backend)
    endpoint = result.endpoint
    record = {"deployed": True, "name": name, "url": endpoint.url, "predict_url": endpoint.predict_url,
              "stop": endpoint.stop_hint, "model": model.metadata["store_uri"], "decision": decision,
              "serving": result.line()}
    print(result.line(), flush=True)
    _result(f"serving at {endpoint.predict_url}")
    return json.dumps(record)


@stage
def skip_deploy(decision: str) -> str:
    _result(f"not deployed: {decision}")
    return json.dumps({"deployed": False, "reason": decision})


@stage
def monitor(store: str, endpoint: str, reference: str, split: str, since: str, psi_threshold: float,
            min_records: int, report: Any, report_markdown: Any, summary: Any) -> tuple[bool, str]:
    from bincount.config import MonitorConfig
    from bincount.rollout.monitor import monitor as drift_report

    result = drift_report(MonitorConfig(store=store, endpoint=endpoint, reference=reference, split=split, since=since,
                                        psi_threshold=psi_threshold, min_records=min_records))
    _fetch(open_store(result.uri), {Path(report.path): "report.html", Path(report_markdown.path): "report.md"})
    summary.log_metric("records", result.records)
    for c in result.comparisons:
        if c.psi is not None:
            summary.log_metric(f"psi_{re.sub(r'[^a-z0-9]+', '_', c.name.lower())}", c.psi)
    for artifact in (report, report_markdown, summary):
        artifact.metadata.update(store=store, endpoint=endpoint, uri=result.uri)
    print(result.line(), flush=True)
    drifted = ", ".join(f"{c.name} PSI {c.psi:.3f} > {c.threshold:g}" for c in result.drifted)
    _result(f"drift in {drifted}" if drifted else f"no drift in {result.records} prediction(s)")
    return bool(result.drifted), (f"endpoint {endpoint} drifted: {drifted}; report {result.uri}/report.html"
                                  if drifted else "no drift")


@stage
def drift_alert(decision: str) -> None:
    raise BincountError(decision)


@stage
def audit_plan(store: str, model: str, dataset: str, split: str, ids: str, all_images: bool, after: str,
               modified_after: str, expected: str, name: str, shard_size: int) -> str:
    """The audit's plan in the store (or the one already there: a retried run resumes); returns its name."""
    from bincount.audit.plan import make_plan

    plan = make_plan(AuditConfig(store=store, model=model, dataset=dataset, split=split,
                                 ids=[i for i in ids.split(",") if i], all=all_images, after=after,
                                 modified_after=modified_after, expected=expected, name=name, shard_size=shard_size))
    _result(f"{plan.bins} bins in {plan.shards} shard(s) → audits/{plan.name}/")
    return plan.name


@stage
def audit_count(store: str, name: str, backend: str, workers: int) -> str:
    """Every shard of the planned audit, by the backend's workers; returns the audit's name."""
    from bincount.backends import get_backend

    get_backend(backend).audit(AuditConfig(store=store, model="", workers=workers), name)
    _result(f"every shard of audits/{name}/ counted by {workers} {backend} worker(s)")
    return name


@stage
def audit_report(store: str, name: str, review: int, threshold: float, target_precision: float, error_rate: float,
                 top: int, report: Any, report_markdown: Any, summary: Any) -> int:
    """The shards merged into the report, also as the step's artifacts; returns how many bins were flagged."""
    from bincount.audit.flagging import Policy
    from bincount.audit.plan import audit_prefix
    from bincount.audit.report import write_report

    result = write_report(store, name, Policy.choose(review, threshold, target_precision), top, error_rate)
    _fetch(open_store(store), {Path(report.path): f"{audit_prefix(name)}/report.html",
                               Path(report_markdown.path): f"{audit_prefix(name)}/report.md"})
    s = result.summary
    for key in ("bins", "audited", "with_expected", "flagged", "expected_wrong_flagged", "disagreements",
                "expected_precision", "error_rate", "agreement"):
        if s[key] is not None:
            summary.log_metric(key, s[key])
    for artifact in (report, report_markdown, summary):
        artifact.metadata.update(store=store, audit=name)
    print(result.line(), flush=True)
    _result(f"{s['flagged']} of {s['audited']} bins flagged (expected precision "
            f"{'n/a' if s['expected_precision'] is None else format(s['expected_precision'], '.3f')})")
    return int(s["flagged"])


def _settings(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
