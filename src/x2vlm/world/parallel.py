"""CCLM data derived from the generated world's multilingual captions (no change to the generator).

The world writes ``multilingual/coco_<lang>_<split>.json`` for en, de, fr and es with the *same*
entries in the same order: entry ``i`` of every language is the same image, and its caption (a
string in train, a list of five in val/test) is the translation of the English one at the same
position. So the world gives exact parallel text:

* ``parallel_text_records``: JSON lines ``{"source_text", "target_text"}`` (spec §3.5, the CCLM
  WikiMatrix format) pairing English with each other language, deduplicated (many images share a
  caption); ``both_directions`` adds the reversed pairs so that MLM (on side 1) sees every language.
* ``multilingual_image_text_records``: image-text lines whose ``caption`` is a dict language ->
  caption, so that a pre-training source picks one language at random per sample (or a fixed one
  with the source's ``language``).
* ``write_cclm_world_data(world_dir, out_dir)`` writes both as shards under ``out_dir/parallel_text``
  and ``out_dir/image_text`` (``x2vlm pretrain`` reads the folders).
"""

from __future__ import annotations

import json
from pathlib import Path

LANGUAGES = ("en", "de", "fr", "es")


def _load(world_dir: Path, lang: str, split: str) -> list[dict]:
    return json.loads((Path(world_dir) / "multilingual" / f"coco_{lang}_{split}.json").read_text(encoding="utf-8"))


def _aligned(world_dir: str | Path, split: str, languages) -> dict[str, list[dict]]:
    files = {lang: _load(Path(world_dir), lang, split) for lang in languages}
    base = files[languages[0]]
    for lang, entries in files.items():
        if len(entries) != len(base) or any(a["image"] != b["image"] for a, b in zip(base, entries)):
            raise ValueError(f"{world_dir}: multilingual {split} files of {languages[0]} and {lang} are not aligned entry by entry")
    return files


def _captions(entry: dict) -> list[str]:
    caption = entry["caption"]
    return [caption] if isinstance(caption, str) else list(caption)


def parallel_text_records(world_dir: str | Path, split: str = "train", pivot: str = "en",
                          targets: tuple[str, ...] = ("de", "fr", "es"), both_directions: bool = True) -> list[dict]:
    """Unique ``{"source_text": <pivot>, "target_text": <other>}`` pairs (and reversed ones), in file order."""
    files = _aligned(world_dir, split, (pivot, *targets))
    seen: set[tuple[str, str]] = set()
    records = []
    for i, entry in enumerate(files[pivot]):
        for lang in targets:
            for src, tgt in zip(_captions(entry), _captions(files[lang][i])):
                for pair in [(src, tgt), (tgt, src)] if both_directions else [(src, tgt)]:
                    if pair not in seen:
                        seen.add(pair)
                        records.append({"source_text": pair[0], "target_text": pair[1]})
    return records


def multilingual_image_text_records(world_dir: str | Path, split: str = "train", languages: tuple[str, ...] = LANGUAGES) -> list[dict]:
    """``{"image", "caption": {lang: caption}}`` per entry (the first caption of a list)."""
    files = _aligned(world_dir, split, languages)
    return [{"image": entry["image"], "caption": {lang: _captions(files[lang][i])[0] for lang in languages}}
            for i, entry in enumerate(files[languages[0]])]


def _write_shards(records: list[dict], directory: Path, num_shards: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(num_shards):
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records[k::num_shards]]
        (directory / f"part-{k:05d}.jsonl").write_text("".join(lines), encoding="utf-8")


def write_cclm_world_data(world_dir: str | Path, out_dir: str | Path, split: str = "train", num_shards: int = 4) -> dict[str, int]:
    """Writes ``out_dir/parallel_text/`` and ``out_dir/image_text/`` shards; returns the line counts."""
    out = Path(out_dir)
    parallel = parallel_text_records(world_dir, split)
    images = multilingual_image_text_records(world_dir, split)
    _write_shards(parallel, out / "parallel_text", num_shards)
    _write_shards(images, out / "image_text", num_shards)
    return {"parallel_text": len(parallel), "image_text": len(images)}
