"""Validating readers for the dataset file formats the X²-VLM tasks read (spec §3.3, §4).

The readers know file formats, not any particular dataset: the generated world and the real
COCO / VQA v2 / NLVR2 / RefCOCO+ / MSR-VTT files go through the same functions. Malformed input
raises ``DataFormatError`` (a ``ValueError``) whose message names the file, the record (line
number for JSON lines, list index for JSON arrays) and the offending field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PathLike = str | Path
Texts = list[str] | dict[str, str]

#: Image path of an official VQA v2 question, built from ``image_id`` and ``data_subtype``.
COCO_VQA_IMAGE_TEMPLATE = "{data_subtype}/COCO_{data_subtype}_{image_id:012d}.jpg"


class DataFormatError(ValueError):
    """A dataset file does not have the expected format."""


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageText:
    image: str
    captions: Texts


@dataclass(frozen=True)
class Region:
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels of the original image
    captions: Texts
    attributes: Texts | None


@dataclass(frozen=True)
class RegionText:
    image: str
    captions: Texts | None  # whole-image text, optional
    regions: list[Region]


@dataclass(frozen=True)
class VideoText:
    video: str | list  # a path, or a list of frames (base64 strings) / clips
    texts: list[str]


@dataclass(frozen=True)
class CaptionPair:
    """One training pair of a Karpathy-style retrieval / captioning file."""

    image: str
    caption: str
    index: str | int


@dataclass(frozen=True)
class EvalImage:
    """One image (or video) of a Karpathy-style evaluation file with all its captions."""

    image: str
    captions: list[str]
    index: str | int | None


@dataclass(frozen=True)
class VQAExample:
    question_id: int | str
    image: str
    question: str
    answers: list[str] | None
    dataset: str | None = None
    image_id: int | None = None
    question_type: str | None = None
    answer_type: str | None = None


@dataclass(frozen=True)
class NLVR2Example:
    images: tuple[str, str]
    sentence: str
    label: bool


@dataclass(frozen=True)
class ReferRef:
    ref_id: int
    ann_id: int
    image_id: int
    split: str
    sentences: list[str]
    category_id: int
    file_name: str | None


@dataclass(frozen=True)
class ReferImage:
    id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class ReferIndex:
    """What the REFER toolkit builds from ``refs(unc).p`` and ``instances.json``."""

    refs: dict[int, ReferRef]
    boxes: dict[int, tuple[float, float, float, float]]  # ann_id -> [x, y, w, h]
    annotation_images: dict[int, int]  # ann_id -> image_id
    annotation_categories: dict[int, int]  # ann_id -> category_id
    images: dict[int, ReferImage]
    categories: dict[int, str]

    def ref_box(self, ref_id: int) -> tuple[float, float, float, float]:
        return self.boxes[self.refs[ref_id].ann_id]


@dataclass(frozen=True)
class GroundingExample:
    image: str
    text: str
    ref_id: int
    bbox: tuple[float, float, float, float] | None
    height: int | None
    width: int | None
    split: str | None
    image_id: int | None


@dataclass(frozen=True)
class VideoQAExample:
    video_id: str
    question: str
    answer: str
    answer_type: str | None


# --- low level --------------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Fields:
    """Typed access to the fields of one JSON object, with errors that say where."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data = data
        self.where = where

    def fail(self, name: str, expectation: str) -> DataFormatError:
        value = self.data.get(name)
        return DataFormatError(f"{self.where}: field '{name}' must be {expectation}, "
                               f"got {_short(value)}")

    def has(self, name: str) -> bool:
        return name in self.data

    def require(self, name: str) -> Any:
        if name not in self.data:
            raise DataFormatError(f"{self.where}: missing field '{name}'")
        return self.data[name]

    def string(self, name: str) -> str:
        value = self.require(name)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, "a non-empty string")
        return value

    def integer(self, name: str) -> int:
        value = self.require(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, "an integer")
        return value

    def identifier(self, name: str) -> int | str:
        value = self.require(name)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            raise self.fail(name, "an integer or a non-empty string")
        return value

    def strings(self, name: str) -> list[str]:
        value = self.require(name)
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise self.fail(name, "a non-empty list of non-empty strings")
        return list(value)

    def texts(self, name: str) -> Texts:
        """A string, a list of strings (one is drawn) or a dict language -> string."""
        value = self.require(name)
        if isinstance(value, str) and value.strip():
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value):
            return list(value)
        if (isinstance(value, dict) and value and all(isinstance(k, str) for k in value)
                and all(isinstance(v, str) and v.strip() for v in value.values())):
            return dict(value)
        raise self.fail(name, "a string, a list of strings or a dict of language -> string")

    def box(self, name: str) -> tuple[float, float, float, float]:
        value = self.require(name)
        return _box(value, lambda: self.fail(name, "[x, y, w, h] with finite numbers and w, h > 0"))


def _box(value: Any, error) -> tuple[float, float, float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in value)
            or value[2] <= 0 or value[3] <= 0):
        raise error()
    return tuple(value)


def read_json(path: PathLike) -> Any:
    """Parse a JSON file; a syntax error is reported with the file name and position."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None


def _json_list(path: PathLike) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def iter_json_lines(path: PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}: invalid JSON: {error.msg}") from None


def read_json_lines(path: PathLike) -> list:
    return [record for _, record in iter_json_lines(path)]


def list_shards(path: PathLike) -> list[Path]:
    """The files of a data path: the file itself, or every file of a directory (sorted),
    skipping names containing ``_SUCCESS`` as the streaming reader does."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.is_file() and "_SUCCESS" not in p.name)
        if not shards:
            raise DataFormatError(f"{path}: directory holds no data files")
        return shards
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file or directory")
    return [path]


# --- pre-training -------------------------------------------------------------------------------


def parse_image_text(data: Any, where: str, image_key: str = "image",
                     caption_key: str = "caption") -> ImageText:
    fields = _Fields(data, where)
    return ImageText(image=fields.string(image_key), captions=fields.texts(caption_key))


def parse_region_text(data: Any, where: str, image_key: str = "image") -> RegionText:
    fields = _Fields(data, where)
    image = fields.string(image_key)
    captions = fields.texts("caption") if fields.has("caption") else None
    elements = fields.require("elems")
    if not isinstance(elements, list) or not elements:
        raise fields.fail("elems", "a non-empty list of region objects")
    regions = []
    for k, element in enumerate(elements):
        element_fields = _Fields(element, f"{where}: elems[{k}]")
        regions.append(Region(
            bbox=element_fields.box("bb"),
            captions=element_fields.texts("caption"),
            attributes=element_fields.texts("attributes") if element_fields.has("attributes") else None,
        ))
    return RegionText(image=image, captions=captions, regions=regions)


def parse_video_text(data: Any, where: str, video_key: str = "video",
                     text_key: str = "text") -> VideoText:
    fields = _Fields(data, where)
    video = fields.require(video_key)
    if isinstance(video, str):
        if not video.strip():
            raise fields.fail(video_key, "a path or a non-empty list of frames")
    elif not isinstance(video, list) or not video:
        raise fields.fail(video_key, "a path or a non-empty list of frames")
    texts = fields.texts(text_key)
    if isinstance(texts, dict):
        raise fields.fail(text_key, "a string or a list of strings")
    return VideoText(video=video, texts=texts)


def _parse_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{where}: invalid JSON: {error.msg}") from None


def read_image_text_line(line: str, where: str = "<line>", image_key: str = "image",
                         caption_key: str = "caption") -> ImageText:
    """One raw line of an image-text shard (for streaming loaders)."""
    return parse_image_text(_parse_line(line, where), where, image_key, caption_key)


def read_region_text_line(line: str, where: str = "<line>", image_key: str = "image") -> RegionText:
    """One raw line of a region-text shard: ``{image, caption?, elems: [{bb, caption,
    attributes?}]}``."""
    return parse_region_text(_parse_line(line, where), where, image_key)


def read_video_text_line(line: str, where: str = "<line>", video_key: str = "video",
                         text_key: str = "text") -> VideoText:
    return parse_video_text(_parse_line(line, where), where, video_key, text_key)


def read_image_text(path: PathLike, image_key: str = "image", caption_key: str = "caption") -> list[ImageText]:
    """All records of an image-text JSON-lines file or shard directory."""
    return [parse_image_text(data, f"{shard}:{n}", image_key, caption_key)
            for shard in list_shards(path) for n, data in iter_json_lines(shard)]


def read_region_text(path: PathLike, image_key: str = "image") -> list[RegionText]:
    return [parse_region_text(data, f"{shard}:{n}", image_key)
            for shard in list_shards(path) for n, data in iter_json_lines(shard)]


def read_video_text(path: PathLike, video_key: str = "video", text_key: str = "text") -> list[VideoText]:
    return [parse_video_text(data, f"{shard}:{n}", video_key, text_key)
            for shard in list_shards(path) for n, data in iter_json_lines(shard)]


# --- retrieval and captioning ---------------------------------------------------------------------


def read_karpathy_train(path: PathLike, index_key: str = "image_id", vision_key: str = "image",
                        text_key: str = "caption") -> list[CaptionPair]:
    """``[{image, caption, image_id}]`` (also MSR-VTT-style video files with other keys)."""
    pairs = []
    for k, data in enumerate(_json_list(path)):
        fields = _Fields(data, f"{path}[{k}]")
        pairs.append(CaptionPair(image=fields.string(vision_key), caption=fields.string(text_key),
                                 index=fields.identifier(index_key)))
    return pairs


def read_karpathy_eval(path: PathLike, vision_key: str = "image", text_key: str = "caption",
                       index_key: str | None = None) -> list[EvalImage]:
    """``[{image, caption: [str, ...]}]``; ``index_key`` is read when given."""
    images = []
    for k, data in enumerate(_json_list(path)):
        fields = _Fields(data, f"{path}[{k}]")
        images.append(EvalImage(image=fields.string(vision_key), captions=fields.strings(text_key),
                                index=fields.identifier(index_key) if index_key else None))
    return images


def read_multilingual_eval(files: dict[str, PathLike], vision_key: str = "image",
                           text_key: str = "caption") -> dict[str, list[EvalImage]]:
    """Per-language evaluation files (the ``val_file``/``test_file`` dicts of XRetrieval)."""
    return {language: read_karpathy_eval(path, vision_key, text_key) for language, path in files.items()}


def pairs_of_eval_images(images: list[EvalImage]) -> list[CaptionPair]:
    """Training pairs of evaluation-style records: one per caption, the record's index as id."""
    return [CaptionPair(image=item.image, caption=caption, index=item.index) for item in images for caption in item.captions]


def read_xflickrco(path: PathLike) -> list[EvalImage]:
    """IGLUE xFlickr&CO JSON lines, one image per line: ``{"sentences": [str, ...], "id", "img_path"}``
    -> ``EvalImage(image=img_path, captions=sentences, index=id)``. Which image root ``img_path``
    is under (COCO's when it contains ``COCO``, else Flickr30K's) is the caller's decision."""
    images = []
    for number, data in iter_json_lines(path):
        fields = _Fields(data, f"{path}:{number}")
        images.append(EvalImage(image=fields.string("img_path"), captions=fields.strings("sentences"), index=fields.identifier("id")))
    if not images:
        raise DataFormatError(f"{path}: no record")
    return images


@dataclass(frozen=True)
class WitImages:
    """A WIT file's images grouped by URL (first-seen order) with their captions, and every URL's
    encoded image file (decoded from ``image_content``)."""

    images: list[EvalImage]  # image = index = the URL
    contents: dict[str, bytes]


def read_wit(path: PathLike) -> WitImages:
    """IGLUE WIT JSON lines, one (image, caption) pair per line: ``image_url``, ``image_content``
    (the image file, base64) and ``caption_reference_description``; lines with the same URL are one
    image with several captions (the first line's ``image_content`` is kept)."""
    captions: dict[str, list[str]] = {}
    contents: dict[str, bytes] = {}
    for number, data in iter_json_lines(path):
        fields = _Fields(data, f"{path}:{number}")
        url = fields.string("image_url")
        caption = fields.string("caption_reference_description")
        encoded = fields.string("image_content")
        if url not in contents:
            try:
                contents[url] = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise fields.fail("image_content", "base64 image data") from None
        captions.setdefault(url, []).append(caption)
    if not captions:
        raise DataFormatError(f"{path}: no record")
    return WitImages([EvalImage(image=url, captions=texts, index=url) for url, texts in captions.items()], contents)


def read_coco_caption_gt(path: PathLike) -> dict[int, list[str]]:
    """COCO caption ground truth as pycocoevalcap's ``COCO()`` reads it:
    ``{images: [{id}], annotations: [{image_id, caption, id}]}`` -> image id -> captions."""
    data = read_json(path)
    fields = _Fields(data, str(path))
    images = fields.require("images")
    annotations = fields.require("annotations")
    if not isinstance(images, list):
        raise fields.fail("images", "a list")
    if not isinstance(annotations, list):
        raise fields.fail("annotations", "a list")
    captions: dict[int, list[str]] = {}
    for k, image in enumerate(images):
        captions[_Fields(image, f"{path}: images[{k}]").integer("id")] = []
    seen_ids = set()
    for k, annotation in enumerate(annotations):
        annotation_fields = _Fields(annotation, f"{path}: annotations[{k}]")
        image_id = annotation_fields.integer("image_id")
        annotation_id = annotation_fields.integer("id")
        if annotation_id in seen_ids:
            raise annotation_fields.fail("id", "unique")
        seen_ids.add(annotation_id)
        if image_id not in captions:
            raise annotation_fields.fail("image_id", "the id of an entry of 'images'")
        captions[image_id].append(annotation_fields.string("caption"))
    return captions


# --- VQA ----------------------------------------------------------------------------------------


def read_vqa_json(path: PathLike, require_answers: bool = True) -> list[VQAExample]:
    """Processed VQA json: ``[{question_id, image, question, answer: [...] | str, dataset}]``
    (the test file may lack ``answer``; pass ``require_answers=False``)."""
    examples = []
    for k, data in enumerate(_json_list(path)):
        fields = _Fields(data, f"{path}[{k}]")
        answers = None
        if fields.has("answer") or require_answers:
            raw = fields.require("answer")
            if isinstance(raw, str) and raw.strip():
                answers = [raw]
            elif isinstance(raw, list) and raw and all(isinstance(a, str) for a in raw):
                answers = list(raw)
            else:
                raise fields.fail("answer", "a non-empty list of strings or a string")
        dataset = fields.string("dataset") if fields.has("dataset") else None
        if dataset is not None and dataset not in ("vqa", "vg", "gqa"):
            raise fields.fail("dataset", "one of 'vqa', 'vg', 'gqa'")
        examples.append(VQAExample(question_id=fields.identifier("question_id"),
                                   image=fields.string("image"), question=fields.string("question"),
                                   answers=answers, dataset=dataset))
    return examples


def read_vqa_official(questions_path: PathLike, annotations_path: PathLike | None = None,
                      image_template: str = COCO_VQA_IMAGE_TEMPLATE) -> list[VQAExample]:
    """Official VQA v2 question (and annotation) files -> processed examples.

    ``image_template`` builds the image path from ``image_id`` and the file's ``data_subtype``
    (default: COCO's ``train2014/COCO_train2014_000000000009.jpg`` naming).
    """
    questions_data = _Fields(read_json(questions_path), str(questions_path))
    subtype = questions_data.string("data_subtype")
    questions = questions_data.require("questions")
    if not isinstance(questions, list):
        raise questions_data.fail("questions", "a list")
    annotations: dict[int, dict] = {}
    if annotations_path is not None:
        annotation_data = _Fields(read_json(annotations_path), str(annotations_path))
        raw_annotations = annotation_data.require("annotations")
        if not isinstance(raw_annotations, list):
            raise annotation_data.fail("annotations", "a list")
        for k, annotation in enumerate(raw_annotations):
            fields = _Fields(annotation, f"{annotations_path}: annotations[{k}]")
            answers = fields.require("answers")
            if not isinstance(answers, list) or not answers:
                raise fields.fail("answers", "a non-empty list of {answer, answer_confidence, answer_id}")
            answer_texts = [_Fields(a, f"{annotations_path}: annotations[{k}].answers[{j}]").string("answer")
                            for j, a in enumerate(answers)]
            annotations[fields.integer("question_id")] = {
                "image_id": fields.integer("image_id"),
                "answers": answer_texts,
                "multiple_choice_answer": fields.string("multiple_choice_answer"),
                "question_type": fields.string("question_type"),
                "answer_type": fields.string("answer_type"),
            }
    examples = []
    for k, question in enumerate(questions):
        fields = _Fields(question, f"{questions_path}: questions[{k}]")
        question_id = fields.integer("question_id")
        image_id = fields.integer("image_id")
        annotation = annotations.get(question_id)
        if annotations_path is not None:
            if annotation is None:
                raise DataFormatError(f"{annotations_path}: no annotation for question_id {question_id}")
            if annotation["image_id"] != image_id:
                raise DataFormatError(f"{annotations_path}: field 'image_id' of question_id {question_id} "
                                      f"is {annotation['image_id']}, the questions file says {image_id}")
        examples.append(VQAExample(
            question_id=question_id,
            image=image_template.format(data_subtype=subtype, image_id=image_id),
            question=fields.string("question"),
            answers=annotation["answers"] if annotation else None,
            dataset="vqa",
            image_id=image_id,
            question_type=annotation["question_type"] if annotation else None,
            answer_type=annotation["answer_type"] if annotation else None,
        ))
    if annotations_path is not None and len(annotations) != len(examples):
        raise DataFormatError(f"{annotations_path}: {len(annotations)} annotations for "
                              f"{len(examples)} questions")
    return examples


def read_answer_list(path: PathLike) -> list[str]:
    data = read_json(path)
    if not isinstance(data, list) or not data or not all(isinstance(a, str) and a for a in data):
        raise DataFormatError(f"{path}: expected a non-empty JSON list of answer strings")
    if len(set(data)) != len(data):
        raise DataFormatError(f"{path}: answers are not unique")
    return data


# --- NLVR2 --------------------------------------------------------------------------------------

_LABELS = {True: True, False: False, "True": True, "False": False, "true": True, "false": False}


def read_nlvr2(path: PathLike) -> list[NLVR2Example]:
    """``[{images: [left, right], sentence, label}]`` with label true/false or "True"/"False"."""
    examples = []
    for k, data in enumerate(_json_list(path)):
        fields = _Fields(data, f"{path}[{k}]")
        images = fields.require("images")
        if (not isinstance(images, list) or len(images) != 2
                or not all(isinstance(i, str) and i.strip() for i in images)):
            raise fields.fail("images", "a list of two image paths")
        label = fields.require("label")
        if isinstance(label, (bool, str)) and label in _LABELS:
            value = _LABELS[label]
        else:
            raise fields.fail("label", "true/false or \"True\"/\"False\"")
        examples.append(NLVR2Example(images=(images[0], images[1]),
                                     sentence=fields.string("sentence"), label=value))
    return examples


# --- IGLUE: XVNLI, xGQA, MaRVL ------------------------------------------------------------------

#: XVNLI label names -> class index (official XVNLI.py); other labels ("-") are skipped.
XVNLI_LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}


@dataclass(frozen=True)
class XVNLIExample:
    image_id: str  # the Flickr30K image id: the image is ``<image_root>/<image_id>.jpg``
    hypothesis: str
    label: int  # XVNLI_LABELS


def read_xvnli(path: PathLike) -> tuple[list[XVNLIExample], int]:
    """IGLUE XVNLI JSON lines ``{"Flikr30kID", "sentence2", "gold_label"}`` (the official spelling
    of ``Flikr30kID``; a ``.jpg`` suffix of the id is dropped). Returns the examples and the number of
    lines skipped for a label outside ``XVNLI_LABELS`` (the official script skips them too)."""
    examples, skipped = [], 0
    for number, data in iter_json_lines(path):
        fields = _Fields(data, f"{path}:{number}")
        image_id = str(fields.identifier("Flikr30kID"))
        hypothesis = fields.string("sentence2")
        label = fields.require("gold_label")
        if not isinstance(label, str):
            raise fields.fail("gold_label", f"one of {sorted(XVNLI_LABELS)} (other strings are skipped)")
        if label not in XVNLI_LABELS:
            skipped += 1
            continue
        examples.append(XVNLIExample(image_id.removesuffix(".jpg"), hypothesis, XVNLI_LABELS[label]))
    return examples, skipped


def _gqa_labels(fields: _Fields, name: str) -> dict[str, float]:
    value = fields.require(name)
    if (not isinstance(value, dict) or not value or not all(isinstance(k, str) and k.strip() for k in value)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values())):
        raise fields.fail(name, "a non-empty mapping answer -> positive score")
    return {k: float(v) for k, v in value.items()}


@dataclass(frozen=True)
class GQAExample:
    question_id: int | str
    image_id: str  # the image is ``<image_root>/<image_id>.jpg``
    question: str
    answers: dict[str, float]  # answer -> score, the first one is the label accuracy is measured against


def read_gqa(path: PathLike) -> list[GQAExample]:
    """xGQA / GQA annotations in either published form:

    * a JSON list (LXMERT / IGLUE few-shot style) of ``{"img_id", "sent", "label": {answer: score},
      "question_id" (optional: the list index)}``;
    * a JSON object keyed by question id (the GQA balanced-questions style of the IGLUE test files)
      of ``{"imageId", "question", "answer"}`` (the answer scores 1).
    """
    data = read_json(path)
    examples = []
    if isinstance(data, list):
        for k, record in enumerate(data):
            fields = _Fields(record, f"{path}[{k}]")
            question_id = fields.identifier("question_id") if fields.has("question_id") else k
            examples.append(GQAExample(question_id, str(fields.identifier("img_id")), fields.string("sent"), _gqa_labels(fields, "label")))
    elif isinstance(data, dict):
        for question_id, record in data.items():
            fields = _Fields(record, f"{path}[{question_id!r}]")
            examples.append(GQAExample(question_id, str(fields.identifier("imageId")), fields.string("question"),
                                       {fields.string("answer"): 1.0}))
    else:
        raise DataFormatError(f"{path}: expected a JSON list of {{img_id, sent, label}} or an object keyed by question id "
                              f"of {{imageId, question, answer}}, got {type(data).__name__}")
    if not examples:
        raise DataFormatError(f"{path}: no questions")
    return examples


def read_gqa_answers(path: PathLike) -> list[str]:
    """The xGQA answer file: a JSON object whose keys are the candidate answers (``ans2label``, the
    official answer list), or a plain JSON list of answers."""
    data = read_json(path)
    if isinstance(data, dict):
        data = list(data)
    if not isinstance(data, list) or not data or not all(isinstance(a, str) and a for a in data):
        raise DataFormatError(f"{path}: expected a JSON object keyed by answer (or a list of answers), non-empty")
    if len(set(data)) != len(data):
        raise DataFormatError(f"{path}: answers are not unique")
    return data


@dataclass(frozen=True)
class MarvlExample:
    caption: str
    label: bool
    left: str
    right: str
    language: str
    concept: str | None
    line: int  # the line of the file


def read_marvl(path: PathLike) -> list[MarvlExample]:
    """IGLUE MaRVL JSON lines: ``caption``, ``label`` (true/false or "True"/"False"), ``left_img``,
    ``right_img``, ``language`` and (in the official annotation files) ``concept``."""
    examples = []
    for number, data in iter_json_lines(path):
        fields = _Fields(data, f"{path}:{number}")
        label = fields.require("label")
        if not isinstance(label, (bool, str)) or label not in _LABELS:
            raise fields.fail("label", "true/false or \"True\"/\"False\"")
        concept = fields.string("concept") if fields.has("concept") else None
        examples.append(MarvlExample(fields.string("caption"), _LABELS[label], fields.string("left_img"), fields.string("right_img"),
                                     fields.string("language"), concept, number))
    if not examples:
        raise DataFormatError(f"{path}: no record")
    return examples


# --- grounding (RefCOCO+) -----------------------------------------------------------------------


class _PlainDataUnpickler(pickle.Unpickler):
    """Loads pickles of plain data (dicts, lists, strings, numbers) only; refuses to import
    anything, so a refs file cannot run code."""

    def find_class(self, module: str, name: str):
        raise DataFormatError(f"refs pickle refers to {module}.{name}; only plain data is accepted")


def read_refer(refs_path: PathLike, instances_path: PathLike) -> ReferIndex:
    """The two REFER files: ``refs(unc).p`` (a pickled list of refs) and ``instances.json``
    (COCO-style images, annotations with ``bbox`` [x, y, w, h], categories)."""
    try:
        with open(refs_path, "rb") as handle:
            raw_refs = _PlainDataUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError) as error:
        raise DataFormatError(f"{refs_path}: not a readable pickle ({error})") from None
    if not isinstance(raw_refs, list):
        raise DataFormatError(f"{refs_path}: expected a pickled list of refs")
    instances = _Fields(read_json(instances_path), str(instances_path))
    images: dict[int, ReferImage] = {}
    for k, image in enumerate(instances.require("images")):
        fields = _Fields(image, f"{instances_path}: images[{k}]")
        images[fields.integer("id")] = ReferImage(fields.integer("id"), fields.string("file_name"),
                                                  fields.integer("height"), fields.integer("width"))
    categories = {}
    for k, category in enumerate(instances.require("categories")):
        fields = _Fields(category, f"{instances_path}: categories[{k}]")
        categories[fields.integer("id")] = fields.string("name")
    boxes, annotation_images, annotation_categories = {}, {}, {}
    for k, annotation in enumerate(instances.require("annotations")):
        fields = _Fields(annotation, f"{instances_path}: annotations[{k}]")
        ann_id = fields.integer("id")
        boxes[ann_id] = fields.box("bbox")
        annotation_images[ann_id] = fields.integer("image_id")
        annotation_categories[ann_id] = fields.integer("category_id")
        if annotation_images[ann_id] not in images:
            raise fields.fail("image_id", "the id of an entry of 'images'")
        if annotation_categories[ann_id] not in categories:
            raise fields.fail("category_id", "the id of an entry of 'categories'")
    refs: dict[int, ReferRef] = {}
    for k, ref in enumerate(raw_refs):
        fields = _Fields(ref, f"{refs_path}[{k}]")
        sentences = fields.require("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise fields.fail("sentences", "a non-empty list of {sent, raw, tokens, sent_id}")
        texts = [_Fields(s, f"{refs_path}[{k}].sentences[{j}]").string("sent")
                 for j, s in enumerate(sentences)]
        ann_id = fields.integer("ann_id")
        if ann_id not in boxes:
            raise fields.fail("ann_id", "the id of an annotation in instances.json")
        ref_id = fields.integer("ref_id")
        split = fields.string("split")
        if split not in ("train", "val", "test", "testA", "testB", "testC"):
            raise fields.fail("split", "one of train, val, test, testA, testB, testC")
        refs[ref_id] = ReferRef(
            ref_id=ref_id, ann_id=ann_id, image_id=fields.integer("image_id"), split=split,
            sentences=texts, category_id=fields.integer("category_id"),
            file_name=ref.get("file_name"),
        )
        if annotation_images[ann_id] != refs[ref_id].image_id:
            raise fields.fail("image_id", f"the image of annotation {ann_id}")
    return ReferIndex(refs=refs, boxes=boxes, annotation_images=annotation_images,
                      annotation_categories=annotation_categories, images=images,
                      categories=categories)


def read_refcoco(path: PathLike, refs_path: PathLike | None = None,
                 instances_path: PathLike | None = None) -> list[GroundingExample]:
    """``refcoco+_{split}.json``: ``[{image, text, ref_id}]`` plus, in the VLUE variant,
    ``bbox``, ``height``, ``width``. With the REFER files the box, image size and split of every
    ref are looked up (and must agree with any box the json carries)."""
    if (refs_path is None) != (instances_path is None):
        raise ValueError("pass both refs_path and instances_path, or neither")
    refer = read_refer(refs_path, instances_path) if refs_path is not None else None
    examples = []
    for k, data in enumerate(_json_list(path)):
        fields = _Fields(data, f"{path}[{k}]")
        ref_id = fields.integer("ref_id")
        bbox = fields.box("bbox") if fields.has("bbox") else None
        height = fields.integer("height") if fields.has("height") else None
        width = fields.integer("width") if fields.has("width") else None
        split = image_id = None
        if refer is not None:
            if ref_id not in refer.refs:
                raise fields.fail("ref_id", f"a ref_id of {refs_path}")
            ref = refer.refs[ref_id]
            refer_box = refer.ref_box(ref_id)
            if bbox is not None and tuple(bbox) != tuple(refer_box):
                raise fields.fail("bbox", f"the REFER box {list(refer_box)} of ref {ref_id}")
            image = refer.images[ref.image_id]
            bbox, height, width = refer_box, image.height, image.width
            split, image_id = ref.split, ref.image_id
        examples.append(GroundingExample(image=fields.string("image"), text=fields.string("text"),
                                         ref_id=ref_id, bbox=bbox, height=height, width=width,
                                         split=split, image_id=image_id))
    return examples


# --- video QA -----------------------------------------------------------------------------------


def read_video_qa(path: PathLike) -> list[VideoQAExample]:
    """MSRVTT-QA / MSVD-QA JSON lines: ``{video_id, question, answer}``."""
    examples = []
    for number, data in iter_json_lines(path):
        fields = _Fields(data, f"{path}:{number}")
        examples.append(VideoQAExample(
            video_id=fields.string("video_id"), question=fields.string("question"),
            answer=fields.string("answer"),
            answer_type=fields.string("answer_type") if fields.has("answer_type") else None,
        ))
    return examples


def read_ans2label(path: PathLike) -> dict[str, int]:
    """``{answer: label}`` with labels 0..n-1, each used once."""
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise DataFormatError(f"{path}: expected a non-empty JSON object answer -> label")
    for answer, label in data.items():
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataFormatError(f"{path}: field '{answer}' must be an integer label, got {_short(label)}")
    if sorted(data.values()) != list(range(len(data))):
        raise DataFormatError(f"{path}: labels must be 0..{len(data) - 1}, each used once")
    return dict(data)
