"""What of a model trains, and how fast: freeze policies and the optimizer's parameter groups.

Frozen parts also stay in eval mode while the rest trains, so a frozen backbone's batch-norm statistics and
stochastic depth are frozen too, not just its weights. A pretrained backbone can learn at a fraction of the
head's rate (`backbone_lr_scale`): the new head starts from nothing, the backbone from features worth keeping.
"""

from __future__ import annotations

from torch import nn

from bincount.errors import ConfigError
from bincount.model.zoo import head_name


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


def param_groups(net: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float,
                 head_prefix: str) -> list[dict]:
    """Trainable parameters in up to four groups: head or backbone × decayed weights or undecayed biases and
    normalization parameters. `head_prefix` "" makes everything head (a net that is only the head)."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith(head_prefix), p.ndim > 1), []).append(p)
    return [{"params": params, "lr": lr * (1.0 if is_head else backbone_lr_scale),
             "weight_decay": weight_decay if decayed else 0.0}
            for (is_head, decayed), params in sorted(groups.items(), reverse=True)]
