"""Retrieval evaluation time: the official per-query loop against ours, same model, same data.

    python bench/bench_retrieval_eval.py [--preset x2vlm-small] [--images 1000] [--texts-per-image 5]
                                         [--k-test 128] [--batch-size 64] [--rerank-batch 512]

Both start from pixels and token ids and end with the two re-ranked score matrices:

* official (spec §4.1): images and texts encoded in batches, ITC similarities, then one fusion
  forward per query (an image with its top-k texts, then a text with its top-k images), every
  candidate pair projecting the image's tokens again;
* ours (``x2vlm.tasks.retrieval.two_stage_retrieval``): the same encoding, each unique candidate
  pair scored once in large batches, the image side of the cross-attention computed once per image.

A random-weight model on random pixels and random full-length texts (5 per image): the time does
not depend on the weights. Prints both times, the speed-up, the largest score difference, and
checks that both give identical recalls (exit status 1 if not). Use a GPU for the default sizes;
shrink with --images / --k-test / --preset x2vlm-tiny on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from x2vlm import X2VLM, preset
from x2vlm.tasks.retrieval import (
    NOT_A_CANDIDATE,
    RerankSettings,
    RetrievalScores,
    TensorVision,
    encode_text_range,
    encode_vision_range,
    ranking_metrics,
    two_stage_retrieval,
)
from x2vlm.train.host_memory import reuse_freed_memory


@torch.no_grad()
def official_loop(model: X2VLM, pixels: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, k_test: int,
                  batch_size: int) -> RetrievalScores:
    """``Retrieval.py: evaluation`` in one process: per-query fusion forwards of k candidates."""
    vision_feat, embeds, masks = encode_vision_range(model, TensorVision(pixels), range(len(pixels)), batch_size)
    text_states, text_feat = encode_text_range(model, text_ids, text_mask, range(len(text_ids)), batch_size)
    text_mask = text_mask.to(text_states.device)
    sims = vision_feat @ text_feat.t()
    num_images, num_texts = sims.shape
    score_i2t = torch.full((num_images, num_texts), NOT_A_CANDIDATE, device=sims.device)
    score_t2i = torch.full((num_texts, num_images), NOT_A_CANDIDATE, device=sims.device)
    k_txt, k_img = min(k_test, num_texts), min(k_test, num_images)
    for i in range(num_images):
        top = sims[i].topk(k_txt).indices
        fused = model.fuse(text_states[top], text_mask[top], embeds[i].expand(k_txt, -1, -1), masks[i].expand(k_txt, -1))
        score_i2t[i, top] = model.itm_logits(fused)[:, 1].float()
    for t in range(num_texts):
        top = sims[:, t].topk(k_img).indices
        fused = model.fuse(text_states[t].expand(k_img, -1, -1), text_mask[t].expand(k_img, -1), embeds[top], masks[top])
        score_t2i[t, top] = model.itm_logits(fused)[:, 1].float()
    return RetrievalScores(sims.cpu(), score_i2t.cpu(), score_t2i.cpu())


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="x2vlm-small")
    parser.add_argument("--image-res", type=int, help="override the preset's resolution")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--texts-per-image", type=int, default=5)
    parser.add_argument("--text-len", type=int, default=30)
    parser.add_argument("--k-test", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="images / texts per encoder forward (both)")
    parser.add_argument("--rerank-batch", type=int, default=512, help="candidate pairs per fusion forward (ours)")
    parser.add_argument("--max-cached-images", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does (x2vlm.train.host_memory)
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = preset(args.preset, task="retrieval", **({"image_res": args.image_res} if args.image_res else {}))
    model = X2VLM(cfg).eval().to(device)
    num_texts = args.images * args.texts_per_image
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(args.images, 3, cfg.image_res, cfg.image_res, generator=g)
    text_ids = torch.randint(min(1000, cfg.text.vocab_size // 2), cfg.text.vocab_size, (num_texts, args.text_len), generator=g)
    text_ids[:, 0], text_ids[:, -1] = cfg.text.cls_token_id, cfg.text.sep_token_id
    text_mask = torch.ones_like(text_ids)
    txt2img = [t // args.texts_per_image for t in range(num_texts)]
    img2txt = [list(range(i * args.texts_per_image, (i + 1) * args.texts_per_image)) for i in range(args.images)]
    print(f"{args.preset} at {cfg.image_res} px on {device}: {args.images} images x {num_texts} texts, k_test {args.k_test}", flush=True)

    settings = RerankSettings(args.k_test, args.batch_size, args.rerank_batch, args.max_cached_images)
    two_stage_retrieval(model, TensorVision(pixels[:8]), text_ids[:16], text_mask[:16], RerankSettings(4, 8, 32, 8))  # warm-up
    ours, ours_s = timed(lambda: two_stage_retrieval(model, TensorVision(pixels), text_ids, text_mask, settings), device)
    print(f"ours:     {ours_s:8.1f} s", flush=True)
    official, official_s = timed(lambda: official_loop(model, pixels, text_ids, text_mask, args.k_test, args.batch_size), device)
    print(f"official: {official_s:8.1f} s ({official_s / ours_s:.1f}x ours)", flush=True)

    same_candidates = torch.equal(ours.score_i2t == NOT_A_CANDIDATE, official.score_i2t == NOT_A_CANDIDATE) and torch.equal(
        ours.score_t2i == NOT_A_CANDIDATE, official.score_t2i == NOT_A_CANDIDATE)
    max_diff = max(float((ours.score_i2t - official.score_i2t).abs().max()), float((ours.score_t2i - official.score_t2i).abs().max()))
    ours_recalls = ranking_metrics(ours, img2txt, txt2img)["itm"]
    official_recalls = ranking_metrics(official, img2txt, txt2img)["itm"]
    identical = ours_recalls == official_recalls
    print(f"same candidates: {same_candidates}; largest score difference: {max_diff:.2e}; identical recalls: {identical}")
    print("recalls:", json.dumps({k: round(v, 3) for k, v in ours_recalls.items()}))
    if not identical:
        print("official recalls:", json.dumps({k: round(v, 3) for k, v in official_recalls.items()}))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"preset": args.preset, "image_res": cfg.image_res, "device": str(device), "images": args.images, "texts": num_texts,
                       "k_test": args.k_test, "ours_s": ours_s, "official_s": official_s, "speedup": official_s / ours_s,
                       "same_candidates": same_candidates, "max_score_diff": max_diff, "identical_recalls": identical,
                       "recalls": ours_recalls}, fh, indent=2)
    return 0 if identical and same_candidates else 1


if __name__ == "__main__":
    raise SystemExit(main())
