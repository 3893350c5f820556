"""The demo's results: the table (terminal and markdown), loss curves, and ``DIR/report.md``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Cell = tuple[str, str]  # (split, metric key) of a task's results


@dataclass(frozen=True)
class Row:
    task: str  # DemoTask key
    label: str  # what the row is, as the paper's table names it
    metric: str  # what the cells show
    cells: tuple[Cell, ...]


def _recalls(prefix: str, split: str) -> tuple[Cell, ...]:
    return tuple((split, f"{prefix}_r{k}") for k in (1, 5, 10))


#: The paper's results table, in its order (retrieval, VQA, NLVR2, grounding, captioning, video).
#: Retrieval keys follow the official code: ``img_r*`` = text-to-image, ``txt_r*`` = image-to-text.
ROWS: tuple[Row, ...] = (
    Row("retrieval", "Image-text retrieval", "text->image R@1 / R@5 / R@10", _recalls("img", "test")),
    Row("retrieval", "Image-text retrieval", "image->text R@1 / R@5 / R@10", _recalls("txt", "test")),
    Row("vqa", "VQA", "accuracy", (("test", "acc"),)),
    Row("nlvr", "NLVR2", "accuracy", (("test", "acc"),)),
    Row("grounding", "Grounding (RefCOCO+ style)", "accuracy at IoU >= 0.5, val / testA / testB",
        (("val", "acc"), ("test", "acc_testA"), ("test", "acc_testB"))),
    Row("captioning", "Captioning", "BLEU-4 / CIDEr", (("test", "bleu_4"), ("test", "cider"))),
    Row("video_retrieval", "Video-text retrieval", "text->video R@1 / R@5 / R@10", _recalls("img", "test")),
    Row("video_qa", "Video QA", "accuracy", (("test", "acc"),)),
)
#: The same tasks on the held-out colour-shape pairs (the world's ``test_novel`` split, REFER testB).
HELD_OUT_ROWS: tuple[Row, ...] = (
    Row("retrieval", "Image-text retrieval", "text->image R@1 / R@5 / R@10", _recalls("img", "test_novel")),
    Row("retrieval", "Image-text retrieval", "image->text R@1 / R@5 / R@10", _recalls("txt", "test_novel")),
    Row("vqa", "VQA", "accuracy", (("test_novel", "acc"),)),
    Row("nlvr", "NLVR2", "accuracy", (("test_novel", "acc"),)),
    Row("grounding", "Grounding (RefCOCO+ style)", "accuracy at IoU >= 0.5, testB", (("test", "acc_testB"),)),
    Row("captioning", "Captioning", "BLEU-4 / CIDEr", (("test_novel", "bleu_4"), ("test_novel", "cider"))),
    Row("video_retrieval", "Video-text retrieval", "text->video R@1 / R@5 / R@10", _recalls("img", "test_novel")),
    Row("video_qa", "Video QA", "accuracy", (("test_novel", "acc"),)),
)
COLUMNS = ("pre", "scratch", "chance")
COLUMN_TITLES = {"pre": "pre-trained", "scratch": "from scratch", "no_regions": "no regions/boxes", "chance": "chance"}


def cell_values(results: dict[str, dict[str, float]] | None, cells: tuple[Cell, ...]) -> list[float] | None:
    """The row's numbers from one run's per-split results; None when the run or a value is missing."""
    if results is None:
        return None
    values = [results.get(split, {}).get(key) for split, key in cells]
    return None if any(v is None for v in values) else [float(v) for v in values]


def fmt(values: list[float] | None) -> str:
    return "n/a" if values is None else " / ".join(f"{v:.1f}" for v in values)


def margin(pre: list[float] | None, other: list[float] | None) -> str:
    if pre is None or other is None:
        return "n/a"
    return " / ".join(f"{a - b:+.1f}" for a, b in zip(pre, other))


def table_rows(rows: tuple[Row, ...], stages: dict[str, dict[str, Any]], columns: tuple[str, ...]) -> list[list[str]]:
    """Cells of a table: task, metric, one column per initialisation (and chance), then the margin of
    the pre-trained model over the from-scratch one."""
    chance = stages.get("chance", {}).get("result", {})
    out = []
    for row in rows:
        values = {}
        for column in columns:
            if column == "chance":
                values[column] = cell_values(chance.get(row.task), row.cells)
            else:
                entry = stages.get(f"finetune:{row.task}:{column}")
                values[column] = cell_values(entry["result"]["results"] if entry else None, row.cells)
        cells = [row.label, row.metric] + [fmt(values[c]) for c in columns]
        if "pre" in columns and "scratch" in columns:
            cells.append(margin(values["pre"], values["scratch"]))
        out.append(cells)
    return out


def headers(columns: tuple[str, ...]) -> list[str]:
    head = ["task", "metric"] + [COLUMN_TITLES[c] for c in columns]
    if "pre" in columns and "scratch" in columns:
        head.append("pre-trained minus scratch")
    return head


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


# -- the multilingual stage ------------------------------------------------------------------------
MULTILINGUAL_LABEL = "Multilingual retrieval (zero-shot de/fr/es, English fine-tuning)"
ZERO_SHOT = ("de", "fr", "es")


def multilingual_rows(stages: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """The ``multilingual`` stage's table: test ``r_mean`` (mean of the six recalls) per language, the
    mean of de/fr/es, and English (the supervised language); columns CCLM-adapted (zero-shot), then,
    when the stage ran them, the control (the same conversion and fine-tuning without CCLM), the
    few-shot model (further fine-tuned on a few captions per language), the random-ranking chance and
    CCLM's margin over the control."""
    entry = stages.get("multilingual")
    if entry is None:
        return None
    result = entry["result"]
    chance = result["chance"]["r_mean"]
    columns = [("CCLM-adapted, zero-shot", result["zero_shot"])]
    for key, title in (("control", "no CCLM (control)"), ("few_shot", "CCLM-adapted, few-shot")):
        if result.get(key) is not None:
            columns.append((title, result[key]))
    margin = result.get("control") is not None
    head = ["task", "metric"] + [c[0] for c in columns] + ["chance"] + (["CCLM minus control"] if margin else [])
    rows = []
    for name, langs in [(lang, (lang,)) for lang in ZERO_SHOT] + [("mean de/fr/es", ZERO_SHOT), ("en (supervised)", ("en",))]:
        values = [sum(m[f"{lang}/r_mean"] for lang in langs) / len(langs) for _, m in columns]
        rows.append([MULTILINGUAL_LABEL, f"R-mean, {name}"] + [fmt([v]) for v in values] + [fmt([chance])]
                    + ([f"{values[0] - values[1]:+.1f}"] if margin else []))
    return head, rows


# -- loss curves ------------------------------------------------------------------------------------
PRETRAIN_STAGES = ("pretrain_stage1", "pretrain_stage2", "pretrain_stage3", "pretrain_stage2_no_regions")
HELD_OUT_PREFIX = "val_loss_"


def _metrics(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_losses(run_dir: str | Path) -> list[dict[str, float]]:
    """The training records (those with a ``loss``) of a run's ``metrics.jsonl``."""
    return [r for r in _metrics(run_dir) if "loss" in r]


def held_out_losses_table(stages: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """Each pre-training stage's held-out losses (``eval_every``) at its first and last evaluation."""
    runs = []
    for name in PRETRAIN_STAGES:
        if name in stages:
            records = [r for r in _metrics(stages[name]["result"]["out_dir"]) if any(k.startswith(HELD_OUT_PREFIX) for k in r)]
            if records:
                runs.append((name, records[0], records[-1]))
    if not runs:
        return None
    keys = sorted({k for _, first, last in runs for k in (*first, *last) if k.startswith(HELD_OUT_PREFIX)})
    head = ["loss"] + [f"{name.replace('pretrain_', '').replace('_', ' ')} (step {first['step']} -> {last['step']})"
                       for name, first, last in runs]
    rows = [[key[len(HELD_OUT_PREFIX):].replace("_", " ")]
            + [f"{first[key]:.3f} -> {last[key]:.3f}" if key in first and key in last else "" for _, first, last in runs]
            for key in keys]
    return head, rows


def plot_pretraining(stages: dict[str, dict[str, Any]], out_png: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(name, stages[name]["result"]["out_dir"]) for name in PRETRAIN_STAGES if name in stages]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (name, run_dir) in zip(axes[0], runs):
        records = read_losses(run_dir)
        keys = sorted({k for r in records for k in r if k.startswith("loss_")})
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and r[key] > 0]
            if points:
                ax.plot(*zip(*points), label=key[len("loss_"):])
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def plot_finetuning(stages: dict[str, dict[str, Any]], tasks: list[str], out_png: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(f"finetune:{t}:pre" in stages for t in tasks):
        return None
    cols = 4
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for init, title in COLUMN_TITLES.items():
            entry = stages.get(f"finetune:{task}:{init}")
            if entry is None:
                continue
            records = read_losses(entry["result"]["out_dir"])
            if records:
                ax.plot([r["step"] for r in records], [r["loss"] for r in records], label=title)
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


# -- machine and provenance -------------------------------------------------------------------------
def machine_description() -> str:
    import torch

    from x2vlm.train.metrics import cpu_name
    from x2vlm.precision import cpu_has_bf16_matmul

    cpu = cpu_name()
    accel = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else (
        "CPU with bf16 matrix units (bf16 autocast)" if cpu_has_bf16_matmul() else "CPU without bf16 matrix units (fp32)")
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; {accel}; "
            f"Python {sys.version.split()[0]}, torch {torch.__version__}, {platform.system()} {platform.release()}")


def code_version() -> str:
    from x2vlm import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"x2vlm {__version__}" + (f", commit {commit}" if commit else "")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _rel(path: str | Path, base: Path) -> str:
    return os.path.relpath(Path(path).resolve(), base.resolve())


# -- the report -------------------------------------------------------------------------------------
def write_report(settings, stages: dict[str, dict[str, Any]], tasks: list[dict[str, Any]]) -> str:
    """Write ``DIR/report.md`` (and its figures); return the terminal table."""
    out = Path(settings.out_dir)
    task_keys = [t["key"] for t in tasks]
    main_head, main_rows = headers(COLUMNS), table_rows(ROWS, stages, COLUMNS)
    held_head, held_rows = headers(COLUMNS), table_rows(HELD_OUT_ROWS, stages, COLUMNS)
    terminal = ("X²-VLM on the generated world: test split, selected on validation (percent)\n"
                + text_table(main_head, main_rows)
                + "\n\nheld-out colour-shape pairs (never seen in training)\n" + text_table(held_head, held_rows))
    multilingual = multilingual_rows(stages)
    multilingual_md = ""
    if multilingual:
        ml_head, ml_rows = multilingual
        budget = stages["multilingual"]["result"].get("budget", {})
        terminal = terminal.replace("\n\nheld-out colour-shape pairs", "\n\n" + text_table(ml_head, ml_rows) + "\n\nheld-out colour-shape pairs", 1)
        multilingual_md = (
            "\n### Multilingual retrieval (zero-shot cross-lingual transfer)\n\n"
            "The pre-trained model with its text encoder replaced by a randomly initialised RoBERTa-style encoder "
            "(SentencePiece on the world's en/de/fr/es captions; no XLM-R offline), its fusion layers moved to a "
            f"separate cross encoder, CCLM-adapted for {budget.get('cclm_steps', '?')} steps (image-text in four languages "
            f"+ parallel text), fine-tuned on English retrieval only for {budget.get('en_steps', '?')} steps and tested on "
            "every language: de/fr/es are zero-shot. "
            + ("The control is the same fine-tuning of the converted model without CCLM. " if "control" in stages["multilingual"]["result"]
               else "(No control at this budget: `--multilingual-control` adds the same fine-tuning without CCLM.) ")
            + (f"Few-shot: the English fine-tuning continued for {budget.get('few_steps', '?')} steps on "
               f"{budget.get('few_shot', '?')} training captions per language. " if "few_shot" in stages["multilingual"]["result"] else "")
            + "R-mean is the mean of R@1/5/10 in both directions (test split); chance is a random ranking.\n\n"
            + markdown_table(ml_head, ml_rows) + "\n")
    ablation_md = ""
    if any(name.endswith(":no_regions") for name in stages):
        abl_columns = ("pre", "no_regions", "chance")
        abl_rows = [r for r in ROWS if r.task in {"retrieval", "grounding"}]
        abl = table_rows(tuple(abl_rows), stages, abl_columns)
        abl_head = headers(abl_columns)
        terminal += "\n\nablation: pre-training without region-text data and box losses\n" + text_table(abl_head, abl)
        ablation_md = ("\n## Ablation: pre-training without regions and boxes\n\n"
                       "Stage 2 repeated from the same stage 1 without the region-text source (so without region "
                       "ITC/ITM/MLM and the box L1 + GIoU losses) and without the localization stage 3, then the same "
                       "fine-tunings:\n\n"
                       + markdown_table(abl_head, abl) + "\n")

    figures = []
    held_out = held_out_losses_table(stages)
    if held_out:
        figures.append("### Held-out pre-training losses\n\nEach pre-training stage's losses on fixed held-out batches of the "
                       "world's val split (`eval_every`, `eval_batches`, the sources' `val_paths`), in eval mode, at its "
                       "first and last evaluation (a stage's batch sizes set its chance levels, so compare within a "
                       "column):\n\n" + markdown_table(*held_out) + "\n")
    pre_png = plot_pretraining(stages, out / "pretraining_losses.png")
    if pre_png:
        figures.append(f"### Pre-training losses\n\n![pre-training losses]({_rel(pre_png, out)})\n")
    ft_png = plot_finetuning(stages, task_keys, out / "finetuning_losses.png")
    if ft_png:
        figures.append(f"### Fine-tuning losses\n\n![fine-tuning losses]({_rel(ft_png, out)})\n")

    pictures = []
    for key in task_keys:
        entry = stages.get(f"finetune:{key}:pre")
        if entry and entry["result"].get("pictures"):
            links = " ".join(f"![{key}]({_rel(p, out)})" for p in entry["result"]["pictures"][:4])
            pictures.append(f"**{key.replace('_', ' ')}** (pre-trained model, test items)\n\n{links}\n")

    timing_rows = [[name, _clock(entry["seconds"])] for name, entry in stages.items()]
    total = sum(entry["seconds"] for entry in stages.values())
    timing_rows.append(["total", _clock(total)])
    configs = [f"- `{name}`: [{_rel(entry['result']['config'], out)}]({_rel(entry['result']['config'], out)})"
               for name, entry in stages.items() if isinstance(entry.get("result"), dict) and "config" in entry["result"]]
    world = stages.get("world", {}).get("result", {})
    held_pairs = ", ".join(" ".join(p) if isinstance(p, list) else str(p) for p in world.get("held_out_pairs") or [])

    report = f"""# X²-VLM demo on the generated world

Command: `x2vlm demo --out {settings.out_dir} --size {settings.size} --seed {settings.seed}{' --ablation' if settings.ablation else ''}{' --multilingual' if getattr(settings, 'multilingual', False) else ''}`
(world size {settings.size}, seed {settings.seed}; pre-training overrides {settings.pretrain_overrides or 'none'},
fine-tuning overrides {settings.finetune_overrides or 'none'}).

Machine: {machine_description()}. Code: {code_version()}. Total time of the stages: {_clock(total)}.

## Results

Test split of each task, model selected on the validation split; percent. Columns: fine-tuned from
the three-stage pre-trained model, fine-tuned from a random initialisation with the same budget, and
the chance level (the best input-blind predictor: a random ranking for retrieval, the most common
training answer / label / caption, the mean training box). The last column is the pre-trained model's
margin over the one from scratch.

{markdown_table(main_head, main_rows)}
{multilingual_md}
### Held-out colour-shape pairs

Pairs never seen in training ({held_pairs or 'see the world manifest'}): the world's `test_novel` split (grounding:
REFER testB).

{markdown_table(held_head, held_rows)}
{ablation_md}
## Training curves

{chr(10).join(figures)}
## Pictures

{chr(10).join(pictures) or 'none'}

## Time per stage

{markdown_table(['stage', 'minutes:seconds'], timing_rows)}

## Configs used

{chr(10).join(configs)}
"""
    (out / "report.md").write_text(report)
    return terminal
