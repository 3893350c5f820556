"""Retrieval metrics on hand-built score matrices; batched re-ranking equals the official loop."""

import numpy as np
import pytest
import torch
from conftest import build_tiny

from x2vlm.tasks.retrieval import NOT_A_CANDIDATE, encode_gallery, ranks_of_ground_truth, recall_metrics, two_stage_scores

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
