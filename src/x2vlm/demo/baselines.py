"""Input-blind chance levels of every fine-tuning task (the demo table's "chance" column).

A chance level is the score of the best predictor that sees neither the image (or video) nor the
text of a test item, only the training labels, scored exactly as the task's own ``evaluate`` scores a
model: on the same evaluation items (the task's loaders, ``eval_subset`` included), with the task's
metric functions, under the same metric keys and in the same units (percent):

* ``retrieval`` (images, or videos with ``video: true``): the expected recall of a uniformly random
  ranking, computed exactly (no sampling). Text -> item (``img_r1/5/10``): each text has one correct
  item among ``N``, hit at ``K`` with probability ``K / N``. Item -> text (``txt_r1/5/10``): an item
  with ``c`` captions among ``T`` texts is hit at ``K`` with probability ``1 - C(T-c, K) / C(T, K)``,
  averaged over the items. Means as ``retrieval.recall_metrics`` forms them (``img_r_mean``,
  ``txt_r_mean``, ``r_mean``). The ITC keys (``itc_*``) are exactly that. The official ITM keys
  (unprefixed) and ``itm_plus_itc_*`` rank only the ``k_test`` ITC candidates of each query and put
  every other item last (``NOT_A_CANDIDATE``, ties against the ground truth), so there a random
  ranking hits at ``K`` as it would at ``min(K, k_test)`` (and always when the gallery has at most
  ``K`` entries); with ``k_test >= 10`` (the paper's configs) all three rankings have the same chance.
* ``vqa``: the single most common training answer given to every question, scored with the official
  VQA accuracy (``vqa_accuracy``): ``acc`` and, where the split has the official annotation files,
  ``acc_<answer type>``. Answers are counted as the training loss sees them: each training question
  contributes ``vqa.answer_weights`` (each distinct annotator answer with its share of the
  annotators; a Visual Genome answer with ``vg_answer_weight``), so a VQA question adds up to one in
  all; answers are compared as written in the files (the official accuracy normalises them when
  scoring).
* ``video_qa``: the most common training label (over the training questions whose answer is in
  ``ans2label``, the ones the task trains on) given to every question: ``acc`` and
  ``acc_<answer_type>`` (``video_qa.video_qa_metrics``; an answer outside ``ans2label`` is wrong).
* ``nlvr``: the majority training label for every statement: ``acc``.
* ``grounding``: the mean training box, as normalised ``(cx, cy, w, h)`` (each expression's box
  divided by its image's width and height), mapped to each evaluated image's pixels
  (``grounding.box_to_original_pixels``), scored with ``inclusive_iou`` by ``grounding_metrics``:
  ``acc`` (IoU >= 0.5), ``miou`` and, for a file holding several REFER splits, their per-split keys.
* ``captioning``: the most common training caption after the task's caption cleaning
  (``pre_caption(max_words)``) as the caption of every image, scored with ``score_captions`` (the
  configured ``metrics``: BLEU-1..4, METEOR, ROUGE-L, CIDEr, x100).

Ties between equally common answers, labels or captions go to the one seen first in the training
files. Count-like values that ``evaluate`` also returns (``questions``, ``unknown_answers``) are not
chance levels and are left out; a VQA split without ground truth gets no metric (as in ``evaluate``).

Splits: ``val`` and ``test`` (when configured) for retrieval, VQA, video QA and captioning, then the
names of the optional ``extra_eval_files`` mapping (a file path per split; for captioning a mapping
``{file, gt}``) in their order; the ``eval_files`` names for NLVR2 and grounding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from x2vlm.tasks.common import extra_eval_files_key

TASKS = ("retrieval", "vqa", "video_qa", "nlvr", "grounding", "captioning")
RECALL_AT = (1, 5, 10)


# -- shared helpers ---------------------------------------------------------------------------------
def most_common(items: Iterable) -> Any:
    """The most frequent item; ties go to the one seen first."""
    counts = Counter(items)
    if not counts:
        raise ValueError("no training label to count")
    return counts.most_common(1)[0][0]


def _path(value: Any, key: str, where: str) -> str:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"{where}: key {key!r} must be a file path, got {value!r}")
    return str(value)


def _eval_files(data: dict, where: str, optional_test: bool = True) -> dict[str, str]:
    """``val_file`` (required), ``test_file`` (optional unless ``optional_test`` is false) and the
    ``extra_eval_files`` paths, in that order."""
    from x2vlm.tasks.common import require_key

    files = {"val": _path(require_key(data, "val_file", where), "val_file", where)}
    if data.get("test_file") is not None or not optional_test:
        files["test"] = _path(require_key(data, "test_file", where), "test_file", where)
    files.update(extra_eval_files_key(data, where))
    return files


def _select(available: list[str], splits: list[str] | None, task: str) -> list[str]:
    """``splits`` (default: all of ``available``), each checked against ``available``."""
    if splits is None:
        return list(available)
    unknown = [s for s in splits if s not in available]
    if unknown:
        raise ValueError(f"chance levels of {task}: unknown split(s) {unknown}; configured: {available}")
    return list(splits)


def _eval_files_map(data: dict, where: str) -> dict[str, str]:
    """NLVR2 / grounding ``eval_files``: split name -> file."""
    from x2vlm.tasks.common import require_key

    eval_files = require_key(data, "eval_files", where)
    if not isinstance(eval_files, dict) or not eval_files:
        raise ValueError(f"{where}: 'eval_files' must map split names to files, the validation split first")
    return {str(split): _path(path, f"eval_files.{split}", where) for split, path in eval_files.items()}


# -- retrieval --------------------------------------------------------------------------------------
def random_hit_probability(total: int, positives: int, k: int) -> Fraction:
    """Probability that a uniformly random ranking of ``total`` entries puts at least one of
    ``positives`` of them among its first ``k``: ``1 - C(total - positives, k) / C(total, k)``."""
    if not 0 < positives <= total:
        raise ValueError(f"need 0 < positives <= total, got {positives} of {total}")
    k = min(k, total)
    miss = Fraction(1)
    for j in range(k):  # C(T-c, k) / C(T, k) = prod_j (T-c-j) / (T-j)
        miss *= Fraction(max(total - positives - j, 0), total - j)
    return 1 - miss


def _capped_hit_probability(total: int, positives: int, k: int, k_test: int | None) -> Fraction:
    """``random_hit_probability`` when only the first ``k_test`` entries are ranked and every other
    entry ties last (ties against the ground truth: a last-placed positive has rank ``total - 1``)."""
    if k_test is None:
        return random_hit_probability(total, positives, k)
    if total <= k:  # even a positive placed last is within the first k
        return Fraction(1)
    return random_hit_probability(total, positives, min(k, k_test))


def random_ranking_recalls(img2txt: list[list[int]], num_texts: int, k_test: int | None = None) -> dict[str, float]:
    """Expected ``recall_metrics`` (%) of a uniformly random ranking in both directions, for a gallery
    whose item ``i`` has the texts ``img2txt[i]`` among ``num_texts``; with ``k_test``, of the
    two-stage protocol that re-ranks only ``k_test`` candidates per query (see the module docstring)."""
    num_items = len(img2txt)
    if num_items == 0 or num_texts == 0:
        raise ValueError("a retrieval gallery needs items and texts")
    result = {}
    for k in RECALL_AT:
        txt = sum(_capped_hit_probability(num_texts, len(texts), k, k_test) for texts in img2txt) / num_items
        result[f"txt_r{k}"] = 100.0 * float(txt)
    for k in RECALL_AT:  # every text has exactly one correct item: the same probability for each text
        result[f"img_r{k}"] = 100.0 * float(_capped_hit_probability(num_items, 1, k, k_test))
    for prefix in ("txt", "img"):
        result[f"{prefix}_r_mean"] = (result[f"{prefix}_r1"] + result[f"{prefix}_r5"] + result[f"{prefix}_r10"]) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def retrieval_chance(data: dict, splits: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Random-ranking recalls of every evaluation split, under every key ``RetrievalTask.evaluate``
    returns (official ITM keys, ``itc_*``, ``itm_plus_itc_*``)."""
    from x2vlm.tasks import retrieval
    from x2vlm.tasks.common import bool_key, positive_int_key, string_key
    from x2vlm.tokenizer import WordPieceTokenizer

    where = "chance levels of retrieval"
    files = _eval_files(data, where, optional_test=False)
    video = bool_key(data, "video", False, where)
    vision_key = string_key(data, "vision_key", "video" if video else "image", where)
    text_key = string_key(data, "text_key", "caption", where)
    max_tokens = positive_int_key(data, "max_tokens", retrieval.DEFAULT_MAX_TOKENS, where)
    k_test = positive_int_key(data, "k_test", retrieval.DEFAULT_K_TEST, where)
    image_root = data.get("image_root") or ""
    tokenizer = WordPieceTokenizer.from_name_or_path("bert-base-uncased")  # texts are tokenised but not used here
    result = {}
    for split in _select(list(files), splits, "retrieval"):
        # the task's loader: the same items, the same cleaned captions (res and frame_len only matter for pixels)
        eval_set = retrieval.load_eval_set(files[split], image_root, 1, tokenizer, max_tokens, 0, vision_key, text_key)
        two_stage = random_ranking_recalls(eval_set.img2txt, len(eval_set.texts), k_test)
        itc = random_ranking_recalls(eval_set.img2txt, len(eval_set.texts))
        result[split] = retrieval.flat_metrics({"itm": two_stage, "itc": itc, "itm_plus_itc": two_stage})
    return result


# -- VQA --------------------------------------------------------------------------------------------
def vqa_majority_answer(train_files: list[str], vg_weight: float = 0.5) -> str:
    """The answer with the largest total training-target weight (``vqa.answer_weights`` summed over
    the training questions); ties go to the answer seen first."""
    from x2vlm.tasks import vqa

    totals: dict[str, float] = {}
    for example, _ in vqa.load_train_examples(train_files):
        answers, weights = vqa.answer_weights(example.answers, example.dataset, vg_weight)
        for answer, weight in zip(answers, weights):
            totals[answer] = totals.get(answer, 0.0) + weight
    if not totals:
        raise ValueError(f"{train_files}: no training answer")
    return max(totals, key=totals.__getitem__)  # max keeps the first of equal totals


def vqa_chance(data: dict, splits: list[str] | None = None) -> dict[str, dict[str, float]]:
    from x2vlm.tasks import vqa
    from x2vlm.tasks.common import optional_positive_int_key, require_key
    from x2vlm.tasks.vqa_accuracy import vqa_accuracy

    where = "chance levels of vqa"
    train_files = require_key(data, "train_files", where)
    train_files = [str(f) for f in ([train_files] if isinstance(train_files, (str, Path)) else train_files)]
    vg_weight = float(data.get("vg_answer_weight", 0.5))
    eval_subset = optional_positive_int_key(data, "eval_subset", where)
    files = _eval_files(data, where)
    selected = _select(list(files), splits, "vqa")
    answer = vqa_majority_answer(train_files, vg_weight)
    result = {}
    for split in selected:
        official = (data.get(f"{split}_questions_file"), data.get(f"{split}_annotations_file")) if split in vqa.EVAL_SPLITS \
            else (None, None)
        loaded = vqa.split_subset(vqa.load_eval_split(split, files[split], *official), eval_subset)
        if loaded.ground_truth is None:  # no answers: evaluate reports no accuracy either
            result[split] = {}
            continue
        result[split] = vqa_accuracy({qid: answer for qid in loaded.ground_truth}, loaded.ground_truth).metrics()
    return result


# -- video QA ---------------------------------------------------------------------------------------
def video_qa_chance(data: dict, splits: list[str] | None = None) -> dict[str, dict[str, float]]:
    from x2vlm.data.readers import read_ans2label
    from x2vlm.tasks import video_qa
    from x2vlm.tasks.common import positive_int_key, require_key

    where = "chance levels of video_qa"
    ans2label = read_ans2label(str(require_key(data, "ans2label_file", where)))
    max_tokens = positive_int_key(data, "max_tokens", 40, where)
    train_file = str(require_key(data, "train_file", where))
    train_labels = [item.label for item in video_qa.load_video_qa(train_file, ans2label, max_tokens)
                    if item.label != video_qa.UNKNOWN_LABEL]
    if not train_labels:
        raise ValueError(f"{train_file}: no training question has an answer in {data['ans2label_file']}")
    label = most_common(train_labels)
    files = _eval_files(data, where)
    result = {}
    for split in _select(list(files), splits, "video_qa"):
        items = video_qa.load_video_qa(files[split], ans2label, video_qa.EVAL_QUESTION_WORDS)
        result[split] = video_qa.video_qa_metrics([label] * len(items), items)
    return result


# -- NLVR2 ------------------------------------------------------------------------------------------
def nlvr_chance(data: dict, splits: list[str] | None = None) -> dict[str, dict[str, float]]:
    from x2vlm.tasks import nlvr
    from x2vlm.tasks.common import evenly_spaced_subset, optional_positive_int_key, positive_int_key, require_key

    where = "chance levels of nlvr"
    train_files = require_key(data, "train_file", where)
    train_files = [str(f) for f in (train_files if isinstance(train_files, list) else [train_files])]
    max_words = positive_int_key(data, "max_words", 30, where)
    label = most_common(item.label for path in train_files for item in nlvr.load_nlvr_file(path, max_words))
    subset = optional_positive_int_key(data, "eval_subset", where)
    files = _eval_files_map(data, where)
    result = {}
    for split in _select(list(files), splits, "nlvr"):
        items = evenly_spaced_subset(nlvr.load_nlvr_file(files[split], max_words), subset, files[split])
        result[split] = {"acc": 100.0 * sum(item.label == label for item in items) / len(items)}
    return result


# -- grounding --------------------------------------------------------------------------------------
def _image_sizes(items, image_root: str | None) -> np.ndarray:
    """(N, 2) width, height of each item's image: as the files state it, else from the image header."""
    from PIL import Image

    from x2vlm.tasks.grounding import _image_path

    read: dict[str, tuple[int, int]] = {}
    sizes = []
    for item in items:
        if item.size is not None:
            sizes.append(item.size)
            continue
        if item.image not in read:
            with Image.open(_image_path(image_root, item.image)) as img:
                read[item.image] = img.size
        sizes.append(read[item.image])
    return np.asarray(sizes, dtype=np.float64).reshape(-1, 2)


def mean_normalised_box(items, image_root: str | None = None) -> np.ndarray:
    """The mean of the items' boxes as ``(cx, cy, w, h)`` divided by their image's width/height."""
    if not items:
        raise ValueError("no training box")
    sizes = _image_sizes(items, image_root)
    boxes = np.asarray([item.box for item in items], dtype=np.float64)
    width, height = sizes[:, 0], sizes[:, 1]
    normalised = np.stack([(boxes[:, 0] + boxes[:, 2] / 2) / width, (boxes[:, 1] + boxes[:, 3] / 2) / height,
                           boxes[:, 2] / width, boxes[:, 3] / height], axis=1)
    return normalised.mean(axis=0)


def grounding_chance(data: dict, splits: list[str] | None = None) -> dict[str, dict[str, float]]:
    from x2vlm.tasks import grounding
    from x2vlm.tasks.common import evenly_spaced_subset, optional_positive_int_key, positive_int_key, require_key

    where = "chance levels of grounding"
    refs_file, instances_file = data.get("refs_file"), data.get("instances_file")
    max_words = positive_int_key(data, "max_words", 30, where)
    image_root = data.get("image_root")
    train_file = str(require_key(data, "train_file", where))
    mean_box = mean_normalised_box(grounding.load_grounding_file(train_file, refs_file, instances_file, max_words), image_root)
    subset = optional_positive_int_key(data, "eval_subset", where)
    files = _eval_files_map(data, where)
    result = {}
    for split in _select(list(files), splits, "grounding"):
        items = evenly_spaced_subset(grounding.load_grounding_file(files[split], refs_file, instances_file, max_words),
                                     subset, files[split])
        sizes = _image_sizes(items, image_root)
        predicted = grounding.box_to_original_pixels(np.tile(mean_box, (len(items), 1)), sizes[:, 0], sizes[:, 1])
        ious = grounding.inclusive_iou(predicted, np.asarray([item.box for item in items], dtype=np.float64))
        result[split] = grounding.grounding_metrics(ious, [item.refer_split for item in items])
    return result


# -- captioning -------------------------------------------------------------------------------------
def captioning_majority_caption(train_files: list[str], max_words: int = 40) -> str:
    """The most common training caption after ``pre_caption(max_words)``; ties go to the first seen."""
    from x2vlm.data.readers import read_karpathy_train
    from x2vlm.data.text import pre_caption

    return most_common(pre_caption(pair.caption, max_words) for path in train_files for pair in read_karpathy_train(path))


def _caption_files(data: dict, where: str) -> dict[str, tuple[str, str | None]]:
    """Split -> (eval file, ground-truth file or None): ``val``/``test`` when configured, then the extras."""
    files = {}
    for name in ("val", "test"):
        if data.get(f"{name}_file") is not None:
            gt = data.get(f"{name}_gt")
            files[name] = (_path(data[f"{name}_file"], f"{name}_file", where), None if gt is None else _path(gt, f"{name}_gt", where))
    for name, value in extra_eval_files_key(data, where, fields=("file", "gt")).items():
        files[name] = (value["file"], value["gt"])
    if not files:
        raise ValueError(f"{where}: give 'val_file' and/or 'test_file'")
    return files


def captioning_chance(data: dict, splits: list[str] | None = None) -> dict[str, dict[str, float]]:
    from x2vlm.tasks import captioning
    from x2vlm.tasks.common import positive_int_key, require_key

    where = "chance levels of captioning"
    train_files = require_key(data, "train_file", where)
    train_files = [str(f) for f in ([train_files] if isinstance(train_files, (str, Path)) else train_files)]
    max_words = positive_int_key(data, "max_words", 40, where)
    metrics = data.get("metrics", list(captioning.METRIC_GROUPS))
    unknown = sorted(set(metrics) - set(captioning.METRIC_GROUPS))
    if unknown:
        raise ValueError(f"{where}: key 'metrics': unknown {unknown}; choose from {list(captioning.METRIC_GROUPS)}")
    image_id_key = data.get("image_id_key")
    files = _caption_files(data, where)
    selected = _select(list(files), splits, "captioning")
    caption = captioning_majority_caption(train_files, max_words)
    result = {}
    for split in selected:
        loaded = captioning.load_caption_split(split, files[split][0], files[split][1], image_id_key)
        result[split] = captioning.score_captions(loaded.references, {i: caption for i in loaded.image_ids}, metrics)
    return result


# -- entry point ------------------------------------------------------------------------------------
CHANCE_FUNCTIONS = {
    "retrieval": retrieval_chance,
    "vqa": vqa_chance,
    "video_qa": video_qa_chance,
    "nlvr": nlvr_chance,
    "grounding": grounding_chance,
    "captioning": captioning_chance,
}


def chance_levels(task: str, data: dict, splits: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The input-blind chance level of every metric of ``task`` (see the module docstring for what
    each one is exactly).

    ``task``: a fine-tuning task name (retrieval [image or video: ``data['video']``], vqa, video_qa,
    nlvr, grounding, captioning); ``data``: that task's ``data:`` config section (file paths as in the
    configs). Returns ``{split: {metric: value}}`` for the task's evaluation splits (``splits``, or
    all of them: val/test, then the ``extra_eval_files`` names; the ``eval_files`` names for NLVR2 and
    grounding), under the keys the task's ``evaluate`` returns, in the same units (percent)."""
    if task not in CHANCE_FUNCTIONS:
        raise ValueError(f"chance levels: unknown task {task!r}; one of {list(CHANCE_FUNCTIONS)}")
    if not isinstance(data, dict):
        raise ValueError(f"chance levels of {task}: 'data' must be the task's data section (a mapping), got {data!r}")
    return CHANCE_FUNCTIONS[task](data, splits)
