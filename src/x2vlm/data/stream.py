"""Sharded, shuffled, exactly resumable streams of raw pre-training samples (spec §3.3.1, §6.27).

A data source is a list of shards: JSON-lines files (optionally compressed, ``.gz`` / ``.bz2`` /
``.xz`` / ``.zst`` as fsspec infers) and WebDataset ``.tar`` shards, found locally or through any
fsspec URL (``file://``, ``s3://``, ``hdfs://``, ...). Every stream position is one *slot*: a
(rank, DataLoader worker) pair. This module decides which raw samples a slot reads, in which order,
and how to get back to any position without decoding anything.

* **Splitting.** With at least as many shards as slots, shard ``i`` belongs to slot
  ``i % slots`` (whole shards; slots differ by at most one shard). With fewer shards than slots,
  every slot reads every shard and keeps sample ``k`` of shard ``j`` when ``(k + j) % slots ==
  slot``, so no slot is ever left without data (the official reader raises, or starves ranks).
* **Epochs.** A slot's epoch is one pass over its shards; each epoch visits the shards in an order
  drawn from ``(seed key, epoch)``, and samples go through a shuffle buffer seeded the same way,
  drained at the end of the epoch. Epochs repeat forever (virtual epochs, spec §3.2).
* **Position.** ``StreamPosition(epoch, emitted)``: the number of raw samples already taken out of
  the shuffle buffer in that epoch. The stream is a pure function of the shard list and the seed
  key, so resuming replays the raw samples of the current epoch through the buffer (reading
  bytes, parsing and decoding nothing) and continues with exactly the sample that came next.

Raw samples carry their location (``file:line`` for JSON lines, ``file:key`` for tar members).
A shard that cannot be read (missing, truncated archive) becomes one raw sample with ``error`` set,
so the decoder reports it as bad data with its location instead of stopping the stream.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np

from x2vlm.data.readers import DataFormatError, list_shards

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# Tags that keep the random streams drawn from one seed key apart.
TAG_SHARD_ORDER = 1
TAG_SHUFFLE_BUFFER = 2
TAG_SAMPLE = 3
TAG_BATCH = 4


def derive_rng(*keys: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative integers (numpy ``SeedSequence`` entropy)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]))


# --------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------


def is_url(path: str) -> bool:
    return "://" in path


def is_tar_shard(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _has_wildcard(path: str) -> bool:
    return any(c in path for c in "*?[")


def _resolve_url(url: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    if _has_wildcard(root):
        found = sorted(p for p in fs.glob(root) if fs.isfile(p))
    elif fs.isdir(root):
        found = sorted(p for p in fs.ls(root, detail=False) if fs.isfile(p))
    elif fs.isfile(root):
        found = [root]
    else:
        raise DataFormatError(f"{url}: no such file or directory")
    found = [p for p in found if "_SUCCESS" not in p.rsplit("/", 1)[-1]]
    if not found:
        raise DataFormatError(f"{url}: holds no data files")
    return [fs.unstrip_protocol(p) for p in found]


def resolve_shards(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Expand data paths into the ordered list of shard files.

    Each entry is a file, a directory (all its files, sorted, ``_SUCCESS`` markers skipped), a glob
    pattern, or the same as an fsspec URL. Entries keep their order; duplicates are an error, since
    they would make two slots read the same data.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    shards: list[str] = []
    for entry in paths:
        entry = os.fspath(entry)
        if is_url(entry):
            shards.extend(_resolve_url(entry))
        elif _has_wildcard(entry):
            found = sorted(p for p in glob.glob(os.path.expanduser(entry)) if os.path.isfile(p))
            found = [p for p in found if "_SUCCESS" not in os.path.basename(p)]
            if not found:
                raise DataFormatError(f"{entry}: the pattern matches no data file")
            shards.extend(found)
        else:
            shards.extend(str(p) for p in list_shards(Path(entry).expanduser()))
    seen: set[str] = set()
    for shard in shards:
        if shard in seen:
            raise DataFormatError(f"shard {shard} is listed twice in the data paths")
        seen.add(shard)
    if not shards:
        raise DataFormatError("no data paths given")
    return shards


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample: a JSON line, or the members of one WebDataset sample.

    ``members`` maps a tar member's extension (``json``, ``jpg``, ``mp4``, ...) to its bytes.
    ``error`` is set (and nothing else) when the shard itself could not be read.
    """

    source: str
    line: bytes | None = None
    members: dict[str, bytes] | None = None
    error: str | None = None


def _iter_json_line_shard(url: str) -> Iterator[RawSample]:
    with fsspec.open(url, "rb", compression="infer") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield RawSample(source=f"{url}:{number}", line=line.rstrip(b"\r\n"))


def _split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def _iter_tar_shard(url: str) -> Iterator[RawSample]:
    """Group consecutive members sharing a key into one sample (WebDataset layout)."""
    with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
        key, members = None, {}
        for member in archive:
            if not member.isfile():
                continue
            member_key, ext = _split_member_name(member.name)
            if member_key != key and members:
                yield RawSample(source=f"{url}:{key}", members=members)
                members = {}
            key = member_key
            extracted = archive.extractfile(member)
            members[ext] = extracted.read() if extracted is not None else b""
        if members:
            yield RawSample(source=f"{url}:{key}", members=members)


def iter_raw_samples(url: str) -> Iterator[RawSample]:
    """Every raw sample of one shard, in file order. A read error ends the shard with one
    ``RawSample(error=...)`` located at the shard (and the position reached in it)."""
    reader = _iter_tar_shard if is_tar_shard(url) else _iter_json_line_shard
    last = url
    try:
        for sample in reader(url):
            last = sample.source
            yield sample
    except (OSError, EOFError, tarfile.TarError, ValueError) as error:
        where = url if last == url else f"{url} (after {last})"
        yield RawSample(source=url, error=f"unreadable shard {where}: {error}")


# --------------------------------------------------------------------------------------------------
# Slots: which raw samples a (rank, worker) pair reads
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One reader: DataLoader worker ``worker`` (of ``num_workers``, at least 1) of rank ``rank``."""

    rank: int
    world_size: int
    worker: int
    num_workers: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, {self.world_size})")
        if not 0 <= self.worker < self.num_workers:
            raise ValueError(f"worker {self.worker} outside [0, {self.num_workers})")

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


@dataclass(frozen=True)
class ShardPart:
    """A slot's share of one shard: all of it, or every ``stride``-th sample from ``offset``."""

    shard_index: int
    url: str
    stride: int = 1
    offset: int = 0

    def samples(self) -> Iterator[RawSample]:
        for k, sample in enumerate(iter_raw_samples(self.url)):
            if sample.error is not None or k % self.stride == self.offset:
                yield sample


def assign_shards(shards: Sequence[str], slot: Slot) -> list[ShardPart]:
    """The parts of ``shards`` that ``slot`` reads (see the module docstring). Over all slots the
    parts are disjoint and cover every sample."""
    count, index = slot.count, slot.index
    if len(shards) >= count:
        return [ShardPart(j, url) for j, url in enumerate(shards) if j % count == index]
    return [ShardPart(j, url, stride=count, offset=(index - j) % count) for j, url in enumerate(shards)]


# --------------------------------------------------------------------------------------------------
# Shuffled, resumable stream
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamPosition:
    """``emitted`` raw samples of epoch ``epoch`` have been taken out of the shuffle buffer."""

    epoch: int = 0
    emitted: int = 0

    def to_list(self) -> list[int]:
        return [self.epoch, self.emitted]

    @classmethod
    def from_list(cls, values: Sequence[int]) -> "StreamPosition":
        epoch, emitted = (int(v) for v in values)
        if epoch < 0 or emitted < 0:
            raise ValueError(f"invalid stream position {list(values)}")
        return cls(epoch, emitted)


def shuffle_buffer(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Sample-level shuffling: fill a buffer of ``size`` items, then emit a random buffered item for
    each new one; at the end, drain the buffer in random order. ``size <= 1`` keeps the order.

    The order depends only on ``rng`` and the number of items, never on their content."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    while buffer:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()


class ShardStream:
    """The endless, shuffled stream of raw samples of one slot.

    ``seed_key`` identifies the slot's random streams (seed, source, rank, worker, ...); everything
    random about the stream derives from ``(*seed_key, epoch, tag)``.
    """

    def __init__(self, shards: Sequence[str], slot: Slot, seed_key: Sequence[int], buffer_size: int):
        self.slot = slot
        self.parts = assign_shards(shards, slot)
        self.seed_key = tuple(int(k) for k in seed_key)
        self.buffer_size = int(buffer_size)

    def epoch(self, epoch: int) -> Iterator[RawSample]:
        """The raw samples of one epoch, in emission order."""
        order = derive_rng(*self.seed_key, epoch, TAG_SHARD_ORDER).permutation(len(self.parts))
        in_order = (sample for k in order.tolist() for sample in self.parts[k].samples())
        buffer_rng = derive_rng(*self.seed_key, epoch, TAG_SHUFFLE_BUFFER)
        return shuffle_buffer(in_order, self.buffer_size, buffer_rng)

    def iterate(self, start: StreamPosition = StreamPosition()) -> Iterator[tuple[RawSample, int, int]]:
        """``(sample, epoch, index in epoch)`` from ``start`` on, forever.

        The first ``start.emitted`` samples of ``start.epoch`` are replayed through the shuffle
        buffer and dropped undecoded. An epoch without any sample is an error (the slot has no data).
        """
        epoch, skip = start.epoch, start.emitted
        while True:
            index = -1
            for index, sample in enumerate(self.epoch(epoch)):
                if index >= skip:
                    yield sample, epoch, index
            if index < 0:
                raise DataFormatError(
                    f"rank {self.slot.rank} worker {self.slot.worker}: no sample to read in "
                    f"{len(self.parts)} shard(s) (there are {self.slot.count} reader slots; "
                    f"the data has fewer samples than ranks x workers?)"
                )
            if index + 1 < skip:
                raise ValueError(f"resume position {start} lies beyond the {index + 1} samples "
                                 f"of epoch {epoch}: the data changed since the state was saved")
            epoch, skip = epoch + 1, 0
