"""How well the audit finds wrong expected quantities: p_mismatch against random order and the naive flag.

For each photo set (synthetic bins, and the real ABID sample where ../shared is present) it prepares a dataset
(split 0.5/0.2/0.3), trains a model — `--train probe`: the cheap way (ImageNet EfficientNet-Lite0, frozen
backbone, head on cached features, temperature-calibrated on the validation split); `--train abid`: the abid
recipe (fine-tuned Lite0, ordinal loss, dihedral TTA, temperature, argmax decoding) — then plants wrong expected
quantities on a fraction of the test split's bins (each moved by ±1 or ±2 within 1-5) and runs `bincount audit` with that CSV. Planted bins are
the positives. For the first seed the ranking is the audit's own output; for the other seeds the same formula,
p_mismatch = 1 − P(count = expected), is applied to the probabilities the audit recorded (the model's answers do
not depend on the plant). Printed per set: AUROC and precision@k (k = planted bins) of

  p_mismatch      the audit's ranking
  naive           "predicted count ≠ expected" (a yes/no flag: its precision and recall, and AUROC as a 0/1 score)
  random          a random order (AUROC 0.5; precision@k = the planted fraction, in expectation)

The real sample's own EXPECTED_QUANTITY is noisy, so some "clean" bins are wrong too: a floor on precision.

    python benchmarks/audit_quality.py [--sets synthetic,real] [--fraction 0.15] [--seeds 20] [--n 1000]

Measured 2026-12-03 (defaults; AUROC / precision@k, mean ± sd over 20 seeds):
  synthetic, 300 test bins, model accuracy 0.58: p_mismatch 0.835 / 0.572, naive 0.717 / 0.259, random 0.521 / 0.141
  real ABID sample, split by bin as prepare now splits (2026-12-06; a bin's photos before and after a pick
  share products and differ in count, and none is in two splits), 121 test bins:
  --train probe (a linear probe on 200 photos), test accuracy 0.23:
    p_mismatch 0.561 / 0.217, naive 0.522 / 0.144, random 0.505 / 0.161
  --train abid (fine-tuned on 203 photos, 280 s), test accuracy 0.22:
    p_mismatch 0.582 / 0.264, naive 0.492 / 0.136, random 0.508 / 0.167
  Near chance: on bins it has never seen, ~200 photos do not train a model that counts real bins, and the
  audit can only be as good as its model; its probabilities still rank a little above both baselines.
Measured 2026-12-06 on the real pool (`--sets real --fraction 0.2 --store … --model r0k0-abid --dataset r0k0`:
the abid recipe trained 1,242 steps on real_recipe.py's fold 0 of the 5,987 photos, 1,997 test photos of unseen
bins, 399 planted per seed, 20 seeds), test accuracy 0.359:
    p_mismatch 0.667 / 0.372, naive 0.582 / 0.247, random 0.496 / 0.196
  error rate estimated from the audit 0.074 (planted 0.20: the weak model's doubt spreads over every bin, so the
  estimate runs low and the policies err on the side of flagging fewer); flagged at the default target precision
  0.5: 39 ± 16 bins, expected precision 0.50, planted among them 0.73; the 399 most likely: planted 0.37.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bincount.audit import audit, flagging
from bincount.backends import LocalBackend
from bincount.config import AuditConfig, PrepareConfig, SyntheticConfig, TrainConfig, load_train_config
from bincount.data.dataset import load_split
from bincount.data.prepare import prepare
from bincount.data.synthetic import generate
from bincount.store import open_store
from bincount.train.loop import train

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "abid-sample"
CLASSES = (1, 2, 3, 4, 5)
DATASET = "quality"


def build(store: Path, photos: str, n: int, seed: int, how: str) -> None:
    if photos == "synthetic":
        generate(SyntheticConfig(dest=str(store), n=n, seed=seed, workers=2))
    else:
        for folder in ("bin-images", "metadata"):
            shutil.copytree(SAMPLE / folder, store / "raw" / folder)
    prepare(PrepareConfig(store=str(store), name=DATASET, balance="none", split=(0.5, 0.2, 0.3), seed=seed))
    if how == "abid":
        train(load_train_config(None, {"recipe": "abid", "store": str(store), "dataset": DATASET, "run": "quality",
                                       "workers": 0, "cache_dir": str(store / "cache")}))
        return
    train(TrainConfig(store=str(store), dataset=DATASET, run="quality", arch="efficientnet_lite0", weights="imagenet",
                      freeze="backbone", feature_cache=True, image_size=224, augment="none", epochs=40,
                      batch_size=32, lr=3e-3, warmup_epochs=0.0, class_weights="balanced",
                      calibration="temperature", tta="none", decode="argmax", workers=0,
                      cache_dir=str(store / "cache")))


def plant(truth: dict[str, int], fraction: float, rng: random.Random) -> tuple[dict[str, int], set[str]]:
    """Expected quantities: the truth, except `fraction` of the bins moved by ±1 or ±2 (staying within 1-5)."""
    keys = sorted(truth)
    planted = set(rng.sample(keys, round(fraction * len(keys))))
    expected = dict(truth)
    for key in planted:
        shifts = [d for d in (-2, -1, 1, 2) if truth[key] + d in CLASSES]
        expected[key] = truth[key] + rng.choice(shifts)
    return expected, planted


def auroc(scores: list[float], positive: list[bool]) -> float:
    """The probability that a random positive outranks a random negative (ties count half)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    npos = sum(positive)
    nneg = len(positive) - npos
    return (sum(r for r, p in zip(ranks, positive) if p) - npos * (npos + 1) / 2) / (npos * nneg)


def precision_at(scores: list[float], positive: list[bool], k: int, rng: random.Random) -> float:
    """Precision of the top k; ties at the cut are broken at random."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], rng.random()))
    return sum(positive[i] for i in order[:k]) / k


def flag_rows(scores: dict[str, float], planted: set[str]) -> dict:
    """What the audit's flagging would do with these p_mismatch values: the error rate it estimates, and for the
    default precision target and for a review budget of the planted count, how many bins it flags and their
    expected and actual precision (planted bins as the wrong ones)."""
    histogram = flagging.Histogram()
    for m in scores.values():
        histogram.add(m)
    rate = flagging.estimate_error_rate(histogram, len(CLASSES))
    ranked = sorted(scores, key=lambda k: -scores[k])
    out = {"error_rate": rate}
    for name, policy in (("target", flagging.Policy(precision=0.5)), ("review", flagging.Policy(review=len(planted)))):
        flags = flagging.flags(histogram, [scores[k] for k in ranked], policy, rate, len(CLASSES))
        chosen = ranked[:flags.count]
        out[f"{name}_flagged"] = flags.count
        out[f"{name}_expected_precision"] = flags.precision or 0.0
        out[f"{name}_precision"] = sum(k in planted for k in chosen) / len(chosen) if chosen else 0.0
    return out


def evaluate_set(photos: str, args: argparse.Namespace, root: Path) -> dict:
    start = time.perf_counter()
    if args.store:
        store, dataset = Path(args.store), args.dataset
    else:
        store, dataset = root / photos, DATASET
        build(store, photos, args.n, 0, args.train)
    built = time.perf_counter() - start
    truth = {item.key: item.label for item in load_split(open_store(str(store)), dataset, "test", CLASSES)}
    rows = []
    probabilities: dict[str, dict[str, float]] = {}
    for seed in range(args.seeds):
        rng = random.Random(seed)
        expected, planted = plant(truth, args.fraction, rng)
        if seed == 0:
            path = store / "planted.csv"
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["key", "expected"])
                writer.writerows(sorted(expected.items()))
            start = time.perf_counter()
            shutil.rmtree(store / "audits/planted", ignore_errors=True)
            audit(AuditConfig(store=str(store), model=args.model, dataset=dataset, split="test", expected=str(path),
                              name="planted", precision="fp32"), LocalBackend())
            audited = time.perf_counter() - start
            records = [json.loads(line) for shard in sorted((store / "audits/planted/shards").glob("*.jsonl"))
                       for line in shard.read_text().splitlines()]
            probabilities = {r["key"]: r["probabilities"] for r in records}
            scores = {r["key"]: r["p_mismatch"] for r in records}
        else:
            scores = {k: 1.0 - probabilities[k][str(v)] for k, v in expected.items()}
        keys = sorted(truth)
        positive = [k in planted for k in keys]
        p = [scores[k] for k in keys]
        predicted = {r["key"]: r["count"] for r in records}         # the model's own decoding
        naive = [float(predicted[k] != expected[k]) for k in keys]
        k = sum(positive)
        flagged = [i for i, x in enumerate(naive) if x]
        rows.append({
            "auroc": auroc(p, positive), "p@k": precision_at(p, positive, k, rng),
            "naive_auroc": auroc(naive, positive), "naive_p@k": precision_at(naive, positive, k, rng),
            "naive_precision": sum(positive[i] for i in flagged) / len(flagged) if flagged else 0.0,
            "naive_recall": sum(positive[i] for i in flagged) / k,
            "random_auroc": auroc([rng.random() for _ in keys], positive),
            "random_p@k": precision_at([rng.random() for _ in keys], positive, k, rng),
            **flag_rows(scores, planted),
        })
    accuracy = sum(predicted[k] == truth[k] for k in truth) / len(truth)
    return {"photos": photos, "train": f"model {args.model}" if args.store else args.train, "bins": len(truth), "planted": round(args.fraction * len(truth)),
            "accuracy": accuracy, "rows": rows, "build_s": built, "audit_s": audited}


def show(result: dict) -> None:
    rows = result["rows"]

    def ms(key: str) -> str:
        values = [r[key] for r in rows]
        return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"

    print(f"\n{result['photos']} ({result['train']}): {result['bins']} test bins, {result['planted']} planted per seed, "
          f"{len(rows)} seeds; model test accuracy {result['accuracy']:.3f} (data + training "
          f"{result['build_s']:.0f} s, audit {result['audit_s']:.1f} s)")
    print(f"  {'ranking':<12} {'AUROC':>15} {'precision@k':>15}")
    for name, prefix in (("p_mismatch", ""), ("naive", "naive_"), ("random", "random_")):
        print(f"  {name:<12} {ms(prefix + 'auroc'):>15} {ms(prefix + 'p@k'):>15}")
    print(f"  naive flag: precision {ms('naive_precision')}, recall {ms('naive_recall')}")
    print(f"  error rate estimated from the audit: {ms('error_rate')} (planted {result['planted'] / result['bins']:.3f},"
          " plus the labels' own errors)")
    for name, title in (("target", "expected precision ≥ 50 % (default)"), ("review", "review the planted count")):
        print(f"  flagged by {title}: {ms(name + '_flagged')} bins, expected precision "
              f"{ms(name + '_expected_precision')}, planted among them {ms(name + '_precision')}")
    base_auc = statistics.mean(r["naive_auroc"] for r in rows)
    base_p = statistics.mean(r["naive_p@k"] for r in rows)
    print(f"  ratio p_mismatch / naive: AUROC {statistics.mean(r['auroc'] for r in rows) / base_auc:.2f}x, "
          f"precision@k {statistics.mean(r['p@k'] for r in rows) / base_p:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="synthetic,real")
    parser.add_argument("--fraction", type=float, default=0.15)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--n", type=int, default=1000, help="synthetic photos")
    parser.add_argument("--train", choices=["probe", "abid"], default="probe",
                        help="probe: a head on frozen features (fast); abid: the abid recipe (fine-tuned)")
    parser.add_argument("--store", default="", help="audit a model trained already: its store (with --model and "
                        "--dataset, whose test split is audited; e.g. a fold of benchmarks/real_recipe.py's --work)")
    parser.add_argument("--model", default="quality", help="with --store: the run name of the model")
    parser.add_argument("--dataset", default=DATASET, help="with --store: the dataset whose test split is audited")
    args = parser.parse_args()
    sets = ["real"] if args.store else [s for s in args.sets.split(",") if s != "real" or SAMPLE.is_dir()]
    with tempfile.TemporaryDirectory(prefix="bincount-audit-quality-") as tmp:
        for photos in sets:
            show(evaluate_set(photos, args, Path(tmp)))
    if "real" in args.sets and not SAMPLE.is_dir():
        print(f"real photos skipped: no ABID sample at {SAMPLE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
