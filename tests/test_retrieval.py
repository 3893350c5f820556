"""Retrieval metrics on hand-built score matrices; batched re-ranking equals the official loop."""

import numpy as np
import pytest
import torch
from conftest import ThreadGather, build_tiny, tiny_finetune_config

from x2vlm.tasks.retrieval import (
    NOT_A_CANDIDATE,
    encode_gallery,
    ranks_of_ground_truth,
    recall_metrics,
    two_stage_scores,
)

# 3 images; image 0 has texts 0,1; image 1 has texts 2,3; image 2 has text 4.
IMG2TXT = [[0, 1], [2, 3], [4]]
TXT2IMG = [0, 0, 1, 1, 2]


def test_ranks_with_several_positives_and_ties():
    scores = np.array([
        [0.1, 0.9, 0.5, 0.2, 0.0],   # positive text 1 is first -> rank 0
        [0.9, 0.8, 0.7, 0.1, 0.6],   # best positive (text 2, 0.7) has 2 above -> rank 2
        [0.5, 0.5, 0.5, 0.5, 0.5],   # all tied: counts against the ground truth -> rank 4
    ])
    assert ranks_of_ground_truth(scores, IMG2TXT).tolist() == [0, 2, 4]


def test_recall_metrics_known_values():
    score_i2t = np.array([
        [0.1, 0.9, 0.5, 0.2, 0.0],
        [0.9, 0.8, 0.7, 0.1, 0.6],
        [0.5, 0.5, 0.5, 0.5, 0.5],
    ])
    score_t2i = np.array([  # rows = texts; ranks 0, 1, 0, 2, 0
        [0.9, 0.1, 0.0],
        [0.5, 0.6, 0.1],
        [0.0, 0.9, 0.2],
        [0.7, 0.1, 0.8],
        [0.1, 0.2, 0.3],
    ])
    m = recall_metrics(score_i2t, score_t2i, IMG2TXT, TXT2IMG)
    assert m["txt_r1"] == pytest.approx(100 / 3) and m["txt_r5"] == 100.0 and m["txt_r10"] == 100.0
    assert m["img_r1"] == pytest.approx(60.0) and m["img_r5"] == 100.0
    assert m["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def test_recall_requires_a_positive():
    with pytest.raises(ValueError, match="query 1 has no positive"):
        ranks_of_ground_truth(np.zeros((2, 2)), [[0], []])


@torch.no_grad()
def test_batched_reranking_equals_the_official_per_query_loop(tiny_state):
    model = build_tiny("retrieval", tiny_state)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 3, 64, 64, generator=g)
    ids = torch.randint(104, 512, (10, 9), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[3, 5:] = 0
    k = 4
    gallery = encode_gallery(model, images, ids, mask, batch_size=4)
    sims, score_i2t, score_t2i = two_stage_scores(model, gallery, k_test=k, batch_size=7)
    # the official procedure: one query at a time, its top-k candidates fused in one forward
    ref_i2t = torch.full_like(score_i2t, NOT_A_CANDIDATE)
    for i in range(6):
        top = sims[i].topk(k).indices
        fused = model.fuse(gallery.text_states[top], mask[top], gallery.vision_embeds[i].expand(k, -1, -1), gallery.vision_mask[i].expand(k, -1))
        ref_i2t[i, top] = model.itm_logits(fused)[:, 1]
    ref_t2i = torch.full_like(score_t2i, NOT_A_CANDIDATE)
    for t in range(10):
        top = sims[:, t].topk(k).indices
        fused = model.fuse(gallery.text_states[t].expand(k, -1, -1), mask[t].expand(k, -1), gallery.vision_embeds[top], gallery.vision_mask[top])
        ref_t2i[t, top] = model.itm_logits(fused)[:, 1]
    assert torch.equal(score_i2t == NOT_A_CANDIDATE, ref_i2t == NOT_A_CANDIDATE)  # same candidates
    torch.testing.assert_close(score_i2t, ref_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(score_t2i, ref_t2i, atol=1e-5, rtol=0)


# -- fine-tuning task, cached re-ranking, chunking, sharding --------------------------------------------
import json
import sys
import threading
from pathlib import Path

import torch.nn.functional as F
from PIL import Image

from x2vlm.config import preset
from x2vlm.objectives import matching_logits, matching_loss, sample_negatives
from x2vlm.tasks.common import EvalContext
from x2vlm.tasks.retrieval import (
    RECALL_KEYS,
    RerankSettings,
    RetrievalBatch,
    Sharding,
    TensorVision,
    build_task,
    cached_itm_scores,
    itm_scores,
    retrieval_loss,
    two_stage_retrieval,
)
from x2vlm.tokenizer import WordPieceTokenizer
from x2vlm.train.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def retrieval_world(tmp_path_factory) -> Path:
    from x2vlm.world import generate

    root = tmp_path_factory.mktemp("retrieval_world")
    generate(root, size="tiny", seed=1, image_size=64)
    return root


def image_data(world: Path, **changes) -> dict:
    k = world / "karpathy"
    return {"train_files": [str(k / "coco_karpathy_train.json")], "val_file": str(k / "coco_karpathy_val.json"),
            "test_file": str(k / "coco_karpathy_test.json"), "image_root": str(world / "images"), "k_test": 4, **changes}


def video_data(world: Path, **changes) -> dict:
    m = world / "msrvtt"
    return {"train_files": [str(m / "msrvtt_ret_train.json")], "val_file": str(m / "msrvtt_ret_val.json"),
            "test_file": str(m / "msrvtt_ret_test.json"), "image_root": str(world / "videos"), "video": True, "k_test": 3, **changes}


def random_gallery(num_images=7, num_texts=11, seed=3):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_images, 3, 64, 64, generator=g)
    ids = torch.randint(104, 512, (num_texts, 9), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[num_texts // 2, 5:] = 0
    mask[-1, 4:] = 0
    return pixels, ids, mask


def test_build_task_validates_its_data_section(retrieval_world, tokenizer):
    cfg = preset("x2vlm-tiny")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['k_tset'\]"):
        build_task(image_data(retrieval_world, k_tset=3), cfg, tokenizer, "data")
    data = image_data(retrieval_world)
    del data["val_file"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['val_file'\]"):
        build_task(data, cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="'hflip' must be"):
        build_task(image_data(retrieval_world, hflip="sometimes"), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="'crop_scale'"):
        build_task(image_data(retrieval_world, crop_scale=[0.8, 0.5]), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="'k_test' must be a positive integer"):
        build_task(image_data(retrieval_world, k_test=0), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="'selection_metric'"):
        build_task(image_data(retrieval_world, selection_metric="recall"), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="'video' is true but model .* frame_len 0"):
        build_task(video_data(retrieval_world), cfg.replace(frame_len=0, add_frame_pos=False), tokenizer, "data")
    with pytest.raises(FileNotFoundError, match="'image_root'"):
        build_task(image_data(retrieval_world, image_root=str(retrieval_world / "nowhere")), cfg, tokenizer, "data")
    novel = str(retrieval_world / "karpathy" / "coco_karpathy_test_novel.json")
    with pytest.raises(ValueError, match="data: key 'extra_eval_files': split name 'test' collides"):
        build_task(image_data(retrieval_world, extra_eval_files={"test": novel}), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="data: key 'extra_eval_files' must map split names to files"):
        build_task(image_data(retrieval_world, extra_eval_files=[novel]), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="data: key 'extra_eval_files.novel' must be a file path"):
        build_task(image_data(retrieval_world, extra_eval_files={"novel": [novel]}), cfg, tokenizer, "data")
    with pytest.raises(FileNotFoundError, match="data: key 'extra_eval_files.novel': no file at"):
        build_task(image_data(retrieval_world, extra_eval_files={"novel": novel + ".missing"}), cfg, tokenizer, "data")
    task = build_task(image_data(retrieval_world, selection_metric="img_r_mean", extra_eval_files={"test_novel": novel}), cfg,
                      tokenizer, "data")
    assert task.model_task == "retrieval" and task.selection_metric == "img_r_mean"
    assert task.eval_splits == ["val", "test", "test_novel"]  # the extra splits after val and test, never first


def test_train_set_ids_flips_and_batches(tmp_path, tokenizer):
    # a left/right-asymmetric image: a flip is visible in the pixels
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :20] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(255 - pixels).save(tmp_path / "b.png")
    pairs = [{"image": "a.png", "caption": "A white bar on the left.", "image_id": "x"},
             {"image": "a.png", "caption": "A bar.", "image_id": "x"}]
    (tmp_path / "one.json").write_text(json.dumps(pairs))
    (tmp_path / "two.json").write_text(json.dumps([{"image": "b.png", "caption": "Black bar, right", "image_id": 7}]))
    (tmp_path / "eval.json").write_text(json.dumps([{"image": "a.png", "caption": ["a bar"]}, {"image": "b.png", "caption": ["b bar"]}]))
    common = {"train_files": [str(tmp_path / "one.json"), str(tmp_path / "two.json")], "val_file": str(tmp_path / "eval.json"),
              "test_file": str(tmp_path / "eval.json"), "image_root": str(tmp_path), "crop_scale": [1.0, 1.0], "randaug": False}
    cfg = preset("x2vlm-tiny")
    aware = build_task({**common, "hflip": True}, cfg, tokenizer, "data").train_set
    swap = build_task({**common, "hflip": "swap"}, cfg, tokenizer, "data").train_set
    never = build_task({**common, "hflip": False}, cfg, tokenizer, "data").train_set
    assert aware.ids == [0, 0, 1] and aware.captions[0] == "a white bar on the left"
    left_is_white = lambda sample: bool(sample.pixels[:, :, :10].mean() > sample.pixels[:, :, -10:].mean())
    flips = {"aware": 0, "swap": 0, "plain": 0}
    for seed in range(12):
        rng = lambda seed=seed: np.random.default_rng(seed)
        assert left_is_white(aware.get(0, rng()))  # the caption says "left": never flipped
        assert left_is_white(never.get(1, rng()))
        swapped = swap.get(0, rng())
        flipped = not left_is_white(swapped)
        assert swapped.caption == ("a white bar on the right" if flipped else "a white bar on the left")
        flips["swap"] += flipped
        flips["plain"] += not left_is_white(aware.get(1, rng()))  # no left/right word: may flip
    assert flips["swap"] > 0 and flips["plain"] > 0
    batch = build_task(common, cfg, tokenizer, "data").collate([aware.get(i, np.random.default_rng(i)) for i in range(3)])
    assert batch.pixels.shape == (3, 3, 64, 64) and batch.ids.tolist() == [0, 0, 1]
    assert batch.text_ids.shape[0] == 3 and batch.text_ids.shape[1] <= 30 and torch.equal(batch.text_mask.sum(1) > 0, torch.ones(3, dtype=torch.bool))
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "missing.png", "caption": "x", "image_id": 1}]))
    broken = build_task({**common, "train_files": [str(tmp_path / "bad.json")]}, cfg, tokenizer, "data").train_set
    with pytest.raises(FileNotFoundError, match=r"bad.json\[0\] field 'image'"):
        broken.get(0, np.random.default_rng(0))


def test_loss_is_id_aware_itc_plus_itm_on_hard_negatives(tiny_state):
    model = build_tiny("retrieval", tiny_state)
    pixels, text_ids, text_mask = random_gallery(6, 6, seed=4)
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    batch = RetrievalBatch(pixels, text_ids, text_mask, ids)
    with torch.no_grad():
        model.temp.fill_(0.9)  # clamped to 0.5 by the loss
    losses = retrieval_loss(model, batch, torch.Generator().manual_seed(11))
    assert model.temp.item() == 0.5
    with torch.no_grad():
        vision, vmask = model.encode_vision(pixels)
        text = model.encode_text(text_ids, text_mask)
        vfeat, tfeat = model.vision_features(vision), model.text_features(text)
        logits = vfeat @ tfeat.t() / 0.5
        same = (ids[:, None] == ids[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        i2t = -(F.log_softmax(logits, 1) * target).sum(1).mean()
        t2i = -(F.log_softmax(logits.t(), 1) * target).sum(1).mean()
        torch.testing.assert_close(losses["itc"], (i2t + t2i) / 2, atol=1e-5, rtol=0)
        image_neg, text_neg = sample_negatives(vfeat, tfeat, model.temp, ids=ids, generator=torch.Generator().manual_seed(11))
        expected_itm = matching_loss(matching_logits(model, vision, vmask, text, text_mask, image_neg, text_neg))
        torch.testing.assert_close(losses["itm"], expected_itm, atol=1e-5, rtol=0)
    # Same-id pairs are never negatives, even when they are by far the most similar.
    feats = F.normalize(torch.randn(3, 8), dim=1)[ids]
    for seed in range(50):
        image_neg, text_neg = sample_negatives(feats, feats, torch.tensor(0.05), ids=ids, generator=torch.Generator().manual_seed(seed))
        assert (ids[image_neg] != ids).all() and (ids[text_neg] != ids).all()
    # A batch of one id has no negative: ITM is 0, ITC still trains.
    one_id = retrieval_loss(model, RetrievalBatch(pixels[:3], text_ids[:3], text_mask[:3], torch.zeros(3, dtype=torch.long)), torch.Generator())
    assert float(one_id["itm"]) == 0.0 and torch.isfinite(one_id["itc"])


@torch.no_grad()
def test_cached_cross_attention_equals_the_uncached_path(tiny_state):
    model = build_tiny("retrieval", tiny_state)
    pixels, text_ids, text_mask = random_gallery()
    gallery = encode_gallery(model, pixels, text_ids, text_mask, batch_size=4)
    g = torch.Generator().manual_seed(5)
    image_idx, text_idx = torch.randint(0, 7, (40,), generator=g), torch.randint(0, 11, (40,), generator=g)
    reference = itm_scores(model, gallery, image_idx, text_idx, batch_size=9)
    cached = cached_itm_scores(model, gallery.vision_embeds, gallery.vision_mask, gallery.text_states, gallery.text_mask, image_idx, text_idx, batch_size=6)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0)
    # batches of padded texts only are run at their own (shorter) width: same scores
    short = torch.tensor([5, 10, 10, 5])
    cut = cached_itm_scores(model, gallery.vision_embeds, gallery.vision_mask, gallery.text_states, gallery.text_mask, image_idx[:4], short)
    torch.testing.assert_close(cut, itm_scores(model, gallery, image_idx[:4], short), atol=1e-5, rtol=0)
    # every fused state, with a partial vision mask too
    vmask = gallery.vision_mask[image_idx[:8]].clone()
    vmask[:, 5:9] = 0
    states = gallery.text_states[text_idx[:8]], gallery.text_mask[text_idx[:8]]
    plain = model.fuse(*states, gallery.vision_embeds[image_idx[:8]], vmask)
    kv = model.cross_attention_kv(gallery.vision_embeds)
    torch.testing.assert_close(model.fuse(*states, None, vmask, cross_kv=kv.select(image_idx[:8])), plain, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        model.fuse(*states, gallery.vision_embeds[image_idx[:8]], vmask, cross_kv=kv.select(image_idx[:8]))


@torch.no_grad()
def test_cached_scores_do_not_depend_on_pair_order_or_repeats(tiny_state):
    """Pairs sorted by text length into batches, texts self-attended once for all their images:
    each pair's score is the one it gets alone, whatever else is in the call (repeated pairs, pairs
    in both directions, texts of different lengths)."""
    model = build_tiny("retrieval", tiny_state)
    pixels, text_ids, text_mask = random_gallery()
    gallery = encode_gallery(model, pixels, text_ids, text_mask, batch_size=4)
    args = (model, gallery.vision_embeds, gallery.vision_mask, gallery.text_states, gallery.text_mask)
    image_idx = torch.tensor([3, 0, 3, 6, 3, 1, 0])
    text_idx = torch.tensor([10, 5, 10, 2, 5, 10, 0])  # (3, 10) twice; texts 5 and 10 are padded
    together = cached_itm_scores(*args, image_idx, text_idx, batch_size=3)
    alone = torch.cat([cached_itm_scores(*args, image_idx[k : k + 1], text_idx[k : k + 1]) for k in range(len(image_idx))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[0], together[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(together, itm_scores(model, gallery, image_idx, text_idx), atol=1e-5, rtol=0)


@torch.no_grad()
def test_texts_encoded_by_length_keep_their_own_states(tiny_state):
    from x2vlm.tasks.retrieval import encode_text_range

    model = build_tiny("retrieval", tiny_state)
    _, text_ids, text_mask = random_gallery()
    text_mask[1, 3:] = 0
    states, feats = encode_text_range(model, text_ids, text_mask, range(1, 11), batch_size=4)
    assert states.shape == (10, text_ids.shape[1], 64)
    for row, t in enumerate(range(1, 11)):
        n = int(text_mask[t].sum())
        alone = model.encode_text(text_ids[t : t + 1, :n], text_mask[t : t + 1, :n])
        torch.testing.assert_close(states[row, :n], alone[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(feats[row], model.text_features(alone)[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_chunked_evaluation_equals_unchunked(tiny_state):
    model = build_tiny("retrieval", tiny_state)
    pixels, text_ids, text_mask = random_gallery()
    whole = two_stage_retrieval(model, TensorVision(pixels), text_ids, text_mask, RerankSettings(k_test=4, batch_size=64, rerank_batch_size=1000, max_cached_images=100))
    chunked = two_stage_retrieval(model, TensorVision(pixels), text_ids, text_mask, RerankSettings(k_test=4, batch_size=3, rerank_batch_size=5, max_cached_images=2))
    for a, b in ((whole.sims, chunked.sims), (whole.score_i2t, chunked.score_i2t), (whole.score_t2i, chunked.score_t2i)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.equal(whole.score_i2t == NOT_A_CANDIDATE, chunked.score_i2t == NOT_A_CANDIDATE)


@torch.no_grad()
def test_sharded_evaluation_equals_one_process(tiny_state, monkeypatch):
    import x2vlm.tasks.retrieval as R

    model = build_tiny("retrieval", tiny_state)
    pixels, text_ids, text_mask = random_gallery()
    settings = RerankSettings(k_test=4, batch_size=2, rerank_batch_size=7, max_cached_images=2)
    whole = two_stage_retrieval(model, TensorVision(pixels), text_ids, text_mask, settings)
    encoded: dict[int, list[int]] = {}
    original = R.encode_vision_range

    def recording(model, vision, items, batch_size, keep_embeds=True):
        encoded.setdefault(threading.get_ident(), []).extend(items)
        return original(model, vision, items, batch_size, keep_embeds)

    monkeypatch.setattr(R, "encode_vision_range", recording)
    world_size = 3
    results = ThreadGather(world_size).run(lambda rank, gather: two_stage_retrieval(
        model, TensorVision(pixels), text_ids, text_mask, settings, Sharding(rank, world_size, gather)))
    for rank in range(world_size):
        torch.testing.assert_close(results[rank].sims, whole.sims, atol=1e-5, rtol=0)
        torch.testing.assert_close(results[rank].score_i2t, whole.score_i2t, atol=1e-5, rtol=0)
        torch.testing.assert_close(results[rank].score_t2i, whole.score_t2i, atol=1e-5, rtol=0)
    # every image encoded by exactly one rank (a share over max_cached_images is encoded again for
    # re-ranking, by the same rank), and no rank encoded them all
    per_rank = [set(items) for items in encoded.values()]
    assert len(per_rank) == world_size and sorted(i for items in per_rank for i in items) == list(range(len(pixels)))
    assert all(len(items) < len(pixels) for items in per_rank)


def check_metrics(metrics: dict[str, float]) -> None:
    expected = {prefix + key for prefix in ("", "itc_", "itm_plus_itc_") for key in RECALL_KEYS}
    assert set(metrics) == expected
    assert all(0.0 <= v <= 100.0 for v in metrics.values())


@torch.no_grad()
def test_evaluate_and_draw_on_the_tiny_world(retrieval_world, tokenizer, tiny_state, tmp_path):
    task = build_task(image_data(retrieval_world), preset("x2vlm-tiny"), tokenizer, "data")
    model = build_tiny("retrieval", tiny_state)
    ctx = EvalContext(DistInfo(), batch_size=8, out_dir=tmp_path)
    metrics = task.evaluate(model, "val", ctx)
    check_metrics(metrics)
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2)
    pictures = task.draw(model, tmp_path / "pictures", ctx)  # test not evaluated yet: evaluates it
    assert [p.name for p in pictures] == ["retrieval_test.png"] and Image.open(pictures[0]).size[0] >= 480


def test_video_retrieval_on_the_tiny_world(retrieval_world, tokenizer, tiny_state, tmp_path):
    task = build_task(video_data(retrieval_world), preset("x2vlm-tiny"), tokenizer, "data")
    model = build_tiny("retrieval", tiny_state)
    sample = task.train_set.get(0, np.random.default_rng(0))
    assert sample.pixels.shape == (3, 3, 64, 64)  # frame_len 3 of the tiny model
    batch = task.collate([task.train_set.get(i, np.random.default_rng(i)) for i in range(6)])
    model.train()
    losses = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert set(losses) == {"itc", "itm"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        check_metrics(task.evaluate(model, "val", EvalContext(DistInfo(), batch_size=4, out_dir=tmp_path)))


def test_finetuning_loop_runs_retrieval_end_to_end(retrieval_world, tmp_path, capsys):
    from x2vlm.train import finetune as FT

    # an extra split reading the test file: evaluated after val and test, exactly as test is
    data = image_data(retrieval_world, hflip="swap", crop_scale=[1.0, 1.0], randaug=False,
                      extra_eval_files={"test_again": str(retrieval_world / "karpathy" / "coco_karpathy_test.json")})
    cfg = tiny_finetune_config("retrieval", data, tmp_path / "run", max_steps=4, batch_size=4, eval_every=2)
    summary = FT.run_finetuning(cfg)
    assert summary["selection"]["split"] == "val"
    assert summary["selection"]["metric"] == summary["validation_history"][summary["selection"]["step"] // 2 - 1]["r_mean"]
    check_metrics(summary["results"]["test"])
    assert list(summary["results"]) == ["val", "test", "test_again"]
    assert summary["results"]["test_again"] == summary["results"]["test"]
    assert [Path(p).name for p in summary["pictures"]] == ["retrieval_test.png"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["task"] == "retrieval"
    check_inference_equals_evaluation(tmp_path / "run", data, summary["results"]["test"], tmp_path, capsys)


def test_finetuning_loop_runs_video_retrieval(retrieval_world, tmp_path, capsys):
    from x2vlm.train import finetune as FT

    data = video_data(retrieval_world, randaug=False)
    cfg = tiny_finetune_config("retrieval", data, tmp_path / "run", max_steps=2, batch_size=4, eval_every=2)
    summary = FT.run_finetuning(cfg)
    check_metrics(summary["results"]["test"])
    check_inference_equals_evaluation(tmp_path / "run", data, summary["results"]["test"], tmp_path, capsys)


def check_inference_equals_evaluation(run: Path, data: dict, reported: dict[str, float], tmp_path: Path, capsys) -> None:
    """The trained ``run``, loaded for inference, scores and ranks the test split as the evaluation
    does: the evaluation's two-stage scores (recomputed on the selected weights; they give the
    recalls the run reported) equal ``match`` (ITC everywhere, ITM on the candidates), ``retrieve``
    over a saved ``GalleryIndex`` ranks as the evaluation (text -> images or videos, image -> texts),
    ``embed_*`` give the ITC similarities; bf16 keeps the top-1 hit up to near ties (see below); the
    command line prints the API's hits."""
    import x2vlm
    from x2vlm.cli import main
    from x2vlm.inference import GalleryIndex
    from x2vlm.tasks.retrieval import NOT_A_CANDIDATE, flat_metrics, load_eval_set, ranking_metrics

    video = data.get("video", False)
    model = x2vlm.load(run)
    k_test = data["k_test"]
    assert model.retrieval_settings() == (30, k_test)  # saved by the fine-tuning (max_tokens: the default)
    eval_set = load_eval_set(data["test_file"], data["image_root"], model.cfg.image_res, model.tokenizer, 30,
                             model.cfg.frame_len if video else 0)
    scores = two_stage_retrieval(model.model, eval_set.vision, eval_set.text_ids, eval_set.text_mask, RerankSettings(k_test, 8))
    assert flat_metrics(ranking_metrics(scores, eval_set.img2txt, eval_set.txt2img)) == pytest.approx(reported)
    items = [str(Path(data["image_root"]) / name) for name in eval_set.names]
    texts = [caption for record in json.loads(Path(data["test_file"]).read_text()) for caption in record["caption"]]
    num_items, num_texts = len(items), len(texts)

    matched = model.match(items, texts, video=video)
    assert np.abs(matched["itc"] - scores.sims.numpy()).max() < 1e-5
    for candidates in (scores.score_i2t, scores.score_t2i.t()):  # ITM of each direction's candidates
        chosen = (candidates > NOT_A_CANDIDATE).numpy()
        assert chosen.sum() == (num_items * min(k_test, num_texts) if candidates is scores.score_i2t else num_texts * min(k_test, num_items))
        assert np.abs(matched["itm"][chosen] - candidates.numpy()[chosen]).max() < 1e-5
    embed = model.embed_videos if video else model.embed_images
    assert np.abs(embed(items) @ model.embed_texts(texts).T - scores.sims.numpy()).max() < 1e-5

    kind = "videos" if video else "images"
    saved = model.index(items, kind=kind, ids=list(eval_set.names)).save(tmp_path / "gallery")
    gallery = GalleryIndex.load(saved)
    hits = model.retrieve(texts, gallery, k=num_items)
    ranked = min(k_test, num_items)
    for t, row in enumerate(hits):
        expected = scores.score_t2i[t].topk(ranked)
        assert [h.index for h in row[:ranked]] == expected.indices.tolist()
        assert [h.id for h in row] == [eval_set.names[h.index] for h in row]
        assert [h.itm for h in row[:ranked]] == pytest.approx(expected.values.tolist(), abs=1e-5)
        assert [h.itc for h in row] == pytest.approx(scores.sims[[h.index for h in row], t].tolist(), abs=1e-5)
    if not video:  # image -> text
        text_hits = model.retrieve(items, model.index(texts, kind="texts"), k=min(k_test, num_texts))
        for i, row in enumerate(text_hits):
            expected = scores.score_i2t[i].topk(min(k_test, num_texts))
            assert [h.index for h in row] == expected.indices.tolist()
            assert [h.itm for h in row] == pytest.approx(expected.values.tolist(), abs=1e-5)

    # bf16 autocast. This briefly trained model gives every item nearly the same ITM logit (a spread of
    # ~1e-3 per text, about bf16's rounding), so its exact top-1 is a coin toss under bf16 (measured on
    # the image test texts: 55% by ITM, from 8% to 100% with other numbers of training steps; 100% by
    # ITC). What bf16 must keep is the ranking up to its score error e: every pair's scores stay close,
    # and the item bf16 ranks first (ITM over all items, and ITC alone) is the fp32 top-1 or one that
    # fp32 scores within 2e of it (so wherever fp32's top-1 leads by more than 2e, the top-1 is the same).
    bf16 = x2vlm.load(run, dtype="bf16")
    bf16_scores = bf16.match(items, texts, video=video)
    bf16_index = bf16.index(items, kind=kind)
    agreement = []
    for name, k_all in (("itm", num_items), ("itc", 0)):
        fp32_top = [row[0].index for row in model.retrieve(texts, gallery, k=1, k_test=k_all)]
        bf16_top = [row[0].index for row in bf16.retrieve(texts, bf16_index, k=1, k_test=k_all)]
        fp32_scores = matched[name]
        error = float(np.abs(bf16_scores[name] - fp32_scores).max())
        assert error < 0.02 * max(1.0, float(np.abs(fp32_scores).max())), f"bf16 {name} scores off by {error}"
        for t in range(num_texts):
            assert fp32_scores[bf16_top[t], t] >= fp32_scores[fp32_top[t], t] - 2 * error - 1e-6
        agree = sum(a == b for a, b in zip(fp32_top, bf16_top)) / num_texts
        agreement.append(f"bf16 {kind} retrieval by {name}: the fp32 top-1 for {agree:.0%} of {num_texts} texts, "
                         f"score error {error:.2g}")

    # the command line: a text query against the saved index, and one (item, text) pair's scores
    assert main(["predict", "retrieve", "--model", str(run), "--text", texts[0], "--gallery", str(saved), "--k", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["hits"] == [{**h.to_dict(), "item": items[h.index]} for h in model.retrieve(texts[0], gallery, k=3)]
    assert [h["index"] for h in printed["hits"]] == [h.index for h in hits[0][:3]]
    argv = ["predict", "match", "--model", str(run), "--image", items[0], "--text", texts[0]] + (["--video"] if video else [])
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    single = model.match([items[0]], [texts[0]], video=video)
    assert printed["itm"] == single["itm"].tolist() and printed["itc"] == single["itc"].tolist()
    assert printed["itc"][0][0] == pytest.approx(float(scores.sims[0, 0]), abs=1e-5)
    print("\n".join(agreement), file=sys.stderr)  # shown with pytest -rP


CONFIGS = Path(__file__).parents[1] / "src" / "x2vlm" / "configs" / "finetune"


@pytest.mark.parametrize("name", ["retrieval_coco_base", "retrieval_coco_large", "retrieval_flickr_base", "retrieval_msrvtt_base",
                                  "retrieval_small_world", "video_retrieval_small_world"])
def test_shipped_configs_are_valid(name, retrieval_world, tmp_path):
    from x2vlm.train import finetune as FT

    text = (CONFIGS / f"{name}.yaml").read_text()
    cfg = FT.load_finetune_config(CONFIGS / f"{name}.yaml", task="retrieval")
    model_cfg = FT.base_model_config(cfg)
    if "world" not in name:  # placeholder paths: the keys must still be known ones
        from x2vlm.tasks.retrieval import DATA_KEYS

        assert set(cfg.data) <= DATA_KEYS and model_cfg.image_res == 384
        return
    (tmp_path / "c.yaml").write_text(text.replace("runs/world", str(retrieval_world)))
    cfg = FT.load_finetune_config(tmp_path / "c.yaml", task="retrieval")
    task = FT.build_task(cfg, model_cfg, WordPieceTokenizer.from_name_or_path(model_cfg.tokenizer))
    assert task.eval_splits == ["val", "test", "test_novel"]
    sample = task.train_set.get(0, np.random.default_rng(0))
    res = model_cfg.image_res
    assert sample.pixels.shape == ((model_cfg.frame_len, 3, res, res) if cfg.data.get("video") else (3, res, res))
