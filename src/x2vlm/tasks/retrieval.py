"""Image-text and video-text retrieval: fine-tuning (ITC + ITM) and the official two-stage evaluation
(spec §4.1, MSR-VTT video retrieval at the end of §4.1).

Evaluation:

1. ITC: cosine similarity of every image with every text; every image and every text is encoded
   once (the sets are split across ranks, each rank encodes its share, features are gathered).
2. ITM: for each image the ``k_test`` most similar texts, and for each text the ``k_test`` most
   similar images, are re-scored by the ITM "match" logit; everything else scores -100.
3. Recall@1/5/10 in both directions, their means, and ``r_mean`` (official ``itm_eval``).

Unlike the official loop (one fusion forward per query, every rank encoding the whole set, spec §6.29):

* candidate pairs are scored in large batches, and a pair that is a candidate in both directions
  is scored once;
* the fusion layers' cross-attention keys/values of an image are computed once and reused for every
  text paired with it (``X2VLM.cross_attention_kv``);
* re-ranking is split across ranks by image: rank ``r`` scores the pairs of the images it encoded;
* memory is bounded: images are re-ranked in blocks of ``max_cached_images`` (their embeddings and
  cross-attention keys/values are all that is held); if a rank's share of images is larger than one
  block, the first stage keeps only their ITC features and each block is encoded again for
  re-ranking. Memory per cached image is about ``(1 + 2 * fusion_layers) * num_vision_tokens *
  width`` floats. The text states of all texts and the I x T score matrices are held (as officially).

Fine-tuning loss (``XVLMForRetrieval``): ITC with targets spread over every pair sharing an image id,
plus ITM whose hard negatives (one image per text, one text per image, drawn for the whole batch at
once) never share the id of the positive; ``temp`` is clamped to [0.001, 0.5] at every forward.

Data section of the fine-tuning YAML::

    train_files: [data/coco/coco_karpathy_train.json]   # [{image, caption, image_id}] (videos: key video)
    val_file: data/coco/coco_karpathy_val.json          # [{image, caption: [...]}]
    test_file: data/coco/coco_karpathy_test.json
    extra_eval_files: {test_novel: data/coco/novel.json}  # optional: more splits, evaluated like test after it
    image_root: data/coco/images                        # image (or video) paths are relative to it
    video: false          # items are videos: model_cfg.frame_len frames, official sampling positions
    max_tokens: 30        # words kept by pre_caption and tokens kept by the tokenizer
    k_test: 128           # candidates re-ranked by ITM per query
    crop_scale: [0.5, 1.0]
    randaug: true
    hflip: true           # true: flip unless the caption says left/right; swap: flip and swap the
                          # words; false: never flip
    index_key / vision_key / text_key   # JSON keys (defaults image_id|video_id, image|video, caption)
    rerank_batch_size: 256              # candidate pairs per fusion forward
    max_cached_images: 256              # images whose embeddings and K/V are held at once
    selection_metric: r_mean            # e.g. img_r_mean for text-to-video (official --pick_best_t2v)

Multilingual retrieval (spec §4.7: XRetrieval on Multi30K / COCO multilingual, xFlickr&CO, WIT):
``val_file``, ``test_file`` and any ``extra_eval_files`` entry may be a mapping language -> file::

    train_files: [data/multi30k/train_en.json]          # any languages; one image id across files is one image
    val_file: {en: data/multi30k/val_en.json, de: data/multi30k/val_de.json}
    test_file: {en: data/multi30k/test_en.json, de: data/multi30k/test_de.json, fr: ..., cs: ...}
    format: karpathy      # karpathy (default) | xflickrco | wit: the format of every train/eval file
    image_root: data/flickr30k/images   # xflickrco: {coco: data/coco/images, flickr30k: data/flickr30k/images};
                                        # wit: no image_root (the images are in the files)

Such a split is evaluated language by language; its metrics are every language's, keyed
``<language>/<metric>`` (``de/r_mean``), and every metric's mean over the languages under the
plain name (``r_mean``, what the IGLUE tables report). So ``selection_metric: r_mean`` selects on
the mean over languages of the validation ``r_mean`` (``de/r_mean`` selects on one language). The
official xFlickrCO.py / WIT.py select on the mean of ``(txt_r1 + img_r1) / 2`` and XRetrieval.py on
the test split's mean ``r_mean``; here selection is always on validation.

Formats: ``xflickrco`` = IGLUE JSON lines ``{"sentences": [...], "id", "img_path"}``, one image per
line (images under ``image_root.coco`` when the path contains ``COCO``, else under
``image_root.flickr30k``); ``wit`` = IGLUE WIT JSON lines, one (image, caption) per line with
``image_url``, ``image_content`` (base64 image file) and ``caption_reference_description``, lines
grouped into images by URL. Training on these files gives one pair per caption.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from x2vlm.config import X2VLMConfig
from x2vlm.data.readers import (
    CaptionPair,
    EvalImage,
    pairs_of_eval_images,
    read_karpathy_eval,
    read_karpathy_train,
    read_wit,
    read_xflickrco,
)
from x2vlm.data.text import pre_caption
from x2vlm.data.transforms import EvalTransform, FinetuneTrainTransform, swap_left_right
from x2vlm.data.video import load_image, read_clip
from x2vlm.models.x2vlm import X2VLM
from x2vlm.objectives import (
    contrastive_loss,
    matching_logits,
    matching_loss,
    sample_negatives,
)
from x2vlm.tasks.common import (
    EvalContext,
    FinetuneTask,
    bool_key,
    check_keys,
    crop_scale_key,
    extra_eval_files_key,
    LANGUAGE_SEPARATOR,
    file_or_language_files,
    gather_tensors,
    mean_over_languages,
    model_device,
    positive_int_key,
    shard_range,
    string_key,
)
from x2vlm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

NOT_A_CANDIDATE = -100.0
DEFAULT_MAX_TOKENS = 30  # official pre_caption(max_words=30)
DEFAULT_K_TEST = 128
DEFAULT_RERANK_BATCH = 256
DEFAULT_MAX_CACHED_IMAGES = 256
HFLIP_MODES = (True, False, "swap")
RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "txt_r_mean", "img_r_mean", "r_mean")
RANKINGS = ("itm", "itc", "itm_plus_itc")  # result prefixes: "" (official), "itc_", "itm_plus_itc_"
DRAWN_QUERIES = 4
DRAWN_HITS = 5


# -- metrics -----------------------------------------------------------------------------------------
def ranks_of_ground_truth(scores: np.ndarray, positives: list[list[int]]) -> np.ndarray:
    """For each query row, the 0-based rank of its best-placed positive column.

    A positive's rank counts every *other* column scoring at least as high (ties go against the
    ground truth, so a constant score matrix never looks good)."""
    ranks = np.empty(len(positives), dtype=np.int64)
    for row, cols in enumerate(positives):
        if not cols:
            raise ValueError(f"query {row} has no positive item")
        row_scores = scores[row]
        best = None
        for col in cols:
            at_least = int((row_scores >= row_scores[col]).sum()) - 1
            best = at_least if best is None else min(best, at_least)
        ranks[row] = best
    return ranks


def recall_metrics(score_i2t: np.ndarray, score_t2i: np.ndarray, img2txt: list[list[int]], txt2img: list[int]) -> dict[str, float]:
    """``txt_r1/5/10`` (image -> text), ``img_r1/5/10`` (text -> image), their means, ``r_mean`` (%)."""
    txt_ranks = ranks_of_ground_truth(np.asarray(score_i2t), img2txt)
    img_ranks = ranks_of_ground_truth(np.asarray(score_t2i), [[i] for i in txt2img])
    result = {}
    for prefix, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        for k in (1, 5, 10):
            result[f"{prefix}_r{k}"] = 100.0 * float((ranks < k).mean())
        result[f"{prefix}_r_mean"] = (result[f"{prefix}_r1"] + result[f"{prefix}_r5"] + result[f"{prefix}_r10"]) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


# -- where the pixels come from ------------------------------------------------------------------------
class VisionSource(Protocol):
    """Images or videos of an evaluation set, test-transformed on demand."""

    def __len__(self) -> int: ...

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        """(n, 3, H, W) images or (n, F, 3, H, W) videos."""
        ...


@dataclass
class TensorVision:
    """Pixels already in memory."""

    pixels: torch.Tensor

    def __len__(self) -> int:
        return len(self.pixels)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        return self.pixels[list(indices)]


@dataclass
class FileVision:
    """Image or video files read when needed (``frame_len`` > 0: videos, frames at the official
    evaluation positions), so a gallery never has to fit in memory as pixels."""

    paths: list[str | bytes]  # image / video paths, or encoded image files (WIT)
    res: int
    frame_len: int = 0
    source: str = "<eval file>"  # the dataset file, for error messages
    field: str = "image"

    def __len__(self) -> int:
        return len(self.paths)

    def frames(self, index: int) -> list[Image.Image]:
        path = self.paths[index]
        try:
            return read_clip(path, self.frame_len)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"{self.source}[{index}] field {self.field!r}: {err}") from err

    def image(self, index: int) -> Image.Image:
        return load_image(self.paths[index], is_path=True, source=f"{self.source}[{index}]", field=self.field)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        transform = EvalTransform(self.res)
        if self.frame_len:
            return torch.stack([transform.clip(self.frames(i)) for i in indices])
        return torch.stack([transform(self.image(i)) for i in indices])

    def thumbnail(self, index: int) -> Image.Image:
        """The image, or a video's middle evaluation frame."""
        if self.frame_len:
            frames = self.frames(index)
            return frames[len(frames) // 2]
        return self.image(index)


# -- file formats --------------------------------------------------------------------------------------
DATA_FORMATS = ("karpathy", "xflickrco", "wit")
XFLICKRCO_ROOTS = ("coco", "flickr30k")  # image_root keys of the xflickrco format
# the image and text fields of the JSON-lines formats (named in error messages)
IMAGE_FIELDS = {"xflickrco": "img_path", "wit": "image_content"}
TEXT_FIELDS = {"xflickrco": "sentences", "wit": "caption_reference_description"}
ImageRoot = str | dict[str, str] | None  # a folder; xflickrco: {coco: folder, flickr30k: folder}; wit: none


def image_locations(path, names: list[str], data_format: str, image_root: ImageRoot, contents: dict[str, bytes] | None = None
                    ) -> list[str | bytes]:
    """Where each image of a file is: a path under ``image_root`` (xflickrco: COCO's root when the
    path contains ``COCO``, else Flickr30K's, as the official xFlickrCO.py decides), or the image
    file itself (wit: ``contents`` by URL)."""
    if data_format == "wit":
        return [contents[name] for name in names]
    if data_format == "karpathy":
        return [str(Path(image_root) / name) for name in names]
    locations: list[str | bytes] = []
    for name in names:
        root_key = "coco" if "COCO" in name else "flickr30k"
        if root_key not in image_root:
            raise ValueError(f"{path}: image {name!r} is under image_root.{root_key}, which is not configured")
        locations.append(str(Path(image_root[root_key]) / name))
    return locations


def read_eval_records(path, data_format: str = "karpathy", image_root: ImageRoot = None, vision_key: str = "image",
                      text_key: str = "caption") -> tuple[list[EvalImage], list[str | bytes]]:
    """The Karpathy-style records (image + its captions) of an evaluation file in ``data_format`` and
    each record's image (a path, or for WIT the image file's bytes)."""
    contents = None
    if data_format == "karpathy":
        items = read_karpathy_eval(path, vision_key=vision_key, text_key=text_key)
    elif data_format == "xflickrco":
        items = read_xflickrco(path)
    elif data_format == "wit":
        wit = read_wit(path)
        items, contents = wit.images, wit.contents
    else:
        raise ValueError(f"{path}: unknown retrieval file format {data_format!r}; one of {list(DATA_FORMATS)}")
    return items, image_locations(path, [item.image for item in items], data_format, image_root, contents)


def read_train_records(path, data_format: str = "karpathy", image_root: ImageRoot = None, index_key: str = "image_id",
                       vision_key: str = "image", text_key: str = "caption") -> tuple[list[CaptionPair], list[str | bytes]]:
    """The training pairs (image, caption, image id) of a file in ``data_format`` and each pair's
    image; xFlickr&CO and WIT records give one pair per caption (id: the record's id / the URL)."""
    if data_format == "karpathy":
        pairs = read_karpathy_train(path, index_key=index_key, vision_key=vision_key, text_key=text_key)
        return pairs, image_locations(path, [pair.image for pair in pairs], data_format, image_root)
    items, locations = read_eval_records(path, data_format, image_root)
    location_of = {item.image: location for item, location in zip(items, locations)}  # WIT: one bytes object per URL
    pairs = pairs_of_eval_images(items)
    return pairs, [location_of[pair.image] for pair in pairs]


# -- evaluation sets ---------------------------------------------------------------------------------
@dataclass
class RetrievalEvalSet:
    """An evaluation file: its vision items (loaded lazily), cleaned and tokenised texts, ground truth."""

    vision: VisionSource
    names: list[str]  # image / video paths as written in the file (WIT: the URLs)
    texts: list[str]
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    img2txt: list[list[int]]
    txt2img: list[int]


def load_eval_set(path, image_root: ImageRoot, res: int, tokenizer: Tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS,
                  frame_len: int = 0, vision_key: str | None = None, text_key: str = "caption", data_format: str = "karpathy"
                  ) -> RetrievalEvalSet:
    """An evaluation file: Karpathy-style (``[{image, caption: [...]}]``; videos when ``frame_len``
    > 0), or xFlickr&CO / WIT JSON lines (``data_format``, see ``read_eval_records``).

    Texts go through ``pre_caption(max_tokens)``, are truncated to ``max_tokens`` tokens and padded
    to the longest one (padding does not change any output; the official code pads to max_tokens)."""
    vision_key = vision_key or ("video" if frame_len else "image")
    items, locations = read_eval_records(path, data_format, image_root, vision_key, text_key)
    if not items:
        raise ValueError(f"{path}: no evaluation item")
    text_field = TEXT_FIELDS.get(data_format, text_key)
    texts, img2txt, txt2img = [], [], []
    for i, item in enumerate(items):
        img2txt.append([])
        for k, caption in enumerate(item.captions):
            try:
                cleaned = pre_caption(caption, max_tokens)
            except ValueError as err:
                raise ValueError(f"{path}[{i}] field {text_field!r}[{k}]: {err}") from err
            img2txt[-1].append(len(texts))
            txt2img.append(i)
            texts.append(cleaned)
        if not img2txt[-1]:
            raise ValueError(f"{path}[{i}] field {text_field!r}: no caption")
    ids, mask = tokenizer(texts, max_length=max_tokens)
    vision = FileVision(locations, res, frame_len, source=str(path), field=IMAGE_FIELDS.get(data_format, vision_key))
    return RetrievalEvalSet(vision, [item.image for item in items], texts, ids, mask, img2txt, txt2img)


@dataclass
class RetrievalSplit:
    """An evaluation split with all pixels in memory (for ``evaluate_retrieval``)."""

    pixels: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    img2txt: list[list[int]]
    txt2img: list[int]
    images: list[str]
    texts: list[str]


def load_retrieval_split(path, image_root, res: int, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS, frame_len: int = 0) -> RetrievalSplit:
    """``load_eval_set`` with every image (or video) loaded and test-transformed."""
    eval_set = load_eval_set(path, image_root, res, tokenizer, max_tokens, frame_len)
    pixels = eval_set.vision.load(range(len(eval_set.vision)))
    return RetrievalSplit(pixels, eval_set.text_ids, eval_set.text_mask, eval_set.img2txt, eval_set.txt2img, eval_set.names, eval_set.texts)


# -- stage 1: encoding --------------------------------------------------------------------------------
@dataclass
class EncodedGallery:
    """Everything the re-ranking needs, computed once: vision and text states, masks, ITC features."""

    vision_embeds: torch.Tensor  # (I, 1+N, D)
    vision_mask: torch.Tensor  # (I, 1+N)
    vision_feat: torch.Tensor  # (I, E)
    text_states: torch.Tensor  # (T, L, H)
    text_mask: torch.Tensor  # (T, L)
    text_feat: torch.Tensor  # (T, E)


@torch.no_grad()
def encode_vision_range(model: X2VLM, vision: VisionSource, items: range, batch_size: int, keep_embeds: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """ITC features (n, E) of ``vision[items]`` and, if ``keep_embeds``, their embeddings and masks."""
    device = model_device(model)
    feats, embeds, masks = [], [], []
    batches = range(items.start, items.stop, batch_size)
    for start in tqdm(batches, desc="encode vision", leave=False, disable=len(batches) <= 1):  # no bar for one batch
        pixels = vision.load(range(start, min(start + batch_size, items.stop))).to(device)
        emb, mask = model.encode_vision(pixels)
        feats.append(model.vision_features(emb).float())
        if keep_embeds:
            embeds.append(emb)
            masks.append(mask)
    if not feats:
        return torch.empty(0, model.cfg.embed_dim, device=device), None, None
    return torch.cat(feats), (torch.cat(embeds) if keep_embeds else None), (torch.cat(masks) if keep_embeds else None)


def _used_width(mask: torch.Tensor) -> int:
    """Columns up to the last non-padding position of any row (texts are left-aligned)."""
    used = mask.sum(dim=1).max() if len(mask) else 1
    return max(int(used), 1)


@torch.no_grad()
def encode_text_range(model: X2VLM, text_ids: torch.Tensor, text_mask: torch.Tensor, items: range, batch_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states (n, L, H) and ITC features (n, E) of ``texts[items]``.

    Texts are batched by length and each batch runs at the width of its longest text (the states
    of padding positions mean nothing and are masked wherever they are used; beyond a batch's width
    they are zero)."""
    device = model_device(model)
    full_width = text_ids.shape[1]
    if len(items) == 0:
        return (torch.empty(0, full_width, model.cfg.text.hidden_size, device=device),
                torch.empty(0, model.cfg.embed_dim, device=device))
    rows = torch.arange(items.start, items.stop)
    order = rows[torch.argsort(text_mask[rows].sum(dim=1), stable=True)]
    states, feats = [], []
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="encode texts", leave=False, disable=len(batches) <= 1):
        batch = order[start : start + batch_size]
        width = _used_width(text_mask[batch])
        s = model.encode_text(text_ids[batch, :width].to(device), text_mask[batch, :width].to(device))
        states.append(torch.nn.functional.pad(s, (0, 0, 0, full_width - width)))
        feats.append(model.text_features(s).float())
    back = torch.argsort(order).to(device)  # from length order back to item order
    return torch.cat(states)[back], torch.cat(feats)[back]


@torch.no_grad()
def encode_gallery(model: X2VLM, pixels: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, batch_size: int = 64) -> EncodedGallery:
    """Encode images (B,3,H,W) or videos (B,F,3,H,W) and texts, in batches, in one process."""
    vfeat, vision, vmask = encode_vision_range(model, TensorVision(pixels), range(len(pixels)), batch_size)
    states, tfeat = encode_text_range(model, text_ids, text_mask, range(len(text_ids)), batch_size)
    return EncodedGallery(vision, vmask, vfeat, states, text_mask.to(states.device), tfeat)


# -- stage 2: candidates and ITM scores ----------------------------------------------------------------
def candidate_pairs(sims: torch.Tensor, k_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate (image, text) pairs of both directions (top-``k_test`` by ITC per query).

    Returns ``(pairs, inverse)``: ``pairs`` (P, 2) unique, sorted by image then text (so the pairs of
    a range of images are contiguous); ``inverse`` maps the I*k image->text candidates followed by
    the T*k text->image candidates to rows of ``pairs``."""
    num_images, num_texts = sims.shape
    k_txt, k_img = min(k_test, num_texts), min(k_test, num_images)
    i2t = sims.topk(k_txt, dim=1).indices
    t2i = sims.t().topk(k_img, dim=1).indices
    device = sims.device
    both = torch.cat([
        torch.stack([torch.arange(num_images, device=device).repeat_interleave(k_txt), i2t.flatten()], dim=1),
        torch.stack([t2i.flatten(), torch.arange(num_texts, device=device).repeat_interleave(k_img)], dim=1),
    ])
    # one int64 key per pair (image-major, so sorted keys are sorted by image then text): a 1-D unique
    # is a sort, where ``unique(dim=0)`` compares rows one by one (1.5 s for W4's 200k pairs)
    keys, inverse = torch.unique(both[:, 0] * num_texts + both[:, 1], return_inverse=True)
    pairs = torch.stack([keys.div(num_texts, rounding_mode="floor"), keys.remainder(num_texts)], dim=1)
    return pairs, inverse


@torch.no_grad()
def itm_scores(model: X2VLM, gallery: EncodedGallery, image_idx: torch.Tensor, text_idx: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """ITM match logit (column 1) of the pairs (image_idx[k], text_idx[k]), batched, projecting the
    vision tokens for every pair (the reference for ``cached_itm_scores``)."""
    scores = []
    for start in range(0, len(image_idx), batch_size):
        i, t = image_idx[start : start + batch_size], text_idx[start : start + batch_size]
        fused = model.fuse(gallery.text_states[t], gallery.text_mask[t], gallery.vision_embeds[i], gallery.vision_mask[i])
        scores.append(model.itm_logits(fused)[:, 1].float())
    return torch.cat(scores) if scores else torch.empty(0)


@torch.no_grad()
def cached_itm_scores(model: X2VLM, vision_embeds: torch.Tensor, vision_mask: torch.Tensor, text_states: torch.Tensor,
                      text_mask: torch.Tensor, image_idx: torch.Tensor, text_idx: torch.Tensor, batch_size: int = DEFAULT_RERANK_BATCH
                      ) -> torch.Tensor:
    """ITM match logit of the pairs (image_idx[k] into ``vision_embeds``, text_idx[k] into
    ``text_states``), with no work done twice:

    * each image's cross-attention keys/values are computed once for all its pairs, and a batch
      holds the pairs of one image, whose texts attend to those keys/values as one long query;
    * the first fusion layer's self-attention, which does not look at the image, once per text;
    * the last fusion layer only at the CLS position (the one the ITM head reads).

    An image's pairs fill whole batches that share its keys/values (one long query); what is left
    of each image (all of them when every image has few pairs, as for one query against a gallery)
    is pooled into batches whose rows gather their own image's keys/values. Within an image, pairs
    are ordered by text length and each batch runs at the width of its longest text (padding
    changes no output), so short captions do not pay for the longest one."""
    device = vision_embeds.device
    if len(image_idx) == 0:
        return torch.empty(0, device=device)
    used, rows = torch.unique(image_idx.to(device), return_inverse=True)
    cache = model.cross_attention_kv(vision_embeds[used])
    used_mask = vision_mask[used]
    texts, text_rows = torch.unique(text_idx.to(device), return_inverse=True)
    attended = _fusion_self_attention(model, text_states[texts], text_mask[texts], batch_size)
    attended_mask = text_mask[texts]
    lengths = attended_mask.sum(dim=1)[text_rows]
    order = torch.argsort(rows * (attended_mask.shape[1] + 1) + lengths, stable=True)  # by image, then text length
    image_ends = torch.cumsum(torch.bincount(rows, minlength=len(used)), 0).tolist()
    batches, leftovers = [], []  # (positions in order, the image they share or None)
    image_start = 0
    for image, image_end in enumerate(image_ends):
        full_end = image_start + (image_end - image_start) // batch_size * batch_size
        batches += [(order[start : start + batch_size], image) for start in range(image_start, full_end, batch_size)]
        leftovers.append(order[full_end:image_end])
        image_start = image_end
    pooled = torch.cat(leftovers) if leftovers else order[:0]
    batches += [(pooled[start : start + batch_size], None) for start in range(0, len(pooled), batch_size)]
    scores = torch.empty(len(order), device=device)
    for batch, image in batches:
        u = text_rows[batch]
        width = _used_width(attended_mask[u])
        if image is None and bool((rows[batch] == rows[batch[0]]).all()):
            image = int(rows[batch[0]])
        vision = torch.tensor([image], device=device) if image is not None else rows[batch]
        fused = model.fuse(attended[u, :width], attended_mask[u, :width], None, used_mask[vision], cross_kv=cache.select(vision),
                           cls_only=True, self_attended=True)
        scores[batch] = model.itm_logits(fused)[:, 1].float()
    return scores


def _fusion_self_attention(model: X2VLM, text_states: torch.Tensor, text_mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model.fusion_self_attention`` of every text, in batches by length, each at the width of its
    longest text (zeros beyond it, like ``encode_text_range``'s states)."""
    order = torch.argsort(text_mask.sum(dim=1), stable=True)
    out = torch.zeros_like(text_states)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = _used_width(text_mask[batch])
        out[batch, :width] = model.fusion_self_attention(text_states[batch, :width], text_mask[batch, :width]).to(out.dtype)
    return out


@dataclass
class RetrievalScores:
    """ITC similarities and the two re-ranked score matrices (non-candidates: ``NOT_A_CANDIDATE``)."""

    sims: torch.Tensor  # (I, T)
    score_i2t: torch.Tensor  # (I, T)
    score_t2i: torch.Tensor  # (T, I)


def scatter_scores(sims: torch.Tensor, pairs: torch.Tensor, inverse: torch.Tensor, pair_scores: torch.Tensor, k_test: int) -> RetrievalScores:
    """Fill the re-ranked matrices from the scores of the unique candidate pairs."""
    num_images, num_texts = sims.shape
    k_txt = min(k_test, num_texts)
    both = pairs[inverse]
    scores = pair_scores[inverse].float().cpu()
    both = both.cpu()
    score_i2t = torch.full((num_images, num_texts), NOT_A_CANDIDATE)
    score_t2i = torch.full((num_texts, num_images), NOT_A_CANDIDATE)
    n = num_images * k_txt
    score_i2t[both[:n, 0], both[:n, 1]] = scores[:n]
    score_t2i[both[n:, 1], both[n:, 0]] = scores[n:]
    return RetrievalScores(sims.float().cpu(), score_i2t, score_t2i)


@torch.no_grad()
def two_stage_scores(model: X2VLM, gallery: EncodedGallery, k_test: int, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ITC similarity I x T, re-ranked image->text scores I x T, re-ranked text->image scores T x I)
    of an encoded gallery, in one process."""
    sims = gallery.vision_feat.float() @ gallery.text_feat.float().t()
    pairs, inverse = candidate_pairs(sims, k_test)
    pair_scores = cached_itm_scores(model, gallery.vision_embeds, gallery.vision_mask, gallery.text_states, gallery.text_mask,
                                    pairs[:, 0], pairs[:, 1], batch_size)
    scores = scatter_scores(sims, pairs, inverse, pair_scores, k_test)
    return scores.sims, scores.score_i2t, scores.score_t2i


# -- the whole protocol, sharded ---------------------------------------------------------------------
@dataclass(frozen=True)
class Sharding:
    """Which share of the work this process does, and how shares are put back together."""

    rank: int = 0
    world_size: int = 1
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda local: local  # concatenation in rank order

    @classmethod
    def from_context(cls, ctx: EvalContext) -> Sharding:
        info = ctx.dist_info
        return cls(info.rank, info.world_size, partial(gather_tensors, dist_info=info))


@dataclass(frozen=True)
class RerankSettings:
    k_test: int = DEFAULT_K_TEST
    batch_size: int = 64  # images / texts per encoder forward
    rerank_batch_size: int = DEFAULT_RERANK_BATCH  # candidate pairs per fusion forward
    max_cached_images: int = DEFAULT_MAX_CACHED_IMAGES  # images whose embeddings and K/V are held at once


def _rows_of_images(pairs: torch.Tensor, images: range) -> slice:
    """The rows of ``pairs`` (sorted by image) whose image lies in ``images``."""
    bounds = torch.tensor([images.start, images.stop], device=pairs.device, dtype=pairs.dtype)
    lo, hi = torch.searchsorted(pairs[:, 0].contiguous(), bounds).tolist()
    return slice(lo, hi)


@torch.no_grad()
def rerank_image_range(model: X2VLM, vision: VisionSource, images: range, pairs: torch.Tensor, text_states: torch.Tensor,
                       text_mask: torch.Tensor, settings: RerankSettings, embeds: torch.Tensor | None = None,
                       masks: torch.Tensor | None = None) -> torch.Tensor:
    """ITM scores of the candidate pairs (sorted by image) whose image lies in ``images``, in blocks
    of ``max_cached_images`` images; ``embeds``/``masks`` of ``images`` if already computed."""
    mine = pairs[_rows_of_images(pairs, images)]
    scores = []
    for block_start in range(images.start, images.stop, settings.max_cached_images):
        block = range(block_start, min(block_start + settings.max_cached_images, images.stop))
        rows = _rows_of_images(mine, block)
        if rows.start == rows.stop:
            continue
        if embeds is not None:
            block_embeds = embeds[block.start - images.start : block.stop - images.start]
            block_masks = masks[block.start - images.start : block.stop - images.start]
        else:
            _, block_embeds, block_masks = encode_vision_range(model, vision, block, settings.batch_size)
        block_pairs = mine[rows]
        scores.append(cached_itm_scores(model, block_embeds, block_masks, text_states, text_mask,
                                        block_pairs[:, 0] - block.start, block_pairs[:, 1], settings.rerank_batch_size))
    return torch.cat(scores) if scores else torch.empty(0, device=text_states.device)


@torch.no_grad()
def two_stage_retrieval(model: X2VLM, vision: VisionSource, text_ids: torch.Tensor, text_mask: torch.Tensor,
                        settings: RerankSettings = RerankSettings(), sharding: Sharding = Sharding(), itm: bool = True,
                        autocast: Callable | None = None) -> RetrievalScores:
    """The official two-stage scores, with the work split across ranks (every rank gets all scores).

    Rank ``r`` encodes images ``shard_range(I, r, W)`` and texts ``shard_range(T, r, W)``; features and
    text states are gathered; every rank picks the same candidates; rank ``r`` scores the pairs of its
    own images (kept from encoding if they fit in ``max_cached_images``, else encoded again block by
    block); the pair scores are gathered. Without ``itm`` only ``sims`` is meaningful."""
    model.eval()
    autocast = autocast or nullcontext
    device = model_device(model)
    num_images, num_texts = len(vision), len(text_ids)
    my_images = shard_range(num_images, sharding.rank, sharding.world_size)
    my_texts = shard_range(num_texts, sharding.rank, sharding.world_size)
    keep = itm and len(my_images) <= settings.max_cached_images
    with autocast():
        vision_feat, embeds, masks = encode_vision_range(model, vision, my_images, settings.batch_size, keep_embeds=keep)
        text_states, text_feat = encode_text_range(model, text_ids, text_mask, my_texts, settings.batch_size)
    vision_feat, text_feat = sharding.gather(vision_feat.float()), sharding.gather(text_feat.float())
    sims = vision_feat @ text_feat.t()
    if not itm:
        empty = torch.full((num_images, num_texts), NOT_A_CANDIDATE)
        return RetrievalScores(sims.cpu(), empty, empty.t().clone())
    text_states = sharding.gather(text_states)
    pairs, inverse = candidate_pairs(sims, settings.k_test)
    with autocast():
        local = rerank_image_range(model, vision, my_images, pairs, text_states, text_mask.to(device), settings, embeds, masks)
    pair_scores = sharding.gather(local.float())
    if len(pair_scores) != len(pairs):
        raise RuntimeError(f"re-ranking produced {len(pair_scores)} scores for {len(pairs)} candidate pairs")
    return scatter_scores(sims, pairs, inverse, pair_scores, settings.k_test)


def ranking_metrics(scores: RetrievalScores, img2txt: list[list[int]], txt2img: list[int], itm: bool = True) -> dict[str, dict[str, float]]:
    """Recalls of the official protocol (``itm``), of ITC alone (``itc``) and of ITM + ITC similarity
    summed over the candidates (``itm_plus_itc``, what other libraries report)."""
    sims = scores.sims
    results = {"itc": recall_metrics(sims.numpy(), sims.t().numpy(), img2txt, txt2img)}
    if itm:
        results["itm"] = recall_metrics(scores.score_i2t.numpy(), scores.score_t2i.numpy(), img2txt, txt2img)
        summed_i2t, summed_t2i = summed_scores(scores)
        results["itm_plus_itc"] = recall_metrics(summed_i2t.numpy(), summed_t2i.numpy(), img2txt, txt2img)
    return results


def summed_scores(scores: RetrievalScores) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM logit + ITC similarity on the candidates, ``NOT_A_CANDIDATE`` elsewhere (both directions)."""
    sims = scores.sims
    i2t = torch.where(scores.score_i2t > NOT_A_CANDIDATE, scores.score_i2t + sims, torch.full_like(sims, NOT_A_CANDIDATE))
    t2i = torch.where(scores.score_t2i > NOT_A_CANDIDATE, scores.score_t2i + sims.t(), torch.full_like(sims.t(), NOT_A_CANDIDATE))
    return i2t, t2i


def evaluate_retrieval(model: X2VLM, pixels: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                       img2txt: list[list[int]], txt2img: list[int], k_test: int = 16, itm: bool = True,
                       batch_size: int = 64) -> dict[str, dict[str, float]]:
    """``ranking_metrics`` of a gallery held in memory, in one process."""
    settings = RerankSettings(k_test=k_test, batch_size=batch_size)
    scores = two_stage_retrieval(model, TensorVision(pixels), text_ids, text_mask, settings, itm=itm)
    return ranking_metrics(scores, img2txt, txt2img, itm)


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"itm": m, "itc": m2, ...}`` -> official ITM keys unprefixed, ``itc_*``, ``itm_plus_itc_*``."""
    flat = dict(results["itm"])
    for ranking in ("itc", "itm_plus_itc"):
        flat.update({f"{ranking}_{k}": v for k, v in results[ranking].items()})
    return flat


# -- fine-tuning data --------------------------------------------------------------------------------
@dataclass
class RetrievalSample:
    pixels: torch.Tensor  # (3, H, W) or (F, 3, H, W)
    caption: str
    index: int  # consecutive id of the image / video (for id-aware losses)


@dataclass
class RetrievalBatch:
    pixels: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    ids: torch.Tensor  # (B,) image ids: pairs sharing one are positives

    def to(self, device) -> RetrievalBatch:
        return RetrievalBatch(*(t.to(device, non_blocking=True) for t in (self.pixels, self.text_ids, self.text_mask, self.ids)))


@dataclass
class RetrievalTrainSet:
    """Caption pairs of one or more training files; ``get`` applies the train transform (one set of
    augmentation parameters per video clip) and the caption-aware flip."""

    images: list[str | bytes]  # full paths, or encoded image files (WIT)
    captions: list[str]  # cleaned
    ids: list[int]
    sources: list[str]  # "file[k]" of each pair, for error messages
    transform: FinetuneTrainTransform
    hflip: bool | str
    frame_len: int = 0
    vision_key: str = "image"

    def __len__(self) -> int:
        return len(self.captions)

    def get(self, index: int, rng: np.random.Generator) -> RetrievalSample:
        path, caption = self.images[index], self.captions[index]
        try:
            if self.frame_len:
                frames = read_clip(path, self.frame_len, training=True, rng=rng)
            else:
                frames = [load_image(path, is_path=True, source=self.sources[index], field=self.vision_key)]
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"{self.sources[index]} field {self.vision_key!r}: {err}") from err
        if self.hflip == "swap":
            params = self.transform.sample_params(frames[0].size, rng)
            if params.flip:
                caption = swap_left_right(caption)
        else:  # True: caption-aware (no flip when the caption says left/right); False: the transform never flips
            params = self.transform.sample_params(frames[0].size, rng, texts=caption)
        views = [self.transform.apply(frame, params) for frame in frames]
        pixels = torch.stack(views) if self.frame_len else views[0]
        return RetrievalSample(pixels, caption, self.ids[index])


@dataclass
class RetrievalCollate:
    tokenizer: Tokenizer
    max_tokens: int

    def __call__(self, samples: list[RetrievalSample]) -> RetrievalBatch:
        ids, mask = self.tokenizer([s.caption for s in samples], max_length=self.max_tokens)
        return RetrievalBatch(torch.stack([s.pixels for s in samples]), ids, mask, torch.tensor([s.index for s in samples], dtype=torch.long))


def load_train_set(files: list[str], image_root: ImageRoot, transform: FinetuneTrainTransform, hflip: bool | str, max_tokens: int,
                   frame_len: int, index_key: str, vision_key: str, text_key: str, data_format: str = "karpathy") -> RetrievalTrainSet:
    """Pairs of every file; each distinct id (over all files) becomes a consecutive int, so the
    same image in files of several languages is one id."""
    images, captions, ids, sources = [], [], [], []
    id_numbers: dict = {}
    text_field = TEXT_FIELDS.get(data_format, text_key)
    for path in files:
        pairs, locations = read_train_records(path, data_format, image_root, index_key, vision_key, text_key)
        for k, (pair, location) in enumerate(zip(pairs, locations)):
            try:
                captions.append(pre_caption(pair.caption, max_tokens))
            except ValueError as err:
                raise ValueError(f"{path}[{k}] field {text_field!r}: {err}") from err
            images.append(location)
            ids.append(id_numbers.setdefault(pair.index, len(id_numbers)))
            sources.append(f"{path}[{k}]")
    if not captions:
        raise ValueError(f"training files {files}: no pair")
    return RetrievalTrainSet(images, captions, ids, sources, transform, hflip, frame_len, IMAGE_FIELDS.get(data_format, vision_key))


# -- loss ----------------------------------------------------------------------------------------------
def retrieval_loss(model: X2VLM, batch: RetrievalBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``XVLMForRetrieval.forward``: id-aware ITC + ITM with hard negatives that never share the id."""
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    vision, vision_mask = model.encode_vision(batch.pixels)
    text = model.encode_text(batch.text_ids, batch.text_mask)
    vision_feat, text_feat = model.vision_features(vision), model.text_features(text)
    losses = {"itc": contrastive_loss(vision_feat, text_feat, model.temp, ids=batch.ids)}
    if batch.ids.unique().numel() < 2:  # every pair is a positive of every other: no negative exists
        log.warning("retrieval: a batch whose %d pairs all share one id has no ITM negative; ITM loss 0", len(batch.ids))
        losses["itm"] = vision_feat.new_zeros(())
        return losses
    image_neg, text_neg = sample_negatives(vision_feat, text_feat, model.temp, ids=batch.ids, generator=generator)
    logits = matching_logits(model, vision, vision_mask, text, batch.text_mask, image_neg, text_neg)
    losses["itm"] = matching_loss(logits)
    return losses


# -- the task ----------------------------------------------------------------------------------------
DATA_KEYS = {"train_files", "val_file", "test_file", "extra_eval_files", "image_root", "video", "max_tokens", "k_test",
             "crop_scale", "randaug", "hflip", "index_key", "vision_key", "text_key", "rerank_batch_size", "max_cached_images",
             "selection_metric", "format"}
REQUIRED_KEYS = ("train_files", "val_file", "test_file")


def image_root_key(data: dict, data_format: str, where: str) -> ImageRoot:
    """``image_root``: a folder; for ``format: xflickrco`` a mapping ``{coco: folder, flickr30k:
    folder}`` (either may be left out when no image needs it); for ``format: wit`` none (images are
    in the files)."""
    value = data.get("image_root")
    if data_format == "wit":
        if value is not None:
            raise ValueError(f"{where}: key 'image_root': WIT files hold their images (image_content); remove the key")
        return None
    if value is None:
        raise ValueError(f"{where}: missing key(s) ['image_root']")
    if data_format == "xflickrco":
        if not isinstance(value, dict) or not value or set(value) - set(XFLICKRCO_ROOTS):
            raise ValueError(f"{where}: key 'image_root' must be a mapping with keys among {list(XFLICKRCO_ROOTS)} for format "
                             f"xflickrco, got {value!r}")
        roots = value
    else:
        roots = {"": string_key(data, "image_root", None, where)}
    for name, root in roots.items():
        if not isinstance(root, str) or not Path(root).is_dir():
            raise FileNotFoundError(f"{where}: 'image_root{'.' + name if name else ''}' {root} is not a directory")
    return value


@dataclass
class RetrievalTask:
    """The evaluation settings and sets of one configured retrieval task (``evaluate`` and ``draw``).

    A split is one evaluation set, or (multilingual retrieval) a mapping language -> evaluation set,
    whose metrics are those of every language and their means (``mean_over_languages``)."""

    eval_sets: dict[str, RetrievalEvalSet | dict[str, RetrievalEvalSet]]
    settings: RerankSettings
    # top hits of each text (text -> image) of the last evaluation of each split (``split`` or
    # ``split/language``), for ``draw``
    top_hits: dict[str, torch.Tensor] = field(default_factory=dict)

    def evaluate(self, model: X2VLM, split: str, ctx: EvalContext) -> dict[str, float]:
        return self._evaluate(model, split, ctx, Sharding.from_context(ctx))

    def _evaluate(self, model: X2VLM, split: str, ctx: EvalContext, sharding: Sharding) -> dict[str, float]:
        if split not in self.eval_sets:
            raise ValueError(f"retrieval: unknown split {split!r}; configured: {list(self.eval_sets)}")
        sets = self.eval_sets[split]
        if isinstance(sets, RetrievalEvalSet):
            return self._evaluate_set(model, sets, split, ctx, sharding)
        per_language = {language: self._evaluate_set(model, eval_set, f"{split}{LANGUAGE_SEPARATOR}{language}", ctx, sharding)
                        for language, eval_set in sets.items()}
        return mean_over_languages(per_language)

    def _evaluate_set(self, model: X2VLM, eval_set: RetrievalEvalSet, name: str, ctx: EvalContext, sharding: Sharding) -> dict[str, float]:
        settings = RerankSettings(self.settings.k_test, ctx.batch_size, self.settings.rerank_batch_size, self.settings.max_cached_images)
        scores = two_stage_retrieval(model, eval_set.vision, eval_set.text_ids, eval_set.text_mask, settings, sharding, autocast=ctx.autocast)
        self.top_hits[name] = scores.score_t2i.topk(min(DRAWN_HITS, len(eval_set.vision)), dim=1).indices
        return flat_metrics(ranking_metrics(scores, eval_set.img2txt, eval_set.txt2img))

    def draw(self, model: X2VLM, out_dir: Path, ctx: EvalContext) -> list[Path]:
        """One PNG of the test split (one per language; not of the extra splits): a few text
        queries, each with its top-5 retrieved images (green frame: the ground truth, red: wrong),
        from the last evaluation (or a new one)."""
        split = "test"
        sets = self.eval_sets[split]
        named = {split: sets} if isinstance(sets, RetrievalEvalSet) else {
            f"{split}{LANGUAGE_SEPARATOR}{language}": eval_set for language, eval_set in sets.items()}
        if any(name not in self.top_hits for name in named):  # draw runs on the main rank only: evaluate in this process alone
            self._evaluate(model, split, ctx, Sharding())
        return [draw_text_queries(eval_set, self.top_hits[name], Path(out_dir) / f"retrieval_{name.replace(LANGUAGE_SEPARATOR, '_')}.png")
                for name, eval_set in named.items()]


def draw_text_queries(eval_set: RetrievalEvalSet, top_hits: torch.Tensor, out_png: Path, num_queries: int = DRAWN_QUERIES,
                      thumb: int = 128) -> Path:
    """Rows of ``[query text] + top hits``, hits framed green (correct) or red (wrong)."""
    if not isinstance(eval_set.vision, FileVision):
        raise TypeError("draw_text_queries needs an evaluation set read from files (FileVision)")
    num_texts = len(eval_set.texts)
    queries = sorted({round(x) for x in np.linspace(0, num_texts - 1, min(num_queries, num_texts))})
    pad, header = 6, 30
    hits = top_hits.shape[1]
    width = max(pad + hits * (thumb + pad), 480)
    row_height = header + thumb + 16 + pad
    canvas = Image.new("RGB", (width, pad + row_height * len(queries)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, t in enumerate(queries):
        y = pad + row * row_height
        draw.text((pad, y), _shorten(f"query {t}: {eval_set.texts[t]}", width), fill=(0, 0, 0))
        draw.text((pad, y + 13), _shorten(f"ground truth: {eval_set.names[eval_set.txt2img[t]]}", width), fill=(90, 90, 90))
        for k, image in enumerate(top_hits[t].tolist()):
            x = pad + k * (thumb + pad)
            correct = image == eval_set.txt2img[t]
            picture = eval_set.vision.thumbnail(image).convert("RGB").resize((thumb - 6, thumb - 6), Image.BICUBIC)
            color = (0, 170, 0) if correct else (210, 0, 0)
            draw.rectangle([x, y + header, x + thumb - 1, y + header + thumb - 1], fill=color)
            canvas.paste(picture, (x + 3, y + header + 3))
            draw.text((x, y + header + thumb + 2), f"#{k + 1} {'correct' if correct else 'wrong'}", fill=color)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


def _shorten(text: str, width_px: int, char_px: int = 6) -> str:
    limit = max(width_px // char_px, 10)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_task(data: dict, model_cfg: X2VLMConfig, tokenizer: Tokenizer, where: str) -> FinetuneTask:
    """Retrieval fine-tuning on Karpathy-style (COCO, Flickr30K, Multi30K) or MSR-VTT-style (``video:
    true``) files, or xFlickr&CO / WIT JSON lines (``format``); evaluation files per language."""
    check_keys(data, DATA_KEYS, where)
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    train_files = data["train_files"]
    train_files = [train_files] if isinstance(train_files, str) else train_files
    if not isinstance(train_files, list) or not train_files or not all(isinstance(f, str) for f in train_files):
        raise ValueError(f"{where}: 'train_files' must be a non-empty list of file paths, got {data['train_files']!r}")
    video = bool_key(data, "video", False, where)
    frame_len = model_cfg.frame_len if video else 0
    if video and frame_len <= 0:
        raise ValueError(f"{where}: 'video' is true but model {model_cfg.name} has frame_len {model_cfg.frame_len}")
    data_format = string_key(data, "format", "karpathy", where)
    if data_format not in DATA_FORMATS:
        raise ValueError(f"{where}: key 'format' {data_format!r} unknown; one of {list(DATA_FORMATS)}")
    if video and data_format != "karpathy":
        raise ValueError(f"{where}: 'video' is true but format {data_format!r} holds images")
    image_root = image_root_key(data, data_format, where)
    hflip = data.get("hflip", True)
    if hflip not in HFLIP_MODES or (hflip != "swap" and not isinstance(hflip, bool)):
        raise ValueError(f"{where}: 'hflip' must be true (caption-aware), false or 'swap', got {hflip!r}")
    max_tokens = positive_int_key(data, "max_tokens", DEFAULT_MAX_TOKENS, where)
    if max_tokens < 3:
        raise ValueError(f"{where}: 'max_tokens' must leave room for a word besides [CLS] and [SEP], got {max_tokens}")
    settings = RerankSettings(
        k_test=positive_int_key(data, "k_test", DEFAULT_K_TEST, where),
        rerank_batch_size=positive_int_key(data, "rerank_batch_size", DEFAULT_RERANK_BATCH, where),
        max_cached_images=positive_int_key(data, "max_cached_images", DEFAULT_MAX_CACHED_IMAGES, where),
    )
    split_files = {"val": file_or_language_files(data["val_file"], "val_file", where),
                   "test": file_or_language_files(data["test_file"], "test_file", where),
                   **extra_eval_files_key(data, where, languages=True)}
    selection_metric = string_key(data, "selection_metric", "r_mean", where)
    known_metrics = [prefix + key for prefix in ("", "itc_", "itm_plus_itc_") for key in RECALL_KEYS]
    if isinstance(split_files["val"], dict):  # one language's metric may be chosen too
        known_metrics += [f"{language}{LANGUAGE_SEPARATOR}{key}" for language in split_files["val"] for key in known_metrics]
    if selection_metric not in known_metrics:
        raise ValueError(f"{where}: 'selection_metric' {selection_metric!r} unknown; one of {known_metrics}")
    vision_key = string_key(data, "vision_key", "video" if video else "image", where)
    index_key = string_key(data, "index_key", "video_id" if video else "image_id", where)
    text_key = string_key(data, "text_key", "caption", where)
    transform = FinetuneTrainTransform(model_cfg.image_res, scale=crop_scale_key(data, where), randaug=bool_key(data, "randaug", True, where),
                                       hflip=hflip is not False)
    train_set = load_train_set(train_files, image_root, transform, hflip, max_tokens, frame_len, index_key, vision_key, text_key,
                               data_format)

    def load(path: str) -> RetrievalEvalSet:
        return load_eval_set(path, image_root, model_cfg.image_res, tokenizer, max_tokens, frame_len, vision_key, text_key, data_format)

    eval_sets = {split: {language: load(path) for language, path in files.items()} if isinstance(files, dict) else load(files)
                 for split, files in split_files.items()}
    described = [f"{name} {len(s.vision)} x {len(s.texts)} texts" for split, sets in eval_sets.items()
                 for name, s in ({split: sets} if isinstance(sets, RetrievalEvalSet) else
                                 {f"{split}{LANGUAGE_SEPARATOR}{language}": s for language, s in sets.items()}).items()]
    log.info("retrieval: %d training pairs of %d %s; %s", len(train_set), len(set(train_set.ids)), "videos" if video else "images",
             ", ".join(described))
    task = RetrievalTask(eval_sets, settings)
    return FinetuneTask(
        name="retrieval",
        model_task="retrieval",
        train_set=train_set,
        collate=RetrievalCollate(tokenizer, max_tokens),
        loss=retrieval_loss,
        evaluate=task.evaluate,
        eval_splits=list(eval_sets),
        selection_metric=selection_metric,
        draw=task.draw,
        inference_files={"inference.json": {"task": "retrieval", "max_tokens": max_tokens, "k_test": settings.k_test,
                                            "video": video}},
    )
