"""Frame sampling (spec §3.3.5), video decoding with PyAV, and image decoding (base64 or path).

Decoding errors are turned into ``ValueError``s that name the file (or the record and field), so a
dataset can log *which* sample is broken instead of silently skipping it (spec §6.27). Missing files
raise ``FileNotFoundError``.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
from collections.abc import Sequence

import av
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# PIL raises a variety of types for malformed files (OSError "truncated", SyntaxError "broken PNG", ...).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")


# --------------------------------------------------------------------------------------------------
# Frame sampling
# --------------------------------------------------------------------------------------------------


def sample_frame_indices(
    num_frames: int, frame_len: int, training: bool, rng: np.random.Generator | None = None
) -> list[int]:
    """Choose ``frame_len`` frame indices out of ``num_frames`` (official ``sample_frame_ids``).

    * ``num_frames <= frame_len``: every frame once, plus ``frame_len - num_frames`` repeats drawn
      uniformly (training) or cyclically ``0, 1, 2, ...`` (eval); sorted.
    * otherwise: ``frame_len`` consecutive segments of ``stride = num_frames // frame_len`` frames, the
      first ``num_frames % frame_len`` of them one frame longer (their order is shuffled in training);
      one uniformly random frame per segment (training) or each segment's first frame (eval).

    ``rng`` is required when ``training``; eval sampling is deterministic.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if frame_len < 1:
        raise ValueError(f"frame_len must be >= 1, got {frame_len}")
    if training and rng is None:
        raise ValueError("training-mode frame sampling needs an rng")

    if num_frames <= frame_len:
        extra = frame_len - num_frames
        if training:
            repeats = rng.integers(num_frames, size=extra).tolist()
        else:
            repeats = [i % num_frames for i in range(extra)]
        return sorted(list(range(num_frames)) + repeats)

    stride = num_frames // frame_len
    longer = num_frames - stride * frame_len
    lengths = [stride + 1] * longer + [stride] * (frame_len - longer)
    if training:
        rng.shuffle(lengths)
    starts = np.cumsum([0] + lengths).tolist()
    if training:
        return [int(rng.integers(starts[i], starts[i + 1])) for i in range(frame_len)]
    return [int(s) for s in starts[:-1]]


# --------------------------------------------------------------------------------------------------
# Video files (PyAV)
# --------------------------------------------------------------------------------------------------


def _open_video(path: str) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except av.FFmpegError as err:
        raise ValueError(f"cannot open video {path!r} (unreadable or corrupt): {err}") from err
    if not container.streams.video:
        kinds = sorted({st.type for st in container.streams})
        container.close()
        if not kinds:
            raise ValueError(f"cannot read video {path!r}: no streams found (truncated or corrupt file?)")
        raise ValueError(
            f"{path!r} has no video stream (found: {', '.join(kinds)}); not a video, or truncated/corrupt"
        )
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def read_video_frames(path: PathLike, indices: Sequence[int] | None = None) -> list[Image.Image]:
    """Decode frames of the first video stream of ``path`` as RGB PIL images.

    ``indices`` (decode order = presentation order, 0-based; repeats allowed, any order) selects
    frames; decoding stops after the largest requested index. ``None`` returns every frame.
    Raises ``ValueError`` naming the file if it cannot be opened or decoded, has no video stream,
    yields no frame, has fewer frames than requested, or (full read) fewer than its header lists.
    """
    path = os.fspath(path)
    if indices is not None:
        indices = [int(i) for i in indices]
        if any(i < 0 for i in indices):
            raise ValueError(f"negative frame index in {indices} for {path!r}")
    wanted = None if indices is None else set(indices)
    last = None if indices is None else max(indices, default=-1)

    container, stream = _open_video(path)
    expected = int(stream.frames)  # 0 when the container does not say
    decoded: dict[int, Image.Image] = {}
    count = 0
    try:
        if last is None or last >= 0:
            for frame in container.decode(stream):
                if wanted is None or count in wanted:
                    decoded[count] = frame.to_image()
                count += 1
                if last is not None and count > last:
                    break
    except av.FFmpegError as err:
        raise ValueError(f"cannot decode video {path!r} after {count} frames (corrupt?): {err}") from err
    finally:
        container.close()

    if indices is None:
        if count == 0:
            raise ValueError(f"no decodable video frame in {path!r}")
        if count < expected:
            raise ValueError(f"{path!r} looks truncated: its header lists {expected} frames, {count} decoded")
        return [decoded[i] for i in range(count)]
    missing = sorted(wanted - decoded.keys())
    if missing:
        raise ValueError(f"{path!r}: frame(s) {missing} requested but only {count} frame(s) could be decoded")
    return [decoded[i] for i in indices]


def count_frames(path: PathLike, exact: bool = False) -> int:
    """Number of frames of the first video stream of ``path``.

    Uses the container's frame count when it has one (mp4 does), else counts demuxed packets; with
    ``exact=True`` every frame is decoded (slow, but right even for truncated files). ``ValueError``
    naming the file when it cannot be read.
    """
    path = os.fspath(path)
    container, stream = _open_video(path)
    try:
        if not exact and stream.frames > 0:
            return int(stream.frames)
        if exact:
            return sum(1 for _ in container.decode(stream))
        logger.debug("%s has no frame count in its header; counting packets", path)
        return sum(1 for packet in container.demux(stream) if packet.size > 0)
    except av.FFmpegError as err:
        raise ValueError(f"cannot read video {path!r} (corrupt?): {err}") from err
    finally:
        container.close()


def read_clip(
    path: PathLike, frame_len: int, training: bool = False, rng: np.random.Generator | None = None
) -> list[Image.Image]:
    """The ``frame_len`` frames of the video file ``path`` that training (``rng`` draws them) or
    evaluation and inference (``training=False``: segment starts) see: ``sample_frame_indices``
    over the file's frame count, then decoded. Errors name the file."""
    return read_video_frames(path, sample_frame_indices(count_frames(path), frame_len, training, rng))


# --------------------------------------------------------------------------------------------------
# Images (base64 strings in JSON lines, or paths)
# --------------------------------------------------------------------------------------------------


def _where(source: object, field: str | None) -> str:
    parts = []
    if field is not None:
        parts.append(f"field {field!r}")
    if source is not None:
        parts.append(f"of {source}" if parts else str(source))
    return " ".join(parts) if parts else "<unnamed image>"


def _decode_image_bytes(raw: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(raw))
        try:
            img.load()
            return img.convert("RGB")
        finally:
            img.close()
    except _IMAGE_ERRORS as err:
        raise ValueError(f"corrupt image in {where}: {err}") from err


def decode_base64_image(data: str | bytes, *, source: object = None, field: str | None = None) -> Image.Image:
    """Decode a base64-encoded image file to an RGB PIL image.

    ``source`` (e.g. ``"shard-003.jsonl:17"``) and ``field`` (e.g. ``"binary"``) only serve the error
    message: a bad base64 string or an unreadable/truncated image raises ``ValueError`` naming both.
    """
    where = _where(source, field)
    try:
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError, TypeError) as err:
        raise ValueError(f"invalid base64 image in {where}: {err}") from err
    return _decode_image_bytes(raw, where)


def decode_base64_frames(
    frames: Sequence[str | bytes], indices: Sequence[int], *, source: object = None, field: str | None = None
) -> list[Image.Image]:
    """Decode the selected entries of a list of base64 frames (the official video-frame format)."""
    out = []
    for i in indices:
        if not 0 <= i < len(frames):
            raise ValueError(f"frame {i} requested but {_where(source, field)} has {len(frames)} frames")
        out.append(decode_base64_image(frames[i], source=source, field=f"{field or 'frames'}[{i}]"))
    return out


def load_image(
    path_or_b64: PathLike | bytes,
    *,
    is_path: bool | None = None,
    source: object = None,
    field: str | None = None,
) -> Image.Image:
    """Load an RGB image from a file path, a base64 string, or raw encoded bytes.

    ``is_path`` says how to read a ``str`` (the official ``is_image_rpath`` flag); ``None`` guesses:
    an existing file is a path, a long string of base64 characters is base64, anything else a path.
    ``bytes`` are the encoded image file itself. Errors: ``FileNotFoundError`` for a missing file,
    ``ValueError`` naming the file (or ``source``/``field``) for a corrupt one.
    """
    if isinstance(path_or_b64, bytes | bytearray):
        return _decode_image_bytes(bytes(path_or_b64), _where(source, field))
    value = path_or_b64
    if is_path is None:
        if isinstance(value, os.PathLike) or os.path.exists(value):
            is_path = True
        else:
            is_path = not (len(value) >= 32 and _BASE64_RE.match(value) is not None)
    if not is_path:
        return decode_base64_image(value, source=source, field=field)
    path = os.fspath(value)
    context = f" ({_where(source, field)})" if source is not None or field is not None else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}{context}")
    with open(path, "rb") as fh:
        raw = fh.read()
    return _decode_image_bytes(raw, f"file {path!r}{context}")
