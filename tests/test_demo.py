"""The main job (``x2vlm demo``) at a minimal size: every stage, the table, the report, resuming after
an interruption, and the same table from a second run of the same seed."""

import json
import re

import pytest

from conftest import TINY_VOCAB
from x2vlm.demo import DEMO_TASKS, DemoSettings, run_demo
from x2vlm.demo import run as demo_run
from x2vlm.demo.report import HELD_OUT_ROWS, MULTILINGUAL_LABEL, ROWS

TINY_MODEL = ["model=x2vlm-tiny", f"model_changes.tokenizer={TINY_VOCAB}", "precision=fp32", "tensorboard=false"]
PRETRAIN = TINY_MODEL + [
    "init=scratch", "steps=2", "log_every=1", "ckpt_every=1", "text_tower_frozen_steps=1",
    "images.batch_size=4", "regions.batch_size=2", "regions.max_images=2", "videos.batch_size=2", "videos.frame_len=3",
]
FINETUNE = TINY_MODEL + ["max_steps=2", "eval_every=2", "log_every=1", "batch_size=4", "eval_batch_size=16"]


class Interrupted(Exception):
    pass


#: The multilingual stage at a minimal size: a 1-layer random text encoder, 2 CCLM and 2 English steps.
TINY_MULTILINGUAL = demo_run.MultilingualBudget(cclm_steps=2, en_steps=2, batch_size=4, text_layers=1, vocab_size=200, control=True,
                                               few_shot=4, few_steps=1)


def settings(out, ablation=False, multilingual=False):
    return DemoSettings(out_dir=out, size="tiny", seed=0, ablation=ablation, multilingual=multilingual,
                        multilingual_budget=TINY_MULTILINGUAL, pretrain_overrides=PRETRAIN, finetune_overrides=FINETUNE)


def numbers(table: str) -> list[str]:
    return re.findall(r"[-+]?\d+\.\d", table)


def test_demo_every_stage_report_resume_and_repeat(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    calls = []
    real_finetune = demo_run._finetune_stage

    def finetune_or_interrupt(s, task, init):
        calls.append(f"finetune:{task.key}:{init}")
        if task.key == "nlvr" and init == "scratch" and not (out / "resumed").exists():
            raise Interrupted("killed")
        return real_finetune(s, task, init)

    monkeypatch.setattr(demo_run, "_finetune_stage", finetune_or_interrupt)
    with pytest.raises(Interrupted):
        run_demo(settings(out, ablation=True))
    state = json.loads((out / "demo_state.json").read_text())
    assert list(state["stages"])[:5] == ["world", "pretrain_stage1", "pretrain_stage2", "pretrain_stage3", "pretrain_stage2_no_regions"]
    assert "finetune:nlvr:pre" in state["stages"] and "finetune:nlvr:scratch" not in state["stages"]

    (out / "resumed").touch()
    calls.clear()
    table = run_demo(settings(out, ablation=True))
    # finished stages are not run again: the re-run starts at the interrupted stage
    assert calls[0] == "finetune:nlvr:scratch"
    assert "finetune:retrieval:pre" not in calls

    state = json.loads((out / "demo_state.json").read_text())
    expected = {f"finetune:{t.key}:{init}" for t in DEMO_TASKS for init in ("pre", "scratch")}
    expected |= {"finetune:retrieval:no_regions", "finetune:grounding:no_regions", "world", "chance",
                 "pretrain_stage1", "pretrain_stage2", "pretrain_stage3", "pretrain_stage2_no_regions"}
    assert set(state["stages"]) == expected
    for stage, entry in state["stages"].items():
        assert entry["seconds"] > 0
        if stage.startswith("finetune:"):
            assert (tmp_path / "demo" / "configs" / (stage.replace(":", "_") + ".yaml")).exists()
    # every cell of both tables has a number in every column (the held-out split included)
    for line in table.splitlines():
        assert "n/a" not in line, line
    assert len(numbers(table)) >= 3 * sum(len(r.cells) for r in ROWS + HELD_OUT_ROWS)

    report = (out / "report.md").read_text()
    for heading in ("## Results", "### Held-out colour-shape pairs", "## Ablation", "### Held-out pre-training losses",
                    "## Time per stage", "## Configs used"):
        assert heading in report
    # every pre-training stage's held-out losses, first -> last evaluation (region ITC: stage 2 only)
    held_out = next(line for line in report.splitlines() if line.startswith("| region itc |"))
    assert len(re.findall(r"\d+\.\d{3} -> \d+\.\d{3}", held_out)) == 1
    assert len(re.findall(r"\d+\.\d{3} -> \d+\.\d{3}", next(line for line in report.splitlines() if line.startswith("| image itc |")))) == 4
    for png in ("pretraining_losses.png", "finetuning_losses.png"):
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in report
    for link in re.findall(r"\]\(([^)]+\.(?:png|yaml))\)", report):
        assert (out / link).exists(), link

    # --multilingual after a finished demo runs only its stage (CCLM transfer in this process), recorded
    # like the others, and adds its rows (per zero-shot language, their mean, English) to table and report
    calls.clear()
    with_ml = run_demo(settings(out, ablation=True, multilingual=True))
    assert calls == []
    state = json.loads((out / "demo_state.json").read_text())
    assert list(state["stages"])[-1] == "multilingual" and set(state["stages"]) == expected | {"multilingual"}
    ml = state["stages"]["multilingual"]["result"]
    assert set(ml["zero_shot"]) >= {f"{lang}/r_mean" for lang in ("en", "de", "fr", "es")} and "control" in ml
    assert set(ml["few_shot"]) >= {f"{lang}/r_mean" for lang in ("en", "de", "fr", "es")}
    assert ml["chance"]["r_mean"] > 0 and ml["budget"]["cclm_steps"] == 2
    ml_lines = [line for line in with_ml.splitlines() if line.startswith(MULTILINGUAL_LABEL)]
    assert [line.split("  ")[1].strip() for line in ml_lines][:4] == ["R-mean, de", "R-mean, fr", "R-mean, es", "R-mean, mean de/fr/es"]
    # CCLM zero-shot, control, few-shot, chance, CCLM minus control
    assert all("n/a" not in line and len(numbers(line)) == 5 for line in ml_lines), ml_lines
    report = (out / "report.md").read_text()
    assert "### Multilingual retrieval" in report and report.count(f"| {MULTILINGUAL_LABEL} |") == 5
    assert "--multilingual" in report and (out / "configs" / "multilingual_cclm.yaml").exists()
    assert run_demo(settings(out, ablation=True, multilingual=True)) == with_ml  # finished: nothing runs again

    # the same seed gives the same table: run every training stage again on the same world
    for stage in list(state["stages"]):
        if stage not in ("world", "chance"):
            del state["stages"][stage]
    (out / "demo_state.json").write_text(json.dumps(state))
    for sub in ("pretrain", "finetune"):
        import shutil

        shutil.rmtree(out / sub)
    again = run_demo(settings(out, ablation=True))
    assert numbers(again) == numbers(table)


def test_demo_refuses_a_directory_of_other_settings(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_state.json").write_text(json.dumps({"settings": {"size": "small", "seed": 1, "pretrain_overrides": [],
                                                                  "finetune_overrides": []}, "stages": {}}))
    with pytest.raises(ValueError, match="other settings"):
        run_demo(settings(out))


def test_relocate_points_world_paths_into_the_demo_directory(tmp_path):
    data = {"data": {"train_file": "runs/world/a.json", "files": ["runs/world/b", "other/runs/world"], "n": 3},
            "image_root": "runs/world", "x": "runs/worldly"}
    moved = demo_run.relocate(data, tmp_path / "w")
    assert moved["data"]["train_file"] == str(tmp_path / "w" / "a.json")
    assert moved["data"]["files"] == [str(tmp_path / "w" / "b"), "other/runs/world"]
    assert moved["image_root"] == str(tmp_path / "w") and moved["x"] == "runs/worldly" and moved["data"]["n"] == 3
