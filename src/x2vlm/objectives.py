"""Training objectives: ITC, ITM with hard (or random) negatives, MLM, box L1 + GIoU, captioning loss.

Plain functions over model outputs; the model file holds the modules, this file the losses.
Differences from the official code (its defects, spec §6): negatives are drawn for the whole batch
in one ``torch.multinomial`` call; the box loss never divides by zero and drops only degenerate
rows from the GIoU term; the feature all-gather is optional (one process needs no process group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from x2vlm.models.layers import take_rows
from x2vlm.models.x2vlm import X2VLM
from x2vlm.train.distributed import all_reduce_sum


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns the local slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (identity without an initialised multi-rank process group).

    Gradients flow back to each rank's own slice, summed over the ranks' losses, so DDP's gradient
    averaging yields exactly the gradient of the global-batch loss."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherWithGrad.apply(x)
    return x


def _gather_ids(ids: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, ids.contiguous())
        return torch.cat(parts)
    return ids


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def contrastive_logits(vision_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    return vision_feat @ text_feat.t() / temp


def contrastive_loss(
    vision_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """ITC over the global batch: symmetric cross-entropy; with ``ids`` every same-id pair is a positive
    (target spread uniformly over a row's positives). Rows with ``valid`` False (padding) are neither
    queries nor candidates."""
    vision_all = gather_across_ranks(vision_feat)
    text_all = gather_across_ranks(text_feat)
    logits = contrastive_logits(vision_all, text_all, temp)
    rows = torch.arange(logits.shape[0], device=logits.device)
    if ids is None:
        positives = rows.view(-1, 1).eq(rows.view(1, -1))
    else:
        ids_all = _gather_ids(ids).view(-1, 1)
        positives = ids_all.eq(ids_all.t())
    if valid is None:
        keep = torch.ones_like(rows, dtype=torch.bool)
    else:
        keep = _gather_ids(valid.to(torch.bool))
        logits = logits.masked_fill(~(keep.view(-1, 1) & keep.view(1, -1)), torch.finfo(logits.dtype).min)
    targets = positives.to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    loss_i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1)
    loss_t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1)
    return ((loss_i2t + loss_t2i)[keep]).mean() / 2


@torch.no_grad()
def caption_ids(text_ids: torch.Tensor) -> torch.Tensor:
    """(B,) int64 ids equal exactly for identical token rows, the same on every rank (a polynomial
    hash of the ids, wrapping in int64), so that identical captions can count as one text in
    ``contrastive_loss`` and ``sample_negatives``."""
    powers = torch.full((text_ids.shape[1],), 1_000_003, dtype=torch.int64, device=text_ids.device)
    powers = torch.cumprod(powers, dim=0)  # wraps around in int64: still a fixed function of position
    return (text_ids.to(torch.int64) * powers).sum(dim=1)


@torch.no_grad()
def sample_negatives(
    vision_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    hard: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ITM negative image per text and one negative text per image, the positives (same index,
    or same id) excluded. ``hard`` (X²-VLM): drawn in proportion to softmax(similarity / temp), so
    the texts and images ITC finds closest; else uniformly among the batch's non-positives (random
    negatives, as ViLT and METER train ITM; the features are then unused).

    Returns ``(image_neg_for_text, text_neg_for_image)``, each (B,) indices into the local batch."""
    n = vision_feat.shape[0]
    device = vision_feat.device
    if ids is None:
        positives = torch.eye(n, dtype=torch.bool, device=device)
    else:
        positives = ids.view(-1, 1).eq(ids.view(1, -1))
    if hard:
        sim = vision_feat.float() @ text_feat.float().t() / temp.float()
        weights_i2t = (F.softmax(sim, dim=1) + 1e-5).masked_fill(positives, 0)
        weights_t2i = (F.softmax(sim.t(), dim=1) + 1e-5).masked_fill(positives.t(), 0)
    else:
        weights_i2t = (~positives).float()
        weights_t2i = weights_i2t.t()
    if generator is not None and generator.device != device:  # e.g. a CPU generator, CUDA features
        weights_i2t, weights_t2i = weights_i2t.to(generator.device), weights_t2i.to(generator.device)
    image_neg = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1).to(device)
    text_neg = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1).to(device)
    return image_neg, text_neg


def matching_logits(
    model: X2VLM,
    vision_embeds: torch.Tensor,
    vision_mask: torch.Tensor,
    text_states: torch.Tensor,
    text_mask: torch.Tensor,
    image_neg: torch.Tensor,
    text_neg: torch.Tensor,
) -> torch.Tensor:
    """ITM logits (3B, 2) for positives, (negative image, text) and (image, negative text), in that
    order, in one fusion pass; every image keeps its own mask (a region its box mask).

    Each image's cross-attention keys/values are projected once and gathered for its three rows, and
    the last fusion layer computes only the CLS state the head reads: the same logits and gradients
    as fusing the concatenated inputs (the official way), with a third of the key/value projections."""
    own = torch.arange(vision_embeds.shape[0], device=vision_embeds.device)
    rows = torch.cat([own, image_neg.to(own.device), own])
    text = torch.cat([text_states, text_states, take_rows(text_states, text_neg)])
    text_masks = torch.cat([text_mask, text_mask, take_rows(text_mask, text_neg)])
    fused_cls = model.fuse(text, text_masks, vision_embeds, take_rows(vision_mask, rows), vision_rows=rows, cls_only=True)
    return model.itm_logits(fused_cls)


def matching_loss(logits: torch.Tensor) -> torch.Tensor:
    batch = logits.shape[0] // 3
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
    return F.cross_entropy(logits, labels)


def mlm_loss(logits: torch.Tensor, masked_ids: torch.Tensor, global_count: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy at the masked positions; unused slots carry -100.

    ``global_count``: the number of masked tokens over all ranks. The loss is then normalised so that
    DDP's gradient averaging yields the gradient of the mean over the global batch (ranks may hold
    different numbers of masks)."""
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), masked_ids.reshape(-1), ignore_index=-100, reduction="sum")
    if global_count is None:
        return flat / masked_ids.ne(-100).sum().clamp(min=1)
    return flat * _world_size() / global_count.clamp(min=1)


def parallel_text_losses(
    model: X2VLM,
    batch,
    generator: torch.Generator | None = None,
    compute_itm: bool = True,
    ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """CCLM parallel-text objectives (spec §3.1, ``forward_para_text``) of a ``ParallelTextBatch``;
    needs the separate-cross-encoder model (``check_parallel_text_model``).

    * ``ttc``: ITC between the two sides' text CLS features (both through ``text_proj``), all-gathered
      over ranks like ITC; target ``i`` for row ``i`` (with ``ids``: every same-id pair).
    * ``ttm``: ITM with hard negatives (``sample_negatives``), side 1 in the place of the image
      (the cross encoder's K/V input, side-1 padding masked), side 2 the fused text.
    * ``mlm``: side 1's masked ids through the text and cross encoders, cross-attending to the
      (unmasked) side-2 states; loss at side 1's masked positions only.
    """
    side1 = model.encode_text(batch.text_ids, batch.text_mask)
    side2 = model.encode_text(batch.target_ids, batch.target_mask)
    feat1, feat2 = model.text_features(side1), model.text_features(side2)
    losses = {"ttc": contrastive_loss(feat1, feat2, model.temp, ids=ids)}
    if compute_itm and side1.shape[0] > 1:
        first_neg, second_neg = sample_negatives(feat1, feat2, model.temp, ids=ids, generator=generator)
        logits = matching_logits(model, side1, batch.text_mask, side2, batch.target_mask, first_neg, second_neg)
        losses["ttm"] = matching_loss(logits)
    else:
        losses["ttm"] = side1.new_zeros(())
    logits = model.mlm_logits(batch.masked_ids, batch.text_mask, side2, batch.target_mask, batch.masked_pos)
    losses["mlm"] = mlm_loss(logits, batch.masked_targets, global_count=all_reduce_sum(batch.masked_targets.ne(-100).sum()))
    return losses


def check_parallel_text_model(model_or_cfg) -> None:
    """Parallel text needs the separate cross encoder (CCLM's ``CrossViewLM`` is an ``XVLMPlusBase``,
    spec §1.7/§3.1) whose cross-attention reads text states, i.e. text width == vision width."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if not cfg.cross_num_layers:
        raise ValueError(
            "config section 'mtexts': parallel text (CCLM TTC/TTM/MLM) needs the separate-cross-encoder model "
            "(cross_num_layers > 0, e.g. a model converted with `x2vlm convert --text-encoder`); "
            f"model {cfg.name!r} has its fusion layers inside the text encoder"
        )
    if cfg.text.hidden_size != cfg.vision.width:
        raise ValueError(
            f"config section 'mtexts': the cross encoder's cross-attention reads {cfg.vision.width}-wide vision tokens, "
            f"but side-1 text states are {cfg.text.hidden_size} wide (text.hidden_size must equal vision.width)"
        )


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def paired_generalized_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of row i of ``boxes1`` with row i of ``boxes2`` (xyxy, valid boxes)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union
    hull_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / hull


def box_losses(
    pred: torch.Tensor, target: torch.Tensor, is_image: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, GIoU) box losses on normalised (cx, cy, w, h).

    With ``is_image``, whole-image rows do not count and the normaliser is the number of region
    rows (pre-training); without, all rows count (grounding). A degenerate box (zero or negative
    extent) only leaves the GIoU term of its own row out.
    """
    pred, target = pred.float(), target.float()
    weight = torch.ones(pred.shape[0], device=pred.device) if is_image is None else 1.0 - is_image.float()
    count = weight.sum().clamp(min=1.0)
    loss_l1 = ((pred - target).abs().sum(dim=1) * weight).sum() / count
    pred_xyxy, target_xyxy = box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target)
    valid = (pred_xyxy[:, 2:] > pred_xyxy[:, :2]).all(dim=1) & (target_xyxy[:, 2:] > target_xyxy[:, :2]).all(dim=1)
    giou = torch.zeros_like(weight)
    if valid.any():
        giou = giou.masked_scatter(valid, 1.0 - paired_generalized_iou(pred_xyxy[valid], target_xyxy[valid]))
    loss_giou = (giou * weight).sum() / count
    return loss_l1, loss_giou


def caption_loss(
    logits: torch.Tensor, masked_ids: torch.Tensor, masked_weight: torch.Tensor, smoothing: float, ignore_id: int
) -> torch.Tensor:
    """Label-smoothed KL of the captioning MLM: target 1-ε on the gold token, ε/(V-2) elsewhere
    except the ignore id; rows whose gold is the ignore id are zero; weighted mean over positions."""
    vocab = logits.shape[-1]
    log_probs = F.log_softmax(logits.float(), dim=-1)
    target = torch.full_like(log_probs, smoothing / (vocab - 2))
    target[..., ignore_id] = 0.0
    target.scatter_(-1, masked_ids.unsqueeze(-1), 1.0 - smoothing)
    target = target.masked_fill((masked_ids == ignore_id).unsqueeze(-1), 0.0)
    kl = F.kl_div(log_probs, target, reduction="none").sum(dim=-1)
    weight = masked_weight.float()
    return (kl * weight).sum() / (weight.sum() + 1e-5)
