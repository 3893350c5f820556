"""Decoding raw pre-training samples into tensors and token ids, exactly as spec §3.3.2-§3.3.5 say.

``SampleDecoder(source, model_cfg, tokenizer)(raw, rng)`` turns one ``RawSample`` of a source into a
``Sample`` (image-text, video-text, text) or a ``RegionSample`` (an image and its region-text
items), drawing every random choice from ``rng``. A sample that cannot be used raises
``SkipSample(reason, detail)`` with one of ``SKIP_REASONS``; only the expected failure types of the
readers and decoders are turned into skips, so programming errors still surface.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import torch
from PIL import Image

from x2vlm.config import X2VLMConfig
from x2vlm.data.masking import mask_tokens
from x2vlm.data.readers import DataFormatError, parse_image_text, parse_region_text, parse_video_text
from x2vlm.data.stream import RawSample, is_url
from x2vlm.data.text import pre_caption
from x2vlm.data.transforms import (
    BoxTransform,
    PretrainImageTransform,
    box_to_cxcywh_target,
    mentions_left_or_right,
    region_patch_mask,
    sample_region_view,
    whole_image_patch_mask,
)
from x2vlm.data.video import decode_base64_frames, load_image, read_clip, sample_frame_indices

if TYPE_CHECKING:
    from x2vlm.data.pretrain import SourceConfig

# Why a sample was skipped.
SKIP_REASONS = (
    "broken_json",  # not valid JSON / not UTF-8 / not a JSON object
    "missing_field",  # a required field (or the configured language) is absent
    "invalid_field",  # a field has the wrong type or shape
    "empty_caption",  # a text is empty, or empty after pre_caption
    "bad_image",  # the image cannot be read or decoded
    "bad_video",  # the video or its frames cannot be read or decoded
    "bad_box",  # a box has a non-positive size or does not overlap its image
    "no_region",  # no element keeps enough of its box inside the sampled crop
    "bad_shard",  # the shard file itself could not be read (further samples of it are lost)
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov")
MUSIC_CAPTION = "[Music]"
_TAR_MEMBER = "tar-member:"


# --------------------------------------------------------------------------------------------------
# Decoded samples (inside the workers)
# --------------------------------------------------------------------------------------------------


class SkipSample(Exception):
    """Raised by the decoder for a sample that must be skipped."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class TextItem:
    ids: list[int]  # [CLS] ... [SEP]
    masked: list[int]  # ids after corruption
    positions: list[int]  # masked positions, increasing
    targets: list[int]  # original ids at those positions


@dataclass
class Sample:
    """A decoded image-text, video-text or text sample (``pixels`` is None for text)."""

    pixels: torch.Tensor | None
    text: TextItem
    source: str


@dataclass
class ParallelSample:
    """A decoded parallel-text pair: side 1 (masked for MLM) and side 2 (unmasked)."""

    text: TextItem
    target: TextItem
    source: str
    pixels: None = None


@dataclass
class RegionItem:
    text: TextItem
    mask: torch.Tensor
    target: tuple[float, float, float, float]
    is_image: bool


@dataclass
class RegionSample:
    pixels: torch.Tensor
    items: list[RegionItem]
    source: str


# --------------------------------------------------------------------------------------------------
# Decoding raw samples (spec §3.3.2-§3.3.5)
# --------------------------------------------------------------------------------------------------


def _require(record: dict, key: str, prefix: str = "") -> Any:
    if key not in record:
        raise SkipSample("missing_field", f"missing field {prefix + key!r}")
    return record[key]


def _check_texts(value: Any, name: str) -> None:
    """Empty texts are their own skip reason; other malformed values are left to the readers."""
    values = [value] if isinstance(value, str) else list(value.values()) if isinstance(value, dict) else value
    if isinstance(values, list) and not values:
        raise SkipSample("empty_caption", f"field {name!r} holds no text")
    if isinstance(values, list) and any(isinstance(v, str) and not v.strip() for v in values):
        raise SkipSample("empty_caption", f"field {name!r} holds an empty text")


def _as_texts(value: Any, name: str) -> list[str] | dict[str, str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return value
    raise SkipSample("invalid_field", f"field {name!r} must be a string, a list of strings or a dict "
                                      f"language -> string, got {type(value).__name__}")


def _box_overlaps_image(box: Sequence[float], width: int, height: int) -> bool:
    x, y, w, h = box
    return x < width and y < height and x + w > 0 and y + h > 0


class SampleDecoder:
    """Turns raw samples of one source into decoded samples; all randomness comes from ``rng``."""

    def __init__(self, source: SourceConfig, model_cfg: X2VLMConfig, tokenizer):
        self.source = source
        self.res = model_cfg.image_res
        self.patch_size = model_cfg.vision.patch_size
        self.frame_len = source.frame_len or model_cfg.frame_len
        if source.kind == "video_text" and not self.frame_len:
            raise ValueError("video_text source: set 'frame_len' (the model config has frame_len 0)")
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab
        self.special_ids = frozenset(tokenizer.special_ids)
        self.masking = source.masking
        self.image_transform = PretrainImageTransform(self.res, scale=source.crop_scale, randaug=source.randaugment)
        self.box_transform = BoxTransform(self.res, randaug=source.randaugment)

    def __call__(self, raw: RawSample, rng: np.random.Generator) -> Sample | RegionSample:
        record, blobs = self._record(raw)
        kind = self.source.kind
        if kind == "image_text":
            return self._image_text(record, blobs, raw.source, rng)
        if kind == "region_text":
            return self._region_text(record, blobs, raw.source, rng)
        if kind == "video_text":
            return self._video_text(record, blobs, raw.source, rng)
        if kind == "parallel_text":
            return self._parallel_text(record, raw.source, rng)
        return self._text(record, raw.source, rng)

    # -- records -----------------------------------------------------------------------------------

    def _record(self, raw: RawSample) -> tuple[dict, dict[str, bytes]]:
        """The JSON object of a raw sample; tar members become ``tar-member:`` references in it."""
        if raw.error is not None:
            raise SkipSample("bad_shard", raw.error)
        blobs: dict[str, bytes] = {}
        if raw.line is not None:
            text = raw.line
        elif "json" in raw.members:
            text = raw.members["json"]
        else:
            text = b"{}"
        try:
            record = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SkipSample("broken_json", f"invalid JSON: {error}") from None
        if not isinstance(record, dict):
            raise SkipSample("broken_json", f"expected a JSON object, got {type(record).__name__}")
        if raw.members is not None:
            if self.source.caption_key not in record and "txt" in raw.members:
                record[self.source.caption_key] = raw.members["txt"].decode("utf-8", errors="replace")
            media = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS if self.source.kind == "video_text" else IMAGE_EXTENSIONS
            for ext in media:
                if ext in raw.members and self.source.image_key:
                    reference = f"{_TAR_MEMBER}{raw.source}.{ext}"
                    blobs[reference] = raw.members[ext]
                    record[self.source.image_key] = reference
                    break
        return record, blobs

    def _parse(self, parser, record: dict, where: str, *args):
        try:
            return parser(record, where, *args)
        except DataFormatError as error:
            raise SkipSample("invalid_field", str(error)) from None

    # -- texts -------------------------------------------------------------------------------------

    def _pick(self, texts: list[str] | dict[str, str], rng: np.random.Generator) -> str:
        """One text of a list (random) or a per-language dict (``language``, else random)."""
        if isinstance(texts, dict):
            if self.source.language is not None:
                if self.source.language not in texts:
                    raise SkipSample("missing_field", f"no text in language {self.source.language!r}")
                return texts[self.source.language]
            texts = list(texts.values())
        return texts[int(rng.integers(len(texts)))]

    def _clean(self, text: str) -> str:
        try:
            return pre_caption(text, self.source.max_tokens)
        except ValueError:
            raise SkipSample("empty_caption", f"text {text!r} is empty after cleaning") from None

    def _encode(self, text: str, rng: np.random.Generator) -> TextItem:
        """``[CLS] wordpieces[:max_tokens-2] [SEP]`` and its MLM corruption."""
        tok = self.tokenizer
        pieces = tok.tokenize(text)[: self.source.max_tokens - 2]
        tokens = ["[CLS]", *pieces, "[SEP]"]
        ids = [tok.cls_token_id, *(self.vocab.get(p, tok.unk_token_id) for p in pieces), tok.sep_token_id]
        masked, positions, targets = mask_tokens(ids, tokens, self.masking, rng, tok.vocab_size,
                                                 self.special_ids, tok.mask_token_id)
        return TextItem(ids, masked, positions, targets)

    # -- media -------------------------------------------------------------------------------------

    def _resolve(self, value: str) -> str:
        root = self.source.image_root
        if root and not is_url(value) and not os.path.isabs(value):
            return f"{root.rstrip('/')}/{value}" if is_url(root) else os.path.join(root, value)
        return value

    def _load_image(self, value: str, blobs: dict[str, bytes], source: str) -> Image.Image:
        try:
            if value in blobs:
                return load_image(blobs[value], source=source, field=self.source.image_key)
            path = self._resolve(value) if self.source.image_is_path else value
            if is_url(path):
                with fsspec.open(path, "rb") as handle:
                    return load_image(handle.read(), source=source, field=self.source.image_key)
            return load_image(path, is_path=self.source.image_is_path, source=source, field=self.source.image_key)
        except (OSError, ValueError) as error:
            raise SkipSample("bad_image", str(error)) from None

    def _video_file_frames(self, value: str, blobs: dict[str, bytes], rng: np.random.Generator) -> list[Image.Image]:
        """Frames of a video file (path, URL or tar member), sampled with ``sample_frame_indices``."""
        try:
            if value in blobs or is_url(self._resolve(value)):
                if value in blobs:
                    data = blobs[value]
                else:
                    with fsspec.open(self._resolve(value), "rb") as handle:
                        data = handle.read()
                with tempfile.NamedTemporaryFile(suffix=os.path.splitext(value)[1] or ".mp4") as tmp:
                    tmp.write(data)
                    tmp.flush()
                    return self._sample_video_file(tmp.name, rng)
            return self._sample_video_file(self._resolve(value), rng)
        except (OSError, ValueError) as error:
            raise SkipSample("bad_video", str(error)) from None

    def _sample_video_file(self, path: str, rng: np.random.Generator) -> list[Image.Image]:
        return read_clip(path, self.frame_len, True, rng)

    # -- kinds -------------------------------------------------------------------------------------

    def _image_text(self, record: dict, blobs: dict, source: str, rng: np.random.Generator) -> Sample:
        src = self.source
        _require(record, src.image_key)
        _check_texts(_require(record, src.caption_key), src.caption_key)
        parsed = self._parse(parse_image_text, record, source, src.image_key, src.caption_key)
        caption = self._clean(self._pick(parsed.captions, rng))
        image = self._load_image(parsed.image, blobs, source)
        pixels = self.image_transform(image, rng, texts=caption if src.careful_hflip else None)
        return Sample(pixels, self._encode(caption, rng), source)

    def _text(self, record: dict, source: str, rng: np.random.Generator) -> Sample:
        value = _require(record, self.source.caption_key)
        _check_texts(value, self.source.caption_key)
        caption = self._clean(self._pick(_as_texts(value, self.source.caption_key), rng))
        return Sample(None, self._encode(caption, rng), source)

    def _parallel_text(self, record: dict, source: str, rng: np.random.Generator) -> ParallelSample:
        """CCLM parallel text: ``source_text`` (side 1, masked) and ``target_text`` (side 2, kept
        whole), each a string (or a list / language dict, one picked like a caption)."""
        sides = []
        for key in (self.source.caption_key, self.source.target_key):
            value = _require(record, key)
            _check_texts(value, key)
            sides.append(self._clean(self._pick(_as_texts(value, key), rng)))
        first = self._encode(sides[0], rng)
        pieces = self.tokenizer.tokenize(sides[1])[: self.source.max_tokens - 2]
        tok = self.tokenizer
        ids = [tok.cls_token_id, *(self.vocab.get(p, tok.unk_token_id) for p in pieces), tok.sep_token_id]
        return ParallelSample(first, TextItem(ids, list(ids), [], []), source)

    def _check_region_record(self, record: dict) -> None:
        _require(record, self.source.image_key)
        if "caption" in record:
            _check_texts(record["caption"], "caption")
        elements = _require(record, "elems")
        for k, element in enumerate(elements if isinstance(elements, list) else []):
            if not isinstance(element, dict):
                continue
            box = _require(element, "bb", f"elems[{k}].")
            _check_texts(_require(element, "caption", f"elems[{k}]."), f"elems[{k}].caption")
            if "attributes" in element:
                _check_texts(element["attributes"], f"elems[{k}].attributes")
            if (isinstance(box, list) and len(box) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
                    and all(math.isfinite(v) for v in box) and (box[2] <= 0 or box[3] <= 0)):
                raise SkipSample("bad_box", f"elems[{k}].bb {box} has a non-positive size")

    def _region_text(self, record: dict, blobs: dict, source: str, rng: np.random.Generator) -> RegionSample:
        """Spec §3.3.4: box-preserving crop around a random element, caption-aware flip, resize,
        photometric RandAugment; a whole-image item, then up to ``max_regions`` element items."""
        src = self.source
        self._check_region_record(record)
        parsed = self._parse(parse_region_text, record, source, src.image_key)
        image = self._load_image(parsed.image, blobs, source)
        for k, region in enumerate(parsed.regions):
            if not _box_overlaps_image(region.bbox, image.width, image.height):
                raise SkipSample("bad_box", f"elems[{k}].bb {list(region.bbox)} lies outside the "
                                            f"{image.width}x{image.height} image")
        texts = [] if parsed.captions is None else list(_values(parsed.captions))
        for region in parsed.regions:
            texts += _values(region.captions) + _values(region.attributes or [])
        allow_flip = not (src.careful_hflip and mentions_left_or_right(texts))
        anchor = parsed.regions[int(rng.integers(len(parsed.regions)))]
        view = sample_region_view(image.size, anchor.bbox, self.res, rng, allow_flip=allow_flip)
        pixels = self.box_transform(view.apply_image(image), rng)

        items = []
        if parsed.captions is not None:
            caption = self._clean(self._pick(parsed.captions, rng))
            items.append(RegionItem(self._encode(caption, rng), whole_image_patch_mask(self.res, self.patch_size),
                                    (0.5, 0.5, 1.0, 1.0), True))
        for k in rng.permutation(len(parsed.regions)).tolist():
            if len(items) >= src.max_regions:
                break
            region = parsed.regions[k]
            box = view.map_box(region.bbox, src.min_perc_in_image)
            if box is None:
                continue
            text = self._pick(region.captions, rng)
            if region.attributes is not None:
                text = f"{self._pick(region.attributes, rng)} {text}"
            items.append(RegionItem(self._encode(self._clean(text), rng),
                                    region_patch_mask(box, self.res, self.patch_size),
                                    box_to_cxcywh_target(box, self.res), False))
        if not items:
            raise SkipSample("no_region", f"no element keeps more than {src.min_perc_in_image:.0%} "
                                          f"of its box inside the sampled crop")
        return RegionSample(pixels, items, source)

    def _video_text(self, record: dict, blobs: dict, source: str, rng: np.random.Generator) -> Sample:
        """Spec §3.3.5: a video file, a list of base64 frames, or a list of clips (one text each)."""
        src = self.source
        _require(record, src.image_key)
        _check_texts(_require(record, src.caption_key), src.caption_key)
        parsed = self._parse(parse_video_text, record, source, src.image_key, src.caption_key)
        video = parsed.video
        if isinstance(video, str):
            caption = self._clean(self._pick(parsed.texts, rng))
            frames = self._video_file_frames(video, blobs, rng)
        else:
            if all(isinstance(clip, list) for clip in video):
                frame_list, text = self._choose_clips(record, video, parsed.texts, rng)
            elif all(isinstance(frame, str) for frame in video):
                frame_list, text = video, self._pick(parsed.texts, rng)
            else:
                raise SkipSample("invalid_field", f"field {src.image_key!r} mixes frames and clips")
            caption = self._clean(text)
            indices = sample_frame_indices(len(frame_list), self.frame_len, True, rng)
            try:
                frames = decode_base64_frames(frame_list, indices, source=source, field=src.image_key)
            except ValueError as error:
                raise SkipSample("bad_video", str(error)) from None
        try:
            pixels = self.image_transform.clip(frames, rng, texts=caption if src.careful_hflip else None)
        except ValueError as error:
            raise SkipSample("bad_video", str(error)) from None
        return Sample(pixels, self._encode(caption, rng), source)

    def _choose_clips(self, record: dict, clips: list[list], texts: list[str],
                      rng: np.random.Generator) -> tuple[list, str]:
        """Frames and text of the clip(s) to use (official ``sample_clip_ids``)."""
        if any(not clip or not all(isinstance(f, str) for f in clip) for clip in clips):
            raise SkipSample("invalid_field", f"field {self.source.image_key!r}: every clip must be a "
                                              f"non-empty list of base64 frames")
        if len(clips) == 1:
            return clips[0], self._pick(texts, rng)
        if len(texts) != len(clips):
            raise SkipSample("invalid_field", f"{len(clips)} clips but {len(texts)} texts")
        continuous = _require(record, "is_continuous")
        music = [t.strip() == MUSIC_CAPTION for t in texts]
        if all(music):
            raise SkipSample("empty_caption", f"every clip is captioned {MUSIC_CAPTION}")
        if not (continuous and self.source.combine_continuous_clips):
            candidates = [k for k in range(len(clips)) if not music[k]]
            chosen = [candidates[int(rng.integers(len(candidates)))]]
        else:
            # Grow a contiguous window from a random clip, randomly to the left or right, until it
            # holds min_frames_before_sampling frames of non-[Music] clips (or spans every clip).
            start = int(rng.integers(len(clips)))
            lo, hi = start, start + 1
            count = 0 if music[start] else len(clips[start])
            while count < self.source.min_frames_before_sampling and (lo > 0 or hi < len(clips)):
                if lo > 0 and (hi == len(clips) or rng.random() < 0.5):
                    lo -= 1
                    added = lo
                else:
                    hi += 1
                    added = hi - 1
                count += 0 if music[added] else len(clips[added])
            chosen = [k for k in range(lo, hi) if not music[k]]
            if not chosen:
                raise SkipSample("empty_caption", f"the sampled clips are all captioned {MUSIC_CAPTION}")
        frames = [frame for k in chosen for frame in clips[k]]
        return frames, " ".join(texts[k] for k in chosen)


def _values(texts: list[str] | dict[str, str]) -> list[str]:
    return list(texts.values()) if isinstance(texts, dict) else list(texts)
