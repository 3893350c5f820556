"""VQA v2 with the generative answer decoder (spec §4.2, ``VQA.py``, ``XVLMForVQA``).

Training: the question (``pre_question``, 30 words, at most ``max_tokens`` tokens) goes through the
text and fusion layers with cross-attention to the image; every distinct answer of the question is
decoded teacher-forced by the answer decoder; its summed token NLL is weighted by the answer's share
of the annotators (VQA) or by 0.5 (a Visual Genome QA pair), and the loss is the weighted sum
divided by the number of questions (``answer_weights``, ``vqa_loss``).

Evaluation: the answer list is ranked per question (``generation.rank_answers``: the ``k_test``
answers with the most probable first token, re-scored by their sequence likelihood, the first token
counted twice as officially). The predictions are written in the server format
``[{"question_id", "answer"}]`` to ``<out_dir>/vqa_<split>_result.json``; when the split has
ground truth (the ten answers in the processed json, or the official annotation file) the official
accuracy (``vqa_accuracy``) is returned as ``acc``, ``acc_yes/no``, ``acc_number``, ``acc_other``
and written, per question type too, to ``<out_dir>/vqa_<split>_accuracy.json``. Each image is
encoded once per batch however many questions it has. Evaluation questions keep 50 words and, unlike
the official test loader (spec §6.31), are truncated to ``max_tokens`` tokens like training ones.

``generate_answers`` decodes free-form answers greedily (answers outside the list);
``convert_vqa_official`` turns the official question / annotation files into the processed json.
The task asks the loop to train the answer decoder at ``lr * lr_mult`` (``lr_mult_prefixes``, the
official ``large_lr_for_dec``) although it starts from the fusion layers.

Data section of the fine-tuning YAML::

    train_files: [data/finetune/vqa_train.json, data/finetune/vg_qa.json]
    val_file: data/finetune/vqa_val.json        # the selection split: needs answers
    test_file: data/finetune/vqa_test.json      # optional; answers optional
    val_questions_file: .../v2_OpenEnded_mscoco_val2014_questions.json    # optional, with
    val_annotations_file: .../v2_mscoco_val2014_annotations.json         # answer/question types
    test_questions_file: ...                    # optional, likewise for the test split
    test_annotations_file: ...
    extra_eval_files: {test_novel: data/finetune/vqa_novel.json}  # optional: more splits, evaluated like test after it (answers from the json)
    answer_list: data/finetune/answer_list.json
    image_root: images/coco                     # or {vqa: images/coco, vg: images/visualgenome}
    max_tokens: 40
    k_test: 128
    double_count_first_token: true              # the official score; false: plain sequence likelihood
    vg_answer_weight: 0.5
    careful_hflip: true                         # no flip when the question or an answer says left/right
    hflip: true
    randaug: true
    crop_scale: [0.5, 1.0]                      # RandomResizedCrop area range
    eval_subset: null                           # N: evaluate N evenly spaced questions per split (quick runs)

xGQA (spec §4.7, ``XGQA.py``, ``XVLMPlusForVQA``; IGLUE) is this task with ``format: gqa``: the
files are GQA-style annotations (``readers.read_gqa``: a list of ``{img_id, sent, label: {answer:
score}}`` or an object keyed by question id of ``{imageId, question, answer}``), the image of a
question is ``<image_root>/<img_id>.jpg``, the answer list is the keys of the answer file
(``readers.read_gqa_answers``), a training question's targets are its labels weighted by their
scores, and accuracy is the exact match of the ranked answer with the question's first label.
``val_file``, ``test_file`` and ``extra_eval_files`` entries may be mappings language -> file; such a
split's metrics are each language's (``de/acc``) and their mean (``acc``, the IGLUE number), and the
checkpoint is selected on the validation mean::

    format: gqa
    train_files: [data/xgqa/train_en.json]      # few-shot: add target-language files
    val_file: {en: data/xgqa/testdev_balanced_questions_en.json}
    test_file: {de: .../testdev_balanced_questions_de.json, bn: ..., id: ..., ko: ..., pt: ..., ru: ..., zh: ...}
    answer_list: data/xgqa/trainval_ans2label.json
    image_root: images/gqa
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from x2vlm.config import X2VLMConfig
from x2vlm.data.readers import (
    COCO_VQA_IMAGE_TEMPLATE,
    DataFormatError,
    VQAExample,
    read_answer_list,
    read_gqa,
    read_gqa_answers,
    read_vqa_json,
    read_vqa_official,
)
from x2vlm.data.text import pre_question
from x2vlm.data.transforms import EvalTransform, FinetuneTrainTransform
from x2vlm.data.video import load_image
from x2vlm.generation import rank_answers
from x2vlm.models.layers import take_rows
from x2vlm.tasks.common import (
    EvalContext,
    FinetuneTask,
    bool_key,
    check_keys,
    crop_scale_key,
    evenly_spaced_subset,
    extra_eval_files_key,
    file_or_language_files,
    gather_tensors,
    grouped_order,
    mean_over_languages,
    model_device,
    optional_positive_int_key,
    positive_int_key,
    require_key,
    shard_range,
)
from x2vlm.tasks.vqa_accuracy import GroundTruth, vqa_accuracy
from x2vlm.tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

TRAIN_QUESTION_WORDS = 30  # pre_question(max_ques_words=30) in training (official)
EVAL_QUESTION_WORDS = 50  # and 50 at test
DRAWN_ITEMS = 6
TOP_SHOWN = 5
EVAL_SPLITS = ("val", "test")
# The answer decoder, initialised from the fusion layers, trains at lr * lr_mult (official large_lr_for_dec).
DECODER_PREFIXES = ("answer_decoder.", "answer_head.")

DATA_FORMATS = ("vqa", "gqa")
DATA_KEYS = {
    "format", "train_files", "val_file", "test_file", "extra_eval_files", "answer_list", "image_root", "max_tokens", "k_test",
    "double_count_first_token", "vg_answer_weight", "careful_hflip", "hflip", "randaug", "crop_scale", "eval_subset",
    *(f"{split}_{kind}_file" for split in EVAL_SPLITS for kind in ("questions", "annotations")),
}


# -- answers and their weights -----------------------------------------------------------------------
def answer_weights(answers: list[str], dataset: str | None, vg_weight: float = 0.5) -> tuple[list[str], list[float]]:
    """Training targets of one question: VQA -> each distinct answer (first-seen order) with its share
    of the annotators (``count / len(answers)``); VG -> its single answer with ``vg_weight``."""
    if dataset == "vg":
        if len(answers) != 1:
            raise ValueError(f"a Visual Genome question has one answer, got {answers}")
        return [answers[0]], [vg_weight]
    counts = Counter(answers)
    distinct = list(dict.fromkeys(answers))
    return distinct, [counts[a] / len(answers) for a in distinct]


# -- data --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VQASettings:
    res: int
    max_tokens: int = 40
    k_test: int = 128
    double_count_first_token: bool = True
    vg_answer_weight: float = 0.5
    careful_hflip: bool = True
    hflip: bool = True
    randaug: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)


def _image_path(image_roots: dict[str, str] | str | None, example: VQAExample, source: str) -> str:
    if image_roots is None:
        return example.image
    if isinstance(image_roots, str):
        return str(Path(image_roots) / example.image)
    dataset = example.dataset or "vqa"
    if dataset not in image_roots:
        raise DataFormatError(f"{source} (question_id {example.question_id}): no image root for dataset "
                              f"{dataset!r}; 'image_root' has {sorted(image_roots)}")
    return str(Path(image_roots[dataset]) / example.image)


def _load(image_roots, example: VQAExample, source: str):
    return load_image(_image_path(image_roots, example, source), is_path=True, source=source, field="image")


@dataclass
class VQASample:
    pixels: torch.Tensor  # (3, res, res)
    question: str  # cleaned
    answers: list[str]  # distinct
    weights: list[float]


class VQATrainSet:
    """Questions of every training file; the sample's image is augmented with the sample's rng."""

    def __init__(self, examples: list[tuple[VQAExample, str]], image_roots, settings: VQASettings,
                 scores: list[list[float]] | None = None):
        # ``scores``: per example, the weight of each of its answers (GQA labels); None: VQA / VG weights
        self.examples, self.image_roots, self.settings, self.scores = examples, image_roots, settings, scores
        self.transform = FinetuneTrainTransform(settings.res, scale=settings.crop_scale, randaug=settings.randaug,
                                                hflip=settings.hflip)

    def __len__(self) -> int:
        return len(self.examples)

    def get(self, index: int, rng: np.random.Generator) -> VQASample:
        example, source = self.examples[index]
        if self.scores is not None:
            answers, weights = list(example.answers), list(self.scores[index])
        else:
            answers, weights = answer_weights(example.answers, example.dataset, self.settings.vg_answer_weight)
        texts = [example.question, *answers] if self.settings.careful_hflip else None
        pixels = self.transform(_load(self.image_roots, example, source), rng, texts=texts)
        return VQASample(pixels, pre_question(example.question, TRAIN_QUESTION_WORDS), answers, weights)


@dataclass
class VQABatch:
    images: torch.Tensor  # (B, 3, H, W)
    question_ids: torch.Tensor  # (B, L)
    question_mask: torch.Tensor
    answer_ids: torch.Tensor  # (A, La): every question's answers, question by question
    answer_mask: torch.Tensor
    answer_weights: torch.Tensor  # (A,)
    answers_per_question: torch.Tensor  # (B,), sums to A

    def to(self, device) -> VQABatch:
        return VQABatch(*(t.to(device) for t in (self.images, self.question_ids, self.question_mask, self.answer_ids,
                                                  self.answer_mask, self.answer_weights, self.answers_per_question)))


def make_collate(tokenizer: WordPieceTokenizer, max_tokens: int):
    def collate(samples: list[VQASample]) -> VQABatch:
        q_ids, q_mask = tokenizer([s.question for s in samples], max_length=max_tokens)
        a_ids, a_mask = tokenizer([a for s in samples for a in s.answers])  # longest, not truncated (official)
        weights = torch.tensor([w for s in samples for w in s.weights], dtype=torch.float32)
        counts = torch.tensor([len(s.answers) for s in samples], dtype=torch.long)
        return VQABatch(torch.stack([s.pixels for s in samples]), q_ids, q_mask, a_ids, a_mask, weights, counts)

    return collate


def encode_questions(model, images: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                    image_index: torch.Tensor | None = None) -> torch.Tensor:
    """Questions through the text and fusion layers, cross-attending to their image
    (``image_index`` picks each question's image among ``images``; default: i -> i)."""
    embeds, vision_mask = model.encode_images(images)
    if image_index is not None:
        embeds, vision_mask = take_rows(embeds, image_index), take_rows(vision_mask, image_index)
    return model.encode_multimodal(question_ids, question_mask, embeds, vision_mask)


def vqa_loss(model, batch: VQABatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sum over answers of weight x summed token NLL, divided by the number of questions (official)."""
    states = encode_questions(model, batch.images, batch.question_ids, batch.question_mask)
    repeats = batch.answers_per_question
    nll = model.answer_nll(batch.answer_ids, batch.answer_mask, states.repeat_interleave(repeats, 0),
                           batch.question_mask.repeat_interleave(repeats, 0))
    return {"vqa": (batch.answer_weights * nll).sum() / batch.images.shape[0]}


# -- free-form answers -------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(model, question_states: torch.Tensor, question_mask: torch.Tensor, tokenizer: WordPieceTokenizer,
                     max_new_tokens: int = 10) -> list[str]:
    """Greedy decoding with the answer decoder from ``[CLS]`` until ``[SEP]`` (or ``max_new_tokens``);
    ``[PAD]`` and ``[CLS]`` are never produced. Returns the decoded answers."""
    batch, device = question_states.shape[0], question_states.device
    ids = torch.full((batch, 1), tokenizer.cls_token_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model.answer_logits(ids, torch.ones_like(ids), question_states, question_mask)[:, -1].float()
        logits[:, [tokenizer.pad_token_id, tokenizer.cls_token_id]] = -torch.inf
        token = logits.argmax(dim=-1).masked_fill(done, tokenizer.pad_token_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        done |= token == tokenizer.sep_token_id
        if bool(done.all()):
            break
    answers = []
    for row in ids[:, 1:].tolist():
        end = row.index(tokenizer.sep_token_id) if tokenizer.sep_token_id in row else len(row)
        answers.append(tokenizer.decode(row[:end]))
    return answers


# -- evaluation --------------------------------------------------------------------------------------
@dataclass
class VQASplit:
    """An evaluation split: its questions, cleaned question texts and ground truth (if any)."""

    name: str
    source: str
    examples: list[VQAExample]
    questions: list[str]
    ground_truth: dict[Any, GroundTruth] | None  # question_id -> annotation; None: no answers
    first_labels: dict[Any, str] | None = None  # GQA: question_id -> the label exact match is measured against


def load_eval_split(name: str, path: str, questions_file: str | None, annotations_file: str | None) -> VQASplit:
    """The processed json of a split; ground truth from the official files when given (which must
    annotate every question), else from the json's own answers when every question has them."""
    examples = read_vqa_json(path, require_answers=False)
    if not examples:
        raise DataFormatError(f"{path}: no questions")
    seen = Counter(ex.question_id for ex in examples)
    repeated = [qid for qid, n in seen.items() if n > 1]
    if repeated:
        raise DataFormatError(f"{path}: question_id(s) {repeated[:5]} occur more than once")
    ground_truth = None
    if annotations_file is not None:
        official = {ex.question_id: ex for ex in read_vqa_official(questions_file, annotations_file)}
        ground_truth = {}
        for k, ex in enumerate(examples):
            if ex.question_id not in official:
                raise DataFormatError(f"{path}[{k}]: question_id {ex.question_id} is not in {annotations_file}")
            ann = official[ex.question_id]
            ground_truth[ex.question_id] = GroundTruth(ann.answers, ann.answer_type, ann.question_type)
    elif all(ex.answers is not None for ex in examples):
        for k, ex in enumerate(examples):
            if len(ex.answers) < 2:
                raise DataFormatError(f"{path}[{k}]: field 'answer' has {len(ex.answers)} answer(s); the VQA accuracy "
                                      "needs every annotator's answer (ten in VQA v2)")
        ground_truth = {ex.question_id: GroundTruth(ex.answers) for ex in examples}
    questions = [pre_question(ex.question, EVAL_QUESTION_WORDS) for ex in examples]
    return VQASplit(name, path, examples, questions, ground_truth)


def split_subset(split: VQASplit, count: int | None) -> VQASplit:
    """``count`` questions spread evenly over the split (all of them when ``count`` is None or larger)."""
    if count is None or count >= len(split.examples):
        return split
    keep = evenly_spaced_subset(range(len(split.examples)), count, split.source, "questions")
    examples = [split.examples[k] for k in keep]
    truth = None if split.ground_truth is None else {ex.question_id: split.ground_truth[ex.question_id] for ex in examples}
    labels = None if split.first_labels is None else {ex.question_id: split.first_labels[ex.question_id] for ex in examples}
    return VQASplit(split.name, split.source, examples, [split.questions[k] for k in keep], truth, labels)


@torch.no_grad()
def rank_split(model, split: VQASplit, indices: list[int], image_roots, tokenizer: WordPieceTokenizer,
               settings: VQASettings, answer_ids: torch.Tensor, answer_mask: torch.Tensor, batch_size: int = 64,
               autocast=None, top: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` best answers (indices into the answer list) and their probabilities for the
    questions ``indices`` of ``split``; each image is encoded once per batch."""
    device = model_device(model)
    transform = EvalTransform(settings.res)
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    best, probs = [], []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        images = list(dict.fromkeys(split.examples[k].image for k in chunk))
        slot = {image: i for i, image in enumerate(images)}
        by_image = {split.examples[k].image: split.examples[k] for k in chunk}
        pixels = torch.stack([transform(_load(image_roots, by_image[image], split.source)) for image in images]).to(device)
        image_index = torch.tensor([slot[split.examples[k].image] for k in chunk], device=device)
        q_ids, q_mask = tokenizer([split.questions[k] for k in chunk], max_length=settings.max_tokens)
        q_ids, q_mask = q_ids.to(device), q_mask.to(device)
        with autocast() if autocast else nullcontext():
            states = encode_questions(model, pixels, q_ids, q_mask, image_index)
            ids, p = rank_answers(model, states, q_mask, answer_ids, answer_mask, settings.k_test,
                                  settings.double_count_first_token)
        best.append(ids[:, :top].cpu())
        probs.append(p[:, :top].float().cpu())
    if not best:
        return torch.zeros(0, top, dtype=torch.long), torch.zeros(0, top)
    return torch.cat(best), torch.cat(probs)


def evaluate_vqa(model, split: VQASplit, image_roots, tokenizer: WordPieceTokenizer, settings: VQASettings,
                 answer_list: list[str], ctx: EvalContext) -> dict[str, float]:
    """This rank's share of the questions (whole images), gathered; the main rank writes the files."""
    order = grouped_order([ex.image for ex in split.examples])
    mine = [order[i] for i in shard_range(len(order), ctx.dist_info.rank, ctx.dist_info.world_size)]
    answer_ids, answer_mask = tokenizer(answer_list)
    best, _ = rank_split(model, split, mine, image_roots, tokenizer, settings, answer_ids, answer_mask, ctx.batch_size,
                         ctx.autocast)
    local = torch.stack([torch.tensor(mine, dtype=torch.long), best[:, 0]], dim=1) if mine else torch.zeros(0, 2, dtype=torch.long)
    gathered = gather_tensors(local.to(model_device(model)), ctx.dist_info).cpu()
    if sorted(gathered[:, 0].tolist()) != list(range(len(split.examples))):
        raise RuntimeError(f"{split.source}: answered {len(gathered)} questions, expected each of {len(split.examples)} once")
    predicted = dict(zip(gathered[:, 0].tolist(), gathered[:, 1].tolist()))
    predictions = {ex.question_id: answer_list[predicted[k]] for k, ex in enumerate(split.examples)}
    metrics = {"questions": float(len(split.examples))}
    accuracy = None
    if split.first_labels is not None:  # GQA: exact match with the first label (official XGQA.py)
        hits = [predictions[qid] == label for qid, label in split.first_labels.items()]
        metrics = {"acc": 100.0 * float(np.mean(hits))}
    elif split.ground_truth is not None:
        accuracy = vqa_accuracy(predictions, split.ground_truth)
        metrics.update(accuracy.metrics())
    if ctx.out_dir is not None and ctx.dist_info.is_main:
        out_dir = Path(ctx.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = [{"question_id": qid, "answer": answer} for qid, answer in predictions.items()]
        (out_dir / f"vqa_{split.name}_result.json").write_text(json.dumps(result) + "\n")
        if accuracy is not None:
            (out_dir / f"vqa_{split.name}_accuracy.json").write_text(json.dumps(accuracy.to_dict(), indent=1) + "\n")
    return metrics


def draw_predictions(model, split: VQASplit, image_roots, tokenizer: WordPieceTokenizer, settings: VQASettings,
                     answer_list: list[str], out_dir: Path, count: int = DRAWN_ITEMS) -> list[Path]:
    """PNGs of ``count`` questions spread over the split: the image, the question, the predicted
    answer, the five best-ranked answers with their probabilities and the annotators' answers."""
    from x2vlm.world.show import with_text

    picked = sorted({int(k) for k in np.linspace(0, len(split.examples) - 1, num=min(count, len(split.examples)))})
    answer_ids, answer_mask = tokenizer(answer_list)
    best, probs = rank_split(model, split, picked, image_roots, tokenizer, settings, answer_ids, answer_mask,
                             top=min(TOP_SHOWN, len(answer_list)))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for row, k in enumerate(picked):
        example = split.examples[k]
        img = _load(image_roots, example, split.source)
        scale = max(1, round(256 / max(img.size)))
        picture = img.resize((img.width * scale, img.height * scale))
        ranked = ", ".join(f"{answer_list[a]} {p:.2f}" for a, p in zip(best[row].tolist(), probs[row].tolist()))
        lines = [f"Q: {example.question}", f"predicted: {answer_list[int(best[row, 0])]}", f"top {best.shape[1]}: {ranked}"]
        if split.first_labels is not None:
            lines.append(f"label: {split.first_labels[example.question_id]}")
        elif split.ground_truth is not None:
            counts = Counter(split.ground_truth[example.question_id].answers)
            lines.append("annotators: " + ", ".join(f"{a} x{n}" for a, n in counts.most_common()))
        lines.append(f"question {example.question_id}, {example.image}")
        path = out_dir / f"vqa_{split.name}_{k:05d}.png"
        with_text(picture, lines).save(path)
        paths.append(path)
    return paths


# -- official files -> processed json ----------------------------------------------------------------
def convert_vqa_official(questions: str | Path, annotations: str | Path | None, out_json: str | Path,
                         image_dir_prefix: str = "", image_template: str = COCO_VQA_IMAGE_TEMPLATE) -> int:
    """Official VQA v2 question (+ annotation) files -> the processed json this task reads:
    ``[{question_id, image, question, answer: [the annotators' answers], dataset: "vqa"}]``
    (no ``answer`` without annotations, as for test-dev). ``image`` is ``image_dir_prefix`` +
    ``image_template`` filled with the file's ``data_subtype`` and the ``image_id`` (COCO naming by
    default: ``train2014/COCO_train2014_000000000009.jpg``). Returns the number of questions."""
    examples = read_vqa_official(questions, annotations, image_template)
    records = []
    for ex in examples:
        record: dict[str, Any] = {"question_id": ex.question_id, "image": image_dir_prefix + ex.image, "question": ex.question}
        if ex.answers is not None:
            record["answer"] = ex.answers
        record["dataset"] = "vqa"
        records.append(record)
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(records) + "\n")
    tmp.replace(out)
    log.info("wrote %d questions to %s", len(records), out)
    return len(records)


# -- xGQA (GQA-style files) ---------------------------------------------------------------------------
def gqa_examples(path: str) -> list[VQAExample]:
    """A GQA-style file's questions as ``VQAExample`` (image ``<img_id>.jpg``, answers = the label
    names in file order, dataset ``gqa``); a repeated question id is an error."""
    examples = [VQAExample(question_id=ex.question_id, image=f"{ex.image_id}.jpg", question=ex.question, answers=list(ex.answers),
                           dataset="gqa") for ex in read_gqa(path)]
    repeated = [qid for qid, n in Counter(ex.question_id for ex in examples).items() if n > 1]
    if repeated:
        raise DataFormatError(f"{path}: question_id(s) {repeated[:5]} occur more than once")
    return examples


def load_gqa_train(files: list[str]) -> tuple[list[tuple[VQAExample, str]], list[list[float]]]:
    """Every question of the GQA-style training files with its file, and its answers' scores."""
    examples, scores = [], []
    for path in files:
        for ex in read_gqa(path):
            examples.append((VQAExample(question_id=ex.question_id, image=f"{ex.image_id}.jpg", question=ex.question,
                                        answers=list(ex.answers), dataset="gqa"), path))
            scores.append(list(ex.answers.values()))
    return examples, scores


def load_gqa_split(name: str, path: str) -> VQASplit:
    examples = gqa_examples(path)
    return VQASplit(name, path, examples, [pre_question(ex.question, EVAL_QUESTION_WORDS) for ex in examples], None,
                    {ex.question_id: ex.answers[0] for ex in examples})


# -- the task ----------------------------------------------------------------------------------------
def _image_roots(data: dict, where: str) -> dict[str, str] | str | None:
    roots = data.get("image_root")
    if roots is None or isinstance(roots, str):
        return roots
    if isinstance(roots, dict) and roots and all(k in ("vqa", "vg", "gqa") and isinstance(v, str) for k, v in roots.items()):
        return dict(roots)
    raise ValueError(f"{where}: 'image_root' must be a path or a mapping of dataset (vqa, vg, gqa) -> path, got {roots!r}")


def load_train_examples(files: list[str]) -> list[tuple[VQAExample, str]]:
    """Every question of the training files with its file; each needs answers (VQA or VG)."""
    examples = []
    for path in files:
        for k, ex in enumerate(read_vqa_json(path, require_answers=True)):
            where = f"{path}[{k}] (question_id {ex.question_id})"
            if ex.dataset == "gqa":
                raise DataFormatError(f"{where}: field 'dataset' is 'gqa'; VQA v2 training reads 'vqa' and 'vg' questions")
            if ex.dataset == "vg" and len(ex.answers) != 1:
                raise DataFormatError(f"{where}: field 'answer' of a 'vg' question must be one answer, got {len(ex.answers)}")
            examples.append((ex, path))
    return examples


def build_task(data: dict, model_cfg: X2VLMConfig, tokenizer: WordPieceTokenizer, where: str) -> FinetuneTask:
    check_keys(data, DATA_KEYS, where)
    train_files = require_key(data, "train_files", where)
    if isinstance(train_files, str):
        train_files = [train_files]
    if not isinstance(train_files, list) or not train_files or not all(isinstance(f, str) for f in train_files):
        raise ValueError(f"{where}: 'train_files' must be a non-empty list of processed VQA json files")
    vg_weight = data.get("vg_answer_weight", 0.5)
    if isinstance(vg_weight, bool) or not isinstance(vg_weight, (int, float)) or vg_weight <= 0:
        raise ValueError(f"{where}: 'vg_answer_weight' must be a positive number, got {vg_weight!r}")
    settings = VQASettings(
        res=model_cfg.image_res,
        max_tokens=positive_int_key(data, "max_tokens", 40, where),
        k_test=positive_int_key(data, "k_test", 128, where),
        double_count_first_token=bool_key(data, "double_count_first_token", True, where),
        vg_answer_weight=float(vg_weight),
        careful_hflip=bool_key(data, "careful_hflip", True, where),
        hflip=bool_key(data, "hflip", True, where),
        randaug=bool_key(data, "randaug", True, where),
        crop_scale=crop_scale_key(data, where),
    )
    image_roots = _image_roots(data, where)
    eval_subset = optional_positive_int_key(data, "eval_subset", where)
    data_format = data.get("format", "vqa")
    if data_format not in DATA_FORMATS:
        raise ValueError(f"{where}: key 'format' {data_format!r} unknown; one of {list(DATA_FORMATS)}")
    if data_format == "gqa":
        return _build_gqa_task(data, [str(f) for f in train_files], settings, image_roots, eval_subset, tokenizer, where)
    extra_files = extra_eval_files_key(data, where)
    answer_list = read_answer_list(str(require_key(data, "answer_list", where)))
    train_examples = load_train_examples([str(f) for f in train_files])
    splits: dict[str, VQASplit] = {}
    for split in EVAL_SPLITS:
        path = data.get(f"{split}_file")
        questions_file, annotations_file = data.get(f"{split}_questions_file"), data.get(f"{split}_annotations_file")
        if (questions_file is None) != (annotations_file is None):
            raise ValueError(f"{where}: give both '{split}_questions_file' and '{split}_annotations_file' (the official "
                             "VQA files) or neither")
        if path is None:
            if split == "val":
                raise ValueError(f"{where}: missing key 'val_file' (the validation split that selects the checkpoint)")
            if questions_file is not None:
                raise ValueError(f"{where}: '{split}_questions_file' given without '{split}_file'")
            continue
        splits[split] = split_subset(load_eval_split(split, str(path), questions_file, annotations_file), eval_subset)
    if splits["val"].ground_truth is None:
        raise ValueError(f"{where}: the questions of 'val_file' ({splits['val'].source}) need answers (or give "
                         "'val_questions_file' and 'val_annotations_file') to select a checkpoint by accuracy")
    drawn_split = list(splits)[-1]  # test (or val): the extra splits are not drawn
    for split, path in extra_files.items():  # evaluated like test, after it; their ground truth is the json's answers
        splits[split] = split_subset(load_eval_split(split, path, None, None), eval_subset)
    log.info("vqa: %d training questions, %d candidate answers; %s", len(train_examples), len(answer_list),
             ", ".join(f"{s} {len(v.examples)}" for s, v in splits.items()))

    def evaluate(model, split: str, ctx: EvalContext) -> dict[str, float]:
        if split not in splits:
            raise ValueError(f"vqa: unknown split {split!r}; configured: {list(splits)}")
        return evaluate_vqa(model, splits[split], image_roots, tokenizer, settings, answer_list, ctx)

    def draw(model, out_dir: Path, ctx: EvalContext) -> list[Path]:
        return draw_predictions(model, splits[drawn_split], image_roots, tokenizer, settings, answer_list, out_dir)

    return _vqa_task(VQATrainSet(train_examples, image_roots, settings), evaluate, list(splits), draw, answer_list, settings, tokenizer)


def _vqa_task(train_set, evaluate, eval_splits: list[str], draw, answer_list: list[str], settings: VQASettings,
              tokenizer) -> FinetuneTask:
    """The VQA fine-tuning task (VQA v2 or xGQA files): decoder loss, accuracy selection, and the
    answer list and settings inference needs."""
    return FinetuneTask(
        name="vqa",
        model_task="vqa",
        train_set=train_set,
        collate=make_collate(tokenizer, settings.max_tokens),
        loss=vqa_loss,
        evaluate=evaluate,
        eval_splits=eval_splits,
        selection_metric="acc",
        draw=draw,
        lr_mult_prefixes=DECODER_PREFIXES,
        inference_files={"answer_list.json": answer_list, "inference.json": {
            "task": "vqa", "max_tokens": settings.max_tokens, "k_test": settings.k_test,
            "double_count_first_token": settings.double_count_first_token}},
    )


def _build_gqa_task(data: dict, train_files: list[str], settings: VQASettings, image_roots, eval_subset: int | None,
                    tokenizer: WordPieceTokenizer, where: str) -> FinetuneTask:
    """The xGQA variant (``format: gqa``): GQA-style files, per-language splits, exact-match accuracy."""
    official = [f"{split}_{kind}_file" for split in EVAL_SPLITS for kind in ("questions", "annotations") if data.get(f"{split}_{kind}_file")]
    if official:
        raise ValueError(f"{where}: {official} are official VQA v2 files; format 'gqa' reads answers from the GQA-style files")
    if isinstance(image_roots, dict):
        raise ValueError(f"{where}: format 'gqa': 'image_root' must be the one folder of the <img_id>.jpg images")
    answer_list = read_gqa_answers(str(require_key(data, "answer_list", where)))
    train_examples, scores = load_gqa_train(train_files)
    split_files = {"val": file_or_language_files(require_key(data, "val_file", where), "val_file", where),
                   **({"test": file_or_language_files(data["test_file"], "test_file", where)} if data.get("test_file") is not None else {}),
                   **extra_eval_files_key(data, where, languages=True)}

    def load(name: str, path: str) -> VQASplit:
        return split_subset(load_gqa_split(name, path), eval_subset)

    splits: dict[str, VQASplit | dict[str, VQASplit]] = {
        split: {lang: load(f"{split}_{lang}", path) for lang, path in files.items()} if isinstance(files, dict) else load(split, files)
        for split, files in split_files.items()}
    counts = [f"{s.name} {len(s.examples)}" for sets in splits.values() for s in (sets.values() if isinstance(sets, dict) else [sets])]
    log.info("vqa (gqa): %d training questions, %d candidate answers; %s", len(train_examples), len(answer_list), ", ".join(counts))
    drawn = splits["test" if "test" in splits else "val"]
    drawn = next(iter(drawn.values())) if isinstance(drawn, dict) else drawn

    def evaluate(model, split: str, ctx: EvalContext) -> dict[str, float]:
        if split not in splits:
            raise ValueError(f"vqa: unknown split {split!r}; configured: {list(splits)}")
        sets = splits[split]
        if isinstance(sets, VQASplit):
            return evaluate_vqa(model, sets, image_roots, tokenizer, settings, answer_list, ctx)
        return mean_over_languages({lang: evaluate_vqa(model, s, image_roots, tokenizer, settings, answer_list, ctx)
                                    for lang, s in sets.items()})

    def draw(model, out_dir: Path, ctx: EvalContext) -> list[Path]:
        return draw_predictions(model, drawn, image_roots, tokenizer, settings, answer_list, out_dir)

    return _vqa_task(VQATrainSet(train_examples, image_roots, settings, scores), evaluate, list(splits), draw, answer_list, settings,
                     tokenizer)
