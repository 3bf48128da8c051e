"""The promotion gate: champion and challenger count the same photos, and a rule (`GateRule`) says whether the
challenger may replace the champion.

Both models are scored through the exported-model reader, as evaluate scores one (`evaluate.score`): their own
preprocessing, TTA, calibration and decoding. The comparison is paired, photo by photo: the differences in
accuracy, balanced accuracy and MAE get bootstrap intervals over the photos' bins (`stats`), and McNemar's exact
test says whether the photos only one of them counts right lean one way. Models that count different classes, or
a split either of them trained or was selected on, are refused: such a comparison would say nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from matplotlib.figure import Figure

from bincount import metrics as measures
from bincount.config import CompareConfig, EvaluateConfig, GateRule
from bincount.data.dataset import load_split
from bincount.data.prepare import dataset_key, read_manifest
from bincount.document import Heading, Para, Picture, Table, png, render_html, render_markdown
from bincount.errors import BincountError, ConfigError
from bincount.evaluate import Scored, score
from bincount.model.exported import ExportedModel, model_version
from bincount.rollout.stats import Difference, McNemar, mcnemar, paired_differences
from bincount.store import Store, open_store

FITTED_SPLITS = ("train", "val")                # trained on, and selected and calibrated on
LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "mae": "MAE"}


class Refused(BincountError):
    """The two models cannot be compared on this split."""


@dataclass(frozen=True)
class Check:
    rule: str                                   # min_accuracy, mae or balanced_accuracy
    passed: bool
    text: str


@dataclass
class GateResult:
    champion: str
    challenger: str
    dataset: str
    split: str
    photos: int
    clusters: int
    rule: GateRule
    differences: list[Difference]
    mcnemar: McNemar
    checks: list[Check]
    uri: str = ""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def decision(self) -> str:
        """Which rule decided: the first that failed, or all of them."""
        failed = next((c for c in self.checks if not c.passed), None)
        if failed:
            return f"refused by the {failed.rule} rule: {failed.text}"
        return "passed every rule: " + "; ".join(c.text for c in self.checks)

    def summary(self) -> dict:
        return {"champion": self.champion, "challenger": self.challenger, "dataset": self.dataset,
                "split": self.split, "photos": self.photos, "clusters": self.clusters, "rule": asdict(self.rule),
                "differences": {d.metric: {**asdict(d), "delta": d.delta} for d in self.differences},
                "mcnemar": {**asdict(self.mcnemar), "p_value": self.mcnemar.p_value},
                "checks": [asdict(c) for c in self.checks], "passed": self.passed, "decision": self.decision}

    def line(self) -> str:
        return (f"{self.challenger} vs champion {self.champion} on {self.photos} {self.split} photos of "
                f"{self.dataset}: {self.decision}; report: {self.uri}/report.html")


def judge(rule: GateRule, differences: list[Difference]) -> list[Check]:
    d = {x.metric: x for x in differences}
    level = f"{rule.confidence:.0%}"
    accuracy, mae, balanced = d["accuracy"], d["mae"], d["balanced_accuracy"]
    return [
        Check("min_accuracy", accuracy.challenger >= rule.min_accuracy,
              f"challenger accuracy {accuracy.challenger:.4f} {'≥' if accuracy.challenger >= rule.min_accuracy else '<'} "
              f"{rule.min_accuracy:.4f}"),
        Check("mae", mae.high <= rule.mae_margin,
              f"challenger MAE − champion MAE is {mae.delta:+.4f} ({level} interval {mae.low:+.4f} … {mae.high:+.4f}); "
              f"its upper end {'is within' if mae.high <= rule.mae_margin else 'exceeds'} the allowed "
              f"{rule.mae_margin:+.4f}"),
        Check("balanced_accuracy", -balanced.delta <= rule.balanced_accuracy_margin,
              f"balanced accuracy {balanced.challenger:.4f} against the champion's {balanced.champion:.4f} "
              f"({balanced.delta:+.4f}; {level} interval {balanced.low:+.4f} … {balanced.high:+.4f}), "
              f"{'within' if -balanced.delta <= rule.balanced_accuracy_margin else 'beyond'} the allowed drop of "
              f"{rule.balanced_accuracy_margin:.4f}"),
    ]


def check_comparable(champion: ExportedModel, challenger: ExportedModel, names: tuple[str, str], store: Store,
                     dataset: str, split: str) -> None:
    if champion.classes != challenger.classes:
        raise Refused(f"cannot compare: champion {names[0]} counts {list(champion.classes)}, challenger {names[1]} "
                      f"counts {list(challenger.classes)}")
    keys = None
    for model, role, name in ((champion, "champion", names[0]), (challenger, "challenger", names[1])):
        trained = (model.meta.get("config") or {}).get("dataset")
        if trained == dataset and split in FITTED_SPLITS:
            raise Refused(f"cannot compare on the {split} split of {dataset}: the {role} {name} was "
                          f"{'trained' if split == 'train' else 'selected and calibrated'} on it; compare on test")
        if trained and trained != dataset:
            keys = keys if keys is not None else {r["key"] for r in read_manifest(store, dataset, split)}
            seen = _fitted_keys(store, trained) & keys
            if seen:
                raise Refused(f"cannot compare on the {split} split of {dataset}: {len(seen)} of its photos are in "
                              f"the train or val split of {trained}, which the {role} {name} was fitted on")


def _fitted_keys(store: Store, dataset: str) -> set[str]:
    """Photos of a dataset's train and val splits, where that dataset is in this store."""
    return {r["key"] for split in FITTED_SPLITS if store.exists(dataset_key(dataset, f"{split}.jsonl"))
            for r in read_manifest(store, dataset, split)}


def compare(cfg: CompareConfig) -> GateResult:
    """Scores both models, writes the report to `cfg.out` (default reports/<challenger>/compare-<champion>/)."""
    _check_rule(cfg.rule)
    store = open_store(cfg.store)
    champion = ExportedModel.load(cfg.champion, cfg.store)
    challenger = ExportedModel.load(cfg.challenger, cfg.store)
    names = (model_version(cfg.champion, champion.meta), model_version(cfg.challenger, challenger.meta))
    if names[0] == names[1] and cfg.champion == cfg.challenger:
        raise Refused(f"cannot compare {names[0]} with itself")
    check_comparable(champion, challenger, names, store, cfg.dataset, cfg.split)
    base = EvaluateConfig(store=cfg.store, model="", dataset=cfg.dataset, out="", split=cfg.split,
                          batch_size=cfg.batch_size, workers=cfg.workers, cache_dir=cfg.cache_dir, data=cfg.data,
                          device=cfg.device, precision=cfg.precision)
    a = score(replace(base, model=cfg.champion), champion)
    b = score(replace(base, model=cfg.challenger), challenger)
    result, per_model = _paired(a, b, names, cfg, {i.key: i.bin or i.key
                                                   for i in load_split(store, cfg.dataset, cfg.split, None)})
    out = open_store(cfg.out or store.url(f"reports/{names[1]}/compare-{names[0]}"))
    out.check(write=True)
    result.uri = out.uri
    write_report(out, result, per_model, champion.classes)
    return result


def _check_rule(rule: GateRule) -> None:
    if not 0.5 <= rule.confidence < 1:
        raise ConfigError(f"gate rule: confidence must be in [0.5, 1), got {rule.confidence}")
    if rule.bootstrap < 100:
        raise ConfigError(f"gate rule: bootstrap needs at least 100 resamples, got {rule.bootstrap}")
    if rule.mae_margin < 0 or rule.balanced_accuracy_margin < 0:
        raise ConfigError("gate rule: margins are how much worse the challenger may be, so never negative")


def _paired(a: Scored, b: Scored, names: tuple[str, str], cfg: CompareConfig,
            clusters: dict[str, str]) -> tuple[GateResult, dict[str, dict]]:
    """Both models' counts of the photos both of them read (a photo a shard left out is left out of both)."""
    first = dict(zip(a.keys, zip(a.labels, a.counts)))
    second = dict(zip(b.keys, b.counts))
    keys = [k for k in first if k in second]
    if not keys:
        raise Refused(f"the two models share no photo of the {cfg.split} split of {cfg.dataset}")
    truth = [first[k][0] for k in keys]
    champion, challenger = [first[k][1] for k in keys], [second[k] for k in keys]
    groups = [clusters.get(k, k) for k in keys]
    classes = a.model.classes
    differences = paired_differences(truth, champion, challenger, groups, classes, cfg.rule.confidence,
                                     cfg.rule.bootstrap, cfg.rule.seed)
    result = GateResult(names[0], names[1], cfg.dataset, cfg.split, len(keys), len(set(groups)), cfg.rule,
                        differences, mcnemar(truth, champion, challenger), judge(cfg.rule, differences))
    per_model = {names[0]: measures.counting(truth, champion, classes),
                 names[1]: measures.counting(truth, challenger, classes)}
    return result, per_model


# ---- the report ---------------------------------------------------------------------------------------------

def write_report(out: Store, result: GateResult, per_model: dict[str, dict], classes: tuple[int, ...]) -> None:
    figures = {"differences.png": png(_differences_figure(result)),
               "recall.png": png(_recall_figure(per_model, classes))}
    blocks = _document(result, per_model)
    for name, data in figures.items():
        out.put(name, data)
    out.put_text("summary.json", json.dumps(result.summary(), indent=2) + "\n")
    out.put_text("report.md", render_markdown(blocks))
    out.put_text("report.html", render_html(blocks, figures, f"{result.challenger} vs {result.champion}"))


def _document(r: GateResult, per_model: dict[str, dict]) -> list:
    m = r.mcnemar
    level = f"{r.rule.confidence:.0%}"
    return [
        Heading(f"Promotion gate: {r.challenger} against champion {r.champion}", 1),
        Para(f"{'PASSED' if r.passed else 'REFUSED'}. {r.decision[0].upper()}{r.decision[1:]}."),
        Para(f"Both models counted the same {r.photos} photos of the {r.split} split of {r.dataset} ({r.clusters} "
             f"bins: photos of one bin are resampled together). Intervals: {level}, percentile bootstrap of "
             f"{r.rule.bootstrap} resamples (seed {r.rule.seed})."),
        Heading("The rule"),
        Table(["rule", "result", "reading"], [[c.rule, "pass" if c.passed else "FAIL", c.text] for c in r.checks]),
        Heading("Paired differences (challenger − champion)"),
        Table(["metric", r.champion, r.challenger, "difference", f"{level} interval"],
              [[LABELS[d.metric], f"{d.champion:.4f}", f"{d.challenger:.4f}", f"{d.delta:+.4f}",
                f"{d.low:+.4f} … {d.high:+.4f}"] for d in r.differences]),
        Picture("differences.png", "Differences with their intervals; dashed: the rule's allowed margins"),
        Heading("McNemar's test"),
        Para(f"Of the photos exactly one model counted right, the champion alone got {m.champion_only} and the "
             f"challenger alone {m.challenger_only}; both got {m.both}, neither {m.neither}. Exact two-sided "
             f"p-value {m.p_value:.4g} (photo by photo, as the test assumes)."),
        Heading("Each model on these photos"),
        Table(["model", "accuracy", "balanced accuracy", "MAE", "within one item"],
              [[name, f"{v['accuracy']:.4f}", f"{v['balanced_accuracy']:.4f}", f"{v['mae']:.4f}",
                f"{v['within_one_accuracy']:.4f}"] for name, v in per_model.items()]),
        Picture("recall.png", "Recall per count (the share of each count's photos counted right)"),
    ]


def _differences_figure(r: GateResult) -> Figure:
    fig = Figure(figsize=(7, 3.2))
    axes = fig.subplots(1, len(r.differences))
    allowed = {"mae": r.rule.mae_margin, "balanced_accuracy": -r.rule.balanced_accuracy_margin}
    for ax, d in zip(axes, r.differences):
        ax.errorbar([0], [d.delta], yerr=[[d.delta - d.low], [d.high - d.delta]], fmt="o", color="#4c72b0",
                    capsize=6)
        ax.axhline(0, color="#888", linewidth=0.8)
        if d.metric in allowed:
            ax.axhline(allowed[d.metric], color="#c44e52", linestyle="--", linewidth=1)
        ax.set_xticks([])
        ax.set_title(f"{LABELS[d.metric]}\n{'lower' if d.metric == 'mae' else 'higher'} is better", fontsize=10)
    fig.tight_layout()
    return fig


def _recall_figure(per_model: dict[str, dict], classes: tuple[int, ...]) -> Figure:
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    width = 0.8 / len(per_model)
    for i, (name, m) in enumerate(per_model.items()):
        ax.bar([x + (i - 0.5) * width for x in range(len(classes))],
               [m["per_class"][str(c)]["recall"] for c in classes], width, label=name,
               color=("#4c72b0", "#dd8452")[i % 2])
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set(xlabel="items in the bin", ylabel="recall", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    return fig
