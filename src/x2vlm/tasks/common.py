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

import logging
import math
import re
from collections.abc import Hashable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from x2vlm.config import check_keys as check_keys  # a task validates its data section with it
from x2vlm.train.distributed import DistInfo

log = logging.getLogger(__name__)


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
    # JSON documents written beside the selected weights (``best/<name>``) so that inference
    # (``x2vlm.inference``) computes what the evaluation computes: the answer list or label names
    # and the evaluation settings (``inference.json``).
    inference_files: dict[str, Any] = field(default_factory=dict)
    # Optional, for tasks whose head classifies fused features (``model.classify``: NLVR2, XVNLI):
    # (features, labels) of every training item at the evaluation transform, the same on every
    # rank; the fine-tuning's head warm-up (``head_warmup``) fits the new head on them.
    classifier_inputs: Callable[[torch.nn.Module, EvalContext], tuple[torch.Tensor, torch.Tensor]] | None = None


# -- values of a task's data section (errors name ``where`` and the key) -------------------------------
def require_key(data: dict, key: str, where: str) -> Any:
    """``data[key]``; a missing key or a null value is an error."""
    if data.get(key) is None:
        raise ValueError(f"{where}: missing key {key!r}")
    return data[key]


def bool_key(data: dict, key: str, default: bool, where: str) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: key {key!r} must be true or false, got {value!r}")
    return value


def positive_int_key(data: dict, key: str, default: int, where: str) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where}: key {key!r} must be a positive integer, got {value!r}")
    return value


def optional_positive_int_key(data: dict, key: str, where: str) -> int | None:
    """A positive integer, or None when the key is absent or null."""
    return None if data.get(key) is None else positive_int_key(data, key, 1, where)


def string_key(data: dict, key: str, default: str | None, where: str) -> str:
    """A non-empty string (a ``default`` of None makes the key required)."""
    value = data.get(key, default)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: key {key!r} must be a non-empty string, got {value!r}")
    return value


def crop_scale_key(data: dict, where: str, default: Sequence[float] = (0.5, 1.0)) -> tuple[float, float]:
    """``crop_scale``: the RandomResizedCrop area range ``[low, high]``, 0 < low <= high <= 1."""
    value = data.get("crop_scale", list(default))
    numbers = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers or not 0 < value[0] <= value[1] <= 1:
        raise ValueError(f"{where}: key 'crop_scale' must be [low, high] with 0 < low <= high <= 1, got {value!r}")
    return float(value[0]), float(value[1])


def typed_key(data: dict, key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    """``data[key]`` (or ``default``) checked against ``kind``; an int passes as a float; a bool is
    never an int; None passes when ``default`` is None."""
    value = data.get(key, default)
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: key {key!r}: expected {names}, got {value!r}")
    return value


def at_least(value: int, key: str, where: str, minimum: int = 1) -> int:
    """``value`` (of ``key``) when it is >= ``minimum``; else an error."""
    if value < minimum:
        raise ValueError(f"{where}: key {key!r}: must be >= {minimum}, got {value}")
    return value


def existing_path(path: str | None, key: str, where: str) -> str | None:
    """``path`` (of ``key``) when it exists or is None; else FileNotFoundError."""
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{where}: key {key!r}: no file at {path}")
    return path


EXTRA_EVAL_FILES = "extra_eval_files"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _existing_file_path(value: Any, key: str, where: str) -> str:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"{where}: key {key!r} must be a file path, got {value!r}")
    return existing_path(str(value), key, where)


def file_or_language_files(value: Any, key: str, where: str) -> str | dict[str, str]:
    """An existing file's path, or (multilingual tasks) a non-empty mapping language -> existing
    file path; language names are made of letters, digits, ``_``, ``.`` and ``-``. Errors name
    ``where`` and the key (``<key>.<language>``)."""
    if not isinstance(value, dict):
        return _existing_file_path(value, key, where)
    if not value:
        raise ValueError(f"{where}: key {key!r} must be a file path or a mapping language -> file path, got {{}}")
    files = {}
    for language, path in value.items():
        if not isinstance(language, str) or not _SPLIT_NAME.fullmatch(language):
            raise ValueError(f"{where}: key {key!r}: language {language!r} must be a non-empty string of letters, digits, "
                             "'_', '.' and '-'")
        files[language] = _existing_file_path(path, f"{key}.{language}", where)
    return files


def extra_eval_files_key(data: dict, where: str, fields: Sequence[str] = (), reserved: Sequence[str] = ("val", "test"),
                         languages: bool = False) -> dict[str, Any]:
    """The optional ``extra_eval_files`` of a data section: split name -> what evaluating that split
    reads, in the configured order; ``{}`` when the key is absent or null.

    A value is an existing file's path or, when ``fields`` are given (captioning: ``("file", "gt")``),
    a mapping of those keys to existing paths: the first field required, the others optional (None
    when absent or null). With ``languages`` a value may also be a mapping language -> path
    (``file_or_language_files``). Split names are new names (not one of ``reserved``, the task's own
    splits) made of letters, digits, ``_``, ``.`` and ``-`` (they name result files). Errors name
    ``where`` and the key (``extra_eval_files.<split>[.<field>]``)."""
    extra = data.get(EXTRA_EVAL_FILES)
    if extra is None:
        return {}
    what = "files" if not fields else "{" + ", ".join(f"{f}: ..." for f in fields) + "} mappings"
    if not isinstance(extra, dict):
        raise ValueError(f"{where}: key {EXTRA_EVAL_FILES!r} must map split names to {what}, got {extra!r}")
    result: dict[str, Any] = {}
    for name, value in extra.items():
        if not isinstance(name, str) or not _SPLIT_NAME.fullmatch(name):
            raise ValueError(f"{where}: key {EXTRA_EVAL_FILES!r}: split name {name!r} must be a non-empty string of letters, "
                             "digits, '_', '.' and '-'")
        if name in reserved:
            raise ValueError(f"{where}: key {EXTRA_EVAL_FILES!r}: split name {name!r} collides with the task's own "
                             f"'{name}' split; give the extra split another name")
        key = f"{EXTRA_EVAL_FILES}.{name}"
        if not fields:
            result[name] = file_or_language_files(value, key, where) if languages else _existing_file_path(value, key, where)
            continue
        if not isinstance(value, dict) or value.get(fields[0]) is None or set(value) - set(fields):
            optional = "".join(f", {f}: ... (optional)" for f in fields[1:])
            raise ValueError(f"{where}: key {key!r} must be a mapping {{{fields[0]}: ...{optional}}}, got {value!r}")
        result[name] = {field_name: None if value.get(field_name) is None else
                        _existing_file_path(value[field_name], f"{key}.{field_name}", where) for field_name in fields}
    return result


LANGUAGE_SEPARATOR = "/"  # per-language metric keys: "<language>/<metric>"


def mean_over_languages(per_language: dict[str, dict[str, float]]) -> dict[str, float]:
    """Every metric's mean over the languages under its plain name (what IGLUE tables report), then
    each language's metrics as ``<language>/<metric>``."""
    languages = list(per_language)
    keys = list(per_language[languages[0]])
    result = {key: float(np.mean([per_language[language][key] for language in languages])) for key in keys}
    for language, metrics in per_language.items():
        result.update({f"{language}{LANGUAGE_SEPARATOR}{key}": value for key, value in metrics.items()})
    return result


def gathered_accuracy(model, mine: Sequence[int], correct: np.ndarray, total: int, ctx: EvalContext, source: str, what: str) -> dict[str, float]:
    """``acc`` (%) over ``total`` items of which this rank judged ``mine`` (``correct``: one bool each):
    gathered from every rank, each item checked to be counted exactly once; every rank returns it."""
    local = torch.tensor(np.column_stack([np.asarray(mine, dtype=np.int64), correct]).reshape(-1, 2), dtype=torch.long)
    gathered = gather_tensors(local.to(model_device(model)), ctx.dist_info).cpu()
    if sorted(gathered[:, 0].tolist()) != list(range(total)):
        raise RuntimeError(f"{source}: evaluated {len(gathered)} {what}, expected each of {total} once")
    return {"acc": 100.0 * gathered[:, 1].double().mean().item()}


def load_eval_sets(split_files: dict[str, Any], load: Callable[[Any], Any]) -> dict[str, Any]:
    """``split -> (file, items)``, or ``split -> {language: (file, items)}`` where the split names one
    file per language (``file_or_language_files``); ``load`` reads one file."""
    return {split: {lang: (path, load(path)) for lang, path in files.items()} if isinstance(files, dict) else (files, load(files))
            for split, files in split_files.items()}


def eval_set_sizes(eval_sets: dict[str, Any]) -> str:
    """``val 120, test/de 80, ...``: the number of items of every split (and language) for the log."""
    return ", ".join(f"{split}{LANGUAGE_SEPARATOR}{lang} {len(v[1])}" if lang else f"{split} {len(v[1])}"
                     for split, sets in eval_sets.items() for lang, v in (sets.items() if isinstance(sets, dict) else [(None, sets)]))


def evaluate_eval_set(task: str, eval_sets: dict[str, Any], split: str, evaluate_file: Callable[[Any, Any], dict[str, float]]) -> dict[str, float]:
    """One split's metrics from ``load_eval_sets``' entries: ``evaluate_file(path, items)`` for a single
    file, else every language's with their mean (``mean_over_languages``)."""
    if split not in eval_sets:
        raise ValueError(f"{task}: unknown split {split!r}; configured: {list(eval_sets)}")
    sets = eval_sets[split]
    if isinstance(sets, tuple):
        return evaluate_file(*sets)
    return mean_over_languages({lang: evaluate_file(path, items) for lang, (path, items) in sets.items()})


def selection_metric_key(data: dict, val: Any, known: Sequence[str], default: str, where: str) -> str:
    """``selection_metric`` of a data section: one of ``known`` (the mean over languages when the
    validation split ``val`` is a mapping language -> file) or, then, one language's
    ``<language>/<metric>``."""
    value = string_key(data, "selection_metric", default, where)
    choices = list(known)
    if isinstance(val, dict):
        choices += [f"{language}{LANGUAGE_SEPARATOR}{key}" for language in val for key in known]
    if value not in choices:
        raise ValueError(f"{where}: 'selection_metric' {value!r} unknown; one of {choices}")
    return value


# -- evaluation helpers ------------------------------------------------------------------------------
def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def evenly_spaced_subset(items: Sequence, count: int | None, source: str, what: str = "items") -> list:
    """``count`` items spread evenly over ``items`` (all of them when ``count`` is None or larger);
    ``source`` and ``what`` name them in the warning."""
    if count is None or count >= len(items):
        return list(items)
    log.warning("%s: evaluating %d of %d %s (eval_subset)", source, count, len(items), what)
    return [items[int(k)] for k in np.linspace(0, len(items) - 1, num=count).round()]


def group_indices(keys: Sequence[Hashable]) -> list[tuple[Hashable, list[int]]]:
    """``(key, indices with that key)`` in first-seen key order, e.g. the questions of each image."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return list(groups.items())


def grouped_order(keys: Sequence[Hashable]) -> list[int]:
    """All indices, those with the same key next to each other (first-seen key order), so that a
    batch of consecutive indices shares images / videos."""
    return [index for _, indices in group_indices(keys) for index in indices]


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


@torch.no_grad()
def classifier_inputs_by_rank(model, labels: Sequence[int], batches: Callable[[list[int]], Any], features: Callable[..., torch.Tensor],
                              ctx: EvalContext, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) of every item for the head warm-up: this rank computes
    ``features(*inputs)`` for each batch of ``batches(its share of the item indices)``, then every rank
    gets all of them in item order."""
    mine = list(shard_range(len(labels), ctx.dist_info.rank, ctx.dist_info.world_size))
    parts = []
    for inputs in tqdm(batches(mine), total=math.ceil(len(mine) / ctx.batch_size), desc=f"{what}: head warm-up inputs",
                       disable=not ctx.dist_info.is_main, leave=False):
        with ctx.autocast() if ctx.autocast else nullcontext():
            parts.append(features(*inputs).float())
    local = torch.cat(parts) if parts else torch.zeros(0, model.cls_head[0].in_features, device=model_device(model))
    mine_labels = torch.tensor([labels[i] for i in mine], dtype=torch.long, device=local.device)
    return gather_tensors(local, ctx.dist_info), gather_tensors(mine_labels, ctx.dist_info)
