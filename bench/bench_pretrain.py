"""Pre-training step throughput and model-FLOPs utilisation on this machine.

    python bench/bench_pretrain.py [--presets x2vlm-small,x2vlm-base] [--precisions fp32,bf16] [--repeats 5]

One step = forward + backward + AdamW step of ITC + ITM (hard negatives) + MLM on a synthetic batch
of images and captions (issue W1 for the base preset: 8 images at 224 px, 30-token captions, 12 MLM
masks). FLOPs come from torch's FLOP counter; MFU is against a square matmul measured in the same
process and precision. If bf16 matmul is much slower than fp32 here (a CPU without AMX or
AVX512-BF16), bf16 workloads are skipped unless --force-bf16 is given.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Callable

import torch

from x2vlm import X2VLM, preset
from x2vlm.precision import autocast
from x2vlm.train.metrics import Spread, count_step_flops, measure_matmul_peak, source_commit, time_runs
from x2vlm.train.optim import OptimizerConfig, build_optimizer
from x2vlm.train.pretrain import aligning_losses
from x2vlm.train.host_memory import reuse_freed_memory


def synthetic_batch(cfg, batch: int, text_len: int, masks: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.text.vocab_size, (batch, text_len), generator=g)
    ids[:, 0], ids[:, -1] = cfg.text.cls_token_id, cfg.text.sep_token_id
    pos = torch.stack([torch.randperm(text_len - 2, generator=g)[:masks] + 1 for _ in range(batch)])
    masked = ids.scatter(1, pos, cfg.text.mask_token_id)
    return SimpleNamespace(images=torch.randn(batch, 3, cfg.image_res, cfg.image_res, generator=g), text_ids=ids,
                           text_mask=torch.ones_like(ids), masked_ids=masked, masked_pos=pos, masked_targets=ids.gather(1, pos))


def pretrain_step(model: X2VLM, optimizer, batch: SimpleNamespace, precision: str,
                  steps_in_backward: bool = False, grad_checkpointing: bool = False) -> Callable[[], None]:
    """One W1 step: ITC + ITM (hard negatives) + MLM forward in ``precision``, backward, optimizer step
    (``steps_in_backward``: the caller has hooked ``optimizer`` into backward with StepInBackward;
    ``grad_checkpointing``: the caller has turned it on, so autocast keeps no weight casts, as in training)."""

    def step() -> None:
        generator = torch.Generator().manual_seed(0)
        model.train()
        with autocast(precision, "cpu", keep_weight_casts=not grad_checkpointing):
            vision, vmask = model.encode_images(batch.images)
            losses = aligning_losses(model, vision, vmask, batch, generator, compute_itm=True)
        sum(losses.values()).backward()
        if not steps_in_backward:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def pretrain_forward(model: X2VLM, batch: SimpleNamespace, precision: str) -> Callable[[], None]:
    """W2: the same losses in eval mode, without gradients."""

    @torch.no_grad()
    def forward() -> None:
        generator = torch.Generator().manual_seed(0)
        model.eval()
        with autocast(precision, "cpu"):
            vision, vmask = model.encode_images(batch.images)
            aligning_losses(model, vision, vmask, batch, generator, compute_itm=True)

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="x2vlm-small,x2vlm-base")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=30)
    parser.add_argument("--masks", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--force-bf16", action="store_true")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does (x2vlm.train.host_memory)
    device = torch.device("cpu")
    commit = source_commit()
    peaks = {p: measure_matmul_peak(device, p, size=1024) for p in args.precisions.split(",")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, commit {commit}")
    print("matmul peak: " + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    if "bf16" in peaks and "fp32" in peaks and peaks["bf16"] < 0.5 * peaks["fp32"] and not args.force_bf16:
        print(f"bf16 matmul runs at {peaks['bf16'] / 1e9:.1f} GFLOP/s here (no bf16 matrix units): skipping bf16 (--force-bf16 runs it)")
        peaks.pop("bf16")
    print(f"{'preset':12s} {'precision':9s} {'step s (median)':>15s} {'min':>7s} {'max':>7s} {'samples/s':>10s} {'TFLOP/step':>11s} {'MFU':>6s}")
    for name in args.presets.split(","):
        torch.manual_seed(0)
        model = X2VLM(preset(name)).train()
        optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
        batch = synthetic_batch(model.cfg, args.batch, args.text_len, args.masks)
        for precision, peak in peaks.items():
            step = pretrain_step(model, optimizer, batch, precision)
            _, flops = count_step_flops(step)  # also the warm-up
            t = Spread.of(time_runs(step, args.repeats, warmup=0))
            print(f"{name:12s} {precision:9s} {t.median:15.3f} {t.min:7.3f} {t.max:7.3f} {args.batch / t.median:10.2f} "
                  f"{flops / 1e12:11.3f} {flops / t.median / peak:6.1%}")


if __name__ == "__main__":
    main()
