"""Image-text (and video-text) retrieval evaluation with the official two-stage protocol.

1. ITC: cosine similarity of every image with every text (every item encoded once).
2. ITM: for each image the ``k_test`` most similar texts, and for each text the ``k_test`` most
   similar images, are re-scored by the ITM "match" logit; everything else scores -100.
3. Recall@1/5/10 in both directions, their means, and ``r_mean`` (official ``itm_eval``).

Unlike the official loop (one fusion forward per query), candidate pairs are scored in large
batches, and a pair that is a candidate in both directions is scored once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from x2vlm.models.x2vlm import X2VLM

log = logging.getLogger(__name__)

NOT_A_CANDIDATE = -100.0


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
def encode_gallery(model: X2VLM, pixels: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, batch_size: int = 64) -> EncodedGallery:
    """Encode images (B,3,H,W) or videos (B,F,3,H,W) and texts, in batches."""
    vision, vmask, vfeat = [], [], []
    for start in tqdm(range(0, len(pixels), batch_size), desc="encode images", leave=False):
        embeds, mask = model.encode_vision(pixels[start : start + batch_size])
        vision.append(embeds)
        vmask.append(mask)
        vfeat.append(model.vision_features(embeds))
    states, tfeat = [], []
    for start in tqdm(range(0, len(text_ids), batch_size), desc="encode texts", leave=False):
        s = model.encode_text(text_ids[start : start + batch_size], text_mask[start : start + batch_size])
        states.append(s)
        tfeat.append(model.text_features(s))
    return EncodedGallery(torch.cat(vision), torch.cat(vmask), torch.cat(vfeat), torch.cat(states), text_mask, torch.cat(tfeat))


@torch.no_grad()
def itm_scores(model: X2VLM, gallery: EncodedGallery, image_idx: torch.Tensor, text_idx: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """ITM match logit (column 1) of the pairs (image_idx[k], text_idx[k]), batched."""
    scores = []
    for start in range(0, len(image_idx), batch_size):
        i, t = image_idx[start : start + batch_size], text_idx[start : start + batch_size]
        fused = model.fuse(gallery.text_states[t], gallery.text_mask[t], gallery.vision_embeds[i], gallery.vision_mask[i])
        scores.append(model.itm_logits(fused)[:, 1].float())
    return torch.cat(scores) if scores else torch.empty(0)


@torch.no_grad()
def two_stage_scores(model: X2VLM, gallery: EncodedGallery, k_test: int, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ITC similarity I x T, re-ranked image->text scores I x T, re-ranked text->image scores T x I)."""
    sims = gallery.vision_feat.float() @ gallery.text_feat.float().t()
    num_images, num_texts = sims.shape
    k_txt, k_img = min(k_test, num_texts), min(k_test, num_images)
    i2t_cand = sims.topk(k_txt, dim=1).indices  # (I, k)
    t2i_cand = sims.t().topk(k_img, dim=1).indices  # (T, k)
    pairs = torch.cat([
        torch.stack([torch.arange(num_images).repeat_interleave(k_txt), i2t_cand.flatten()], dim=1),
        torch.stack([t2i_cand.flatten(), torch.arange(num_texts).repeat_interleave(k_img)], dim=1),
    ])
    unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)  # each pair scored once
    scores = itm_scores(model, gallery, unique[:, 0], unique[:, 1], batch_size)[inverse]
    score_i2t = torch.full((num_images, num_texts), NOT_A_CANDIDATE)
    score_t2i = torch.full((num_texts, num_images), NOT_A_CANDIDATE)
    n = num_images * k_txt
    score_i2t[pairs[:n, 0], pairs[:n, 1]] = scores[:n]
    score_t2i[pairs[n:, 1], pairs[n:, 0]] = scores[n:]
    return sims, score_i2t, score_t2i


def evaluate_retrieval(model: X2VLM, pixels: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor,
                       img2txt: list[list[int]], txt2img: list[int], k_test: int = 16, itm: bool = True) -> dict[str, dict[str, float]]:
    """Recalls of the official protocol (``itm``), of ITC alone (``itc``) and of ITM + ITC
    similarity summed over the candidates (``itm_plus_itc``, what other libraries report)."""
    model.eval()
    gallery = encode_gallery(model, pixels, text_ids, text_mask)
    sims = gallery.vision_feat.float() @ gallery.text_feat.float().t()
    results = {"itc": recall_metrics(sims.numpy(), sims.t().numpy(), img2txt, txt2img)}
    if itm:
        sims, score_i2t, score_t2i = two_stage_scores(model, gallery, k_test)
        results["itm"] = recall_metrics(score_i2t.numpy(), score_t2i.numpy(), img2txt, txt2img)
        cand_i2t, cand_t2i = score_i2t > NOT_A_CANDIDATE, score_t2i > NOT_A_CANDIDATE
        summed_i2t = torch.where(cand_i2t, score_i2t + sims, torch.full_like(sims, NOT_A_CANDIDATE))
        summed_t2i = torch.where(cand_t2i, score_t2i + sims.t(), torch.full_like(sims.t(), NOT_A_CANDIDATE))
        results["itm_plus_itc"] = recall_metrics(summed_i2t.numpy(), summed_t2i.numpy(), img2txt, txt2img)
    return results


@dataclass
class RetrievalSplit:
    """An evaluation split ready for ``evaluate_retrieval``."""

    pixels: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    img2txt: list[list[int]]
    txt2img: list[int]
    images: list[str]
    texts: list[str]


def load_retrieval_split(path, image_root, res: int, tokenizer, max_tokens: int = 30, frame_len: int = 0) -> RetrievalSplit:
    """A Karpathy-style evaluation file (``[{image, caption: [...]}]``) with its images (or videos,
    when ``frame_len`` > 0: frames at the official evaluation positions), test-transformed."""
    from pathlib import Path

    from x2vlm.data.readers import read_karpathy_eval
    from x2vlm.data.text import pre_caption
    from x2vlm.data.transforms import EvalTransform
    from x2vlm.data.video import count_frames, load_image, read_video_frames, sample_frame_indices

    vision_key = "video" if frame_len else "image"
    items = read_karpathy_eval(path, vision_key=vision_key)
    transform = EvalTransform(res)
    pixels, texts, img2txt, txt2img = [], [], [], []
    for i, item in enumerate(tqdm(items, desc=f"load {Path(path).name}", leave=False)):
        source = str(Path(image_root) / item.image)
        if frame_len:
            frames = read_video_frames(source, sample_frame_indices(count_frames(source), frame_len, training=False))
            pixels.append(transform.clip(frames))
        else:
            pixels.append(transform(load_image(source, is_path=True, source=str(path), field=vision_key)))
        img2txt.append([])
        for caption in item.captions:
            img2txt[-1].append(len(texts))
            txt2img.append(i)
            texts.append(pre_caption(caption, max_tokens))
    ids, mask = tokenizer(texts, max_length=max_tokens, pad_to=max_tokens)
    return RetrievalSplit(torch.stack(pixels), ids, mask, img2txt, txt2img, [it.image for it in items], texts)
