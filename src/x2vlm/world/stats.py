"""Answer and label distributions of a generated world (``x2vlm world stats``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from x2vlm.data import readers
from x2vlm.world.questions import QUESTION_TYPES

#: No VQA question family may be answerable above this rate by its most common answer.
VQA_MAJORITY_LIMIT = 0.55
#: |#True - #False| / #pairs must stay within this for every NLVR2 split.
NLVR2_IMBALANCE_LIMIT = 0.05

FAMILY_OF_QUESTION_TYPE = {question_type: family for family, question_type in QUESTION_TYPES.items()}


def distribution(counter: Counter) -> dict:
    total = sum(counter.values())
    answer, top = counter.most_common(1)[0] if counter else (None, 0)
    return {
        "total": total,
        "answers": dict(sorted(counter.items(), key=lambda item: (-item[1], item[0]))),
        "most_common": answer,
        "majority_share": round(top / total, 4) if total else 0.0,
    }


def collect_stats(out_dir: str | Path) -> dict:
    """Split sizes, per-dataset counts and answer/label distributions, plus whether the
    non-degeneracy limits hold."""
    root = Path(out_dir)
    manifest = readers.read_json(root / "manifest.json")
    files, splits = manifest["files"], manifest["splits"]
    result: dict = {
        "generator": manifest["generator"],
        "held_out_pairs": manifest["held_out_pairs"],
        "records": manifest["counts"],
        "images": {s: manifest["counts"][f"scenes_{s}"] for s in splits},
        "clips": {s: manifest["counts"][f"clips_{s}"] for s in splits},
        "vqa": {},
        "nlvr2": {},
        "refcoco": {},
        "video_qa": {},
    }
    worst_vqa = 0.0
    for split in splits:
        examples = readers.read_vqa_official(root / files[f"vqa_questions_{split}"],
                                             root / files[f"vqa_annotations_{split}"],
                                             manifest["vqa_image_template"])
        per_family: dict[str, Counter] = {}
        for example in examples:
            family = FAMILY_OF_QUESTION_TYPE.get(example.question_type, example.question_type)
            per_family.setdefault(family, Counter())[Counter(example.answers).most_common(1)[0][0]] += 1
        result["vqa"][split] = {family: distribution(counter) for family, counter in sorted(per_family.items())}
        worst_vqa = max([worst_vqa] + [d["majority_share"] for d in result["vqa"][split].values()])

    worst_nlvr = 0.0
    for split in splits:
        labels = Counter(e.label for e in readers.read_nlvr2(root / files[f"nlvr2_{split}"]))
        total = labels[True] + labels[False]
        imbalance = abs(labels[True] - labels[False]) / total if total else 0.0
        worst_nlvr = max(worst_nlvr, imbalance)
        result["nlvr2"][split] = {"True": labels[True], "False": labels[False],
                                  "imbalance": round(imbalance, 4)}

    refer = readers.read_refer(root / files["refcoco_refs"], root / files["refcoco_instances"])
    refs_per_split = Counter(ref.split for ref in refer.refs.values())
    sentences_per_split = Counter()
    for ref in refer.refs.values():
        sentences_per_split[ref.split] += len(ref.sentences)
    result["refcoco"] = {split: {"refs": refs_per_split[split], "sentences": sentences_per_split[split]}
                         for split in sorted(refs_per_split)}

    for split in splits:
        per_type: dict[str, Counter] = {}
        for example in readers.read_video_qa(root / files[f"video_qa_{split}"]):
            per_type.setdefault(example.answer_type or "all", Counter())[example.answer] += 1
        result["video_qa"][split] = {t: distribution(c) for t, c in sorted(per_type.items())}

    result["limits"] = {
        "vqa_majority_limit": VQA_MAJORITY_LIMIT,
        "vqa_worst_majority_share": round(worst_vqa, 4),
        "nlvr2_imbalance_limit": NLVR2_IMBALANCE_LIMIT,
        "nlvr2_worst_imbalance": round(worst_nlvr, 4),
        "ok": worst_vqa <= VQA_MAJORITY_LIMIT and worst_nlvr <= NLVR2_IMBALANCE_LIMIT,
    }
    return result


def format_distribution(name: str, data: dict, width: int = 8) -> str:
    shown = ", ".join(f"{a} {c}" for a, c in list(data["answers"].items())[:width])
    more = " ..." if len(data["answers"]) > width else ""
    return (f"    {name:<13} n={data['total']:<6} majority {data['majority_share']:.2f} "
            f"({data['most_common']})  [{shown}{more}]")


def stats(out_dir: str | Path) -> str:
    """A readable report of ``collect_stats``."""
    data = collect_stats(out_dir)
    generator = data["generator"]
    lines = [
        f"world at {out_dir}: size {generator['size']}, seed {generator['seed']}, "
        f"images {generator['image_size']} px, video frames {generator['video_size']} px",
        "held-out colour-shape pairs (only in test_novel): "
        + ", ".join(f"{c} {s}" for c, s in data["held_out_pairs"]),
        "images per split: " + ", ".join(f"{s} {n}" for s, n in data["images"].items()),
        "clips per split:  " + ", ".join(f"{s} {n}" for s, n in data["clips"].items()),
        "",
        "records per dataset file:",
    ]
    lines += [f"    {role:<32} {count}" for role, count in data["records"].items()]
    lines.append("")
    lines.append("VQA answers per question type (majority = accuracy of always giving the most common answer):")
    for split, families in data["vqa"].items():
        lines.append(f"  {split}")
        lines += [format_distribution(family, d) for family, d in families.items()]
    lines.append("")
    lines.append("NLVR2 labels:")
    for split, labels in data["nlvr2"].items():
        lines.append(f"    {split:<11} True {labels['True']:<6} False {labels['False']:<6} "
                     f"imbalance {labels['imbalance']:.3f}")
    lines.append("")
    lines.append("RefCOCO+ refs (REFER splits; testB = held-out pairs): " + ", ".join(
        f"{s} {d['refs']} refs / {d['sentences']} sentences" for s, d in data["refcoco"].items()))
    lines.append("")
    lines.append("video QA answers per question type:")
    for split, types in data["video_qa"].items():
        lines.append(f"  {split}")
        lines += [format_distribution(t, d) for t, d in types.items()]
    limits = data["limits"]
    lines += [
        "",
        f"limits: VQA worst majority share {limits['vqa_worst_majority_share']:.3f} "
        f"(limit {limits['vqa_majority_limit']}), NLVR2 worst imbalance "
        f"{limits['nlvr2_worst_imbalance']:.3f} (limit {limits['nlvr2_imbalance_limit']}): "
        + ("OK" if limits["ok"] else "VIOLATED"),
    ]
    return "\n".join(lines)
