"""Referring-expression grounding (RefCOCO+) by box regression (spec §4.4, ``Grounding_bbox.py``).

Training: one expression per sample; a random crop that keeps the referred box, a caption-aware
horizontal flip, a bicubic resize to ``image_res``, photometric RandAugment; the target is the box
as normalised ``(cx, cy, w, h)`` in the transformed image; loss = L1 + GIoU with equal weights,
normalised by the batch size (``objectives.box_losses`` without ``is_image``).

Evaluation: plain resize to ``image_res``, one box per expression, mapped back to pixels of the
original image (normalised ``cx, w`` times the width, ``cy, h`` times the height), IoU with the
official inclusive-pixel convention (``inclusive_iou``); ``acc`` = % of expressions with IoU >= 0.5,
``miou`` = mean IoU (%). With the REFER files, a file holding several REFER splits (the official
``refcoco+_test.json`` holds testA and testB) also reports ``acc_<split>`` / ``miou_<split>``.

Unlike the official loop, every image is encoded once for all of its expressions.

Data section of the fine-tuning YAML::

    train_file: data/finetune/refcoco+_train.json
    eval_files: {val: data/finetune/refcoco+_val.json, test: data/finetune/refcoco+_test.json}
    image_root: images/coco           # paths in the files are relative to it (null: as given)
    refs_file: data/finetune/refcoco+/refs(unc).p       # optional, with instances_file: boxes from
    instances_file: data/finetune/refcoco+/instances.json  # REFER; else the json's own bbox
    max_tokens: 40
    max_words: 30
    random_crop: true                 # box-preserving random crop (false: the whole image)
    hflip: true
    careful_hflip: true               # no flip when the expression says left/right
    randaug: true                     # photometric RandAugment (Identity, AutoContrast, Equalize, ...)
    eval_subset: null                 # N: evaluate N evenly spaced expressions per split (quick runs)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from x2vlm.config import X2VLMConfig
from x2vlm.data.readers import DataFormatError, GroundingExample, read_refcoco
from x2vlm.data.text import pre_caption
from x2vlm.data.transforms import (
    BoxTransform,
    EvalTransform,
    RegionView,
    box_to_cxcywh_target,
    mentions_left_or_right,
    sample_region_view,
)
from x2vlm.data.video import load_image
from x2vlm.objectives import box_losses
from x2vlm.tasks.common import (
    EvalContext,
    FinetuneTask,
    bool_key,
    check_keys,
    evenly_spaced_subset,
    gather_tensors,
    group_indices,
    model_device,
    optional_positive_int_key,
    positive_int_key,
    require_key,
    shard_range,
)
from x2vlm.tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5
DRAWN_ITEMS = 6

DATA_KEYS = {
    "train_file", "eval_files", "image_root", "refs_file", "instances_file", "max_tokens", "max_words",
    "random_crop", "hflip", "careful_hflip", "randaug", "eval_subset",
}


# -- box geometry ------------------------------------------------------------------------------------
def inclusive_iou(boxes1: Sequence | np.ndarray, boxes2: Sequence | np.ndarray) -> np.ndarray | float:
    """IoU of ``[x, y, w, h]`` boxes as the official RefCOCO evaluation computes it.

    A box covers the pixels ``x .. x + w - 1`` (inclusive), so the intersection is
    ``(ix2 - ix1 + 1) * (iy2 - iy1 + 1)`` with ``ix2 = min(x + w - 1, x' + w' - 1)``; it counts only if
    ``ix1 < ix2`` and ``iy1 < iy2`` (strictly: an overlap of at most one pixel row/column is zero, as in
    the official code); union = ``w1*h1 + w2*h2 - inter``; a zero union gives 0.
    Accepts one box each (returns a float) or ``(N, 4)`` arrays (returns ``(N,)``).
    """
    a, b = np.asarray(boxes1, dtype=np.float64), np.asarray(boxes2, dtype=np.float64)
    single = a.ndim == 1 and b.ndim == 1
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise ValueError(f"boxes must be [x, y, w, h], got shapes {a.shape} and {b.shape}")
    ix1 = np.maximum(a[:, 0], b[:, 0])
    iy1 = np.maximum(a[:, 1], b[:, 1])
    ix2 = np.minimum(a[:, 0] + a[:, 2] - 1, b[:, 0] + b[:, 2] - 1)
    iy2 = np.minimum(a[:, 1] + a[:, 3] - 1, b[:, 1] + b[:, 3] - 1)
    overlaps = (ix1 < ix2) & (iy1 < iy2)
    inter = np.where(overlaps, (ix2 - ix1 + 1) * (iy2 - iy1 + 1), 0.0)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float(iou[0]) if single else iou


def box_to_original_pixels(pred_cxcywh: torch.Tensor | np.ndarray, width, height) -> np.ndarray:
    """Normalised ``(cx, cy, w, h)`` predictions on the (aspect-ignoring) resized image ->
    ``[x, y, w, h]`` in pixels of the original ``width x height`` image; rows or single boxes,
    ``width``/``height`` scalars or per-row arrays."""
    pred = np.asarray(pred_cxcywh.detach().cpu() if isinstance(pred_cxcywh, torch.Tensor) else pred_cxcywh, dtype=np.float64)
    width, height = np.asarray(width, dtype=np.float64), np.asarray(height, dtype=np.float64)
    cx, cy, w, h = pred[..., 0] * width, pred[..., 1] * height, pred[..., 2] * width, pred[..., 3] * height
    return np.stack([cx - w / 2, cy - h / 2, w, h], axis=-1)


# -- data --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroundingSettings:
    res: int
    max_tokens: int = 40
    max_words: int = 30
    random_crop: bool = True
    hflip: bool = True
    careful_hflip: bool = True
    randaug: bool = True


@dataclass(frozen=True)
class GroundingItem:
    """One expression with its image path (under the image root) and box in original pixels."""

    image: str
    text: str  # cleaned (pre_caption)
    raw_text: str
    box: tuple[float, float, float, float]
    ref_id: int
    refer_split: str | None
    size: tuple[int, int] | None  # (width, height) the files state, if they do


def load_grounding_file(path: str | Path, refs_file=None, instances_file=None, max_words: int = 30) -> list[GroundingItem]:
    """A processed RefCOCO+ json; every expression needs a box (its own ``bbox`` or the REFER one)."""
    items = []
    examples: list[GroundingExample] = read_refcoco(path, refs_file, instances_file)
    for k, ex in enumerate(examples):
        where = f"{path}[{k}] (ref_id {ex.ref_id})"
        if ex.bbox is None:
            raise DataFormatError(f"{where}: field 'bbox' missing and no REFER files (refs_file, instances_file) configured")
        if ex.bbox[2] <= 0 or ex.bbox[3] <= 0:
            raise DataFormatError(f"{where}: field 'bbox' {list(ex.bbox)} has no area")
        try:
            text = pre_caption(ex.text, max_words)
        except ValueError:
            raise DataFormatError(f"{where}: field 'text' {ex.text!r} is empty after cleaning") from None
        size = (ex.width, ex.height) if ex.width is not None and ex.height is not None else None
        items.append(GroundingItem(ex.image, text, ex.text, tuple(float(v) for v in ex.bbox), ex.ref_id, ex.split, size))
    if not items:
        raise DataFormatError(f"{path}: no expressions")
    return items


def _image_path(image_root: str | None, image: str) -> str:
    return str(Path(image_root) / image) if image_root else image


def _load_original(item: GroundingItem, image_root: str | None, source: str):
    img = load_image(_image_path(image_root, item.image), is_path=True, source=source, field="image")
    if item.size is not None and tuple(img.size) != tuple(item.size):
        raise DataFormatError(f"{source} (ref_id {item.ref_id}): image {item.image} is {img.width}x{img.height}, "
                              f"the annotations say {item.size[0]}x{item.size[1]}")
    return img


@dataclass
class GroundingSample:
    pixels: torch.Tensor  # (3, res, res)
    text: str
    target: tuple[float, float, float, float]  # normalised (cx, cy, w, h)


def grounding_view(image_size: tuple[int, int], box, settings: GroundingSettings, text: str, rng: np.random.Generator) -> RegionView:
    """The geometric part of a training sample: box-preserving crop (or the whole image), flip, resize."""
    allow_flip = settings.hflip and not (settings.careful_hflip and mentions_left_or_right(text))
    if settings.random_crop:
        return sample_region_view(image_size, box, settings.res, rng, allow_flip=allow_flip)
    flip = bool(rng.random() < 0.5) and allow_flip
    return RegionView(crop=(0, 0, image_size[0], image_size[1]), flip=flip, res=settings.res)


class GroundingTrainSet:
    def __init__(self, items: list[GroundingItem], image_root: str | None, settings: GroundingSettings, source: str):
        self.items, self.image_root, self.settings, self.source = items, image_root, settings, source
        self.photometric = BoxTransform(settings.res, randaug=settings.randaug)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, rng: np.random.Generator) -> GroundingSample:
        item = self.items[index]
        img = _load_original(item, self.image_root, f"{self.source}[{index}]")
        view = grounding_view(img.size, item.box, self.settings, item.raw_text, rng)
        box = view.map_box(item.box, min_perc_in_image=0.0)
        if box is None:
            raise DataFormatError(f"{self.source}[{index}] (ref_id {item.ref_id}): box {list(item.box)} lies outside "
                                  f"the {img.width}x{img.height} image {item.image}")
        pixels = self.photometric(view.apply_image(img), rng)
        return GroundingSample(pixels, item.text, box_to_cxcywh_target(box, self.settings.res))


@dataclass
class GroundingBatch:
    images: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    target_boxes: torch.Tensor

    def to(self, device) -> GroundingBatch:
        return GroundingBatch(*(t.to(device) for t in (self.images, self.text_ids, self.text_mask, self.target_boxes)))


def make_collate(tokenizer: WordPieceTokenizer, max_tokens: int):
    def collate(samples: list[GroundingSample]) -> GroundingBatch:
        ids, mask = tokenizer([s.text for s in samples], max_length=max_tokens)
        targets = torch.tensor([s.target for s in samples], dtype=torch.float32)
        return GroundingBatch(torch.stack([s.pixels for s in samples]), ids, mask, targets)

    return collate


def grounding_loss(model, batch: GroundingBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """L1 + GIoU of the box predicted for each (image, expression) pair of the batch."""
    embeds, _ = model.encode_images(batch.images)
    pred = model.predict_boxes(embeds, model.encode_text(batch.text_ids, batch.text_mask), batch.text_mask)
    loss_l1, loss_giou = box_losses(pred, batch.target_boxes)
    return {"bbox": loss_l1, "giou": loss_giou}


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def predict_split(model, items: list[GroundingItem], image_root: str | None, tokenizer: WordPieceTokenizer,
                  settings: GroundingSettings, source: str, batch_size: int = 64, autocast=None,
                  image_groups: list[tuple[str, list[int]]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predicted ``[x, y, w, h]`` boxes in original pixels for the expressions of ``image_groups``
    (default: all); returns ``(expression indices, boxes)``. Each image is encoded once."""
    transform, device = EvalTransform(settings.res), model_device(model)
    groups = group_indices([item.image for item in items]) if image_groups is None else image_groups
    indices, boxes = [], []
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        originals = [_load_original(items[members[0]], image_root, source) for _, members in chunk]
        pixels = torch.stack([transform(img) for img in originals]).to(device)
        members = [(slot, k) for slot, (_, ks) in enumerate(chunk) for k in ks]
        with autocast() if autocast else nullcontext():
            embeds, _ = model.encode_images(pixels)
        for part in range(0, len(members), batch_size):
            rows = members[part : part + batch_size]
            slots = torch.tensor([slot for slot, _ in rows], device=device)
            ids, mask = tokenizer([items[k].text for _, k in rows], max_length=settings.max_tokens)
            ids, mask = ids.to(device), mask.to(device)
            with autocast() if autocast else nullcontext():
                pred = model.predict_boxes(embeds[slots], model.encode_text(ids, mask), mask)
            sizes = np.array([originals[slot].size for slot, _ in rows], dtype=np.float64)
            boxes.append(box_to_original_pixels(pred.float(), sizes[:, 0], sizes[:, 1]))
            indices.extend(k for _, k in rows)
    if not indices:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4))
    return np.asarray(indices, dtype=np.int64), np.concatenate(boxes)


def grounding_metrics(ious: np.ndarray, refer_splits: list[str | None] | None = None) -> dict[str, float]:
    """``acc`` (% with IoU >= 0.5) and ``miou`` (%); per REFER split too when there are several."""
    ious = np.asarray(ious, dtype=np.float64)
    if len(ious) == 0:
        raise ValueError("no expression was evaluated")
    result = {"acc": 100.0 * float((ious >= IOU_THRESHOLD).mean()), "miou": 100.0 * float(ious.mean())}
    names = sorted({s for s in refer_splits or [] if s is not None})
    if len(names) > 1:
        splits = np.asarray(refer_splits, dtype=object)
        for name in names:
            part = ious[splits == name]
            result[f"acc_{name}"] = 100.0 * float((part >= IOU_THRESHOLD).mean())
            result[f"miou_{name}"] = 100.0 * float(part.mean())
    return result


def evaluate_grounding(model, items: list[GroundingItem], image_root: str | None, tokenizer: WordPieceTokenizer,
                       settings: GroundingSettings, source: str, ctx: EvalContext) -> dict[str, float]:
    """This rank's share of the images, gathered; every rank returns the same metrics."""
    groups = group_indices([item.image for item in items])
    mine = [groups[i] for i in shard_range(len(groups), ctx.dist_info.rank, ctx.dist_info.world_size)]
    indices, boxes = predict_split(model, items, image_root, tokenizer, settings, source, ctx.batch_size, ctx.autocast, mine)
    truth = np.array([items[k].box for k in indices]).reshape(-1, 4)
    local = torch.tensor(np.column_stack([indices, inclusive_iou(boxes, truth) if len(indices) else np.zeros(0)]),
                         dtype=torch.float64)
    gathered = gather_tensors(local.to(model_device(model)), ctx.dist_info).cpu().numpy()
    order = gathered[:, 0].astype(np.int64)
    if sorted(order.tolist()) != list(range(len(items))):
        raise RuntimeError(f"{source}: evaluated {len(order)} expressions, expected each of {len(items)} once")
    return grounding_metrics(gathered[:, 1], [items[k].refer_split for k in order])


def draw_predictions(model, items: list[GroundingItem], image_root: str | None, tokenizer: WordPieceTokenizer,
                     settings: GroundingSettings, source: str, out_dir: Path, prefix: str,
                     count: int = DRAWN_ITEMS) -> list[Path]:
    """PNGs of ``count`` expressions spread over ``items``: predicted box (magenta), true box (cyan),
    the expression and the IoU underneath."""
    from x2vlm.world.show import draw_boxes, with_text

    picked = sorted({int(k) for k in np.linspace(0, len(items) - 1, num=min(count, len(items)))})
    subset = [items[k] for k in picked]
    _, boxes = predict_split(model, subset, image_root, tokenizer, settings, source,
                             image_groups=[(it.image, [j]) for j, it in enumerate(subset)])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, (k, item) in enumerate(zip(picked, subset)):
        img = _load_original(item, image_root, source)
        scale = max(1, round(384 / max(img.size)))
        iou = inclusive_iou(boxes[j], item.box)
        x, y, w, h = boxes[j]
        drawn = (x, y, max(w, 1.0), max(h, 1.0))  # a collapsed prediction still shows as a dot
        picture = draw_boxes(img, [(drawn, "pred"), (item.box, "true")], scale)
        picture = with_text(picture, [item.raw_text, f"IoU {iou:.2f} (ref {item.ref_id}, {item.image})",
                                      "magenta: predicted, cyan: ground truth"])
        path = out_dir / f"grounding_{prefix}_{k:05d}.png"
        picture.save(path)
        paths.append(path)
    return paths


# -- the task ----------------------------------------------------------------------------------------
def build_task(data: dict, model_cfg: X2VLMConfig, tokenizer: WordPieceTokenizer, where: str) -> FinetuneTask:
    check_keys(data, DATA_KEYS, where)
    train_file = str(require_key(data, "train_file", where))
    eval_files = require_key(data, "eval_files", where)
    if not isinstance(eval_files, dict) or not eval_files:
        raise ValueError(f"{where}: 'eval_files' must map split names to files, the validation split first")
    refs_file, instances_file = data.get("refs_file"), data.get("instances_file")
    if (refs_file is None) != (instances_file is None):
        raise ValueError(f"{where}: give both 'refs_file' and 'instances_file' (the REFER files) or neither")
    image_root = data.get("image_root")
    settings = GroundingSettings(
        res=model_cfg.image_res,
        max_tokens=positive_int_key(data, "max_tokens", 40, where),
        max_words=positive_int_key(data, "max_words", 30, where),
        random_crop=bool_key(data, "random_crop", True, where),
        hflip=bool_key(data, "hflip", True, where),
        careful_hflip=bool_key(data, "careful_hflip", True, where),
        randaug=bool_key(data, "randaug", True, where),
    )
    train_items = load_grounding_file(train_file, refs_file, instances_file, settings.max_words)
    subset = optional_positive_int_key(data, "eval_subset", where)
    eval_items = {str(split): evenly_spaced_subset(load_grounding_file(path, refs_file, instances_file, settings.max_words),
                                                   subset, str(path))
                  for split, path in eval_files.items()}
    sources = {str(split): str(path) for split, path in eval_files.items()}
    log.info("grounding: %d training expressions; %s", len(train_items),
             ", ".join(f"{s} {len(v)}" for s, v in eval_items.items()))

    def evaluate(model, split: str, ctx: EvalContext) -> dict[str, float]:
        if split not in eval_items:
            raise ValueError(f"grounding: unknown split {split!r}; configured: {list(eval_items)}")
        return evaluate_grounding(model, eval_items[split], image_root, tokenizer, settings, sources[split], ctx)

    def draw(model, out_dir: Path, ctx: EvalContext) -> list[Path]:
        split = list(eval_items)[-1]
        return draw_predictions(model, eval_items[split], image_root, tokenizer, settings, sources[split], out_dir, split)

    return FinetuneTask(
        name="grounding",
        model_task="grounding",
        train_set=GroundingTrainSet(train_items, image_root, settings, train_file),
        collate=make_collate(tokenizer, settings.max_tokens),
        loss=grounding_loss,
        evaluate=evaluate,
        eval_splits=list(eval_items),
        selection_metric="acc",
        draw=draw,
        inference_files={"inference.json": {"task": "grounding", "max_tokens": settings.max_tokens,
                                            "max_words": settings.max_words}},
    )
