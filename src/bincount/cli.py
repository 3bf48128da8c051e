"""The `bincount` command: one subcommand group per stage, each a thin adapter over a library function.

Every failure the user can act on is a `BincountError`; it is printed as one line on stderr with exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from bincount.backends import BACKENDS, get_backend
from bincount.config import (TRAINING_APIS, AuditConfig, ClusterConfig, CompareConfig, DeployConfig, DownloadConfig,
                             EdaConfig, EvaluateConfig, GateRule, JobResources, MonitorConfig, PrepareConfig,
                             ServeConfig, ShardConfig, SyntheticConfig, TrainJob, TuneJob, load_config)
from bincount.errors import ALERT_EXIT, BincountError, exit_status
from bincount.train import entry as train_entry

Handler = Callable[[argparse.Namespace], None]


def _options(args: argparse.Namespace, *names: str) -> dict:
    return {name: getattr(args, name) for name in names}


def cmd_synthetic(args: argparse.Namespace) -> None:
    from bincount.data.synthetic import generate

    cfg = load_config(SyntheticConfig, args.config, _options(
        args, "dest", "n", "seed", "workers", "min_count", "max_count", "width", "height"))
    print(generate(cfg).summary())


def cmd_download(args: argparse.Namespace) -> None:
    from bincount.data.abid import download

    cfg = load_config(DownloadConfig, args.config, _options(
        args, "dest", "file_list", "ids", "quantities", "limit", "per_class", "source_endpoint",
        "source_bucket", "source_prefix", "source_region", "source_secure", "workers"))
    summary = download(cfg)
    print(summary.report())
    if summary.failed:
        raise BincountError(f"{summary.failed} pair(s) could not be copied; rerun to retry them")


def cmd_prepare(args: argparse.Namespace) -> None:
    from bincount.data.prepare import prepare

    cfg = load_config(PrepareConfig, args.config, _options(
        args, "store", "name", "balance", "split", "seed", "classes", "workers"))
    print(prepare(cfg).summary())


def cmd_shard(args: argparse.Namespace) -> None:
    from bincount.data.shards import pack

    cfg = load_config(ShardConfig, args.config, _options(
        args, "store", "name", "image_size", "quality", "eval_encoding", "shard_samples", "splits", "seed", "workers"))
    print(pack(cfg).summary())


def cmd_eda(args: argparse.Namespace) -> None:
    from bincount.data.eda import build_report

    cfg = load_config(EdaConfig, args.config, _options(args, "store", "name", "samples_per_class", "workers"))
    print(build_report(cfg).summary())


def cmd_train(args: argparse.Namespace) -> int | None:
    """Locally, the trainer's own entry in this process (torchrun and the local tuner run it too, with the same
    arguments); on a cluster, a training job that runs it under torchrun on every node."""
    parser = argparse.ArgumentParser(prog="bincount train", description=train_entry.DESCRIPTION,
                                     parents=[train_entry.parser(add_help=False), _where_to_train()])
    parser.parse_args(args.params)              # --help shows both; a bad flag stops here, before any launch
    where, trainer_argv = _where_to_train().parse_known_args(args.params)
    sizes = {"nodes": where.nodes, "procs-per-node": where.procs_per_node, "gpus-per-node": where.gpus_per_node}
    if where.backend == "local":
        given = [f"--{flag}" for flag, value in sizes.items() if value is not None]
        if given:
            raise BincountError(f"{', '.join(given)} size a cluster's training job: add --backend kubernetes, or "
                                "run this command under torchrun for several processes here")
        return train_entry.main(trainer_argv)
    cfg = train_entry.config(train_entry.parser().parse_args(trainer_argv))
    resources = JobResources.sized(where.nodes or 1, where.gpus_per_node or 0, where.procs_per_node or 0)
    backend = get_backend(where.backend, ClusterConfig(training_api=where.training_api))
    outcome = backend.train(TrainJob(cfg, resources, timeout=where.timeout, poll=where.poll))
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in outcome.metrics.items() if k.startswith("val_"))
    print(f"trained {outcome.run}: model {outcome.model}" + (f" ({metrics})" if metrics else ""))
    return None


def _where_to_train() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)     # the trainer's flags pass through whole
    where = p.add_argument_group("where to train")
    where.add_argument("--backend", choices=list(BACKENDS), default="local",
                       help="local: this process (the default; under torchrun, every process); kubernetes: a "
                            "training job on the cluster (the store must be s3://), followed to its end")
    where.add_argument("--training-api", choices=TRAINING_APIS, default=ClusterConfig.training_api,
                       help="kubernetes: pytorchjob (Kubeflow Training Operator, the default) or trainjob "
                            "(Kubeflow Trainer v2, the torch-distributed runtime)")
    where.add_argument("--nodes", type=int, help="kubernetes: pods of the job (default 1)")
    where.add_argument("--gpus-per-node", type=int, help="kubernetes: GPUs per pod (default 0)")
    where.add_argument("--procs-per-node", type=int, help="kubernetes: DDP processes per pod (default: one per GPU, "
                       "or one)")
    where.add_argument("--timeout", type=float, default=0.0, help="kubernetes: seconds to follow the job "
                       "(default: to its end)")
    where.add_argument("--poll", type=float, default=10.0, help="kubernetes: seconds between status reads "
                       "(default 10)")
    return p


def cmd_evaluate(args: argparse.Namespace) -> None:
    from bincount.evaluate import evaluate

    cfg = load_config(EvaluateConfig, args.config, _options(
        args, "store", "model", "dataset", "split", "out", "batch_size", "workers", "cache_dir", "data", "device",
        "precision"))
    print(evaluate(cfg).summary())


def cmd_audit(args: argparse.Namespace) -> None:
    from bincount.audit import audit

    cfg = load_config(AuditConfig, args.config, _options(
        args, "store", "model", "name", "dataset", "split", "ids", "all", "after", "modified_after", "expected",
        "shard_size", "workers", "batch_size", "threads", "device", "precision", "review", "threshold", "target_precision",
        "error_rate", "top", "timeout", "poll"))
    print(audit(cfg, get_backend(args.backend)).line())


def cmd_audit_worker(args: argparse.Namespace) -> None:
    """One worker of a running audit: a local backend's process, or a pod of the indexed Job."""
    from bincount.audit.worker import run_worker

    index = args.index if args.index is not None else os.environ.get(
        "JOB_COMPLETION_INDEX", "0" if args.count == 1 else None)
    if index is None or not str(index).isdigit() or not 0 <= int(index) < args.count:
        raise BincountError(f"audit worker: the index (--index or JOB_COMPLETION_INDEX) must be 0..{args.count - 1}, "
                            f"got {index!r}")
    cfg = AuditConfig(store=args.store, model="", batch_size=args.batch_size, threads=args.threads, device=args.device)
    written = run_worker(cfg, args.name, int(index), args.count)
    print(f"audit {args.name} worker {index} of {args.count}: {written} shard(s) written", file=sys.stderr)


def cmd_tune(args: argparse.Namespace) -> None:
    job = load_config(TuneJob, args.config, _options(
        args, "store", "dataset", "space", "experiment", "workdir", "timeout", "poll"))
    result = get_backend(args.backend, ClusterConfig(training_api=args.training_api)).tune(job)
    print(result.table())
    print(result.summary())


def cmd_tune_render(args: argparse.Namespace) -> None:
    from bincount.k8s.manifests import DATASET, dump
    from bincount.k8s.resources import as_dict
    from bincount.tune.space import load_space

    space = load_space(args.space)
    cluster = ClusterConfig(training_api=args.training_api)
    print(dump([as_dict(space.render(args.experiment or space.name, args.store or cluster.store,
                                     args.dataset or DATASET, cluster))]), end="")


def cmd_serve(args: argparse.Namespace) -> None:
    from bincount.serve.predictor import serve

    serve(load_config(ServeConfig, args.config, _options(
        args, "model", "port", "host", "name", "precision", "device", "threads", "max_batch", "max_body_bytes", "max_pixels",
        "url_hosts", "url_timeout", "url_max_bytes", "url_max_redirects", "unsafe_url_addresses", "version", "canary",
        "canary_percent", "canary_version", "endpoint", "log_store", "log_batch", "log_flush_s", "log_queue")))


def cmd_model_list(args: argparse.Namespace) -> None:
    from bincount.rollout.registry import SHOWN_METRICS, list_models
    from bincount.store import open_store

    rows = list_models(open_store(args.store))
    if not rows:
        raise BincountError(f"no exported models under {args.store}/models/")

    def cells(metrics: dict) -> list[str]:
        return [f"{metrics[k]:.4f}" if k in metrics else "-" for k in SHOWN_METRICS]

    header = ["run", "arch", "dataset", "val acc", "val bal acc", "val MAE", "test acc", "test bal acc", "test MAE",
              "role"]
    table = [header] + [[r.run, r.arch, r.dataset, *cells(r.validation), *cells(r.test), "; ".join(r.roles) or "-"]
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_model_compare(args: argparse.Namespace) -> int:
    """Exit 0 when the challenger passes the gate, 2 when the rule refuses it."""
    import dataclasses

    from bincount.rollout.gate import compare

    cfg = load_config(CompareConfig, args.config, _options(
        args, "store", "champion", "challenger", "dataset", "split", "out", "batch_size", "workers", "cache_dir",
        "data", "device", "precision"))
    rule = {name: getattr(args, name) for name in (f.name for f in dataclasses.fields(GateRule))
            if getattr(args, name, None) is not None}
    result = compare(dataclasses.replace(cfg, rule=dataclasses.replace(cfg.rule, **rule)))
    print(result.line())
    return 0 if result.passed else ALERT_EXIT


def cmd_deploy(args: argparse.Namespace) -> None:
    from bincount.rollout import deploy

    step = {None: deploy.deploy, "promote": deploy.promote, "rollback": deploy.rollback}[args.command]
    cfg = load_config(DeployConfig, args.config, _options(
        args, "store", "endpoint", "model", "canary", "reason", "log", "port", "logger_url", "logger_mode", "timeout"))
    if args.command and cfg.model:
        raise BincountError(f"deploy {args.command} takes no --model: it acts on the endpoint's challenger or former "
                            "champion")
    print(step(cfg, get_backend(args.backend), args.backend).line())


def cmd_monitor(args: argparse.Namespace) -> int:
    """Exit 2 when a feature drifted over its threshold, so a CronJob or a scheduled run can alert."""
    from bincount.rollout.monitor import monitor

    result = monitor(load_config(MonitorConfig, args.config, _options(
        args, "store", "endpoint", "reference", "split", "since", "until", "out", "psi_threshold", "min_records",
        "significance", "bins", "workers")))
    print(result.line())
    return result.exit_code


def cmd_manifests_render(args: argparse.Namespace) -> None:
    from pathlib import Path

    from bincount.k8s.manifests import drift, write

    _generate(Path(args.out), args.check, drift, write, "the manifests", f"bincount manifests render --out {args.out}")


def cmd_pipeline_run(args: argparse.Namespace) -> None:
    from bincount.kfp import local_run

    parser = _pipeline_parser("bincount pipeline run", "run the pipeline on this machine with kfp.local "
                              "(defaults: the quick start)", local_run.parameters())
    parser.add_argument("--pipeline-root", default=local_run.PIPELINE_ROOT,
                        help=f"where kfp.local keeps each step's artifacts (default {local_run.PIPELINE_ROOT})")
    parser.add_argument("--verbose", action="store_true", help="show all of kfp.local's output as it runs (each "
                        f"step's executor input and outputs); it always goes to {local_run.LOG_FILE} in the run's "
                        "folder")
    options = vars(parser.parse_args(args.params))
    root, verbose = options.pop("pipeline_root"), options.pop("verbose")
    print(local_run.run(options, root, verbose).summary())


def cmd_pipeline_compile(args: argparse.Namespace) -> None:
    from pathlib import Path

    from bincount.kfp.compile import drift, write

    _generate(Path(args.root), args.check, drift, write, "the compiled pipeline and components",
              f"bincount pipeline compile --root {args.root}")


def _generate(root, check: bool, drift: Callable, write: Callable, what: str, command: str) -> None:
    """Files generated from Python under `root`: write what changed, or (`check`) fail when any is stale."""
    if check:
        stale = drift(root)
        if stale:
            raise BincountError(f"{what} under {root} differ from their source ({'; '.join(stale)}); "
                                f"run `{command}`")
        print(f"{what} under {root} are current")
    else:
        print(f"wrote {what} under {root}: {len(write(root))} file(s) changed")


def cmd_pipeline_submit(args: argparse.Namespace) -> None:
    from bincount.config import ClusterConfig
    from bincount.kfp.pipeline import PIPELINES
    from bincount.kfp.submit import submit

    cluster = ClusterConfig()
    names = list(PIPELINES)
    which = argparse.ArgumentParser(prog="bincount pipeline submit", add_help=False)
    which.add_argument("--pipeline", choices=names, default=names[0])
    pipeline = which.parse_known_args(args.params)[0].pipeline
    parser = _pipeline_parser("bincount pipeline submit", f"submit the {pipeline} pipeline to a Kubeflow Pipelines "
                              "server (parameters not given keep the compiled defaults)", None, pipeline)
    parser.add_argument("--pipeline", choices=names, default=names[0],
                        help="bin_counting (data to endpoint), bin_audit (count a bucket against its records) or "
                             "bin_monitor (an endpoint's drift report; the run fails on drift); with --package: "
                             "which one the file holds. The parameter flags are the chosen pipeline's")
    parser.add_argument("--host", required=True, help="the KFP API server, e.g. http://localhost:8080 "
                        "(kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80)")
    parser.add_argument("--package", help="a compiled pipeline YAML (default: compile this version's pipeline)")
    parser.add_argument("--experiment", default="bincount", help="KFP experiment (default bincount)")
    parser.add_argument("--display-name", help="the KFP run's name (default: the pipeline's name and the time; "
                        "with --schedule: PIPELINE-scheduled)")
    parser.add_argument("--schedule", type=_cron, help="a recurring run instead of one run, on this cron schedule "
                        "('0 2 * * *': nightly at 02:00 UTC; 6 fields: seconds first), never two at once and no "
                        "catching up after a pause")
    parser.add_argument("--namespace", default=cluster.namespace,
                        help=f"namespace (Kubeflow profile) to run in (default {cluster.namespace})")
    parser.add_argument("--service-account", default=cluster.pipeline_service_account,
                        help=f"service account of the steps (default {cluster.pipeline_service_account}, "
                             "which manifests/base allows to create PyTorchJobs, TrainJobs, Experiments, "
                             "InferenceServices and Jobs)")
    options = vars(parser.parse_args(args.params))
    own = {k: options.pop(k) for k in ("host", "package", "pipeline", "experiment", "namespace", "service_account",
                                       "schedule")}
    display_name = options.pop("display_name")
    arguments = {k: v for k, v in options.items() if v is not None}
    print(submit(arguments=arguments, run_name=display_name, **own))


def _pipeline_parser(prog: str, description: str, defaults: dict | None,
                     pipeline: str = "bin_counting") -> argparse.ArgumentParser:
    """One flag per pipeline parameter, read from the pipeline itself (kfp loads only when a pipeline command
    runs). `defaults` None leaves unset flags out, so the compiled defaults apply."""
    from bincount.kfp.pipeline import PIPELINES

    parser = argparse.ArgumentParser(prog=prog, description=description)
    params = parser.add_argument_group(f"{pipeline} parameters")
    kinds = {"Integer": int, "Float": float, "String": str, "Boolean": _boolean}
    for name, spec in PIPELINES[pipeline].component_spec.inputs.items():
        default = None if defaults is None else defaults[name]
        help_text = " ".join((spec.description or "").split())
        shown = "" if default is None else f" (default: {default!r})"
        params.add_argument("--" + name.replace("_", "-"), dest=name, type=kinds[spec.type], default=default,
                            help=help_text + shown)
    return parser


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def _cron(text: str) -> str:
    from bincount.kfp.submit import cron_expression

    try:
        return cron_expression(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _quantity_range(text: str) -> str:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit() or int(lo) > int(hi):
        raise argparse.ArgumentTypeError(f"expected a range like 1-5, got {text!r}")
    return f"{int(lo)},{int(hi)}"


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 1-65535, got {text!r}")
    return int(text)


def _ids(values: list[str]) -> list[str]:
    """Ids from the command line: space- or comma-separated; `@file` reads one id per line."""
    out: list[str] = []
    for value in values:
        if value.startswith("@"):
            try:
                with open(value[1:]) as f:
                    out.extend(line.strip() for line in f if line.strip())
            except OSError as e:
                raise BincountError(f"cannot read id file {value[1:]}: {e.strerror}") from None
        else:
            out.extend(v for v in value.split(",") if v)
    return out


def _add_scoring(p: argparse.ArgumentParser) -> None:
    """How a model counts a split's photos (EvaluateConfig's keys): evaluate and the promotion gate read alike."""
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--cache-dir", help="node-local image cache")
    p.add_argument("--data", choices=["auto", "shards", "cache"], help="read the split from its shards or through "
                   "the image cache (default auto: shards where packed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "fp16"],
                   help="default auto: bf16 where fast, as `bincount serve` does")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the same keys as the flags; flags override it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bincount", description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", required=True, metavar="{data,train,evaluate,audit,tune,serve,model,deploy,monitor,pipeline,manifests}")

    data = groups.add_parser("data", help="get, prepare and explore bin images")
    data_cmds = data.add_subparsers(dest="command", required=True)

    p = data_cmds.add_parser("synthetic", help="generate synthetic bin photos in the ABID layout")
    p.add_argument("--dest", help="store root (local path or s3://bucket[/prefix]); writes under raw/")
    p.add_argument("--n", type=int, help="number of images (default 500)")
    p.add_argument("--seed", type=int, help="random seed; the same seed gives the same images")
    p.add_argument("--workers", type=int, help="processes to generate with (default 1)")
    p.add_argument("--min-count", type=int, help="fewest items in a bin (default 1)")
    p.add_argument("--max-count", type=int, help="most items in a bin (default 5)")
    p.add_argument("--width", help="image width range in px, LO,HI (default 400,560)")
    p.add_argument("--height", help="image height range in px, LO,HI (default 300,500)")
    _add_config(p)
    p.set_defaults(func=cmd_synthetic)

    p = data_cmds.add_parser("download", help="copy ABID image+metadata pairs into the store")
    p.add_argument("--dest", help="store root (local path or s3://bucket[/prefix]); writes under raw/")
    sel = p.add_argument_group("selection (one of)")
    sel.add_argument("--file-list", help="file_list.json (local path or s3:// URI): {class: [metadata paths]}")
    sel.add_argument("--ids", nargs="+", help="bin ids (strings: 221 and 00221 differ); @FILE reads one per line")
    sel.add_argument("--quantities", type=_quantity_range, help="scan metadata for EXPECTED_QUANTITY in LO-HI")
    p.add_argument("--limit", type=int, help="stop after this many pairs")
    p.add_argument("--per-class", type=int, help="with --quantities: at most this many pairs per quantity")
    p.add_argument("--source-endpoint", help="S3 endpoint host:port of the ABID source or a mirror")
    p.add_argument("--source-bucket", help="source bucket (default aft-vbi-pds)")
    p.add_argument("--source-prefix", help="prefix above bin-images/ and metadata/ in the source bucket")
    p.add_argument("--source-region", help="source region (default us-east-1)")
    p.add_argument("--source-secure", choices=["0", "1"], help="1 for https (default: https for AWS only)")
    p.add_argument("--workers", type=int, help="parallel copies (default 16)")
    _add_config(p)
    p.set_defaults(func=cmd_download)

    p = data_cmds.add_parser("prepare", help="label, balance and split raw/ into datasets/NAME/")
    p.add_argument("--store", help="store root holding raw/")
    p.add_argument("--name", help="dataset name")
    p.add_argument("--balance", choices=["undersample", "oversample", "none"])
    p.add_argument("--split", help="train,val,test fractions (default 0.7,0.2,0.1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--classes", help="comma-separated item counts to keep (default 1,2,3,4,5)")
    p.add_argument("--workers", type=int, help="parallel reads (default 16)")
    _add_config(p)
    p.set_defaults(func=cmd_prepare)

    p = data_cmds.add_parser("shard", help="pack a prepared dataset into shards that training streams from the "
                             "store → datasets/NAME/shards/")
    p.add_argument("--store", help="store root holding datasets/NAME/")
    p.add_argument("--name", help="dataset name")
    p.add_argument("--image-size", type=int, help="size of the squares in px: the training size (default 224)")
    p.add_argument("--quality", type=int, help="JPEG quality of the train split (default 95)")
    p.add_argument("--eval-encoding", choices=["png", "jpeg"], help="val/test images: png (lossless, default) or "
                   "jpeg")
    p.add_argument("--shard-samples", type=int, help="samples per shard (default 2000)")
    p.add_argument("--splits", help="comma-separated splits to pack (default train,val,test)")
    p.add_argument("--seed", type=int, help="the order of samples in the shards (default 0)")
    p.add_argument("--workers", type=int, help="threads reading and encoding photos (default 8)")
    _add_config(p)
    p.set_defaults(func=cmd_shard)

    p = data_cmds.add_parser("eda", help="plots and report of a prepared dataset → reports/NAME/eda/")
    p.add_argument("--store", help="store root")
    p.add_argument("--name", help="dataset name")
    p.add_argument("--samples-per-class", type=int, help="sample images per class in the grid (default 6)")
    p.add_argument("--workers", type=int, help="parallel reads (default 16)")
    _add_config(p)
    p.set_defaults(func=cmd_eda)

    p = groups.add_parser("train", help=f"{train_entry.DESCRIPTION}; see --help", add_help=False)
    p.set_defaults(func=cmd_train, params=[])

    p = groups.add_parser("evaluate", help="test metrics and confusion matrix of an exported model")
    p.add_argument("--store", help="store root holding datasets/NAME/")
    p.add_argument("--model", help="a run name (RUN or models/RUN) under --store, a model directory, or a store URI")
    p.add_argument("--dataset", help="dataset name")
    p.add_argument("--split", help="split to evaluate (default test)")
    p.add_argument("--out", help="output directory or store URI for metrics.json and the confusion matrix")
    _add_scoring(p)
    _add_config(p)
    p.set_defaults(func=cmd_evaluate)

    p = groups.add_parser("audit", help="count bins in the store and rank them by how likely their expected "
                          "quantity is wrong → audits/NAME/")
    p.add_argument("--store", help="store root holding raw/ (and datasets/NAME/); results go to audits/NAME/")
    p.add_argument("--model", help="a run name (RUN or models/RUN) under --store, a model directory, or a store URI")
    sel = p.add_argument_group("bins (one of)")
    sel.add_argument("--dataset", help="dataset name, with --split")
    sel.add_argument("--split", help="split of --dataset (train, val, test)")
    sel.add_argument("--ids", nargs="+", help="bin ids (strings: 221 and 00221 differ); @FILE reads one per line")
    sel.add_argument("--all", action="store_true", default=None, help="every image under raw/bin-images/")
    sel.add_argument("--after", help="with --all: only keys that sort after this one")
    sel.add_argument("--modified-after", help="with --all: only images written after this ISO 8601 time, or "
                     "in the last AGE (24h, 7d)")
    p.add_argument("--expected", help="metadata (ABID's EXPECTED_QUANTITY, the default) or a CSV file with header "
                   "key,expected")
    p.add_argument("--name", help="audit name (default audit-MODEL; {date} becomes today's UTC date); rerun the "
                   "same name to resume")
    p.add_argument("--backend", choices=list(BACKENDS), default="local",
                   help="local: worker processes here; kubernetes: an indexed Job, one pod per worker")
    p.add_argument("--workers", type=int, help="worker processes (local) or pods (kubernetes) (default 1)")
    p.add_argument("--shard-size", type=int, help="bins per result shard, the unit of resumption (default 512)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default 32)")
    p.add_argument("--threads", type=int, help="decoding threads per worker (default 16)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "fp16"],
                   help="default auto: bf16 where fast, as `bincount serve` does")
    p.add_argument("--review", type=int, metavar="N", help="flag the N bins most likely wrong (what a team can "
                   "check); overrides --threshold and --target-precision")
    p.add_argument("--target-precision", type=float, metavar="P",
                   help="flag the bins most likely wrong, as many as keep their expected precision at P or above "
                   "(the default, at 0.5)")
    p.add_argument("--threshold", type=float, help="flag the bins whose p_mismatch is at or above this")
    p.add_argument("--error-rate", type=float, help="the share of expected quantities that are wrong (e.g. from "
                   "the last cycle count); default: estimated from the audit")
    p.add_argument("--top", type=int, help="bins shown with photos in the report (default 50)")
    p.add_argument("--timeout", type=float, help="kubernetes: seconds to follow the Job (default: to the end)")
    p.add_argument("--poll", type=float, help="kubernetes: seconds between status reads (default 10)")
    _add_config(p)
    p.set_defaults(func=cmd_audit)
    audit_cmds = p.add_subparsers(dest="command")
    w = audit_cmds.add_parser("worker", help="one worker of a planned audit (what the local backend's processes "
                              "and the indexed Job's pods run)")
    w.add_argument("--store", required=True)
    w.add_argument("--name", required=True, help="the audit's name")
    w.add_argument("--count", type=int, default=1, help="workers in all (default 1)")
    w.add_argument("--index", type=int, help="this worker, 0..count-1 (default: $JOB_COMPLETION_INDEX, or 0 "
                   "with --count 1)")
    w.add_argument("--batch-size", type=int, default=32)
    w.add_argument("--threads", type=int, default=16)
    w.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    w.set_defaults(func=cmd_audit_worker)

    p = groups.add_parser("tune", help="hyperparameter search from one tuning.yaml: optuna locally, Katib on a "
                          "cluster; `tune render` prints the Katib Experiment")
    p.add_argument("--store", help="store root holding datasets/NAME/; outputs go to tuning/EXPERIMENT/")
    p.add_argument("--dataset", help="dataset name (tuning reads its train and val splits, never test)")
    p.add_argument("--space", help="search space YAML (default: the tuning.yaml packaged with bincount)")
    p.add_argument("--backend", choices=list(BACKENDS), default="local",
                   help="local: an optuna study running torchrun trials; kubernetes: a Katib Experiment")
    p.add_argument("--experiment", help="experiment name (default: the space's name); rerun it to resume")
    p.add_argument("--training-api", choices=TRAINING_APIS, default=ClusterConfig.training_api,
                   help="kubernetes: the trials' training job, pytorchjob (the default) or trainjob (Trainer v2)")
    p.add_argument("--workdir", help="local: the study's working copy and trial logs")
    p.add_argument("--timeout", type=float, help="kubernetes: seconds to follow the Experiment (default: to the end)")
    p.add_argument("--poll", type=float, help="kubernetes: seconds between status reads (default 10)")
    _add_config(p)
    p.set_defaults(func=cmd_tune)
    tune_cmds = p.add_subparsers(dest="command")
    r = tune_cmds.add_parser("render", help="print the Katib Experiment YAML (for kubectl apply or the Katib UI)")
    for name, help_text in (("--space", "search space YAML (default: the packaged tuning.yaml)"),
                            ("--experiment", "Experiment name (default: the space's name)"),
                            ("--store", "store the trials use (default: the cluster's MinIO, s3://bincount)"),
                            ("--dataset", "dataset the trials train on (default: abid)"),
                            ("--training-api", "the trials' training job: pytorchjob (the default) or trainjob")):
        r.add_argument(name, default=argparse.SUPPRESS, help=help_text)
    r.set_defaults(func=cmd_tune_render)

    p = groups.add_parser("serve", help="serve an exported model with kserve's ModelServer (V1 + V2, upload page)")
    p.add_argument("--model", help="model directory (KServe mounts /mnt/models) or store URI")
    p.add_argument("--port", type=_port, help="HTTP port, 1-65535 (default 8080)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every "
                   "interface, as in the serving image)")
    p.add_argument("--name", help="model name in the endpoint paths (default bincount)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "fp16"], help="default auto: bf16 where fast")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch threads for inference (default: torch's choice)")
    p.add_argument("--max-batch", type=int, help="images per request and per forward pass (default 32)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 16 MiB)")
    p.add_argument("--max-pixels", type=int, help="largest image, width × height (default 24,000,000)")
    p.add_argument("--allow-url-host", action="append", dest="url_hosts", metavar="HOST",
                   help="fetch images by URL from HOST (*.example.com: its subdomains); repeatable; "
                        "without it fetching by URL is off")
    p.add_argument("--url-timeout", type=float, help="seconds for a whole fetch (default 5)")
    p.add_argument("--url-max-bytes", type=int, help="largest fetched image (default 10 MiB)")
    p.add_argument("--url-max-redirects", type=int, help="redirects followed, each one checked (default 3)")
    p.add_argument("--unsafe-allow-url-address", action="append", dest="unsafe_url_addresses", metavar="IP:PORT",
                   help="UNSAFE, for tests only: let fetches reach this private or loopback address")
    p.add_argument("--version", help="the model version every answer names (default: the run in model.json)")
    p.add_argument("--canary", metavar="MODEL", help="a second model that answers --canary-percent of the requests")
    p.add_argument("--canary-percent", type=int, help="1-99: the share of requests the canary answers")
    p.add_argument("--canary-version", help="the canary's version in answers (default: its run)")
    p.add_argument("--log-store", help="append every prediction to predictions/ENDPOINT/ in this store (default: "
                   "no log)")
    p.add_argument("--endpoint", help="the endpoint the log is kept for (default: --name)")
    p.add_argument("--log-batch", type=int, help="records per log object (default 500)")
    p.add_argument("--log-flush-seconds", type=float, dest="log_flush_s",
                   help="a log object is written at the latest this long after its first record (default 10)")
    p.add_argument("--log-queue", type=int, help="records waiting for the store before new ones are dropped and "
                   "counted (default 10000)")
    _add_config(p)
    p.set_defaults(func=cmd_serve)

    model = groups.add_parser("model", help="the exported models: list them with their metrics and roles, or "
                              "compare two (the promotion gate)")
    model_cmds = model.add_subparsers(dest="command", required=True)
    p = model_cmds.add_parser("list", help="every run under models/ with validation and test metrics and its role "
                              "on each endpoint")
    p.add_argument("--store", required=True, help="store root holding models/ and serving/")
    p.set_defaults(func=cmd_model_list)
    p = model_cmds.add_parser("compare", help="the promotion gate: champion and challenger on the same photos, "
                              "paired differences, McNemar, the rule's verdict (exit 2: refused)")
    p.add_argument("--store", help="store root holding models/ and datasets/NAME/")
    p.add_argument("--champion", help="the run serving now (RUN or models/RUN), a model directory or URI")
    p.add_argument("--challenger", help="the run that would replace it")
    p.add_argument("--dataset", help="the dataset whose split both models count")
    p.add_argument("--split", help="the split (default test; one either model was fitted on is refused)")
    p.add_argument("--out", help="where the report goes (default: reports/CHALLENGER/compare-CHAMPION/ in the store)")
    rule = p.add_argument_group("the rule (config key `rule`)")
    rule.add_argument("--mae-margin", type=float, help="the challenger's MAE may exceed the champion's by at most "
                      "this at the interval's upper end (default 0.02)")
    rule.add_argument("--balanced-accuracy-margin", type=float, help="the challenger's balanced accuracy may trail by "
                      "at most this (default 0)")
    rule.add_argument("--min-accuracy", type=float, help="the challenger's own accuracy must reach this (default 0)")
    rule.add_argument("--confidence", type=float, help="of the bootstrap intervals (default 0.95)")
    rule.add_argument("--bootstrap", type=int, help="resamples (default 2000)")
    rule.add_argument("--seed", type=int, help="of the resampling (default 0)")
    _add_scoring(p)
    _add_config(p)
    p.set_defaults(func=cmd_model_compare)

    p = groups.add_parser("deploy", help="deploy a run to an endpoint, outright or on canary; `deploy promote` and "
                          "`deploy rollback`; recorded in serving/ENDPOINT.json")
    p.add_argument("command", nargs="?", choices=["promote", "rollback"],
                   help="promote the challenger, or roll back (the canary, else to the former champion)")
    p.add_argument("--store", help="store root holding models/ and serving/")
    p.add_argument("--endpoint", help="the endpoint (the InferenceService and the model name; default bincount)")
    p.add_argument("--model", help="the run to deploy (RUN or models/RUN)")
    p.add_argument("--canary", type=int, metavar="PERCENT", help="1-99: the run answers this share of the requests "
                   "beside the champion")
    p.add_argument("--reason", help="why, for the endpoint's history")
    p.add_argument("--backend", choices=list(BACKENDS), default="local",
                   help="local: a ModelServer process here; kubernetes: the InferenceService")
    p.add_argument("--no-log", dest="log", action="store_false", default=None,
                   help="do not append the prediction log to predictions/ENDPOINT/ in the store")
    p.add_argument("--port", type=_port, help="local: the port (default: the endpoint's, else a free one)")
    p.add_argument("--logger-url", help="kubernetes: KServe's logger also posts every request and answer as "
                   "CloudEvents to this URL")
    p.add_argument("--logger-mode", choices=["all", "request", "response"], help="what KServe's logger posts")
    p.add_argument("--timeout", type=float, help="seconds until the predictor must answer ready (default 600)")
    _add_config(p)
    p.set_defaults(func=cmd_deploy)

    p = groups.add_parser("monitor", help="the drift report of an endpoint's prediction log against a reference "
                          "split (exit 2: drift)")
    p.add_argument("--store", help="store root holding predictions/ and datasets/")
    p.add_argument("--endpoint", help="the endpoint whose log is read")
    p.add_argument("--since", help="the window's start: an age (30m, 24h, 1d, 7d) or an ISO 8601 time (default 1d)")
    p.add_argument("--until", help="the window's end, an ISO 8601 time (default now)")
    p.add_argument("--reference", help="the dataset the endpoint's models were built on")
    p.add_argument("--split", help="its reference split (default train)")
    p.add_argument("--out", help="where the report goes (default reports/monitor/ENDPOINT/TIME/ in the store)")
    p.add_argument("--psi-threshold", type=float, help="PSI above which a feature drifted (default 0.25; config "
                   "`thresholds` sets one per feature)")
    p.add_argument("--min-records", type=int, help="fewer values than this are not judged (default 100)")
    p.add_argument("--significance", type=float, help="a PSI that two samples of one distribution reach this often "
                   "is not drift (default 0.001)")
    p.add_argument("--bins", type=int, help="quantile bins of a continuous feature (default 10)")
    p.add_argument("--workers", type=int, help="threads reading reference photos (default 16)")
    _add_config(p)
    p.set_defaults(func=cmd_monitor)

    pipeline = groups.add_parser("pipeline", help="the Kubeflow pipeline: run it locally (kfp.local), compile it, "
                                 "submit it to a KFP server")
    pipeline_cmds = pipeline.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
            ("run", cmd_pipeline_run, "run the whole pipeline on this machine with kfp.local; see --help"),
            ("submit", cmd_pipeline_submit, "submit the pipeline to Kubeflow Pipelines (--host URL); see --help")):
        p = pipeline_cmds.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(func=func, params=[])
    p = pipeline_cmds.add_parser("compile", help="write pipelines/bin_counting.yaml and components/*/component.yaml")
    p.add_argument("--root", default=".", help="repository root to write under (default .)")
    p.add_argument("--check", action="store_true", help="write nothing; fail if the compiled files are stale")
    p.set_defaults(func=cmd_pipeline_compile)

    manifests = groups.add_parser("manifests", help="the kustomize tree in manifests/, rendered from the builders")
    manifests_cmds = manifests.add_subparsers(dest="command", required=True)
    p = manifests_cmds.add_parser("render", help="write manifests/ from bincount.k8s (or --check it)")
    p.add_argument("--out", default="manifests", help="the manifests directory (default manifests)")
    p.add_argument("--check", action="store_true", help="write nothing; fail if the files differ from the builders")
    p.set_defaults(func=cmd_manifests_render)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not isinstance(getattr(args, "params", None), list):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.params = rest                      # `train`, `pipeline run|submit`: parsed by their own parsers
    if getattr(args, "ids", None):
        args.ids = _ids(args.ids)
    return exit_status(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
