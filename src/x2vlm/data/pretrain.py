"""Pre-training data (spec §3.3): sources as config, sample decoding, batches, bad data, the loader.

``PretrainLoader(source, model_cfg, tokenizer, rank, world_size, seed, num_workers)`` is an endless
iterable of batches for one data source (image-text, region-text, video-text, text-only or CCLM
parallel text: ``source_text``/``target_text`` lines, side 1 masked with the source's settings). The
raw samples come from ``x2vlm.data.stream`` (sharding across ranks and workers, shuffle buffer,
virtual epochs), ``x2vlm.data.pretrain_samples`` decodes them exactly as §3.3 says, and this module
batches them inside the DataLoader workers (the DataLoader gets ``batch_size=None``), accounts for
bad data and records the position for resuming.

Reproducibility: every sample's randomness (caption choice, crop, flip, RandAugment, frame choice,
masking) comes from a generator derived from ``(seed, source, rank, worker, epoch, index)``, never
from global state, so a replayed stream gives bit-identical tensors. ``state_dict()`` holds each
worker's stream position as of the last batch handed to the caller, so a loader built from it
continues with exactly the next batch (also with DataLoader workers, whose batches arrive
round-robin: the resumed loader starts at the worker whose turn it is).

Deliberate choices and differences from the official code:

* Text rows are padded to ``max_tokens`` (fixed shapes across steps and ranks), not to the
  longest row.
* Region batches always have exactly ``batch_size`` rows: a random subset when the ``max_images``
  images give more region-text pairs, padding rows with ``valid=False`` when they give fewer
  (spec §6.10: the official code duplicates pairs, creating false ITC/ITM negatives). Padding rows
  point at image 0 with an all-ones patch mask, ``[CLS] [SEP]`` text, no MLM targets, target box
  ``[0.5, 0.5, 1, 1]`` and ``is_image=True``; losses must ignore rows with ``valid=False``.
* Video clips get one crop / flip / RandAugment for all their frames (spec §6.8).
* With ``careful_hflip`` the image-text and video transforms are caption-aware too (spec §6.11),
  and the test is on whole words (``bright`` does not count).
* Bad samples are skipped, counted by reason and reported with their location (``file:line``)
  instead of being swallowed silently (spec §6.27); ``BadDataCounter`` stops the run when their
  fraction passes ``max_bad_fraction``.
* A region record is skipped as a whole when one of its boxes has a non-positive size or lies
  entirely outside the image, or when one of its texts is empty.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from x2vlm.config import X2VLMConfig, check_keys, field_names
from x2vlm.data.masking import IGNORE_INDEX, MaskingConfig, pad_masked_targets
from x2vlm.data.pretrain_samples import RegionItem, RegionSample, SampleDecoder, SkipSample, TextItem
from x2vlm.data.stream import TAG_BATCH, TAG_SAMPLE, ShardStream, Slot, StreamPosition, derive_rng, resolve_shards

logger = logging.getLogger(__name__)

KINDS = ("image_text", "region_text", "video_text", "text", "parallel_text")
PADDING_SOURCE = "<padding>"  # the source of region padding rows

# Official field names per kind: (image/video key, caption key). X²-VLM configs use "binary"/"desc"
# for images; region lines must use "caption"; stage-2 video lines use "video_frames"/"text".
DEFAULT_KEYS: dict[str, tuple[str | None, str]] = {
    "image_text": ("binary", "desc"),
    "region_text": ("binary", "caption"),
    "video_text": ("video_frames", "text"),
    "text": (None, "text"),
    "parallel_text": (None, "source_text"),  # CCLM (WikiMatrix lines): side 1 "source_text", side 2 "target_text"
}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _path_list(value: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A list of paths from a list, one path, or a comma-separated string."""
    if isinstance(value, (str, os.PathLike)):
        return [p.strip() for p in os.fspath(value).split(",") if p.strip()]
    return [os.fspath(p) for p in value]


@dataclass
class SourceConfig:
    """One pre-training data source (a ``images:`` / ``regions:`` / ``videos:`` / ``texts:`` block).

    ``batch_size`` counts samples (image-text, video-text, text) or region-text pairs (regions, which
    also need ``max_images``, the images per batch). ``image_key`` / ``caption_key`` default to the
    official names of the kind (``DEFAULT_KEYS``). ``image_is_path``: how to read a string image
    field (``None`` guesses per value, as ``load_image`` does; ``image_root`` implies paths and is
    prepended to relative ones). ``frame_len`` defaults to the model's. ``language`` fixes the
    language of dict captions (else random). ``iter_perc`` is the loss weight, carried for the loop.
    ``max_bad_fraction`` of skipped samples is tolerated once ``bad_check_after`` samples were read.
    ``parallel_text``: ``caption_key`` names side 1 (default ``source_text``, masked for MLM) and
    ``target_key`` side 2 (default ``target_text``, never masked); both use ``max_tokens``.
    ``name`` labels logs and decorrelates the random streams of sources of the same kind.
    ``boxes_only`` (region_text): the grain trains only multi-grained localization (box L1 + GIoU of
    each region text on its full image), not region ITC / ITM / MLM. ``mlm: false`` (image, region
    and video text): the grain trains ITC and ITM but no masked language modelling. ``val_paths``:
    held-out files of the same format, read the same way, for the run's held-out losses
    (``eval_every`` in the pre-training config).
    """

    kind: str
    paths: list[str]
    batch_size: int
    max_images: int | None = None
    max_regions: int = 5
    min_perc_in_image: float = 0.5
    image_key: str | None = None
    caption_key: str | None = None
    target_key: str | None = None  # parallel_text only: the side-2 field (default "target_text")
    image_is_path: bool | None = None
    image_root: str | None = None
    max_tokens: int = 40
    mask_prob: float = 0.5
    max_masks: int = 12
    whole_word: bool = True
    skipgram_prb: float = 0.2
    skipgram_size: int = 3
    careful_hflip: bool = False
    crop_scale: tuple[float, float] = (0.2, 1.0)  # random-resized-crop area range (official pre-training)
    randaugment: bool = True  # RandAugment N=2, M=7 (official); off keeps colours exact
    frame_len: int | None = None
    combine_continuous_clips: bool = True
    min_frames_before_sampling: int = 8
    iter_perc: float = 1.0
    language: str | None = None
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.05
    bad_check_after: int = 1000
    name: str | None = None
    boxes_only: bool = False
    mlm: bool = True
    val_paths: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"source field 'kind': {self.kind!r} is not one of {list(KINDS)}")
        self.paths, self.val_paths = _path_list(self.paths), _path_list(self.val_paths)
        if not self.paths:
            raise ValueError("source field 'paths': no data path given")
        default_image_key, default_caption_key = DEFAULT_KEYS[self.kind]
        self.image_key = self.image_key or default_image_key
        self.caption_key = self.caption_key or default_caption_key
        if self.kind == "parallel_text":
            self.target_key = self.target_key or "target_text"
            if self.target_key == self.caption_key:
                raise ValueError(f"source fields 'caption_key' and 'target_key' are both {self.caption_key!r}")
        elif self.target_key is not None:
            raise ValueError(f"source field 'target_key' is only for parallel_text sources, not {self.kind}")
        self.name = self.name or self.kind
        self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"source field 'crop_scale': {self.crop_scale} is not 0 < low <= high <= 1")
        if self.kind == "region_text" and self.caption_key != "caption":
            raise ValueError("source field 'caption_key': region-text lines use 'caption' (spec §3.3.4)")
        if self.image_root is not None:
            if self.image_is_path is False:
                raise ValueError("source fields 'image_root' and 'image_is_path: false' contradict each other")
            self.image_is_path = True
        positive = ["batch_size", "max_regions", "max_tokens", "max_masks", "min_frames_before_sampling"]
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"source field {name!r} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 3:
            raise ValueError(f"source field 'max_tokens' must be >= 3, got {self.max_tokens}")
        if not self.mlm and self.kind not in ("image_text", "region_text", "video_text"):
            raise ValueError(f"source field 'mlm' is only for image, region and video text sources, not {self.kind}")
        if self.boxes_only and self.kind != "region_text":
            raise ValueError(f"source field 'boxes_only' is only for region_text sources, not {self.kind}")
        if self.kind == "region_text" and (self.max_images is None or self.max_images < 1):
            raise ValueError("source field 'max_images' (images per batch) is required for region_text, >= 1")
        if self.frame_len is not None and self.frame_len < 1:
            raise ValueError(f"source field 'frame_len' must be >= 1, got {self.frame_len}")
        if not 0.0 <= self.min_perc_in_image < 1.0:
            raise ValueError(f"source field 'min_perc_in_image' must be in [0, 1), got {self.min_perc_in_image}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"source field 'max_bad_fraction' must be in [0, 1], got {self.max_bad_fraction}")
        if self.shuffle_buffer < 0 or self.bad_check_after < 1:
            raise ValueError("source fields 'shuffle_buffer' must be >= 0 and 'bad_check_after' >= 1")
        _ = self.masking  # MaskingConfig validates the masking settings

    @property
    def masking(self) -> MaskingConfig:
        return MaskingConfig(mask_prob=self.mask_prob, max_masks=self.max_masks, whole_word=self.whole_word,
                             skipgram_prb=self.skipgram_prb, skipgram_size=self.skipgram_size)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "source") -> "SourceConfig":
        """Build from a YAML/JSON mapping; an unknown key is an error naming the key."""
        check_keys(data, field_names(cls), where)
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


class Skip(NamedTuple):
    """A skipped raw sample: where it is, why (one of ``SKIP_REASONS``), and the details."""

    source: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class BatchInfo:
    """Stream bookkeeping of a batch: the (logical) worker that built it, that worker's stream
    position after it, and how many raw samples (good and bad) it consumed."""

    worker: int
    position: StreamPosition
    num_raw: int


class _Batch:
    """Shared helpers of the batch dataclasses: moving/pinning every tensor field."""

    def _map_tensors(self, fn):
        changes = {f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False):
        """A copy with every tensor on ``device``."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        """A copy with every tensor in pinned memory (called by ``DataLoader(pin_memory=True)``)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return self.text_ids.shape[0]


@dataclass
class ImageTextBatch(_Batch):
    images: torch.Tensor  # (B, 3, res, res) float32
    text_ids: torch.Tensor  # (B, max_tokens) int64, [CLS] ... [SEP] [PAD]...
    text_mask: torch.Tensor  # (B, max_tokens) int64, 1 on real tokens
    masked_ids: torch.Tensor  # (B, max_tokens) int64, text_ids after MLM corruption
    masked_pos: torch.Tensor  # (B, max_masks) int64, padded with 0
    masked_targets: torch.Tensor  # (B, max_masks) int64, original ids, padded with -100
    sources: list[str]  # "file:line" of every row
    skipped: list[Skip] = field(default_factory=list)  # skips of this worker since its previous batch
    info: BatchInfo | None = None


@dataclass
class RegionTextBatch(_Batch):
    images: torch.Tensor  # (max_images, 3, res, res) float32
    image_index: torch.Tensor  # (B,) int64, the image of each row
    region_mask: torch.Tensor  # (B, 1 + grid*grid) int64 patch mask (all ones for whole-image rows)
    target_boxes: torch.Tensor  # (B, 4) float32 normalised (cx, cy, w, h)
    is_image: torch.Tensor  # (B,) bool, the row is a whole-image caption
    valid: torch.Tensor  # (B,) bool, False on padding rows
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    masked_ids: torch.Tensor
    masked_pos: torch.Tensor
    masked_targets: torch.Tensor
    sources: list[str]  # per row; PADDING_SOURCE on padding rows
    skipped: list[Skip] = field(default_factory=list)
    info: BatchInfo | None = None


@dataclass
class VideoTextBatch(_Batch):
    videos: torch.Tensor  # (B, frame_len, 3, res, res) float32
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    masked_ids: torch.Tensor
    masked_pos: torch.Tensor
    masked_targets: torch.Tensor
    sources: list[str]
    skipped: list[Skip] = field(default_factory=list)
    info: BatchInfo | None = None


@dataclass
class TextBatch(_Batch):
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    masked_ids: torch.Tensor
    masked_pos: torch.Tensor
    masked_targets: torch.Tensor
    sources: list[str]
    skipped: list[Skip] = field(default_factory=list)
    info: BatchInfo | None = None


@dataclass
class ParallelTextBatch(_Batch):
    """Parallel text (CCLM): side 1 (``text_*``, masked for MLM with the source's settings) and its
    translation, side 2 (``target_ids``/``target_mask``, never masked)."""

    text_ids: torch.Tensor
    text_mask: torch.Tensor
    masked_ids: torch.Tensor
    masked_pos: torch.Tensor
    masked_targets: torch.Tensor
    target_ids: torch.Tensor  # (B, max_tokens) int64
    target_mask: torch.Tensor
    sources: list[str]
    skipped: list[Skip] = field(default_factory=list)
    info: BatchInfo | None = None


PretrainBatch = ImageTextBatch | RegionTextBatch | VideoTextBatch | TextBatch | ParallelTextBatch


# --------------------------------------------------------------------------------------------------
# Collation (inside the workers)
# --------------------------------------------------------------------------------------------------


def collate_texts(items: Sequence[TextItem], width: int, max_masks: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Text rows padded to ``width``; MLM positions/targets padded to ``max_masks`` (0 / -100)."""
    n = len(items)
    text_ids = torch.full((n, width), pad_id, dtype=torch.int64)
    text_mask = torch.zeros((n, width), dtype=torch.int64)
    masked_ids = torch.full((n, width), pad_id, dtype=torch.int64)
    masked_pos = torch.zeros((n, max_masks), dtype=torch.int64)
    masked_targets = torch.full((n, max_masks), IGNORE_INDEX, dtype=torch.int64)
    for i, item in enumerate(items):
        length = len(item.ids)
        text_ids[i, :length] = torch.as_tensor(item.ids, dtype=torch.int64)
        text_mask[i, :length] = 1
        masked_ids[i, :length] = torch.as_tensor(item.masked, dtype=torch.int64)
        masked_pos[i], masked_targets[i] = pad_masked_targets(item.positions, item.targets, max_masks)
    return {"text_ids": text_ids, "text_mask": text_mask, "masked_ids": masked_ids,
            "masked_pos": masked_pos, "masked_targets": masked_targets}


def collate_region_samples(samples: Sequence[RegionSample], batch_size: int, rng: np.random.Generator,
                           padding: RegionItem, collate_text: Callable[[list[TextItem]], dict]) -> RegionTextBatch:
    """Flatten the images' items into exactly ``batch_size`` rows: a random subset (kept in order)
    when there are more, ``valid=False`` copies of ``padding`` (on image 0) when there are fewer."""
    rows = [(i, item, sample.source) for i, sample in enumerate(samples) for item in sample.items]
    if len(rows) > batch_size:
        keep = np.sort(rng.choice(len(rows), size=batch_size, replace=False))
        rows = [rows[k] for k in keep.tolist()]
    num_valid = len(rows)
    rows += [(0, padding, PADDING_SOURCE)] * (batch_size - num_valid)
    return RegionTextBatch(
        images=torch.stack([sample.pixels for sample in samples]),
        image_index=torch.tensor([i for i, _, _ in rows], dtype=torch.int64),
        region_mask=torch.stack([item.mask for _, item, _ in rows]),
        target_boxes=torch.tensor([item.target for _, item, _ in rows], dtype=torch.float32),
        is_image=torch.tensor([item.is_image for _, item, _ in rows], dtype=torch.bool),
        valid=torch.arange(batch_size) < num_valid,
        sources=[source for _, _, source in rows],
        **collate_text([item.text for _, item, _ in rows]),
    )


# --------------------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------------------


class BadDataError(RuntimeError):
    """Too much of a data source is unusable."""


class BadDataCounter:
    """Counts the raw samples of a source and the skipped ones (by reason), logs skips with their
    location (the first ``log_first``, then every ``log_every``-th), and raises ``BadDataError``
    naming the last bad samples once more than ``max_bad_fraction`` of at least ``min_samples``
    samples were bad."""

    def __init__(self, name: str = "data", max_bad_fraction: float = 0.05, min_samples: int = 1000,
                 log_first: int = 20, log_every: int = 100, keep_last: int = 5):
        self.name = name
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.log_first = log_first
        self.log_every = log_every
        self.samples = 0
        self.bad = 0
        self.reasons: Counter[str] = Counter()
        self.last: deque[Skip] = deque(maxlen=keep_last)

    @property
    def fraction(self) -> float:
        return self.bad / self.samples if self.samples else 0.0

    def update(self, num_samples: int, skipped: Sequence[Skip]) -> None:
        """Add ``num_samples`` raw samples read, ``skipped`` of which were unusable; may raise."""
        self.samples += num_samples
        for skip in skipped:
            skip = Skip(*skip)
            self.bad += 1
            self.reasons[skip.reason] += 1
            self.last.append(skip)
            if self.bad <= self.log_first or self.bad % self.log_every == 0:
                logger.warning("%s: skipped %s (%s: %s); %d of %d samples skipped so far", self.name,
                               skip.source, skip.reason, skip.detail, self.bad, self.samples)
        self.check()

    def check(self) -> None:
        if self.samples >= self.min_samples and self.fraction > self.max_bad_fraction:
            raise BadDataError(
                f"{self.name}: {self.bad} of {self.samples} samples were unusable "
                f"({self.fraction:.1%} > max_bad_fraction {self.max_bad_fraction:.1%}); "
                f"by reason: {dict(self.reasons)}; last: "
                + "; ".join(f"{s.source} ({s.reason}: {s.detail})" for s in self.last)
            )

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "bad": self.bad, "reasons": dict(self.reasons),
                "last": [list(s) for s in self.last]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = int(state["samples"])
        self.bad = int(state["bad"])
        self.reasons = Counter({str(k): int(v) for k, v in state["reasons"].items()})
        self.last.clear()
        self.last.extend(Skip(*s) for s in state["last"])


# --------------------------------------------------------------------------------------------------
# The worker-side stream of batches
# --------------------------------------------------------------------------------------------------


def source_seed(source: SourceConfig) -> int:
    """A stable number for the source (its kind and name), mixed into every random stream."""
    return zlib.crc32(f"{source.kind}:{source.name}".encode())


class BatchStream(IterableDataset):
    """Endless batches of one source for one rank; in a DataLoader each worker reads its own slot.

    ``positions[w]`` is where logical worker ``w`` starts; DataLoader worker ``i`` plays logical
    worker ``(i + worker_offset) % num_workers`` so that a resumed loader's round-robin starts
    with the worker whose batch comes next.
    """

    def __init__(self, source: SourceConfig, model_cfg: X2VLMConfig, tokenizer, shards: Sequence[str],
                 rank: int, world_size: int, seed: int, num_workers: int):
        self.source = source
        self.decoder = SampleDecoder(source, model_cfg, tokenizer)
        self.shards = list(shards)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = max(1, num_workers)
        self.positions = [StreamPosition() for _ in range(self.num_workers)]
        self.worker_offset = 0
        self.pad_id = tokenizer.pad_token_id
        short = [tokenizer.cls_token_id, tokenizer.sep_token_id]
        self.padding_row = RegionItem(TextItem(short, short, [], []),
                                      torch.ones(model_cfg.num_vision_tokens, dtype=torch.int64),
                                      (0.5, 0.5, 1.0, 1.0), True)

    def __iter__(self) -> Iterator[PretrainBatch]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"BatchStream built for {self.num_workers} workers runs in {info.num_workers}")
        return self.batches((physical + self.worker_offset) % self.num_workers)

    def seed_key(self, worker: int) -> tuple[int, ...]:
        return (self.seed, source_seed(self.source), self.rank, self.world_size, worker, self.num_workers)

    def batches(self, worker: int) -> Iterator[PretrainBatch]:
        """The batches of logical worker ``worker``, from ``positions[worker]`` on."""
        src = self.source
        key = self.seed_key(worker)
        stream = ShardStream(self.shards, Slot(self.rank, self.world_size, worker, self.num_workers),
                             key, src.shuffle_buffer)
        group = src.max_images if src.kind == "region_text" else src.batch_size
        pending, skipped, num_raw, bad_in_row = [], [], 0, 0
        for raw, epoch, index in stream.iterate(self.positions[worker]):
            num_raw += 1
            try:
                sample = self.decoder(raw, derive_rng(*key, epoch, index, TAG_SAMPLE))
            except SkipSample as skip:
                skipped.append(Skip(raw.source, skip.reason, skip.detail))
                bad_in_row += 1
                self._check_bad_run(bad_in_row, skipped[-5:])
                continue
            bad_in_row = 0
            pending.append(sample)
            if len(pending) == group:
                batch = self.collate(pending, derive_rng(*key, epoch, index, TAG_BATCH))
                batch.skipped = skipped
                batch.info = BatchInfo(worker, StreamPosition(epoch, index + 1), num_raw)
                yield batch
                pending, skipped, num_raw = [], [], 0

    def _check_bad_run(self, bad_in_row: int, last: list[Skip]) -> None:
        """The bad fraction is checked in the main process as batches arrive; a worker that finds
        nothing but bad data may never complete a batch, so it stops by itself after
        ``bad_check_after`` unusable samples in a row."""
        src = self.source
        if bad_in_row < src.bad_check_after:
            return
        if src.max_bad_fraction >= 1.0:
            if bad_in_row % src.bad_check_after == 0:
                logger.warning("%s: the last %d samples read were all unusable (max_bad_fraction 1 "
                               "tolerates it)", src.name, bad_in_row)
        else:
            raise BadDataError(
                f"{src.name}: the last {bad_in_row} samples read were all unusable; last: "
                + "; ".join(f"{s.source} ({s.reason}: {s.detail})" for s in last)
            )

    def collate(self, samples: list, rng: np.random.Generator) -> PretrainBatch:
        src = self.source

        def texts(items):
            return collate_texts(items, src.max_tokens, src.max_masks, self.pad_id)

        sources = [sample.source for sample in samples]
        if src.kind == "region_text":
            return collate_region_samples(samples, src.batch_size, rng, self.padding_row, texts)
        text = texts([sample.text for sample in samples])
        if src.kind == "image_text":
            return ImageTextBatch(images=torch.stack([s.pixels for s in samples]), sources=sources, **text)
        if src.kind == "video_text":
            return VideoTextBatch(videos=torch.stack([s.pixels for s in samples]), sources=sources, **text)
        if src.kind == "parallel_text":
            target = texts([sample.target for sample in samples])
            return ParallelTextBatch(target_ids=target["text_ids"], target_mask=target["text_mask"], sources=sources, **text)
        return TextBatch(sources=sources, **text)


# --------------------------------------------------------------------------------------------------
# The main-process loader
# --------------------------------------------------------------------------------------------------

STATE_VERSION = 1


class PretrainLoader:
    """Endless batches of one source for one rank, exactly resumable from ``state_dict()``.

    Each ``iter(loader)`` starts a DataLoader at the recorded positions, so it continues right after
    the last batch delivered by any previous iterator. Skipped samples go to ``bad_data`` (a
    ``BadDataCounter``), which raises ``BadDataError`` when the source is too broken.
    """

    def __init__(self, source: SourceConfig, model_cfg: X2VLMConfig, tokenizer, rank: int = 0,
                 world_size: int = 1, seed: int = 0, num_workers: int = 0,
                 state: dict[str, Any] | None = None, pin_memory: bool = False, prefetch_factor: int = 2):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, seed, num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.shards = resolve_shards(source.paths)
        self.dataset = BatchStream(source, model_cfg, tokenizer, self.shards, rank, world_size, seed, num_workers)
        self.bad_data = BadDataCounter(source.name, source.max_bad_fraction, source.bad_check_after)
        self.positions = [StreamPosition() for _ in range(max(1, num_workers))]
        self.next_worker = 0
        self.batches_delivered = 0
        if state is not None:
            self.load_state_dict(state)

    def __iter__(self) -> Iterator[PretrainBatch]:
        self.dataset.positions = list(self.positions)
        self.dataset.worker_offset = self.next_worker
        options = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        # A private generator: starting a DataLoader must not draw from torch's global RNG, or a
        # resumed run's model randomness (dropout, ITM negatives) would shift.
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.seed),
                            **options)
        for batch in loader:
            self.bad_data.update(batch.info.num_raw, batch.skipped)
            self.positions[batch.info.worker] = batch.info.position
            self.next_worker = (batch.info.worker + 1) % len(self.positions)
            self.batches_delivered += 1
            yield batch

    def _shards_digest(self) -> int:
        return zlib.crc32("\n".join(self.shards).encode())

    def state_dict(self) -> dict[str, Any]:
        """Plain-data (JSON-serialisable) position of this rank's stream."""
        return {
            "version": STATE_VERSION,
            "kind": self.source.kind,
            "name": self.source.name,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "num_shards": len(self.shards),
            "shards_digest": self._shards_digest(),
            "positions": [p.to_list() for p in self.positions],
            "next_worker": self.next_worker,
            "batches_delivered": self.batches_delivered,
            "bad_data": self.bad_data.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        for key in ("kind", "name", "rank", "world_size", "num_workers", "seed"):
            mine = getattr(self.source, key) if key in ("kind", "name") else getattr(self, key)
            if state[key] != mine:
                raise ValueError(f"cannot resume data source {self.source.name!r}: the saved state has "
                                 f"{key}={state[key]!r}, this loader {key}={mine!r} (an exact resume needs "
                                 f"the same kind, name, rank, world size, workers and seed)")
        if state["num_shards"] != len(self.shards) or state["shards_digest"] != self._shards_digest():
            logger.warning("%s: the shard list changed since the data state was saved (%d -> %d shards); "
                           "the stream continues from the saved positions but is not an exact resume",
                           self.source.name, state["num_shards"], len(self.shards))
        positions = [StreamPosition.from_list(p) for p in state["positions"]]
        if len(positions) != len(self.positions):
            raise ValueError(f"data state has {len(positions)} worker positions, expected {len(self.positions)}")
        self.positions = positions
        self.next_worker = int(state["next_worker"]) % len(positions)
        self.batches_delivered = int(state["batches_delivered"])
        self.bad_data.load_state_dict(state["bad_data"])
