"""The main job, ``x2vlm demo``: the paper's results table on the generated world, end to end.

Stages run in order; each is recorded in ``DIR/demo_state.json`` (written atomically) when it
finishes, so a re-run skips finished stages and a stage interrupted half-way resumes from its own
checkpoints (pre-training and fine-tuning resume exactly):

1. ``world``: the generated world in ``DIR/world`` (``x2vlm world generate``).
2. ``pretrain_stage1``, ``pretrain_stage2``, ``pretrain_stage3``: the small preset's pre-training
   (``configs/pretrain/small_world_stage1.yaml``, then ``small_world.yaml`` from it, then the
   localization stage ``small_world_localization.yaml``: box losses with image-text ITC and ITM,
   on frozen towers); the pre-trained model of every task is stage 3's.
3. ``pretrain_stage2_no_regions`` (``ablation``): stage 2 again from the same stage 1 but without
   region-text data, i.e. without region ITC/ITM/MLM and the box losses (and no stage 3).
4. ``finetune:TASK:INIT`` for every task of the table: from the pre-trained model (``pre``), from a
   random initialisation with the same budget (``scratch``), and for retrieval and grounding from the
   ablation (``no_regions``). Configs: ``configs/finetune/*_small_world.yaml``.
5. ``chance``: the input-blind chance level of every metric (``x2vlm.demo.baselines``).
6. ``multilingual`` (``--multilingual``): zero-shot cross-lingual retrieval on the world's de/fr/es
   captions (``x2vlm.demo.cclm_transfer.transfer``): the pre-trained model converted to a random
   RoBERTa-style text encoder, CCLM-adapted, fine-tuned on English only, tested in every language;
   with the same fine-tuning of the converted model without CCLM as the control.
7. the report (always rebuilt): the table on the terminal and ``DIR/report.md``.

Every config is read from the packaged files, pointed at ``DIR``, given the demo's seed and the
caller's overrides, and written to ``DIR/configs/STAGE.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
STATE_FILE = "demo_state.json"
PRETRAINED = "stage3"  # DIR/pretrain/<this>: the pre-trained model every task starts from
#: The path prefixes the packaged small-world configs use, and where they point inside a demo directory.
WORLD_PREFIX = "runs/world"


@dataclass(frozen=True)
class DemoTask:
    """One row group of the table: a fine-tuning task run from its small-world config."""

    key: str  # run name (also the key in the table)
    task: str  # fine-tuning task (``x2vlm finetune TASK``)
    config: str  # file under configs/finetune/
    expected_s: float  # one fine-tuning of this task at size small on a 2-core CPU (for the ETA)


#: The tasks in the order of the paper's results table (image tasks, then video).
DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("retrieval", "retrieval", "retrieval_small_world.yaml", 55),
    DemoTask("vqa", "vqa", "vqa_small_world.yaml", 40),
    DemoTask("nlvr", "nlvr", "nlvr2_small_world.yaml", 45),
    DemoTask("grounding", "grounding", "grounding_small_world.yaml", 55),
    DemoTask("captioning", "captioning", "captioning_small_world.yaml", 55),
    DemoTask("video_retrieval", "retrieval", "video_retrieval_small_world.yaml", 40),
    DemoTask("video_qa", "video_qa", "video_qa_small_world.yaml", 30),
)
#: Tasks also fine-tuned from the ablation (pre-training without regions and boxes).
ABLATION_TASKS = ("retrieval", "grounding")
INITS = {"pre": "pre-trained", "scratch": "from scratch", "no_regions": "pre-trained without regions/boxes"}


@dataclass(frozen=True)
class MultilingualBudget:
    """The ``multilingual`` stage's budget (``x2vlm.demo.cclm_transfer.transfer``): about 8 minutes at
    size small on this 2-core CPU (measured 7:48 with these defaults, without the control; README)."""

    cclm_steps: int = 150  # CCLM adaptation steps of batch_size images + batch_size parallel pairs
    en_steps: int = 60  # English retrieval fine-tuning steps (then evaluated on en/de/fr/es)
    batch_size: int = 16
    text_layers: int = 4  # the random RoBERTa-style text encoder (no XLM-R offline)
    vocab_size: int = 1000  # its SentencePiece vocabulary
    control: bool = False  # also fine-tune the converted model without CCLM (the control; about 3.5 min more)
    few_shot: int = 100  # then fine-tune on this many training captions per language (0: no few-shot column)
    few_steps: int = 20
    expected_s: float = 480  # for the ETA


@dataclass
class DemoSettings:
    out_dir: Path = Path("runs/demo")
    size: str = "small"  # world size: small | medium (tiny: tests)
    seed: int = 0
    ablation: bool = False
    multilingual: bool = False  # the multilingual stage (zero-shot cross-lingual retrieval after CCLM)
    multilingual_budget: MultilingualBudget = field(default_factory=MultilingualBudget)
    pretrain_overrides: list[str] = field(default_factory=list)  # ``key=value`` for every pre-training stage
    finetune_overrides: list[str] = field(default_factory=list)  # ``key=value`` for every fine-tuning

    def identity(self) -> dict[str, Any]:
        """What must match for a re-run to reuse this directory's finished stages."""
        return {"size": self.size, "seed": self.seed, "pretrain_overrides": list(self.pretrain_overrides),
                "finetune_overrides": list(self.finetune_overrides)}


@dataclass
class Stage:
    name: str
    title: str
    expected_s: float
    run: Callable[[], dict[str, Any]]


# -- persistent state -------------------------------------------------------------------------------
class DemoState:
    """Finished stages with their durations and results, in ``DIR/demo_state.json``."""

    def __init__(self, out_dir: Path, settings: DemoSettings):
        self.path = out_dir / STATE_FILE
        identity = settings.identity()
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}: not valid JSON ({err}); delete it to start the demo over") from err
            if data.get("settings") != identity:
                raise ValueError(f"{out_dir} holds a demo run with other settings ({data.get('settings')}, now {identity}); "
                                 "choose another --out or delete that directory")
            self.stages: dict[str, dict[str, Any]] = data.get("stages", {})
        else:
            self.stages = {}
        self.identity = identity

    def done(self, name: str) -> bool:
        return name in self.stages

    def record(self, name: str, seconds: float, result: dict[str, Any]) -> None:
        self.stages[name] = {"seconds": seconds, "result": result}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"settings": self.identity, "stages": self.stages}, indent=2) + "\n")
        os.replace(tmp, self.path)

    def result(self, name: str) -> dict[str, Any] | None:
        entry = self.stages.get(name)
        return None if entry is None else entry["result"]


# -- configs ----------------------------------------------------------------------------------------
def relocate(value: Any, world_dir: Path) -> Any:
    """The packaged config with every ``runs/world...`` path pointed at ``world_dir``."""
    if isinstance(value, dict):
        return {k: relocate(v, world_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [relocate(v, world_dir) for v in value]
    if isinstance(value, str) and (value == WORLD_PREFIX or value.startswith(WORLD_PREFIX + "/")):
        return str(world_dir) + value[len(WORLD_PREFIX):]
    return value


def stage_config(settings: DemoSettings, config_file: Path, changes: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A packaged run config pointed at the demo directory, with the caller's ``overrides`` applied,
    then the demo's own ``changes`` (output directory, seed, the run a stage starts from), which
    overrides cannot change."""
    from x2vlm.train.pretrain import apply_overrides, read_run_config

    data = apply_overrides(relocate(read_run_config(config_file), settings.out_dir / "world"), list(overrides))
    data.update(changes)
    return data


def _write_config(settings: DemoSettings, stage: str, text: str) -> str:
    path = settings.out_dir / "configs" / (stage.replace(":", "_") + ".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


# -- stages -----------------------------------------------------------------------------------------
def _world_stage(settings: DemoSettings) -> dict[str, Any]:
    from x2vlm.world.generate import generate

    manifest = generate(settings.out_dir / "world", size=settings.size, seed=settings.seed)
    return {"held_out_pairs": manifest.get("held_out_pairs"), "counts": manifest.get("counts")}


def _pretrain_stage(settings: DemoSettings, name: str, config: str, changes: dict[str, Any]) -> dict[str, Any]:
    from x2vlm.train.pretrain import SOURCE_KINDS, build_pretrain_config, config_to_yaml, read_run_config, run_pretraining

    out = settings.out_dir / "pretrain" / name
    config_file = CONFIG_ROOT / "pretrain" / config
    # an override of a data source this stage does not read (stage 1 reads images only) is skipped
    sources = {key for key, value in read_run_config(config_file).items() if key in SOURCE_KINDS and value is not None}
    overrides = [o for o in settings.pretrain_overrides if o.split("=", 1)[0].split(".")[0] not in set(SOURCE_KINDS) - sources]
    data = stage_config(settings, config_file, {"out_dir": str(out), "seed": settings.seed, **changes}, overrides)
    cfg = build_pretrain_config(data, f"demo stage {name} ({config})")
    config_path = _write_config(settings, f"pretrain_{name}", config_to_yaml(cfg))
    last = run_pretraining(cfg)
    return {"out_dir": str(out), "config": config_path, "last": last}


def _finetune_stage(settings: DemoSettings, task: DemoTask, init: str) -> dict[str, Any]:
    from x2vlm.train.finetune import build_finetune_config, config_to_yaml, run_finetuning

    out = settings.out_dir / "finetune" / f"{task.key}_{init}"
    init_spec = {"pre": f"ours:{settings.out_dir / 'pretrain' / PRETRAINED}",
                 "no_regions": f"ours:{settings.out_dir / 'pretrain' / 'stage2_no_regions'}",
                 "scratch": "scratch"}[init]
    data = stage_config(settings, CONFIG_ROOT / "finetune" / task.config,
                        {"out_dir": str(out), "seed": settings.seed, "init": init_spec}, settings.finetune_overrides)
    cfg = build_finetune_config(data, f"demo {task.key} ({task.config})")
    config_path = _write_config(settings, f"finetune_{task.key}_{init}", config_to_yaml(cfg))
    summary = run_finetuning(cfg)
    return {"out_dir": str(out), "config": config_path, "results": summary["results"], "selection": summary["selection"],
            "pictures": summary["pictures"]}


def _chance_stage(settings: DemoSettings) -> dict[str, Any]:
    from x2vlm.demo.baselines import chance_levels

    levels = {}
    for task in DEMO_TASKS:
        data = stage_config(settings, CONFIG_ROOT / "finetune" / task.config, {}, [])["data"]
        levels[task.key] = chance_levels(task.task, data)
    return levels


#: Run-config keys of the caller's pre-training overrides the multilingual stage also takes (its
#: model, data and budget are its own).
MULTILINGUAL_KEYS = ("precision", "tensorboard")


def _multilingual_stage(settings: DemoSettings) -> dict[str, Any]:
    from x2vlm.demo.cclm_transfer import transfer

    budget = settings.multilingual_budget
    changes = dict(o.split("=", 1) for o in settings.pretrain_overrides if o.split("=", 1)[0] in MULTILINGUAL_KEYS)
    changes = {k: yaml.safe_load(v) for k, v in changes.items()}
    out = settings.out_dir / "multilingual"
    result = transfer(settings.out_dir / "world", settings.out_dir / "pretrain" / PRETRAINED, out, cclm_steps=budget.cclm_steps,
                      en_steps=budget.en_steps, batch_size=budget.batch_size, text_layers=budget.text_layers,
                      vocab_size=budget.vocab_size, control=budget.control, few_shot=budget.few_shot,
                      few_steps=budget.few_steps, seed=settings.seed, changes=changes)
    result["budget"] = dataclasses.asdict(budget)
    for name, path in result["configs"].items():  # listed with the demo's other configs
        _write_config(settings, f"multilingual_{name}", Path(path).read_text())
    return result


def plan(settings: DemoSettings) -> list[Stage]:
    """Every stage of the demo, in order."""
    stages = [
        Stage("world", f"generate the world ({settings.size})", 30, lambda: _world_stage(settings)),
        Stage("pretrain_stage1", "pre-train, stage 1 (image-text ITC + MLM)", 270,
              lambda: _pretrain_stage(settings, "stage1", "small_world_stage1.yaml", {})),
        Stage("pretrain_stage2", "pre-train, stage 2 (images, regions, videos; all objectives)", 290,
              lambda: _pretrain_stage(settings, "stage2", "small_world.yaml",
                                      {"init": f"ours:{settings.out_dir / 'pretrain' / 'stage1'}"})),
        Stage("pretrain_stage3", "pre-train, stage 3 (localization with image-text matching, frozen towers)", 160,
              lambda: _pretrain_stage(settings, PRETRAINED, "small_world_localization.yaml",
                                      {"init": f"ours:{settings.out_dir / 'pretrain' / 'stage2'}"})),
    ]
    if settings.ablation:
        stages.append(Stage("pretrain_stage2_no_regions", "pre-train, stage 2 without regions and boxes (ablation)", 200,
                            lambda: _pretrain_stage(settings, "stage2_no_regions", "small_world.yaml",
                                                    {"init": f"ours:{settings.out_dir / 'pretrain' / 'stage1'}", "regions": None})))
    for task in DEMO_TASKS:
        inits = ["pre", "scratch"] + (["no_regions"] if settings.ablation and task.key in ABLATION_TASKS else [])
        for init in inits:
            stages.append(Stage(f"finetune:{task.key}:{init}", f"fine-tune {task.key} ({INITS[init]})", task.expected_s,
                                lambda task=task, init=init: _finetune_stage(settings, task, init)))
    stages.append(Stage("chance", "chance levels", 20, lambda: _chance_stage(settings)))
    if settings.multilingual:
        stages.append(Stage("multilingual", "multilingual retrieval: CCLM adaptation, English fine-tuning, zero-shot de/fr/es",
                            settings.multilingual_budget.expected_s + (150 if settings.multilingual_budget.control else 0),
                            lambda: _multilingual_stage(settings)))
    return stages


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def run_demo(settings: DemoSettings) -> str:
    """Run (or continue) the demo; returns the results table as printed on the terminal."""
    from x2vlm.demo.report import write_report

    settings.out_dir.mkdir(parents=True, exist_ok=True)
    state = DemoState(settings.out_dir, settings)
    stages = plan(settings)
    done_expected = done_actual = 0.0
    for number, stage in enumerate(stages, start=1):
        if state.done(stage.name):
            log.info("demo stage %d/%d %s: done before (%s), skipped", number, len(stages), stage.title,
                     _clock(state.stages[stage.name]["seconds"]))
            continue
        remaining = sum(s.expected_s for s in stages[number - 1:] if not state.done(s.name))
        # this machine's pace relative to the planned times, once there is enough to judge it by
        speed = done_actual / done_expected if done_expected >= 120 else 1.0
        log.info("demo stage %d/%d: %s (ETA of the demo ~%s)", number, len(stages), stage.title, _clock(remaining * speed))
        start = time.perf_counter()
        result = stage.run()
        seconds = time.perf_counter() - start
        done_expected, done_actual = done_expected + stage.expected_s, done_actual + seconds
        state.record(stage.name, seconds, result)
        log.info("demo stage %d/%d: %s finished in %s", number, len(stages), stage.title, _clock(seconds))
    return write_report(settings, state.stages, [dataclasses.asdict(t) for t in DEMO_TASKS])


def settings_summary(settings: DemoSettings) -> str:
    return yaml.safe_dump({**settings.identity(), "ablation": settings.ablation, "multilingual": settings.multilingual,
                           "out_dir": str(settings.out_dir)}, sort_keys=False)
