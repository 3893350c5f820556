"""NLVR2: is a statement true of a pair of images? (spec §4.3, ``NLVR.py``, ``XVLMForNLVR``)

Both images of a batch are encoded together, the statement is fused with each, the two fused CLS
vectors are concatenated and ``cls_head`` (2H -> 2) classifies; cross-entropy; ``acc`` = argmax
accuracy (%). The head is newly initialised (no NLVR pre-training step, spec §4.3), so it gets
``lr * lr_mult``. Model selection uses the validation split only (the official script selects on the
mean of val and test, spec §6.30).

Training images get the fine-tuning train transform independently (RandomResizedCrop, flip,
RandAugment). The official flip ignores the text; with ``careful_hflip`` an image is not flipped when
the statement uses left/right *within* an image ("the dog is left of the cat"); the phrases that
name the images themselves ("the left image", "the right picture") do not count, since flipping
each image in place never changes which one is left.

Data section of the fine-tuning YAML::

    train_file: data/finetune/nlvr_train.json     # or a list of files
    eval_files: {val: data/finetune/nlvr_dev.json, test: data/finetune/nlvr_test.json}
    image_root: images/nlvr2                      # null: paths as given
    max_tokens: 40
    max_words: 30
    crop_scale: [0.5, 1.0]
    hflip: true
    careful_hflip: false
    randaug: true
    eval_subset: null                             # N: evaluate N evenly spaced pairs per split (quick runs)

MaRVL (spec §4.7, ``MARVL.py``; IGLUE): trained on English NLVR2, evaluated on MaRVL. An
``eval_files`` entry may be a mapping language -> file; that split is evaluated language by language,
its metrics are each language's (``id/acc``) and their mean (``acc``, what the IGLUE table reports)::

    eval_files:
      val: data/finetune/nlvr_dev.json
      test: {en: data/finetune/nlvr_test.json, id: data/marvl/marvl_id.json, sw: ..., ta: ..., tr: ..., zh: ...}
    image_root: null                              # the converted MaRVL paths are images/marvl_official/...

``convert_marvl`` (``x2vlm convert-marvl``) turns the IGLUE MaRVL JSON lines into this task's json.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from x2vlm.config import X2VLMConfig
from x2vlm.data.readers import DataFormatError, read_marvl, read_nlvr2
from x2vlm.data.text import pre_caption
from x2vlm.data.transforms import (
    EvalTransform,
    FinetuneTrainTransform,
    mentions_left_or_right,
)
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
    file_or_language_files,
    load_eval_sets,
    model_device,
    optional_positive_int_key,
    positive_int_key,
    require_key,
    shard_range,
)
from x2vlm.tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

DATA_KEYS = {"train_file", "eval_files", "image_root", "max_tokens", "max_words", "crop_scale", "hflip", "careful_hflip", "randaug",
             "eval_subset"}

# "the left image", "right photos", "left-hand picture": left/right naming one of the two images.
_IMAGE_POSITION_RE = re.compile(r"\b(left|right)(\s+|-)(hand\s+)?(image|picture|photo|pic|frame|panel)s?\b", re.IGNORECASE)


def spatial_left_right(statement: str) -> bool:
    """Whether ``statement`` says left/right about positions inside an image (not which image)."""
    return mentions_left_or_right(_IMAGE_POSITION_RE.sub(" ", statement))


@dataclass(frozen=True)
class NLVRItem:
    left: str
    right: str
    text: str  # cleaned (pre_caption)
    raw_text: str
    label: int  # 1 = true


DEFAULT_MAX_TOKENS, DEFAULT_MAX_WORDS = 40, 30  # the data section's max_tokens / max_words when absent


def load_nlvr_file(path: str | Path, max_words: int = DEFAULT_MAX_WORDS) -> list[NLVRItem]:
    items = []
    for k, ex in enumerate(read_nlvr2(path)):
        try:
            text = pre_caption(ex.sentence, max_words)
        except ValueError:
            raise DataFormatError(f"{path}[{k}]: field 'sentence' {ex.sentence!r} is empty after cleaning") from None
        items.append(NLVRItem(ex.images[0], ex.images[1], text, ex.sentence, int(ex.label)))
    if not items:
        raise DataFormatError(f"{path}: no statements")
    return items


def _load(image_root: str | None, image: str, source: str, field: str):
    return load_image(str(Path(image_root) / image) if image_root else image, is_path=True, source=source, field=field)


@dataclass
class NLVRSample:
    left: torch.Tensor
    right: torch.Tensor
    text: str
    label: int


class NLVRTrainSet:
    def __init__(self, items: list[NLVRItem], sources: list[str], image_root: str | None, transform: FinetuneTrainTransform,
                 careful_hflip: bool):
        self.items, self.sources, self.image_root = items, sources, image_root
        self.transform, self.careful_hflip = transform, careful_hflip

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, rng: np.random.Generator) -> NLVRSample:
        item, source = self.items[index], self.sources[index]
        # ``texts`` makes the transform's flip caption-aware: pass the statement only when it talks
        # about left/right inside an image, so the flip is then switched off for both images.
        texts = item.raw_text if self.careful_hflip and spatial_left_right(item.raw_text) else None
        left = self.transform(_load(self.image_root, item.left, source, "images[0]"), rng, texts=texts)
        right = self.transform(_load(self.image_root, item.right, source, "images[1]"), rng, texts=texts)
        return NLVRSample(left, right, item.text, item.label)


@dataclass
class NLVRBatch:
    left: torch.Tensor
    right: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device) -> NLVRBatch:
        return NLVRBatch(*(t.to(device) for t in (self.left, self.right, self.text_ids, self.text_mask, self.labels)))


def make_collate(tokenizer: WordPieceTokenizer, max_tokens: int):
    def collate(samples: list[NLVRSample]) -> NLVRBatch:
        ids, mask = tokenizer([s.text for s in samples], max_length=max_tokens)
        return NLVRBatch(torch.stack([s.left for s in samples]), torch.stack([s.right for s in samples]), ids, mask,
                         torch.tensor([s.label for s in samples], dtype=torch.long))

    return collate


def nlvr_loss(model, batch: NLVRBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    logits = model.nlvr_logits(batch.left, batch.right, batch.text_ids, batch.text_mask)
    return {"cls": F.cross_entropy(logits.float(), batch.labels)}


def _eval_inputs(model, items: list[NLVRItem], indices: list[int], image_root: str | None, tokenizer: WordPieceTokenizer,
                 res: int, max_tokens: int, source: Callable[[int], str], batch_size: int):
    """Batches (left, right, ids, mask) of ``items[i]`` for i in ``indices`` at the evaluation
    transform, on the model's device; ``source(i)`` names item i's file in errors."""
    transform, device = EvalTransform(res), model_device(model)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        left = torch.stack([transform(_load(image_root, items[i].left, source(i), "images[0]")) for i in chunk])
        right = torch.stack([transform(_load(image_root, items[i].right, source(i), "images[1]")) for i in chunk])
        ids, mask = tokenizer([items[i].text for i in chunk], max_length=max_tokens)
        yield left.to(device), right.to(device), ids.to(device), mask.to(device)


@torch.no_grad()
def predict_nlvr(model, items: list[NLVRItem], indices, image_root: str | None, tokenizer: WordPieceTokenizer,
                 res: int, max_tokens: int, source: str, batch_size: int = 64, autocast=None) -> np.ndarray:
    """Predicted labels (0/1) of ``items[i]`` for i in ``indices``."""
    preds = []
    for inputs in _eval_inputs(model, items, list(indices), image_root, tokenizer, res, max_tokens, lambda i: source, batch_size):
        with autocast() if autocast else nullcontext():
            logits = model.nlvr_logits(*inputs)
        preds.append(logits.argmax(dim=-1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def evaluate_nlvr(model, items: list[NLVRItem], image_root: str | None, tokenizer: WordPieceTokenizer, res: int,
                  max_tokens: int, source: str, ctx: EvalContext) -> dict[str, float]:
    """``acc`` (%): this rank's share predicted, then gathered; every rank returns the same."""
    mine = shard_range(len(items), ctx.dist_info.rank, ctx.dist_info.world_size)
    preds = predict_nlvr(model, items, mine, image_root, tokenizer, res, max_tokens, source, ctx.batch_size, ctx.autocast)
    labels = np.array([items[i].label for i in mine], dtype=np.int64)
    return gathered_accuracy(model, mine, preds == labels, len(items), ctx, source, "statements")


def build_task(data: dict, model_cfg: X2VLMConfig, tokenizer: WordPieceTokenizer, where: str) -> FinetuneTask:
    check_keys(data, DATA_KEYS, where)
    train_files = require_key(data, "train_file", where)
    train_files = [str(f) for f in (train_files if isinstance(train_files, list) else [train_files])]
    if not train_files:
        raise ValueError(f"{where}: 'train_file' is an empty list")
    eval_files = require_key(data, "eval_files", where)
    if not isinstance(eval_files, dict) or not eval_files:
        raise ValueError(f"{where}: 'eval_files' must map split names to files, the validation split first")
    image_root = data.get("image_root")
    max_tokens = positive_int_key(data, "max_tokens", DEFAULT_MAX_TOKENS, where)
    max_words = positive_int_key(data, "max_words", DEFAULT_MAX_WORDS, where)
    transform = FinetuneTrainTransform(model_cfg.image_res, scale=crop_scale_key(data, where),
                                       randaug=bool_key(data, "randaug", True, where), hflip=bool_key(data, "hflip", True, where))
    careful_hflip = bool_key(data, "careful_hflip", False, where)
    train_items, train_sources = [], []
    for path in train_files:
        items = load_nlvr_file(path, max_words)
        train_items += items
        train_sources += [path] * len(items)
    subset = optional_positive_int_key(data, "eval_subset", where)
    split_files = {str(split): file_or_language_files(files, f"eval_files.{split}", where) for split, files in eval_files.items()}

    def load(path: str) -> list[NLVRItem]:
        return evenly_spaced_subset(load_nlvr_file(path, max_words), subset, str(path))

    eval_sets = load_eval_sets(split_files, load)
    log.info("nlvr: %d training statements; %s", len(train_items), eval_set_sizes(eval_sets))

    def evaluate(model, split: str, ctx: EvalContext) -> dict[str, float]:
        def evaluate_file(path, items):
            return evaluate_nlvr(model, items, image_root, tokenizer, model_cfg.image_res, max_tokens, path, ctx)

        return evaluate_eval_set("nlvr", eval_sets, split, evaluate_file)

    def classifier_inputs(model, ctx: EvalContext) -> tuple[torch.Tensor, torch.Tensor]:
        def batches(mine):
            return _eval_inputs(model, train_items, mine, image_root, tokenizer, model_cfg.image_res, max_tokens,
                                train_sources.__getitem__, ctx.batch_size)

        return classifier_inputs_by_rank(model, [it.label for it in train_items], batches, model.nlvr_features, ctx, "nlvr")

    return FinetuneTask(
        name="nlvr",
        model_task="nlvr",
        train_set=NLVRTrainSet(train_items, train_sources, image_root, transform, careful_hflip),
        collate=make_collate(tokenizer, max_tokens),
        loss=nlvr_loss,
        evaluate=evaluate,
        eval_splits=list(eval_sets),
        selection_metric="acc",
        inference_files={"inference.json": {"task": "nlvr", "max_tokens": max_tokens, "max_words": max_words}},
        classifier_inputs=classifier_inputs,
    )


# -- MaRVL (IGLUE) -> this task's json ----------------------------------------------------------------
MARVL_LAYOUTS = ("official", "fewshot")


def marvl_image_path(root: str, layout: str, language: str, concept: str | None, image: str, where: str) -> str:
    """Where the IGLUE MaRVL images are (official ``marvl_preproc.py``): the test images under
    ``<root>/marvl_official/<lang>/images/<concept>/``, the few-shot ones under
    ``<root>/marvl_fewshot/<lang>/all/``."""
    if layout == "fewshot":
        return f"{root}/marvl_fewshot/{language}/all/{image}"
    if concept is None:
        raise DataFormatError(f"{where}: missing field 'concept' (the official layout puts images under <lang>/images/<concept>/; "
                              "use the few-shot layout for files without it)")
    return f"{root}/marvl_official/{language}/images/{concept}/{image}"


def convert_marvl(src: str | Path, out_json: str | Path, layout: str = "official", root: str = "images",
                  language: str | None = None) -> dict[str, int]:
    """IGLUE MaRVL JSON lines (``caption``, ``label``, ``left_img``, ``right_img``, ``language``,
    ``concept``) -> ``[{"images": [left, right], "sentence", "label"}]``, the NLVR2 json this task
    reads, image paths by ``marvl_image_path`` (use ``image_root: null``, or ``root`` relative to
    the ``image_root``). ``language`` (when given) must be every record's. Returns the number of
    statements per language."""
    if layout not in MARVL_LAYOUTS:
        raise ValueError(f"convert_marvl: layout {layout!r} unknown; one of {list(MARVL_LAYOUTS)}")
    records, counts = [], {}
    for ex in read_marvl(src):
        where = f"{src}:{ex.line}"
        if language is not None and ex.language != language:
            raise DataFormatError(f"{where}: field 'language' is {ex.language!r}, expected {language!r}")
        images = [marvl_image_path(root.rstrip("/"), layout, ex.language, ex.concept, image, where) for image in (ex.left, ex.right)]
        records.append({"images": images, "sentence": ex.caption, "label": ex.label})
        counts[ex.language] = counts.get(ex.language, 0) + 1
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    log.info("wrote %d MaRVL statements (%s) to %s", len(records), ", ".join(f"{k} {v}" for k, v in counts.items()), out)
    return counts
