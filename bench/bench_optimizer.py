"""AdamW step time: torch's loop implementation (its CPU default) against the fused kernel that
``x2vlm.train.optim.build_optimizer`` chooses, on a preset's parameters with random gradients.

    python bench/bench_optimizer.py [--presets x2vlm-small,x2vlm-base] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from x2vlm import X2VLM, preset
from x2vlm.train.metrics import Spread, source_commit
from x2vlm.train.optim import OptimizerConfig, parameter_groups
from x2vlm.train.host_memory import reuse_freed_memory


def step_times(model: torch.nn.Module, fused: bool, repeats: int) -> list[float]:
    cfg = OptimizerConfig(lr=1e-4)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=fused, foreach=False)
    optimizer.step()  # allocates the state: the warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="x2vlm-small,x2vlm-base")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does (x2vlm.train.host_memory)
    print(f"AdamW step: commit {source_commit()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median (min-max) of {args.repeats}")
    for name in args.presets.split(","):
        torch.manual_seed(0)
        model = X2VLM(preset(name).replace(task="pretrain"))
        for param in model.parameters():
            param.grad = torch.randn_like(param) * 1e-3
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        loop, fused = Spread.of(step_times(model, False, args.repeats)), Spread.of(step_times(model, True, args.repeats))
        print(f"{name:12s} {millions:6.1f} M parameters   loop {loop.median:.3f} s ({loop.min:.3f}-{loop.max:.3f})   "
              f"fused {fused.median:.3f} s ({fused.min:.3f}-{fused.max:.3f})   {loop.median / fused.median:.1f}x")


if __name__ == "__main__":
    main()
