"""Which device and number format a process computes in: shared by training, evaluation, serving and the audit."""

from __future__ import annotations

from pathlib import Path

import torch

from bincount.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """`auto`: this process's GPU where there is one, else the CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {device!r}; valid: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA GPU is visible")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def cpu_has_bf16() -> bool:
    """bf16 pays off on a CPU only with native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere it is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def inference_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the hardware computes it natively (AVX512-BF16/AMX CPUs, recent GPUs), else fp32."""
    cuda = device.type == "cuda"
    if precision == "auto":
        return "bf16" if (torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16()) else "fp32"
    if precision not in DTYPES or (precision == "fp16" and not cuda):
        raise ConfigError(f"unknown precision {precision!r} for {device.type}; valid: auto, bf16, fp32"
                          + (", fp16" if cuda else ""))
    return precision
