"""The `abid` recipe on real photos: repeated stratified k-fold over the 407-photo ABID sample, against
resnet18 from scratch and a linear probe on frozen EfficientNet-Lite0 features, with each element of the recipe
taken away in turn (ablation).

Every variant trains and evaluates through bincount itself (`bincount.train.loop.train`, then
`bincount.evaluate.evaluate`) on the same folds: for repeat r, the photos are split into `--folds` stratified
folds (seed r) of whole bins, as `bincount data prepare` splits (photos that list a product in common are one
bin before and after a pick, with other counts: split apart, recognising the bin scores its twin's count);
fold k is the test split, untouched by every choice, and the rest is split again, stratified, into train and
validation (the validation split picks the best epoch and fits the temperature). Variants that
differ from the recipe only in how the exported model predicts (no TTA, no calibration, another decoding) are
not retrained: the recipe's own weights are re-exported with that inference, the temperature refitted on
validation exactly as training's export does.

It prints, per variant, the mean ± std over folds of balanced accuracy, MAE, within-one accuracy, accuracy and
calibration error, the training time per epoch (on this machine), and each variant's difference to the recipe
on the same folds; `--out` keeps every fold's numbers as JSON.

    .venv/bin/python benchmarks/real_recipe.py [--folds 5] [--repeats 3] [--variants abid,resnet18-scratch,...]
        [--ablation-repeats 1] [--ablation-folds 0] [--split-by bin|photo] [--work DIR] [--out real_recipe.json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bincount.config import EvaluateConfig, load_train_config, recipe_settings
from bincount.data.dataset import BinImages, ImageCache, load_split
from bincount.data.prepare import Sample, group_same_bin, stratified_split
from bincount.devices import pick_device
from bincount.evaluate import evaluate, predict_log_probs
from bincount.model.exported import ExportedModel, Inference, fit_temperature
from bincount.store import open_store
from bincount.train.loop import train

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abid-sample"
CLASSES = (1, 2, 3, 4, 5)
VAL_SHARE = 0.2
# name → settings over the abid recipe (trained), or → inference changes of the recipe's model (re-exported)
TRAINED: dict[str, dict] = {
    "abid": {},
    "resnet18-scratch": {"recipe": "quickstart", "class_weights": "balanced"},
    "lite0-linear-probe": {"arch": "efficientnet_lite0", "freeze": "backbone", "lr": 0.01, "epochs": 30,
                           "backbone_lr_scale": 1.0},
    "-pretrained": {"weights": "none"},
    "-ordinal loss (ce)": {"loss": "ce"},
    "-class weights": {"class_weights": "none"},
    "-counting augment (flip)": {"augment": "flip"},
    "-lower backbone lr": {"backbone_lr_scale": 1.0},
    "backbone lr 0.1x": {"backbone_lr_scale": 0.1},
    "ema (half-life 2 epochs)": {"ema_half_life": 2.0},
    "monitor val_loss": {"monitor": "val_loss"},
    "-same-bin ranking": {"same_bin_rank_weight": 0.0},
    "same-bin ranking (weight 0.3)": {"same_bin_rank_weight": 0.3},
    "same-bin ranking (weight 3)": {"same_bin_rank_weight": 3.0},
    "at 288 px": {"image_size": 288},
    "frozen to blocks.1 for 15 epochs": {"freeze": "blocks.1", "epochs": 15},
}
DERIVED: dict[str, dict] = {
    "-tta": {"tta": "none"},
    "-calibration": {"calibrate": False},
    "median decode": {"decode": "median"},
}
MAIN = ("abid", "resnet18-scratch", "lite0-linear-probe")
METRICS = ("balanced_accuracy", "mae", "within_one_accuracy", "accuracy", "ece")


def write_fold(store_root: Path, name: str, splits: dict[str, list[Sample]], bin_of: dict[str, str]) -> None:
    """The split manifests as prepare writes them: a photo of a bin with several photos carries the bin."""
    for split, samples in splits.items():
        path = store_root / "datasets" / name / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(
            json.dumps({"key": s.key, "label": s.label, **({"bin": bin_of[s.key]} if s.key in bin_of else {})})
            + "\n" for s in sorted(samples, key=lambda s: s.key)))


def make_folds(store_root: Path, folds: int, repeats: int, by_bin: bool) -> list[str]:
    """Stratified folds of whole groups, as `bincount data prepare` splits: by bin, the photos sharing a product
    (one bin before and after a pick) never straddle train, validation and test; by photo, they may."""
    samples = []
    for path in sorted((SAMPLE / "metadata").glob("*.json")):
        meta = json.loads(path.read_text())
        samples.append(Sample(path.stem, meta["EXPECTED_QUANTITY"], path.stem,
                              frozenset(meta["BIN_FCSKU_DATA"]) if by_bin else frozenset()))
    groups = group_same_bin([[s] for s in samples])
    bin_of = {s.key: g[0].key for g in groups if len(g) > 1 for s in g}
    names = []
    for r in range(repeats):
        parts = stratified_split(groups, [1 / folds] * folds, random.Random(r), [str(k) for k in range(folds)])
        for k in range(folds):
            test = {s.key for s in parts[str(k)]}
            rest = [g for g in groups if g[0].key not in test]
            fit = stratified_split(rest, [1 - VAL_SHARE, VAL_SHARE], random.Random(1000 + 10 * r + k), ("train", "val"))
            name = f"r{r}k{k}"
            write_fold(store_root, name, {**fit, "test": parts[str(k)]}, bin_of)
            names.append(name)
    return names


def run_trained(variant: str, store: str, fold: str, cache: Path, scratch: Path) -> dict:
    run = f"{fold}-{variant.strip('-').replace(' ', '_').replace('(', '').replace(')', '')}"
    cfg = load_train_config(None, {"recipe": "abid", **TRAINED[variant], "store": store, "dataset": fold,
                                   "run": run, "cache_dir": str(cache), "resume": False})
    train(cfg)
    history = [json.loads(line) for line in open_store(store).get_text(f"checkpoints/{run}/metrics.jsonl").splitlines()]
    result = _evaluate(store, f"{store}/models/{run}", fold, cache, scratch / run)
    result["epoch_s"] = statistics.fmean(h["epoch_time_s"] for h in history)
    return result


def run_derived(variant: str, store: str, fold: str, cache: Path, scratch: Path) -> dict:
    """The recipe's weights, exported again with other inference settings, as training's export would."""
    source = f"{store}/models/{fold}-abid"
    model = ExportedModel.load(source)
    change = dict(DERIVED[variant])
    calibrate = change.pop("calibrate", True)
    inference = Inference(**{**model.describe()["inference"], "temperature": 1.0, **change})
    model = model.calibrated(inference)
    if calibrate:
        val = BinImages(load_split(open_store(store), fold, "val", CLASSES),
                        ImageCache(open_store(store), cache, model.preprocessing.size), CLASSES)
        log_probs, targets = predict_log_probs(model.predictor(pick_device("auto")), val, 64, 0)
        model = model.calibrated(Inference(inference.tta, fit_temperature(log_probs, targets), inference.decode))
    target = scratch / f"{fold}-derived"
    shutil.rmtree(target, ignore_errors=True)
    model.save(open_store(str(target)), "model")
    return _evaluate(store, str(target / "model"), fold, cache, scratch / "derived-eval")


def _evaluate(store: str, model: str, fold: str, cache: Path, out: Path) -> dict:
    metrics = evaluate(EvaluateConfig(store=store, model=model, dataset=fold, split="test", out=str(out),
                                      cache_dir=str(cache), workers=0)).metrics
    return {m: metrics[m] for m in METRICS}


def table(results: dict[str, dict[str, dict]], base: str = "abid") -> str:
    lines = [f"{'variant':28s} {'folds':>5s}  {'balanced acc':>14s}  {'MAE':>14s}  {'within one':>14s}  "
             f"{'accuracy':>14s}  {'ECE':>13s}  {'s/epoch':>7s}  {'Δ bal. acc vs abid':>19s}  {'Δ MAE':>13s}"]
    for variant, folds in results.items():
        if not folds:
            continue

        def stat(metric: str, rows: dict = folds) -> str:
            values = [r[metric] for r in rows.values()]
            return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"

        def delta(metric: str) -> str:
            paired = [folds[f][metric] - results[base][f][metric] for f in folds if f in results.get(base, {})]
            if variant == base or not paired:
                return ""
            return f"{statistics.fmean(paired):+.3f} ± {statistics.pstdev(paired):.3f} (n={len(paired)})"

        epoch = [r["epoch_s"] for r in folds.values() if "epoch_s" in r]
        lines.append(f"{variant:28s} {len(folds):5d}  {stat('balanced_accuracy'):>14s}  {stat('mae'):>14s}  "
                     f"{stat('within_one_accuracy'):>14s}  {stat('accuracy'):>14s}  {stat('ece'):>13s}  "
                     f"{statistics.fmean(epoch) if epoch else float('nan'):7.1f}  "
                     f"{delta('balanced_accuracy'):>19s}  {delta('mae'):>13s}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the recipe and the two baselines")
    parser.add_argument("--ablation-repeats", type=int, default=1, help="repeats of every ablation (the first ones)")
    parser.add_argument("--ablation-folds", type=int, default=0,
                        help="train ablations on the first N folds of a repeat only (paired with the recipe's); 0: all")
    parser.add_argument("--work", default="", help="keep the store, cache and models here, so a rerun resumes")
    parser.add_argument("--variants", default=",".join([*TRAINED, *DERIVED]))
    parser.add_argument("--out", default="real_recipe.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--split-by", choices=("bin", "photo"), default="bin",
                        help="keep the photos of one bin in one fold (default), or split photo by photo")
    args = parser.parse_args()
    if not (SAMPLE / "metadata").is_dir():
        print(f"the ABID sample is not at {SAMPLE}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(TRAINED) - set(DERIVED)
    if unknown:
        print(f"unknown variant(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    print(f"abid recipe: {recipe_settings('abid')}", file=sys.stderr)
    out = Path(args.out)
    results: dict[str, dict[str, dict]] = json.loads(out.read_text()) if out.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="bincount-real-recipe-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        root = work / "store"
        for sub in ("bin-images", "metadata"):
            if not (root / "raw" / sub).is_dir():
                shutil.copytree(SAMPLE / sub, root / "raw" / sub)
        folds = make_folds(root, args.folds, args.repeats, args.split_by == "bin")
        for fold in folds:
            repeat, k = int(fold[1:fold.index("k")]), int(fold[fold.index("k") + 1:])
            for variant in sorted(variants, key=lambda v: v != "abid"):      # derived ones need the recipe first
                main_variant = variant in MAIN or variant in DERIVED
                if repeat >= (args.repeats if main_variant else args.ablation_repeats):
                    continue
                if not main_variant and args.ablation_folds and k >= args.ablation_folds:
                    continue
                if fold in results.get(variant, {}):
                    continue
                start = time.perf_counter()
                run: Callable = run_trained if variant in TRAINED else run_derived
                results.setdefault(variant, {})[fold] = run(variant, str(root), fold, work / "cache", work)
                print(f"{fold} {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[variant][fold].items())
                      + f" ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
                out.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
