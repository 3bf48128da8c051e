"""The audit's results in one place: every shard merged, bins ranked by p_mismatch, and the report a person reads
(`report.md`, and `report.html` with the histogram and thumbnails inlined, so it opens offline as one file).

Which bins are flagged, and how many wrong quantities they are expected to hold, is `flagging`'s: the model's
p_mismatch weighed by how often records are wrong. As far as the model's probabilities are calibrated, the mean
p_wrong of the flagged bins estimates the precision of the flags; the validation split's calibration error (from
model.json) says how far to trust that estimate.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from bincount.audit import flagging
from bincount.audit.flagging import Policy
from bincount.audit.plan import Plan, audit_prefix, load_plan, shard_key
from bincount.data.abid import image_key
from bincount.errors import BincountError
from bincount.model.exported import META_FILE
from bincount.store import KeyNotFoundError, Store, open_store

THUMBNAIL = 160
READ_THREADS = 16


@dataclass
class AuditResult:
    uri: str
    summary: dict

    def line(self) -> str:
        s = self.summary
        failed = sum(s["image_failures"].values())
        problems = ", ".join(f"{n} {reason}" for reason, n in s["expected_problems"].items())
        return (f"audited {s['audited']} of {s['bins']} bins ({failed} image(s) unreadable); {s['flagged']} flagged "
                f"({s['policy']}), expected to hold {s['expected_wrong_flagged']:.1f} wrong quantities (expected "
                f"precision {_pct(s['expected_precision'])}, error rate {_pct(s['error_rate'])} {s['error_rate_source']}); "
                + (f"no usable expected quantity: {problems}; " if problems else "")
                + f"report: {self.uri}/report.html")


HISTOGRAM_BINS = 40


class Tally:
    """The report's figures folded one bin at a time, so that merging a bucket of millions of bins holds only the
    `top` most suspicious ones (and a few counters) in memory."""

    def __init__(self, plan: Plan, policy: Policy, top: int, error_rate: float = 0.0):
        self.plan, self.policy, self.top, self.error_rate = plan, policy, top, error_rate
        self.keep = max(top, policy.review)                         # the ranked bins shown, or flagged by count
        self.bins = self.audited = self.known = self.agreeing = 0
        self.per_class = {c: [0, 0] for c in plan.classes}          # bins expected to hold c, of them counted c
        self.failures: Counter[str] = Counter()
        self.problems: Counter[str] = Counter(plan.csv_problems)
        self.histogram = [0] * HISTOGRAM_BINS                       # p_mismatch over [0, 1], for the plot
        self.fine = flagging.Histogram()                            # for the error rate and the flagged bins
        self._suspects: list[dict] = []

    def add(self, record: dict) -> None:
        self.bins += 1
        if "error" in record:
            self.failures[record["error"]] += 1
        if record.get("expected_problem"):
            self.problems[record["expected_problem"]] += 1
        if "count" not in record:
            return
        self.audited += 1
        if record["expected"] is None:
            return
        self.known += 1
        agrees = record["count"] == record["expected"]
        self.agreeing += agrees
        if record["expected"] in self.per_class:
            self.per_class[record["expected"]][0] += 1
            self.per_class[record["expected"]][1] += agrees
        p = record["p_mismatch"]
        self.histogram[min(int(p * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        self.fine.add(p)
        self._suspects.append(record)
        if len(self._suspects) >= 2 * self.keep + 1024:
            self._suspects = self._ranked(self.keep)

    def _ranked(self, n: int) -> list[dict]:
        return sorted(self._suspects, key=lambda r: (-r["p_mismatch"], r["key"]))[:n]

    def ranked(self) -> list[dict]:
        """The `top` bins most likely to hold another quantity than expected, first the most (ties by key)."""
        return self._ranked(self.top)

    def rate(self) -> tuple[float, str]:
        """The error rate the flags are weighed with: the one given, or this audit's own estimate."""
        if self.error_rate:
            return self.error_rate, "given"
        return flagging.estimate_error_rate(self.fine, len(self.plan.classes)), "estimated"

    def flags(self) -> flagging.Flags:
        rate, _ = self.rate()
        ranked = [r["p_mismatch"] for r in self._ranked(self.policy.review)] if self.policy.review else []
        return flagging.flags(self.fine, ranked, self.policy, rate, len(self.plan.classes))

    def summary(self, validation: dict) -> dict:
        rate, source = self.rate()
        flags = self.flags()
        return {"name": self.plan.name, "model": self.plan.model, "bins": self.bins, "audited": self.audited,
                "with_expected": self.known, "policy": self.policy.describe(), "flagged": flags.count,
                "flagged_from_p_mismatch": flags.from_p_mismatch, "expected_wrong_flagged": flags.expected_wrong,
                "expected_precision": flags.precision, "error_rate": rate, "error_rate_source": source,
                "expected_wrong_all": rate * self.known,
                "disagreements": self.known - self.agreeing, "agreement": _ratio(self.agreeing, self.known),
                "per_class": {str(c): {"bins": n, "agreement": _ratio(a, n)} for c, (n, a) in self.per_class.items()},
                "image_failures": dict(sorted(self.failures.items())),
                "expected_problems": dict(sorted(self.problems.items())),
                "validation_ece": validation.get("ece")}


def merge(store: Store, name: str, policy: Policy, top: int, error_rate: float = 0.0) -> Tally:
    """Every shard's bins folded into one Tally, shard by shard; fails while shards are missing."""
    plan = load_plan(store, name)
    missing = [s for s in range(plan.shards) if not store.exists(shard_key(name, s))]
    if missing:
        raise BincountError(f"audit {name!r} is incomplete: {len(missing)} of {plan.shards} shard(s) missing; "
                            "rerun the audit to finish it")
    tally = Tally(plan, policy, top, error_rate)
    for s in range(plan.shards):
        for line in store.get_text(shard_key(name, s)).splitlines():
            tally.add(json.loads(line))
    return tally


def write_report(store_uri: str, name: str, policy: Policy = Policy(precision=0.5), top: int = 50,
                 error_rate: float = 0.0) -> AuditResult:
    """summary.json, p_mismatch.png, report.md and report.html under audits/<name>/."""
    store = open_store(store_uri)
    tally = merge(store, name, policy, top, error_rate)
    summary = tally.summary(_validation(tally.plan.model))
    order = tally.ranked()
    histogram = histogram_png(tally.histogram, summary["flagged_from_p_mismatch"])
    thumbnails = _thumbnails(store, [r["key"] for r in order])
    prefix = audit_prefix(name)
    store.put_text(f"{prefix}/summary.json", json.dumps(summary, indent=2) + "\n")
    store.put(f"{prefix}/p_mismatch.png", histogram)
    store.put_text(f"{prefix}/report.md", markdown(summary, order, tally.plan.classes))
    store.put_text(f"{prefix}/report.html", html_report(summary, order, tally.plan.classes, histogram, thumbnails))
    return AuditResult(store.url(prefix), summary)


def _validation(model: str) -> dict:
    try:
        parent = open_store(model)
        return json.loads(parent.get_text(META_FILE)).get("validation") or {}
    except KeyNotFoundError:
        return {}


def _ratio(a: float, b: int) -> float | None:
    return a / b if b else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def histogram_png(counts: list[int], flagged_from: float | None) -> bytes:
    """`counts`: bins per equal-width interval of p_mismatch over [0, 1]; the line: where flagging starts."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.stairs(counts, [i / len(counts) for i in range(len(counts) + 1)], fill=True, color="#4477aa")
    if flagged_from is not None:
        ax.axvline(flagged_from, color="#cc3311", linestyle="--", label=f"flagged from {flagged_from:.3f}")
    ax.set(xlabel="p_mismatch = 1 − P(count = expected)", ylabel="bins", yscale="log" if any(counts) else "linear",
           title="how likely each bin's expected quantity is wrong")
    if flagged_from is not None:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _thumbnails(store: Store, keys: list[str]) -> dict[str, str]:
    """key → base64 JPEG thumbnail (keys whose image cannot be read again are left out)."""
    def one(key: str) -> tuple[str, str | None]:
        try:
            with Image.open(io.BytesIO(store.get(image_key(key)))) as image:
                image.thumbnail((THUMBNAIL, THUMBNAIL))
                out = io.BytesIO()
                image.convert("RGB").save(out, "JPEG", quality=80)
            return key, base64.b64encode(out.getvalue()).decode()
        except (KeyNotFoundError, OSError, SyntaxError, ValueError):
            return key, None

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return {k: v for k, v in pool.map(one, keys) if v}


def _totals(summary: dict) -> list[tuple[str, str]]:
    s = summary
    rows = [("bins", str(s["bins"])), ("audited (image read)", str(s["audited"])),
            ("with an expected quantity", str(s["with_expected"])),
            (f"flagged ({s['policy']})", str(s["flagged"])),
            ("wrong quantities the flagged bins are expected to hold", f"{s['expected_wrong_flagged']:.1f}"),
            ("expected precision of the flags", _pct(s["expected_precision"])),
            (f"error rate of the expected quantities ({s['error_rate_source']})", _pct(s["error_rate"])),
            ("wrong quantities expected among all bins", f"{s['expected_wrong_all']:.1f}"),
            ("predicted ≠ expected", str(s["disagreements"])), ("agreement", _pct(s["agreement"]))]
    if s["validation_ece"] is not None:
        rows.append(("calibration error on validation (ECE)", f"{s['validation_ece']:.4f}"))
    rows += [(f"unreadable image: {k}", str(v)) for k, v in s["image_failures"].items()]
    rows += [(f"no expected quantity: {k}", str(v)) for k, v in s["expected_problems"].items()]
    return rows


def markdown(summary: dict, top: list[dict], classes: list[int]) -> str:
    lines = [f"# Audit {summary['name']}", "", f"Model: `{summary['model']}`", "", "| total | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _totals(summary)]
    lines += ["", "## Agreement per expected count", "", "| expected | bins | predicted = expected |", "|---|---|---|"]
    lines += [f"| {c} | {v['bins']} | {_pct(v['agreement'])} |" for c, v in summary["per_class"].items()]
    lines += ["", "![p_mismatch histogram](p_mismatch.png)", "", f"## Top {len(top)} bins by p_mismatch", "",
              "| key | expected | predicted | p_mismatch | P(wrong) | " + " | ".join(f"P({c})" for c in classes) + " |",
              "|---" * (5 + len(classes)) + "|"]
    lines += [f"| {r['key']} | {r['expected']} | {r['count']} | {r['p_mismatch']:.3f} | {_wrong(r, summary, classes):.3f} | "
              + " | ".join(f"{r['probabilities'][str(c)]:.3f}" for c in classes) + " |" for r in top]
    return "\n".join(lines) + "\n"


def html_report(summary: dict, top: list[dict], classes: list[int], histogram: bytes,
                thumbnails: dict[str, str]) -> str:
    e = html.escape
    totals = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _totals(summary))
    agreement = "".join(f"<tr><td>{c}</td><td>{v['bins']}</td><td>{_pct(v['agreement'])}</td></tr>"
                        for c, v in summary["per_class"].items())
    head = "".join(f"<th>P({c})</th>" for c in classes)
    rows = "".join(
        f"<tr><td>{_img(thumbnails.get(r['key']), r['key'])}</td><td>{e(r['key'])}</td><td>{r['expected']}</td>"
        f"<td>{r['count']}</td><td>{r['p_mismatch']:.3f}</td><td>{_wrong(r, summary, classes):.3f}</td>"
        + "".join(f"<td>{r['probabilities'][str(c)]:.3f}</td>" for c in classes) + "</tr>" for r in top)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Audit {e(summary['name'])}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>"
            f"<h1>Audit {e(summary['name'])}</h1><p>Model: <code>{e(summary['model'])}</code></p>"
            f"<table>{totals}</table><h2>Agreement per expected count</h2>"
            f"<table><tr><th>expected</th><th>bins</th><th>predicted = expected</th></tr>{agreement}</table>"
            f"<img alt='p_mismatch histogram' src='data:image/png;base64,{base64.b64encode(histogram).decode()}'>"
            f"<h2>Top {len(top)} bins by p_mismatch</h2><table><tr><th>photo</th><th>key</th><th>expected</th>"
            f"<th>predicted</th><th>p_mismatch</th><th>P(wrong)</th>{head}</tr>{rows}</table></body></html>\n")


def _wrong(record: dict, summary: dict, classes: list[int]) -> float:
    return flagging.p_wrong(record["p_mismatch"], summary["error_rate"], len(classes))


def _img(b64: str | None, key: str) -> str:
    return f"<img alt='{html.escape(key)}' src='data:image/jpeg;base64,{b64}'>" if b64 else "(unreadable)"
