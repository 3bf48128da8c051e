"""One audit worker: the shards `index`, `index + count`, … of the plan, each decoded by a thread pool, predicted
in batches with the exported model's own preprocessing, TTA and calibration, and written whole (an atomic put).

A shard already in the store is skipped, so a killed worker's rerun redoes at most the shards it was writing.
A shard's output depends only on its bins, so a resumed audit ends with the same files as an uninterrupted one.
The next shard is decoded while the current one is predicted. On a CPU, batches are predicted side by side, one
per core, each on one thread: a pass split over the cores waits for all of them at every layer, and on a machine
shared with other work one of them is often busy elsewhere (the waiting spins: measured from nothing to 80 % more
CPU per image at batch 32 as the other load varied), while single-threaded passes never wait for each other.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import torch
from tqdm import tqdm

from bincount.audit.heap import keep_freed_memory
from bincount.audit.plan import METADATA, Plan, audit_prefix, load_plan, shard_key
from bincount.config import AuditConfig
from bincount.data.abid import RejectedPair, image_key, metadata_key, parse_metadata
from bincount.devices import pick_device
from bincount.model.exported import ExportedModel, Predictor, Preprocessing
from bincount.model.preprocess import ImageError
from bincount.store import KeyNotFoundError, Store, open_store


def run_worker(cfg: AuditConfig, name: str, index: int = 0, count: int = 1) -> int:
    """Audits this worker's unfinished shards; returns how many it wrote."""
    store = open_store(cfg.store)
    plan = load_plan(store, name)
    store.remove_stale_parts(audit_prefix(name))
    todo = [s for s in range(plan.shards) if s % count == index and not store.exists(shard_key(name, s))]
    if not todo:
        return 0
    work = plan.work(store)
    keep_freed_memory()
    device = pick_device(cfg.device)
    lanes = _lanes(device)
    model = ExportedModel.load(plan.model)
    predictor = model.predictor(device, plan.settings["precision"])
    bins = sum(len(_shard(work, plan, s)) for s in todo)
    with ThreadPoolExecutor(cfg.threads, "bincount-audit") as pool, \
            ThreadPoolExecutor(lanes, "bincount-audit-forward") as forward, \
            tqdm(total=bins, unit="img", desc=f"audit {name} [{index + 1}/{count}]", file=sys.stderr,
                 smoothing=0.1, mininterval=1.0) as bar:
        def submit(shard: int) -> list[Future]:
            return [pool.submit(_read, store, entry, model.preprocessing, plan) for entry in _shard(work, plan, shard)]

        pending = submit(todo[0])
        for i, shard in enumerate(todo):
            current, pending = pending, submit(todo[i + 1]) if i + 1 < len(todo) else []
            records = _predict(predictor, [f.result() for f in current], cfg.batch_size, forward)
            store.put_text(shard_key(name, shard), "".join(json.dumps(r) + "\n" for r in records))
            bar.update(len(records))
    return len(todo)


def _lanes(device: torch.device) -> int:
    """Batches predicted at once: on a CPU one per thread torch would have used (OMP_NUM_THREADS where set, as by
    the local backend's workers or a pod's limit), each then single-threaded; on an accelerator one."""
    if device.type != "cpu":
        return 1
    lanes = torch.get_num_threads()
    torch.set_num_threads(1)
    return lanes


def _shard(work: Sequence[dict], plan: Plan, shard: int) -> Sequence[dict]:
    size = plan.settings["shard_size"]
    return work[shard * size:(shard + 1) * size]


def _read(store: Store, entry: dict, preprocessing: Preprocessing, plan: Plan) -> tuple[dict, torch.Tensor | None]:
    """The bin's record so far (key, expected or why not) and its model input, or None and the reason in the record."""
    key = entry["key"]
    record = {"key": key, **_expected(store, entry, plan)}
    try:
        return record, preprocessing.read(store.get(image_key(key)), plan.settings["max_pixels"])
    except KeyNotFoundError:
        record.update(error="missing", detail=f"no image {image_key(key)}")
    except ImageError as e:
        record.update(error=e.reason, detail=str(e))
    return record, None


def _expected(store: Store, entry: dict, plan: Plan) -> dict:
    """`expected`, from the plan's CSV or the bin's ABID metadata; None with `expected_problem` when unknown or
    outside the model's classes."""
    if plan.settings["expected"] != METADATA:
        quantity, problem = entry.get("expected"), "not in the CSV"
    else:
        try:
            _, quantity = parse_metadata(store.get(metadata_key(entry["key"])))
            problem = ""
        except KeyNotFoundError:
            quantity, problem = None, "no metadata"
        except RejectedPair as e:
            quantity, problem = None, e.reason
    if quantity is not None and quantity not in plan.classes:
        return {"expected": None, "expected_problem": "outside the model's classes", "stated": quantity}
    return {"expected": quantity} if quantity is not None else {"expected": None, "expected_problem": problem}


def _predict(predictor: Predictor, read: list[tuple[dict, torch.Tensor | None]], batch_size: int,
             forward: Executor) -> list[dict]:
    """Counts, calibrated probabilities and p_mismatch = 1 − P(count = expected) for the bins that decoded; the
    batches run on `forward`'s threads."""
    model = predictor.model
    ok = [(record, image) for record, image in read if image is not None]
    chunks = [ok[start:start + batch_size] for start in range(0, len(ok), batch_size)]
    outputs = forward.map(lambda chunk: predictor(torch.stack([image for _, image in chunk])), chunks)
    for chunk, probabilities in zip(chunks, outputs):
        for (record, _), count, row in zip(chunk, model.counts(probabilities), probabilities.tolist()):
            record.update(count=count, probabilities=dict(zip(map(str, model.classes), row)))
            if record["expected"] is not None:
                record["p_mismatch"] = 1.0 - row[model.classes.index(record["expected"])]
    return [record for record, _ in read]
