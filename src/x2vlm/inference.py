"""Inference with a trained model: one handle for every task, computing what the evaluation computes.

    import x2vlm
    model = x2vlm.load("runs/ft/vqa_pre")                         # a model directory or a run directory
    model.answer("scene.png", "what color is the circle")        # -> Answer(answer='red', probability=..., top=[...])
    model.ground(image, "the red circle on the left")            # -> [x, y, w, h] in pixels of the image
    model.caption(["a.png", "b.png"], beams=3)                   # -> ["a red circle ...", "..."]
    model.match(images, texts)                                   # -> {"itm": (I, T), "itc": (I, T)} numpy arrays
    model.verify("left.png", "right.png", "both images contain a dog")  # NLVR2 -> Verdict(true=..., probability=...)
    model.entail(image, "two dogs play")                        # XVNLI -> Answer('entailment' / 'contradiction' / 'neutral')
    index = model.index(paths, kind="images"); index.save("gallery")
    model.index(paths, kind="images", keep_embeddings=True, out="gallery")  # streamed to disk, any size
    model.retrieve("a red circle", GalleryIndex.load("gallery"), k=5)   # -> [Hit(index, id, itc, itm), ...]

**Inputs.** An image is a PIL image, a path, the bytes of an image file or a ``uint8`` numpy array
``(H, W, 3)`` (``(H, W)`` grey and ``(H, W, 4)`` RGBA are converted); a list of those (or an
``(N, H, W, 3)`` array) is a batch. A video is a video file's path, a list of frames (PIL images or
arrays) or an ``(F, H, W, 3)`` array; a list of video paths or of frame lists is a batch (so a
frame list of *paths* must be given inside a batch: ``[[f0, f1, f2]]``). Texts are strings or lists
of strings. A single input gives a single result, a list a list. An unreadable file raises
``FileNotFoundError`` (missing) or ``ValueError`` (corrupt), naming the path; a wrong kind of input
raises ``TypeError``; a model without the head a method needs raises ``TaskMismatchError`` (a
``ValueError``) saying which task the model is and which one the method needs.

**The same pre-processing and computation as the evaluation.** Images go through the evaluation
transform (``data.transforms.EvalTransform``: bicubic resize to the model's ``image_res``, CLIP
normalisation); videos through ``data.video.read_clip`` (the evaluation frame positions,
``sample_frame_indices``) or, for frame lists, the same sampler over the list; texts through the
cleaning and the token limits of the task's evaluation (``pre_question`` with 50 words for
questions, ``pre_caption`` for captions and expressions). The task settings the evaluation used
(``max_tokens``, ``k_test``, the caption decoding settings and prompt, ...) are read from the
``inference.json`` that fine-tuning writes beside the selected weights (``best/``), together with
the VQA ``answer_list.json`` and the video-QA ``ans2label.json``; a directory without them (a
checkpoint, a converted official model) uses each task's defaults. The models then run the task
modules' own functions: ``vqa.encode_questions`` + ``generation.rank_answers``,
``model.predict_boxes`` + ``grounding.box_to_original_pixels``, ``captioning.generate_captions``,
``retrieval.encode_vision_range`` / ``encode_text_range`` / ``cached_itm_scores`` and the
evaluation's ITC top-``k_test`` candidate choice, ``video_qa.answer_logits``.

**Batching.** Calls work in batches of ``Model.batch_size``; texts are padded and masked, so a
result does not depend on what else is in the batch (up to float rounding, ~1e-6; rankings,
answers and caption ids are the same).

**Scores.** ``itc`` is the cosine similarity of the L2-normalised contrastive features (the
evaluation's first stage); ``itm`` the match logit (column 1 of the ITM head) that the evaluation
re-ranks by, not a probability. Answer probabilities are the evaluation's: for VQA the softmax
over the ``k_test`` re-ranked candidates, for video QA the softmax over all labels.

**Embeddings** (``embed_images`` / ``embed_texts`` / ``embed_videos``) are numpy float32 arrays of
L2-normalised ITC features, ``(N, embed_dim)`` for a batch, ``(embed_dim,)`` for one input.

**dtype.** ``None``/``"fp32"``: float32; ``"bf16"``: bfloat16 autocast around the model (matrix
products in bf16), on CPU or CUDA, as the evaluation runs with ``precision: bf16``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from x2vlm.checkpoint import _atomic_write, from_pretrained, infer_config, load_official, read_state_dict, resolve_trained_model_dir
from x2vlm.config import preset
from x2vlm.data.readers import read_ans2label, read_answer_list
from x2vlm.data.text import pre_caption, pre_question
from x2vlm.data.transforms import EvalTransform, as_rgb
from x2vlm.data.video import load_image, read_clip, sample_frame_indices
from x2vlm.generation import CaptionSettings, rank_answers
from x2vlm.models.x2vlm import X2VLM
from x2vlm.precision import autocast as precision_autocast
from x2vlm.tasks import captioning as captioning_task
from x2vlm.tasks import grounding as grounding_task
from x2vlm.tasks import nlvr as nlvr_task
from x2vlm.tasks import retrieval as retrieval_task
from x2vlm.tasks import video_qa as video_qa_task
from x2vlm.tasks import vqa as vqa_task
from x2vlm.tasks import xvnli as xvnli_task
from x2vlm.tokenizer import Tokenizer, load_tokenizer, model_tokenizer

log = logging.getLogger(__name__)

INFERENCE_FILE = "inference.json"
ANSWER_LIST_FILE = "answer_list.json"
ANS2LABEL_FILE = "ans2label.json"
DEFAULT_BATCH_SIZE = 64
INDEX_FORMAT = "x2vlm-gallery-index"
INDEX_VERSION = 1
INDEX_JSON, INDEX_TENSORS, INDEX_PROGRESS = "index.json", "index.safetensors", "index.progress.json"
INDEX_KINDS = ("images", "videos", "texts")
INDEX_CHUNK = 1024  # items per piece when an index is written to disk (one piece in memory at a time)
DTYPES = {None: "fp32", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
IMAGE_TYPES = "a PIL image, a path, image-file bytes or a uint8 (H, W, 3) numpy array"
VIDEO_TYPES = "a video file path, a list of frames (PIL images or uint8 arrays) or a uint8 (F, H, W, 3) array"


class TaskMismatchError(ValueError):
    """The loaded model lacks the head (the task) a method needs."""


# -- device and dtype ---------------------------------------------------------------------------------
def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; ``ValueError`` for anything else."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unsupported device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps' ({err})") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__}"
                             f"{'' if torch.backends.cuda.is_built() else ', a build without CUDA'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but there are {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available")
        return dev
    raise ValueError(f"unsupported device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> str:
    """``"fp32"`` or ``"bf16"`` (autocast) from None, ``"fp32"``/``"float32"``, ``"bf16"``/``"bfloat16"``
    or the torch dtypes; ``ValueError`` for others and for bf16 where autocast cannot run it."""
    if isinstance(dtype, torch.dtype):
        key = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype)
    else:
        key = DTYPES.get(dtype) if dtype is None or isinstance(dtype, str) else None
    if key is None:
        raise ValueError(f"unsupported dtype {dtype!r}: use None or 'fp32' (float32) or 'bf16' (bfloat16 autocast)")
    if key == "bf16":
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"dtype 'bf16' runs as bfloat16 autocast on 'cpu' or 'cuda', not on {device.type!r}")
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"dtype 'bf16' requested but {torch.cuda.get_device_name(device)} does not support bfloat16")
    return key


# -- inputs ---------------------------------------------------------------------------------------------
def _is_image(value: Any) -> bool:
    return isinstance(value, (Image.Image, str, os.PathLike, bytes, bytearray)) or (
        isinstance(value, np.ndarray) and value.ndim in (2, 3))


def _is_frame(value: Any) -> bool:
    return isinstance(value, (Image.Image, bytes, bytearray)) or (isinstance(value, np.ndarray) and value.ndim in (2, 3))


def read_image(image: Any) -> Image.Image:
    """An RGB PIL image from any accepted image input (see the module documentation)."""
    if isinstance(image, Image.Image):
        return as_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, is_path=True)  # FileNotFoundError / ValueError naming the path
    if isinstance(image, (bytes, bytearray)):
        return load_image(bytes(image), source="the given image bytes")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"a numpy image must be uint8 (H, W, 3), got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(f"a numpy image must be (H, W, 3) (or (H, W) grey, (H, W, 4) RGBA), got shape {image.shape}")
        return as_rgb(Image.fromarray(np.ascontiguousarray(image)))
    raise TypeError(f"an image must be {IMAGE_TYPES}, got {type(image).__name__}")


def read_video(video: Any, frame_len: int) -> list[Image.Image]:
    """The ``frame_len`` frames of a video that the evaluation sees: a file through ``read_clip``,
    a frame list (or (F, H, W, 3) array) through the same ``sample_frame_indices``."""
    if isinstance(video, (str, os.PathLike)):
        return read_clip(video, frame_len)  # errors name the file
    if isinstance(video, np.ndarray) and video.ndim == 4:
        frames = list(video)
    elif isinstance(video, (list, tuple)):
        frames = list(video)
    else:
        raise TypeError(f"a video must be {VIDEO_TYPES}, got {type(video).__name__}")
    if not frames:
        raise ValueError("a video needs at least one frame, got an empty frame list")
    return [read_image(frames[i]) for i in sample_frame_indices(len(frames), frame_len, training=False)]


def _image_batch(images: Any, what: str = "image") -> tuple[list, bool]:
    if _is_image(images):
        return [images], True
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images), False
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"no {what} given (an empty list)")
        return list(images), False
    raise TypeError(f"{what}: expected {IMAGE_TYPES}, or a list of them; got {type(images).__name__}")


def _video_batch(videos: Any) -> tuple[list, bool]:
    if isinstance(videos, (str, os.PathLike)) or (isinstance(videos, np.ndarray) and videos.ndim == 4):
        return [videos], True
    if isinstance(videos, (list, tuple)):
        if not videos:
            raise ValueError("no video given (an empty list)")
        if _is_frame(videos[0]):
            return [list(videos)], True
        return list(videos), False
    raise TypeError(f"video: expected {VIDEO_TYPES}, or a list of them; got {type(videos).__name__}")


def _text_batch(texts: Any, what: str = "text") -> tuple[list[str], bool]:
    if isinstance(texts, str):
        return [texts], True
    if isinstance(texts, (list, tuple)):
        if not texts:
            raise ValueError(f"no {what} given (an empty list)")
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is None:
            return list(texts), False
        raise TypeError(f"{what}: expected strings, got a {type(bad).__name__} in the list")
    raise TypeError(f"{what}: expected a string or a list of strings, got {type(texts).__name__}")


def _broadcast(num_items: int, single_item: bool, texts: list[str], single_text: bool, what: str) -> list[int]:
    """Item index of each text: one item for every text, one text for every item, or pairs."""
    if single_item:
        return [0] * len(texts)
    if single_text:
        texts *= num_items  # in place: the caller's list now has one text per item
        return list(range(num_items))
    if num_items != len(texts):
        raise ValueError(f"{num_items} {what}s but {len(texts)} texts: give one of each, one of either, or equally many")
    return list(range(num_items))


def _slots(item_index: list[int], rows: range) -> tuple[list[int], list[int]]:
    """The distinct items of a batch's ``rows`` (each encoded once) and each row's place among them."""
    slots = list(dict.fromkeys(item_index[r] for r in rows))
    return slots, [slots.index(item_index[r]) for r in rows]


def _clean_captions(texts: Sequence[str], max_words: int, what: str) -> list[str]:
    cleaned = []
    for k, text in enumerate(texts):
        try:
            cleaned.append(pre_caption(text, max_words))
        except ValueError:
            raise ValueError(f"{what} {k} ({text!r}) has no words left after cleaning") from None
    return cleaned


@dataclass
class _Inputs:
    """User inputs as a ``retrieval.VisionSource``: test-transformed when loaded (``frame_len`` > 0: videos)."""

    items: list
    res: int
    frame_len: int = 0
    dtype: torch.dtype = torch.float32  # the model's parameters'

    def __len__(self) -> int:
        return len(self.items)

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        transform = EvalTransform(self.res)
        if self.frame_len:
            pixels = torch.stack([transform.clip(read_video(self.items[i], self.frame_len)) for i in indices])
        else:
            pixels = torch.stack([transform(read_image(self.items[i])) for i in indices])
        return pixels.to(self.dtype)


# -- results --------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """The best answer, its probability and the ``top_k`` best (answer, probability), best first."""

    answer: str
    probability: float
    top: list[tuple[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "probability": self.probability,
                "top": [{"answer": a, "probability": p} for a, p in self.top]}


@dataclass
class Verdict:
    """Whether a statement is true of an image pair (NLVR2): the evaluation's argmax, and the
    softmax probability of "true"."""

    true: bool
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Hit:
    """One retrieved gallery item: its position in the gallery, its id, the ITC similarity and the
    ITM match logit (None beyond the ``k_test`` re-ranked candidates)."""

    index: int
    id: Any
    itc: float
    itm: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- gallery index --------------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file (name -> dtype, shape, data_offsets) and where its data
    starts, read without mapping the file (a gallery index can be larger than the address space
    the system lets a process map)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header size)")
        (size,) = struct.unpack("<Q", head)
        if size > os.fstat(f.fileno()).st_size - 8:
            raise ValueError(f"{path}: not a safetensors file (header size {size} beyond the file's end)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file (header: {err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a mapping)")
    header.pop("__metadata__", None)
    return header, 8 + size


class StoredRows:
    """A tensor of a safetensors file read row by row when indexed (``rows[used]``), never whole: the
    vision embeddings of a loaded gallery index, which for a large gallery exceed the memory (100,000
    x-base images: 197 x 768 values each, 30 GB in bfloat16). Indexing with a 1-D tensor or list of
    row numbers reads those rows (each run of consecutive rows in one read, with plain file reads:
    the file is never mapped); ``load()`` reads all."""

    def __init__(self, path: str | Path, name: str):
        self.path, self.name = str(path), name
        header, data_start = read_safetensors_header(self.path)
        if name not in header:
            raise ValueError(f"{self.path}: no tensor {name!r} (holds {sorted(header)})")
        entry = header[name]
        dtypes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
        if entry.get("dtype") not in dtypes:
            raise ValueError(f"{self.path}: {name} stored as {entry.get('dtype')}, not one of {sorted(dtypes)}")
        self.dtype = dtypes[entry["dtype"]]
        self.shape = torch.Size(entry["shape"])
        first, last = entry["data_offsets"]
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if last - first != self.shape[0] * self.row_bytes:
            raise ValueError(f"{self.path}: {name} has {last - first} bytes for shape {tuple(self.shape)} of {self.dtype}")
        self.offset = data_start + first

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= self.shape[0]):
            raise IndexError(f"{self.path}: rows {rows.tolist()} outside the {self.shape[0]} stored {self.name}")
        order = torch.argsort(rows)
        wanted = rows[order].tolist()
        out = torch.empty((len(rows),) + tuple(self.shape[1:]), dtype=self.dtype)
        with open(self.path, "rb") as f:
            start = 0
            while start < len(wanted):
                end = start + 1
                while end < len(wanted) and wanted[end] <= wanted[end - 1] + 1:
                    end += 1
                first, last = wanted[start], wanted[end - 1]
                block = self._read(f, first, last + 1)  # one read for a run of rows
                out[order[start:end]] = block[torch.tensor(wanted[start:end]) - first]
                start = end
        return out

    def _read(self, f, first: int, stop: int) -> torch.Tensor:
        block = torch.empty((stop - first,) + tuple(self.shape[1:]), dtype=self.dtype)
        f.seek(self.offset + first * self.row_bytes)
        view = block.view(-1).view(torch.uint8).numpy()
        if f.readinto(view) != view.nbytes:
            raise ValueError(f"{self.path}: {self.name} ends early (rows {first}-{stop - 1} of {self.shape[0]})")
        return block

    def load(self) -> torch.Tensor:
        with open(self.path, "rb") as f:
            return self._read(f, 0, self.shape[0])


@dataclass
class GalleryIndex:
    """Embedded gallery items for ``Model.retrieve``: ITC features and ids, plus what the ITM
    re-ranking needs: the items' sources (image / video paths, or the texts) from which the
    candidates are encoded again, and/or the vision embeddings themselves (``vision_embeds``, kept
    when asked or when an item is not a file). ``fingerprint`` identifies the model that built it.

    ``save(dir)`` writes ``index.json`` (kind, ids, sources, settings) and ``index.safetensors``
    (``features`` and, if kept, ``vision_embeds``/``vision_mask``); ``GalleryIndex.load(dir)`` reads
    them back, the vision embeddings as ``StoredRows``: each query reads its candidates' rows from
    the file, so a gallery's embeddings need not fit in memory (``load(dir, lazy=False)`` reads them
    all). Saving an index loaded that way reads its embeddings into memory."""

    kind: str  # images | videos | texts
    ids: list
    features: torch.Tensor  # (N, E) float32, L2-normalised
    sources: list[str | None]
    fingerprint: str
    max_tokens: int
    frame_len: int = 0
    vision_embeds: torch.Tensor | StoredRows | None = None  # (N, 1+P, D) float32 or bfloat16
    vision_mask: torch.Tensor | None = None  # (N, 1+P)

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: str | Path) -> Path:
        """Write ``index.safetensors`` and ``index.json`` into the directory ``path`` (each file
        atomically), ``INDEX_CHUNK`` items at a time: stored embeddings read lazily (``StoredRows``)
        are copied piece by piece, never held whole."""

        def pieces(first: int) -> Iterator[dict[str, torch.Tensor]]:
            for start in range(first, max(len(self), 1), INDEX_CHUNK):
                rows = torch.arange(start, min(start + INDEX_CHUNK, len(self)))
                piece = {"features": self.features[rows]}
                if self.vision_embeds is not None:
                    piece["vision_embeds"] = self.vision_embeds[rows]
                    piece["vision_mask"] = self.vision_mask[rows]
                yield piece

        return write_gallery_index(path, self._meta(), pieces)

    def _meta(self) -> dict[str, Any]:
        return index_meta(self.kind, self.ids, self.sources, self.fingerprint, self.max_tokens, self.frame_len)

    @classmethod
    def load(cls, path: str | Path, lazy: bool = True) -> GalleryIndex:
        """``lazy``: stored vision embeddings stay in the file (``StoredRows``) until a query reads its
        candidates' rows."""
        directory = Path(path)
        if not (directory / INDEX_JSON).is_file() or not (directory / INDEX_TENSORS).is_file():
            raise FileNotFoundError(f"{directory}: not a gallery index (needs {INDEX_JSON} and {INDEX_TENSORS})")
        try:
            meta = json.loads((directory / INDEX_JSON).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{directory / INDEX_JSON}: not valid JSON ({err})") from None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise ValueError(f"{directory / INDEX_JSON}: not a version-{INDEX_VERSION} {INDEX_FORMAT} file")
        tensor_file = str(directory / INDEX_TENSORS)
        names = read_safetensors_header(tensor_file)[0]
        tensors: dict[str, Any] = {name: StoredRows(tensor_file, name) for name in names}
        tensors = {name: rows if name == "vision_embeds" and lazy else rows.load() for name, rows in tensors.items()}
        index = cls(meta["kind"], meta["ids"], tensors["features"], meta["sources"], meta["fingerprint"], meta["max_tokens"],
                    meta["frame_len"], tensors.get("vision_embeds"), tensors.get("vision_mask"))
        index.check(str(directory))
        return index

    def check(self, where: str = "gallery index") -> None:
        """Consistency of kind, sizes and sources (what ``load`` checks)."""
        n = len(self.ids)
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {INDEX_KINDS}")
        if self.features.dim() != 2 or self.features.shape[0] != n or len(self.sources) != n:
            raise ValueError(f"{where}: {n} ids, features {tuple(self.features.shape)}, {len(self.sources)} sources")
        if self.vision_embeds is not None and (self.vision_embeds.shape[0] != n or self.vision_mask is None):
            raise ValueError(f"{where}: vision_embeds {tuple(self.vision_embeds.shape)} for {n} items")
        if self.vision_embeds is None and any(s is None for s in self.sources):
            raise ValueError(f"{where}: items without a source need stored vision embeddings")


def index_meta(kind: str, ids: list, sources: list[str | None], fingerprint: str, max_tokens: int, frame_len: int) -> dict[str, Any]:
    """What ``index.json`` holds."""
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": kind, "fingerprint": fingerprint,
            "max_tokens": max_tokens, "frame_len": frame_len, "ids": ids, "sources": sources}


class StalePartialFile(ValueError):
    """A partly written file whose layout is not the one being written now."""


def write_rows_safetensors(path: str | Path, rows: int, pieces: Iterable[dict[str, torch.Tensor]],
                           metadata: dict[str, str] | None = None, resume_from: int = 0,
                           on_piece: Callable[[int], None] | None = None) -> None:
    """A safetensors file of tensors that all have ``rows`` rows, written piece by piece: ``pieces``
    yields, in row order, dicts name -> the next rows of every tensor (the same names each time).
    The header comes from the first piece (names, dtypes, row shapes); each piece is written at its
    place in the file and dropped, so a file far larger than the memory can be written.

    ``resume_from``: the rows before it are already in the file at ``path`` (an interrupted write;
    ``pieces`` starts at that row), whose header must be the one this write makes, else
    ``StalePartialFile``. ``on_piece(rows_done)`` runs after each piece is on disk (flushed and
    synced)."""
    pieces = iter(pieces)
    first = next(pieces, None)
    if first is None:
        raise ValueError(f"{path}: no rows to write")
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    places, offset = {}, 0
    for name, tensor in first.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{path}: {name} has dtype {tensor.dtype}, not one of {sorted(map(str, SAFETENSORS_DTYPES))}")
        row_shape = tuple(tensor.shape[1:])
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": [rows, *row_shape],
                        "data_offsets": [offset, offset + rows * row_bytes]}
        places[name] = (offset, row_bytes, tensor.dtype, row_shape)
        offset += rows * row_bytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    done = resume_from
    head = struct.pack("<Q", len(blob)) + blob
    with open(path, "r+b" if resume_from else "wb") as f:
        if resume_from:
            if f.read(len(head)) != head or os.fstat(f.fileno()).st_size != len(head) + offset:
                raise StalePartialFile(f"{path}: the partly written file has another layout than this write")
        else:
            f.write(head)
            f.truncate(len(head) + offset)
        start = len(head)
        for piece in itertools.chain([first], pieces):
            if piece.keys() != places.keys():
                raise ValueError(f"{path}: a piece holds {sorted(piece)}, the first held {sorted(places)}")
            count = {len(t) for t in piece.values()}
            if len(count) != 1:
                raise ValueError(f"{path}: a piece's tensors have different numbers of rows ({sorted(count)})")
            count = count.pop()
            if done + count > rows:
                raise ValueError(f"{path}: more than the {rows} rows announced")
            for name, tensor in piece.items():
                place, row_bytes, dtype, row_shape = places[name]
                if tensor.dtype != dtype or tuple(tensor.shape[1:]) != row_shape:
                    raise ValueError(f"{path}: {name} piece {tensor.dtype} {tuple(tensor.shape)}, the first was {dtype} rows of {row_shape}")
                f.seek(start + place + done * row_bytes)
                f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
            done += count
            if on_piece is not None:
                f.flush()
                os.fsync(f.fileno())
                on_piece(done)
    if done != rows:
        raise ValueError(f"{path}: {done} rows written, {rows} announced")


def write_gallery_index(path: str | Path, meta: dict[str, Any], pieces: Callable[[int], Iterator[dict[str, torch.Tensor]]]) -> Path:
    """The directory ``path`` with ``index.safetensors`` (``pieces(first_item)``: from that item on,
    the items' ``features`` and, if kept, ``vision_embeds`` / ``vision_mask``, in item order) and
    ``index.json`` (``meta``, with one id per item); what ``GalleryIndex.save`` and
    ``Model.index(out=...)`` use. The tensors go to ``index.safetensors.partial`` with the number of
    items written so far in ``index.progress.json`` after each piece; an interrupted write called
    again with the same ``meta`` (and the same stored layout) continues after the last piece on disk
    (indexing 100,000 x-base images takes hours here), and the finished file replaces
    ``index.safetensors`` at once."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    rows = len(meta["ids"])
    partial, progress = directory / (INDEX_TENSORS + ".partial"), directory / INDEX_PROGRESS
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    start = 0
    if partial.is_file() and progress.is_file():
        with contextlib.suppress(ValueError, OSError):
            state = json.loads(progress.read_text())
            if isinstance(state, dict) and state.get("meta_sha256") == key and isinstance(state.get("rows"), int) and 0 < state["rows"] < rows:
                start = state["rows"]
                log.info("%s: resuming an interrupted index at item %d of %d", directory, start, rows)

    def written(done: int) -> None:
        _atomic_write(progress, lambda tmp: Path(tmp).write_text(json.dumps({"meta_sha256": key, "rows": done}) + "\n"))

    try:
        write_rows_safetensors(partial, rows, pieces(start), {"format": "pt"}, resume_from=start, on_piece=written)
    except StalePartialFile:
        log.info("%s: the interrupted index has another layout (embeddings kept or dtype changed): starting over", directory)
        write_rows_safetensors(partial, rows, pieces(0), {"format": "pt"}, on_piece=written)
    with open(partial, "rb") as f:
        os.fsync(f.fileno())
    os.replace(partial, directory / INDEX_TENSORS)
    _atomic_write(directory / INDEX_JSON, lambda tmp: Path(tmp).write_text(json.dumps(meta) + "\n"))
    progress.unlink(missing_ok=True)
    return directory


def model_fingerprint(model: X2VLM) -> str:
    """A short hash of the contrastive projections and the input geometry: features of different
    models (or resolutions) are not comparable."""
    h = hashlib.sha256(json.dumps([model.cfg.image_res, model.cfg.embed_dim, model.cfg.frame_len]).encode())
    for name in ("vision_proj", "text_proj"):
        h.update(getattr(model, name).weight.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# -- the model handle -----------------------------------------------------------------------------------
def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         batch_size: int = DEFAULT_BATCH_SIZE, preset: str | None = None, task: str | None = None,
         tokenizer: str | Path | None = None, allow_unsafe_pickle: bool = False) -> Model:
    """A model for inference.

    ``path`` is one of our model directories, a run directory (a fine-tuning run's ``best/``, else its
    latest checkpoint), or an official checkpoint file (``.th``/``.pth``/``.bin``/``.safetensors``), which
    needs ``preset`` (its architecture, e.g. ``"x2vlm-base"``; sizes the file decides, such as the
    resolution or the number of labels, are read from its tensors) and ``task`` when the file is a
    pre-training checkpoint used for a task. The tokenizer is the directory's own (``vocab.txt``,
    ``tokenizer.json`` or ``sentencepiece.bpe.model``), else ``tokenizer``, else the config's. An official
    file carries no evaluation settings, so each task's defaults apply (pass ``answers=`` for VQA).
    ``device`` 'cpu', 'cuda[:N]' or 'mps'; ``dtype`` None/'fp32' or 'bf16'."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory or checkpoint not found: {path}")
    dev = resolve_device(device)
    precision = resolve_dtype(dtype, dev)
    if path.is_file() and path.name != "latest":
        model = _official_model(path, preset, task, allow_unsafe_pickle)
        return Model(model.to(dev), load_tokenizer(tokenizer or model.cfg.tokenizer), None, precision, batch_size)
    directory = resolve_trained_model_dir(path)
    model = from_pretrained(directory).to(dev)
    model_tok = model_tokenizer(directory, str(tokenizer) if tokenizer else model.cfg.tokenizer)
    return Model(model, model_tok, directory, precision, batch_size)


def _official_model(path: Path, preset_name: str | None, task: str | None, allow_unsafe_pickle: bool) -> X2VLM:
    """An official checkpoint file loaded strictly into the model its preset and tensors describe."""
    if preset_name is None:
        raise ValueError(f"{path} is a checkpoint file: x2vlm.load needs preset= (its architecture, e.g. 'x2vlm-base') "
                         f"to read it (or convert it once: x2vlm convert {path} OUT_DIR --preset x2vlm-base)")
    state = read_state_dict(path, allow_unsafe_pickle=allow_unsafe_pickle)
    cfg = infer_config(state, preset(preset_name))
    if task is not None:
        cfg = cfg.replace(task=task)
    model = X2VLM(cfg)
    new = load_official(model, state)
    if new:
        log.warning("%s: not in the checkpoint, newly initialised (task %s): %s", path, cfg.task, ", ".join(new))
    return model


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


class Model:
    """A trained X²-VLM with its tokenizer and the evaluation settings of its task.

    ``directory`` (optional) is where ``inference.json``, ``answer_list.json`` and ``ans2label.json``
    are looked for; ``settings`` (the content of ``inference.json``) overrides that file."""

    def __init__(self, model: X2VLM, tokenizer: Tokenizer, directory: str | Path | None = None,
                 dtype: str | torch.dtype | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 settings: dict[str, Any] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.directory = Path(directory) if directory is not None else None
        self.device = next(model.parameters()).device
        self._param_dtype = next(model.parameters()).dtype
        self.dtype = resolve_dtype(dtype, self.device)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        if settings is None and self.directory is not None and (self.directory / INFERENCE_FILE).is_file():
            settings = _read_json(self.directory / INFERENCE_FILE)
        if settings is not None and not isinstance(settings, dict):
            raise ValueError(f"{self._where}: {INFERENCE_FILE} must hold a JSON object, got {type(settings).__name__}")
        self.settings: dict[str, Any] = dict(settings or {})
        self._answer_tokens: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._fingerprint: str | None = None

    # -- basics ------------------------------------------------------------------------------------
    @property
    def cfg(self):
        return self.model.cfg

    @property
    def task(self) -> str:
        return self.cfg.task

    @property
    def _where(self) -> str:
        return str(self.directory) if self.directory is not None else "the model"

    def __repr__(self) -> str:
        return (f"Model({self._where}: task {self.task!r}, {self.cfg.name}, {self.cfg.image_res} px, "
                f"{self.device}, {self.dtype})")

    def _autocast(self):
        return precision_autocast(self.dtype, self.device)

    def _mismatch(self, method: str, needs: str) -> TaskMismatchError:
        heads = ", ".join(self.cfg.heads)
        return TaskMismatchError(f"{method} needs {needs}; {self._where} is a {self.task!r} model (heads: {heads})")

    def _require_heads(self, method: str, heads: Sequence[str], needs: str) -> None:
        if not set(heads) <= set(self.cfg.heads):
            raise self._mismatch(method, needs)

    def _require_video(self, method: str) -> None:
        if self.cfg.frame_len <= 0:
            raise TaskMismatchError(f"{method} needs a video model (frame_len > 0); {self._where} has frame_len "
                                    f"{self.cfg.frame_len}")

    def _saved(self, *keys: str) -> dict[str, Any]:
        return {k: self.settings[k] for k in keys if k in self.settings}

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield range(start, min(start + self.batch_size, n))

    def _pixels(self, items: list, indices: Sequence[int], frame_len: int = 0) -> torch.Tensor:
        return _Inputs(items, self.cfg.image_res, frame_len, self._param_dtype).load(indices).to(self.device)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    # -- NLVR2 ---------------------------------------------------------------------------------------
    def nlvr_settings(self) -> tuple[int, int]:
        """The NLVR2 evaluation's ``max_tokens`` and ``max_words`` (saved ones, else the task's defaults)."""
        saved = self._saved("max_tokens", "max_words")
        return saved.get("max_tokens", nlvr_task.DEFAULT_MAX_TOKENS), saved.get("max_words", nlvr_task.DEFAULT_MAX_WORDS)

    def verify(self, left, right, statement) -> Verdict | list[Verdict]:
        """Is a statement true of a pair of images (an NLVR2 model, task 'nlvr')? ``left`` and
        ``right``: one image each, or equally long lists (pair k = ``left[k]``, ``right[k]``);
        ``statement``: one for every pair, or one per pair (a single pair may take several). As the
        evaluation: test transform, ``pre_caption`` and the saved token limits, ``nlvr_logits``
        (both images' fused CLS vectors into the head), true where the "true" logit is the larger."""
        if self.task != "nlvr":
            raise self._mismatch("verify()", "an NLVR2 model (task 'nlvr')")
        lefts, single_left = _image_batch(left, "left image")
        rights, single_right = _image_batch(right, "right image")
        if single_left != single_right or len(lefts) != len(rights):
            raise ValueError(f"{len(lefts)} left and {len(rights)} right images: give one of each or equally long lists")
        statements, single_statement = _text_batch(statement, "statement")
        pair_index = _broadcast(len(lefts), single_left, statements, single_statement, "image pair")
        max_tokens, max_words = self.nlvr_settings()
        ids, mask = self.tokenizer(_clean_captions(statements, max_words, "statement"), max_length=max_tokens)
        probabilities = []
        for rows in self._batches(len(statements)):
            pairs = [pair_index[r] for r in rows]
            with torch.no_grad(), self._autocast():
                logits = self.model.nlvr_logits(self._pixels(lefts, pairs), self._pixels(rights, pairs),
                                                ids[rows.start : rows.stop].to(self.device), mask[rows.start : rows.stop].to(self.device))
            probabilities.append(logits.float().softmax(dim=-1).cpu())
        probs = torch.cat(probabilities)
        verdicts = [Verdict(bool(p.argmax() == 1), float(p[1])) for p in probs]
        return verdicts[0] if single_left and single_statement else verdicts

    def entail(self, image, hypothesis) -> Answer | list[Answer]:
        """Does an image entail, contradict or leave open a hypothesis (an XVNLI model: task
        'classification' with the three labels, saved by XVNLI fine-tuning or with no saved task)? One image and several hypotheses,
        several images and one, or pairs. As the evaluation: test transform, ``pre_caption`` and the
        saved token limits, the head on the fused CLS; ``Answer.answer`` is the argmax label
        ('contradiction', 'entailment' or 'neutral'), ``top`` all three by probability."""
        if (self.task != "classification" or self.cfg.num_labels != len(xvnli_task.LABEL_NAMES)
                or self.settings.get("task", "xvnli") != "xvnli"):
            raise self._mismatch("entail()", f"an XVNLI model (task 'classification' with 3 labels; saved task "
                                             f"{self.settings.get('task', 'none')!r})")
        images, single_image = _image_batch(image)
        hypotheses, single_hypothesis = _text_batch(hypothesis, "hypothesis")
        image_index = _broadcast(len(images), single_image, hypotheses, single_hypothesis, "image")
        saved = self._saved("max_tokens", "max_words")
        max_tokens = saved.get("max_tokens", xvnli_task.DEFAULT_MAX_TOKENS)
        ids, mask = self.tokenizer(_clean_captions(hypotheses, saved.get("max_words", xvnli_task.DEFAULT_MAX_WORDS), "hypothesis"),
                                   max_length=max_tokens)
        results = []
        for rows in self._batches(len(hypotheses)):
            slots, which = _slots(image_index, rows)
            which = torch.tensor(which, device=self.device)
            with torch.no_grad(), self._autocast():
                logits = xvnli_task.xvnli_logits(self.model, self._pixels(images, slots), ids[rows.start : rows.stop].to(self.device),
                                                 mask[rows.start : rows.stop].to(self.device), which)
            probs, best = logits.float().softmax(dim=-1).sort(dim=-1, descending=True)
            results.extend(_answers(xvnli_task.LABEL_NAMES, best.cpu(), probs.cpu()))
        return results[0] if single_image and single_hypothesis else results

    # -- VQA / video QA ------------------------------------------------------------------------------
    def answer(self, image, question, top_k: int = 1, answers: Sequence[str] | None = None,
               k_test: int | None = None) -> Answer | list[Answer]:
        """Answer questions about images (a VQA model) or videos (a video-QA model, task
        'classification'): one image and several questions, several images and one question, or
        pairs. VQA ranks the answer list exactly as the evaluation does (``answers``, else the
        directory's ``answer_list.json``; the ``k_test`` answers with the most probable first token,
        re-scored by their sequence likelihood); video QA takes the classifier's top labels
        (``answers``: the label names in label order, else ``ans2label.json``)."""
        if self.task == "vqa":
            return self._answer_vqa(image, question, top_k, answers, k_test)
        if self.task == "classification" and self.cfg.frame_len > 0:
            return self._answer_video(image, question, top_k, answers)
        raise self._mismatch("answer()", "a VQA model (task 'vqa') or a video-QA model (task 'classification')")

    def vqa_settings(self, k_test: int | None = None) -> vqa_task.VQASettings:
        """The VQA evaluation settings (saved ones, else the task's defaults)."""
        settings = vqa_task.VQASettings(res=self.cfg.image_res, **self._saved("max_tokens", "k_test", "double_count_first_token"))
        if k_test is not None:
            settings = dataclasses.replace(settings, k_test=_positive(k_test, "k_test"))
        return settings

    def answer_list(self, answers: Sequence[str] | None = None) -> list[str]:
        if answers is not None:
            answers = list(answers)
            if not answers or not all(isinstance(a, str) and a for a in answers):
                raise ValueError("answers must be a non-empty list of non-empty strings")
            return answers
        path = self.directory / ANSWER_LIST_FILE if self.directory is not None else None
        if path is None or not path.is_file():
            raise ValueError(f"{self._where} has no {ANSWER_LIST_FILE} (fine-tuning writes it into best/); pass answers=[...]")
        return read_answer_list(path)

    def _answer_vqa(self, image, question, top_k, answers, k_test):
        images, single_image = _image_batch(image)
        questions, single_question = _text_batch(question, "question")
        image_index = _broadcast(len(images), single_image, questions, single_question, "image")
        answer_list = self.answer_list(answers)
        settings = self.vqa_settings(k_test)
        ranked = min(settings.k_test, len(answer_list))
        _check_top_k(top_k, ranked, f"the {ranked} answers the evaluation re-ranks (k_test {settings.k_test}, "
                                    f"{len(answer_list)} answers); pass k_test= to re-rank more")
        key = tuple(answer_list)
        if key not in self._answer_tokens:
            ids, mask = self.tokenizer(answer_list)
            self._answer_tokens = {key: (ids.to(self.device), mask.to(self.device))}
        answer_ids, answer_mask = self._answer_tokens[key]
        cleaned = [pre_question(q, vqa_task.EVAL_QUESTION_WORDS) for q in questions]
        results = []
        for rows in self._batches(len(cleaned)):
            slots, which = _slots(image_index, rows)
            pixels = self._pixels(images, slots)
            which = torch.tensor(which, device=self.device)
            q_ids, q_mask = self.tokenizer([cleaned[r] for r in rows], max_length=settings.max_tokens)
            q_ids, q_mask = q_ids.to(self.device), q_mask.to(self.device)
            with torch.no_grad(), self._autocast():
                states = vqa_task.encode_questions(self.model, pixels, q_ids, q_mask, which)
                best, probs = rank_answers(self.model, states, q_mask, answer_ids, answer_mask, settings.k_test,
                                           settings.double_count_first_token)
            results.extend(_answers(answer_list, best[:, :top_k].cpu(), probs[:, :top_k].float().cpu()))
        return results[0] if single_image and single_question else results

    def _answer_video(self, video, question, top_k, answers):
        videos, single_video = _video_batch(video)
        questions, single_question = _text_batch(question, "question")
        video_index = _broadcast(len(videos), single_video, questions, single_question, "video")
        labels = self.label_names(answers)
        _check_top_k(top_k, len(labels), f"the model's {len(labels)} answers")
        settings = video_qa_task.VideoQASettings(self.cfg.image_res, self.cfg.frame_len, **self._saved("max_tokens"))
        cleaned = [pre_question(q, video_qa_task.EVAL_QUESTION_WORDS) for q in questions]
        results = []
        for rows in self._batches(len(cleaned)):
            slots, which = _slots(video_index, rows)
            pixels = self._pixels(videos, slots, settings.frame_len)
            which = torch.tensor(which, device=self.device)
            ids, mask = self.tokenizer([cleaned[r] for r in rows], max_length=settings.max_tokens)
            with torch.no_grad(), self._autocast():
                logits = video_qa_task.answer_logits(self.model, pixels, ids.to(self.device), mask.to(self.device), which)
            probs, best = logits.float().softmax(dim=-1).topk(top_k, dim=-1)
            results.extend(_answers(labels, best.cpu(), probs.cpu()))
        return results[0] if single_video and single_question else results

    def label_names(self, answers: Sequence[str] | None = None) -> list[str]:
        """The video-QA answers in label order (``answers``, else the directory's ``ans2label.json``)."""
        if answers is not None:
            labels = list(answers)
        else:
            path = self.directory / ANS2LABEL_FILE if self.directory is not None else None
            if path is None or not path.is_file():
                raise ValueError(f"{self._where} has no {ANS2LABEL_FILE} (fine-tuning writes it into best/); pass "
                                 "answers=[the answers in label order]")
            labels = [a for a, _ in sorted(read_ans2label(path).items(), key=lambda pair: pair[1])]
        if len(labels) != self.cfg.num_labels:
            raise ValueError(f"{len(labels)} answer names for a classifier of {self.cfg.num_labels} labels")
        return labels

    # -- grounding -----------------------------------------------------------------------------------
    def grounding_settings(self) -> grounding_task.GroundingSettings:
        return grounding_task.GroundingSettings(res=self.cfg.image_res, **self._saved("max_tokens", "max_words"))

    def ground(self, image, expression) -> list[float] | list[list[float]]:
        """The box ``[x, y, w, h]`` (pixels of the given image, as the grounding evaluation maps its
        predictions back) of the region each expression refers to."""
        self._require_heads("ground()", ("bbox",), "a model with the box head (task 'grounding' or 'pretrain')")
        images, single_image = _image_batch(image)
        expressions, single_expression = _text_batch(expression, "expression")
        image_index = _broadcast(len(images), single_image, expressions, single_expression, "image")
        settings = self.grounding_settings()
        cleaned = _clean_captions(expressions, settings.max_words, "expression")
        transform = EvalTransform(settings.res)
        boxes: list[list[float]] = []
        for rows in self._batches(len(cleaned)):
            slots, which = _slots(image_index, rows)
            originals = [read_image(images[s]) for s in slots]
            pixels = torch.stack([transform(img) for img in originals]).to(self.device, self._param_dtype)
            ids, mask = self.tokenizer([cleaned[r] for r in rows], max_length=settings.max_tokens)
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.no_grad(), self._autocast():
                embeds, _ = self.model.encode_images(pixels)
                pred = self.model.predict_boxes(embeds[torch.tensor(which, device=self.device)],
                                                self.model.encode_text(ids, mask), mask)
            sizes = np.array([originals[w].size for w in which], dtype=np.float64)
            boxes.extend(grounding_task.box_to_original_pixels(pred.float(), sizes[:, 0], sizes[:, 1]).tolist())
        return boxes[0] if single_image and single_expression else boxes

    # -- captioning ----------------------------------------------------------------------------------
    def caption_settings(self, settings: CaptionSettings | None = None, beams: int | None = None,
                         max_length: int | None = None, min_length: int | None = None,
                         greedy: bool | None = None) -> CaptionSettings:
        """The decoding settings: ``settings``, else the saved ones, else the captioning task's
        defaults; then the given overrides (``beams`` implies beam search unless ``greedy`` is given)."""
        if settings is None:
            saved = self.settings.get("generation")
            settings = CaptionSettings(**saved) if saved else captioning_task.generation_settings({}, "captioning defaults")
        changes: dict[str, Any] = {}
        if beams is not None:
            changes["num_beams"] = _positive(beams, "beams")
            changes["greedy"] = False
        if max_length is not None:
            changes["max_new_tokens"] = _positive(max_length, "max_length")
        if min_length is not None:
            if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
                raise ValueError(f"min_length must be an integer >= 0, got {min_length!r}")
            changes["min_length"] = min_length
        if greedy is not None:
            changes["greedy"] = bool(greedy)
        return dataclasses.replace(settings, **changes)

    def caption(self, image, beams: int | None = None, max_length: int | None = None, min_length: int | None = None,
                greedy: bool | None = None, settings: CaptionSettings | None = None, prompt: str | None = None) -> str | list[str]:
        """Captions (a captioning model), decoded exactly as the captioning evaluation decodes:
        ``generation.CaptionSettings`` from ``caption_settings(...)``, the prompt of the fine-tuning
        (``prompt`` overrides it) removed from the text."""
        if self.task != "captioning":
            raise self._mismatch("caption()", "a captioning model (task 'captioning')")
        images, single = _image_batch(image)
        gen = self.caption_settings(settings, beams, max_length, min_length, greedy)
        prompt_ids = self.prompt_ids(prompt)
        captions: list[str] = []
        for rows in self._batches(len(images)):
            pixels = self._pixels(images, rows)
            with torch.no_grad(), self._autocast():
                captions.extend(captioning_task.generate_captions(self.model, pixels, prompt_ids, gen, self.tokenizer))
        return captions[0] if single else captions

    def prompt_ids(self, prompt: str | None = None) -> torch.Tensor:
        """``[CLS]`` + the prompt's pieces (no ``[SEP]``), as the captioning task builds them."""
        text = prompt if prompt is not None else self.settings.get("prompt", captioning_task.DEFAULT_PROMPT)
        return torch.tensor(self.tokenizer.encode_one(text)[:-1])

    # -- contrastive features, matching, retrieval ----------------------------------------------------
    def retrieval_settings(self, k_test: int | None = None) -> tuple[int, int]:
        """``(max_tokens, k_test)`` of the retrieval evaluation (saved, else the task's defaults)."""
        max_tokens = self.settings.get("max_tokens", retrieval_task.DEFAULT_MAX_TOKENS)
        if k_test is None:
            k_test = self.settings.get("k_test", retrieval_task.DEFAULT_K_TEST)
        elif isinstance(k_test, bool) or not isinstance(k_test, int) or k_test < 0:
            raise ValueError(f"k_test must be an integer >= 0 (0: ITC only), got {k_test!r}")
        return max_tokens, k_test

    def _caption_tokens(self, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(_clean_captions(texts, max_tokens, "text"), max_length=max_tokens)

    def _encode_vision(self, items: list, frame_len: int, keep_embeds: bool = True):
        source = _Inputs(items, self.cfg.image_res, frame_len, self._param_dtype)
        with torch.no_grad(), self._autocast():
            return retrieval_task.encode_vision_range(self.model, source, range(len(source)), self.batch_size, keep_embeds)

    def _encode_texts(self, ids: torch.Tensor, mask: torch.Tensor):
        with torch.no_grad(), self._autocast():
            return retrieval_task.encode_text_range(self.model, ids, mask, range(len(ids)), self.batch_size)

    def _itm(self, embeds, vision_mask, states, text_mask, image_idx, text_idx) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return retrieval_task.cached_itm_scores(self.model, embeds, vision_mask, states, text_mask.to(self.device),
                                                    image_idx.to(self.device), text_idx.to(self.device),
                                                    retrieval_task.DEFAULT_RERANK_BATCH).float().cpu()

    def embed_images(self, images) -> np.ndarray:
        """L2-normalised ITC features of images: (N, embed_dim), or (embed_dim,) for one image."""
        self._require_heads("embed_images()", ("itc",), "a model with the ITC head (task 'retrieval' or 'pretrain')")
        items, single = _image_batch(images)
        features, _, _ = self._encode_vision(items, 0, keep_embeds=False)
        return _numpy(features, single)

    def embed_videos(self, videos) -> np.ndarray:
        """L2-normalised ITC features of videos (frames at the evaluation positions, averaged)."""
        self._require_heads("embed_videos()", ("itc",), "a model with the ITC head (task 'retrieval' or 'pretrain')")
        self._require_video("embed_videos()")
        items, single = _video_batch(videos)
        features, _, _ = self._encode_vision(items, self.cfg.frame_len, keep_embeds=False)
        return _numpy(features, single)

    def embed_texts(self, texts) -> np.ndarray:
        """L2-normalised ITC features of texts (cleaned and cut as the retrieval evaluation does)."""
        self._require_heads("embed_texts()", ("itc",), "a model with the ITC head (task 'retrieval' or 'pretrain')")
        items, single = _text_batch(texts)
        ids, mask = self._caption_tokens(items, self.retrieval_settings()[0])
        _, features = self._encode_texts(ids, mask)
        return _numpy(features, single)

    def match(self, images, texts, pairs: bool = False, video: bool = False) -> dict[str, Any]:
        """ITM and ITC scores of images (videos with ``video=True``) and texts, as the retrieval
        evaluation computes them: ``{"itm": ..., "itc": ...}``. By default every image with every
        text: arrays (I, T), a dimension dropped for a single image or text, floats for one of each.
        ``pairs=True``: image k with text k (or one with each of the others), arrays (N,)."""
        self._require_heads("match()", ("itc", "itm"), "a model with ITC and ITM heads (task 'retrieval' or 'pretrain')")
        if video:
            self._require_video("match(video=True)")
            items, single_item = _video_batch(images)
        else:
            items, single_item = _image_batch(images)
        text_list, single_text = _text_batch(texts)
        if pairs:
            item_index = _broadcast(len(items), single_item, text_list, single_text, "video" if video else "image")
        ids, mask = self._caption_tokens(text_list, self.retrieval_settings()[0])
        features, embeds, vision_mask = self._encode_vision(items, self.cfg.frame_len if video else 0)
        states, text_features = self._encode_texts(ids, mask)
        itc = (features.float() @ text_features.float().t()).cpu()  # (I, T), the evaluation's orientation
        if pairs:
            image_idx, text_idx = torch.tensor(item_index), torch.arange(len(text_list))
            itc = itc[image_idx, text_idx]
        else:
            image_idx = torch.arange(len(items)).repeat_interleave(len(text_list))
            text_idx = torch.arange(len(text_list)).repeat(len(items))
        itm = self._itm(embeds, vision_mask, states, mask, image_idx, text_idx).view(itc.shape)
        if not pairs:
            if single_item:
                itm, itc = itm[0], itc[0]
            if single_text:
                itm, itc = itm[..., 0], itc[..., 0]
        elif single_item and single_text:
            itm, itc = itm[0], itc[0]
        return {"itm": _scalar_or_numpy(itm), "itc": _scalar_or_numpy(itc)}

    def index(self, items, kind: str, ids: Sequence | None = None, keep_embeddings: bool | None = None,
              embeddings_dtype: str | torch.dtype = "fp32", out: str | Path | None = None) -> GalleryIndex:
        """Embed a gallery once: ``kind`` 'images', 'videos' or 'texts'; ``ids`` (JSON strings or
        integers, unique; default 0..N-1). For images and videos the ITM re-ranking needs their
        embeddings: kept in the index with ``keep_embeddings=True`` (fast queries: no candidate is
        encoded again; ``(1 + grid^2) x width`` values per item, 4 bytes each, or 2 with
        ``embeddings_dtype='bf16'``, whose ITM scores then differ from fp32 by bfloat16 rounding),
        else encoded again for the candidates of each query from the stored paths (the default when
        every item is a file path).

        ``out``: a directory to save the index in (as ``GalleryIndex.save``), returned loaded from
        there (``GalleryIndex.load``: stored embeddings stay in the file). The items are encoded and
        written ``INDEX_CHUNK`` at a time, so the embeddings of a gallery larger than the memory
        (100,000 x-base images are 30 GB in bf16) never need to fit in it."""
        self._require_heads("index()", ("itc", "itm"), "a model with ITC and ITM heads (task 'retrieval' or 'pretrain')")
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
        max_tokens = self.retrieval_settings()[0]
        if kind == "texts":
            texts, _ = _text_batch(items)
            ids_, mask = self._caption_tokens(texts, max_tokens)
            _, features = self._encode_texts(ids_, mask)
            index = GalleryIndex(kind, _gallery_ids(ids, len(texts)), features.float().cpu(), texts, self.fingerprint, max_tokens)
            return index if out is None else GalleryIndex.load(index.save(out))
        frame_len = 0
        if kind == "videos":
            self._require_video("index(kind='videos')")
            frame_len = self.cfg.frame_len
            gallery, _ = _video_batch(items)
        else:
            gallery, _ = _image_batch(items)
        sources = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else None for x in gallery]
        if keep_embeddings is None:
            keep_embeddings = any(s is None for s in sources)
        elif not keep_embeddings and any(s is None for s in sources):
            raise ValueError("keep_embeddings=False needs every item to be a file path: in-memory images and frame "
                             "lists cannot be read again for re-ranking")
        stored_dtype = torch.float32 if resolve_dtype(embeddings_dtype, torch.device("cpu")) == "fp32" else torch.bfloat16
        gallery_ids = _gallery_ids(ids, len(gallery))

        def pieces(first: int) -> Iterator[dict[str, torch.Tensor]]:
            starts = range(first, len(gallery), INDEX_CHUNK)
            for start in tqdm(starts, desc=f"index {kind}", unit="piece", disable=len(starts) <= 1):
                features, embeds, masks = self._encode_vision(gallery[start : start + INDEX_CHUNK], frame_len, keep_embeds=keep_embeddings)
                piece = {"features": features.float().cpu()}
                if keep_embeddings:
                    piece.update(vision_embeds=embeds.to(stored_dtype).cpu(), vision_mask=masks.cpu())
                yield piece

        if out is not None:
            meta = index_meta(kind, gallery_ids, sources, self.fingerprint, max_tokens, frame_len)
            return GalleryIndex.load(write_gallery_index(out, meta, pieces))
        parts = list(pieces(0))
        features = torch.cat([piece["features"] for piece in parts])
        if not keep_embeddings:
            return GalleryIndex(kind, gallery_ids, features, sources, self.fingerprint, max_tokens, frame_len)
        return GalleryIndex(kind, gallery_ids, features, sources, self.fingerprint, max_tokens, frame_len,
                            torch.cat([piece["vision_embeds"] for piece in parts]), torch.cat([piece["vision_mask"] for piece in parts]))

    def retrieve(self, query, gallery, k: int = 10, k_test: int | None = None, kind: str | None = None
                 ) -> list[Hit] | list[list[Hit]]:
        """The ``k`` best gallery items for each query: texts against an image or video gallery, or
        images against a text gallery. ``gallery`` is a ``GalleryIndex`` or a list of items (embedded
        on the fly as ``kind``: by default 'images' for a text query, 'texts' otherwise). The
        evaluation's two stages: the ``k_test`` items most similar by ITC are re-scored by the ITM
        match logit and ranked by it (``k_test`` 0: ITC only); if ``k`` > ``k_test`` the rest follow
        in ITC order (``itm`` None)."""
        self._require_heads("retrieve()", ("itc", "itm"), "a model with ITC and ITM heads (task 'retrieval' or 'pretrain')")
        if isinstance(gallery, GalleryIndex):
            index = gallery
            if kind is not None and kind != index.kind:
                raise ValueError(f"kind {kind!r} given for a gallery index of {index.kind}")
        else:
            text_query = isinstance(query, str) or (isinstance(query, (list, tuple)) and query and all(isinstance(q, str) for q in query))
            index = self.index(gallery, kind or ("images" if text_query else "texts"))
        if index.fingerprint != self.fingerprint:
            raise ValueError(f"the gallery index was built by another model (fingerprint {index.fingerprint}, this model "
                             f"{self.fingerprint}); build it again with this model")
        k = _positive(k, "k")
        _, k_test = self.retrieval_settings(k_test)
        if index.kind == "texts":
            images, single = _image_batch(query, "image query")
            query_features, embeds, vision_mask = self._encode_vision(images, 0)
            sims = (query_features.float() @ index.features.to(self.device).t()).cpu()  # (Q, N) as image -> text
        else:
            texts, single = _text_batch(query, "text query")
            ids, mask = self._caption_tokens(texts, index.max_tokens)
            states, query_features = self._encode_texts(ids, mask)
            sims = (index.features.to(self.device) @ query_features.float().t()).t().cpu()  # (Q, N) as text -> image
        ranked = min(k_test, len(index))
        scores = torch.empty(len(sims), 0)
        candidates = torch.empty(len(sims), 0, dtype=torch.long)
        if ranked:
            candidates = sims.topk(ranked, dim=1).indices
            used, rows = torch.unique(candidates.flatten(), return_inverse=True)
            per_query = torch.arange(len(sims)).repeat_interleave(ranked)
            if index.kind == "texts":
                cand_ids, cand_mask = self._caption_tokens([index.sources[i] for i in used.tolist()], index.max_tokens)
                cand_states, _ = self._encode_texts(cand_ids, cand_mask)
                scores = self._itm(embeds, vision_mask, cand_states, cand_mask, per_query, rows)
            else:
                cand_embeds, cand_mask = self._candidate_embeds(index, used)
                scores = self._itm(cand_embeds, cand_mask, states, mask, rows, per_query)
            scores = scores.view(len(sims), ranked)
        hits = [_rank(sims[q], candidates[q], scores[q], k, index.ids) for q in range(len(sims))]
        return hits[0] if single else hits

    def _candidate_embeds(self, index: GalleryIndex, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if index.vision_embeds is not None:  # stored ones, cast to the model's parameter dtype
            return index.vision_embeds[used].to(self.device, self._param_dtype), index.vision_mask[used].to(self.device)
        _, embeds, masks = self._encode_vision([index.sources[i] for i in used.tolist()], index.frame_len)
        return embeds, masks


# -- helpers --------------------------------------------------------------------------------------------
def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_top_k(top_k: Any, limit: int, what: str) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limit:
        raise ValueError(f"top_k must be an integer from 1 to {limit} ({what}), got {top_k!r}")


def _answers(names: list[str], best: torch.Tensor, probs: torch.Tensor) -> list[Answer]:
    out = []
    for row_ids, row_probs in zip(best.tolist(), probs.tolist()):
        top = [(names[i], float(p)) for i, p in zip(row_ids, row_probs)]
        out.append(Answer(top[0][0], top[0][1], top))
    return out


def _numpy(features: torch.Tensor, single: bool) -> np.ndarray:
    array = features.float().cpu().numpy()
    return array[0] if single else array


def _scalar_or_numpy(values: torch.Tensor):
    return float(values) if values.dim() == 0 else values.numpy()


def _gallery_ids(ids: Sequence | None, n: int) -> list:
    if ids is None:
        return list(range(n))
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} gallery items")
    bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, (str, int))), None)
    if bad is not None:
        raise TypeError(f"gallery ids must be strings or integers (they are saved as JSON), got {bad!r}")
    if len(set(ids)) != n:
        raise ValueError("gallery ids must be unique")
    return ids


def _rank(sims: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor, k: int, ids: list) -> list[Hit]:
    """The evaluation's ranking of one query: candidates by ITM (every other item scores
    ``NOT_A_CANDIDATE``), then, beyond them, the other items in ITC order."""
    row = torch.full_like(sims, retrieval_task.NOT_A_CANDIDATE)
    row[candidates] = scores
    top = row.topk(min(k, len(candidates))).indices.tolist() if len(candidates) else []
    itm = dict(zip(candidates.tolist(), scores.tolist()))
    hits = [Hit(i, ids[i], float(sims[i]), float(itm[i])) for i in top]
    if k > len(hits):
        taken = set(top)
        order = torch.argsort(sims, descending=True, stable=True).tolist()
        rest = (i for i in order if i not in taken)  # only the first ones become Hits (a gallery may hold 100k)
        hits.extend(Hit(i, ids[i], float(sims[i]), None) for i in itertools.islice(rest, k - len(hits)))
    return hits
