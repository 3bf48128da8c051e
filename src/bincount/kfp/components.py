"""The pipeline's steps as KFP lightweight components, compiled into components/<step>/component.yaml.

KFP runs a lightweight component from its source text alone, so each body imports `bincount.kfp.stages` and
makes one call; the logic lives there. The base image is the trainer image named in `bincount.config`, which
carries bincount and kfp, hence `install_kfp_package=False` (and kfp.local's SubprocessRunner runs them in
this interpreter, where both are installed too). No `from __future__ import annotations`: KFP reads the
artifact types from the annotations at decoration time.
"""

import functools
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from bincount.config import TRAINER_IMAGE

component = functools.partial(dsl.component, base_image=TRAINER_IMAGE, install_kfp_package=False)


@component
def download(source: str, store: str, images: int, file_list: str, source_endpoint: str, source_bucket: str,
             seed: int, raw: Output[Dataset]):
    """Raw bin photos and metadata into STORE/raw/: a copy of ABID (or a mirror), or synthetic bins."""
    from bincount.kfp import stages

    stages.download(source, store, images, file_list, source_endpoint, source_bucket, seed, raw)


@component
def prepare(raw: Input[Dataset], name: str, balance: str, split: str, seed: int, splits: Output[Dataset],
            eda_html: Output[HTML], eda_markdown: Output[Markdown]):
    """Labels, balance and a stratified train/val/test split, then the EDA report of the dataset."""
    from bincount.kfp import stages

    stages.prepare(raw, name, balance, split, seed, splits, eda_html, eda_markdown)


@component
def shard(splits: Input[Dataset], recipe: str, image_size: int, min_images: int, shard_index: Output[Dataset],
          shard_report: Output[Markdown]):
    """The splits packed into shards that every training rank streams from the store; skipped below
    `min_images` training images."""
    from bincount.kfp import stages

    stages.shard(splits, recipe, image_size, min_images, shard_index, shard_report)


@component
def tune(splits: Input[Dataset], backend: str, training_api: str, run_name: str, job_id: str, space: str, recipe: str,
         arch: str, weights: str, freeze: str, image_size: int, trial_epochs: int, trials: int, parallel_trials: int,
         workers: int, gpus_per_worker: int, procs_per_worker: int, best: Output[Artifact],
         tuning_report: Output[Markdown]):
    """A search space on the validation split: optuna locally, a Katib Experiment on a cluster (its trials are
    PyTorchJobs or TrainJobs, by `training_api`)."""
    from bincount.kfp import stages

    stages.tune(splits, backend, training_api, run_name, job_id, space, recipe, arch, weights, freeze, image_size,
                trial_epochs, trials, parallel_trials, workers, gpus_per_worker, procs_per_worker, best, tuning_report)


@component
def train(splits: Input[Dataset], best: Input[Artifact], backend: str, training_api: str, run_name: str, job_id: str,
          epochs: int, workers: int, gpus_per_worker: int, procs_per_worker: int, model: Output[Model],
          metrics: Output[Metrics]):
    """The best trial's settings, trained for the full epochs (0: the recipe's): torchrun locally, a PyTorchJob or
    a TrainJob (`training_api`) on a cluster."""
    from bincount.kfp import stages

    stages.train(splits, best, backend, training_api, run_name, job_id, epochs, workers, gpus_per_worker,
                 procs_per_worker, model, metrics)


@component
def evaluate(splits: Input[Dataset], model: Input[Model], test_metrics: Output[Metrics],
             confusion_matrix: Output[ClassificationMetrics], evaluation_report: Output[Markdown]) -> float:
    """The exported model on the test split, the only step that reads it; returns the test accuracy."""
    from bincount.kfp import stages

    return stages.evaluate(splits, model, test_metrics, confusion_matrix, evaluation_report)


@component
def gate(splits: Input[Dataset], model: Input[Model], endpoint: str, accuracy: float, deploy_threshold: float,
         mae_margin: float, balanced_accuracy_margin: float, confidence: float, gate_report: Output[HTML],
         gate_markdown: Output[Markdown]) -> NamedTuple("GateOutputs", [("passed", bool), ("decision", str)]):
    """The promotion gate: the new model against the endpoint's champion on the same test photos (a first model
    passes), by the rule these parameters make; returns whether it may be deployed and which rule decided."""
    from bincount.kfp import stages

    return stages.gate(splits, model, endpoint, accuracy, deploy_threshold, mae_margin, balanced_accuracy_margin,
                       confidence, gate_report, gate_markdown)


@component
def deploy(model: Input[Model], backend: str, name: str, decision: str, canary_percent: int) -> str:
    """The model behind a V1/V2 endpoint (a local ModelServer process or a KServe InferenceService), outright or
    on canary, recorded in serving/NAME.json. Returns the deployment as JSON (URLs, how to stop it)."""
    from bincount.kfp import stages

    return stages.deploy(model, backend, name, decision, canary_percent)


@component
def skip_deploy(decision: str) -> str:
    """Says why the model was not deployed, in the same JSON shape, so the run does not end silently."""
    from bincount.kfp import stages

    return stages.skip_deploy(decision)


@component
def monitor(store: str, endpoint: str, reference: str, split: str, since: str, psi_threshold: float,
            min_records: int, report: Output[HTML], report_markdown: Output[Markdown],
            summary: Output[Metrics]) -> NamedTuple("MonitorOutputs", [("drifted", bool), ("decision", str)]):
    """The drift report of an endpoint's prediction log against a reference split; returns whether a feature
    drifted over its threshold, and which."""
    from bincount.kfp import stages

    return stages.monitor(store, endpoint, reference, split, since, psi_threshold, min_records, report,
                          report_markdown, summary)


@component
def drift_alert(decision: str):
    """Fails the run with the drift found, so a scheduled run alerts as a failed one (the report stays in the
    monitor step's artifacts)."""
    from bincount.kfp import stages

    stages.drift_alert(decision)


@component
def audit_plan(store: str, model: str, dataset: str, split: str, ids: str, all_images: bool, after: str,
               modified_after: str, expected: str, name: str, shard_size: int) -> str:
    """The bins to audit and their expected quantities, fixed in STORE/audits/NAME/; returns the audit's name."""
    from bincount.kfp import stages

    return stages.audit_plan(store, model, dataset, split, ids, all_images, after, modified_after, expected, name,
                             shard_size)


@component
def audit_count(store: str, name: str, backend: str, workers: int) -> str:
    """Counts every shard of the planned audit: worker processes locally, an indexed Job on a cluster."""
    from bincount.kfp import stages

    return stages.audit_count(store, name, backend, workers)


@component
def audit_report(store: str, name: str, review: int, threshold: float, target_precision: float, error_rate: float,
                 top: int, report: Output[HTML], report_markdown: Output[Markdown], summary: Output[Metrics]) -> int:
    """Merges the shards: bins ranked by p_mismatch, totals, per-count agreement; returns the flagged count."""
    from bincount.kfp import stages

    return stages.audit_report(store, name, review, threshold, target_precision, error_rate, top, report,
                               report_markdown, summary)


COMPONENTS = {c.name: c for c in (download, prepare, shard, tune, train, evaluate, gate, deploy, skip_deploy, monitor,
                                  drift_alert, audit_plan, audit_count, audit_report)}
