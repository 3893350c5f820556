"""Video QA as classification over an answer vocabulary: MSRVTT-QA, MSVD-QA (spec §4.6,
``VQA_msrvtt.py`` / ``VQA_msvd.py``, ``XVLMForClassification``).

A clip's ``frame_len`` frames (the model's) go through the image encoder, get their frame position
embedding and are averaged over time; the question (``pre_question``) runs through the text and
fusion layers cross-attending to that video embedding; the fused ``[CLS]`` feeds
``cls_head = build_mlp(H, num_labels)``; cross-entropy over ``ans2label``.

* Frames: ``sample_frame_indices`` (random within segments for training, segment starts for
  evaluation) from a video file (decoded with PyAV) or from the official frame lists (a ``.json``
  holding a list of base64 frames). The path is ``video_root / video_template`` filled with
  ``{video_id}`` and ``{video_number}`` (the integer the id ends with: MSRVTT's official
  ``video_<int(id[5:])>.json`` is ``video_{video_number}.json``, MSVD's ``{video_id}.json``).
* Augmentation: one crop / flip / RandAugment per clip for all of its frames (the official code
  draws them per frame, spec §6.8); no flip when the question or answer says left/right
  (``careful_hflip``).
* Questions: ``pre_question`` keeping ``max_tokens`` words in training (the official code passes
  ``max_tokens`` as the word limit) and 50 at evaluation; at most ``max_tokens`` tokens.
* Answers missing from ``ans2label``: training questions are skipped (and counted in the log);
  evaluation questions stay and count as wrong (official: label -100, never predicted).
* Evaluation: top-1 ``acc`` (%) and ``acc_<answer_type>`` when the files carry ``answer_type``;
  predictions written to ``<out_dir>/video_qa_<split>_result.json``. Model selection uses the
  validation split (the official scripts select on test, spec §6.30).

Data section of the fine-tuning YAML::

    train_file: data/finetune/msrvtt_qa/train.jsonl
    val_file: data/finetune/msrvtt_qa/val.jsonl
    test_file: data/finetune/msrvtt_qa/test.jsonl      # optional
    extra_eval_files: {test_novel: data/finetune/msrvtt_qa/novel.jsonl}  # optional: more splits, evaluated like test after it
    ans2label_file: data/finetune/msrvtt_qa/train_ans2label.json
    video_root: data/msrvtt_frames
    video_template: "video_{video_number}.json"          # default "{video_id}.mp4"
    max_tokens: 40
    careful_hflip: true
    hflip: true
    randaug: true
    crop_scale: [0.5, 1.0]
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from x2vlm.config import X2VLMConfig
from x2vlm.data.readers import DataFormatError, read_ans2label, read_json, read_video_qa
from x2vlm.data.text import pre_question
from x2vlm.data.transforms import EvalTransform, FinetuneTrainTransform
from x2vlm.data.video import decode_base64_frames, read_clip, sample_frame_indices
from x2vlm.models.layers import take_rows
from x2vlm.tasks.common import (
    EvalContext,
    FinetuneTask,
    bool_key,
    check_keys,
    crop_scale_key,
    extra_eval_files_key,
    gather_tensors,
    grouped_order,
    model_device,
    positive_int_key,
    require_key,
    shard_range,
)
from x2vlm.tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

UNKNOWN_LABEL = -100
EVAL_QUESTION_WORDS = 50
DEFAULT_VIDEO_TEMPLATE = "{video_id}.mp4"
DRAWN_ITEMS = 6
EVAL_SPLITS = ("val", "test")

DATA_KEYS = {
    "train_file", "val_file", "test_file", "extra_eval_files", "ans2label_file", "video_root", "video_template", "max_tokens",
    "careful_hflip", "hflip", "randaug", "crop_scale",
}
_TRAILING_NUMBER = re.compile(r"(\d+)$")


# -- videos ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoSource:
    """Where a clip's frames are: ``root / template`` filled with the video id (and its number)."""

    root: str | None
    template: str = DEFAULT_VIDEO_TEMPLATE

    def path(self, video_id: str) -> Path:
        number = _TRAILING_NUMBER.search(video_id)
        if "{video_number}" in self.template and number is None:
            raise DataFormatError(f"video id {video_id!r} does not end with a number, which 'video_template' "
                                  f"{self.template!r} needs")
        name = self.template.format(video_id=video_id, video_number=int(number.group(1)) if number else None)
        return Path(self.root) / name if self.root else Path(name)

    def frames(self, video_id: str, frame_len: int, training: bool, rng: np.random.Generator | None = None) -> list:
        """``frame_len`` frames (PIL images) sampled as the official ``sample_frame_ids``."""
        path = self.path(video_id)
        if path.suffix == ".json":
            frame_list = read_json(path)
            if not isinstance(frame_list, list) or not frame_list or not all(isinstance(f, str) for f in frame_list):
                raise DataFormatError(f"{path}: expected a JSON list of base64 frames (video {video_id})")
            indices = sample_frame_indices(len(frame_list), frame_len, training, rng)
            return decode_base64_frames(frame_list, indices, source=str(path))
        return read_clip(path, frame_len, training, rng)


# -- data --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoQASettings:
    res: int
    frame_len: int
    max_tokens: int = 40
    careful_hflip: bool = True
    hflip: bool = True
    randaug: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)


@dataclass(frozen=True)
class VideoQAItem:
    video_id: str
    question: str  # cleaned
    raw_question: str
    answer: str
    label: int  # UNKNOWN_LABEL when the answer is not in ans2label
    answer_type: str | None


def load_video_qa(path: str, ans2label: dict[str, int], max_words: int) -> list[VideoQAItem]:
    items = []
    for ex in read_video_qa(path):
        items.append(VideoQAItem(ex.video_id, pre_question(ex.question, max_words), ex.question, ex.answer,
                                 ans2label.get(ex.answer, UNKNOWN_LABEL), ex.answer_type))
    if not items:
        raise DataFormatError(f"{path}: no questions")
    return items


@dataclass
class VideoQASample:
    frames: torch.Tensor  # (F, 3, res, res)
    question: str
    label: int


class VideoQATrainSet:
    def __init__(self, items: list[VideoQAItem], videos: VideoSource, settings: VideoQASettings):
        self.items, self.videos, self.settings = items, videos, settings
        self.transform = FinetuneTrainTransform(settings.res, scale=settings.crop_scale, randaug=settings.randaug,
                                                hflip=settings.hflip)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int, rng: np.random.Generator) -> VideoQASample:
        item = self.items[index]
        frames = self.videos.frames(item.video_id, self.settings.frame_len, training=True, rng=rng)
        texts = [item.raw_question, item.answer] if self.settings.careful_hflip else None
        return VideoQASample(self.transform.clip(frames, rng, texts=texts), item.question, item.label)


@dataclass
class VideoQABatch:
    videos: torch.Tensor  # (B, F, 3, H, W)
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    labels: torch.Tensor  # (B,)

    def to(self, device) -> VideoQABatch:
        return VideoQABatch(*(t.to(device) for t in (self.videos, self.question_ids, self.question_mask, self.labels)))


def make_collate(tokenizer: WordPieceTokenizer, max_tokens: int):
    def collate(samples: list[VideoQASample]) -> VideoQABatch:
        ids, mask = tokenizer([s.question for s in samples], max_length=max_tokens)
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        return VideoQABatch(torch.stack([s.frames for s in samples]), ids, mask, labels)

    return collate


def answer_logits(model, videos: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                  video_index: torch.Tensor | None = None) -> torch.Tensor:
    """(B, num_labels) from the fused [CLS] of each question with its video (``video_index`` picks
    each question's video among ``videos``; default i -> i)."""
    embeds, vision_mask = model.encode_videos(videos)
    if video_index is not None:
        embeds, vision_mask = take_rows(embeds, video_index), take_rows(vision_mask, video_index)
    fused = model.encode_multimodal(question_ids, question_mask, embeds, vision_mask)
    return model.classify(fused[:, 0])


def video_qa_loss(model, batch: VideoQABatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    logits = answer_logits(model, batch.videos, batch.question_ids, batch.question_mask)
    return {"cls": F.cross_entropy(logits.float(), batch.labels, ignore_index=UNKNOWN_LABEL)}


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def predict_labels(model, items: list[VideoQAItem], indices: list[int], videos: VideoSource, tokenizer: WordPieceTokenizer,
                   settings: VideoQASettings, batch_size: int = 64, autocast=None) -> torch.Tensor:
    """Top-1 label of the questions ``indices``; each clip is decoded and encoded once per batch."""
    device = model_device(model)
    transform = EvalTransform(settings.res)
    predictions = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        clips = list(dict.fromkeys(items[k].video_id for k in chunk))
        slot = {video_id: i for i, video_id in enumerate(clips)}
        pixels = torch.stack([transform.clip(videos.frames(v, settings.frame_len, training=False)) for v in clips]).to(device)
        video_index = torch.tensor([slot[items[k].video_id] for k in chunk], device=device)
        ids, mask = tokenizer([items[k].question for k in chunk], max_length=settings.max_tokens)
        with autocast() if autocast else nullcontext():
            logits = answer_logits(model, pixels, ids.to(device), mask.to(device), video_index)
        predictions.append(logits.argmax(dim=-1).cpu())
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def video_qa_metrics(predicted: list[int], items: list[VideoQAItem]) -> dict[str, float]:
    """``acc`` (%) over all questions (an unknown answer is always wrong) and ``acc_<answer_type>``."""
    correct = [p == item.label for p, item in zip(predicted, items, strict=True)]
    metrics = {"acc": 100.0 * sum(correct) / len(correct)}
    by_type: dict[str, list[bool]] = defaultdict(list)
    for ok, item in zip(correct, items):
        if item.answer_type is not None:
            by_type[item.answer_type].append(ok)
    for kind, values in sorted(by_type.items()):
        metrics[f"acc_{kind}"] = 100.0 * sum(values) / len(values)
    return metrics


def evaluate_video_qa(model, items: list[VideoQAItem], name: str, source: str, videos: VideoSource,
                      tokenizer: WordPieceTokenizer, settings: VideoQASettings, labels: list[str],
                      ctx: EvalContext) -> dict[str, float]:
    """This rank's share of the clips, gathered; every rank returns the same metrics."""
    order = grouped_order([item.video_id for item in items])
    mine = [order[i] for i in shard_range(len(order), ctx.dist_info.rank, ctx.dist_info.world_size)]
    predicted = predict_labels(model, items, mine, videos, tokenizer, settings, ctx.batch_size, ctx.autocast)
    local = torch.stack([torch.tensor(mine, dtype=torch.long), predicted], dim=1) if mine else torch.zeros(0, 2, dtype=torch.long)
    gathered = gather_tensors(local.to(model_device(model)), ctx.dist_info).cpu()
    if sorted(gathered[:, 0].tolist()) != list(range(len(items))):
        raise RuntimeError(f"{source}: answered {len(gathered)} questions, expected each of {len(items)} once")
    by_index = dict(zip(gathered[:, 0].tolist(), gathered[:, 1].tolist()))
    predicted_labels = [by_index[k] for k in range(len(items))]
    if ctx.out_dir is not None and ctx.dist_info.is_main:
        out_dir = Path(ctx.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = [{"video_id": item.video_id, "question": item.raw_question, "answer": item.answer,
                   "prediction": labels[p]} for item, p in zip(items, predicted_labels)]
        (out_dir / f"video_qa_{name}_result.json").write_text(json.dumps(result, indent=0) + "\n")
    return {"questions": float(len(items)), "unknown_answers": float(sum(i.label == UNKNOWN_LABEL for i in items)),
            **video_qa_metrics(predicted_labels, items)}


def draw_predictions(model, items: list[VideoQAItem], name: str, videos: VideoSource, tokenizer: WordPieceTokenizer,
                     settings: VideoQASettings, labels: list[str], out_dir: Path, count: int = DRAWN_ITEMS) -> list[Path]:
    """PNGs of ``count`` questions spread over the split: the evaluated frames side by side, the
    question, the predicted and the true answer."""
    from PIL import Image

    from x2vlm.world.show import with_text

    picked = sorted({int(k) for k in np.linspace(0, len(items) - 1, num=min(count, len(items)))})
    predicted = predict_labels(model, items, picked, videos, tokenizer, settings).tolist()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, label in zip(picked, predicted):
        item = items[k]
        frames = videos.frames(item.video_id, settings.frame_len, training=False)
        side = 128
        strip = Image.new("RGB", (side * len(frames), side), (255, 255, 255))
        for i, frame in enumerate(frames):
            strip.paste(frame.resize((side, side)), (i * side, 0))
        verdict = "right" if label == item.label else "wrong"
        lines = [f"Q: {item.raw_question}", f"predicted: {labels[label]} ({verdict})", f"answer: {item.answer}",
                 f"{item.video_id}, frames at the evaluation positions"]
        path = out_dir / f"video_qa_{name}_{k:05d}.png"
        with_text(strip, lines).save(path)
        paths.append(path)
    return paths


# -- the task ----------------------------------------------------------------------------------------
def build_task(data: dict, model_cfg: X2VLMConfig, tokenizer: WordPieceTokenizer, where: str) -> FinetuneTask:
    check_keys(data, DATA_KEYS, where)
    if model_cfg.frame_len <= 0:
        raise ValueError(f"{where}: model {model_cfg.name!r} has frame_len {model_cfg.frame_len}; video QA needs a video "
                         "model (a '-video' preset, or model_changes: {frame_len: N, add_frame_pos: true})")
    max_tokens = positive_int_key(data, "max_tokens", 40, where)
    template = data.get("video_template", DEFAULT_VIDEO_TEMPLATE)
    if not isinstance(template, str) or "{video_id}" not in template and "{video_number}" not in template:
        raise ValueError(f"{where}: 'video_template' must contain {{video_id}} or {{video_number}}, got {template!r}")
    try:
        template.format(video_id="video0", video_number=0)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{where}: 'video_template' {template!r} may only use {{video_id}} and {{video_number}} ({err!r})") from None
    settings = VideoQASettings(
        res=model_cfg.image_res,
        frame_len=model_cfg.frame_len,
        max_tokens=max_tokens,
        careful_hflip=bool_key(data, "careful_hflip", True, where),
        hflip=bool_key(data, "hflip", True, where),
        randaug=bool_key(data, "randaug", True, where),
        crop_scale=crop_scale_key(data, where),
    )
    videos = VideoSource(data.get("video_root"), template)
    extra_files = extra_eval_files_key(data, where)
    ans2label = read_ans2label(str(require_key(data, "ans2label_file", where)))
    labels = [answer for answer, _ in sorted(ans2label.items(), key=lambda pair: pair[1])]
    train_file = str(require_key(data, "train_file", where))
    all_train = load_video_qa(train_file, ans2label, settings.max_tokens)
    train_items = [item for item in all_train if item.label != UNKNOWN_LABEL]
    skipped = Counter(item.answer for item in all_train if item.label == UNKNOWN_LABEL)
    if skipped:
        log.info("video_qa: skipped %d of %d training questions whose answer is not in %s (e.g. %s)", sum(skipped.values()),
                 len(all_train), data["ans2label_file"], ", ".join(a for a, _ in skipped.most_common(5)))
    if not train_items:
        raise DataFormatError(f"{train_file}: no training question has an answer in {data['ans2label_file']}")
    splits: dict[str, list[VideoQAItem]] = {}
    sources: dict[str, str] = {}
    for split in EVAL_SPLITS:
        path = data.get(f"{split}_file")
        if path is None:
            if split == "val":
                raise ValueError(f"{where}: missing key 'val_file' (the validation split that selects the checkpoint)")
            continue
        splits[split], sources[split] = load_video_qa(str(path), ans2label, EVAL_QUESTION_WORDS), str(path)
    drawn_split = list(splits)[-1]  # test (or val): the extra splits are not drawn
    for split, path in extra_files.items():  # evaluated like test, after it
        splits[split], sources[split] = load_video_qa(path, ans2label, EVAL_QUESTION_WORDS), path
    log.info("video_qa: %d training questions, %d answers; %s", len(train_items), len(labels),
             ", ".join(f"{s} {len(v)}" for s, v in splits.items()))

    def evaluate(model, split: str, ctx: EvalContext) -> dict[str, float]:
        if split not in splits:
            raise ValueError(f"video_qa: unknown split {split!r}; configured: {list(splits)}")
        return evaluate_video_qa(model, splits[split], split, sources[split], videos, tokenizer, settings, labels, ctx)

    def draw(model, out_dir: Path, ctx: EvalContext) -> list[Path]:
        return draw_predictions(model, splits[drawn_split], drawn_split, videos, tokenizer, settings, labels, out_dir)

    return FinetuneTask(
        name="video_qa",
        model_task="classification",
        train_set=VideoQATrainSet(train_items, videos, settings),
        collate=make_collate(tokenizer, settings.max_tokens),
        loss=video_qa_loss,
        evaluate=evaluate,
        eval_splits=list(splits),
        selection_metric="acc",
        model_changes={"num_labels": len(ans2label)},
        draw=draw,
        inference_files={"ans2label.json": ans2label, "inference.json": {"task": "video_qa", "max_tokens": settings.max_tokens}},
    )
