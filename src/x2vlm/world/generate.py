"""``generate``: write the whole world, every dataset in its real file format, and a manifest.

Layout (paths relative to ``out_dir``; image paths inside datasets are relative to the image
root ``images/``, video paths to the video root ``videos/``)::

    manifest.json                                   roles -> paths, keys, counts
    world/world.json                                vocabulary and geometry rules
    world/scenes_{split}.json, world/clips_{split}.json   ground truth
    images/{split}/world_{split}_{image_id:06d}.jpg
    videos/video{N}.mp4
    pretrain/{image_text,region_text,video_text}/part-{k:05d}.jsonl   (train scenes and clips)
    pretrain_val/{image_text,region_text,video_text}/part-00000.jsonl (val: held-out pre-training losses)
    karpathy/coco_karpathy_{split}.json, karpathy/coco_karpathy_{split}_gt.json
    vqa/vqa_{split}.json, vqa/answer_list.json,
    vqa/v2_OpenEnded_world_{split}_questions.json, vqa/v2_world_{split}_annotations.json
    nlvr2/nlvr_{split}.json
    refcoco+/refcoco+_{train,val,test}.json, refcoco+/refs(unc).p, refcoco+/instances.json
    msrvtt/msrvtt_ret_{split}.json, msrvtt/msrvtt_qa_{split}.jsonl, msrvtt/train_ans2label.json
    multilingual/coco_{lang}_{train,val,test}.json

Splits: ``train``, ``val``, ``test`` (no held-out colour-shape pair anywhere) and
``test_novel`` (every scene/clip holds at least one held-out pair).
"""

from __future__ import annotations

import logging
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from x2vlm.world import vocabulary as vocab
from x2vlm.world.captions import image_captions, referring_expressions, region_elements
from x2vlm.world.files import write_bytes, write_json, write_json_lines, write_pickle
from x2vlm.world.language import render_caption
from x2vlm.world.nlvr import pair_statement
from x2vlm.world.questions import (
    ANSWER_TYPES,
    ANSWERS_PER_QUESTION,
    QUESTION_TYPES,
    AnswerBalancer,
    scene_questions,
)
from x2vlm.world.render import encode_jpeg, render_scene, shape_outline
from x2vlm.world.scene import Scene, SceneIndex, sample_scene
from x2vlm.world.video import (
    Clip,
    clip_captions,
    clip_questions,
    count_decoded_frames,
    render_clip,
    sample_clip,
    write_mp4,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGE_ROOT = "images"
VIDEO_ROOT = "videos"
VQA_IMAGE_TEMPLATE = "{data_subtype}/world_{data_subtype}_{image_id:06d}.jpg"
REFER_SPLITS: dict[str, str] = {"train": "train", "val": "val", "test": "testA", "test_novel": "testB"}
OWNED_ENTRIES: tuple[str, ...] = (
    "manifest.json", "world", "images", "videos", "pretrain", "pretrain_val", "karpathy", "vqa", "nlvr2",
    "refcoco+", "msrvtt", "multilingual",
)


@dataclass(frozen=True)
class SizePreset:
    images: dict[str, int]
    clips: dict[str, int]
    nlvr_pairs: dict[str, int]
    questions_per_image: int
    questions_per_clip: int
    multilingual_train_fraction: float
    pretrain_shards: int


def _per_split(train: int, held: int) -> dict[str, int]:
    return {"train": train, "val": held, "test": held, "test_novel": held}


SIZE_PRESETS: dict[str, SizePreset] = {
    "tiny": SizePreset(_per_split(40, 12), _per_split(10, 4), _per_split(40, 12), 5, 4, 0.5, 2),
    "small": SizePreset(_per_split(2000, 250), _per_split(480, 60), _per_split(2000, 250), 5, 4,
                        0.5, 4),
    "medium": SizePreset(_per_split(10000, 1000), _per_split(2400, 300), _per_split(10000, 1000),
                         5, 4, 0.5, 8),
}


def stream_rng(seed: int, stream: str, *indices: int) -> np.random.Generator:
    """An independent random stream per (seed, purpose, item), so items do not depend on the
    order in which other items are generated."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(stream.encode()), *indices]))


def image_file_name(split: str, image_id: int) -> str:
    return VQA_IMAGE_TEMPLATE.format(data_subtype=split, image_id=image_id)


def prepare_output_dir(root: Path) -> None:
    """Create ``root``, or clear a previous world in it. A directory holding anything that a
    generation does not write is refused rather than touched."""
    if root.exists():
        foreign = sorted(p.name for p in root.iterdir() if p.name not in OWNED_ENTRIES)
        if foreign:
            raise ValueError(f"{root} holds files that are not part of a generated world "
                             f"({', '.join(foreign[:5])}); refusing to write into it")
        for name in OWNED_ENTRIES:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    root.mkdir(parents=True, exist_ok=True)


class Manifest:
    """Collects dataset files by role while they are written."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.shards: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}
        self.keys: dict[str, dict] = {}

    def add(self, role: str, path: str, count: int | None = None, keys: dict | None = None) -> None:
        self.files[role] = path
        if count is not None:
            self.counts[role] = count
        if keys is not None:
            self.keys[role] = keys


# --- scenes -----------------------------------------------------------------------------------


def sample_scenes(preset: SizePreset, seed: int, image_size: int,
                  grid_px: int = 1) -> dict[str, list[Scene]]:
    scenes: dict[str, list[Scene]] = {}
    seen: set[tuple] = set()
    image_id = 1
    for split in vocab.IMAGE_SPLITS:
        scenes[split] = []
        for index in range(preset.images[split]):
            attempt = 0
            while True:
                rng = stream_rng(seed, f"scene/{split}", index, attempt)
                scene = sample_scene(rng, image_id, split, image_file_name(split, image_id), image_size,
                                     grid_px)
                if scene.signature() not in seen:
                    break
                attempt += 1
            seen.add(scene.signature())
            scenes[split].append(scene)
            image_id += 1
    return scenes


def write_images(root: Path, scenes: dict[str, list[Scene]]) -> None:
    all_scenes = [s for split in vocab.IMAGE_SPLITS for s in scenes[split]]
    for scene in tqdm(all_scenes, desc="images", unit="img", leave=False):
        write_bytes(root / IMAGE_ROOT / scene.file_name, encode_jpeg(render_scene(scene)))


# --- image datasets -----------------------------------------------------------------------------


def write_pretraining(root: Path, manifest: Manifest, scenes: list[Scene], captions: dict,
                      regions: dict, shards: int, name: str = "pretrain") -> None:
    """Image-text and region-text pre-training files of ``scenes`` under ``name/`` (manifest roles
    ``{name}_image_text`` / ``{name}_region_text``)."""
    image_text = [[] for _ in range(shards)]
    region_text = [[] for _ in range(shards)]
    for position, scene in enumerate(scenes):
        english = [render_caption(c) for c in captions[scene.image_id]]
        image_text[position % shards].append({"image": scene.file_name, "caption": english})
        region_text[position % shards].append({
            "image": scene.file_name, "caption": english, "elems": regions[scene.image_id],
        })
    for role, folder, parts, keys in (
        (f"{name}_image_text", f"{name}/image_text", image_text,
         {"image_key": "image", "caption_key": "caption", "is_image_rpath": True}),
        (f"{name}_region_text", f"{name}/region_text", region_text,
         {"image_key": "image", "caption_key": "caption", "is_image_rpath": True}),
    ):
        paths = []
        for k, records in enumerate(parts):
            path = f"{folder}/part-{k:05d}.jsonl"
            write_json_lines(root / path, records)
            paths.append(path)
        manifest.add(role, folder, sum(len(p) for p in parts), keys)
        manifest.shards[role] = paths


def write_karpathy(root: Path, manifest: Manifest, scenes: dict[str, list[Scene]],
                   captions: dict) -> None:
    for split in vocab.IMAGE_SPLITS:
        if split == "train":
            records = [{"image": s.file_name, "caption": render_caption(c), "image_id": s.image_id}
                       for s in scenes[split] for c in captions[s.image_id]]
        else:
            records = [{"image": s.file_name, "caption": [render_caption(c) for c in captions[s.image_id]],
                        "image_id": s.image_id} for s in scenes[split]]
        path = f"karpathy/coco_karpathy_{split}.json"
        write_json(root / path, records)
        manifest.add(f"karpathy_{split}", path, len(records),
                     {"index_key": "image_id", "vision_key": "image", "text_key": "caption"})
        if split == "train":
            continue
        annotations = []
        for scene in scenes[split]:
            for caption in captions[scene.image_id]:
                annotations.append({"image_id": scene.image_id, "caption": render_caption(caption),
                                    "id": len(annotations) + 1})
        ground_truth = {
            "info": {"description": f"generated world captions, {split} split", "version": "1.0"},
            "licenses": [],
            "type": "captions",
            "images": [{"id": s.image_id, "file_name": s.file_name} for s in scenes[split]],
            "annotations": annotations,
        }
        gt_path = f"karpathy/coco_karpathy_{split}_gt.json"
        write_json(root / gt_path, ground_truth)
        manifest.add(f"caption_gt_{split}", gt_path, len(annotations))


def balance_yes_no(asked: list[tuple]) -> list[tuple]:
    """The answer balancer leaves yes/no families at most one question apart; drop the last
    surplus questions so that every yes/no family is split exactly in half."""
    surplus: dict[tuple[str, str], int] = {}
    for family in QUESTION_TYPES:
        if ANSWER_TYPES[family] != "yes/no":
            continue
        answers = Counter(q.answer for _, _, q in asked if q.family == family)
        if answers["yes"] != answers["no"]:
            majority = "yes" if answers["yes"] > answers["no"] else "no"
            surplus[(family, majority)] = abs(answers["yes"] - answers["no"])
    kept = []
    for item in reversed(asked):
        key = (item[2].family, item[2].answer)
        if surplus.get(key, 0) > 0:
            surplus[key] -= 1
            continue
        kept.append(item)
    return kept[::-1]


def write_vqa(root: Path, manifest: Manifest, scenes: dict[str, list[Scene]], seed: int,
              per_image: int) -> None:
    train_answers: Counter = Counter()
    for split in vocab.IMAGE_SPLITS:
        rng = stream_rng(seed, f"vqa/{split}")
        balancer = AnswerBalancer()
        asked = []
        for scene in scenes[split]:
            index = SceneIndex(scene.objects, scene.margin)
            for k, question in enumerate(scene_questions(index, split == vocab.NOVEL_SPLIT,
                                                         per_image, balancer, rng)):
                asked.append((scene, scene.image_id * 1000 + k, question))
        asked = balance_yes_no(asked)
        processed, questions, annotations = [], [], []
        for scene, question_id, question in asked:
            answers = [question.answer] * ANSWERS_PER_QUESTION
            processed.append({"question_id": question_id, "image": scene.file_name,
                              "question": question.text, "answer": answers, "dataset": "vqa"})
            questions.append({"image_id": scene.image_id, "question": question.text,
                              "question_id": question_id})
            annotations.append({
                "question_type": QUESTION_TYPES[question.family],
                "multiple_choice_answer": question.answer,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)],
                "image_id": scene.image_id,
                "answer_type": ANSWER_TYPES[question.family],
                "question_id": question_id,
            })
            if split == "train":
                train_answers[question.answer] += 1
        path = f"vqa/vqa_{split}.json"
        write_json(root / path, processed)
        manifest.add(f"vqa_{split}", path, len(processed))
        info = {"description": f"generated world VQA, {split} split", "version": "2.0"}
        license_ = {"name": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}
        questions_path = f"vqa/v2_OpenEnded_world_{split}_questions.json"
        write_json(root / questions_path, {
            "info": info, "task_type": "Open-Ended", "data_type": "world", "license": license_,
            "data_subtype": split, "questions": questions,
        })
        manifest.add(f"vqa_questions_{split}", questions_path, len(questions))
        annotations_path = f"vqa/v2_world_{split}_annotations.json"
        write_json(root / annotations_path, {
            "info": info, "license": license_, "data_subtype": split, "annotations": annotations,
            "data_type": "world",
        })
        manifest.add(f"vqa_annotations_{split}", annotations_path, len(annotations))
    vocabulary_answers = (list(vocab.COLOR_NAMES) + list(vocab.SHAPES) + ["yes", "no"]
                          + [str(n) for n in range(0, 5)])
    answer_list = sorted(set(vocabulary_answers) | set(train_answers),
                         key=lambda a: (-train_answers[a], a))
    write_json(root / "vqa/answer_list.json", answer_list)
    manifest.add("vqa_answer_list", "vqa/answer_list.json", len(answer_list))


def write_nlvr2(root: Path, manifest: Manifest, scenes: dict[str, list[Scene]], seed: int,
                pairs: dict[str, int]) -> None:
    for split in vocab.IMAGE_SPLITS:
        rng = stream_rng(seed, f"nlvr2/{split}")
        pool = scenes[split]
        n_pairs = pairs[split]
        labels = np.array([k % 2 == 0 for k in range(n_pairs)])
        rng.shuffle(labels)
        records = []
        for label in labels:
            first, second = rng.choice(len(pool), size=2, replace=False)
            left, right = pool[int(first)], pool[int(second)]
            statement = pair_statement(SceneIndex(left.objects, left.margin),
                                       SceneIndex(right.objects, right.margin), bool(label),
                                       split == vocab.NOVEL_SPLIT, rng)
            records.append({"images": [left.file_name, right.file_name],
                            "sentence": statement.text, "label": "True" if statement.label else "False"})
        path = f"nlvr2/nlvr_{split}.json"
        write_json(root / path, records)
        manifest.add(f"nlvr2_{split}", path, len(records))


def write_refcoco(root: Path, manifest: Manifest, scenes: dict[str, list[Scene]], seed: int) -> None:
    categories = [{"supercategory": "shape", "id": k + 1, "name": shape}
                  for k, shape in enumerate(vocab.SHAPES)]
    category_ids = {c["name"]: c["id"] for c in categories}
    images, annotations, refs = [], [], []
    processed: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    sent_id = 0
    for split in vocab.IMAGE_SPLITS:
        for scene in scenes[split]:
            images.append({"id": scene.image_id, "file_name": scene.file_name,
                           "height": scene.image_size, "width": scene.image_size})
            index = SceneIndex(scene.objects, scene.margin)
            rng = stream_rng(seed, "refcoco", scene.image_id)
            for obj in scene.objects:
                ann_id = scene.image_id * 10 + obj.id
                x, y, w, h = obj.box
                annotations.append({
                    "segmentation": [shape_outline(obj.shape, obj.box)],
                    "area": w * h, "iscrowd": 0, "image_id": scene.image_id,
                    "bbox": [x, y, w, h], "category_id": category_ids[obj.shape], "id": ann_id,
                })
                expressions = referring_expressions(index, obj, rng)
                if not expressions:
                    continue
                sentences = []
                for text in expressions:
                    sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id,
                                      "sent": text})
                    sent_id += 1
                ref_id = ann_id
                stem = scene.file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                refs.append({
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "file_name": f"{stem}_{ann_id}.jpg",
                    "ann_id": ann_id, "ref_id": ref_id, "image_id": scene.image_id,
                    "split": REFER_SPLITS[split], "sentences": sentences,
                    "category_id": category_ids[obj.shape],
                })
                json_split = "test" if split in ("test", "test_novel") else split
                for sentence in sentences:
                    processed[json_split].append({
                        "image": scene.file_name, "text": sentence["sent"], "ref_id": ref_id,
                        "bbox": [x, y, w, h], "height": scene.image_size, "width": scene.image_size,
                    })
    instances = {
        "info": {"description": "generated world instances for REFER", "version": "1.0"},
        "images": images, "licenses": [], "annotations": annotations, "categories": categories,
    }
    write_json(root / "refcoco+/instances.json", instances)
    manifest.add("refcoco_instances", "refcoco+/instances.json", len(annotations))
    write_pickle(root / "refcoco+/refs(unc).p", refs)
    manifest.add("refcoco_refs", "refcoco+/refs(unc).p", len(refs))
    for split, records in processed.items():
        path = f"refcoco+/refcoco+_{split}.json"
        write_json(root / path, records)
        manifest.add(f"refcoco_{split}", path, len(records))


def write_multilingual(root: Path, manifest: Manifest, scenes: dict[str, list[Scene]],
                       captions: dict, train_fraction: float) -> None:
    subsets = {
        "train": scenes["train"][: max(1, round(len(scenes["train"]) * train_fraction))],
        "val": scenes["val"],
        "test": scenes["test"],
    }
    for language in vocab.LANGUAGES:
        for split, subset in subsets.items():
            if split == "train":
                records = [{"image": s.file_name, "caption": render_caption(c, language),
                            "image_id": s.image_id} for s in subset for c in captions[s.image_id]]
            else:
                records = [{"image": s.file_name,
                            "caption": [render_caption(c, language) for c in captions[s.image_id]],
                            "image_id": s.image_id} for s in subset]
            path = f"multilingual/coco_{language}_{split}.json"
            write_json(root / path, records)
            manifest.add(f"multilingual_{split}_{language}", path, len(records))


# --- video datasets -----------------------------------------------------------------------------


def sample_clips(preset: SizePreset, seed: int, frame_size: int) -> dict[str, list[Clip]]:
    clips: dict[str, list[Clip]] = {}
    number = 0
    for split in vocab.IMAGE_SPLITS:
        clips[split] = []
        for index in range(preset.clips[split]):
            video_id = f"video{number}"
            rng = stream_rng(seed, f"clip/{split}", index)
            clips[split].append(sample_clip(rng, video_id, split, f"{video_id}.mp4", frame_size))
            number += 1
    return clips


def write_videos(root: Path, clips: dict[str, list[Clip]]) -> None:
    all_clips = [c for split in vocab.IMAGE_SPLITS for c in clips[split]]
    for clip in tqdm(all_clips, desc="videos", unit="clip", leave=False):
        path = root / VIDEO_ROOT / clip.file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(str(path), render_clip(clip), clip.fps)
        decoded = count_decoded_frames(str(path))
        if decoded != clip.num_frames:
            raise RuntimeError(f"{path}: wrote {clip.num_frames} frames but decoding gives {decoded}")


def write_video_datasets(root: Path, manifest: Manifest, clips: dict[str, list[Clip]], seed: int,
                         per_clip: int, shards: int) -> None:
    captions = {c.video_id: clip_captions(c, stream_rng(seed, "clip_captions", int(c.video_id[5:])))
                for split in vocab.IMAGE_SPLITS for c in clips[split]}
    for name, split, parts in (("pretrain", "train", shards), ("pretrain_val", "val", 1)):
        pretrain = [[] for _ in range(parts)]
        for position, clip in enumerate(clips[split]):
            pretrain[position % parts].append({"video_id": clip.video_id, "video": clip.file_name,
                                               "text": captions[clip.video_id]})
        paths = []
        for k, records in enumerate(pretrain):
            path = f"{name}/video_text/part-{k:05d}.jsonl"
            write_json_lines(root / path, records)
            paths.append(path)
        manifest.add(f"{name}_video_text", f"{name}/video_text", len(clips[split]),
                     {"video_key": "video", "text_key": "text"})
        manifest.shards[f"{name}_video_text"] = paths

    train_answers: Counter = Counter()
    for split in vocab.IMAGE_SPLITS:
        if split == "train":
            retrieval = [{"video_id": c.video_id, "video": c.file_name, "caption": text}
                         for c in clips[split] for text in captions[c.video_id]]
        else:
            retrieval = [{"video_id": c.video_id, "video": c.file_name, "caption": captions[c.video_id]}
                         for c in clips[split]]
        path = f"msrvtt/msrvtt_ret_{split}.json"
        write_json(root / path, retrieval)
        manifest.add(f"video_retrieval_{split}", path, len(retrieval),
                     {"index_key": "video_id", "vision_key": "video", "text_key": "caption"})

        rng = stream_rng(seed, f"video_qa/{split}")
        balancer = AnswerBalancer()
        family_counts: Counter = Counter()
        qa = []
        for clip in clips[split]:
            for question in clip_questions(clip, per_clip, family_counts, balancer, rng):
                qa.append({"video_id": clip.video_id, "question": question.text,
                           "answer": question.answer, "answer_type": question.family})
                if split == "train":
                    train_answers[question.answer] += 1
        path = f"msrvtt/msrvtt_qa_{split}.jsonl"
        write_json_lines(root / path, qa)
        manifest.add(f"video_qa_{split}", path, len(qa))
    ordered = sorted(train_answers, key=lambda a: (-train_answers[a], a))
    write_json(root / "msrvtt/train_ans2label.json", {a: k for k, a in enumerate(ordered)})
    manifest.add("video_qa_ans2label", "msrvtt/train_ans2label.json", len(ordered))


# --- entry point --------------------------------------------------------------------------------


def generate(out_dir: str | Path, size: str = "small", seed: int = 0, image_size: int = 96,
             video_size: int = 64, grid_px: int = vocab.DEFAULT_GRID_PX) -> dict:
    """Generate the world into ``out_dir`` and return its manifest (also ``manifest.json``).

    The same arguments always give byte-identical files. ``size`` is ``tiny`` (tests),
    ``small`` (default) or ``medium``. Objects of images sit on a grid of ``grid_px`` pixel
    cells (``vocabulary.DEFAULT_GRID_PX``: aligned with the small preset's 16 px patches; 1: free).
    """
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZE_PRESETS)}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if grid_px < 1 or image_size % grid_px:
        raise ValueError(f"image_size {image_size} is not a multiple of grid_px {grid_px}")
    if video_size < 32 or video_size % 2:
        raise ValueError(f"video_size must be an even number of at least 32 pixels, got {video_size}")
    preset = SIZE_PRESETS[size]
    root = Path(out_dir)
    prepare_output_dir(root)
    manifest = Manifest()

    logger.info("sampling %d scenes", sum(preset.images.values()))
    scenes = sample_scenes(preset, seed, image_size, grid_px)
    write_json(root / "world/world.json", vocab.world_definition(image_size, video_size, grid_px),
               indent=2)
    manifest.add("world_definition", "world/world.json")
    for split in vocab.IMAGE_SPLITS:
        path = f"world/scenes_{split}.json"
        write_json(root / path, {"image_root": IMAGE_ROOT, "split": split,
                                 "scenes": [s.to_json() for s in scenes[split]]})
        manifest.add(f"scenes_{split}", path, len(scenes[split]))
    logger.info("rendering images")
    write_images(root, scenes)

    logger.info("writing image datasets")
    captions, regions = {}, {}
    for split in vocab.IMAGE_SPLITS:
        for scene in scenes[split]:
            index = SceneIndex(scene.objects, scene.margin)
            captions[scene.image_id] = image_captions(index, scene.image_size,
                                                      stream_rng(seed, "captions", scene.image_id))
            regions[scene.image_id] = region_elements(index, stream_rng(seed, "regions", scene.image_id))
    write_pretraining(root, manifest, scenes["train"], captions, regions, preset.pretrain_shards)
    write_pretraining(root, manifest, scenes["val"], captions, regions, 1, name="pretrain_val")
    write_karpathy(root, manifest, scenes, captions)
    write_vqa(root, manifest, scenes, seed, preset.questions_per_image)
    write_nlvr2(root, manifest, scenes, seed, preset.nlvr_pairs)
    write_refcoco(root, manifest, scenes, seed)
    write_multilingual(root, manifest, scenes, captions, preset.multilingual_train_fraction)

    logger.info("sampling and encoding %d clips", sum(preset.clips.values()))
    clips = sample_clips(preset, seed, video_size)
    for split in vocab.IMAGE_SPLITS:
        path = f"world/clips_{split}.json"
        write_json(root / path, {"video_root": VIDEO_ROOT, "split": split,
                                 "clips": [c.to_json() for c in clips[split]]})
        manifest.add(f"clips_{split}", path, len(clips[split]))
    write_videos(root, clips)
    write_video_datasets(root, manifest, clips, seed, preset.questions_per_clip, preset.pretrain_shards)

    data = {
        "name": "x2vlm-world",
        "format_version": FORMAT_VERSION,
        "generator": {"size": size, "seed": seed, "image_size": image_size, "video_size": video_size,
                      "grid_px": grid_px},
        "image_root": IMAGE_ROOT,
        "video_root": VIDEO_ROOT,
        "vqa_image_template": VQA_IMAGE_TEMPLATE,
        "splits": list(vocab.IMAGE_SPLITS),
        "novel_split": vocab.NOVEL_SPLIT,
        "held_out_pairs": [list(p) for p in vocab.HELD_OUT_PAIRS],
        "refer_splits": REFER_SPLITS,
        "languages": list(vocab.LANGUAGES),
        "files": manifest.files,
        "shards": manifest.shards,
        "keys": manifest.keys,
        "counts": manifest.counts,
    }
    write_json(root / "manifest.json", data, indent=2)
    logger.info("world written to %s", root)
    return data
