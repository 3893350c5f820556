"""What every fine-tuning task hands the shared training loop (``x2vlm.train.finetune``).

A task is plain data plus functions, built by its module's ``build_task(...)``:

* ``train_set``: a map-style set whose ``get(index, rng)`` returns one sample. All randomness of a
  sample (crop, flip, masking) comes from ``rng``, which the loop derives from (seed, epoch, index),
  so a resumed run sees exactly the samples the interrupted one would have.
* ``collate``: samples -> a batch object with ``.to(device)``.
* ``loss``: (model, batch, generator) -> named scalar losses; their sum is back-propagated.
* ``evaluate``: (model, split, context) -> flat ``{metric: float}``; every rank calls it, only the
  main rank's result is used (a task may split the work across ranks through ``context``).
* ``selection_metric``: the key of ``evaluate``'s result on ``eval_splits[0]`` (the validation
  split) that picks the best checkpoint; higher is better. The other splits are evaluated once, at
  the end, with the selected weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from x2vlm.train.distributed import DistInfo


class TrainSet(Protocol):
    def __len__(self) -> int: ...

    def get(self, index: int, rng: np.random.Generator) -> Any: ...


@dataclass
class EvalContext:
    """What an evaluation may use besides the model."""

    dist_info: DistInfo
    batch_size: int = 64
    out_dir: Path | None = None  # where pictures / prediction files go (None: write nothing)
    autocast: Any = None  # a context manager factory for mixed precision, or None


@dataclass
class FinetuneTask:
    name: str
    model_task: str  # X2VLMConfig.task: retrieval | grounding | nlvr | vqa | classification | captioning
    train_set: TrainSet
    collate: Callable[[list[Any]], Any]
    loss: Callable[[torch.nn.Module, Any, torch.Generator], dict[str, torch.Tensor]]
    evaluate: Callable[[torch.nn.Module, str, EvalContext], dict[str, float]]
    eval_splits: list[str]
    selection_metric: str
    model_changes: dict[str, Any] = field(default_factory=dict)  # e.g. {"num_labels": 1500}
    # Optional: write pictures of predictions on a few test items (called once, at the end).
    draw: Callable[[torch.nn.Module, Path, EvalContext], list[Path]] | None = None
    # Parameters whose names start with these train at lr * lr_mult like newly initialised ones,
    # even when the init loaded them (official VQA ``large_lr_for_dec``: the answer decoder).
    lr_mult_prefixes: tuple[str, ...] = ()


def check_keys(section: dict, known: set[str], where: str) -> None:
    """Unknown configuration keys are errors that name the key and the known ones."""
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous slice of ``range(n)`` for one rank (sizes differ by at most one)."""
    per, extra = divmod(n, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def gather_tensors(local: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    """Concatenate per-rank tensors (first dim may differ) in rank order; identity in one process."""
    if not dist_info.distributed:
        return local
    import torch.distributed as dist

    sizes = [None] * dist_info.world_size
    dist.all_gather_object(sizes, local.shape[0])
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(dist_info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])
