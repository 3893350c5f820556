"""Training checkpoints that resume exactly and are never half-written.

A checkpoint is a directory ``checkpoints/step_XXXXXXXX`` holding the model (``config.json`` +
``model.safetensors``, loadable with ``from_pretrained``), ``train_state_rank{r}.pt`` per rank
(optimizer, scheduler, step, RNG states, data-reader positions, counters) and ``run.yaml``. It is
written to a temporary directory and renamed into place, then ``checkpoints/latest`` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact and named.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from x2vlm.checkpoint import WEIGHTS_NAME, _atomic_write, check_and_load, full_state_dict, save_pretrained
from x2vlm.train.distributed import DistInfo, barrier

log = logging.getLogger(__name__)

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())


def save_training_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    train_state: dict[str, Any],
    dist_info: DistInfo,
    run_config_text: str = "",
    keep_last: int = 2,
) -> Path:
    """Every rank writes its own train state; rank 0 writes the model and publishes the directory."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    staging = root / f".staging_step_{step:08d}"
    weights = full_state_dict(model)  # every rank takes part (FSDP gathers the shards)
    if dist_info.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_pretrained(model, staging, state=weights)
        if run_config_text:
            (staging / "run.yaml").write_text(run_config_text)
    barrier()
    torch.save({**train_state, "step": step, "rng": rng_state()}, staging / f"train_state_rank{dist_info.rank}.pt")
    barrier()
    if dist_info.is_main:
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _atomic_write(root / LATEST, lambda tmp: Path(tmp).write_text(final.name + "\n"))
        if keep_last > 0:
            older = sorted(p for p in root.glob("step_*") if p != final)
            for old in older[: max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written: %s", final)
    barrier()
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{pointer} names {path}, which holds no {WEIGHTS_NAME}")
    return path


def load_training_checkpoint(path: str | Path, model: torch.nn.Module, dist_info: DistInfo) -> dict[str, Any]:
    """Model weights (strict) and this rank's train state; the caller restores optimizer/scheduler/data."""
    from safetensors.torch import load_file

    path = Path(path)
    check_and_load(model, load_file(str(path / WEIGHTS_NAME)), str(path / WEIGHTS_NAME))
    state_file = path / f"train_state_rank{dist_info.rank}.pt"
    if not state_file.exists():
        raise FileNotFoundError(f"{state_file}: missing (was the run saved with a different number of processes?)")
    # Our own file: it holds numpy/python RNG states, which safe loading does not accept.
    return torch.load(state_file, map_location="cpu", weights_only=False)
