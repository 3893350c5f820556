"""The one place that chooses the numeric precision: float32, or bfloat16 autocast.

Training, fine-tuning, evaluation, the inference API and the benchmarks all enter their precision
through :func:`autocast`; a config's ``precision: auto`` is settled by :func:`resolve_precision`.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX); without it,
    bf16 autocast on the CPU is emulated and several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a GPU or on a CPU with bf16 matrix units, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"config field 'precision': unknown value {precision!r} (auto, fp32, bf16)")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matmul()) else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str, *, keep_weight_casts: bool = True) -> AbstractContextManager:
    """The context a forward pass runs in: bf16 autocast for ``"bf16"``, nothing for ``"fp32"``.

    ``keep_weight_casts``: autocast keeps the bf16 copy of every weight it casts until the outermost
    context exits (torch's cast cache), so that a weight used twice is cast once. Without activation
    checkpointing backward needs those copies anyway (each matmul saves its bf16 operands). With
    checkpointing it does not: backward recomputes each block and casts its weights again, and the
    cache would hold a bf16 copy of the whole model (0.5 GB for x2vlm-base) until the end of the
    forward pass (W1's memory there: 4.0 GB without the cache, 4.46 GB with it). So checkpointed
    training passes ``keep_weight_casts=False``.
    """
    device_type = torch.device(device).type
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=keep_weight_casts)
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}: fp32 or bf16 ('auto' is resolved by resolve_precision)")
    return nullcontext()
