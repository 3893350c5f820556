"""XVNLI: does a Flickr30K image entail, contradict or leave open a hypothesis? (spec §4.7,
``XVNLI.py``, ``XVLMPlus4XVNLI``; IGLUE)

The hypothesis is fused with its image and ``cls_head`` (H -> 3, the ``classification`` model's
head) classifies the fused CLS: contradiction 0, entailment 1, neutral 2 (``readers.XVNLI_LABELS``;
lines with any other ``gold_label`` are skipped and counted in the log); cross-entropy; ``acc`` =
argmax accuracy (%). The head is new, so it trains at ``lr * lr_mult``.

Evaluation files may be given per language; a split given so is evaluated language by language and
its metrics are each language's (``de/acc``) and their mean (``acc``, what the IGLUE table reports),
on which the checkpoint is selected (validation; the official script selects on the test mean).

Data section of the fine-tuning YAML::

    train_file: data/xvnli/train_en.jsonl             # or a list of files (few-shot: add target-language ones)
    val_file: {en: data/xvnli/dev_en.jsonl}           # a file, or a mapping language -> file
    test_file: {ar: .../test_ar.jsonl, es: ..., fr: ..., ru: ..., en: ...}
    extra_eval_files: {test_gmt: {ar: ...}}           # optional: more splits (e.g. machine-translated tests)
    image_root: data/flickr30k/images                  # images are <image_root>/<Flikr30kID>.jpg
    max_tokens: 40
    max_words: 40                                       # words kept by pre_caption
    crop_scale: [0.5, 1.0]
    hflip: true                                         # no flip when the hypothesis says left/right
    randaug: true
    eval_subset: null                                   # N: evaluate N evenly spaced items per language
    selection_metric: acc                               # or one language's, e.g. en/acc
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from x2vlm.config import X2VLMConfig
from x2vlm.data.readers import XVNLI_LABELS, DataFormatError, read_xvnli
from x2vlm.data.text import pre_caption
from x2vlm.data.transforms import EvalTransform, FinetuneTrainTransform
from x2vlm.data.video import load_image
from x2vlm.tasks.common import (
    classifier_inputs_by_rank,
    gathered_accuracy,
    EvalContext,
    FinetuneTask,
    bool_key,
    check_keys,
    crop_scale_key,
    eval_set_sizes,
    evaluate_eval_set,
    evenly_spaced_subset,
    extra_eval_files_key,
    file_or_language_files,
    grouped_order,
    load_eval_sets,
    model_device,
    optional_positive_int_key,
    positive_int_key,
    require_key,
    selection_metric_key,
    shard_range,
)
from x2vlm.models.layers import take_rows
from x2vlm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

LABEL_NAMES = sorted(XVNLI_LABELS, key=XVNLI_LABELS.get)  # index -> name
DEFAULT_MAX_TOKENS, DEFAULT_MAX_WORDS = 40, 40  # the data section's max_tokens / max_words when absent
DATA_KEYS = {"train_file", "val_file", "test_file", "extra_eval_files", "image_root", "max_tokens", "max_words", "crop_scale",
             "hflip", "randaug", "eval_subset", "selection_metric"}


@dataclass(frozen=True)
class XVNLIItem:
    image: str  # path
    text: str  # cleaned hypothesis
    raw_text: str
    label: int


def load_xvnli_file(path: str, image_root: str | None, max_words: int) -> list[XVNLIItem]:
    """The items of one XVNLI file, their images resolved; skipped labels are counted in the log."""
    examples, skipped = read_xvnli(path)
    if skipped:
        log.info("%s: skipped %d line(s) whose gold_label is not one of %s", path, skipped, LABEL_NAMES)
    items = []
    for k, ex in enumerate(examples):
        try:
            text = pre_caption(ex.hypothesis, max_words)
        except ValueError:
            raise DataFormatError(f"{path}: item {k}: field 'sentence2' {ex.hypothesis!r} is empty after cleaning") from None
        image = f"{ex.image_id}.jpg"
        items.append(XVNLIItem(str(Path(image_root) / image) if image_root else image, text, ex.hypothesis, ex.label))
    if not items:
        raise DataFormatError(f"{path}: no item with a label among {LABEL_NAMES}")
    return items


def _load(item: XVNLIItem, source: str):
    return load_image(item.image, is_path=True, source=source, field="Flikr30kID")


@dataclass
class XVNLISample:
    pixels: torch.Tensor
    text: str
    label: int


class XVNLITrainSet:
    def __init__(self, items: list[XVNLIItem], sources: list[str], transform: FinetuneTrainTransform):
        self.items, self.sources, self.transform = items, sources, transform

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, rng: np.random.Generator) -> XVNLISample:
        item = self.items[index]
        # caption-aware flip: an image is not flipped when the hypothesis says left/right
        pixels = self.transform(_load(item, self.sources[index]), rng, texts=[item.raw_text])
        return XVNLISample(pixels, item.text, item.label)


@dataclass
class XVNLIBatch:
    images: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> XVNLIBatch:
        return XVNLIBatch(*(t.to(device) for t in (self.images, self.text_ids, self.text_mask, self.labels)))


def make_collate(tokenizer: Tokenizer, max_tokens: int):
    def collate(samples: list[XVNLISample]) -> XVNLIBatch:
        ids, mask = tokenizer([s.text for s in samples], max_length=max_tokens)
        return XVNLIBatch(torch.stack([s.pixels for s in samples]), ids, mask, torch.tensor([s.label for s in samples], dtype=torch.long))

    return collate


def xvnli_features(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                   image_index: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H): the fused CLS of each hypothesis with its image (``image_index`` picks each
    hypothesis's image among ``images``; default i -> i), the classifier's input."""
    embeds, vision_mask = model.encode_images(images)
    if image_index is not None:
        embeds, vision_mask = take_rows(embeds, image_index), take_rows(vision_mask, image_index)
    return model.encode_multimodal(text_ids, text_mask, embeds, vision_mask)[:, 0]


def xvnli_logits(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                 image_index: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3) from ``xvnli_features``."""
    return model.classify(xvnli_features(model, images, text_ids, text_mask, image_index))


def xvnli_loss(model, batch: XVNLIBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"cls": F.cross_entropy(xvnli_logits(model, batch.images, batch.text_ids, batch.text_mask).float(), batch.labels)}


def _eval_inputs(model, items: list[XVNLIItem], indices: list[int], tokenizer: Tokenizer, res: int, max_tokens: int,
                 source: Callable[[int], str], batch_size: int):
    """Batches (pixels, ids, mask, image_index) of ``items[i]`` for i in ``indices`` at the evaluation
    transform, each image encoded once per batch; ``source(i)`` names item i's file in errors."""
    transform, device = EvalTransform(res), model_device(model)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        first = {}
        for i in chunk:
            first.setdefault(items[i].image, i)
        pixels = torch.stack([transform(_load(items[i], source(i))) for i in first.values()]).to(device)
        slot = {image: k for k, image in enumerate(first)}
        image_index = torch.tensor([slot[items[i].image] for i in chunk], device=device)
        ids, mask = tokenizer([items[i].text for i in chunk], max_length=max_tokens)
        yield pixels, ids.to(device), mask.to(device), image_index


@torch.no_grad()
def predict_xvnli(model, items: list[XVNLIItem], indices: list[int], tokenizer: Tokenizer, res: int, max_tokens: int, source: str,
                  batch_size: int = 64, autocast=None) -> np.ndarray:
    """Predicted labels of ``items[i]`` for i in ``indices``; each image is encoded once per batch."""
    preds = []
    for inputs in _eval_inputs(model, items, list(indices), tokenizer, res, max_tokens, lambda i: source, batch_size):
        with autocast() if autocast else nullcontext():
            logits = xvnli_logits(model, *inputs)
        preds.append(logits.argmax(dim=-1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def evaluate_xvnli(model, items: list[XVNLIItem], tokenizer: Tokenizer, res: int, max_tokens: int, source: str,
                   ctx: EvalContext) -> dict[str, float]:
    """``acc`` (%): this rank's share (whole images) predicted, then gathered."""
    order = grouped_order([it.image for it in items])
    mine = [order[i] for i in shard_range(len(order), ctx.dist_info.rank, ctx.dist_info.world_size)]
    preds = predict_xvnli(model, items, mine, tokenizer, res, max_tokens, source, ctx.batch_size, ctx.autocast)
    labels = np.array([items[i].label for i in mine], dtype=np.int64)
    return gathered_accuracy(model, mine, preds == labels, len(items), ctx, source, "hypotheses")


def build_task(data: dict, model_cfg: X2VLMConfig, tokenizer: Tokenizer, where: str) -> FinetuneTask:
    check_keys(data, DATA_KEYS, where)
    train_files = require_key(data, "train_file", where)
    train_files = [train_files] if isinstance(train_files, str) else train_files
    if not isinstance(train_files, list) or not train_files or not all(isinstance(f, str) for f in train_files):
        raise ValueError(f"{where}: 'train_file' must be a file path or a non-empty list of them, got {data['train_file']!r}")
    image_root = data.get("image_root")
    if image_root is not None and not (isinstance(image_root, str) and Path(image_root).is_dir()):
        raise FileNotFoundError(f"{where}: 'image_root' {image_root!r} is not a directory")
    max_tokens = positive_int_key(data, "max_tokens", DEFAULT_MAX_TOKENS, where)
    max_words = positive_int_key(data, "max_words", DEFAULT_MAX_WORDS, where)
    transform = FinetuneTrainTransform(model_cfg.image_res, scale=crop_scale_key(data, where),
                                       randaug=bool_key(data, "randaug", True, where), hflip=bool_key(data, "hflip", True, where))
    split_files = {"val": file_or_language_files(require_key(data, "val_file", where), "val_file", where),
                   **({"test": file_or_language_files(data["test_file"], "test_file", where)} if data.get("test_file") is not None else {}),
                   **extra_eval_files_key(data, where, languages=True)}
    selection_metric = selection_metric_key(data, split_files["val"], ("acc",), "acc", where)
    train_items, train_sources = [], []
    for path in train_files:
        items = load_xvnli_file(path, image_root, max_words)
        train_items += items
        train_sources += [path] * len(items)
    subset = optional_positive_int_key(data, "eval_subset", where)

    def load(path: str) -> list[XVNLIItem]:
        return evenly_spaced_subset(load_xvnli_file(path, image_root, max_words), subset, path)

    eval_sets = load_eval_sets(split_files, load)
    log.info("xvnli: %d training hypotheses; %s", len(train_items), eval_set_sizes(eval_sets))

    def evaluate(model, split: str, ctx: EvalContext) -> dict[str, float]:
        def evaluate_file(path, items):
            return evaluate_xvnli(model, items, tokenizer, model_cfg.image_res, max_tokens, path, ctx)

        return evaluate_eval_set("xvnli", eval_sets, split, evaluate_file)

    def classifier_inputs(model, ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor]:
        def batches(mine):
            return _eval_inputs(model, train_items, mine, tokenizer, model_cfg.image_res, max_tokens, train_sources.__getitem__, ctx.batch_size)

        return classifier_inputs_by_rank(model, [it.label for it in train_items], batches,
                                         lambda *inputs: xvnli_features(model, *inputs), ctx, "xvnli")

    return FinetuneTask(
        name="xvnli",
        model_task="classification",
        train_set=XVNLITrainSet(train_items, train_sources, transform),
        collate=make_collate(tokenizer, max_tokens),
        loss=xvnli_loss,
        evaluate=evaluate,
        eval_splits=list(eval_sets),
        selection_metric=selection_metric,
        model_changes={"num_labels": len(LABEL_NAMES)},
        inference_files={"inference.json": {"task": "xvnli", "max_tokens": max_tokens, "max_words": max_words}},
        classifier_inputs=classifier_inputs,
    )
