"""The embedded default dataset: a generated visual world written in the real datasets' formats.

``generate(out_dir)`` writes scenes of 1-4 coloured shapes on textured backgrounds and short
clips of them, with ground truth, and every dataset the X²-VLM tasks read (pre-training
image/region/video text, Karpathy retrieval and captioning, VQA v2, NLVR2, RefCOCO+, MSR-VTT
retrieval and QA, multilingual retrieval) in the official file formats, listed by role in
``manifest.json``. ``check`` re-derives everything from the ground truth, ``stats`` reports the
answer distributions and ``show`` draws an item.
"""

from x2vlm.world.check import check
from x2vlm.world.commands import add_world_commands
from x2vlm.world.generate import SIZE_PRESETS, generate
from x2vlm.world.show import show
from x2vlm.world.stats import collect_stats, stats

__all__ = ["SIZE_PRESETS", "add_world_commands", "check", "collect_stats", "generate", "show", "stats"]
