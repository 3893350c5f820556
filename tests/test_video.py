"""Tests of x2vlm.data.video: frame sampling, PyAV decoding, base64/path image loading."""

import base64
import io
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from x2vlm.data.video import (
    count_frames,
    decode_base64_frames,
    decode_base64_image,
    load_image,
    read_video_frames,
    sample_frame_indices,
)

N_FRAMES = 12


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def frame_colour(k: int) -> tuple[int, int, int]:
    return (20 * k, 200 - 10 * k, 100)


def write_video(path: Path, codec: str = "mpeg4", n: int = N_FRAMES, options: dict | None = None) -> Path:
    """A 32x32 yuv420p clip at 12 fps whose frame k is a solid ``frame_colour(k)``."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=12)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(n):
            arr = np.empty((32, 32, 3), dtype=np.uint8)
            arr[...] = frame_colour(k)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def mean_colour(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)


# ----------------------------------------------------------------------------- frame sampling


def test_eval_sampling_short_equal_long():
    assert sample_frame_indices(3, 5, training=False) == [0, 0, 1, 1, 2]  # all + cyclic repeats, sorted
    assert sample_frame_indices(2, 7, training=False) == [0, 0, 0, 0, 1, 1, 1]
    assert sample_frame_indices(5, 5, training=False) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(10, 3, training=False) == [0, 4, 7]  # segments 4, 3, 3
    assert sample_frame_indices(9, 3, training=False) == [0, 3, 6]
    assert sample_frame_indices(100, 1, training=False) == [0]


def test_train_sampling_short_and_equal():
    for seed in range(50):
        idx = sample_frame_indices(3, 5, training=True, rng=rng(seed))
        assert len(idx) == 5 and idx == sorted(idx) and set(idx) == {0, 1, 2}
        assert sample_frame_indices(5, 5, training=True, rng=rng(seed)) == [0, 1, 2, 3, 4]
    repeats = {tuple(sample_frame_indices(3, 5, training=True, rng=rng(s))) for s in range(50)}
    assert len(repeats) > 1  # repeats are random, not cyclic


def test_train_sampling_long_segments():
    first_segment_lengths = set()
    for seed in range(200):
        idx = sample_frame_indices(10, 3, training=True, rng=rng(seed))
        assert len(idx) == 3 and all(0 <= i < 10 for i in idx)
        assert idx[0] < idx[1] < idx[2]
        # Segments are 4, 3, 3 frames in some order: the first one ends at 3 or 4.
        assert idx[0] <= 3 and idx[2] >= 6
        first_segment_lengths.add(idx[0] == 3)
        idx9 = sample_frame_indices(9, 3, training=True, rng=rng(seed))
        assert 0 <= idx9[0] <= 2 and 3 <= idx9[1] <= 5 and 6 <= idx9[2] <= 8
    assert first_segment_lengths == {True, False}
    picked = [i for s in range(400) for i in sample_frame_indices(9, 3, True, rng(s))]
    counts = np.bincount(picked, minlength=9)
    assert counts.min() > 80  # every frame of every segment gets picked


def test_sampling_determinism_and_errors():
    assert sample_frame_indices(50, 8, True, rng(1)) == sample_frame_indices(50, 8, True, rng(1))
    with pytest.raises(ValueError):
        sample_frame_indices(0, 3, training=False)
    with pytest.raises(ValueError):
        sample_frame_indices(5, 0, training=False)
    with pytest.raises(ValueError):
        sample_frame_indices(5, 3, training=True)  # no rng


# ----------------------------------------------------------------------------- video decoding


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def mp4(video_dir) -> Path:
    return write_video(video_dir / "clip.mp4")


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_decode_all_frames(video_dir, codec):
    # both encoders ship with PyAV's bundled FFmpeg; the world generator relies on libx264
    assert codec in av.codecs_available
    path = write_video(video_dir / f"all_{codec}.mp4", codec=codec)
    assert count_frames(path) == N_FRAMES
    assert count_frames(path, exact=True) == N_FRAMES
    frames = read_video_frames(path)
    assert len(frames) == N_FRAMES
    for k, f in enumerate(frames):
        assert f.size == (32, 32) and f.mode == "RGB"
        assert np.abs(mean_colour(f) - frame_colour(k)).max() < 8


def test_decode_selected_frames_in_requested_order(mp4):
    frames = read_video_frames(mp4, [11, 0, 5, 5])
    assert len(frames) == 4
    for f, k in zip(frames, [11, 0, 5, 5]):
        assert np.abs(mean_colour(f) - frame_colour(k)).max() < 8
    assert read_video_frames(mp4, []) == []
    indices = sample_frame_indices(count_frames(mp4), 3, training=False)
    for f, k in zip(read_video_frames(mp4, indices), indices):
        assert np.abs(mean_colour(f) - frame_colour(k)).max() < 8


def test_index_out_of_range(mp4):
    with pytest.raises(ValueError, match="clip.mp4"):
        read_video_frames(mp4, [3, N_FRAMES])
    with pytest.raises(ValueError):
        read_video_frames(mp4, [-1])


def test_truncated_mp4_raises_naming_file(mp4, video_dir):
    data = mp4.read_bytes()
    cut = video_dir / "cut_in_half.mp4"  # the index (moov) is at the end: it is lost
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut_in_half.mp4"):
        read_video_frames(cut)
    with pytest.raises(ValueError, match="cut_in_half.mp4"):
        count_frames(cut)


def test_truncated_faststart_mp4_is_detected(video_dir):
    full = write_video(video_dir / "faststart.mp4", options={"movflags": "faststart"})
    data = full.read_bytes()
    cut = video_dir / "faststart_cut.mp4"  # header intact, last frames missing
    cut.write_bytes(data[: int(len(data) * 0.9)])
    with pytest.raises(ValueError, match="faststart_cut.mp4"):
        read_video_frames(cut)
    assert len(read_video_frames(cut, [0, 1])) == 2  # what is there can still be read


def test_garbage_file_raises_naming_file(video_dir):
    bad = video_dir / "garbage.mp4"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="garbage.mp4"):
        read_video_frames(bad)


def test_no_video_stream(video_dir):
    path = video_dir / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(ValueError, match="sound.wav.*no video stream"):
        read_video_frames(path)


def test_missing_video_file(video_dir):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video_frames(video_dir / "nope.mp4")


# ----------------------------------------------------------------------------- images


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_png() -> bytes:
    arr = np.zeros((6, 8, 3), dtype=np.uint8)
    arr[:, :4] = (255, 0, 0)
    arr[:, 4:] = (0, 0, 255)
    return encode(Image.fromarray(arr))


def test_decode_base64_image_roundtrip(small_png):
    img = decode_base64_image(base64.b64encode(small_png).decode())
    assert img.size == (8, 6) and img.mode == "RGB"
    assert tuple(np.asarray(img)[0, 0]) == (255, 0, 0) and tuple(np.asarray(img)[0, 7]) == (0, 0, 255)
    rgba = decode_base64_image(base64.b64encode(encode(Image.new("RGBA", (3, 3), (1, 2, 3, 0)))))
    assert rgba.mode == "RGB"
    jpeg = decode_base64_image(base64.b64encode(encode(Image.new("RGB", (16, 16), (10, 200, 30)), "JPEG")))
    assert np.abs(mean_colour(jpeg) - (10, 200, 30)).max() < 4


def test_corrupt_base64_image_names_source_and_field(small_png):
    truncated = base64.b64encode(small_png[: len(small_png) // 2]).decode()
    with pytest.raises(ValueError, match=r"field 'binary' of shard-3.jsonl:17"):
        decode_base64_image(truncated, source="shard-3.jsonl:17", field="binary")
    not_an_image = base64.b64encode(b"hello, this is not an image at all").decode()
    with pytest.raises(ValueError, match="binary"):
        decode_base64_image(not_an_image, source="x.jsonl:1", field="binary")
    with pytest.raises(ValueError, match="x.jsonl:2"):
        decode_base64_image("abc", source="x.jsonl:2", field="binary")  # bad padding


def test_decode_base64_frames(small_png):
    frames = [base64.b64encode(small_png).decode(), "!!!!"]
    assert len(decode_base64_frames(frames, [0, 0], source="v.json")) == 2
    with pytest.raises(ValueError, match=r"video_frames\[1\]"):
        decode_base64_frames(frames, [1], source="v.json", field="video_frames")
    with pytest.raises(ValueError):
        decode_base64_frames(frames, [2], source="v.json")


def test_load_image_path_base64_bytes(tmp_path, small_png):
    path = tmp_path / "ok.png"
    path.write_bytes(small_png)
    for value in (path, str(path), base64.b64encode(small_png).decode(), small_png):
        img = load_image(value)
        assert img.size == (8, 6) and img.mode == "RGB"
    assert load_image(str(path), is_path=True).size == (8, 6)


def test_load_image_corrupt_and_missing_files(tmp_path, small_png):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(small_png[:40])
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(FileNotFoundError):
        load_image("images/coco/train2014/x.jpg", is_path=True)
