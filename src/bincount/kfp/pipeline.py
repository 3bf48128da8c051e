"""The bin-counting pipeline: download → prepare (+EDA) → shard → tune → train → evaluate → gate → deploy if the
gate passes; the audit pipeline: plan → count (worker processes or an indexed Job) → report; and the monitor
pipeline: the drift report of an endpoint, failing the run on drift (for a recurring run).

Compiled into pipelines/bin_counting.yaml, pipelines/bin_audit.yaml and pipelines/bin_monitor.yaml for
`kfp run create`; the first is run as is by `bincount pipeline run`
through kfp.local. The defaults here are a cluster's (Kubeflow, MinIO, GPU workers, the kubernetes backend);
`bincount.kfp.local_run.QUICKSTART` holds the local ones. No `from __future__ import annotations`: KFP reads
the types from the annotations.
"""

from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Metrics, Model

from bincount.config import ABID_BUCKET, ClusterConfig
from bincount.k8s.conventions import S3_CREDENTIALS, store_settings
from bincount.kfp import components as c

NAME = "bin-counting"
CLUSTER = ClusterConfig()
Outputs = NamedTuple("Outputs", [("splits", Dataset), ("eda", HTML), ("best", Artifact), ("model", Model),
                                 ("test_metrics", Metrics), ("confusion_matrix", ClassificationMetrics),
                                 ("gate", HTML), ("deployment", str)])
# Steps that do their work in their own pod get room for it; the others launch and follow cluster resources.
WORKING = {"cpu": "2", "memory": "8Gi"}
LAUNCHING = {"cpu": "500m", "memory": "1Gi"}


def _on_cluster(task: dsl.PipelineTask, size: dict[str, str]) -> dsl.PipelineTask:
    """The store's settings and credentials by reference (kfp.local ignores both, so a local run keeps this
    machine's environment), a size, and no KFP caching: each step is idempotent against the store itself,
    and a cached step would skip work whose results were deleted from it."""
    kubernetes.use_config_map_as_env(task, CLUSTER.store_config, {k: k for k in store_settings(CLUSTER)})
    kubernetes.use_secret_as_env(task, CLUSTER.s3_secret, {k: k for k in S3_CREDENTIALS})
    task.set_cpu_request(size["cpu"]).set_memory_request(size["memory"]).set_memory_limit(size["memory"])
    task.set_caching_options(False)
    return task


@dsl.pipeline(name=NAME)
def bin_counting(
    source: str = "abid",
    images: int = 5000,
    file_list: str = "",
    source_endpoint: str = "",
    source_bucket: str = ABID_BUCKET,
    store: str = CLUSTER.store,
    dataset: str = "abid",
    balance: str = "none",
    split: str = "0.7,0.2,0.1",
    seed: int = 0,
    space: str = "tuning.yaml",
    recipe: str = "abid",
    arch: str = "",
    weights: str = "",
    freeze: str = "",
    image_size: int = 0,
    trials: int = 8,
    parallel_trials: int = 2,
    shard_min_images: int = 20000,
    trial_epochs: int = 5,
    epochs: int = 0,
    workers: int = 2,
    gpus_per_worker: int = 1,
    procs_per_worker: int = 0,
    backend: str = "kubernetes",
    training_api: str = "pytorchjob",
    run_name: str = "",
    model_name: str = "bincount",
    deploy_threshold: float = 0.5,
    gate_mae_margin: float = 0.02,
    gate_balanced_accuracy_margin: float = 0.0,
    gate_confidence: float = 0.95,
    canary_percent: int = 0,
) -> Outputs:
    """Count the items in a warehouse bin from one photo: ABID data, Katib tuning, DDP training (a PyTorchJob or a
    Kubeflow Trainer v2 TrainJob), evaluation on the test split, KServe serving.

    Args:
        source: abid (the Amazon Bin Image Dataset, or a mirror of it) or synthetic (generated bins).
        images: How many images to download or generate; abid without a file list takes them balanced over
            1-5 items.
        file_list: abid: a file_list.json (path or s3:// URI) to take the images from instead of a scan.
        source_endpoint: abid: host:port of a mirror instead of AWS.
        source_bucket: abid: the bucket holding bin-images/ and metadata/.
        store: Where data and models live: s3://bucket[/prefix] or a local path.
        dataset: Name of the prepared dataset (datasets/NAME/ in the store).
        balance: none (every image; the recipes weight the classes instead), undersample or oversample.
        split: Train, validation and test fractions.
        seed: Seed of the synthetic images and of the split.
        space: Search space: one packaged with bincount (tuning.yaml, the seed's search; quickstart.yaml) or
            a tuning.yaml path the step can read. The pipeline sets its trials' model, epochs and resources.
        recipe: Training recipe: abid (real photos: ImageNet-pretrained EfficientNet-Lite, fine-tuned) or
            quickstart (synthetic bins, resnet18 from scratch); the parameters below override it.
        arch: Model, e.g. efficientnet_lite0/1/2, resnet18, resnet50; empty: the recipe's.
        weights: imagenet, DEFAULT (torchvision's, downloaded), none, or a state dict file or s3:// URI; empty:
            the recipe's.
        freeze: backbone (trains the head on cached features), none (full fine-tune) or a stage name; empty:
            the recipe's.
        image_size: Input size in pixels (the photo is stretched to a square); 0: the recipe's.
        shard_min_images: Pack the splits into shards streamed to every rank from this many training images
            on; smaller datasets go through each node's image cache.
        trials: Hyperparameter trials.
        parallel_trials: Trials run at once.
        trial_epochs: Epochs of each trial.
        epochs: Epochs of the final training; 0: the recipe's.
        workers: Pods (nodes) of each training job and trial; one node locally.
        gpus_per_worker: GPUs per pod; 0 trains on CPU.
        procs_per_worker: DDP processes per pod; 0: one per GPU, or one without GPUs.
        backend: kubernetes (a training job, Katib, KServe) or local (torchrun, optuna, a ModelServer process).
        training_api: kubernetes: pytorchjob (Kubeflow Training Operator v1) or trainjob (Kubeflow Trainer v2, the
            torch-distributed runtime) for the training job and the Katib trials.
        run_name: Name of the training run, model and search; empty: derived from the pipeline run's id.
        model_name: The endpoint: its model name (/v1/models/NAME:predict), InferenceService and record
            (serving/NAME.json).
        deploy_threshold: Deploy only when the test accuracy reaches it (the gate's first rule).
        gate_mae_margin: The gate: the new model's MAE may exceed the champion's by at most this, at the upper end
            of the interval.
        gate_balanced_accuracy_margin: The gate: the new model's balanced accuracy may trail the champion's by at
            most this.
        gate_confidence: The gate: the confidence of its bootstrap intervals.
        canary_percent: 0 deploys a model that passes the gate outright; 1-99 puts it on canary beside the champion
            (then `bincount deploy promote` or `rollback`).
    """
    fetched = _on_cluster(c.download(source=source, store=store, images=images, file_list=file_list,
                                     source_endpoint=source_endpoint, source_bucket=source_bucket, seed=seed), WORKING)
    prepared = _on_cluster(c.prepare(raw=fetched.outputs["raw"], name=dataset, balance=balance, split=split,
                                     seed=seed), WORKING)
    sharded = _on_cluster(c.shard(splits=prepared.outputs["splits"], recipe=recipe, image_size=image_size,
                                  min_images=shard_min_images), WORKING)
    sizes = {"workers": workers, "gpus_per_worker": gpus_per_worker, "procs_per_worker": procs_per_worker}
    runs = {"backend": backend, "training_api": training_api, "run_name": run_name,
            "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
    searched = _on_cluster(c.tune(splits=prepared.outputs["splits"], space=space, recipe=recipe, arch=arch,
                                  weights=weights, freeze=freeze, image_size=image_size, trial_epochs=trial_epochs,
                                  trials=trials, parallel_trials=parallel_trials, **runs, **sizes),
                           LAUNCHING).after(sharded)
    trained = _on_cluster(c.train(splits=prepared.outputs["splits"], best=searched.outputs["best"], epochs=epochs,
                                  **runs, **sizes), LAUNCHING)
    evaluated = _on_cluster(c.evaluate(splits=prepared.outputs["splits"], model=trained.outputs["model"]), WORKING)
    gated = _on_cluster(c.gate(splits=prepared.outputs["splits"], model=trained.outputs["model"], endpoint=model_name,
                               accuracy=evaluated.outputs["Output"], deploy_threshold=deploy_threshold,
                               mae_margin=gate_mae_margin, balanced_accuracy_margin=gate_balanced_accuracy_margin,
                               confidence=gate_confidence), WORKING)
    with dsl.If(gated.outputs["passed"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition, not Python's)
        deployed = _on_cluster(c.deploy(model=trained.outputs["model"], backend=backend, name=model_name,
                                        decision=gated.outputs["decision"], canary_percent=canary_percent), LAUNCHING)
    with dsl.Else(name="gate-refused"):
        skipped = _on_cluster(c.skip_deploy(decision=gated.outputs["decision"]), LAUNCHING)
    return Outputs(splits=prepared.outputs["splits"], eda=prepared.outputs["eda_html"],
                   best=searched.outputs["best"], model=trained.outputs["model"],
                   test_metrics=evaluated.outputs["test_metrics"],
                   confusion_matrix=evaluated.outputs["confusion_matrix"], gate=gated.outputs["gate_report"],
                   deployment=dsl.OneOf(deployed.output, skipped.output))


AUDIT_NAME = "bin-audit"
AuditOutputs = NamedTuple("AuditOutputs", [("report", HTML), ("summary", Metrics), ("flagged", int)])


@dsl.pipeline(name=AUDIT_NAME)
def bin_audit(
    store: str = CLUSTER.store,
    model: str = "bincount-train",
    dataset: str = "",
    split: str = "",
    ids: str = "",
    all_images: bool = True,
    after: str = "",
    modified_after: str = "",
    expected: str = "metadata",
    name: str = "audit-{date}",
    shard_size: int = 512,
    workers: int = 4,
    backend: str = "kubernetes",
    review: int = 0,
    threshold: float = 0.0,
    target_precision: float = 0.5,
    error_rate: float = 0.0,
    top: int = 50,
) -> AuditOutputs:
    """Count the bins in the store with a trained model and rank them by how likely their expected quantity is
    wrong (p_mismatch = 1 - P(count = expected)).

    Args:
        store: Where the photos (raw/), the model and the audit (audits/NAME/) live.
        model: A run name under the store (models/RUN) or a model URI.
        dataset: With split: audit one split of a prepared dataset.
        split: train, val or test.
        ids: Comma-separated bin ids (strings: 221 and 00221 differ).
        all_images: Every photo under raw/bin-images/ (when neither dataset nor ids is given).
        after: With all_images: only keys that sort after this one.
        modified_after: With all_images: only photos written after this ISO 8601 time or in the last 24h, 7d, ...
        expected: metadata (ABID's EXPECTED_QUANTITY) or an s3:// CSV with header key,expected.
        name: The audit's name; {date} becomes the UTC date. A retried run resumes it.
        shard_size: Bins per result shard, the unit of resumption.
        workers: Worker processes (local) or pods of the indexed Job (kubernetes).
        backend: kubernetes (an indexed Job) or local (processes in the step).
        review: Flag this many bins, the most likely wrong (0: by threshold or target_precision).
        threshold: Flag the bins whose p_mismatch is at least this (0: by target_precision).
        target_precision: Flag the most likely wrong bins, as many as keep their expected precision at this.
        error_rate: The share of wrong expected quantities (0: estimated from the audit).
        top: Bins shown with their photos in the report.
    """
    planned = _on_cluster(c.audit_plan(store=store, model=model, dataset=dataset, split=split, ids=ids,
                                       all_images=all_images, after=after, modified_after=modified_after,
                                       expected=expected, name=name, shard_size=shard_size), WORKING)
    counted = _on_cluster(c.audit_count(store=store, name=planned.output, backend=backend, workers=workers),
                          WORKING)
    reported = _on_cluster(c.audit_report(store=store, name=counted.output, review=review, threshold=threshold,
                                          target_precision=target_precision, error_rate=error_rate, top=top), WORKING)
    return AuditOutputs(report=reported.outputs["report"], summary=reported.outputs["summary"],
                        flagged=reported.outputs["Output"])


MONITOR_NAME = "bin-monitor"
MonitorOutputs = NamedTuple("MonitorOutputs", [("report", HTML), ("summary", Metrics), ("drifted", bool)])


@dsl.pipeline(name=MONITOR_NAME)
def bin_monitor(
    store: str = CLUSTER.store,
    endpoint: str = "bincount",
    reference: str = "abid",
    split: str = "train",
    since: str = "1d",
    psi_threshold: float = 0.25,
    min_records: int = 100,
) -> MonitorOutputs:
    """The drift report of an endpoint: what its prediction log says it was asked and answered against the split
    its models were built on; the run fails when a feature drifted, so a recurring run alerts.

    Args:
        store: Where the prediction log (predictions/ENDPOINT/) and the reference dataset live.
        endpoint: The endpoint whose log is read.
        reference: The dataset the endpoint's models were built on.
        split: Its reference split.
        since: The window: the last 30m, 24h, 1d, 7d, or from an ISO 8601 time.
        psi_threshold: A population stability index above it is drift.
        min_records: Fewer values than this are not judged.
    """
    checked = _on_cluster(c.monitor(store=store, endpoint=endpoint, reference=reference, split=split, since=since,
                                    psi_threshold=psi_threshold, min_records=min_records), WORKING)
    with dsl.If(checked.outputs["drifted"] == True, name="drifted"):  # noqa: E712 (a KFP condition)
        _on_cluster(c.drift_alert(decision=checked.outputs["decision"]), LAUNCHING)
    return MonitorOutputs(report=checked.outputs["report"], summary=checked.outputs["summary"],
                          drifted=checked.outputs["drifted"])


PIPELINES = {"bin_counting": bin_counting, "bin_audit": bin_audit, "bin_monitor": bin_monitor}
