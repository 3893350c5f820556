"""Time of one text query against a saved 100,000-image gallery index on this machine (``Model.retrieve``).

    python bench/bench_gallery.py [--presets x2vlm-small[,x2vlm-base]] [--items 100000] [--real 256]
                                  [--images DIR] [--k-tests 0,16,128] [--queries 5] [--precisions fp32,bf16]
                                  [--keep-embeddings no|fp32|bf16]

What one query costs, as ``Model.retrieve(text, GalleryIndex.load(dir), k=10, k_test=K)`` runs it: the
query text is cleaned, tokenised and encoded, its ITC feature is compared with every item of the
index and the ``K`` most similar items are re-scored by the ITM head (``K`` 0: ITC only); an index
built from image files keeps their paths, not their embeddings, so the ``K`` candidates' image files
are read, transformed and encoded again for every query, unless ``--keep-embeddings fp32|bf16``
stores the embeddings in the index: then each query reads its candidates' rows from the index file
(``GalleryIndex.load`` leaves them there; column "vis enc").

For each preset: a random-weight retrieval model (``X2VLM(preset(name, task="retrieval"))``, seed 0;
the time does not depend on the weights) is written with ``save_pretrained`` to a temporary directory
and read back with ``x2vlm.load`` (once per precision; bf16 only on a CPU with bf16 matrix units,
``cpu_has_bf16_matmul``).

What is synthetic: only ``--real`` images (default 256; real JPEG files of a generated ``small``
world, ``x2vlm.world.generate``, or the first files of ``--images DIR``) are encoded, by
``Model.index(paths, kind="images")``. The index is then filled up to ``--items`` entries through the
public ``GalleryIndex`` constructor: entry ``i`` is real image ``i % real`` (its path as the source,
so the re-ranking reads and encodes a real image file, as for a real index) with the ITC feature of
that image plus Gaussian noise (``--noise``, default 0.01 per dimension) renormalised to unit length
(the first ``real`` entries are the exact features). So the ITC top-k candidates of a query are
mostly noisy copies of a few real images: their files are read repeatedly (from the page cache:
a real gallery on a cold disk pays the reads too). The index is saved (``GalleryIndex.save``),
loaded back (``GalleryIndex.load``, timed) and queried; the texts are fixed world-style captions.

Per (precision, k_test): one warm-up query, then ``--queries`` (>= 5) different queries, each timed
end to end around ``Model.retrieve``; median / min / max. The parts of the same calls are timed by
wrapping the handle's own steps (nothing is re-implemented): tokenise (``_caption_tokens``), text
encoder (``_encode_texts``), candidate image files read + transformed (``_Inputs.load``), vision
encoder (the rest of ``_candidate_embeds``), ITM fusion (``_itm``), final ranking (``_rank``;
for k_test 0 a full sort of the similarities), and "ITC + top-k" (the rest: similarity product with
the index, top-k, bookkeeping). The figures are medians of each part over the timed queries.
No assertions: it prints figures.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # the encoders' progress bars

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import x2vlm  # noqa: E402
from x2vlm import X2VLM, preset, save_pretrained  # noqa: E402
from x2vlm import inference  # noqa: E402
from x2vlm.inference import GalleryIndex  # noqa: E402
from x2vlm.train.metrics import source_commit  # noqa: E402
from x2vlm.precision import cpu_has_bf16_matmul  # noqa: E402
from x2vlm.train.host_memory import reuse_freed_memory  # noqa: E402

logger = logging.getLogger("bench_gallery")

QUERIES = [  # world-style captions; the first is the warm-up
    "a large red circle to the left of a small blue square",
    "a green triangle above a yellow circle",
    "two small purple squares and a large grey triangle",
    "a blue circle below a red square on the right",
    "an orange star next to a small green circle",
    "a large white square in the top left corner",
    "three circles: a red one, a blue one and a yellow one",
    "a small cyan triangle to the right of a large magenta circle",
    "a grey star above two blue squares",
    "a yellow square below a large purple triangle in the middle",
    "a red triangle, a green square and a blue circle",
]
PARTS = ("tokenise", "text enc", "ITC+topk", "img read", "vis enc", "ITM", "rank")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class PartTimer:
    """Seconds spent in the wrapped steps of ``Model.retrieve`` during one call."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed


@contextmanager
def timing_parts(model: inference.Model, timer: PartTimer):
    """Wrap the handle's steps (instance attributes shadow the methods; module / class attributes restored after)."""
    saved_rank, saved_load = inference._rank, inference._Inputs.load
    model._caption_tokens = timer.wrap("tokenise", model._caption_tokens)
    model._encode_texts = timer.wrap("text enc", model._encode_texts)
    model._candidate_embeds = timer.wrap("candidates", model._candidate_embeds)
    model._itm = timer.wrap("ITM", model._itm)
    inference._rank = timer.wrap("rank", saved_rank)
    inference._Inputs.load = timer.wrap("img read", saved_load)
    try:
        yield
    finally:
        for name in ("_caption_tokens", "_encode_texts", "_candidate_embeds", "_itm"):
            delattr(model, name)
        inference._rank, inference._Inputs.load = saved_rank, saved_load


def query_once(model: inference.Model, query: str, index: GalleryIndex, k: int, k_test: int) -> tuple[float, dict[str, float]]:
    timer = PartTimer()
    with timing_parts(model, timer):
        start = time.perf_counter()
        model.retrieve(query, index, k=k, k_test=k_test)
        total = time.perf_counter() - start
    s = timer.seconds
    parts = {"tokenise": s["tokenise"], "text enc": s["text enc"], "img read": s["img read"],
             "vis enc": s["candidates"] - s["img read"], "ITM": s["ITM"], "rank": s["rank"]}
    parts["ITC+topk"] = total - sum(parts.values())
    return total, parts


def real_image_paths(images_dir: str | None, count: int, workdir: Path) -> tuple[list[str], str]:
    if images_dir:
        root, what = Path(images_dir), f"files of {images_dir}"
    else:
        from x2vlm.world import generate

        logger.info("generating a small world into %s (~20 s)", workdir / "world")
        generate(workdir / "world", size="small", seed=0)
        root, what = workdir / "world" / "images", "JPEG files of a generated small world (x2vlm.world.generate, seed 0)"
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no image files under {root}")
    return paths[:count], what


class CycledRows:
    """The stored embeddings of the synthetic index: row ``i`` is real row ``i % n``, gathered when
    indexed (``GalleryIndex.save`` reads them piece by piece), never held whole: 100,000 x-base rows
    are 30 GB in bf16."""

    def __init__(self, rows: torch.Tensor, items: int):
        self.rows, self.dtype = rows, rows.dtype
        self.shape = torch.Size((items, *rows.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        return self.rows[torch.as_tensor(index) % len(self.rows)]


def fill_index(real: GalleryIndex, items: int, noise: float, seed: int) -> GalleryIndex:
    """``items`` entries cycling over the real ones: their sources (and stored embeddings, if any),
    their features plus noise (renormalised)."""
    n_real = len(real)
    which = torch.arange(items) % n_real
    g = torch.Generator().manual_seed(seed)
    features = real.features[which] + noise * torch.randn(items, real.features.shape[1], generator=g)
    features[:n_real] = real.features[: min(n_real, items)]
    features = torch.nn.functional.normalize(features, dim=-1).contiguous()
    stored = real.vision_embeds is not None
    index = GalleryIndex(real.kind, list(range(items)), features, [real.sources[i] for i in which.tolist()],
                         real.fingerprint, real.max_tokens, real.frame_len,
                         CycledRows(real.vision_embeds, items) if stored else None, real.vision_mask[which] if stored else None)
    index.check("synthetic gallery index")
    return index


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def bench_preset(name: str, args, paths: list[str], what: str, precisions: list[str], workdir: Path) -> None:
    torch.manual_seed(0)
    model_dir = save_pretrained(X2VLM(preset(name, task="retrieval")).eval(), workdir / name / "model")
    fp32 = x2vlm.load(model_dir)
    cfg = fp32.cfg
    print(f"\n== {name}: {cfg.image_res} px, vision {cfg.vision.width}x{cfg.vision.depth}, ITC dim {cfg.embed_dim}, "
          f"random weights (seed 0), saved + x2vlm.load'ed from {model_dir}", flush=True)

    start = time.perf_counter()
    keep = {"keep_embeddings": True, "embeddings_dtype": args.keep_embeddings} if args.keep_embeddings != "no" else {}
    real = fp32.index(paths, kind="images", **keep)  # fp32 encoding, sources = paths
    encode_s = time.perf_counter() - start
    print(f"real images encoded (Model.index, fp32): {len(real)} in {encode_s:.1f} s = {len(real) / encode_s:.1f} images/s "
          f"(a real {args.items:,}-image index would take ~{args.items * encode_s / len(real) / 60:.0f} min at this rate)")

    index_dir = workdir / name / "index"
    built = fill_index(real, args.items, args.noise, seed=1)
    start = time.perf_counter()
    built.save(index_dir)
    save_s = time.perf_counter() - start
    del built
    load_times = []
    for _ in range(3):
        start = time.perf_counter()
        index = GalleryIndex.load(index_dir)
        load_times.append(time.perf_counter() - start)
    files = {p.name: p.stat().st_size for p in sorted(index_dir.iterdir())}
    print(f"gallery index: {len(index):,} items ({len(real)} real, the rest noisy copies, noise {args.noise}), "
          f"feature dim {index.features.shape[1]}, kind {index.kind}, stored embeddings: "
          f"{'yes, ' + str(index.vision_embeds.dtype).replace('torch.', '') + ', read row by row from the file (column vis enc)' if index.vision_embeds is not None else 'no (re-ranking re-encodes the candidate files)'}")
    print(f"index size: {directory_bytes(index_dir) / 1e6:.1f} MB (" +
          ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in files.items()) + f"); save {save_s:.2f} s; "
          f"load (GalleryIndex.load) median {statistics.median(load_times):.2f} s, min {min(load_times):.2f}, max {max(load_times):.2f} (3 loads)")

    header = (f"{'precision':9s} {'k_test':>6s} {'total ms':>8s} {'min':>7s} {'max':>7s} | " +
              " ".join(f"{p:>8s}" for p in PARTS))
    print(f"per query (k={args.k}; 1 warm-up + {args.queries} different queries; total = Model.retrieve; parts = medians; all ms):")
    print(header)
    queries = QUERIES[: args.queries + 1]
    for precision in precisions:
        model = fp32 if precision == "fp32" else x2vlm.load(model_dir, dtype=precision)
        for k_test in args.k_tests:
            query_once(model, queries[0], index, args.k, k_test)  # warm-up
            totals, parts = [], defaultdict(list)
            for query in queries[1:]:
                total, split = query_once(model, query, index, args.k, k_test)
                totals.append(total)
                for part, seconds in split.items():
                    parts[part].append(seconds)
            print(f"{precision:9s} {k_test:6d} {1e3 * statistics.median(totals):8.1f} {1e3 * min(totals):7.1f} "
                  f"{1e3 * max(totals):7.1f} | " + " ".join(f"{1e3 * statistics.median(parts[p]):8.1f}" for p in PARTS), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="x2vlm-small", help="comma-separated, e.g. x2vlm-small,x2vlm-base")
    parser.add_argument("--items", type=int, default=100_000, help="gallery index size")
    parser.add_argument("--real", type=int, default=256, help="real images encoded (the rest are copies)")
    parser.add_argument("--images", help="a directory of images (default: generate a small world)")
    parser.add_argument("--noise", type=float, default=0.01, help="std of the noise added to copied features")
    parser.add_argument("--k", type=int, default=10, help="hits returned per query")
    parser.add_argument("--k-tests", default="0,16,128", help="ITM re-ranked candidates (0: ITC only)")
    parser.add_argument("--queries", type=int, default=5, help=f"timed queries after the warm-up (5..{len(QUERIES) - 1})")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--keep-embeddings", default="no", choices=("no", "fp32", "bf16"),
                        help="store the vision embeddings in the index (Model.index(keep_embeddings=True, embeddings_dtype=...)): "
                             "queries read their candidates' rows instead of encoding the files; the index then holds "
                             "(1 + grid^2) x width values per item (x2vlm-base in bf16: 0.3 MB, 30 GB for 100,000 items: "
                             "written to disk piece by piece, so mind the disk, not the memory)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", help="keep the world, models and indexes here (default: a temporary directory)")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does (x2vlm.train.host_memory)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not 5 <= args.queries <= len(QUERIES) - 1:
        parser.error(f"--queries must be from 5 to {len(QUERIES) - 1}")
    if args.items < args.real:
        parser.error("--items must be at least --real")
    args.k_tests = [int(k) for k in args.k_tests.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    commit = source_commit()
    precisions = args.precisions.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs), commit {commit}")
    if "bf16" in precisions and not cpu_has_bf16_matmul():
        print("no bf16 matrix units on this CPU (AVX512-BF16/AMX): skipping bf16")
        precisions.remove("bf16")
    with tempfile.TemporaryDirectory(prefix="bench_gallery_") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        paths, what = real_image_paths(args.images, args.real, workdir)
        print(f"real images: {len(paths)} {what}; index filled to {args.items:,} items with noisy copies (see --help)")
        for name in args.presets.split(","):
            bench_preset(name, args, paths, what, precisions, workdir)


if __name__ == "__main__":
    main()
