"""The `abid` recipe on real photos: repeated stratified k-fold over the real-photo pool (the 407-photo ABID
sample and, where ../shared/data/abid-more is present, its 5,580 more: 5,987 photos), against the recipe as it
stood before (`abid-2026-12-06`), resnet18 from scratch and a linear probe on frozen EfficientNet-Lite0
features, with each element of the recipe changed or taken away in turn (ablation).

Every variant trains and evaluates through bincount itself (`bincount.train.loop.train`, then
`bincount.evaluate.evaluate`) on the same folds: for repeat r, the photos are split into `--folds` stratified
folds (seed r) of whole bins, with prepare's own scan and grouping (photos that list a product in common are one
bin before and after a pick, with other counts: split apart, recognising the bin scores its twin's count;
byte-identical photos stay together too); fold k is the test split, untouched by every choice, and the rest is
split again, stratified, into train and validation (the validation split picks the best epoch and fits the
temperature). Variants that differ from the recipe only in how the exported model predicts (no TTA, no
calibration, another decoding) are not retrained: the recipe's own weights are re-exported with that inference,
the temperature refitted on validation exactly as training's export does. Variants that cost more per photo
(a larger backbone, a larger input) or less (early blocks frozen) train for proportionally fewer or more steps
(`speed`, measured on 2 cores), so every variant gets the same training time, as a time budget would give it.

It prints, per variant, the mean ± std over folds of balanced accuracy, MAE, within-one accuracy and calibration
error over all test photos and over the original-size ones only (4,412 of abid-more's photos were published
stretched to 224 px; users send originals), the training time per epoch (on this machine), and each variant's
paired difference to `--base` on the same folds (with how many folds it was higher on); `--out` keeps every
fold's numbers as JSON, and a rerun with the same `--work` and `--out` resumes: finished folds are kept, and a
training killed mid-way continues from its last checkpoint (a `--work` made with other `--set`, pool or folds is
refused, so a resume never continues another schedule).

A full training on the pool's folds takes ~45 minutes of 2 cores, so variants are screened on a proxy (all of
them on 2 folds, a shorter schedule: `--only-folds 2 --set epochs=3 --set tta=none --set time_budget=''`) and
only the finalists confirmed at full budget on every fold (`--set steps=N --set time_budget=''`, N the steps the
recipe's time budget gives on the whole pool).

Measured 2026-12-06 on the pool (3 folds of whole bins, ~3,590 training / ~400 validation / ~2,000 test photos a
fold, ~530 of them originals), that proxy (one seed; "-": not run), balanced accuracy / MAE on all test photos
(originals only in brackets). The frozen, lite1 and decoding rows ran while the recipe still had the ranking on
(read them against the first row), the rows below them on the recipe as it is (against the second):

    variant                                  fold 0                              fold 1
    same-bin ranking 1 (the recipe then)     0.382 / 1.070 (0.391 / 1.071)       0.386 / 1.024 (0.381 / 1.054)
    same-bin ranking 0 (now the recipe)      0.399 / 1.006 (0.410 / 0.992)       0.376 / 0.972 (0.357 / 0.996)
    same-bin ranking 0.3                     0.392 / 0.997 (0.399 / 0.990)       -
    frozen to blocks.1, 1.5x the steps       0.391 / 1.029 (0.403 / 0.992)       0.370 / 1.007 (0.371 / 1.058)
    lite1 at 240 px, 0.64x the steps         0.361 / 1.097 (0.348 / 1.086)       0.355 / 1.128 (0.360 / 1.140)
    balanced decoding offsets (re-exported)  0.388 / 1.020                       0.377 / 1.189
    at 256 px, 0.77x the steps               0.401 / 0.958 (0.403 / 0.983)       0.377 / 1.055 (0.371 / 1.110)
    lite2 at 260 px, 0.45x the steps         0.328 / 1.197 (0.348 / 1.002)       -
    ema, half-life 0.5 epochs                0.397 / 0.980 (0.402 / 0.964)       -
    ce with label smoothing 0.1              0.396 / 1.079 (0.397 / 1.078)       -
    stochastic depth 0.1                     0.381 / 1.023 (0.390 / 0.990)       -
    stronger augmentation (counting-strong)  0.394 / 1.060 (0.407 / 1.013)       -
    corn (head and loss)                     0.403 / 1.013 (0.408 / 1.013)       -

On the proxy, fold to fold the recipe moves by ~0.02 balanced accuracy and ~0.03 MAE; only the same-bin ranking's
MAE (+0.05 and +0.06 with it, on both folds; the gate's paired bootstrap on fold 0: MAE -0.064, 95 % interval
-0.105 … -0.023 without it) stands clear of that. The original-size photos score as the whole test split (no gap to
close by matching the 224 px photos).

The finalists at full length (`--set steps=1242 --set time_budget=''`: the steps the budget gave on the whole pool,
11 epochs of a fold, ~40 min of 2 cores a run when nothing else runs), with TTA and calibration, paired on the same
3 folds; the last column is `bincount model compare` of the two on that fold (recipe − old, 95 % interval of a
bootstrap over bins):

    fold   abid (ranking 0, 1,242 steps)     abid-2026-12-06 (ranking 1, 1,130)   MAE, recipe − old
    0      0.410 / 0.963 (0.404 / 0.987)     0.423 / 0.903 (0.455 / 0.884)        +0.061 (+0.026 … +0.096)
    1      0.408 / 0.860 (0.399 / 0.883)     0.409 / 0.940 (0.398 / 0.918)        -0.080 (-0.113 … -0.048)
    2      0.414 / 0.797 (0.410 / 0.790)     0.424 / 0.878 (0.432 / 0.844)        -0.081 (-0.115 … -0.049)
    mean   0.410 ± 0.003 / 0.874 ± 0.069     0.419 ± 0.007 / 0.907 ± 0.026
           (0.404 ± 0.005 / 0.886 ± 0.080)   (0.428 ± 0.024 / 0.882 ± 0.030)

The proxy's one clear call did not hold: at full length the recipe's MAE was lower on 2 of 3 folds (0.033 lower on
average), its balanced accuracy 0.008 ± 0.005 lower (0.024 ± 0.021 on originals), every fold's balanced-accuracy
interval spanning zero. Each fold's MAE interval excludes zero, yet fold 0 goes the other way: a bootstrap over one
run's test bins does not see how much a training run itself varies, so only agreement across folds counts. The
same-bin ranking (with the old recipe's 10-epoch ceiling, 1,130 steps) is within that noise either way.

    .venv/bin/python benchmarks/real_recipe.py [--pool all|sample] [--folds 5] [--repeats 3]
        [--variants abid,abid-2026-12-06,...] [--only-folds N] [--set KEY=VALUE ...] [--base abid]
        [--ablation-repeats 1] [--ablation-folds 0] [--split-by bin|photo] [--work DIR] [--out real_recipe.json]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from bincount.config import EvaluateConfig, load_train_config, recipe_settings
from bincount.data.dataset import BinImages, ImageCache, load_split
from bincount.data.prepare import Sample, group_duplicates, group_same_bin, scan, stratified_split
from bincount.devices import pick_device
from bincount.evaluate import evaluate, predict_log_probs
from bincount.model.exported import ExportedModel, Inference, fit_inference
from bincount.metrics import counting
from bincount.store import open_store
from bincount.train.loop import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SAMPLE = SHARED / "abid-sample"
MORE = SHARED / "abid-more"
CLASSES = (1, 2, 3, 4, 5)
# Today's `abid` recipe as it stood before issue #24 (commit ce72e22), pinned so that the packaged recipe can move
# and still be compared with it on the same folds.
ABID_2026_12_06 = {"arch": "efficientnet_lite0", "weights": "imagenet", "freeze": "none", "image_size": 224,
                   "augment": "counting", "epochs": 10, "batch_size": 32, "lr": 0.002, "backbone_lr_scale": 0.3,
                   "weight_decay": 0.01, "warmup_epochs": 1, "loss": "ordinal", "ordinal_scale": 1.0,
                   "class_weights": "balanced", "same_bin_rank_weight": 1.0, "monitor": "val_balanced_accuracy",
                   "tta": "dihedral", "calibration": "temperature", "decode": "argmax"}
# name → settings over the abid recipe (trained), or → inference changes of the recipe's model (re-exported).
# `speed` (a variant's training throughput relative to the recipe's, measured on 2 cores) scales its optimizer
# steps, so that variants that cost more per photo are compared at the same training time, as a budget would.
TRAINED: dict[str, dict] = {
    "abid": {},
    "abid-2026-12-06": ABID_2026_12_06,
    "resnet18-scratch": {"recipe": "quickstart", "class_weights": "balanced"},
    "lite0-linear-probe": {"arch": "efficientnet_lite0", "freeze": "backbone", "lr": 0.01, "epochs": 30,
                           "backbone_lr_scale": 1.0},
    "-pretrained": {"weights": "none"},
    "-ordinal loss (ce)": {"loss": "ce"},
    "corn (head and loss)": {"head": "corn", "loss": "corn"},
    "-class weights": {"class_weights": "none"},
    "-counting augment (flip)": {"augment": "flip"},
    "stronger augmentation": {"augment": "counting-strong"},
    "-lower backbone lr": {"backbone_lr_scale": 1.0},
    "backbone lr 0.1x": {"backbone_lr_scale": 0.1},
    "ema (half-life 2 epochs)": {"ema_half_life": 2.0},
    "ema (half-life 0.5 epochs)": {"ema_half_life": 0.5},
    "monitor val_loss": {"monitor": "val_loss"},
    "same-bin ranking (weight 0.3)": {"same_bin_rank_weight": 0.3},
    "same-bin ranking (weight 1)": {"same_bin_rank_weight": 1.0},
    "same-bin ranking (weight 3)": {"same_bin_rank_weight": 3.0},
    "linear decay": {"schedule": "linear"},
    "ordinal scale 0.5": {"ordinal_scale": 0.5},
    "ce with label smoothing 0.1": {"loss": "ce", "label_smoothing": 0.1},
    "stochastic depth 0.1": {"drop_path": 0.1},
    "ordinal scale 2": {"ordinal_scale": 2.0},
    "at 288 px": {"image_size": 288},
    "at 256 px (same time)": {"image_size": 256, "speed": 0.77},
    "lite1 at 240 px (same time)": {"arch": "efficientnet_lite1", "image_size": 240, "speed": 0.64},
    "lite2 at 260 px (same time)": {"arch": "efficientnet_lite2", "image_size": 260, "speed": 0.45},
    "frozen to blocks.1 (same time)": {"freeze": "blocks.1", "speed": 1.5},
    "frozen to blocks.2 (same time)": {"freeze": "blocks.2", "speed": 2.0},
}
DERIVED: dict[str, dict] = {
    "-tta": {"tta": "none"},
    "-calibration": {"calibration": "none"},
    "median decode": {"decode": "median"},
}
MAIN = ("abid", "abid-2026-12-06", "resnet18-scratch", "lite0-linear-probe")
METRICS = ("balanced_accuracy", "mae", "within_one_accuracy", "accuracy", "ece")


def pool_sources(pool: str) -> list[Path]:
    return [SAMPLE, MORE] if pool == "all" else [SAMPLE]


def originals(pool: str) -> set[str]:
    """Keys of the photos at their original size (the sample's all; of abid-more those sources.csv marks)."""
    keys = {p.stem for p in (SAMPLE / "bin-images").glob("*.jpg")}
    if pool == "all":
        with open(MORE / "sources.csv", newline="") as f:
            keys |= {row["key"] for row in csv.DictReader(f) if row["original_size"] == "1"}
    return keys


def link_pool(root: Path, pool: str) -> None:
    """The pool's photos and metadata under the work store's raw/: hard links where the file system allows (the
    store refuses symbolic links out of its root), else copies."""
    for source in pool_sources(pool):
        for sub in ("bin-images", "metadata"):
            target = root / "raw" / sub
            target.mkdir(parents=True, exist_ok=True)
            for path in (source / sub).iterdir():
                link = target / path.name
                if not link.exists():
                    try:
                        os.link(path, link)
                    except OSError:
                        shutil.copyfile(path, link)


def claim_work(work: Path, made_with: dict) -> str | None:
    """Record what the work dir's runs are made with; the reason to refuse a rerun made with anything else."""
    path = work / "made_with.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != made_with:
            changed = [f"{k} {before.get(k)!r} → {made_with.get(k)!r}" for k in sorted({*before, *made_with})
                       if before.get(k) != made_with.get(k)]
            return (f"{work} holds runs made with other settings ({'; '.join(changed)}); "
                    "use another --work (and --out) to start afresh")
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(made_with, indent=1, sort_keys=True))
    return None


def write_fold(store_root: Path, name: str, splits: dict[str, list[Sample]], bin_of: dict[str, str]) -> None:
    """The split manifests as prepare writes them: a photo of a bin with several photos carries the bin."""
    for split, samples in splits.items():
        path = store_root / "datasets" / name / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(
            json.dumps({"key": s.key, "label": s.label, **({"bin": bin_of[s.key]} if s.key in bin_of else {})})
            + "\n" for s in sorted(samples, key=lambda s: s.key)))


def make_folds(store_root: Path, folds: int, repeats: int, by_bin: bool, val_share: float) -> list[str]:
    """Stratified folds of whole groups, with prepare's own scan and grouping: byte-identical photos, and by bin
    the photos sharing a product (one bin before and after a pick), never straddle train, validation and test;
    by photo, a bin's photos may."""
    samples, _ = scan(open_store(str(store_root)), 16)
    if not by_bin:
        samples = [dataclasses.replace(s, products=frozenset()) for s in samples]
    duplicates, _ = group_duplicates(samples)
    groups = group_same_bin(duplicates)
    bin_of = {s.key: g[0].key for g in groups if len(g) > 1 for s in g}
    names = []
    for r in range(repeats):
        parts = stratified_split(groups, [1 / folds] * folds, random.Random(r), [str(k) for k in range(folds)])
        for k in range(folds):
            test = {s.key for s in parts[str(k)]}
            rest = [g for g in groups if g[0].key not in test]
            fit = stratified_split(rest, [1 - val_share, val_share], random.Random(1000 + 10 * r + k),
                                   ("train", "val"))
            name = f"r{r}k{k}"
            write_fold(store_root, name, {**fit, "test": parts[str(k)]}, bin_of)
            names.append(name)
    return names


def settings(variant: str, common: dict) -> dict:
    """The variant's TrainConfig values over the recipe, `common` (e.g. a proxy's shorter schedule) applied, its
    optimizer steps scaled by its relative speed."""
    values = {"recipe": "abid", **TRAINED[variant], **common}
    speed = values.pop("speed", 1.0)
    if speed != 1.0:
        values["steps_scale"] = speed
    return values


def run_trained(variant: str, store: str, fold: str, cache: Path, scratch: Path, common: dict,
                original: set[str]) -> dict:
    run = f"{fold}-{variant.strip('-').replace(' ', '_').replace('(', '').replace(')', '')}"
    values = settings(variant, common)
    scale = values.pop("steps_scale", None)
    base = {"store": store, "dataset": fold, "run": run, "cache_dir": str(cache), "resume": True}
    if scale is not None:
        reference = load_train_config(None, {**values, **base})
        per_epoch = len(load_split(open_store(store), fold, "train", CLASSES)) // reference.batch_size
        total = reference.steps or reference.epochs * per_epoch
        values["steps"] = max(1, round(total * scale))
        values["epochs"] = math.ceil(values["steps"] / per_epoch)
    train(load_train_config(None, {**values, **base}))
    history = [json.loads(line) for line in open_store(store).get_text(f"checkpoints/{run}/metrics.jsonl").splitlines()]
    result = _evaluate(store, f"{store}/models/{run}", fold, cache, scratch / run, original)
    result["epoch_s"] = statistics.fmean(h["epoch_time_s"] for h in history)
    result["train_s"] = sum(h["epoch_time_s"] for h in history)
    return result


def run_derived(variant: str, store: str, fold: str, cache: Path, scratch: Path, common: dict,
                original: set[str]) -> dict:
    """The recipe's weights, exported again with other inference settings, fitted on validation as training's
    export fits them (`calibration: none` keeps temperature 1)."""
    model = ExportedModel.load(f"{store}/models/{fold}-abid")
    settings = {"tta": model.inference.tta, "calibration": "temperature", "decode": model.inference.decode,
                **DERIVED[variant]}
    model = model.calibrated(Inference(settings["tta"]))
    val = BinImages(load_split(open_store(store), fold, "val", CLASSES),
                    ImageCache(open_store(store), cache, model.preprocessing.size), CLASSES)
    log_probs, targets = predict_log_probs(model.predictor(pick_device("auto")), val, 64, 0)
    model = model.calibrated(fit_inference(log_probs, targets, settings["tta"], settings["calibration"],
                                           settings["decode"]))
    target = scratch / f"{fold}-derived"
    shutil.rmtree(target, ignore_errors=True)
    model.save(open_store(str(target)), "model")
    return _evaluate(store, str(target / "model"), fold, cache, scratch / "derived-eval", original)


def _evaluate(store: str, model: str, fold: str, cache: Path, out: Path, original: set[str]) -> dict:
    """The test split's metrics, and the same metrics over its original-size photos only (what users send)."""
    metrics = evaluate(EvaluateConfig(store=store, model=model, dataset=fold, split="test", out=str(out),
                                      cache_dir=str(cache), workers=0)).metrics
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["key"] in original]
    result = {m: metrics[m] for m in METRICS}
    if kept:
        counted = counting([r["label"] for r in kept], [r["count"] for r in kept], CLASSES)
        result.update({f"orig_{m}": counted[m] for m in ("balanced_accuracy", "mae")}, orig_samples=len(kept))
    return result


def table(results: dict[str, dict[str, dict]], base: str) -> str:
    """Mean ± std over folds per variant, over all test photos and over the original-size ones (orig.), and the
    paired difference to `base` on the folds both ran."""
    columns = [("balanced_accuracy", "balanced acc"), ("mae", "MAE"), ("within_one_accuracy", "within one"),
               ("ece", "ECE"), ("orig_balanced_accuracy", "orig. bal. acc"), ("orig_mae", "orig. MAE")]
    lines = [f"{'variant':32s} {'folds':>5s}  " + "  ".join(f"{title:>13s}" for _, title in columns)
             + f"  {'s/epoch':>7s}  {'Δ bal. acc':>19s}  {'Δ orig. bal. acc':>19s}  {'Δ MAE':>19s}"]
    for variant, folds in results.items():
        if not folds:
            continue

        def stat(metric: str) -> str:
            values = [r[metric] for r in folds.values() if metric in r]
            return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}" if values else "-"

        def delta(metric: str) -> str:
            paired = [folds[f][metric] - results[base][f][metric] for f in folds
                      if f in results.get(base, {}) and metric in folds[f] and metric in results[base][f]]
            if variant == base or not paired:
                return ""
            higher = sum(d > 0 for d in paired)
            return f"{statistics.fmean(paired):+.3f} ± {statistics.pstdev(paired):.3f} ({higher}/{len(paired)}↑)"

        epoch = [r["epoch_s"] for r in folds.values() if "epoch_s" in r]
        lines.append(f"{variant:32s} {len(folds):5d}  " + "  ".join(f"{stat(m):>13s}" for m, _ in columns)
                     + f"  {statistics.fmean(epoch) if epoch else float('nan'):7.1f}  {delta('balanced_accuracy'):>19s}"
                     f"  {delta('orig_balanced_accuracy'):>19s}  {delta('mae'):>19s}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", choices=("all", "sample"), default="all" if (MORE / "metadata").is_dir() else "sample",
                        help="all: the sample and abid-more (5,987 photos; default where present); sample: 407")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the recipe and the baselines")
    parser.add_argument("--ablation-repeats", type=int, default=1, help="repeats of every ablation (the first ones)")
    parser.add_argument("--ablation-folds", type=int, default=0,
                        help="train ablations on the first N folds of a repeat only (paired with the recipe's); 0: all")
    parser.add_argument("--only-folds", type=int, default=0,
                        help="run every variant on the first N folds of a repeat only (a proxy's screen); 0: all")
    parser.add_argument("--val-share", type=float, default=None,
                        help="validation share of each fold's training photos (default 0.2 of the sample, 0.1 of the pool)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training setting for every variant, e.g. a proxy's epochs=3 (repeatable)")
    parser.add_argument("--base", default="abid", help="the variant the paired differences are taken to")
    parser.add_argument("--work", default="", help="keep the store, cache and models here, so a rerun resumes")
    parser.add_argument("--variants", default=",".join([*TRAINED, *DERIVED]))
    parser.add_argument("--out", default="real_recipe.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--split-by", choices=("bin", "photo"), default="bin",
                        help="keep the photos of one bin in one fold (default), or split photo by photo")
    args = parser.parse_args()
    missing = [str(p) for p in pool_sources(args.pool) if not (p / "metadata").is_dir()]
    if missing:
        print(f"the real photos are not at {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(TRAINED) - set(DERIVED)
    if unknown:
        print(f"unknown variant(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    common = {}
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            print(f"--set expects KEY=VALUE, got {pair!r}", file=sys.stderr)
            return 2
        common[key.strip()] = yaml.safe_load(value)
    val_share = args.val_share if args.val_share is not None else (0.1 if args.pool == "all" else 0.2)
    print(f"abid recipe: {recipe_settings('abid')}; for every variant: {common}", file=sys.stderr)
    out = Path(args.out)
    results: dict[str, dict[str, dict]] = json.loads(out.read_text()) if out.is_file() else {}
    original = originals(args.pool)
    with tempfile.TemporaryDirectory(prefix="bincount-real-recipe-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        refused = claim_work(work, {"pool": args.pool, "folds": args.folds, "split_by": args.split_by,
                                    "val_share": val_share, "set": common})
        if refused:
            print(refused, file=sys.stderr)
            return 2
        root = work / "store"
        link_pool(root, args.pool)
        folds = make_folds(root, args.folds, args.repeats, args.split_by == "bin", val_share)
        for variant in sorted(variants, key=lambda v: v in DERIVED):          # derived ones need the recipe first
            for fold in folds:
                repeat, k = int(fold[1:fold.index("k")]), int(fold[fold.index("k") + 1:])
                main_variant = variant in MAIN or variant in DERIVED
                if repeat >= (args.repeats if main_variant else args.ablation_repeats):
                    continue
                if (not main_variant and args.ablation_folds and k >= args.ablation_folds
                        or args.only_folds and k >= args.only_folds):
                    continue
                if fold in results.get(variant, {}):
                    continue
                start = time.perf_counter()
                run: Callable = run_trained if variant in TRAINED else run_derived
                results.setdefault(variant, {})[fold] = run(variant, str(root), fold, work / "cache", work, common,
                                                            original)
                print(f"{fold} {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[variant][fold].items())
                      + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
                out.write_text(json.dumps(results, indent=1))
    print(table(results, args.base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
