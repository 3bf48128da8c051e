"""torchvision classification models by name with a new head, weights from anywhere, and freeze policies.

The head is the model's last `nn.Linear` (resnet `fc`, efficientnet `classifier.1`, convnext `classifier.2`,
…); everything before it is the backbone. Frozen parts also stay in eval mode while the rest trains, so a
frozen backbone's batch-norm statistics and stochastic depth are frozen too, not just its weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from bincount.errors import BincountError, ConfigError
from bincount.model_location import resolve_model_location
from bincount.store import KeyNotFoundError, open_store

# Their heads are not a final Linear (squeezenet) or they return auxiliary logits while training.
UNSUPPORTED = frozenset({"googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1"})
MODEL_FILE = "model.pt"
META_FILE = "model.json"


def architectures() -> list[str]:
    return [name for name in models.list_models(module=models) if name not in UNSUPPORTED]


def build_model(arch: str, num_classes: int, weights: str = "none") -> tuple[nn.Module, str]:
    """The model with a fresh `num_classes` head, and an id of its starting weights (for cache keys)."""
    if arch not in architectures():
        raise ConfigError(f"unknown architecture {arch!r}; valid: {', '.join(architectures())}")
    if weights.lower() == "none":
        model, weights_id = models.get_model(arch, weights=None), "none"
    elif _is_location(weights):
        model = models.get_model(arch, weights=None)
        state, weights_id = _read_state_dict(weights)
        _replace_head(model, num_classes)
        _load_state(model, state, weights, arch)
        return model, weights_id
    else:
        enum = _weights_enum(arch, weights)
        try:
            model = models.get_model(arch, weights=enum)
        except (OSError, RuntimeError) as e:
            raise BincountError(f"cannot get torchvision's {enum} weights for {arch} ({e}); "
                                "without network access pass --weights none or a state-dict file") from None
        weights_id = str(enum)
    _replace_head(model, num_classes)
    return model, weights_id


def _is_location(weights: str) -> bool:
    return weights.startswith("s3://") or "/" in weights or os.sep in weights or weights.endswith((".pt", ".pth"))


def _weights_enum(arch: str, name: str):
    enum = models.get_model_weights(arch)
    if name == "DEFAULT":
        return enum.DEFAULT
    valid = ["DEFAULT", *(w.name for w in enum)]
    if name not in valid:
        raise ConfigError(f"unknown weights {name!r} for {arch}; valid: {', '.join(valid)}, none, "
                          "or a state-dict file or s3:// URI")
    return enum[name]


def _read_state_dict(location: str) -> tuple[dict[str, torch.Tensor], str]:
    """A state dict from a local file or `s3://bucket/key`; our checkpoints (with a `model` entry) too."""
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


def _replace_head(model: nn.Module, num_classes: int) -> None:
    old = head(model)
    model.set_submodule(head_name(model), nn.Linear(old.in_features, num_classes))


def stages(model: nn.Module) -> list[str]:
    """Names `freeze` accepts besides none/backbone: modules one or two levels deep, outside the head."""
    head_path = head_name(model)
    names = []
    for name, module in model.named_modules():
        if not name or name.count(".") > 1 or not any(True for _ in module.parameters()):
            continue
        if head_path == name or head_path.startswith(name + "."):
            continue
        names.append(name)
    return names


def apply_freeze(model: nn.Module, policy: str) -> None:
    """`backbone`: only the head trains; `none`: everything; a stage name: everything up to it is frozen."""
    params = list(model.named_parameters())
    if policy == "none":
        return
    head_prefix = head_name(model) + "."
    if policy == "backbone":
        frozen = {n for n, _ in params if not n.startswith(head_prefix)}
    else:
        if policy not in stages(model):
            raise ConfigError(f"unknown freeze policy {policy!r}; valid: none, backbone, or a stage: "
                              f"{', '.join(stages(model))}")
        last = max(i for i, (n, _) in enumerate(params) if n.startswith(policy + "."))
        frozen = {n for n, _ in params[: last + 1]}
    for name, p in params:
        p.requires_grad_(name not in frozen)


def train_mode(model: nn.Module) -> None:
    """`model.train()`, except that every submodule whose parameters are all frozen stays in eval mode."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def save_exported(store, prefix: str, model: nn.Module, meta: dict) -> None:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    store.put(f"{prefix}/{MODEL_FILE}", buf.getvalue())
    store.put_text(f"{prefix}/{META_FILE}", json.dumps(meta, indent=2) + "\n")


def load_exported(location: str, store: str | None = None) -> tuple[nn.Module, dict]:
    """An exported model (in eval mode) and its model.json, from a model directory or URI, or from a run name
    (`RUN` or `models/RUN`) under `STORE/models/`."""
    location = resolve_model_location(location, store)
    model_store = open_store(location)
    try:
        meta = json.loads(model_store.get_text(META_FILE))
        data = model_store.get(MODEL_FILE)
    except KeyNotFoundError:
        raise BincountError(f"no exported model at {location} (expected {META_FILE} and {MODEL_FILE})") from None
    model, _ = build_model(meta["arch"], len(meta["classes"]), "none")
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return model.eval(), meta
