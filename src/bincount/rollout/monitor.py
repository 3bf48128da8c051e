"""The drift report of an endpoint: what its prediction log says it was asked and answered over a window, against
what it was built on.

Inputs: the photos' size, aspect ratio, brightness, contrast and sharpness (`imagestats`), against the same
statistics of the reference split's photos, measured by the same function at the same input size. Answers: per
model version, the predicted counts and the confidence (the top probability), against that version's answers on
held-out photos (its evaluation's predictions.jsonl), where it was evaluated; all predicted counts are also set
against the reference split's labels, which a biased model differs from without any drift, so that row is judged
only when a threshold is configured for it. Each comparison is a population stability index over the reference's
quantile bins (a count's own classes), with a plot; a PSI over its threshold is drift, and `monitor` exits 2.

Log objects that are corrupt or cut short are skipped and counted, never fatal; the drops the servers counted are
reported from the objects' headers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
from matplotlib.figure import Figure

from bincount.config import MonitorConfig
from bincount.data.abid import image_key
from bincount.data.dataset import load_split
from bincount.document import Heading, Para, Picture, Table, png, render_html, render_markdown
from bincount.errors import ALERT_EXIT, ConfigError
from bincount.evaluate import report_prefix
from bincount.model.preprocess import ImageError, read_photo
from bincount.rollout.imagestats import FEATURES, features, measure
from bincount.rollout.predlog import LogRead, read_log
from bincount.rollout.registry import check_endpoint
from bincount.rollout.stats import binned, psi, psi_noise, quantile_edges
from bincount.store import KeyNotFoundError, Store, StoreError, open_store

AGE = re.compile(r"^(\d+)([mhd])$")
AGE_UNITS = {"m": 60, "h": 3600, "d": 86400}
THRESHOLD_NAMES = (*FEATURES, "count", "confidence", "count_vs_labels")
REFERENCE_VERSION = 1                           # of the cached reference statistics
TIME_BUCKETS = 24
LABELS = {"size": "size (megapixels)", "aspect": "aspect ratio (width / height)", "brightness": "brightness (mean luma)",
          "contrast": "contrast (luma std)", "sharpness": "sharpness (Laplacian variance)"}


@dataclass
class Comparison:
    """One feature of the logged answers or inputs against its reference."""

    name: str                                   # e.g. brightness, count r7, confidence r7
    feature: str                                # its threshold's name
    reference: str                              # what it is compared with
    n: int
    reference_n: int
    psi: float | None = None
    threshold: float | None = None
    noise: float | None = None                  # the PSI sampling alone reaches at the configured significance
    note: str = ""                              # why it is not judged

    @property
    def drifted(self) -> bool:
        return (self.psi is not None and self.threshold is not None and self.psi > self.threshold
                and self.psi > (self.noise or 0))

    @property
    def verdict(self) -> str:
        if self.psi is None or self.threshold is None:
            return f"not judged: {self.note}" if self.note else "not judged"
        return "DRIFT" if self.drifted else "ok"


@dataclass
class MonitorResult:
    uri: str
    endpoint: str
    start: datetime
    end: datetime
    records: int
    versions: dict[str, int]
    log: dict
    comparisons: list[Comparison] = field(default_factory=list)

    @property
    def drifted(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.drifted]

    @property
    def exit_code(self) -> int:
        return ALERT_EXIT if self.drifted else 0

    def summary(self) -> dict:
        return {"endpoint": self.endpoint, "start": _iso(self.start), "end": _iso(self.end), "records": self.records,
                "versions": self.versions, "log": self.log,
                "comparisons": [{**asdict(c), "drifted": c.drifted} for c in self.comparisons],
                "drifted": [c.name for c in self.drifted], "exit_code": self.exit_code}

    def line(self) -> str:
        drift = ", ".join(f"{c.name} (PSI {c.psi:.3f} > {max(c.threshold, c.noise):.3g})" for c in self.drifted)
        skipped = len(self.log["skipped"])
        return (f"endpoint {self.endpoint}, {_iso(self.start)} to {_iso(self.end)}: {self.records} prediction(s)"
                + (f", {skipped} log object(s) skipped as corrupt or partial" if skipped else "")
                + (f", {self.log['dropped']} dropped by the server(s)" if self.log["dropped"] else "")
                + (f"; DRIFT in {drift}" if drift else "; no drift over the thresholds")
                + f"; report: {self.uri}/report.html")


def window(since: str, until: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """[start, end) from an age (30m, 24h, 7d) or ISO 8601 time, and an ISO 8601 end (default now)."""
    end = _time(until, "until") if until else (now or datetime.now(timezone.utc))
    age = AGE.match(since)
    start = end - timedelta(seconds=int(age[1]) * AGE_UNITS[age[2]]) if age else _time(since, "since")
    if start >= end:
        raise ConfigError(f"monitor: the window is empty: since {_iso(start)} is not before until {_iso(end)}")
    return start, end


def _time(text: str, what: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"monitor: {what} {text!r} is not an ISO 8601 time like 2026-01-31T12:00:00Z nor an age "
                          "like 30m, 24h or 7d") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def monitor(cfg: MonitorConfig) -> MonitorResult:
    check_endpoint(cfg.endpoint)
    unknown = sorted(set(cfg.thresholds) - set(THRESHOLD_NAMES))
    if unknown:
        raise ConfigError(f"monitor: unknown threshold(s) {', '.join(unknown)}; valid: {', '.join(THRESHOLD_NAMES)}")
    if cfg.bins < 2 or cfg.min_records < 1 or not 0 < cfg.significance < 1:
        raise ConfigError(f"monitor: bins must be at least 2, min_records at least 1 and significance between 0 and "
                          f"1, got {cfg.bins}, {cfg.min_records} and {cfg.significance}")
    start, end = window(cfg.since, cfg.until)
    store = open_store(cfg.store)
    log = read_log(store, cfg.endpoint, start, end)
    items = load_split(store, cfg.reference, cfg.split, None)
    records = log.records
    sizes = Counter(r["input_size"] for r in records)
    size = sizes.most_common(1)[0][0] if sizes else None
    reference = _reference_stats(store, cfg, items, size) if size else {"rows": [], "failed": 0}
    result = MonitorResult("", cfg.endpoint, start, end, len(records), dict(Counter(r["model_version"] for r in records)),
                           _log_account(log))
    figures: dict[str, bytes] = {}
    logged = [features(r) for r in records if r["input_size"] == size]
    for name in FEATURES:
        current, ref = [f[name] for f in logged], [row[name] for row in reference["rows"]]
        comparison = _continuous(cfg, name, name, f"{cfg.split} photos of {cfg.reference}", current, ref)
        result.comparisons.append(comparison)
        figures[f"{name}.png"] = png(_histogram_figure(LABELS[name], ref, current, comparison))
    labels = [item.label for item in items]
    classes = sorted({*labels, *(r["count"] for r in records)})
    counts_by_version, held_out = {}, {}
    for version in result.versions:
        mine = [r for r in records if r["model_version"] == version]
        counts_by_version[version] = [r["count"] for r in mine]
        held_out[version] = _held_out(store, version)
        confidences = [max(r["probabilities"].values()) for r in mine]
        if held_out[version]:
            counts, scores = held_out[version]
            result.comparisons += [
                _discrete(cfg, f"count {version}", "count", f"{version}'s answers on its held-out photos",
                          counts_by_version[version], counts, classes),
                _continuous(cfg, f"confidence {version}", "confidence",
                            f"{version}'s confidence on its held-out photos", confidences, scores)]
        else:
            missing = f"no evaluation of {version} in {report_prefix(version)}/ to compare with"
            result.comparisons += [Comparison(f"{name} {version}", name, "none", len(mine), 0, note=missing)
                                   for name in ("count", "confidence")]
    every_count = [r["count"] for r in records]
    vs_labels = _discrete(cfg, "count vs labels", "count_vs_labels", f"{cfg.split} labels of {cfg.reference}",
                          every_count, labels, classes)
    if "count_vs_labels" not in cfg.thresholds and vs_labels.psi is not None:
        vs_labels.threshold, vs_labels.note = None, "a model's own bias differs from the labels without drift"
    result.comparisons.append(vs_labels)
    figures["count.png"] = png(_count_figure(classes, labels, counts_by_version, held_out))
    figures["confidence.png"] = png(_confidence_figure(records, start, end, held_out))
    out = open_store(cfg.out or store.url(f"reports/monitor/{cfg.endpoint}/{end:%Y-%m-%dT%H%M%SZ}"))
    out.check(write=True)
    result.uri = out.uri
    for name, data in figures.items():
        out.put(name, data)
    blocks = _document(cfg, result, reference)
    out.put_text("summary.json", json.dumps(result.summary(), indent=2) + "\n")
    out.put_text("report.md", render_markdown(blocks))
    out.put_text("report.html", render_html(blocks, figures, f"Drift report: {cfg.endpoint}"))
    return result


def _log_account(log: LogRead) -> dict:
    return {"objects": log.objects, "skipped": log.skipped, "dropped": sum(log.dropped.values()),
            "writers": len(log.dropped)}


def _threshold(cfg: MonitorConfig, feature: str) -> float:
    return float(cfg.thresholds.get(feature, cfg.psi_threshold))


def _judged(cfg: MonitorConfig, comparison: Comparison, current_counts, reference_counts) -> Comparison:
    if comparison.n < cfg.min_records:
        comparison.note = f"{comparison.n} logged value(s), fewer than min_records {cfg.min_records}"
    elif comparison.reference_n < cfg.min_records:
        comparison.note = f"a reference of {comparison.reference_n}, fewer than min_records {cfg.min_records}"
    else:
        comparison.psi = psi(reference_counts, current_counts)
        comparison.threshold = _threshold(cfg, comparison.feature)
        comparison.noise = psi_noise(len(current_counts), comparison.n, comparison.reference_n, cfg.significance)
    return comparison


def _continuous(cfg: MonitorConfig, name: str, feature: str, what: str, current: list[float],
                reference: list[float]) -> Comparison:
    comparison = Comparison(name, feature, what, len(current), len(reference))
    if not current or not reference:
        comparison.note = "nothing to compare"
        return comparison
    edges = quantile_edges(reference, cfg.bins)
    return _judged(cfg, comparison, binned(current, edges), binned(reference, edges))


def _discrete(cfg: MonitorConfig, name: str, feature: str, what: str, current: list[int], reference: list[int],
              classes: list[int]) -> Comparison:
    comparison = Comparison(name, feature, what, len(current), len(reference))
    if not current or not reference:
        comparison.note = "nothing to compare"
        return comparison
    have, ref = Counter(current), Counter(reference)
    return _judged(cfg, comparison, [have[c] for c in classes], [ref[c] for c in classes])


def _held_out(store: Store, version: str) -> tuple[list[int], list[float]] | None:
    """A version's predicted counts and confidences on its evaluation's photos, where it was evaluated."""
    try:
        rows = [json.loads(line) for line in store.get_text(f"{report_prefix(version)}/predictions.jsonl").splitlines()
                if line.strip()]
    except (KeyNotFoundError, ValueError):
        return None
    return [r["count"] for r in rows], [max(r["probabilities"].values()) for r in rows]


def _reference_stats(store: Store, cfg: MonitorConfig, items, size: int) -> dict:
    """The reference photos' statistics at the logged input size, cached beside the reports; a changed split
    (its manifest's digest) is measured again."""
    digest = hashlib.sha256("\n".join(f"{i.key},{i.label}" for i in items).encode()).hexdigest()[:16]
    key = f"reports/monitor/{cfg.endpoint}/reference/{cfg.reference}-{cfg.split}-{size}px.json"
    try:
        cached = json.loads(store.get_text(key))
        if cached.get("digest") == digest and cached.get("version") == REFERENCE_VERSION:
            return cached
    except (KeyNotFoundError, ValueError):
        pass

    def one(item) -> dict | None:
        try:
            return features(measure(read_photo(store.get(image_key(item.key)), size)))
        except (KeyNotFoundError, ImageError, StoreError):
            return None

    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        measured = list(pool.map(one, items))
    rows = [r for r in measured if r is not None]
    stats = {"version": REFERENCE_VERSION, "digest": digest, "size": size, "rows": rows,
             "failed": len(measured) - len(rows)}
    store.put_text(key, json.dumps(stats) + "\n")
    return stats


# ---- the report ---------------------------------------------------------------------------------------------

def _document(cfg: MonitorConfig, r: MonitorResult, reference: dict) -> list:
    log = r.log
    versions = ", ".join(f"{v} {n}" for v, n in r.versions.items()) or "none"
    blocks = [
        Heading(f"Drift report: endpoint {r.endpoint}", 1),
        Para(("DRIFT: " + ", ".join(c.name for c in r.drifted)) if r.drifted
             else "No drift over the thresholds."),
        Para(f"Window {_iso(r.start)} to {_iso(r.end)}: {r.records} prediction(s) by version: {versions}. Reference: "
             f"the {cfg.split} split of {cfg.reference}, {len(reference['rows'])} photo(s) measured"
             + (f" ({reference['failed']} unreadable)" if reference.get("failed") else "")
             + f". PSI over {cfg.bins} quantile bins of the reference (counts: their own classes); drift is a PSI "
             f"over its threshold (default {cfg.psi_threshold:g}) and over the noise bound, the PSI that two samples "
             f"of one distribution of these sizes exceed with probability {cfg.significance:g}; fewer than "
             f"{cfg.min_records} values are not judged."),
        Para(f"Log: {log['objects']} object(s) read from {log['writers']} writer(s); {len(log['skipped'])} skipped as "
             f"corrupt or partial; the writers counted {log['dropped']} record(s) dropped (queue full or store down) "
             "since they started."),
    ]
    if log["skipped"]:
        blocks.append(Table(["skipped log object"], [[s] for s in log["skipped"][:20]]))
    blocks += [
        Heading("Comparisons"),
        Table(["feature", "reference", "logged", "reference n", "PSI", "threshold", "noise bound", "verdict"],
              [[c.name, c.reference, str(c.n), str(c.reference_n), _number(c.psi, ".3f"), _number(c.threshold, "g"),
                _number(c.noise, ".3f"), c.verdict] for c in r.comparisons]),
        Heading("Inputs"),
        *(Picture(f"{name}.png", f"{LABELS[name]}: reference and logged") for name in FEATURES),
        Heading("Answers"),
        Picture("count.png", "Predicted counts per version, the reference labels and each version's held-out "
                             "answers"),
        Picture("confidence.png", "Confidence (top probability) over the window, median and interquartile range per "
                                  "version; dashed: the median on held-out photos"),
    ]
    return blocks


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def _psi_title(label: str, comparison: Comparison) -> str:
    if comparison.psi is None:
        return f"{label}\n{comparison.verdict}"
    return f"{label}\nPSI {comparison.psi:.3f} ({comparison.verdict})"


def _histogram_figure(label: str, reference: list[float], current: list[float], comparison: Comparison) -> Figure:
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    values = [*reference, *current]
    if values:
        bins = np.histogram_bin_edges(values, bins=30)
        if reference:
            ax.hist(reference, bins=bins, density=True, alpha=0.5, color="#4c72b0", label="reference")
        if current:
            ax.hist(current, bins=bins, density=True, alpha=0.5, color="#dd8452", label="logged")
        ax.legend()
    ax.set(xlabel=label, ylabel="density", title=_psi_title(label, comparison))
    fig.tight_layout()
    return fig


def _count_figure(classes: list[int], labels: list[int], counts: dict[str, list[int]],
                  held_out: dict[str, tuple[list[int], list[float]] | None]) -> Figure:
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    series = {"reference labels": labels, **{f"held-out {v}": h[0] for v, h in held_out.items() if h},
              **{f"logged {v}": c for v, c in counts.items()}}
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        have = Counter(values)
        shares = [have[c] / max(1, len(values)) for c in classes]
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(classes))], shares, width, label=name)
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set(xlabel="count", ylabel="share", title="predicted counts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _confidence_figure(records: list[dict], start: datetime, end: datetime,
                       held_out: dict[str, tuple[list[int], list[float]] | None]) -> Figure:
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    step = (end - start) / TIME_BUCKETS
    for i, version in enumerate(sorted({r["model_version"] for r in records})):
        color = f"C{i}"
        buckets: dict[int, list[float]] = {}
        for r in records:
            if r["model_version"] == version:
                buckets.setdefault(int((r["_time"] - start) / step), []).append(max(r["probabilities"].values()))
        xs = sorted(buckets)
        middle = [start + step * (x + 0.5) for x in xs]
        q = np.array([np.percentile(buckets[x], [25, 50, 75]) for x in xs])
        ax.plot(middle, q[:, 1], "o-", color=color, label=version)
        ax.fill_between(middle, q[:, 0], q[:, 2], color=color, alpha=0.2)
        if held_out.get(version):
            ax.axhline(float(np.median(held_out[version][1])), color=color, linestyle="--", linewidth=1)
    ax.set(ylabel="confidence", ylim=(0, 1), xlim=(start, end), title="confidence over time (UTC)")
    if records:
        ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig
