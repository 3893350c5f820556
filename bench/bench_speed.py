"""Issue 10's speed benchmark: the matmul peak and workloads W1-W4, fp32 and bf16 autocast, in one process.

    python bench/bench_speed.py [--repeats 5] [--quick] [--workloads W1,W2,W3,W4] [--precisions fp32,bf16]
                                [--threads N] [--no-check] [--json out.json]

* matmul: 2048^3, fp32 and bf16 (the peak each workload is measured against is the best run);
* W1: base pre-training step, 8 images at 224 px, 30-token captions, 12 MLM masks, ITC + ITM (hard
  negatives) + MLM, forward + backward + AdamW (train mode); also its peak resident memory;
* W2: the same forward in eval mode, without gradients;
* W3: retrieval evaluation, base at 384 px, 32 images x 160 texts (5 per image), k_test 16, our
  batched two-stage protocol (``two_stage_retrieval``) from pixels and token ids to both score matrices;
* W4: the same on the tiny parity model (``x2vlm-tiny``, the weights of tests/data/parity when
  present), 256 images x 1,280 texts, k_test 128.

Every figure is the median, min and max over ``--repeats`` timed runs (the first, untimed run of
each workload counts its FLOPs with torch's FLOP counter and is the warm-up), the FLOPs, the
fraction of the same-precision matmul peak, and issue 10's official figure with the speed-up.
For W3 and W4 the script also checks our candidates and ITM scores against an official-style loop
(one query at a time, k fusion forwards each: ``bench_retrieval_eval.official_loop``, fp32, timed
once and printed for information): fp32 must give the same candidates and scores within 1e-4; for
bf16 it prints how many queries keep the reference's top-1 and the largest ITM and ITC differences,
and passes when every differing top-1 is a tie within the bf16 error (see ``check_against_official``).
Exit status 1 when a check fails.

Peak resident memory (W1) is the process's (``VmHWM``), reset after the untimed first step, so it
includes the model, the AdamW state and whatever the allocator keeps.

``--quick``: 2 timed runs, and W3/W4 shrunk (W3 4 images x 20 texts, k_test 4; W4 64 x 320,
k_test 32) so that the whole command, checks included, takes a few minutes; the speed-up against
the official figures is then only printed for W1/W2 (whose sizes do not change).

Random weights (the time does not depend on them), random pixels and random full-length texts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks
from bench_pretrain import pretrain_forward, pretrain_step, synthetic_batch  # noqa: E402
from bench_retrieval_eval import official_loop  # noqa: E402

from x2vlm import X2VLM, preset  # noqa: E402
from x2vlm.precision import autocast  # noqa: E402
from x2vlm.tasks import retrieval  # noqa: E402
from x2vlm.tasks.retrieval import NOT_A_CANDIDATE, RerankSettings, RetrievalScores, TensorVision, two_stage_retrieval  # noqa: E402
from x2vlm.train.metrics import (  # noqa: E402
    cpu_name,
    Spread,
    count_step_flops,
    matmul_rates,
    peak_rss,
    reset_peak_rss,
    source_commit,
    time_runs,
)
from x2vlm.train.host_memory import reuse_freed_memory  # noqa: E402
from x2vlm.train.optim import OptimizerConfig, StepInBackward, build_optimizer  # noqa: E402

retrieval.tqdm = lambda iterable, **kwargs: iterable  # no progress bars between the table's lines

# Issue 10: the official implementation at random initialisation, 2 cores with AMX, torch 2.13 CPU.
OFFICIAL_SECONDS = {"W1": 6.5, "W2": 2.0, "W3": 169.0, "W4": 18.6}
OFFICIAL_MATMUL = {"fp32": 366e9, "bf16": 2686e9}
OFFICIAL_W1_FLOPS = 1.67e12
OFFICIAL_W1_RSS = 4.8e9
MATMUL_SIZE = 2048
FP32_TOLERANCE = 1e-4
# bf16 against the fp32 official-style loop: ITM logits and ITC cosine similarities (see check_against_official).
BF16_ITM_TOLERANCE = 0.05
BF16_SIM_TOLERANCE = 0.02
PARITY_STATE = Path(__file__).resolve().parents[1] / "tests" / "data" / "parity" / "tiny_state_dict.safetensors"


@dataclass(frozen=True)
class RetrievalSize:
    images: int
    texts_per_image: int
    k_test: int


FULL_SIZES = {"W3": RetrievalSize(32, 5, 16), "W4": RetrievalSize(256, 5, 128)}
QUICK_SIZES = {"W3": RetrievalSize(4, 5, 4), "W4": RetrievalSize(64, 5, 32)}


@dataclass
class Result:
    workload: str
    precision: str
    seconds: Spread
    flops: int
    peak: float  # the same-precision matmul peak of this run, FLOP/s
    official_s: float | None  # None: sizes differ from the official measurement
    rss_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fraction_of_peak(self) -> float:
        return self.flops / self.seconds.median / self.peak

    @property
    def speedup(self) -> float | None:
        return None if self.official_s is None else self.official_s / self.seconds.median


def measure(workload: str, precision: str, fn, repeats: int, peak: float, official_s: float | None) -> Result:
    """FLOPs of one untimed run of ``fn`` (the warm-up), then ``repeats`` timed runs."""
    _, flops = count_step_flops(fn)
    return Result(workload, precision, Spread.of(time_runs(fn, repeats, warmup=0)), flops, peak, official_s)


def print_result(r: Result) -> None:
    t = r.seconds
    official = f"{r.official_s:9.1f}" if r.official_s is not None else f"{'-':>9s}"
    speedup = f"{r.speedup:7.1f}x" if r.speedup is not None else f"{'-':>8s}"
    rss = f"{r.rss_bytes / 1e9:6.2f} GB" if r.rss_bytes else ""
    print(f"{r.workload:4s} {r.precision:5s} {t.median:9.3f} {t.min:8.3f} {t.max:8.3f} {r.flops / 1e12:9.3f} "
          f"{r.flops / t.median / 1e9:9.1f} {r.fraction_of_peak:7.1%} {official} {speedup} {rss}", flush=True)


# -- W1 / W2 -----------------------------------------------------------------------------------------
def pretraining_workloads(precisions: list[str], peaks: dict[str, float], repeats: int, which: set[str],
                          grad_checkpointing: bool = False, step_in_backward: bool = False) -> list[Result]:
    torch.manual_seed(0)
    model = X2VLM(preset("x2vlm-base"))
    model.set_grad_checkpointing(grad_checkpointing)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4))
    stepper = StepInBackward(optimizer) if step_in_backward else None
    batch = synthetic_batch(model.cfg, 8, 30, 12)
    results = []
    for precision in precisions:
        if "W1" in which:
            step = pretrain_step(model, optimizer, batch, precision, steps_in_backward=stepper is not None,
                                 grad_checkpointing=grad_checkpointing)
            _, flops = count_step_flops(step)  # the warm-up; allocates the AdamW state
            exact = reset_peak_rss()
            r = Result("W1", precision, Spread.of(time_runs(step, repeats, warmup=0)), flops, peaks[precision], OFFICIAL_SECONDS["W1"],
                       rss_bytes=peak_rss())
            if grad_checkpointing:
                r.notes.append("gradient checkpointing: the FLOPs include the recomputed forward passes")
            if stepper is not None:
                r.notes.append("AdamW stepped per parameter during backward (StepInBackward), gradients freed at once")
            if not exact:
                r.notes.append("peak RSS since process start (clear_refs not writable)")
            results.append(r)
            print_result(r)
        if "W2" in which:
            r = measure("W2", precision, pretrain_forward(model, batch, precision), repeats, peaks[precision], OFFICIAL_SECONDS["W2"])
            results.append(r)
            print_result(r)
    if stepper is not None:
        stepper.remove()
    del model, optimizer, stepper
    gc.collect()
    return results


# -- W3 / W4 -----------------------------------------------------------------------------------------
def retrieval_data(cfg, size: RetrievalSize, text_len: int = 30):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(size.images, 3, cfg.image_res, cfg.image_res, generator=g)
    num_texts = size.images * size.texts_per_image
    ids = torch.randint(min(1000, cfg.text.vocab_size // 2), cfg.text.vocab_size, (num_texts, text_len), generator=g)
    ids[:, 0], ids[:, -1] = cfg.text.cls_token_id, cfg.text.sep_token_id
    return pixels, ids, torch.ones_like(ids)


def retrieval_model(workload: str) -> tuple[X2VLM, str]:
    torch.manual_seed(0)
    if workload == "W3":
        return X2VLM(preset("x2vlm-base", task="retrieval", image_res=384)).eval(), "x2vlm-base at 384 px, random weights"
    model = X2VLM(preset("x2vlm-tiny", task="retrieval"))
    if PARITY_STATE.is_file():
        from safetensors.torch import load_file

        from x2vlm.checkpoint import load_official

        load_official(model, load_file(str(PARITY_STATE)))
        return model.eval(), "x2vlm-tiny, parity weights"
    return model.eval(), "x2vlm-tiny, random weights (no parity fixture found)"


def check_against_official(ours: RetrievalScores, reference: RetrievalScores, precision: str, k_test: int) -> tuple[bool, str]:
    """fp32: the same candidates and ITM scores within 1e-4 of the official-style loop.

    bf16 (reference: the fp32 loop): the number of queries (both directions) whose top-1 differs is
    always printed, with the largest ITC and ITM differences. On random weights many ITM scores of
    one query lie within the bf16 error of each other, and the bf16 ITC similarities can swap the
    candidates at the top-k boundary, so the check passes when every differing top-1 is such a tie:
    both answers score within ``BF16_ITM_TOLERANCE`` of each other in the reference, or the answer
    missing from one candidate list lies within ``BF16_SIM_TOLERANCE`` of the reference's k-th
    similarity; and the ITM differences over common candidates stay within ``BF16_ITM_TOLERANCE``."""
    diffs, same_candidates = [], True
    directions = ((ours.score_i2t, reference.score_i2t, reference.sims), (ours.score_t2i, reference.score_t2i, reference.sims.t()))
    for mine, ref, _ in directions:
        mine_c, ref_c = mine > NOT_A_CANDIDATE, ref > NOT_A_CANDIDATE
        same_candidates &= torch.equal(mine_c, ref_c)
        both = mine_c & ref_c
        diffs.append(float((mine[both] - ref[both]).abs().max()) if both.any() else 0.0)
    itm_diff = max(diffs)
    if precision == "fp32":
        ok = same_candidates and itm_diff <= FP32_TOLERANCE
        return ok, f"same candidates: {same_candidates}; largest ITM score difference {itm_diff:.1e} (limit {FP32_TOLERANCE:.0e})"
    sim_diff = float((ours.sims - reference.sims).abs().max())
    queries, differ, itm_ties, boundary_ties = 0, 0, 0, 0
    for mine, ref, sims in directions:
        queries += len(ref)
        kth = sims.topk(min(k_test, sims.shape[1]), dim=1).values[:, -1]
        for q in (mine.argmax(dim=1) != ref.argmax(dim=1)).nonzero().flatten().tolist():
            differ += 1
            a, b = int(mine[q].argmax()), int(ref[q].argmax())  # our answer, the reference's
            if all(m[q, j] > NOT_A_CANDIDATE for m in (mine, ref) for j in (a, b)):
                itm_ties += float(ref[q, b] - ref[q, a]) <= BF16_ITM_TOLERANCE
            else:
                missing = a if ref[q, a] == NOT_A_CANDIDATE else b
                boundary_ties += abs(float(sims[q, missing] - kth[q])) <= BF16_SIM_TOLERANCE
    explained = itm_ties + boundary_ties
    ok = explained == differ and itm_diff <= BF16_ITM_TOLERANCE and sim_diff <= BF16_SIM_TOLERANCE
    return ok, (f"same top-1 for {queries - differ}/{queries} queries (of the {differ} others: {itm_ties} ITM ties within "
                f"{BF16_ITM_TOLERANCE}, {boundary_ties} candidates swapped at the top-k boundary within {BF16_SIM_TOLERANCE} ITC, "
                f"{differ - explained} unexplained); same candidates: {same_candidates}; largest ITM score difference "
                f"{itm_diff:.2e} over common candidates (limit {BF16_ITM_TOLERANCE}); largest ITC difference {sim_diff:.2e} "
                f"(limit {BF16_SIM_TOLERANCE})")


def retrieval_workload(workload: str, size: RetrievalSize, precisions: list[str], peaks: dict[str, float], repeats: int,
                       check: bool, official_sizes: bool) -> tuple[list[Result], bool]:
    model, what = retrieval_model(workload)
    pixels, ids, mask = retrieval_data(model.cfg, size)
    settings = RerankSettings(size.k_test, batch_size=64, rerank_batch_size=256, max_cached_images=256)
    print(f"{workload}: {what}, {len(pixels)} images x {len(ids)} texts, k_test {size.k_test}", flush=True)
    results, outputs = [], {}
    for precision in precisions:

        def run(precision=precision):
            outputs[precision] = two_stage_retrieval(model, TensorVision(pixels), ids, mask, settings,
                                                     autocast=lambda: autocast(precision, "cpu"))

        r = measure(workload, precision, run, repeats, peaks[precision], OFFICIAL_SECONDS[workload] if official_sizes else None)
        results.append(r)
        print_result(r)
    passed = True
    if check:
        ref_s = time_runs(lambda: outputs.__setitem__("official", official_loop(model, pixels, ids, mask, size.k_test, 64)), 1, warmup=0)[0]
        reference = outputs["official"]
        print(f"{workload} check against the official-style loop (one query at a time, fp32, {ref_s:.1f} s here):", flush=True)
        for r in results:
            ok, line = check_against_official(outputs[r.precision], reference, r.precision, size.k_test)
            r.notes.append(("PASS " if ok else "FAIL ") + line)
            print(f"  {r.precision}: {'PASS' if ok else 'FAIL'}: {line}", flush=True)
            passed &= ok
    return results, passed


# -- main ----------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, help="timed runs per figure (default 5; --quick: 2)")
    parser.add_argument("--quick", action="store_true", help="2 timed runs and smaller W3/W4: a few minutes")
    parser.add_argument("--workloads", default="W1,W2,W3,W4")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-check", action="store_true", help="skip the W3/W4 comparison with the official-style loop")
    parser.add_argument("--json", help="also write every figure here")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="W1 with activation checkpointing (X2VLM.set_grad_checkpointing): less memory, more compute")
    parser.add_argument("--step-in-backward", action="store_true",
                        help="W1 with each parameter's AdamW step run during backward, its gradient freed at once "
                             "(train.optim.StepInBackward): less memory")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    workloads = set(args.workloads.split(","))
    precisions = args.precisions.split(",")
    unknown = (workloads - set(OFFICIAL_SECONDS)) | (set(precisions) - set(OFFICIAL_MATMUL))
    if unknown:
        parser.error(f"unknown workload(s)/precision(s) {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    allocator = "freed memory kept for reuse" if reuse_freed_memory() else "the C allocator's defaults"
    sizes = QUICK_SIZES if args.quick else FULL_SIZES

    commit = source_commit()  # once: a commit made while the benchmark runs does not change what it measured
    print(f"x2vlm speed benchmark (issue 10): commit {commit}, torch {torch.__version__}, {args.threads} threads, "
          f"{cpu_name()} ({os.cpu_count()} CPUs), {repeats} timed runs per figure{' (--quick)' if args.quick else ''}, {allocator}", flush=True)
    peaks, matmul = {}, {}
    for precision in precisions:
        rates = Spread.of(matmul_rates("cpu", precision, MATMUL_SIZE, max(repeats, 5)))
        peaks[precision], matmul[precision] = rates.max, rates
        print(f"matmul {MATMUL_SIZE}^3 {precision}: median {rates.median / 1e9:.0f} GFLOP/s (min {rates.min / 1e9:.0f}, max "
              f"{rates.max / 1e9:.0f} = the peak below); official {OFFICIAL_MATMUL[precision] / 1e9:.0f} GFLOP/s", flush=True)
    print(f"{'':4s} {'':5s} {'median s':>9s} {'min':>8s} {'max':>8s} {'TFLOP':>9s} {'GFLOP/s':>9s} {'%peak':>7s} "
          f"{'official':>9s} {'speed-up':>8s} {'peak RSS'}")
    results, passed = [], True
    if workloads & {"W1", "W2"}:
        results += pretraining_workloads(precisions, peaks, repeats, workloads, args.grad_checkpointing, args.step_in_backward)
    for workload in ("W3", "W4"):
        if workload in workloads:
            size = sizes[workload]
            done, ok = retrieval_workload(workload, size, precisions, peaks, repeats, not args.no_check, size == FULL_SIZES[workload])
            results += done
            passed &= ok
            gc.collect()

    print(f"official (issue 10, 2 cores with AMX): W1 {OFFICIAL_SECONDS['W1']} s, {OFFICIAL_W1_FLOPS / 1e12:.2f} TFLOP "
          f"({OFFICIAL_W1_FLOPS / OFFICIAL_SECONDS['W1'] / OFFICIAL_MATMUL['fp32']:.0%} of its fp32 peak), {OFFICIAL_W1_RSS / 1e9:.1f} GB "
          f"resident; W2 {OFFICIAL_SECONDS['W2']} s; W3 {OFFICIAL_SECONDS['W3']:.0f} s; W4 {OFFICIAL_SECONDS['W4']} s (all fp32)")
    for r in results:
        for note in r.notes:
            if not note.startswith(("PASS", "FAIL")):
                print(f"note {r.workload} {r.precision}: {note}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"commit": commit, "torch": torch.__version__, "threads": args.threads, "cpu": cpu_name(),
                       "quick": args.quick, "repeats": repeats,
                       "matmul": {p: asdict(s) for p, s in matmul.items()},
                       "sizes": {w: asdict(s) for w, s in sizes.items()},
                       "results": [{**asdict(r), "fraction_of_peak": r.fraction_of_peak, "speedup": r.speedup} for r in results],
                       "checks_passed": passed}, fh, indent=2)
    if not passed:
        print("a W3/W4 check against the official-style loop FAILED (see above)")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
