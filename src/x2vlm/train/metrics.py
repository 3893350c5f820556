"""Metrics: JSON lines (always), TensorBoard (when installed); FLOPs and the machine's matmul peak
for model-FLOPs utilisation."""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, name: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = Path(out_dir) / name
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.debug("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def count_step_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` (forward + backward) under torch's FLOP counter; returns its result and the FLOPs."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


def measure_matmul_peak(device: torch.device, precision: str, size: int | None = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of a square matmul in the run's precision: the denominator of MFU. The best of
    ``repeats`` timings, so that a moment of contention at start-up does not lower the peak.
    Measured once per process, device, precision and size (a demo runs many trainings in one process)."""
    return _matmul_peak(torch.device(device), precision, size, repeats)


@functools.lru_cache(maxsize=None)
def _matmul_peak(device: torch.device, precision: str, size: int | None, repeats: int) -> float:
    size = size or (4096 if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
