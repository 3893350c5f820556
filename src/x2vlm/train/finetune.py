"""Fine-tuning and evaluation of every task through one loop (spec §4.0, defects of §6 fixed).

    x2vlm finetune retrieval --config configs/finetune/retrieval_small_world.yaml [--set epochs=3]
    x2vlm evaluate retrieval --checkpoint DIR --config FILE

A task (``x2vlm.tasks.<name>.build_task``) supplies the data, the loss and the evaluation; this
module owns the rest: model construction and initialisation, AdamW + linear schedule, epochs,
gradient accumulation, mixed precision, DDP, atomic checkpoints with exact resume, metrics, and
model selection on the *validation* split (the official scripts select on test), after which the
other splits are evaluated once with the selected weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from x2vlm.checkpoint import from_pretrained, save_pretrained
from x2vlm.config import X2VLMConfig, dataclass_from_mapping, preset
from x2vlm.models.x2vlm import X2VLM, check_towers
from x2vlm.precision import autocast as precision_autocast, resolve_precision
from x2vlm.tasks.common import EvalContext, FinetuneTask
from x2vlm.tokenizer import Tokenizer, model_tokenizer
from x2vlm.train.distributed import DistInfo, barrier, cleanup, init_distributed
from x2vlm.train.metrics import MetricsWriter, count_step_flops, flops_utilisation, measure_matmul_peak
from x2vlm.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, build_scheduler
from x2vlm.train.pretrain import NoSync, initialise, read_run_config
from x2vlm.train.state import latest_checkpoint, load_training_checkpoint, save_training_checkpoint, set_rng_state

log = logging.getLogger(__name__)

# Task name (the ``task:`` of a config, the CLI argument) -> module holding its ``build_task``.
TASK_MODULES = {
    "retrieval": "x2vlm.tasks.retrieval",
    "grounding": "x2vlm.tasks.grounding",
    "nlvr": "x2vlm.tasks.nlvr",
    "vqa": "x2vlm.tasks.vqa",
    "video_qa": "x2vlm.tasks.video_qa",
    "captioning": "x2vlm.tasks.captioning",
    "xvnli": "x2vlm.tasks.xvnli",  # IGLUE; xGQA is the vqa task with format: gqa, MaRVL the nlvr task
}

BEST = "best"  # directory under out_dir holding the selected weights


@dataclass
class HeadWarmupConfig:
    """Fit a newly initialised classifier head on frozen features before fine-tuning (linear probing
    then fine-tuning, "LP-FT", Kumar et al. 2022): the classifier inputs of every training item
    (evaluation transform, encoders as initialised) are computed once, the head alone trains on them
    for ``epochs`` with AdamW, then fine-tuning starts from the fitted head instead of a random one,
    whose gradients would otherwise move the pre-trained encoders the most in the first steps. For
    tasks whose head classifies fused features (NLVR2, XVNLI); ``epochs: 0`` (the default, as the
    official fine-tuning) skips it."""

    epochs: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64


@dataclass
class FinetuneConfig:
    task: str
    model: str = "x2vlm-small"  # preset name, a config.json path, or a model directory (its config.json and tokenizer)
    model_changes: dict[str, Any] = field(default_factory=dict)
    init: str | list[str] = "scratch"  # scratch | minilm | bert:<HF dir> | beit2:<file> | official:<file> | ours:<dir>
    data: dict[str, Any] = field(default_factory=dict)  # the task's own section
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule spans them)
    batch_size: int = 16  # per process
    eval_batch_size: int = 64
    eval_every: int | None = None  # optimizer steps between validations (default: once per epoch)
    accumulate: int = 1
    grad_clip: float | None = None  # the official fine-tuning does not clip
    # Activation checkpointing of every transformer block/layer (X2VLM.set_grad_checkpointing): less
    # activation memory for about a third more compute; the same values and gradients.
    grad_checkpointing: bool = False
    # Towers kept as initialised ("vision", "text"; X2VLM.freeze): only the fusion and heads train.
    # With memoize_frozen their outputs are computed once per distinct image / text (memory: every
    # distinct input's output), which makes a step of fusion-only training several times cheaper.
    freeze: list[str] = field(default_factory=list)
    memoize_frozen: bool = True
    precision: str = "auto"
    seed: int = 42
    out_dir: str = "runs/finetune"
    log_every: int = 10
    ckpt_every: int | None = None  # optimizer steps between resumable checkpoints (default: at each validation)
    keep_last: int = 1
    num_workers: int = 0
    tensorboard: bool = True
    head_warmup: HeadWarmupConfig = field(default_factory=HeadWarmupConfig)


_SECTIONS = {"optimizer": OptimizerConfig, "schedule": ScheduleConfig, "head_warmup": HeadWarmupConfig}


def build_finetune_config(data: Any, where: str) -> FinetuneConfig:
    """FinetuneConfig from a mapping; unknown keys (top level, optimizer, schedule) are errors naming the key."""
    if isinstance(data, dict) and "task" not in data:
        raise ValueError(f"{where}: missing key 'task' ({', '.join(TASK_MODULES)})")
    cfg = dataclass_from_mapping(FinetuneConfig, data, where, _SECTIONS)
    if cfg.task not in TASK_MODULES:
        raise ValueError(f"{where}: task {cfg.task!r} unknown; known: {', '.join(TASK_MODULES)}")
    check_towers(cfg.freeze, where)
    warm = cfg.head_warmup
    for key, value in (("epochs", warm.epochs), ("batch_size", warm.batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "epochs" else 1):
            raise ValueError(f"{where}: head_warmup.{key} must be an integer >= {0 if key == 'epochs' else 1}, got {value!r}")
    if not warm.lr > 0:
        raise ValueError(f"{where}: head_warmup.lr must be positive, got {warm.lr!r}")
    return cfg


def load_finetune_config(path: str | Path | None, overrides: list[str] = (), task: str | None = None) -> FinetuneConfig:
    """A run config from YAML plus ``--set key=value`` overrides; ``task`` (the CLI's) must agree."""
    data = read_run_config(path, overrides)
    if task is not None:
        if data.setdefault("task", task) != task:
            raise ValueError(f"{path}: config is for task {data['task']!r}, not {task!r}")
    return build_finetune_config(data, str(path or "config"))


def config_to_yaml(cfg: FinetuneConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# -- task and model ---------------------------------------------------------------------------------
def model_directory(cfg: FinetuneConfig) -> Path | None:
    """The directory of the configured model's ``config.json`` (where its tokenizer files are), or
    None for a preset."""
    if cfg.model.endswith(".json"):
        return Path(cfg.model).parent
    if Path(cfg.model).is_dir():
        return Path(cfg.model)
    return None


def base_model_config(cfg: FinetuneConfig) -> X2VLMConfig:
    directory = model_directory(cfg)
    if directory is None:
        model_cfg = preset(cfg.model)
    else:
        model_cfg = X2VLMConfig.load(cfg.model if cfg.model.endswith(".json") else directory / "config.json")
    return model_cfg.replace(**cfg.model_changes) if cfg.model_changes else model_cfg


def run_tokenizer(cfg: FinetuneConfig, model_cfg: X2VLMConfig) -> Tokenizer:
    """The tokenizer of the run: what ``model_changes`` names, else the configured model directory's
    own tokenizer files, else its config's ``tokenizer``."""
    if "tokenizer" in cfg.model_changes:
        return model_tokenizer(None, model_cfg.tokenizer)
    return model_tokenizer(model_directory(cfg), model_cfg.tokenizer)


def build_task(cfg: FinetuneConfig, model_cfg: X2VLMConfig, tokenizer: Tokenizer) -> FinetuneTask:
    module = importlib.import_module(TASK_MODULES[cfg.task])
    return module.build_task(cfg.data, model_cfg, tokenizer, f"task {cfg.task}: data")


def build_model(cfg: FinetuneConfig, task: FinetuneTask, model_cfg: X2VLMConfig) -> tuple[X2VLM, list[str]]:
    """The task model, initialised per ``cfg.init``; returns it and its newly initialised parameters."""
    model = X2VLM(model_cfg.replace(task=task.model_task, **task.model_changes))
    new = {n for n, _ in model.named_parameters()}
    for spec in [cfg.init] if isinstance(cfg.init, str) else cfg.init:
        new &= set(initialise(model, spec))
    if task.lr_mult_prefixes:
        new |= {n for n, _ in model.named_parameters() if n.startswith(task.lr_mult_prefixes)}
    return model, sorted(new)


# -- data order -------------------------------------------------------------------------------------
def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of sample indices for one epoch: a seeded permutation, split across ranks,
    the incomplete last round dropped (as the official DistributedSampler with drop_last)."""
    per_round = batch_size * world_size
    rounds = n // per_round
    if rounds == 0:
        raise ValueError(f"the training set has {n} samples, fewer than one batch ({batch_size} x {world_size} processes)")
    order = np.random.default_rng([seed, epoch]).permutation(n)[: rounds * per_round]
    mine = order.reshape(rounds, world_size, batch_size)[:, rank]
    return [batch.tolist() for batch in mine]


class _EpochBatches(torch.utils.data.Dataset):
    """Batch ``i`` of an epoch, built from its samples with rngs fixed by (seed, epoch, index), so
    a worker pool or a resumed run produces exactly the same batches."""

    def __init__(self, task: FinetuneTask, batches: list[list[int]], seed: int, epoch: int):
        self.task, self.batches, self.seed, self.epoch = task, batches, seed, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        samples = [self.task.train_set.get(index, np.random.default_rng([self.seed, self.epoch, index])) for index in self.batches[i]]
        return self.task.collate(samples)


def _batches(task: FinetuneTask, cfg: FinetuneConfig, epoch: int, start: int, dist_info: DistInfo):
    order = epoch_order(len(task.train_set), cfg.seed, epoch, dist_info.rank, dist_info.world_size, cfg.batch_size)
    dataset = _EpochBatches(task, order[start:], cfg.seed, epoch)
    if cfg.num_workers == 0:
        return (dataset[i] for i in range(len(dataset)))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers))


# -- evaluation -------------------------------------------------------------------------------------
def evaluate_splits(model: X2VLM, task: FinetuneTask, splits: list[str], ctx: EvalContext) -> dict[str, dict[str, float]]:
    model.eval()
    results = {}
    with torch.no_grad():
        for split in splits:
            start = time.perf_counter()
            results[split] = task.evaluate(model, split, ctx)
            log.info("%s %s: %s (%.1f s)", task.name, split, _fmt(results[split]), time.perf_counter() - start)
    return results


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in metrics.items())


# -- the run ----------------------------------------------------------------------------------------
def run_finetuning(cfg: FinetuneConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train, select on validation, evaluate the other splits; returns what ``metrics.json`` holds."""
    dist_info = init_distributed()
    torch.manual_seed(cfg.seed + dist_info.rank)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_cfg = base_model_config(cfg)
    tokenizer = run_tokenizer(cfg, base_cfg)
    task = build_task(cfg, base_cfg, tokenizer)
    model, new_params = build_model(cfg, task, base_cfg)
    model.to(dist_info.device)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.freeze:
        model.freeze(cfg.freeze, memoize=cfg.memoize_frozen)
        log.info("frozen: %s (%s); %d trainable parameters", ", ".join(cfg.freeze), "memoized" if cfg.memoize_frozen else "recomputed",
                 sum(p.numel() for p in model.parameters() if p.requires_grad))
    steps_per_epoch = len(task.train_set) // (cfg.batch_size * dist_info.world_size) // cfg.accumulate
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    if total_steps <= 0:
        raise ValueError(f"{cfg.task}: no optimizer step to take (train set {len(task.train_set)}, batch {cfg.batch_size}, epochs {cfg.epochs})")
    eval_every = cfg.eval_every or steps_per_epoch
    ckpt_every = cfg.ckpt_every or eval_every
    precision = resolve_precision(cfg.precision, dist_info.device)
    ctx = EvalContext(dist_info, cfg.eval_batch_size, out_dir, partial(precision_autocast, precision, dist_info.device))

    state, history, best = None, [], {"metric": -math.inf, "step": 0}
    resume_dir = Path(resume) if resume else latest_checkpoint(out_dir)
    if resume_dir is not None:
        if (resume_dir / "checkpoints").exists():
            resume_dir = latest_checkpoint(resume_dir)
        state = load_training_checkpoint(resume_dir, model, dist_info)
        history, best = state["history"], state["best"]
        log.info("resuming from %s at step %d", resume_dir, state["step"])
    metrics = MetricsWriter(out_dir, enabled=dist_info.is_main, tensorboard=cfg.tensorboard)
    if state is None and cfg.head_warmup.epochs:
        warm_up_head(model, task, cfg, ctx, new_params, metrics)
    objective = _wrap(model, task.loss, dist_info)
    optimizer = build_optimizer(model, cfg.optimizer, new_params)
    scheduler = build_scheduler(optimizer, total_steps, cfg.schedule)
    step, epoch, position = 0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
    config_text = config_to_yaml(cfg)
    if dist_info.is_main:
        (out_dir / "run.yaml").write_text(config_text)
    measure_matmul_peak(dist_info.device, precision)  # before training, outside the timed windows
    autocast = partial(precision_autocast, precision, dist_info.device, keep_weight_casts=not cfg.grad_checkpointing)
    step_flops: int | None = None
    samples_per_step = cfg.batch_size * cfg.accumulate * dist_info.world_size
    progress = tqdm(total=total_steps, initial=step, desc=f"finetune {cfg.task}", disable=not dist_info.is_main)
    if state is not None:
        set_rng_state(state["rng"])
    window_start, window_steps = time.perf_counter(), 0
    while step < total_steps:
        model.train()
        stream = _batches(task, cfg, epoch, position, dist_info)
        for micro_batches in _group(stream, cfg.accumulate):
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist_info.rank)
            totals: dict[str, float] = {}
            for micro, batch in enumerate(micro_batches):
                batch = batch.to(dist_info.device)
                sync = micro == len(micro_batches) - 1
                with NoSync(objective, sync), autocast():
                    if step_flops is None:  # with memoized frozen towers this first step runs them: MFU is an upper bound
                        losses, step_flops = count_step_flops(lambda: _forward_backward(objective, batch, generator, cfg.accumulate))
                    else:
                        losses = _forward_backward(objective, batch, generator, cfg.accumulate)
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + value / cfg.accumulate
            loss = sum(totals.values())
            if not math.isfinite(loss):
                raise FloatingPointError(f"{cfg.task} step {step}: non-finite loss {totals}; last good checkpoint: {latest_checkpoint(out_dir)}")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            position += len(micro_batches)
            window_steps += 1
            progress.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                step_time = (time.perf_counter() - window_start) / window_steps
                record = {"step": step, "epoch": epoch, "loss": loss, **{f"loss_{k}": v for k, v in totals.items()},
                          "lr": optimizer.param_groups[0]["lr"], "samples_per_s": samples_per_step / step_time,
                          "mfu": flops_utilisation(step_flops * cfg.accumulate, step_time, dist_info.device, precision) if step_flops else 0.0}
                metrics.write(record)
                progress.set_postfix(loss=f"{loss:.3f}", sps=f"{record['samples_per_s']:.1f}")
                log.info("%s step %d/%d loss %.4f (%s) lr %.2e %.1f samples/s MFU %.1f%%", cfg.task, step, total_steps, loss,
                         _fmt(totals), record["lr"], record["samples_per_s"], 100 * record["mfu"])
                window_start, window_steps = time.perf_counter(), 0
            if step % eval_every == 0 or step == total_steps:
                val = evaluate_splits(model, task, task.eval_splits[:1], ctx)[task.eval_splits[0]]
                history.append({"step": step, **val})
                metrics.write({"step": step, **{f"val_{k}": v for k, v in val.items()}})
                score = val[task.selection_metric]
                if score > best["metric"]:
                    best = {"metric": score, "step": step}
                    if dist_info.is_main:
                        _save_best(model, out_dir, tokenizer, task.inference_files)
                    barrier()
                model.train()
            if step % ckpt_every == 0 or step == total_steps:
                train_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                               "position": position, "history": history, "best": best}
                save_training_checkpoint(out_dir, step, model, train_state, dist_info, config_text, cfg.keep_last)
            if step >= total_steps:
                break
        else:
            epoch, position = epoch + 1, 0
    progress.close()
    result = finish(cfg, task, out_dir, ctx, history, best, tokenizer)
    metrics.close()
    cleanup()
    return result


def warm_up_head(model: X2VLM, task: FinetuneTask, cfg: FinetuneConfig, ctx: EvalContext, new_params: list[str],
                 metrics: MetricsWriter) -> None:
    """``head_warmup`` (see HeadWarmupConfig): fit ``model.cls_head`` alone on the task's classifier
    inputs. Every rank holds all the inputs and the same seed, so every rank fits the same head.
    A head the initialisation loaded (not newly initialised) is left as it is."""
    warm = cfg.head_warmup
    if task.classifier_inputs is None:
        raise ValueError(f"{cfg.task}: head_warmup needs a task whose head classifies fused features (nlvr, xvnli)")
    head = model.cls_head
    names = [f"cls_head.{n}" for n, _ in head.named_parameters()]
    if not set(names) <= set(new_params):
        log.info("head warm-up skipped: the initialisation loaded cls_head")
        return
    start = time.perf_counter()
    model.eval()
    features, labels = task.classifier_inputs(model, ctx)
    feature_time = time.perf_counter() - start
    optimizer = torch.optim.AdamW(head.parameters(), lr=warm.lr, weight_decay=warm.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    head.train()
    for epoch in tqdm(range(1, warm.epochs + 1), desc=f"{cfg.task}: head warm-up", disable=not ctx.dist_info.is_main, leave=False):
        loss_sum, correct = 0.0, 0
        for rows in torch.randperm(len(labels), generator=generator).split(warm.batch_size):
            rows = rows.to(labels.device)
            logits = model.classify(features[rows]).float()
            loss = F.cross_entropy(logits, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(rows)
            correct += (logits.argmax(-1) == labels[rows]).sum().item()
        record = {"head_warmup_epoch": epoch, "head_warmup_loss": loss_sum / len(labels), "head_warmup_acc": 100.0 * correct / len(labels)}
        metrics.write(record, tb_step=epoch)
        log.debug("head warm-up epoch %d/%d loss %.4f train acc %.1f%%", epoch, warm.epochs, record["head_warmup_loss"], record["head_warmup_acc"])
    head.zero_grad(set_to_none=True)
    log.info("head warm-up: classifier inputs of %d training items in %.1f s, %d epochs in %.1f s; last epoch loss %.4f, train acc %.1f%%",
             len(labels), feature_time, warm.epochs, time.perf_counter() - start - feature_time, record["head_warmup_loss"],
             record["head_warmup_acc"])


def finish(cfg: FinetuneConfig, task: FinetuneTask, out_dir: Path, ctx: EvalContext, history: list, best: dict,
           tokenizer: Tokenizer) -> dict[str, Any]:
    """Load the selected weights, evaluate every split once, draw pictures, write ``metrics.json``."""
    model = from_pretrained(out_dir / BEST).to(ctx.dist_info.device)
    results = evaluate_splits(model, task, task.eval_splits, ctx)
    pictures: list[str] = []
    if task.draw is not None and ctx.dist_info.is_main:
        pictures = [str(p) for p in task.draw(model, out_dir / "pictures", ctx)]
    summary = {"task": cfg.task, "selection": {"split": task.eval_splits[0], "metric": task.selection_metric, **best},
               "results": results, "validation_history": history, "pictures": pictures}
    if ctx.dist_info.is_main:
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("%s: selected step %d (%s %s %.2f); wrote %s", cfg.task, best["step"], task.eval_splits[0],
                 task.selection_metric, best["metric"], out_dir / "metrics.json")
    return summary


def run_evaluation(cfg: FinetuneConfig, checkpoint: str | Path, out_dir: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Evaluate a model directory on every split of the config's task; writes ``eval_metrics.json``."""
    dist_info = init_distributed()
    model = from_pretrained(checkpoint).to(dist_info.device)
    tokenizer = model_tokenizer(checkpoint, model.cfg.tokenizer)
    task = build_task(cfg, model.cfg, tokenizer)
    if model.cfg.task != task.model_task:
        raise ValueError(f"{checkpoint}: a {model.cfg.task!r} model; task {cfg.task} needs a {task.model_task!r} model "
                         f"(fine-tune it first: x2vlm finetune {cfg.task} --config ... with init ours:{checkpoint})")
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(cfg.precision, dist_info.device)
    ctx = EvalContext(dist_info, cfg.eval_batch_size, out, partial(precision_autocast, precision, dist_info.device))
    results = evaluate_splits(model, task, task.eval_splits, ctx)
    if dist_info.is_main:
        (out / "eval_metrics.json").write_text(json.dumps({"task": cfg.task, "checkpoint": str(checkpoint), "results": results}, indent=2) + "\n")
    cleanup()
    return results


def _save_best(model: X2VLM, out_dir: Path, tokenizer: Tokenizer, files: dict[str, Any] | None = None) -> None:
    """Write the selected weights (and the task's ``inference_files`` as JSON) to ``best/`` via a
    staging directory and a rename."""
    staging, final = out_dir / f".staging_{BEST}", out_dir / BEST
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(model, staging, tokenizer_files=tokenizer.files)
    for name, content in (files or {}).items():
        (staging / name).write_text(json.dumps(content) + "\n")
    old = out_dir / f".old_{BEST}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _group(stream, size: int):
    """Consecutive groups of ``size`` micro-batches (the last, shorter group is dropped)."""
    group = []
    for item in stream:
        group.append(item)
        if len(group) == size:
            yield group
            group = []


class TaskObjective(torch.nn.Module):
    """Model + task loss behind one ``forward`` (what DDP wraps)."""

    def __init__(self, model: X2VLM, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch, generator):
        return self.loss_fn(self.model, batch, generator)


def _wrap(model: X2VLM, loss_fn, dist_info: DistInfo):
    objective = TaskObjective(model, loss_fn)
    if not dist_info.distributed:
        return objective
    device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=True)


def _forward_backward(objective, batch, generator, accumulate: int) -> dict[str, float]:
    losses = objective(batch, generator)
    (sum(losses.values()) / accumulate).backward()
    return {k: float(v.detach()) for k, v in losses.items()}
