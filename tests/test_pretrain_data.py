"""Tests of the streaming pre-training data pipeline: x2vlm.data.stream, .pretrain_samples, .pretrain."""

import base64
import io
import json
import logging
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from x2vlm.config import preset
from x2vlm.data import pretrain_samples
from x2vlm.data.pretrain import (
    PADDING_SOURCE,
    BadDataCounter,
    BadDataError,
    ImageTextBatch,
    PretrainLoader,
    RegionTextBatch,
    SourceConfig,
    TextBatch,
    VideoTextBatch,
)
from x2vlm.data.pretrain_samples import SampleDecoder
from x2vlm.data.stream import RawSample, ShardStream, Slot, StreamPosition, resolve_shards, shuffle_buffer
from x2vlm.data.transforms import region_patch_mask
from x2vlm.tokenizer import WordPieceTokenizer

RES = 32
MODEL = preset("x2vlm-tiny", image_res=RES)  # patch 16 -> 2x2 grid, frame_len 3
GRID_TOKENS = 1 + (RES // 16) ** 2


@pytest.fixture(scope="module")
def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_name_or_path("bert-base-uncased")


# ----------------------------------------------------------------------------- fixtures


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_b64(img: Image.Image) -> str:
    return base64.b64encode(encode_png(img)).decode()


def noise_image(seed: int, size=(40, 30)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def image_text_records(n: int, start: int = 0) -> list[dict]:
    return [{"binary": png_b64(noise_image(start + i)), "desc": [f"a photo of thing {start + i}", "another one"]}
            for i in range(n)]


def box_image(boxes, size=(64, 48)) -> Image.Image:
    """Black image with white boxes."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    for x, y, w, h in boxes:
        arr[y:y + h, x:x + w] = 255
    return Image.fromarray(arr)


def region_record(seed: int, caption: str | None = "the whole picture") -> dict:
    boxes = [[4 + seed % 5, 6, 20, 14], [34, 20, 24, 22]]
    record = {"binary": png_b64(box_image(boxes)),
              "elems": [{"bb": boxes[0], "caption": f"a white box {seed}", "attributes": "bright"},
                        {"bb": boxes[1], "caption": ["the second box", "another white box"]}]}
    if caption is not None:
        record["caption"] = caption
    return record


def write_video(path: Path, n: int = 12) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(n):
            arr = np.full((32, 32, 3), (20 * k, 200 - 10 * k, 100), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def source(kind: str, paths, **kw) -> SourceConfig:
    defaults = {"batch_size": 4, "max_tokens": 12, "max_masks": 4, "shuffle_buffer": 4}
    defaults.update(kw)
    return SourceConfig(kind=kind, paths=[str(p) for p in paths], **defaults)


def take(loader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def tensors(batch) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(batch).items() if isinstance(v, torch.Tensor)}


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.sources == y.sources
        tx, ty = tensors(x), tensors(y)
        assert tx.keys() == ty.keys()
        for key in tx:
            assert torch.equal(tx[key], ty[key]), key


def check_text_fields(batch, tokenizer, max_tokens=12, max_masks=4) -> None:
    n = len(batch.sources)
    for name in ("text_ids", "text_mask", "masked_ids"):
        t = getattr(batch, name)
        assert t.shape == (n, max_tokens) and t.dtype == torch.int64
    for name in ("masked_pos", "masked_targets"):
        t = getattr(batch, name)
        assert t.shape == (n, max_masks) and t.dtype == torch.int64
    for i in range(n):
        length = int(batch.text_mask[i].sum())
        assert batch.text_mask[i, :length].all() and not batch.text_mask[i, length:].any()
        assert batch.text_ids[i, 0] == tokenizer.cls_token_id and batch.text_ids[i, length - 1] == tokenizer.sep_token_id
        assert (batch.text_ids[i, length:] == tokenizer.pad_token_id).all()
        k = int((batch.masked_targets[i] != -100).sum())
        pos = batch.masked_pos[i, :k]
        assert torch.equal(batch.masked_targets[i, :k], batch.text_ids[i, pos])
        assert (pos > 0).all() and (pos < length - 1).all()  # never [CLS] / [SEP]
        unmasked = torch.ones(max_tokens, dtype=torch.bool)
        unmasked[pos] = False
        assert torch.equal(batch.masked_ids[i][unmasked], batch.text_ids[i][unmasked])


# ----------------------------------------------------------------------------- config


def test_source_config_defaults_and_errors():
    cfg = SourceConfig.from_dict({"kind": "image_text", "paths": "a.jsonl,b.jsonl", "batch_size": 8})
    assert (cfg.image_key, cfg.caption_key, cfg.paths) == ("binary", "desc", ["a.jsonl", "b.jsonl"])
    assert SourceConfig(kind="video_text", paths=["v"], batch_size=2).image_key == "video_frames"
    assert cfg.masking.max_masks == 12 and cfg.max_regions == 5 and cfg.min_perc_in_image == 0.5
    with pytest.raises(ValueError, match="unknown key.*'batch_szie'"):
        SourceConfig.from_dict({"kind": "image_text", "paths": ["a"], "batch_szie": 8})
    with pytest.raises(ValueError, match="max_images"):
        SourceConfig(kind="region_text", paths=["a"], batch_size=8)
    with pytest.raises(ValueError, match="kind"):
        SourceConfig(kind="images", paths=["a"], batch_size=8)
    with pytest.raises(ValueError, match="caption_key"):
        SourceConfig(kind="region_text", paths=["a"], batch_size=8, max_images=2, caption_key="desc")


# ----------------------------------------------------------------------------- batches


def test_image_text_batch_shapes_and_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "it.jsonl", image_text_records(6))
    (batch,) = take(PretrainLoader(source("image_text", [path]), MODEL, tokenizer, seed=3), 1)
    assert isinstance(batch, ImageTextBatch)
    assert batch.images.shape == (4, 3, RES, RES) and batch.images.dtype == torch.float32
    assert all(s.startswith(f"{path}:") for s in batch.sources) and len(set(batch.sources)) == 4
    check_text_fields(batch, tokenizer)
    assert batch.info.num_raw == 4 and batch.skipped == []
    moved = batch.to("cpu")
    assert isinstance(moved, ImageTextBatch) and torch.equal(moved.images, batch.images)


def test_text_only_batch_and_language(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": {"en": f"english text {i}", "de": "deutscher text"}}
                                              for i in range(5)])
    (batch,) = take(PretrainLoader(source("text", [path], language="en"), MODEL, tokenizer), 1)
    assert isinstance(batch, TextBatch)
    check_text_fields(batch, tokenizer)
    for row in batch.text_ids:
        assert tokenizer.decode(row).startswith("english text")


def test_same_seed_same_tensors_other_seed_differs(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "it.jsonl", image_text_records(6))
    cfg = source("image_text", [path])
    a = take(PretrainLoader(cfg, MODEL, tokenizer, seed=7), 3)
    b = take(PretrainLoader(cfg, MODEL, tokenizer, seed=7), 3)
    c = take(PretrainLoader(cfg, MODEL, tokenizer, seed=8), 3)
    assert_same_batches(a, b)
    assert any(not torch.equal(x.images, y.images) for x, y in zip(a, c))


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("kind,num_workers", [("image_text", 0), ("image_text", 2), ("region_text", 2)])
def test_exact_resume(tmp_path, tokenizer, kind, num_workers):
    if kind == "image_text":
        paths = [write_jsonl(tmp_path / f"s{k}.jsonl", image_text_records(5, 10 * k)) for k in range(3)]
        cfg = source(kind, paths, batch_size=3)
    else:
        paths = [write_jsonl(tmp_path / "r.jsonl", [region_record(i) for i in range(7)])]
        cfg = source(kind, paths, batch_size=5, max_images=2)
    uninterrupted = take(PretrainLoader(cfg, MODEL, tokenizer, seed=5, num_workers=num_workers), 8)

    first = PretrainLoader(cfg, MODEL, tokenizer, seed=5, num_workers=num_workers)
    assert_same_batches(take(first, 3), uninterrupted[:3])  # odd: the next batch is worker 1's turn
    state = json.loads(json.dumps(first.state_dict()))  # plain data
    resumed = PretrainLoader(cfg, MODEL, tokenizer, seed=5, num_workers=num_workers, state=state)
    assert_same_batches(take(resumed, 5), uninterrupted[3:])
    assert resumed.state_dict()["batches_delivered"] == 8


def test_resume_replays_without_decoding(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "it.jsonl", image_text_records(9))
    cfg = source("image_text", [path], batch_size=2)
    loader = PretrainLoader(cfg, MODEL, tokenizer)
    take(loader, 3)
    calls = []
    original = SampleDecoder.__call__
    monkeypatch.setattr(SampleDecoder, "__call__", lambda self, raw, rng: calls.append(raw) or original(self, raw, rng))
    take(PretrainLoader(cfg, MODEL, tokenizer, state=loader.state_dict()), 1)
    assert len(calls) == 2


def test_resume_state_must_match(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "it.jsonl", image_text_records(4))
    state = PretrainLoader(source("image_text", [path]), MODEL, tokenizer, num_workers=0).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        PretrainLoader(source("image_text", [path]), MODEL, tokenizer, num_workers=2, state=state)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_leaves_global_rng_alone(tmp_path, tokenizer, num_workers):
    path = write_jsonl(tmp_path / "it.jsonl", image_text_records(4))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(PretrainLoader(source("image_text", [path], batch_size=2), MODEL, tokenizer, num_workers=num_workers), 2)
    assert torch.equal(torch.rand(3), expected)


def test_loader_continues_across_iterators(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "it.jsonl", image_text_records(7))
    cfg = source("image_text", [path], batch_size=2)
    reference = take(PretrainLoader(cfg, MODEL, tokenizer), 4)
    loader = PretrainLoader(cfg, MODEL, tokenizer)
    assert_same_batches(take(loader, 2) + take(loader, 2), reference)


# ----------------------------------------------------------------------------- sharding and shuffling


def epoch_sources(shards, world_size, num_workers, epoch=0):
    per_slot = {}
    for rank in range(world_size):
        for worker in range(num_workers):
            stream = ShardStream(shards, Slot(rank, world_size, worker, num_workers), (1, rank, worker), 3)
            per_slot[rank, worker] = [s.source for s in stream.epoch(epoch)]
    return per_slot


@pytest.mark.parametrize("num_shards,lines", [(5, 4), (1, 9), (3, 3)])
def test_slots_disjoint_and_covering(tmp_path, num_shards, lines):
    shards = resolve_shards([write_jsonl(tmp_path / f"s{k}.jsonl", [{"i": i} for i in range(lines)])
                             for k in range(num_shards)])
    everything = sorted(f"{s}:{n}" for s in shards for n in range(1, lines + 1))
    per_slot = epoch_sources(shards, world_size=2, num_workers=2)
    seen = [src for sources in per_slot.values() for src in sources]
    assert sorted(seen) == everything  # disjoint and covering
    assert all(per_slot.values())  # nobody starves, also with fewer shards than slots
    sizes = [len(v) for v in per_slot.values()]
    assert max(sizes) - min(sizes) <= (lines if num_shards >= 4 else num_shards)


def test_epochs_reshuffle_and_buffer_shuffles(tmp_path):
    shards = resolve_shards([write_jsonl(tmp_path / f"s{k}.jsonl", [{"i": i} for i in range(6)]) for k in range(4)])
    stream = ShardStream(shards, Slot(0, 1, 0, 1), (0,), 4)
    e0, e1 = [s.source for s in stream.epoch(0)], [s.source for s in stream.epoch(1)]
    assert sorted(e0) == sorted(e1) and e0 != e1
    in_file_order = [f"{s}:{n}" for s in shards for n in range(1, 7)]
    assert e0 != in_file_order
    it = stream.iterate(StreamPosition(1, 22))  # resumes late in epoch 1 and wraps into epoch 2
    got = [next(it) for _ in range(3)]
    assert [(e, i) for _, e, i in got] == [(1, 22), (1, 23), (2, 0)]
    assert got[0][0].source == e1[22]
    assert list(shuffle_buffer(range(5), 1, np.random.default_rng(0))) == list(range(5))


def test_rank_split_one_shard_two_ranks(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "it.jsonl", image_text_records(8))
    cfg = source("image_text", [path], batch_size=4)
    rows = [take(PretrainLoader(cfg, MODEL, tokenizer, rank=r, world_size=2), 1)[0].sources for r in range(2)]
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == sorted(f"{path}:{n}" for n in range(1, 9))


def test_webdataset_tar_via_fsspec_url(tmp_path, tokenizer):
    folder = tmp_path / "wds"
    folder.mkdir()

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for k in range(2):
        with tarfile.open(folder / f"shard-{k}.tar", "w") as tar:
            for i in range(3):
                key = f"{k:02d}{i:04d}"
                add(tar, f"{key}.jpg" if i % 2 else f"{key}.png", encode_png(noise_image(10 * k + i)))
                if i == 2:  # caption in a .txt member, metadata in .json
                    add(tar, f"{key}.txt", b"a caption from a text member")
                    add(tar, f"{key}.json", json.dumps({"url": "x"}).encode())
                else:
                    add(tar, f"{key}.json", json.dumps({"desc": f"tar sample {key}"}).encode())
    (folder / "_SUCCESS").write_text("")
    url = folder.as_uri()
    assert url.startswith("file://")
    assert len(resolve_shards([url])) == 2
    (batch,) = take(PretrainLoader(source("image_text", [url], batch_size=6), MODEL, tokenizer), 1)
    assert batch.skipped == [] and batch.images.shape == (6, 3, RES, RES)
    assert sorted(batch.sources) == sorted(f"{url}/shard-{k}.tar:{k:02d}{i:04d}" for k in range(2) for i in range(3))
    texts = [tokenizer.decode(row) for row in batch.text_ids]
    assert "a caption from a text member" in texts and "tar sample 000000" in texts
    # A json-lines file through a file:// URL too.
    path = write_jsonl(tmp_path / "it.jsonl", image_text_records(4))
    (batch,) = take(PretrainLoader(source("image_text", [path.as_uri()]), MODEL, tokenizer), 1)
    assert len(batch.sources) == 4 and batch.sources[0].startswith("file://")


# ----------------------------------------------------------------------------- regions


def check_region_batch(batch: RegionTextBatch, batch_size: int, num_images: int) -> None:
    assert batch.images.shape == (num_images, 3, RES, RES)
    assert batch.image_index.shape == (batch_size,) and batch.image_index.dtype == torch.int64
    assert batch.region_mask.shape == (batch_size, GRID_TOKENS) and batch.region_mask.dtype == torch.int64
    assert batch.target_boxes.shape == (batch_size, 4) and batch.target_boxes.dtype == torch.float32
    assert batch.is_image.dtype == torch.bool and batch.valid.dtype == torch.bool
    assert len(batch.sources) == batch_size
    n_valid = int(batch.valid.sum())
    assert batch.valid[:n_valid].all() and not batch.valid[n_valid:].any()  # padding at the end
    assert (batch.image_index < num_images).all()
    rows = set()
    for i in range(batch_size):
        if not batch.valid[i]:
            assert batch.sources[i] == PADDING_SOURCE and batch.is_image[i]
            assert (batch.masked_targets[i] == -100).all() and batch.text_mask[i].sum() == 2
            continue
        key = (int(batch.image_index[i]), tuple(batch.text_ids[i].tolist()), tuple(batch.target_boxes[i].tolist()))
        assert key not in rows  # no duplicated positives
        rows.add(key)
        cx, cy, w, h = batch.target_boxes[i].tolist()
        if batch.is_image[i]:
            assert (cx, cy, w, h) == (0.5, 0.5, 1.0, 1.0) and batch.region_mask[i].all()
            continue
        assert 0 <= cx - w / 2 + 1e-5 and cx + w / 2 <= 1 + 1e-5 and 0 <= cy - h / 2 + 1e-5 and cy + h / 2 <= 1 + 1e-5
        box = ((cx - w / 2) * RES, (cy - h / 2) * RES, w * RES, h * RES)
        assert torch.equal(batch.region_mask[i], region_patch_mask(box, RES, 16))
        # The box follows the pixels: it covers a white box of the black image.
        image = batch.images[int(batch.image_index[i])].mean(0)
        x0, y0 = int(np.ceil(box[0])) + 1, int(np.ceil(box[1])) + 1
        x1, y1 = int(box[0] + box[2]) - 1, int(box[1] + box[3]) - 1
        if x1 > x0 and y1 > y0:
            assert image[y0:y1, x0:x1].mean() > image.mean()


def test_region_batches_pad_and_subset(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "r.jsonl", [region_record(i, caption=None if i % 3 == 0 else "whole")
                                              for i in range(9)])
    for batch in take(PretrainLoader(source("region_text", [path], batch_size=8, max_images=2), MODEL, tokenizer), 4):
        assert isinstance(batch, RegionTextBatch)
        check_region_batch(batch, 8, 2)
        assert not batch.valid.all()  # 2 images x at most 3 items < 8 rows
        check_text_fields(batch, tokenizer)
    for batch in take(PretrainLoader(source("region_text", [path], batch_size=3, max_images=3), MODEL, tokenizer), 3):
        check_region_batch(batch, 3, 3)
        assert batch.valid.all()  # more items than rows: a random subset


def test_region_careful_hflip_uses_whole_words(tmp_path, tokenizer, monkeypatch):
    seen = []
    original = pretrain_samples.sample_region_view

    def spy(*args, allow_flip=True):
        seen.append(allow_flip)
        return original(*args, allow_flip=allow_flip)

    monkeypatch.setattr(pretrain_samples, "sample_region_view", spy)
    left = region_record(0)
    left["elems"][1]["caption"] = "the box on the left"
    path = write_jsonl(tmp_path / "r.jsonl", [left, region_record(1)])  # record 1 only says "bright"
    decoder = SampleDecoder(source("region_text", [path], max_images=1, careful_hflip=True), MODEL, tokenizer)
    for line in path.read_text().splitlines():
        decoder(RawSample(source="x:1", line=line.encode()), np.random.default_rng(0))
    assert seen == [False, True]


# ----------------------------------------------------------------------------- video


def test_video_file_base64_frames_and_clips(tmp_path, tokenizer):
    video = write_video(tmp_path / "v.mp4")
    frame = png_b64(noise_image(3, (40, 40)))  # identical frames: one augmentation -> identical outputs
    clips = [[frame] * 3, [frame] * 3, [frame] * 3]
    records = [
        {"video_frames": str(video), "text": "a coloured video"},
        {"video_frames": [frame] * 5, "text": ["five equal frames"]},
        {"video_frames": clips, "text": ["first clip", "[Music]", "third clip"], "is_continuous": True},
        {"video_frames": clips, "text": ["first clip", "[Music]", "third clip"], "is_continuous": False},
    ]
    path = write_jsonl(tmp_path / "v.jsonl", records)
    cfg = source("video_text", [path], batch_size=4, min_frames_before_sampling=6)
    (batch,) = take(PretrainLoader(cfg, MODEL, tokenizer), 1)
    assert isinstance(batch, VideoTextBatch) and batch.skipped == []
    assert batch.videos.shape == (4, 3, 3, RES, RES) and batch.videos.dtype == torch.float32
    check_text_fields(batch, tokenizer)
    rows = {int(s.rsplit(":", 1)[1]): i for i, s in enumerate(batch.sources)}
    for line in (2, 3, 4):
        clip = batch.videos[rows[line]]
        assert torch.equal(clip[0], clip[1]) and torch.equal(clip[1], clip[2])
    assert tokenizer.decode(batch.text_ids[rows[3]]) == "first clip third clip"  # window over all clips
    assert tokenizer.decode(batch.text_ids[rows[4]]) in ("first clip", "third clip")
    file_clip = batch.videos[rows[1]]
    assert not torch.equal(file_clip[0], file_clip[2])  # different frames of the coloured video
    # A WebDataset shard with an mp4 member.
    with tarfile.open(tmp_path / "videos.tar", "w") as tar:
        for name, data in (("clip1.mp4", video.read_bytes()), ("clip1.json", b'{"text": "from a tar"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (batch,) = take(PretrainLoader(source("video_text", [tmp_path / "videos.tar"], batch_size=1), MODEL, tokenizer), 1)
    assert batch.skipped == [] and batch.sources == [f"{tmp_path / 'videos.tar'}:clip1"]
    assert batch.videos.shape == (1, 3, 3, RES, RES) and tokenizer.decode(batch.text_ids[0]) == "from a tar"


def test_one_augmentation_per_clip(tmp_path, tokenizer):
    frames = [png_b64(noise_image(5, (48, 40)))] * 3
    path = write_jsonl(tmp_path / "v.jsonl", [{"video_frames": frames, "text": "same frame"}])
    decoder = SampleDecoder(source("video_text", [path]), MODEL, tokenizer)
    for seed in range(4):
        pixels = decoder(RawSample("x:1", line=path.read_text().strip().encode()), np.random.default_rng(seed)).pixels
        assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2])


# ----------------------------------------------------------------------------- bad data


def test_every_bad_kind_is_skipped_with_its_location(tmp_path, tokenizer, caplog):
    good = image_text_records(3)
    image_lines = [
        good[0],
        "{not json",  # 2
        {"desc": "no image"},  # 3
        {"binary": base64.b64encode(b"not an image at all, just text").decode() * 2, "desc": "x"},  # 4
        {"binary": good[1]["binary"], "desc": "..."},  # 5: empty after pre_caption
        {"binary": good[1]["binary"], "desc": ""},  # 6
        {"binary": str(tmp_path / "missing.png"), "desc": "a missing file"},  # 7
        good[1],
        {"binary": good[2]["binary"], "desc": 5},  # 9
        good[2],
    ]
    region_ok = region_record(0)
    far, flat = region_record(1), region_record(2)
    far["elems"][0]["bb"] = [500, 500, 10, 10]
    flat["elems"][1]["bb"] = [3, 3, 0, 5]
    nobox = region_record(3)
    del nobox["elems"][0]["bb"]
    video_bad = tmp_path / "bad.mp4"
    video_bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated garbage")
    cases = {
        "image_text": (image_lines, {2: "broken_json", 3: "missing_field", 4: "bad_image", 5: "empty_caption",
                                     6: "empty_caption", 7: "bad_image", 9: "invalid_field"}),
        "region_text": ([region_ok, far, flat, nobox, region_ok],
                        {2: "bad_box", 3: "bad_box", 4: "missing_field"}),
        "video_text": ([{"video_frames": str(video_bad), "text": "broken"},
                        {"video_frames": ["bm90IGFuIGltYWdl" * 4] * 2, "text": "bad frames"},
                        {"video_frames": str(write_video(tmp_path / "ok.mp4")), "text": "fine"}],
                       {1: "bad_video", 2: "bad_video"}),
    }
    for kind, (lines, expected) in cases.items():
        path = write_jsonl(tmp_path / f"{kind}.jsonl", lines)
        n_good = len(lines) - len(expected)
        batch_size = 4 * n_good if kind == "region_text" else n_good  # regions: keep every item
        cfg = source(kind, [path], batch_size=batch_size, max_images=n_good, max_bad_fraction=1.0, shuffle_buffer=0)
        loader = PretrainLoader(cfg, MODEL, tokenizer)
        with caplog.at_level(logging.WARNING, logger="x2vlm.data.pretrain"):
            (batch,) = take(loader, 1)
        assert {s.source: s.reason for s in batch.skipped} == {f"{path}:{n}": r for n, r in expected.items()}
        assert sorted(int(s.rsplit(":", 1)[1]) for s in set(batch.sources) - {PADDING_SOURCE}) == \
            sorted(set(range(1, len(lines) + 1)) - set(expected))
        assert loader.bad_data.bad == len(expected) and loader.bad_data.samples == len(lines)
        assert sum(loader.bad_data.reasons.values()) == len(expected)
        for n in expected:
            assert f"{path}:{n}" in caplog.text


def test_bad_fraction_limit_raises_naming_sources(tmp_path, tokenizer):
    lines = [image_text_records(1)[0]] + ["{broken"] * 3
    path = write_jsonl(tmp_path / "bad.jsonl", lines * 3)
    cfg = source("image_text", [path], batch_size=1, max_bad_fraction=0.5, bad_check_after=6, shuffle_buffer=0)
    it = iter(PretrainLoader(cfg, MODEL, tokenizer))
    next(it), next(it)  # 1, then 5 samples read (3 bad): below bad_check_after
    with pytest.raises(BadDataError, match=rf"6 of 9 samples.*{path}:8 \(broken_json"):
        next(it)


def test_all_bad_data_stops_in_the_worker(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{broken"] * 4)
    cfg = source("image_text", [path], batch_size=2, bad_check_after=10)
    with pytest.raises(BadDataError, match="last 10 samples read were all unusable"):
        take(PretrainLoader(cfg, MODEL, tokenizer, num_workers=1), 1)


def test_bad_data_counter_state_round_trip():
    counter = BadDataCounter("x", max_bad_fraction=0.4, min_samples=4)
    counter.update(3, [("f:1", "bad_image", "corrupt")])  # 1/3 bad, but only 3 samples
    other = BadDataCounter("x", max_bad_fraction=0.4, min_samples=4)
    other.load_state_dict(json.loads(json.dumps(counter.state_dict())))
    assert (other.samples, other.bad, dict(other.reasons)) == (3, 1, {"bad_image": 1})
    with pytest.raises(BadDataError, match=r"f:2 \(empty_caption"):
        other.update(1, [("f:2", "empty_caption", "")])


def test_unreadable_shard_is_reported_and_the_stream_goes_on(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "a.jsonl", image_text_records(3))
    (tmp_path / "b.tar").write_bytes(b"this is not a tar archive" * 40)
    cfg = source("image_text", [good, tmp_path / "b.tar"], batch_size=3, max_bad_fraction=1.0)
    loader = PretrainLoader(cfg, MODEL, tokenizer)
    batches = take(loader, 2)  # two epochs: the broken shard is met once in each
    assert all(sorted(b.sources) == [f"{good}:{n}" for n in (1, 2, 3)] for b in batches)
    assert loader.bad_data.reasons == {"bad_shard": sum(len(b.skipped) for b in batches)} and loader.bad_data.bad >= 1
    assert all(s.source == str(tmp_path / "b.tar") for b in batches for s in b.skipped)
