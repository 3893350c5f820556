"""VQA answer-ranking and captioning throughput on this machine (random init, synthetic images).

    python bench/bench_generation.py [--preset x2vlm-small] [--precisions fp32,bf16] [--repeats 3]

VQA: a batch of questions is encoded with its images, then ``generation.rank_answers`` ranks an
answer list of ``--answers`` entries (random token ids, 1-4 tokens each) keeping the top ``--k``;
the figure is questions/s for the whole evaluation step (image + question encoding + ranking).
Captioning: a batch of images is encoded, then captioned by beam search (``--beams``) and greedily,
``--max-new-tokens`` tokens after a 4-token prompt with ``--min-length``; the figure is captions/s.
At random init no caption ends early, so every run decodes the full length (the worst case).
bf16 (CPU autocast) runs only on a CPU with bf16 matrix units (AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from x2vlm import X2VLM, preset
from x2vlm.generation import CaptionSettings, beam_search, greedy_caption, rank_answers
from x2vlm.train.metrics import source_commit
from x2vlm.precision import autocast, cpu_has_bf16_matmul
from x2vlm.train.host_memory import reuse_freed_memory


def synthetic_answer_list(cfg, num_answers: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] answer [SEP] [PAD]..`` rows with 1-4 random word tokens."""
    lengths = torch.randint(1, 5, (num_answers,), generator=generator)
    ids = torch.full((num_answers, 6), cfg.text.pad_token_id)
    ids[:, 0] = cfg.text.cls_token_id
    for row, length in enumerate(lengths.tolist()):
        ids[row, 1 : length + 1] = torch.randint(1000, cfg.text.vocab_size, (length,), generator=generator)
        ids[row, length + 1] = cfg.text.sep_token_id
    return ids, ids.ne(cfg.text.pad_token_id).long()


def time_runs(run: Callable[[], object], repeats: int) -> list[float]:
    """Seconds per call after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def report(workload: str, precision: str, times: list[float], items: int, unit: str) -> None:
    med = statistics.median(times)
    print(f"{workload:22s} {precision:9s} {med:10.3f} {min(times):8.3f} {max(times):8.3f} {items / med:10.2f} {unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="x2vlm-small")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--questions", type=int, default=16, help="questions per VQA batch (one image each)")
    parser.add_argument("--question-len", type=int, default=12)
    parser.add_argument("--answers", type=int, default=3128, help="answer-list size (official VQA v2: 3128)")
    parser.add_argument("--k", type=int, default=128, help="candidates re-scored per question (official k_test)")
    parser.add_argument("--images", type=int, default=8, help="images per captioning batch")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--min-length", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does (x2vlm.train.host_memory)
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = source_commit()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, commit {commit}, preset {args.preset}")
    precisions = args.precisions.split(",")
    if "bf16" in precisions and not cpu_has_bf16_matmul():
        print("no bf16 matrix units on this CPU (AVX512-BF16/AMX): skipping bf16")
        precisions.remove("bf16")

    torch.manual_seed(0)
    vqa = X2VLM(preset(args.preset, task="vqa")).eval()
    captioner = X2VLM(preset(args.preset, task="captioning")).eval()
    cfg = vqa.cfg
    g = torch.Generator().manual_seed(0)
    vqa_images = torch.randn(args.questions, 3, cfg.image_res, cfg.image_res, generator=g)
    question_ids = torch.randint(1000, cfg.text.vocab_size, (args.questions, args.question_len), generator=g)
    question_ids[:, 0], question_ids[:, -1] = cfg.text.cls_token_id, cfg.text.sep_token_id
    question_mask = torch.ones_like(question_ids)
    answer_ids, answer_mask = synthetic_answer_list(cfg, args.answers, g)
    caption_images = torch.randn(args.images, 3, cfg.image_res, cfg.image_res, generator=g)
    prompt = torch.tensor([cfg.text.cls_token_id, 1037, 3861, 1997])  # [CLS] "a picture of" (BERT ids)
    settings = CaptionSettings(num_beams=args.beams, max_new_tokens=args.max_new_tokens, min_length=args.min_length)

    def rank():
        vision, vmask = vqa.encode_images(vqa_images)
        states = vqa.encode_multimodal(question_ids, question_mask, vision, vmask)
        return rank_answers(vqa, states, question_mask, answer_ids, answer_mask, args.k)

    def beam():
        vision, vmask = captioner.encode_images(caption_images)
        return beam_search(captioner, vision, vmask, prompt, settings)

    def greedy():
        vision, vmask = captioner.encode_images(caption_images)
        return greedy_caption(captioner, vision, vmask, prompt, args.max_new_tokens, args.min_length)

    print(f"VQA: {args.questions} questions x {args.answers} answers, k {args.k}; captioning: {args.images} images, "
          f"{args.beams} beams, {args.max_new_tokens} new tokens (min {args.min_length})")
    print(f"{'workload':22s} {'precision':9s} {'batch s':>10s} {'min':>8s} {'max':>8s} {'items/s':>10s}")
    for precision in precisions:
        with torch.inference_mode(), autocast(precision, "cpu"):
            report("vqa rank_answers", precision, time_runs(rank, args.repeats), args.questions, "questions/s")
            report(f"caption beam ({args.beams})", precision, time_runs(beam, args.repeats), args.images, "captions/s")
            report("caption greedy", precision, time_runs(greedy, args.repeats), args.images, "captions/s")


if __name__ == "__main__":
    main()
