"""``x2vlm world ...`` subcommands; ``add_world_commands`` plugs them into the main parser."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from x2vlm.world.vocabulary import DEFAULT_GRID_PX

logger = logging.getLogger(__name__)


def run_generate(args: argparse.Namespace) -> int:
    from x2vlm.world.generate import generate

    started = time.perf_counter()
    manifest = generate(args.out_dir, size=args.size, seed=args.seed, image_size=args.image_size,
                        video_size=args.video_size, grid_px=args.grid_px)
    logger.info("generated %d dataset files in %.1f s; manifest: %s", len(manifest["files"]),
                time.perf_counter() - started, Path(args.out_dir) / "manifest.json")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from x2vlm.world.show import show

    out = args.out or f"{args.item_id.replace(':', '_')}.png"
    logger.info("wrote %s", show(args.out_dir, args.item_id, out))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from x2vlm.world.stats import collect_stats, stats

    if args.json:
        print(json.dumps(collect_stats(args.out_dir), indent=2))
    else:
        print(stats(args.out_dir))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from x2vlm.world.check import check

    problems = check(args.out_dir, check_pixels=not args.skip_pixels)
    for problem in problems:
        print(problem)
    logger.info("%d problem(s) found", len(problems))
    return 1 if problems else 0


def add_world_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``world generate|show|stats|check`` to an argparse subparsers object. Each leaf
    parser sets ``func`` (taking the parsed namespace, returning an exit code)."""
    from x2vlm.world.generate import SIZE_PRESETS
    from x2vlm.world.show import ITEM_ID_HELP

    world = subparsers.add_parser(
        "world", help="the generated default world: every dataset in the real file formats")
    commands = world.add_subparsers(dest="world_command", required=True)

    p = commands.add_parser("generate", help="generate the world into OUT_DIR (same seed, same bytes)")
    p.add_argument("out_dir", help="output directory (created; a previous world there is replaced)")
    p.add_argument("--size", choices=sorted(SIZE_PRESETS), default="small",
                   help="how many scenes and clips (default: small, under a minute)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--video-size", type=int, default=64, help="video frame side in pixels (default 64)")
    p.add_argument("--grid-px", type=int, default=DEFAULT_GRID_PX,
                   help="objects of images are placed on a grid of cells of this many pixels, aligned "
                        f"with ViT patches of that size (default {DEFAULT_GRID_PX}; 1: free placement)")
    p.set_defaults(func=run_generate)

    p = commands.add_parser("show", help="write a PNG of one item with its boxes and text")
    p.add_argument("out_dir", help="a generated world")
    p.add_argument("item_id", help=ITEM_ID_HELP)
    p.add_argument("--out", help="PNG to write (default: ITEM_ID.png in the current directory)")
    p.set_defaults(func=run_show)

    p = commands.add_parser("stats", help="print split sizes and answer/label distributions")
    p.add_argument("out_dir", help="a generated world")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=run_stats)

    p = commands.add_parser("check", help="recompute every caption, answer, box and label from the "
                                          "ground truth; exit 1 on any problem")
    p.add_argument("out_dir", help="a generated world")
    p.add_argument("--skip-pixels", action="store_true", help="do not check object colours in pixels")
    p.set_defaults(func=run_check)
    return world
