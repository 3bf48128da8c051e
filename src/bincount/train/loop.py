"""The trainer: one entrypoint for a single process, `torchrun --nproc_per_node N` and a PyTorchJob.

`train` reads top to bottom: set up (process group, data, model, recipe, checkpoint), then for each epoch
train, validate, checkpoint and print the metric line, then export the best model. Rank 0 alone writes to the
store and to stdout; stdout carries nothing but metric lines (`2025-01-02T03:04:05.123456Z epoch=3 …
lr=0.0004`, the form Katib's StdOut collector parses, time first); progress goes to stderr.

A fixed seed makes a CPU run reproducible, across a kill and resume too: the sampler's order is a function of
(seed, epoch), DataLoader workers are seeded from the main process's RNG as each epoch starts, and the
checkpoint keeps every rank's RNG state at the epoch boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from bincount import metrics
from bincount.config import TrainConfig, to_dict
from bincount.devices import cpu_has_bf16
from bincount.data import shards
from bincount.data.dataset import BinImages, ImageCache, Item, load_split
from bincount.errors import BincountError, ConfigError
from bincount.model import zoo
from bincount.evaluate import predict_log_probs
from bincount.model.exported import DECODINGS, TTA_MODES, ExportedModel, Inference, Preprocessing, fit_inference
from bincount.store import KeyNotFoundError, Store, open_store
from bincount.train import budget, distributed, features, freeze, losses, presets, report, sampling
from bincount.train.distributed import Dist

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "linear", "onecycle", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MONITORS = ("val_accuracy", "val_balanced_accuracy", "val_loss")
MINIMIZED = ("val_loss",)                       # the other monitors are maximized
CALIBRATIONS = ("none", "temperature")
RUN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
METRIC_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy",
               "val_mae", "lr")
# A resume with other values here would silently continue a different model.
RESUME_KEYS = ("dataset", "arch", "head", "weights", "freeze", "classes", "image_size", "feature_cache",
               "batch_size", "accumulate", "ema_half_life")


class NonFiniteLossError(BincountError):
    pass


@dataclass
class RunState:
    """What besides weights and optimizer a resume needs; saved in every checkpoint."""

    epoch: int = 0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)
    steps: int = 0                  # the run's optimizer steps in all, as planned (decided by a time budget)
    taken: int = 0                  # optimizer steps taken


@dataclass
class TrainResult:
    run: str
    model_uri: str
    best_epoch: int
    best: dict
    epochs: int
    resumed_from: int
    is_main: bool

    def summary(self) -> str:
        """One line for stdout, free of `name=value` pairs so that no collector mistakes it for a metric."""
        resumed = f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""
        return (f"run {self.run}: {self.epochs} epoch(s){resumed}; best epoch {self.best_epoch} with val accuracy "
                f"{self.best['val_accuracy']:.4f}, val loss {self.best['val_loss']:.4f}; model at {self.model_uri}")


def checkpoint_key(run: str, name: str = "last.pt") -> str:
    return f"checkpoints/{run}/{name}"


def model_prefix(run: str) -> str:
    return f"models/{run}"


def train(cfg: TrainConfig) -> TrainResult:
    started = time.monotonic()                  # a time budget counts the setup too
    d = distributed.init(cfg.device)
    try:
        return _train(cfg, d, started)
    finally:
        distributed.close(d)


def _train(cfg: TrainConfig, d: Dist, started: float) -> TrainResult:
    log = _logger(d)

    # ---- setup: everything that can fail on bad input, checked on every rank before any collective
    with distributed.phase(d):
        validate(cfg)
        cfg = resolve(cfg, d)
        store = open_store(cfg.store)
        splits = {s: load_split(store, cfg.dataset, s, cfg.classes) for s in ("train", "val")}
        ckpt = load_checkpoint(store, cfg) if cfg.resume else None
        criterion = losses.CountLoss(cfg.loss, cfg.classes, cfg.label_smoothing, cfg.ordinal_scale,
                                     class_weights(cfg, splits["train"])).to(d.device)
        seed_everything(cfg.seed)
        model, weights_id = zoo.build_model(cfg.arch, len(cfg.classes), cfg.weights, cfg.drop_path, cfg.head)
        freeze.apply_freeze(model, cfg.freeze)
        preprocessing = Preprocessing(cfg.image_size, *zoo.normalization(cfg.arch))
    if d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    model.to(d.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    autocast = _autocast(cfg.precision, d.device)
    log(f"run {cfg.run}: {cfg.arch} ({weights_id}), freeze {cfg.freeze}, {cfg.precision}, "
        f"{'channels_last' if cfg.channels_last else 'NCHW'}, {d.world} process(es) on {d.device.type}")

    # ---- data: shards streamed from the store, or the local image cache; images or (frozen backbone) features
    with distributed.phase(d):
        chosen = {s: shards.choose(store, cfg.dataset, s, items, cfg.image_size, cfg.data)
                  for s, items in splits.items()}
    indexes = {s: index for s, (index, _) in chosen.items()} if all(i for i, _ in chosen.values()) else None
    fallback = "; ".join(reason for _, reason in chosen.values() if reason)
    log("data: " + ("shards, streamed from the store" if indexes else "image cache"
                    + (f" ({fallback})" if fallback else "")))
    ordered = {s: indexes[s].items() if indexes else items for s, items in splits.items()}
    fast = cfg.freeze == "backbone" and cfg.feature_cache
    feature_keys = {s: features.feature_key(cfg.dataset, s, items, cfg.arch,
                                            weights_id if weights_id != "none" else f"none-seed{cfg.seed}",
                                            cfg.image_size, cfg.precision) for s, items in ordered.items()}
    with distributed.phase(d):
        cached = {s: fast and store.exists(k) for s, k in feature_keys.items()} if d.main else None
    cached = distributed.broadcast(d, cached)
    cache = None if indexes else ImageCache(store, cfg.cache_dir, cfg.image_size)
    with distributed.phase(d):
        if cache is not None and d.local_rank == 0:
            start = time.perf_counter()
            fetched = cache.fill([i.key for s, items in splits.items() if not cached[s] for i in items],
                                 cfg.prefetch_workers)
            if fetched:
                log(f"image cache {cache.local.root}: {fetched} image(s) in {time.perf_counter() - start:.1f} s")
    eval_images = ({s: shards.ShardStream(cfg.store, index, cfg.classes, batch_size=cfg.batch_size, ordered=True)
                    for s, index in indexes.items()} if indexes
                   else {s: BinImages(items, cache, cfg.classes) for s, items in splits.items()})
    to_input = _to_input(preprocessing, d.device, cfg.channels_last)
    bins = sampling.bin_ids(ordered["train"]) if cfg.same_bin_rank_weight > 0 else []
    if cfg.same_bin_rank_weight > 0:
        log(f"same-bin ranking: {sum(b >= 0 for b in bins)} training photos in {len(set(bins) - {-1})} bins")
    paired = bins if any(b >= 0 for b in bins) else None
    if fast:
        def compute(images):
            return features.extract(model, images, cfg.batch_size, cfg.workers, autocast, to_input)

        train_set, val_set = (features.load_or_compute(store, feature_keys[s], eval_images[s].targets, compute,
                                                       None if cached[s] else eval_images[s], d, log)
                              for s in ("train", "val"))
        net: nn.Module = zoo.head(model)
        prepare, head_prefix = _to_device(d.device), ""
    elif indexes:
        train_set = shards.ShardStream(cfg.store, indexes["train"], cfg.classes, rank=d.rank, world=d.world,
                                       batch_size=cfg.batch_size, transform=presets.train_transform(cfg.augment),
                                       shuffle=True, drop_last=True, seed=cfg.seed, buffer=cfg.shuffle_buffer,
                                       bins=paired)
        val_set = eval_images["val"]
        net = model
        prepare, head_prefix = to_input, zoo.head_name(model) + "."
    else:
        train_set = BinImages(splits["train"], cache, cfg.classes, presets.train_transform(cfg.augment))
        val_set = eval_images["val"]
        net = model
        prepare, head_prefix = to_input, zoo.head_name(model) + "."
    workers = 0 if fast else cfg.workers        # features are in memory already
    streamed = isinstance(train_set, shards.ShardStream)
    if streamed:
        sampler = None
    elif paired:
        train_set = sampling.WithBins(train_set, paired)
        sampler = sampling.SameBinSampler(paired, num_replicas=d.world, rank=d.rank, seed=cfg.seed)
    else:
        sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    per_rank = len(train_set) if streamed else len(sampler)
    loading = {"num_workers": workers, "pin_memory": d.device.type == "cuda",
               "prefetch_factor": cfg.prefetch_factor if workers else None}
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                              drop_last=not streamed and per_rank >= cfg.batch_size, **loading)
    val_loader = DataLoader(shards.rank_part(val_set, d.rank, d.world), batch_size=cfg.batch_size, **loading)

    # ---- recipe
    optimizer = make_optimizer(net, cfg, head_prefix)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accumulate)
    plan = budget.Plan.make(cfg.steps, cfg.epochs, steps_per_epoch, cfg.time_budget, started)
    scheduler = make_scheduler(optimizer, cfg, plan)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
    ema = make_ema(net, cfg, steps_per_epoch)
    judged = ema.module if ema is not None else net     # the weights validated, kept as best and exported

    # ---- resume
    state = RunState()
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        state = RunState(**ckpt["state"])
        plan.resume(state.steps, state.taken or state.epoch * steps_per_epoch)
        restore_rng(ckpt["rng"], d, cfg.seed)
        log(f"resuming run {cfg.run} from {store.url(checkpoint_key(cfg.run))} after epoch {state.epoch}"
            + (f", to end on step {plan.total}" if plan.budget_s or cfg.steps else ""))
        if d.main:      # the checkpoint's own epochs, for a collector that reads only this process (Katib's, a tuner)
            for record in state.history:
                print(metric_line(record), flush=True)
    else:
        seed_everything(cfg.seed + 1 + d.rank)
    resumed_from = state.epoch
    ddp_net = (DistributedDataParallel(net, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
               if d.world > 1 else net)

    # ---- epochs, until the plan's last step (a time budget decides it during the first epoch)
    if plan.budget_s:
        log(f"time budget {plan.budget_s:.0f} s: the first {budget.WARM_STEPS + budget.TIMED_STEPS} steps decide "
            f"the run's length (at most {plan.total} steps, {plan.epochs} epoch(s))")

    def decide(x: torch.Tensor) -> None:
        _decide(plan, net, x, autocast, cfg, d, len(val_set), log)

    first_epoch, epoch = state.epoch + 1, state.epoch
    while not state.stopped_early and epoch < plan.epochs:
        epoch += 1
        (train_set if streamed else sampler).set_epoch(epoch)
        timer = report.EpochTimer()
        profiler = _start_profiler(cfg, d) if epoch == first_epoch else None
        train_stats = train_epoch(ddp_net, net, train_loader, optimizer, scheduler, scaler, criterion, prepare,
                                  autocast, cfg, d, epoch, timer, profiler, ema, plan, decide)
        distributed.sync_buffers(d, net)
        val_stats = validate_epoch(judged, val_loader, prepare, autocast, cfg.classes, d)
        record = {k: _round(v) for k, v in {"epoch": epoch, **train_stats, **val_stats,
                                            "lr": optimizer.param_groups[0]["lr"]}.items()}
        improved = state.best is None or (record[cfg.monitor] < state.best if cfg.monitor in MINIMIZED
                                          else record[cfg.monitor] > state.best)
        if improved:
            state.best, state.best_epoch, state.bad_epochs = record[cfg.monitor], epoch, 0
        else:
            state.bad_epochs += 1
        state.epoch, state.steps, state.taken = epoch, plan.total, plan.taken
        state.stopped_early = cfg.patience > 0 and state.bad_epochs >= cfg.patience and epoch < plan.epochs
        state.history.append({**record, **timer.stats()})
        rngs = distributed.all_gather(d, rng_state())
        with distributed.phase(d):
            if d.main:
                save_checkpoint(store, cfg, net, judged, ema, optimizer, scheduler, scaler, state, rngs, improved)
                if profiler is not None:
                    _upload_trace(store, cfg.run, profiler)
        if d.main:
            print(metric_line(record), flush=True)
            stats = state.history[-1]
            log(f"epoch {epoch}/{plan.epochs}: {stats['epoch_time_s']:.1f} s, "
                f"{per_rank * d.world / stats['epoch_time_s']:.0f} img/s, "
                f"data wait {stats['data_wait_share']:.0%}, {stats['step_outliers']} slow step(s)")
            for flag in report.flags(state.history):
                log(f"warning: {flag}")
        if state.stopped_early:
            log(f"early stop: no {cfg.monitor} improvement for {cfg.patience} epoch(s)")
            break

    # ---- export: the replicas must agree, then rank 0 writes the best model and the report
    digest = weights_digest(net.state_dict())
    digests = distributed.all_gather(d, digest)
    log(f"rank {d.rank}: final weights sha256 {digest}", every_rank=True)
    with distributed.phase(d):
        if len(set(digests)) > 1:
            raise BincountError(f"DDP replicas diverged: final weights differ between ranks ({digests})")
        if d.main:
            export(store, cfg, state, plan, net, model, preprocessing, eval_images["val"], cache, d, log)
            report.write(store, cfg.run, state.history)
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    return TrainResult(cfg.run, store.url(model_prefix(cfg.run)), state.best_epoch,
                       {k: best[k] for k in METRIC_KEYS}, state.epoch, resumed_from, d.main)


def train_epoch(ddp_net: nn.Module, net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                scheduler, scaler: torch.amp.GradScaler, criterion: nn.Module, prepare: Callable,
                autocast: Callable, cfg: TrainConfig, d: Dist, epoch: int, timer: report.EpochTimer,
                profiler, ema: AveragedModel | None, plan: budget.Plan,
                decide: Callable[[torch.Tensor], None]) -> dict[str, float]:
    freeze.train_mode(net)
    totals = torch.zeros(3, dtype=torch.float64, device=d.device)    # loss sum, correct, samples
    optimizer.zero_grad(set_to_none=True)
    steps, batches = len(loader), iter(loader)
    for i in itertools.count():
        batch = distributed.next_batch(d, batches)
        if batch is None:
            break
        x, y, *bins = batch
        timer.batch_ready()
        x, y = prepare(x), y.to(d.device, non_blocking=True)
        step_now = (i + 1) % cfg.accumulate == 0 or i + 1 == steps
        with contextlib.nullcontext() if step_now or d.world == 1 else ddp_net.no_sync():
            with autocast():
                logits = ddp_net(x)
            loss = criterion(logits.float(), y)
            if bins:
                loss = loss + cfg.same_bin_rank_weight * losses.same_bin_ranking(
                    logits, y, bins[0].to(d.device), criterion.values)
            _check_finite(loss, d, cfg.run, epoch, i + 1)
            scaler.scale(loss / cfg.accumulate).backward()
        if step_now:
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update_parameters(net)
            plan.step_taken()
            if plan.timing_done():
                decide(x)
        totals += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(),
                               torch.tensor(float(len(y)), dtype=torch.float64, device=d.device)])
        timer.step_done()
        if profiler is not None:
            profiler.step()
        if step_now and plan.taken >= plan.total:
            break
    if profiler is not None:
        profiler.stop()
    loss_sum, correct, n = distributed.all_sum(d, totals).tolist()
    return {"train_loss": loss_sum / n, "train_accuracy": correct / n}


@torch.no_grad()
def validate_epoch(net: nn.Module, loader: DataLoader, prepare: Callable, autocast: Callable,
                   classes: Sequence[int], d: Dist) -> dict[str, float]:
    """Loss (plain cross-entropy, comparable across recipes), accuracy, balanced accuracy (the mean recall over
    the counts present) and mean absolute count error."""
    net.eval()
    k = len(classes)
    values = torch.tensor(list(classes), dtype=torch.float64, device=d.device)
    totals = torch.zeros(3, dtype=torch.float64, device=d.device)    # loss sum, abs error, samples
    hits = torch.zeros(2, k, dtype=torch.float64, device=d.device)   # per class: correct, samples
    for x, y, *_ in loader:                  # an ordered shard stream adds positions
        x, y = prepare(x), y.to(d.device, non_blocking=True)
        with autocast():
            logits = net(x)
        logits = logits.float()
        pred = logits.argmax(1)
        totals += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                               (values[pred] - values[y]).abs().sum(),
                               torch.tensor(float(len(y)), dtype=torch.float64, device=d.device)])
        hits[0] += torch.bincount(y[pred == y], minlength=k).double()
        hits[1] += torch.bincount(y, minlength=k).double()
    loss_sum, abs_err, n = distributed.all_sum(d, totals).tolist()
    correct, support = distributed.all_sum(d, hits).tolist()
    recalls = [c / s for c, s in zip(correct, support) if s]
    return {"val_loss": loss_sum / n, "val_accuracy": sum(correct) / n,
            "val_balanced_accuracy": sum(recalls) / len(recalls), "val_mae": abs_err / n}


def _decide(plan: budget.Plan, net: nn.Module, x: torch.Tensor, autocast: Callable, cfg: TrainConfig, d: Dist,
            val_images: int, log: Callable[[str], None]) -> None:
    """Turns the time budget into the run's step count: rank 0 times a validation batch (the training batch at hand,
    in eval mode) and decides; every rank takes its count, so all stop on the same step."""
    total = None
    with distributed.phase(d):
        if d.main:
            net.eval()
            with torch.no_grad(), autocast():
                net(x)
                start = time.perf_counter()
                net(x)
            eval_s = time.perf_counter() - start
            freeze.train_mode(net)
            views = (8 if cfg.tta == "dihedral" else 1) if exports_predictions(cfg) else 0
            total = plan.decide(eval_s, len(x), math.ceil(val_images / d.world), views)
    total = distributed.broadcast(d, total)
    plan.total, plan.decided = total, True
    e = plan.estimate
    log(f"time budget: {plan.total} steps ({plan.total / plan.steps_per_epoch:.1f} epochs) at {e.get('step_s', 0):.3f} s "
        f"a step, {e.get('validation_s', 0):.1f} s a validation, {e.get('export_s', 0):.0f} s for the export, after "
        f"{e.get('setup_and_timing_s', 0):.0f} s of setup and timing; the schedule ends on step {plan.total}")
    warmup = int(cfg.warmup_epochs * plan.steps_per_epoch)
    if cfg.schedule != "constant" and plan.total <= warmup:
        log(f"warning: the budget ends within the warm-up ({plan.total} of {warmup} steps), so the learning rate "
            "never decays; give more time or a shorter warm-up")


def _check_finite(loss: torch.Tensor, d: Dist, run: str, epoch: int, step: int) -> None:
    """Collective, so that every rank stops at the same step; nothing of this epoch reaches the store."""
    value = loss.item()
    error = None if math.isfinite(value) else NonFiniteLossError(
        f"loss became {value} at epoch {epoch}, step {step} of run {run}; the last checkpoint (if any) is "
        "untouched. Lower --lr, set grad_clip, or check the weights and data")
    distributed.agree(d, error)


def metric_line(record: dict) -> str:
    """`<RFC3339 UTC time> epoch=3 train_loss=1.21 …`. Katib's collector takes a line's first word as its time
    (zero time when it is none), and its median stop averages each trial's first `start_step` values in time
    order: every epoch needs its own time, to the microsecond that Katib's database keeps."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return " ".join([now, *(f"{k}={_format(record[k])}" for k in METRIC_KEYS)])


def _format(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _round(value: float) -> float:
    return value if isinstance(value, int) else float(f"{value:.6g}")


# ---- configuration

def validate(cfg: TrainConfig) -> None:
    problems = []
    if not RUN_RE.match(cfg.run or ""):
        problems.append(f"run id {cfg.run!r} must start with a letter or digit and hold only letters, digits, "
                        "'.', '_' and '-'")
    try:
        zoo.family(cfg.arch)
    except ConfigError as e:
        problems.append(str(e))
    for name, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS),
                        ("augment", presets.AUGMENTS), ("monitor", MONITORS), ("loss", losses.LOSSES),
                        ("head", zoo.HEADS),
                        ("tta", TTA_MODES), ("calibration", CALIBRATIONS), ("decode", DECODINGS),
                        ("data", shards.DATA_MODES)):
        if getattr(cfg, name) not in valid:
            problems.append(f"unknown {name} {getattr(cfg, name)!r}; valid: {', '.join(valid)}")
    for name, low in (("epochs", 1), ("batch_size", 1), ("accumulate", 1), ("image_size", 16),
                      ("patience", 0), ("profile", 0), ("prefetch_workers", 1), ("shuffle_buffer", 1),
                      ("prefetch_factor", 1)):
        if getattr(cfg, name) < low:
            problems.append(f"{name} must be at least {low}, got {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "grad_clip", "label_smoothing",
                 "backbone_lr_scale", "ema_half_life", "same_bin_rank_weight", "drop_path"):
        if not getattr(cfg, name) >= 0:
            problems.append(f"{name} must be 0 or more, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not cfg.label_smoothing < 1 or not cfg.ordinal_scale > 0:
        problems.append(f"lr and ordinal_scale must be above 0 and label_smoothing below 1, got {cfg.lr}, "
                        f"{cfg.ordinal_scale} and {cfg.label_smoothing}")
    if not cfg.classes or len(set(cfg.classes)) != len(cfg.classes):
        problems.append(f"classes must be distinct item counts, got {cfg.classes}")
    if isinstance(cfg.class_weights, str) and cfg.class_weights not in ("none", "balanced"):
        problems.append(f"class_weights must be none, balanced or one weight per class, got {cfg.class_weights!r}")
    if isinstance(cfg.class_weights, list) and (len(cfg.class_weights) != len(cfg.classes)
                                                or min(cfg.class_weights) <= 0):
        problems.append(f"class_weights needs {len(cfg.classes)} positive weights, got {cfg.class_weights}")
    if cfg.steps < 0:
        problems.append(f"steps must be 0 (epochs × steps per epoch) or more, got {cfg.steps}")
    if cfg.time_budget:
        try:
            budget.parse_duration(cfg.time_budget)
        except ConfigError as e:
            problems.append(str(e))
        if cfg.schedule == "onecycle":
            problems.append("a time budget needs a schedule that reads its length as it goes: cosine, linear or "
                            "constant, not onecycle")
    if problems:
        raise ConfigError("train: " + "; ".join(problems))


def resolve(cfg: TrainConfig, d: Dist) -> TrainConfig:
    """The config as it will run: `auto` values decided for this machine (this is what the model records)."""
    cuda = d.device.type == "cuda"
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else (
            "bf16" if cpu_has_bf16() else "fp32")
    if precision == "fp16" and not cuda:
        raise ConfigError("precision fp16 needs a GPU (it trains with a GradScaler); use bf16 or fp32 on a CPU")
    if precision == "bf16" and not cuda and not cpu_has_bf16():
        print("bincount train: warning: this CPU lacks AVX512-BF16/AMX; bf16 will be slow", file=sys.stderr)
    channels_last = cfg.channels_last if cfg.channels_last is not None else (cuda or precision == "bf16")
    workers = cfg.workers if cfg.workers >= 0 else min(4, max(0, (os.cpu_count() or 1) // d.local_world - 1))
    return dataclasses.replace(cfg, precision=precision, channels_last=channels_last, workers=workers)


def class_weights(cfg: TrainConfig, items: Sequence[Item]) -> torch.Tensor | None:
    if cfg.class_weights == "none":
        return None
    if cfg.class_weights == "balanced":
        counts = Counter(item.label for item in items)
        empty = [c for c in cfg.classes if not counts[c]]
        if empty:
            raise ConfigError(f"class_weights balanced: no training images of class(es) {empty}")
        return torch.tensor([len(items) / (len(cfg.classes) * counts[c]) for c in cfg.classes])
    return torch.tensor(cfg.class_weights, dtype=torch.float32)


def make_optimizer(net: nn.Module, cfg: TrainConfig, head_prefix: str) -> torch.optim.Optimizer:
    """Weight decay on weights only, not on biases and normalization parameters; the backbone at
    `backbone_lr_scale` times the head's learning rate."""
    groups = freeze.param_groups(net, cfg.lr, cfg.weight_decay, cfg.backbone_lr_scale, head_prefix)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, plan: budget.Plan):
    """Stepped once per optimizer step; warmup is linear from lr/warmup_steps, then cosine or linear decay to zero
    on the plan's last step. The plan's total is read at every step: a time budget sets it during the first
    epoch (a budget shorter than the warm-up shortens the warm-up). One cycle's two phases each keep at least one
    step (torch divides by their lengths); a run of under 3 steps warms up and anneals by cosine."""
    total = plan.total
    warmup_steps = int(cfg.warmup_epochs * plan.steps_per_epoch)
    warmup = min(total, warmup_steps)
    if cfg.schedule == "onecycle" and total >= 3:
        pct = min(max(warmup / total if warmup else 0.3, 1.5 / total), (total - 1) / total)
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total, pct_start=pct)

    def factor(step: int) -> float:
        total = plan.total
        warmup = min(total, warmup_steps)
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1 - done if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_ema(net: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> AveragedModel | None:
    """A moving average of the weights (batch-norm statistics too), its half-life in epochs so that one recipe
    averages alike over 300 photos or 300,000: on a few hundred noisy photos single epochs' weights swing, and
    the epoch picked on a small validation split is partly picked by that swing."""
    if cfg.ema_half_life <= 0:
        return None
    decay = 0.5 ** (1 / (cfg.ema_half_life * max(1, steps_per_epoch)))
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _to_input(preprocessing: Preprocessing, device: torch.device,
              channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: preprocessing.normalize(x, device, channels_last=channels_last)


def _to_device(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.to(device, non_blocking=True)


# ---- randomness

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "python": random.getstate()}


def restore_rng(states: list[dict], d: Dist, seed: int) -> None:
    """Each rank's own state; with another world size there is none to take, so reseed deterministically."""
    if len(states) != d.world:
        seed_everything(seed + 1 + d.rank + 1000 * len(states))
        return
    s = states[d.rank]
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = s["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- store: checkpoints, export

def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_checkpoint(store: Store, cfg: TrainConfig) -> dict | None:
    key = checkpoint_key(cfg.run)
    try:
        data = store.get(key)
    except KeyNotFoundError:
        return None
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise BincountError(f"checkpoint {store.url(key)} cannot be read ({e}); delete it or use another --run"
                            ) from None
    saved, now = ckpt.get("config", {}), to_dict(cfg)
    changed = [f"{k} {saved.get(k)!r} → {now[k]!r}" for k in RESUME_KEYS if saved.get(k) != now[k]]
    if changed:
        raise ConfigError(f"run {cfg.run!r} has a checkpoint made with other settings ({'; '.join(changed)}); "
                          "use the same settings to resume or another --run to start afresh")
    return ckpt


def save_checkpoint(store: Store, cfg: TrainConfig, net: nn.Module, judged: nn.Module, ema: AveragedModel | None,
                    optimizer, scheduler, scaler, state: RunState, rngs: list[dict], improved: bool) -> None:
    """best.pt (the weights validated: `net`'s, or their moving average) when it improved, then last.pt, then the
    metric log; each write atomic. They hold what trains: the whole model, or over cached features only its
    head — a frozen backbone is not written again every epoch of every trial."""
    if improved:
        store.put(checkpoint_key(cfg.run, "best.pt"), _save(judged.state_dict()))
    store.put(checkpoint_key(cfg.run), _save({
        "net": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "state": dataclasses.asdict(state), "rng": rngs, "config": to_dict(cfg),
        **({"ema": ema.state_dict()} if ema is not None else {})}))
    store.put_text(checkpoint_key(cfg.run, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in state.history))


def export(store: Store, cfg: TrainConfig, state: RunState, plan: budget.Plan, net: nn.Module, model: nn.Module,
           preprocessing: Preprocessing, val_images: Dataset, cache: ImageCache | None, d: Dist,
           log: Callable[[str], None]) -> None:
    """models/<run>/: the whole model with the best epoch's `net` weights, and how to use it. With test-time
    augmentation or calibration, the exported model itself predicts the validation split — in the precision it
    will be served in — to fit the temperature and record what it scores as exported."""
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    net.load_state_dict(torch.load(io.BytesIO(store.get(checkpoint_key(cfg.run, "best.pt"))),
                                   map_location=next(net.parameters()).device, weights_only=True))
    exported = ExportedModel(model, cfg.arch, cfg.classes, preprocessing, Inference(cfg.tta, 1.0, cfg.decode), {
        "best_epoch": state.best_epoch, "metrics": {k: best[k] for k in METRIC_KEYS if k != "epoch"},
        "epochs": state.epoch, "schedule": plan.record(), "head": cfg.head, "config": to_dict(cfg)})
    if exports_predictions(cfg):
        start = time.perf_counter()
        if cache is not None:                               # not filled where features were cached
            cache.fill(val_images.keys, cfg.prefetch_workers)
        log_probs, targets = predict_log_probs(exported.predictor(d.device, cfg.precision), val_images,
                                               cfg.batch_size, cfg.workers, "calibrate on val")
        inference = fit_inference(log_probs, targets, cfg.tta, cfg.calibration, cfg.decode)
        exported = exported.calibrated(inference)
        probabilities = (log_probs / inference.temperature).softmax(1)
        counted = metrics.counting([cfg.classes[t] for t in targets.tolist()], exported.counts(probabilities),
                                   cfg.classes)
        exported.meta["validation"] = {**{k: counted[k] for k in ("accuracy", "balanced_accuracy", "mae",
                                                                  "within_one_accuracy")},
                                       **metrics.calibration(probabilities, targets)}
        log(f"export: tta {cfg.tta}, temperature {inference.temperature:.3f}, decode {cfg.decode}; validation as exported: "
            + ", ".join(f"{k} {v:.4f}" for k, v in exported.meta["validation"].items())
            + f" ({time.perf_counter() - start:.1f} s)")
    exported.save(store, model_prefix(cfg.run))


def exports_predictions(cfg: TrainConfig) -> bool:
    """Whether the export predicts the validation split: to fit a temperature, or to score TTA."""
    return cfg.tta != "none" or cfg.calibration != "none"


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- logging and profiling

def _logger(d: Dist) -> Callable[..., None]:
    def log(message: str, every_rank: bool = False) -> None:
        if d.main or every_rank:
            sys.stderr.write(f"bincount train: {message}\n")   # one write: ranks share the stream
            sys.stderr.flush()
    return log


def _start_profiler(cfg: TrainConfig, d: Dist):
    """torch.profiler over `cfg.profile` steps (after one warmup step) of this process's first epoch."""
    if not (cfg.profile and d.main):
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if d.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    path = Path(tempfile.gettempdir()) / f"bincount-trace-{cfg.run}-{os.getpid()}.json"
    profiler = torch.profiler.profile(activities=activities,
                                      schedule=torch.profiler.schedule(wait=0, warmup=1, active=cfg.profile),
                                      on_trace_ready=lambda p: p.export_chrome_trace(str(path)))
    profiler.trace_path = path
    profiler.start()
    return profiler


def _upload_trace(store: Store, run: str, profiler) -> None:
    path = profiler.trace_path
    if path.is_file():
        store.put_file(f"{report.report_prefix(run)}/trace.json", path)
        path.unlink()
