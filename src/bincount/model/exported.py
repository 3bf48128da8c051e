"""The exported model: what training writes and evaluate, serve and the audit read, in one home.

`models/<run>/model.pt` holds the weights; `model.json` holds everything else that turns a photo into a count
the way training validated it: the architecture and classes, the preprocessing (input size, resize,
normalization), the test-time augmentation, the temperature that calibrates the probabilities on the validation
split, and the rule that turns probabilities into one count. Loading, preprocessing, TTA, calibration and
decoding are written here once, so the same photo gets the same probabilities from every stage.
"""

from __future__ import annotations

import copy
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

from bincount.devices import DTYPES, inference_precision
from bincount.errors import BincountError, ConfigError
from bincount.model.preprocess import RESIZE, read_image
from bincount.model.zoo import build_model
from bincount.store import KeyNotFoundError, Store, open_store

MODEL_FILE = "model.pt"
META_FILE = "model.json"
FORMAT = 2
TTA_MODES = ("none", "dihedral")
DECODINGS = ("argmax", "median")


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the network's input: stretched to `size`², then normalized by mean and std (of 0..1)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = RESIZE

    def read(self, data: bytes, max_pixels: int | None = None) -> torch.Tensor:
        return read_image(data, self.size, max_pixels)

    def normalize(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32,
                  channels_last: bool = False) -> torch.Tensor:
        """uint8 NCHW batch → normalized batch on `device`: training and inference both call this."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1) * 255
        x = ((images.to(device, non_blocking=True).float() - mean) / std).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass(frozen=True)
class Inference:
    """`tta`: none, or dihedral (the mean log-probability over the 8 flips and quarter turns, none of which
    changes a bin's count); `temperature` divides those log-probabilities (fitted on validation);
    `decode`: argmax (the most likely count) or median (the count that minimizes the expected absolute error)."""

    tta: str = "none"
    temperature: float = 1.0
    decode: str = "argmax"

    def __post_init__(self) -> None:
        if self.tta not in TTA_MODES:
            raise ConfigError(f"unknown tta {self.tta!r}; valid: {', '.join(TTA_MODES)}")
        if self.decode not in DECODINGS:
            raise ConfigError(f"unknown decode {self.decode!r}; valid: {', '.join(DECODINGS)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature}")


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images a bin photo stays the same count under: 4 quarter turns, each also mirrored."""
    mirrored = images.flip(-1)
    return [torch.rot90(x, k, dims=(-2, -1)) for x in (images, mirrored) for k in range(4)]


def decode(probabilities: torch.Tensor, how: str) -> torch.Tensor:
    """Class indices from probabilities [N, classes]."""
    if how == "median":
        return (probabilities.cumsum(1) >= 0.5).float().argmax(1)
    return probabilities.argmax(1)


def fit_inference(log_probs: torch.Tensor, targets: torch.Tensor, tta: str, calibration: str,
                  decode_as: str) -> Inference:
    """The inference an export uses, fitted on the validation split's log-probabilities as the exported model
    predicts them (with its TTA): the temperature, where calibration is `temperature`."""
    temperature = fit_temperature(log_probs, targets) if calibration == "temperature" else 1.0
    return Inference(tta, temperature, decode_as)


def fit_temperature(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature that minimizes the negative log-likelihood of `targets`: a log-spaced scan, then a golden
    section around the best point; deterministic and free of an optimizer's step size."""
    targets = targets.long()

    def nll(log_t: float) -> float:
        return nn.functional.cross_entropy(log_probs / math.exp(log_t), targets).item()

    grid = [math.log(0.05) + i * (math.log(20.0) - math.log(0.05)) / 60 for i in range(61)]
    best = min(range(len(grid)), key=lambda i: nll(grid[i]))
    lo, hi = grid[max(0, best - 1)], grid[min(len(grid) - 1, best + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return round(math.exp((lo + hi) / 2), 4)


class ExportedModel:
    def __init__(self, net: nn.Module, arch: str, classes: Sequence[int], preprocessing: Preprocessing,
                 inference: Inference, meta: dict[str, Any] | None = None):
        self.net = net.eval()
        self.arch = arch
        self.classes = tuple(classes)
        self.preprocessing = preprocessing
        self.inference = inference
        self.meta = meta or {}

    @classmethod
    def load(cls, location: str, store: str | None = None) -> ExportedModel:
        """From a model directory or URI, or from a run name (`RUN` or `models/RUN`) under `store`."""
        location = resolve_location(location, store)
        meta = read_meta(location)
        try:
            data = open_store(location).get(MODEL_FILE)
        except KeyNotFoundError:
            raise _missing(location) from None
        preprocessing, inference = _read_meta(meta, location)
        net, _ = build_model(meta["arch"], len(meta["classes"]), "none", head_kind=meta.get("head", "softmax"))
        net.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        return cls(net, meta["arch"], meta["classes"], preprocessing, inference, meta)

    def save(self, store: Store, prefix: str) -> None:
        """model.pt, then model.json, whose presence marks the export complete."""
        buf = io.BytesIO()
        torch.save(self.net.state_dict(), buf)
        store.put(f"{prefix}/{MODEL_FILE}", buf.getvalue())
        store.put_text(f"{prefix}/{META_FILE}", json.dumps(self.describe(), indent=2) + "\n")

    def describe(self) -> dict[str, Any]:
        return {**self.meta, "format": FORMAT, "arch": self.arch, "classes": list(self.classes),
                "preprocessing": {**asdict(self.preprocessing), "mean": list(self.preprocessing.mean),
                                  "std": list(self.preprocessing.std)},
                "inference": asdict(self.inference)}

    def calibrated(self, inference: Inference) -> ExportedModel:
        return ExportedModel(self.net, self.arch, self.classes, self.preprocessing, inference, dict(self.meta))

    def predictor(self, device: torch.device, precision: str = "auto") -> Predictor:
        return Predictor(self, device, inference_precision(precision, device))

    def counts(self, probabilities: torch.Tensor) -> list[int]:
        return [self.classes[i] for i in decode(probabilities, self.inference.decode).tolist()]


class Predictor:
    """uint8 image batch → calibrated class probabilities, on one device in one precision. The network is
    prepared once: each BatchNorm folded into the convolution before it (where torch.fx can trace the model;
    timm's TF-padded EfficientNets cannot be traced and keep theirs), weights cast to the precision (bf16
    weights cost nothing per call, where autocast would recast them on every forward pass), channels_last
    memory (the fast layout for oneDNN and cuDNN convolutions)."""

    def __init__(self, model: ExportedModel, device: torch.device, precision: str):
        self.model = model
        self.device = device
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.net = _fold_batch_norm(model.net).to(device=device, dtype=self.dtype, memory_format=torch.channels_last)

    @torch.inference_mode()
    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Log-probabilities before calibration, averaged over the TTA views; float32 on the CPU."""
        x = self.model.preprocessing.normalize(images, self.device, self.dtype, channels_last=True)
        views = dihedral_views(x) if self.model.inference.tta == "dihedral" else [x]
        total = sum(self.net(v).float().log_softmax(1) for v in views)
        return (total / len(views)).cpu()

    def calibrate(self, log_probs: torch.Tensor) -> torch.Tensor:
        return (log_probs / self.model.inference.temperature).softmax(1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.calibrate(self.log_probs(images))


def _fold_batch_norm(net: nn.Module) -> nn.Module:
    """A folded copy; the exported weights themselves stay as they are."""
    try:
        return fuse(net.eval())
    except Exception:                           # torch.fx cannot trace every model; folding is only a speed-up
        return copy.deepcopy(net).eval()


def read_meta(location: str) -> dict[str, Any]:
    """The checked model.json of the exported model at `location`, without building the network: what a caller
    that only needs the classes pays (loading the weights costs a few tenths of a second)."""
    model_store = open_store(location)
    try:
        meta = json.loads(model_store.get_text(META_FILE))
    except KeyNotFoundError:
        raise _missing(location) from None
    except json.JSONDecodeError as e:
        raise BincountError(f"{location}/{META_FILE} is not JSON ({e})") from None
    if not model_store.exists(MODEL_FILE):
        raise _missing(location)
    _read_meta(meta, location)
    return meta


def _missing(location: str) -> BincountError:
    return BincountError(f"no exported model at {location} (expected {META_FILE} and {MODEL_FILE})")


def model_version(location: str, meta: dict[str, Any]) -> str:
    """A model's name in answers, logs and reports: its training run, else its directory's name."""
    return (meta.get("config") or {}).get("run") or location.rstrip("/").rsplit("/", 1)[-1]


def resolve_location(location: str, store: str | None) -> str:
    """A model directory or URI as given; a run name (`RUN`) or `models/RUN` relative to the store — even where
    the working directory happens to hold a folder of that name that is no model."""
    local = Path(location)
    if store and "://" not in location and not local.is_absolute() and not (local / META_FILE).is_file():
        run = location.strip("/")
        run = run[len("models/"):] if run.startswith("models/") else run
        return f"{store.rstrip('/')}/models/{run}"
    return location


def _read_meta(meta: dict[str, Any], where: str) -> tuple[Preprocessing, Inference]:
    """model.json as this release writes it, or as the release before (input size and normalization at the top,
    no TTA or calibration)."""
    missing = [k for k in ("arch", "classes") if k not in meta]
    pre = meta.get("preprocessing") or {k: meta[v] for k, v in (("size", "input_size"), ("mean", "mean"),
                                                               ("std", "std")) if v in meta}
    missing += [f"preprocessing.{k}" for k in ("size", "mean", "std") if k not in pre]
    if missing:
        raise ConfigError(f"{where}: {META_FILE} lacks {', '.join(missing)}")
    resize = pre.get("resize", meta.get("resize", RESIZE))
    if resize != RESIZE:
        raise ConfigError(f"{where}: {META_FILE} asks for resize {resize!r}; bincount does {RESIZE!r}")
    preprocessing = Preprocessing(int(pre["size"]), tuple(pre["mean"]), tuple(pre["std"]), resize)
    try:
        inference = Inference(**meta.get("inference", {}))
    except TypeError as e:
        raise ConfigError(f"{where}: {META_FILE} has an unknown inference setting ({e})") from None
    return preprocessing, inference
