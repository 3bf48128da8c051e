"""The kserve predictor: photos in (base64 or URL, V1 or V2 protocol), item counts and probabilities out.

V1  POST /v1/models/<name>:predict  {"instances": [{"image": {"b64": "..."}}, {"url": "https://..."}]}
    → {"predictions": [{"count": 3, "probabilities": {"1": 0.05, ...}}, ...]}
V2  POST /v2/models/<name>/infer    one BYTES input of shape [N]: `image` (base64 image files; raw ones in the
    binary data extension reach it as base64, see `binary`) or `url`
    → outputs `count` (INT32 [N]) and `probabilities` (FP32 [N, classes], columns in class order)

Counts and probabilities are the exported model's own (`bincount.model.exported`): its preprocessing,
test-time augmentation, calibration and decoding, as evaluate applies them. The instances of a request are
decoded in parallel and predicted as one batch; concurrent requests share forward passes (see `batcher`).
Anything wrong with a request is a `RequestError` with a 4xx status.

With a canary the server holds two model versions and draws, request by request, which one answers: the canary
with probability `canary_percent` / 100. Every answer names its version: `model_version` in the V1 body and the
V2 response, and the `X-Model-Version` header. With a log store every answer is also a prediction-log record
(`bincount.rollout.predlog`), queued off the request path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
import orjson
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.logging import logger

from bincount.config import ServeConfig
from bincount.devices import pick_device
from bincount.errors import ConfigError
from bincount.model.exported import ExportedModel, model_version
from bincount.model.preprocess import Photo
from bincount.rollout.imagestats import measure
from bincount.rollout.predlog import PredictionLog, timestamp
from bincount.serve import web
from bincount.serve.batcher import Batcher
from bincount.serve.errors import RequestError
from bincount.serve.fetch import UrlPolicy, fetch
from bincount.serve.images import decode_image
from bincount.store import open_store

V1_FORM = '{"image": {"b64": "..."}} or {"url": "https://..."}'
FETCH_THREADS = 16
VERSION_HEADER = "X-Model-Version"
DIGEST_CHARS = 32                               # of the photo's SHA-256, in the log
LOG_CLOSE_S = 10.0                              # at shutdown, the longest the log's last batch may take


@dataclass
class Variant:
    """One model version the endpoint serves, with its own batching thread."""

    version: str
    model: ExportedModel
    batcher: Batcher


@dataclass
class _Batch:
    images: torch.Tensor
    v2: InferRequest | None
    variant: Variant
    facts: list[dict]                           # per photo, for the log: digest, size, image statistics
    start: float
    request_id: str


@dataclass
class _Result:
    batch: _Batch
    probabilities: torch.Tensor


class BinCountModel(Model):
    def __init__(self, cfg: ServeConfig):
        super().__init__(cfg.name, return_response_headers=True)
        check(cfg)
        self.cfg = cfg
        urls = UrlPolicy.from_config(cfg)
        self.urls = urls if urls.hosts else None
        # Fetches wait on other servers: their own threads, so slow URLs never hold up decoding.
        self.fetchers = ThreadPoolExecutor(FETCH_THREADS, "bincount-fetch") if self.urls else None
        self.variants: list[Variant] = []         # the champion, then the canary
        self.log: PredictionLog | None = None
        self._draw = random.Random()

    @property
    def model(self) -> ExportedModel:
        return self.variants[0].model

    def load(self) -> bool:
        device = pick_device(self.cfg.device)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.variants = [self._load(self.cfg.model, self.cfg.version, device)]
        if self.cfg.canary:
            canary = self._load(self.cfg.canary, self.cfg.canary_version, device)
            champion = self.variants[0]
            if canary.model.classes != champion.model.classes:
                raise ConfigError(f"serve: the canary {canary.version} counts {list(canary.model.classes)}, the "
                                  f"model {champion.version} counts {list(champion.model.classes)}")
            if canary.version == champion.version:
                raise ConfigError(f"serve: the canary and the model are both version {canary.version}; give "
                                  "them versions that tell their answers apart")
            self.variants.append(canary)
        if self.cfg.log_store:
            self.log = PredictionLog(open_store(self.cfg.log_store), self.cfg.endpoint or self.cfg.name,
                                     self.cfg.log_batch, self.cfg.log_flush_s, self.cfg.log_queue, logger.warning)
        self.ready = True
        return self.ready

    def _load(self, location: str, version: str, device: torch.device) -> Variant:
        """Load, then warm up at the smallest and largest batch, so the first requests are as fast as any."""
        model = ExportedModel.load(location)
        predictor = model.predictor(device, self.cfg.precision)
        size = model.preprocessing.size
        for n in sorted({1, self.cfg.max_batch}):
            predictor(torch.zeros(n, 3, size, size, dtype=torch.uint8))
        return Variant(version or model_version(location, model.meta), model, Batcher(predictor, self.cfg.max_batch))

    def stop(self) -> None:
        for variant in self.variants:
            variant.batcher.stop()
        self.variants = []
        if self.log:
            logger.info(self.log.close(LOG_CLOSE_S))
            self.log = None
        if self.fetchers:
            self.fetchers.shutdown(wait=False, cancel_futures=True)
        self.ready = False

    def get_input_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "url", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "count", "datatype": "INT32", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.model.classes)]}]

    async def preprocess(self, payload, headers: dict | None = None) -> _Batch:
        start = time.perf_counter()
        if isinstance(payload, InferRequest):
            sources = self._v2_sources(payload)
        elif isinstance(payload, (bytes, str)):
            sources = self._v1_sources(_json(payload, headers))
        else:
            sources = self._v1_sources(payload)
        canary = len(self.variants) > 1 and self._draw.random() * 100 < self.cfg.canary_percent
        variant = self.variants[-1] if canary else self.variants[0]
        decoded = await asyncio.gather(*(self._image(variant, *source) for source in sources),
                                       return_exceptions=True)
        failed = next((d for d in decoded if isinstance(d, BaseException)), None)
        if failed:
            raise failed
        v2 = payload if isinstance(payload, InferRequest) else None
        request_id = (v2.id if v2 else None) or (headers or {}).get("x-request-id") or ""
        return _Batch(torch.stack([square for square, _ in decoded]), v2, variant, [f for _, f in decoded], start,
                      request_id)

    async def predict(self, batch: _Batch, headers: dict | None = None,
                      response_headers: dict | None = None) -> _Result:
        return _Result(batch, await batch.variant.batcher(batch.images))

    async def postprocess(self, result: _Result, headers: dict | None = None, response_headers: dict | None = None):
        batch, probabilities = result.batch, result.probabilities
        model, version = batch.variant.model, batch.variant.version
        counts = model.counts(probabilities)
        if response_headers is not None:
            response_headers[VERSION_HEADER] = version
        if self.log:
            self._log(batch, counts, probabilities)
        if batch.v2 is None:
            keys = [str(c) for c in model.classes]
            return {"model_version": version,
                    "predictions": [{"count": count, "probabilities": dict(zip(keys, row))}
                                    for count, row in zip(counts, probabilities.tolist())]}
        n = len(counts)
        return InferResponse(
            model_name=self.name, model_version=version, response_id=batch.v2.id or str(uuid.uuid4()),
            infer_outputs=[InferOutput("count", [n], "INT32", np.array(counts, dtype=np.int32)),
                           InferOutput("probabilities", list(probabilities.shape), "FP32", probabilities.numpy())])

    def _log(self, batch: _Batch, counts: list[int], probabilities: torch.Tensor) -> None:
        """One record per photo; the photo's facts were measured while it was decoded."""
        now, model = timestamp(time.time()), batch.variant.model
        latency = round((time.perf_counter() - batch.start) * 1000, 2)
        keys = [str(c) for c in model.classes]
        for facts, count, row in zip(batch.facts, counts, probabilities.tolist()):
            self.log.record({"time": now, "model_version": batch.variant.version, "request_id": batch.request_id,
                             **facts, "input_size": model.preprocessing.size, "count": count,
                             "probabilities": {k: round(p, 5) for k, p in zip(keys, row)}, "latency_ms": latency})

    def _v1_sources(self, payload) -> list[tuple[str, str, str]]:
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list):
            raise RequestError(f'expected a JSON object {{"instances": [...]}} whose items are {V1_FORM}')
        self._check_count(len(instances), "instances")
        sources = []
        for i, instance in enumerate(instances):
            where = f"instances[{i}]"
            if isinstance(instance, dict) and len(instance) == 1:
                image, url = instance.get("image"), instance.get("url")
                if isinstance(image, dict) and set(image) == {"b64"} and isinstance(image["b64"], str):
                    sources.append(("image", image["b64"], where))
                    continue
                if isinstance(url, str):
                    sources.append(("url", url, where))
                    continue
            raise RequestError(f"{where}: expected {V1_FORM}")
        return sources

    def _v2_sources(self, request: InferRequest) -> list[tuple[str, str, str]]:
        names = [i.name for i in request.inputs]
        if len(names) != 1 or names[0] not in ("image", "url"):
            raise RequestError(f"expected one input named image (base64 image files) or url, got {names}")
        tensor = request.inputs[0]
        where = f"input {tensor.name}"
        if tensor.datatype != "BYTES":
            raise RequestError(f"{where}: datatype must be BYTES, got {tensor.datatype}")
        shape = list(tensor.shape)
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
            raise RequestError(f"{where}: shape must be [N] or [N, 1], got {shape}")
        data = tensor.data
        if isinstance(data, list) and data and all(isinstance(d, list) for d in data):
            data = [x for d in data for x in d]
        if not isinstance(data, list) or len(data) != shape[0] or not all(isinstance(d, str) for d in data):
            raise RequestError(f"{where}: shape {shape} needs {shape[0]} string element(s) in data")
        self._check_count(len(data), f"elements in {where}")
        return [(tensor.name, value, f"{where}[{i}]") for i, value in enumerate(data)]

    def _check_count(self, n: int, what: str) -> None:
        if n == 0:
            raise RequestError(f"no {what}: send at least one image")
        if n > self.cfg.max_batch:
            raise RequestError(f"{n} {what}, over this server's limit of {self.cfg.max_batch} per request",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)

    async def _image(self, variant: Variant, kind: str, value: str, where: str) -> tuple[torch.Tensor, dict]:
        """Fetched or base64-decoded, then decoded and resized (and measured, for the log), in worker threads."""
        loop = asyncio.get_running_loop()
        if kind == "url":
            if self.urls is None:
                raise RequestError(f"{where}: fetching images by URL is off on this server", HTTPStatus.FORBIDDEN)
            value = await loop.run_in_executor(self.fetchers, fetch, value, self.urls, where)
        return await loop.run_in_executor(None, self._decode, value, where, variant)

    def _decode(self, data: bytes | str, where: str, variant: Variant) -> tuple[torch.Tensor, dict]:
        """`data`: the image's bytes, or a base64 string of them."""
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"{where}: invalid base64 ({e})") from None
        photo: Photo = decode_image(data, variant.model.preprocessing.size, self.cfg.max_pixels, where)
        if self.log is None:
            return photo.square, {}
        return photo.square, {"input": hashlib.sha256(data).hexdigest()[:DIGEST_CHARS], **measure(photo)}


def _json(body: bytes | str, headers: dict | None) -> object:
    """kserve passes the body through undecoded when its Content-Type is not exactly one it knows, as with
    `application/json; charset=utf-8`."""
    media_type = (headers or {}).get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise RequestError("a V1 request is a JSON object: send Content-Type application/json",
                           HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise RequestError(f"the body is not JSON ({e})") from None


def check(cfg: ServeConfig) -> None:
    problems = [f"{name} must be at least {low}, got {getattr(cfg, name)}"
                for name, low in (("max_batch", 1), ("max_body_bytes", 1024), ("max_pixels", 1), ("threads", 0),
                                  ("url_max_bytes", 1), ("url_max_redirects", 0))
                if getattr(cfg, name) < low]
    if not 1 <= cfg.port <= 65535:
        problems.append(f"port must be between 1 and 65535, got {cfg.port}")
    if cfg.url_timeout <= 0:
        problems.append(f"url_timeout must be positive, got {cfg.url_timeout}")
    if cfg.canary and not 1 <= cfg.canary_percent <= 99:
        problems.append(f"canary_percent must be between 1 and 99, got {cfg.canary_percent}")
    if cfg.canary_percent and not cfg.canary:
        problems.append("canary_percent needs a canary model")
    if cfg.log_store and (cfg.log_batch < 1 or cfg.log_queue < 1 or not cfg.log_flush_s > 0):
        problems.append("log_batch and log_queue must be at least 1 and log_flush_s positive")
    if problems:
        raise ConfigError("serve: " + "; ".join(problems))


def serve(cfg: ServeConfig) -> None:
    """Load and warm up the model, then serve it on `cfg.host`:`cfg.port` until SIGTERM or Ctrl-C."""
    model = BinCountModel(cfg)
    model.load()
    web.install(cfg)
    web.Server(cfg.host, http_port=cfg.port, enable_grpc=False, workers=1).start([model])
