"""Forward throughput of an X²-VLM preset on this machine, fp32 and bf16 autocast.

    python bench/bench_forward.py [--preset x2vlm-base] [--image-batch 8] [--text-batch 32] [--repeats 5]

Prints images/s (vision encoder), texts/s (text encoder) and image-text pairs/s (vision + text +
fusion + ITM head), each the median of ``--repeats`` timed runs after one warm-up, with min/max.
Random weights: throughput does not depend on their values. If bf16 matmul is much slower than
fp32 on this machine (a CPU without AMX or AVX512-BF16), bf16 is skipped unless --force-bf16.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from x2vlm import X2VLM, preset
from x2vlm.precision import autocast
from x2vlm.train.metrics import measure_matmul_peak, source_commit, time_runs
from x2vlm.train.host_memory import reuse_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="x2vlm-base")
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--text-batch", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--force-bf16", action="store_true")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does (x2vlm.train.host_memory)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = X2VLM(cfg).eval()
    images = torch.randn(args.image_batch, 3, cfg.image_res, cfg.image_res)
    ids = torch.randint(1000, 20000, (args.text_batch, args.text_len))
    mask = torch.ones_like(ids)
    pair_ids, pair_mask = ids[: args.image_batch], mask[: args.image_batch]

    def vision():
        model.encode_images(images)

    def text():
        model.encode_text(ids, mask)

    def pairs():
        v, vm = model.encode_images(images)
        model.itm_logits(model.fuse(model.encode_text(pair_ids, pair_mask), pair_mask, v, vm))

    commit = source_commit()
    print(f"preset {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), image_res {cfg.image_res}, "
          f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, commit {commit}")
    peaks = {p: measure_matmul_peak(torch.device("cpu"), p, size=1024) for p in ("fp32", "bf16")}
    print("matmul peak: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    precisions = ["fp32", "bf16"]
    if peaks["bf16"] < 0.5 * peaks["fp32"] and not args.force_bf16:
        print(f"bf16 matmul runs at {peaks['bf16'] / 1e9:.1f} GFLOP/s here (no bf16 matrix units): skipping bf16 (--force-bf16 runs it)")
        precisions = ["fp32"]
    print(f"{'precision':10s} {'workload':28s} {'items/s (median)':>17s} {'min':>8s} {'max':>8s}")
    for precision in precisions:
        ctx = autocast(precision, "cpu")
        for name, fn, count in (
            (f"images ({args.image_batch}x{cfg.image_res}px)", vision, args.image_batch),
            (f"texts ({args.text_batch}x{args.text_len} tokens)", text, args.text_batch),
            ("image-text pairs, ITM", pairs, args.image_batch),
        ):
            with torch.inference_mode(), ctx:
                times = time_runs(fn, args.repeats)
            rates = sorted(count / t for t in times)
            print(f"{precision:10s} {name:28s} {statistics.median(rates):17.1f} {rates[0]:8.1f} {rates[-1]:8.1f}")


if __name__ == "__main__":
    main()
