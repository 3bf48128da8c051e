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
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
import orjson
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model

from bincount.config import ServeConfig
from bincount.devices import pick_device
from bincount.errors import ConfigError
from bincount.model.exported import ExportedModel
from bincount.serve import web
from bincount.serve.batcher import Batcher
from bincount.serve.errors import RequestError
from bincount.serve.fetch import UrlPolicy, fetch
from bincount.serve.images import decode_image

V1_FORM = '{"image": {"b64": "..."}} or {"url": "https://..."}'
FETCH_THREADS = 16


@dataclass
class _Batch:
    images: torch.Tensor
    v2: InferRequest | None


@dataclass
class _Result:
    batch: _Batch
    probabilities: torch.Tensor


class BinCountModel(Model):
    def __init__(self, cfg: ServeConfig):
        super().__init__(cfg.name)
        check(cfg)
        self.cfg = cfg
        urls = UrlPolicy.from_config(cfg)
        self.urls = urls if urls.hosts else None
        # Fetches wait on other servers: their own threads, so slow URLs never hold up decoding.
        self.fetchers = ThreadPoolExecutor(FETCH_THREADS, "bincount-fetch") if self.urls else None
        self.model: ExportedModel | None = None
        self.batcher: Batcher | None = None

    def load(self) -> bool:
        """Load, then warm up at the smallest and largest batch, so the first requests are as fast as any."""
        self.model = ExportedModel.load(self.cfg.model)
        device = pick_device(self.cfg.device)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        predictor = self.model.predictor(device, self.cfg.precision)
        size = self.model.preprocessing.size
        for n in sorted({1, self.cfg.max_batch}):
            predictor(torch.zeros(n, 3, size, size, dtype=torch.uint8))
        self.batcher = Batcher(predictor, self.cfg.max_batch)
        self.ready = True
        return self.ready

    def stop(self) -> None:
        if self.batcher:
            self.batcher.stop()
            self.batcher = None
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
        if isinstance(payload, InferRequest):
            sources = self._v2_sources(payload)
        elif isinstance(payload, (bytes, str)):
            sources = self._v1_sources(_json(payload, headers))
        else:
            sources = self._v1_sources(payload)
        decoded = await asyncio.gather(*(self._image(*source) for source in sources), return_exceptions=True)
        failed = next((d for d in decoded if isinstance(d, BaseException)), None)
        if failed:
            raise failed
        return _Batch(torch.stack(decoded), payload if isinstance(payload, InferRequest) else None)

    async def predict(self, batch: _Batch, headers: dict | None = None) -> _Result:
        return _Result(batch, await self.batcher(batch.images))

    async def postprocess(self, result: _Result, headers: dict | None = None):
        probabilities = result.probabilities
        counts = self.model.counts(probabilities)
        if result.batch.v2 is None:
            keys = [str(c) for c in self.model.classes]
            return {"predictions": [{"count": count, "probabilities": dict(zip(keys, row))}
                                    for count, row in zip(counts, probabilities.tolist())]}
        n = len(counts)
        return InferResponse(
            model_name=self.name, response_id=result.batch.v2.id or str(uuid.uuid4()),
            infer_outputs=[InferOutput("count", [n], "INT32", np.array(counts, dtype=np.int32)),
                           InferOutput("probabilities", list(probabilities.shape), "FP32", probabilities.numpy())])

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

    async def _image(self, kind: str, value: str, where: str) -> torch.Tensor:
        """Fetched or base64-decoded, then decoded and resized, in worker threads."""
        loop = asyncio.get_running_loop()
        if kind == "url":
            if self.urls is None:
                raise RequestError(f"{where}: fetching images by URL is off on this server", HTTPStatus.FORBIDDEN)
            data = await loop.run_in_executor(self.fetchers, fetch, value, self.urls, where)
            return await loop.run_in_executor(None, self._decode, data, where)
        return await loop.run_in_executor(None, self._decode, value, where)

    def _decode(self, data: bytes | str, where: str) -> torch.Tensor:
        """`data`: the image's bytes, or a base64 string of them."""
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"{where}: invalid base64 ({e})") from None
        return decode_image(data, self.model.preprocessing.size, self.cfg.max_pixels, where)


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
    if problems:
        raise ConfigError("serve: " + "; ".join(problems))


def serve(cfg: ServeConfig) -> None:
    """Load and warm up the model, then serve it on `cfg.host`:`cfg.port` until SIGTERM or Ctrl-C."""
    model = BinCountModel(cfg)
    model.load()
    web.install(cfg)
    web.Server(cfg.host, http_port=cfg.port, enable_grpc=False, workers=1).start([model])
