"""The kserve predictor: photos in (base64 or URL, V1 or V2 protocol), item counts and probabilities out.

V1  POST /v1/models/<name>:predict  {"instances": [{"image": {"b64": "..."}}, {"url": "https://..."}]}
    → {"predictions": [{"count": 3, "probabilities": {"1": 0.05, ...}}, ...]}
V2  POST /v2/models/<name>/infer    one BYTES input of shape [N]: `image` (base64 image files; raw ones in the
    binary data extension reach it as base64, see `binary`) or `url`
    → outputs `count` (INT32 [N]) and `probabilities` (FP32 [N, classes], columns in class order)

The instances of a request are decoded in parallel and predicted as one batch; concurrent requests share
forward passes (see `batcher`). Anything wrong with a request is a `RequestError` with a 4xx status.
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
from torch.fx.experimental.optimization import fuse

from bincount.config import ServeConfig
from bincount.errors import ConfigError
from bincount.serve import web
from bincount.serve.batcher import Batcher
from bincount.serve.errors import RequestError
from bincount.serve.fetch import UrlPolicy, fetch
from bincount.serve.images import decode_image
from bincount.train import presets
from bincount.train.distributed import pick_device
from bincount.train.distributed import cpu_has_bf16
from bincount.train.models import load_exported

V1_FORM = '{"image": {"b64": "..."}} or {"url": "https://..."}'
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FETCH_THREADS = 16


@dataclass(frozen=True)
class ModelInfo:
    """What model.json tells the server: the classes (item counts) and how to prepare a photo."""

    arch: str
    classes: tuple[int, ...]
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_meta(cls, meta: dict, where: str) -> ModelInfo:
        missing = [k for k in ("arch", "classes", "input_size", "mean", "std") if k not in meta]
        if missing:
            raise ConfigError(f"{where}: model.json lacks {', '.join(missing)}")
        if meta.get("resize", presets.RESIZE_MODE) != presets.RESIZE_MODE:
            raise ConfigError(f"{where}: model.json asks for resize {meta['resize']!r}; this server does "
                              f"{presets.RESIZE_MODE!r}")
        return cls(meta["arch"], tuple(meta["classes"]), int(meta["input_size"]), tuple(meta["mean"]),
                   tuple(meta["std"]))


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the hardware computes it natively (AVX512-BF16/AMX CPUs, recent GPUs), else fp32."""
    cuda = device.type == "cuda"
    if precision == "auto":
        return "bf16" if (torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()) else "fp32"
    if precision not in DTYPES or (precision == "fp16" and not cuda):
        raise ConfigError(f"unknown precision {precision!r} for {device.type}; valid: auto, bf16, fp32"
                          + (", fp16" if cuda else ""))
    return precision


class Runner:
    """uint8 image batch → class probabilities, in the one inference thread. The model is prepared once:
    each BatchNorm folded into the convolution before it (in fp32, with torch.fx), weights cast to the
    serving precision (bf16 weights cost nothing per call, where autocast would recast them on every
    forward pass), channels_last memory (the fast layout for oneDNN and cuDNN convolutions)."""

    def __init__(self, net: torch.nn.Module, info: ModelInfo, precision: str, device: torch.device):
        self.device = device
        self.dtype = DTYPES[precision]
        self.net = fuse(net.eval()).to(device=device, dtype=self.dtype, memory_format=torch.channels_last)
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.device).float() - self.mean) / self.std
        logits = self.net(x.to(dtype=self.dtype, memory_format=torch.channels_last))
        return logits.float().softmax(1).cpu()


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
        self.info: ModelInfo | None = None
        self.batcher: Batcher | None = None

    def load(self) -> bool:
        """Load, then warm up at the smallest and largest batch, so the first requests are as fast as any."""
        net, meta = load_exported(self.cfg.model)
        self.info = ModelInfo.from_meta(meta, self.cfg.model)
        device = pick_device(self.cfg.device)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        runner = Runner(net, self.info, resolve_precision(self.cfg.precision, device), device)
        size = self.info.input_size
        for n in sorted({1, self.cfg.max_batch}):
            runner(torch.zeros(n, 3, size, size, dtype=torch.uint8))
        self.batcher = Batcher(runner, self.cfg.max_batch)
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
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.info.classes)]}]

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
        counts = [self.info.classes[i] for i in probabilities.argmax(1).tolist()]
        if result.batch.v2 is None:
            keys = [str(c) for c in self.info.classes]
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
        return decode_image(data, self.info.input_size, self.cfg.max_pixels, where)


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
