"""Metrics: JSON lines (always), TensorBoard (when installed); FLOPs and the machine's matmul peak
for model-FLOPs utilisation; the helpers the benchmarks share (timing, peak resident memory, the
source commit)."""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper

from x2vlm.train.host_memory import release_free_memory

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

    def write(self, record: dict[str, Any], tb_step: int | None = None) -> None:
        """Append ``record`` to the jsonl file (and TensorBoard, at ``tb_step`` or the record's ``step``)."""
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0)) if tb_step is None else tb_step
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one that
# ``scaled_dot_product_attention`` dispatches to. Counted like the explicit path: two matmuls forward,
# four backward (the kernel's recomputation of the scores is not model work), so fused and explicit
# attention count the same FLOPs and utilisation compares with the official count.
_EXTRA_FLOP_FORMULAS = {
    getattr(torch.ops.aten, name): formula
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward_flops))
    if hasattr(torch.ops.aten, name)
}


class _TotalFlops(TorchDispatchMode):
    """Adds up the FLOPs of every operator that runs, by torch's FLOP formulas (``flop_registry``)
    and ours. torch's ``FlopCounterMode`` also attributes them to modules with a module tracker,
    whose hooks keep each checkpointed block's activations alive: under activation checkpointing
    the counted step held 2 GB more of x2vlm-base's W1 step (heap after it 5.68 vs 3.68 GB), and
    whatever small allocation landed at the top of that heap kept every later step's memory
    spread over it (peak 5.16 vs 4.66 GB). Only the total is needed here."""

    def __init__(self) -> None:
        super().__init__()
        self.formulas = {**flop_registry, **{op: shape_wrapper(f) for op, f in _EXTRA_FLOP_FORMULAS.items()}}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_step_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` (forward + backward) counting its FLOPs by torch's formulas; returns its result and the FLOPs."""
    with _TotalFlops() as counter:
        result = fn()
    return result, counter.total


_PEAKS: dict[tuple, float] = {}  # best matmul rate per (device, precision, size, repeats)


def measure_matmul_peak(device: torch.device, precision: str, size: int | None = None, repeats: int = 5,
                        again: bool = False) -> float:
    """Achieved FLOP/s of a square matmul in the run's precision: the denominator of MFU. The best of
    ``repeats`` timings, so that a moment of contention at start-up does not lower the peak.
    Measured once per process, device, precision and size (a demo runs many trainings in one process);
    ``again``: measured anew, keeping the best of all measurements."""
    key = (torch.device(device), precision, size, repeats)
    if again or key not in _PEAKS:
        _PEAKS[key] = max(_PEAKS.get(key, 0.0), *matmul_rates(key[0], precision, size, repeats))
    return _PEAKS[key]



def flops_utilisation(flops: float, seconds: float, device: torch.device, precision: str) -> float:
    """Model-FLOPs utilisation: ``flops / seconds`` over ``measure_matmul_peak``. A rate above the
    peak means the peak was measured in a slow moment (this CPU's speed varies by a third within an
    hour, and a run once logged an MFU of 124 %), so the peak is then measured again and the best
    kept; what remains above 100 % is work that runs faster than the square matmul."""
    if not flops or seconds <= 0:
        return 0.0
    rate = flops / seconds
    peak = measure_matmul_peak(device, precision)
    if rate > peak:
        peak = measure_matmul_peak(device, precision, again=True)
    return rate / peak


def matmul_rates(device: torch.device | str, precision: str, size: int | None = None, repeats: int = 5) -> list[float]:
    """FLOP/s of each of ``repeats`` timed square matmuls (after one untimed), fp32 or bf16 inputs."""
    device = torch.device(device)
    size = size or (4096 if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG alone
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    times = time_runs(lambda: a @ b, repeats, device=device)
    return [2 * size**3 / t for t in times]


# -- shared by the benchmarks ------------------------------------------------------------------------
def time_runs(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: torch.device | str = "cpu") -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


@dataclass(frozen=True)
class Spread:
    """Median, min and max of a list of measurements."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values), len(values))


def reset_peak_rss() -> bool:
    """Start a new peak-resident-memory window for ``peak_rss`` (Linux ``clear_refs`` 5), after
    ``release_free_memory``; False where that is not possible (then ``peak_rss`` is the peak since
    the process started)."""
    release_free_memory()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):  # not Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_rss() -> int | None:
    """Peak resident memory (bytes) of this process since start or the last ``reset_peak_rss``."""
    with contextlib.suppress(OSError):  # not Linux
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def source_commit(start: str | Path | None = None) -> str:
    """Short hash of the checked-out commit of the repository holding ``start`` (default: this
    package), read from ``.git`` without running git; ``"unknown"`` outside a repository. Uncommitted
    changes are not detected."""
    here = Path(start or __file__).resolve()
    for folder in [here, *here.parents]:
        git = folder / ".git"
        if git.is_file():  # worktree or submodule: "gitdir: <path>"
            text = git.read_text().strip()
            if not text.startswith("gitdir:"):
                return "unknown"
            git = (folder / text.split(":", 1)[1].strip()).resolve()
        if not git.is_dir():
            continue
        with contextlib.suppress(OSError):
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head[:7]
            ref = head.split(":", 1)[1].strip()
            common = git / "commondir"
            roots = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
            for root in roots:
                if (root / ref).is_file():
                    return (root / ref).read_text().strip()[:7]
                packed = root / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + ref):
                            return line.split()[0][:7]
        return "unknown"
    return "unknown"
