"""An independent checker of a generated world.

``check(out_dir)`` reads every dataset file through the format readers (``x2vlm.data.readers``),
reads the scene ground truth as plain JSON, and recomputes every caption, answer, box and label
from the ground truth with its own geometry rules (re-implemented from the rules written in
``world/world.json``) and its own sentence parser (``parsing``). It also checks the pixels: the
colour at every visible object centre in every image and video frame. It never calls the
generator. It returns a list of problems; an empty list means the world is consistent.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from x2vlm.data import readers
from x2vlm.world.parsing import (
    Claim,
    DescriptionClaim,
    ParseError,
    Phrase,
    parse_caption,
    parse_description,
    parse_phrase_list,
    parse_question,
    parse_statement,
    parse_video_caption,
    parse_video_question,
)

logger = logging.getLogger(__name__)

EXPECTED_QUESTION_TYPES = {
    "color": ("what color is the", "other"),
    "shape": ("what shape is the", "other"),
    "count": ("how many", "number"),
    "existence": ("is there a", "yes/no"),
    "relation": ("is the", "yes/no"),
}
LOCATION_GRID = ("top left", "top", "top right", "left", "center", "right", "bottom left",
                 "bottom", "bottom right")


@dataclass(frozen=True)
class Thing:
    """An object as the checker sees it (in a scene, or in one video frame)."""

    id: int
    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]

    def attribute(self, name: str) -> str:
        return getattr(self, name)


@dataclass
class SceneTruth:
    image_id: int
    split: str
    file_name: str
    size: int
    things: list[Thing]
    shades: dict[int, float]
    listed_relations: set


@dataclass
class ClipTruth:
    video_id: str
    split: str
    file_name: str
    size: int
    num_frames: int
    shapes: dict[int, str]
    sizes: dict[int, str]
    shades: dict[int, float]
    frames: list[list[dict]]  # per frame, per object: {id, visible, color, box}

    def track(self, object_id: int) -> list[dict]:
        return [next(o for o in frame if o["id"] == object_id) for frame in self.frames]


# --- geometry, re-implemented from the rules in world.json -----------------------------------------


def centre2(box) -> tuple[int, int]:
    return 2 * box[0] + box[2], 2 * box[1] + box[3]


def stands(subject_box, relation: str, reference_box, margin: int) -> bool:
    (sx, sy), (rx, ry) = centre2(subject_box), centre2(reference_box)
    offsets = {"left of": rx - sx, "right of": sx - rx, "above": ry - sy, "below": sy - ry}
    return offsets[relation] >= 2 * margin


def grid_cell(box, size: int) -> str:
    cx, cy = centre2(box)
    return LOCATION_GRID[min(2, cy * 3 // (2 * size)) * 3 + min(2, cx * 3 // (2 * size))]


def uncovered_fraction(box, on_top) -> float:
    x, y, w, h = box
    covered = np.zeros((h, w), dtype=bool)
    for lx, ly, lw, lh in on_top:
        x0, x1, y0, y1 = max(x, lx), min(x + w, lx + lw), max(y, ly), min(y + h, ly + lh)
        if x0 < x1 and y0 < y1:
            covered[y0 - y:y1 - y, x0 - x:x1 - x] = True
    return 1.0 - float(covered.mean())


def centre_hidden(box, on_top) -> bool:
    cx, cy = centre2(box)
    return any(2 * x <= cx < 2 * (x + w) and 2 * y <= cy < 2 * (y + h) for x, y, w, h in on_top)


def union(boxes) -> tuple[int, int, int, int]:
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return (x0, y0, x1 - x0, y1 - y0)


def matching(things: list[Thing], phrase: Phrase) -> list[Thing]:
    return [t for t in things if all(t.attribute(k) == v for k, v in phrase.attributes.items())]


class Mismatch(Exception):
    """An item disagrees with the ground truth (raised inside the check of one item)."""


def unique(things: list[Thing], phrase: Phrase) -> Thing:
    found = matching(things, phrase)
    if len(found) != 1:
        raise Mismatch(f"{phrase.attributes or 'object'} matches {len(found)} objects, expected 1")
    return found[0]


def resolve(description: DescriptionClaim, things: list[Thing], margin: int) -> list[Thing]:
    """Objects matching the head that stand in the relation to the (unique) reference."""
    candidates = matching(things, description.head)
    if description.relation is None:
        return candidates
    reference = unique(things, description.reference)
    return [t for t in candidates
            if t.id != reference.id and stands(t.box, description.relation, reference.box, margin)]


def verify_claim(claim: Claim, things: list[Thing], size: int, margin: int) -> None:
    if claim.kind == "list":
        for phrase in claim.phrases:
            if phrase.count is None:
                raise Mismatch(f"caption phrase {phrase.attributes} has no count")
            found = len(matching(things, phrase))
            if found != phrase.count:
                raise Mismatch(f"caption says {phrase.count} x {phrase.attributes or 'object'}, "
                               f"scene has {found}")
    elif claim.kind == "relation":
        subject, reference = (unique(things, p) for p in claim.phrases)
        if not stands(subject.box, claim.relation, reference.box, margin):
            raise Mismatch(f"'{claim.relation}' does not hold between objects {subject.id} and {reference.id}")
    else:
        thing = unique(things, claim.phrases[0])
        if grid_cell(thing.box, size) != claim.location:
            raise Mismatch(f"object {thing.id} is in the {grid_cell(thing.box, size)} cell, "
                           f"caption says {claim.location}")


def load(path: Path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --- the checker --------------------------------------------------------------------------------


class WorldChecker:
    def __init__(self, out_dir: str | Path, check_pixels: bool = True):
        self.root = Path(out_dir)
        self.check_pixels = check_pixels
        self.problems: list[str] = []
        self.manifest = load(self.root / "manifest.json")
        self.files = self.manifest["files"]
        self.world = load(self.path("world_definition"))
        self.held_out = {tuple(p) for p in self.world["held_out_pairs"]}
        self.novel = self.manifest["novel_split"]
        self.splits = self.manifest["splits"]
        self.image_root = self.root / self.manifest["image_root"]
        self.video_root = self.root / self.manifest["video_root"]
        self.scenes: dict[str, SceneTruth] = {}  # by file name
        self.scene_ids: dict[int, SceneTruth] = {}
        self.clips: dict[str, ClipTruth] = {}
        self._verified: dict[tuple, str | None] = {}

    def path(self, role: str) -> Path:
        return self.root / self.files[role]

    def report(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    # -- ground truth --

    def check_manifest(self) -> None:
        for role, relative in self.files.items():
            if not (self.root / relative).exists():
                self.report("manifest.json", f"role {role!r}: {relative} does not exist")
        for role, shards in self.manifest.get("shards", {}).items():
            for relative in shards:
                if not (self.root / relative).is_file():
                    self.report("manifest.json", f"shard of {role!r}: {relative} does not exist")

    def named_held_out(self, phrase: Phrase) -> bool:
        attributes = phrase.attributes
        return (attributes.get("color"), attributes.get("shape")) in self.held_out

    def load_scenes(self) -> None:
        sizes = self.world["object_size_px"]
        grid = self.world.get("grid_px", 1)
        margin = self.world["relation_margin_px"]
        signatures: dict[tuple, str] = {}
        for split in self.splits:
            role = f"scenes_{split}"
            for data in load(self.path(role))["scenes"]:
                where = f"{self.files[role]}: image {data['image_id']}"
                things = [Thing(o["id"], o["shape"], o["color"], o["size"], tuple(o["box"]))
                          for o in data["objects"]]
                scene = SceneTruth(data["image_id"], data["split"], data["file_name"], data["width"],
                                   things, {o["id"]: o["shade"] for o in data["objects"]},
                                   {(r["subject"], r["relation"], r["object"]) for r in data["relations"]})
                if scene.split != split:
                    self.report(where, f"split {scene.split!r} listed under {split!r}")
                if scene.image_id in self.scene_ids or scene.file_name in self.scenes:
                    self.report(where, "image id or file name used twice")
                self.scenes[scene.file_name] = scene
                self.scene_ids[scene.image_id] = scene
                if not scene.file_name.startswith(f"{split}/") or not scene.file_name.endswith(
                        f"_{scene.image_id:06d}.jpg"):
                    self.report(where, f"file name {scene.file_name!r} does not match split and id")
                if not 1 <= len(things) <= 4:
                    self.report(where, f"{len(things)} objects (expected 1 to 4)")
                signature = tuple(sorted((t.shape, t.color, t.size, t.box) for t in things))
                if signature in signatures:
                    self.report(where, f"same scene content as one in split {signatures[signature]!r}")
                signatures[signature] = split
                held = [t for t in things if (t.color, t.shape) in self.held_out]
                if split == self.novel and not held:
                    self.report(where, "novel-split scene without a held-out colour-shape pair")
                if split != self.novel and held:
                    self.report(where, f"held-out pair {(held[0].color, held[0].shape)} outside the novel split")
                for index, thing in enumerate(things):
                    x, y, w, h = thing.box
                    if x < 0 or y < 0 or x + w > scene.size or y + h > scene.size:
                        self.report(where, f"object {thing.id} box {thing.box} leaves the image")
                    if w != sizes.get(thing.size) or h != w:
                        self.report(where, f"object {thing.id} box {thing.box} does not fit size {thing.size!r}")
                    if x % grid or y % grid:
                        self.report(where, f"object {thing.id} box {thing.box} is off the {grid} px placement grid")
                    if thing.shape not in self.world["shapes"] or thing.color not in self.world["colors"]:
                        self.report(where, f"object {thing.id} has unknown attributes")
                    on_top = [t.box for t in things[index + 1:]]
                    if centre_hidden(thing.box, on_top):
                        self.report(where, f"object {thing.id} has its centre covered")
                    if uncovered_fraction(thing.box, on_top) < self.world["min_visible_fraction"] - 1e-9:
                        self.report(where, f"object {thing.id} is occluded too much")
                recomputed = {(a.id, rel, b.id) for a in things for b in things if a.id != b.id
                              for rel in self.world["relations"] if stands(a.box, rel, b.box, margin)}
                if recomputed != scene.listed_relations:
                    self.report(where, "listed relations differ from the geometry")

    def check_image_pixels(self) -> None:
        palette = {name: np.asarray(rgb, dtype=np.float32) for name, rgb in self.world["colors"].items()}
        for scene in self.scenes.values():
            path = self.image_root / scene.file_name
            where = f"{self.manifest['image_root']}/{scene.file_name}"
            if not path.is_file():
                self.report(where, "image file missing")
                continue
            image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
            if image.shape[:2] != (scene.size, scene.size):
                self.report(where, f"image is {image.shape[1]}x{image.shape[0]}, ground truth says {scene.size}")
                continue
            for index, thing in enumerate(scene.things):
                if centre_hidden(thing.box, [t.box for t in scene.things[index + 1:]]):
                    continue
                seen = self.centre_colour(image, thing.box, [t.box for t in scene.things[index + 1:]],
                                          palette, scene.shades[thing.id])
                if seen != thing.color:
                    self.report(where, f"object {thing.id} looks {seen}, ground truth says {thing.color}")

    @staticmethod
    def centre_colour(image: np.ndarray, box, on_top: list, palette: dict, shade: float) -> str:
        """Nearest palette colour (at the object's shade) to the mean of the 3 x 3 pixels around
        the box centre that no object drawn later covers."""
        cx, cy = centre2(box)
        x, y = cx // 2, cy // 2
        pixels = [image[py, px] for py in range(y - 1, y + 2) for px in range(x - 1, x + 2)
                  if 0 <= py < image.shape[0] and 0 <= px < image.shape[1]
                  and not any(bx <= px < bx + bw and by <= py < by + bh for bx, by, bw, bh in on_top)]
        patch = np.mean(pixels, axis=0)
        return min(palette, key=lambda name: float(np.sum((patch - palette[name] * shade) ** 2)))

    def load_clips(self) -> None:
        video = self.world["video"]
        for split in self.splits:
            role = f"clips_{split}"
            for data in load(self.path(role))["clips"]:
                where = f"{self.files[role]}: {data['video_id']}"
                clip = ClipTruth(
                    data["video_id"], data["split"], data["file_name"], data["width"], data["num_frames"],
                    {o["id"]: o["shape"] for o in data["objects"]}, {o["id"]: o["size"] for o in data["objects"]},
                    {o["id"]: o["shade"] for o in data["objects"]},
                    [frame["objects"] for frame in data["frames"]],
                )
                if clip.video_id in self.clips:
                    self.report(where, "video id used twice")
                self.clips[clip.video_id] = clip
                if clip.split != split or clip.file_name != f"{clip.video_id}.mp4":
                    self.report(where, "split or file name inconsistent")
                if not video["min_frames"] <= clip.num_frames <= video["max_frames"] or len(clip.frames) != clip.num_frames:
                    self.report(where, f"{clip.num_frames} frames, {len(clip.frames)} listed")
                if len(set(clip.shapes.values())) != len(clip.shapes):
                    self.report(where, "two objects share a shape")
                held_seen = False
                for t, frame in enumerate(clip.frames):
                    visible = [o for o in frame if o["visible"]]
                    for k, state in enumerate(visible):
                        x, y, w, h = state["box"]
                        if x < 0 or y < 0 or x + w > clip.size or y + h > clip.size:
                            self.report(where, f"frame {t}: object {state['id']} leaves the frame")
                        if w != video["object_size_px"][clip.sizes[state["id"]]] or h != w:
                            self.report(where, f"frame {t}: object {state['id']} has the wrong box size")
                        if (state["color"], clip.shapes[state["id"]]) in self.held_out:
                            held_seen = True
                        on_top = [o["box"] for o in visible[k + 1:]]
                        if centre_hidden(state["box"], on_top) or uncovered_fraction(state["box"], on_top) < self.world["min_visible_fraction"] - 1e-9:
                            self.report(where, f"frame {t}: object {state['id']} is occluded too much")
                if split == self.novel and not held_seen:
                    self.report(where, "novel-split clip without a held-out colour-shape pair")
                if split != self.novel and held_seen:
                    self.report(where, "held-out colour-shape pair outside the novel split")

    def check_video_files(self) -> None:
        palette = {name: np.asarray(rgb, dtype=np.float32) for name, rgb in self.world["colors"].items()}
        for clip in self.clips.values():
            path = self.video_root / clip.file_name
            where = f"{self.manifest['video_root']}/{clip.file_name}"
            if not path.is_file():
                self.report(where, "video file missing")
                continue
            try:
                with av.open(str(path)) as container:
                    stream = container.streams.video[0]
                    stream.thread_type = "NONE"
                    frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            except (av.error.FFmpegError, IndexError) as error:
                self.report(where, f"cannot decode: {error}")
                continue
            if len(frames) != clip.num_frames:
                self.report(where, f"decodes to {len(frames)} frames, ground truth says {clip.num_frames}")
                continue
            if frames[0].shape[:2] != (clip.size, clip.size):
                self.report(where, f"frames are {frames[0].shape[1]}x{frames[0].shape[0]}")
                continue
            if not self.check_pixels:
                continue
            for t, frame in enumerate(frames):
                visible = [o for o in clip.frames[t] if o["visible"]]
                image = frame.astype(np.float32)
                for k, state in enumerate(visible):
                    on_top = [o["box"] for o in visible[k + 1:]]
                    if centre_hidden(state["box"], on_top):
                        continue
                    seen = self.centre_colour(image, state["box"], on_top, palette, clip.shades[state["id"]])
                    if seen != state["color"]:
                        self.report(where, f"frame {t}: object {state['id']} looks {seen}, "
                                           f"ground truth says {state['color']}")

    # -- sentences about images --

    def scene_for(self, image: str, where: str, splits: tuple[str, ...] | None = None) -> SceneTruth | None:
        scene = self.scenes.get(image)
        if scene is None:
            self.report(where, f"image {image!r} is not a scene of the world")
            return None
        if splits is not None and scene.split not in splits:
            self.report(where, f"image {image!r} is from split {scene.split!r}, expected {splits}")
        return scene

    def verify_caption(self, scene: SceneTruth, text: str, language: str, where: str) -> None:
        key = (scene.file_name, language, text)
        if key not in self._verified:
            try:
                claim = parse_caption(text, language)
                verify_claim(claim, scene.things, scene.size, self.world["relation_margin_px"])
                if scene.split != self.novel and any(self.named_held_out(p) for p in claim.phrases):
                    raise Mismatch("names a held-out colour-shape pair outside the novel split")
                self._verified[key] = None
            except (ParseError, Mismatch) as error:
                self._verified[key] = str(error)
        if self._verified[key] is not None:
            self.report(where, f"caption {text!r}: {self._verified[key]}")

    def check_captions(self) -> None:
        for split in self.splits:
            role = f"karpathy_{split}"
            path = self.path(role)
            per_image: dict[str, list[str]] = {}
            if split == "train":
                for k, pair in enumerate(readers.read_karpathy_train(path)):
                    where = f"{self.files[role]}[{k}]"
                    scene = self.scene_for(pair.image, where, (split,))
                    if scene is None:
                        continue
                    if pair.index != scene.image_id:
                        self.report(where, f"image_id {pair.index} but the image is scene {scene.image_id}")
                    per_image.setdefault(pair.image, []).append(pair.caption)
                    self.verify_caption(scene, pair.caption, "en", where)
            else:
                for k, item in enumerate(readers.read_karpathy_eval(path, index_key="image_id")):
                    where = f"{self.files[role]}[{k}]"
                    scene = self.scene_for(item.image, where, (split,))
                    if scene is None:
                        continue
                    per_image[item.image] = item.captions
                    for caption in item.captions:
                        self.verify_caption(scene, caption, "en", where)
                ground_truth = readers.read_coco_caption_gt(self.path(f"caption_gt_{split}"))
                by_id = {self.scenes[image].image_id: captions for image, captions in per_image.items()
                         if image in self.scenes}
                if ground_truth != by_id:
                    self.report(self.files[f"caption_gt_{split}"], "captions differ from the Karpathy file")
            expected = {s.file_name for s in self.scenes.values() if s.split == split}
            if set(per_image) != expected:
                self.report(self.files[role], "does not cover exactly the scenes of its split")
            for image, captions in per_image.items():
                if len(captions) != 5 or len(set(captions)) != 5:
                    self.report(self.files[role], f"{image}: expected 5 distinct captions, got {len(set(captions))}")

    def check_multilingual(self) -> None:
        counts: dict[tuple[str, str], dict[str, int]] = {}
        for role, relative in self.files.items():
            if not role.startswith("multilingual_"):
                continue
            _, split, language = role.split("_")
            path = self.root / relative
            if split == "train":
                items = [(p.image, [p.caption]) for p in readers.read_karpathy_train(path)]
            else:
                items = [(e.image, e.captions) for e in readers.read_karpathy_eval(path)]
            tally: dict[str, int] = {}
            for k, (image, captions) in enumerate(items):
                where = f"{relative}[{k}]"
                scene = self.scene_for(image, where, (split,))
                if scene is None:
                    continue
                tally[image] = tally.get(image, 0) + len(captions)
                for caption in captions:
                    self.verify_caption(scene, caption, language, where)
            counts[(split, language)] = tally
        for (split, language), tally in counts.items():
            if tally != counts.get((split, "en")):
                self.report(f"multilingual {split}/{language}", "covers other images or caption counts than English")

    def shard_records(self, role: str, parse, **keys):
        """(location "file:line", parsed record) for every line of a sharded data path."""
        for shard in readers.list_shards(self.path(role)):
            relative = shard.relative_to(self.root)
            for number, data in readers.iter_json_lines(shard):
                where = f"{relative}:{number}"
                yield where, parse(data, where, **keys)

    def check_pretraining(self) -> None:
        for name, split in (("pretrain", "train"), ("pretrain_val", "val")):
            self.check_pretraining_files(name, split)

    def check_pretraining_files(self, name: str, split: str) -> None:
        margin = self.world["relation_margin_px"]
        keys = self.manifest["keys"][f"{name}_image_text"]
        for where, item in self.shard_records(f"{name}_image_text", readers.parse_image_text,
                                              image_key=keys["image_key"], caption_key=keys["caption_key"]):
            scene = self.scene_for(item.image, where, (split,))
            if scene is not None:
                for caption in item.captions:
                    self.verify_caption(scene, caption, "en", where)
        keys = self.manifest["keys"][f"{name}_region_text"]
        for where, item in self.shard_records(f"{name}_region_text", readers.parse_region_text,
                                              image_key=keys["image_key"]):
            scene = self.scene_for(item.image, where, (split,))
            if scene is None:
                continue
            for caption in item.captions or []:
                self.verify_caption(scene, caption, "en", where)
            for e, region in enumerate(item.regions):
                try:
                    self.verify_region(scene, region, margin)
                except (ParseError, Mismatch) as error:
                    self.report(f"{where}: elems[{e}]", str(error))

    def verify_region(self, scene: SceneTruth, region: readers.Region, margin: int) -> None:
        box = tuple(int(v) for v in region.bbox)
        x, y, w, h = box
        if x < 0 or y < 0 or x + w > scene.size or y + h > scene.size:
            raise Mismatch(f"bb {box} leaves the image")
        attributes = region.attributes or [""]
        for caption in region.captions:
            for attribute in attributes:
                text = f"{attribute} {caption}".strip()
                phrases = parse_phrase_list(text) if " and " in text else None
                if phrases is None:
                    description = parse_description(text)
                    if not description.head.plural and description.head.count is None:
                        targets = [t for t in scene.things if t.box == box]
                        if len(targets) != 1:
                            raise Mismatch(f"{text!r}: bb {box} is not the box of one object")
                        if targets[0] not in resolve(description, scene.things, margin):
                            raise Mismatch(f"{text!r} does not describe the object in bb {box}")
                        continue
                    if description.relation is not None:
                        raise Mismatch(f"{text!r}: a group phrase cannot carry a relation")
                    phrases = [description.head]
                members: dict[int, Thing] = {}
                for phrase in phrases:
                    found = matching(scene.things, phrase)
                    if phrase.count is not None and len(found) != phrase.count:
                        raise Mismatch(f"{text!r}: {len(found)} objects match, phrase says {phrase.count}")
                    if phrase.count is None and phrase.plural and len(found) < 2:
                        raise Mismatch(f"{text!r}: plural phrase matches {len(found)} objects")
                    if phrase.count is None and not phrase.plural and len(found) != 1:
                        raise Mismatch(f"{text!r}: phrase matches {len(found)} objects, expected 1")
                    members.update((t.id, t) for t in found)
                if union([t.box for t in members.values()]) != box:
                    raise Mismatch(f"{text!r}: bb {box} is not the union box of the objects it names")
                if scene.split != self.novel and any(self.named_held_out(p) for p in phrases):
                    raise Mismatch(f"{text!r} names a held-out pair")

    # -- VQA --

    def vqa_answer(self, question: str, scene: SceneTruth) -> tuple[str, str]:
        """(family, answer) recomputed from the scene."""
        margin = self.world["relation_margin_px"]
        family, parsed = parse_question(question)
        if scene.split != self.novel:
            phrases = [parsed] if isinstance(parsed, Phrase) else [parsed.head] + (
                [parsed.reference] if parsed.reference else [])
            if any(self.named_held_out(p) for p in phrases):
                raise Mismatch("names a held-out colour-shape pair outside the novel split")
        if family in ("color", "shape"):
            targets = resolve(parsed, scene.things, margin)
            if len(targets) != 1:
                raise Mismatch(f"description picks {len(targets)} objects")
            return family, targets[0].attribute(family)
        if family == "count":
            if not parsed.plural or parsed.count is not None:
                raise Mismatch("count question without a bare plural phrase")
            return family, str(len(matching(scene.things, parsed)))
        if family == "existence":
            return family, "yes" if matching(scene.things, parsed) else "no"
        subject, reference = unique(scene.things, parsed.head), unique(scene.things, parsed.reference)
        return family, "yes" if stands(subject.box, parsed.relation, reference.box, margin) else "no"

    def check_vqa(self) -> None:
        answer_list = set(readers.read_answer_list(self.path("vqa_answer_list")))
        template = self.manifest["vqa_image_template"]
        for split in self.splits:
            processed = readers.read_vqa_json(self.path(f"vqa_{split}"))
            official = readers.read_vqa_official(self.path(f"vqa_questions_{split}"),
                                                 self.path(f"vqa_annotations_{split}"), template)
            official_by_id = {q.question_id: q for q in official}
            if len(official_by_id) != len(processed) or len(official) != len(processed):
                self.report(self.files[f"vqa_{split}"], "question ids differ from the official files")
            for k, example in enumerate(processed):
                where = f"{self.files[f'vqa_{split}']}[{k}]"
                scene = self.scene_for(example.image, where, (split,))
                if scene is None:
                    continue
                twin = official_by_id.get(example.question_id)
                if twin is None or (twin.image, twin.question, twin.answers) != (
                        example.image, example.question, example.answers):
                    self.report(where, "differs from the official question/annotation files")
                if len(example.answers) != 10 or len(set(example.answers)) != 1:
                    self.report(where, "expected 10 identical annotator answers")
                if example.dataset != "vqa":
                    self.report(where, "dataset field is not 'vqa'")
                try:
                    family, answer = self.vqa_answer(example.question, scene)
                except (ParseError, Mismatch) as error:
                    self.report(where, f"{example.question!r}: {error}")
                    continue
                if answer not in example.answers:
                    self.report(where, f"{example.question!r}: answer {example.answers[0]!r}, scene says {answer!r}")
                if answer not in answer_list:
                    self.report(where, f"answer {answer!r} missing from the answer list")
                if twin is not None and (twin.question_type, twin.answer_type) != EXPECTED_QUESTION_TYPES[family]:
                    self.report(where, f"question/answer type {(twin.question_type, twin.answer_type)} "
                                       f"do not fit a {family} question")

    # -- NLVR2 --

    def statement_truth(self, text: str, left: SceneTruth, right: SceneTruth) -> bool:
        template, parts = parse_statement(text)
        sides = {"left": left, "right": right}
        phrase = parts.get("phrase")
        if template == "vertical":
            scene = sides[parts["side"]]
            subject, reference = unique(scene.things, parts["subject"]), unique(scene.things, parts["reference"])
            return stands(subject.box, parts["relation"], reference.box, self.world["relation_margin_px"])
        if template in ("more", "fewer", "same"):
            n_left, n_right = len(left.things), len(right.things)
            return {"more": n_left > n_right, "fewer": n_left < n_right, "same": n_left == n_right}[template]
        counts = {side: len(matching(scene.things, phrase)) for side, scene in sides.items()}
        if left.split != self.novel and self.named_held_out(phrase):
            raise Mismatch("names a held-out colour-shape pair outside the novel split")
        if template == "contains":
            return counts[parts["side"]] > 0
        if template == "both":
            return counts["left"] > 0 and counts["right"] > 0
        if template == "exactly_one":
            return (counts["left"] > 0) != (counts["right"] > 0)
        if template == "neither":
            return counts["left"] == 0 and counts["right"] == 0
        if phrase.count is None:
            raise Mismatch("total statement without a number")
        return counts["left"] + counts["right"] == phrase.count

    def check_nlvr2(self) -> None:
        for split in self.splits:
            role = f"nlvr2_{split}"
            examples = readers.read_nlvr2(self.path(role))
            labels = Counter(e.label for e in examples)
            if abs(labels[True] - labels[False]) > max(1, 0.05 * len(examples)):
                self.report(self.files[role], f"labels unbalanced: {dict(labels)}")
            for k, example in enumerate(examples):
                where = f"{self.files[role]}[{k}]"
                left = self.scene_for(example.images[0], where, (split,))
                right = self.scene_for(example.images[1], where, (split,))
                if left is None or right is None:
                    continue
                try:
                    truth = self.statement_truth(example.sentence, left, right)
                except (ParseError, Mismatch) as error:
                    self.report(where, f"{example.sentence!r}: {error}")
                    continue
                if truth != example.label:
                    self.report(where, f"{example.sentence!r} is {truth}, label says {example.label}")

    # -- grounding --

    def check_refcoco(self) -> None:
        refs_path, instances_path = self.path("refcoco_refs"), self.path("refcoco_instances")
        refer = readers.read_refer(refs_path, instances_path)
        margin = self.world["relation_margin_px"]
        refer_splits = self.manifest["refer_splits"]
        for ann_id, box in refer.boxes.items():
            scene = self.scene_ids.get(refer.annotation_images[ann_id])
            category = refer.categories[refer.annotation_categories[ann_id]]
            if scene is None or not any(t.box == tuple(box) and t.shape == category for t in scene.things):
                self.report(f"{self.files['refcoco_instances']}: annotation {ann_id}",
                            "box/category is not an object of its image")
        for ref_id, ref in refer.refs.items():
            where = f"{self.files['refcoco_refs']}: ref {ref_id}"
            scene = self.scene_ids.get(ref.image_id)
            if scene is None:
                self.report(where, "image is not a scene of the world")
                continue
            if refer_splits[scene.split] != ref.split:
                self.report(where, f"split {ref.split!r} but the image is in {scene.split!r}")
            if refer.images[ref.image_id].file_name != scene.file_name:
                self.report(where, "image file name differs from the scene")
            targets = [t for t in scene.things if t.box == tuple(refer.ref_box(ref_id))]
            if len(targets) != 1:
                self.report(where, "box is not the box of one object")
                continue
            for sentence in ref.sentences:
                try:
                    description = parse_description(sentence)
                    if description.head.count is not None or description.head.plural:
                        raise Mismatch("not a singular referring expression")
                    picked = resolve(description, scene.things, margin)
                    if picked != targets:
                        raise Mismatch(f"picks objects {[t.id for t in picked]}, ref is object {targets[0].id}")
                    if scene.split != self.novel and any(
                            self.named_held_out(p) for p in (description.head, description.reference) if p):
                        raise Mismatch("names a held-out pair outside the novel split")
                except (ParseError, Mismatch) as error:
                    self.report(where, f"{sentence!r}: {error}")
        json_splits = {"train": {"train"}, "val": {"val"}, "test": {"testA", "testB"}}
        for name, allowed in json_splits.items():
            role = f"refcoco_{name}"
            try:
                examples = readers.read_refcoco(self.path(role), refs_path, instances_path)
            except ValueError as error:
                self.report(self.files[role], str(error))
                continue
            if {e.split for e in examples} != allowed:
                self.report(self.files[role], f"holds refs of splits {sorted({e.split for e in examples})}")
            for k, example in enumerate(examples):
                ref = refer.refs[example.ref_id]
                if example.text not in ref.sentences or refer.images[ref.image_id].file_name != example.image:
                    self.report(f"{self.files[role]}[{k}]", "text or image differs from the ref")

    # -- video --

    def clip_facts(self, clip: ClipTruth) -> dict[int, dict]:
        """Per object: first colour, last colour, direction, appears, disappears, moved, still."""
        min_motion = self.world["video"]["min_motion_px"]
        facts = {}
        for object_id in clip.shapes:
            track = clip.track(object_id)
            shown = [s for s in track if s["visible"]]
            first, last = shown[0], shown[-1]
            dx, dy = last["box"][0] - first["box"][0], last["box"][1] - first["box"][1]
            direction = None
            if dy == 0 and abs(dx) >= min_motion:
                direction = "right" if dx > 0 else "left"
            elif dx == 0 and abs(dy) >= min_motion:
                direction = "down" if dy > 0 else "up"
            moved = any(s["box"] != first["box"] for s in shown)
            facts[object_id] = {
                "shape": clip.shapes[object_id], "size": clip.sizes[object_id],
                "first_color": first["color"], "last_color": last["color"],
                "direction": direction, "moved": moved,
                "appears": not track[0]["visible"] and track[-1]["visible"],
                "disappears": track[0]["visible"] and not track[-1]["visible"],
                "still": all(s["visible"] for s in track) and not moved,
            }
        return facts

    def clip_subject(self, facts: dict[int, dict], phrase: Phrase) -> dict:
        names = {"shape": "shape", "size": "size", "color": "first_color"}
        found = [f for f in facts.values()
                 if all(f[names[k]] == v for k, v in phrase.attributes.items())]
        if len(found) != 1 or phrase.count != 1:
            raise Mismatch(f"subject {phrase.attributes} matches {len(found)} objects")
        return found[0]

    def verify_clip_caption(self, clip: ClipTruth, text: str) -> None:
        facts = self.clip_facts(clip)
        for subject, event, detail in parse_video_caption(text):
            fact = self.clip_subject(facts, subject)
            truth = {
                "move": fact["direction"] == detail,
                "appear": fact["appears"],
                "disappear": fact["disappears"],
                "turn": fact["first_color"] != fact["last_color"] and fact["last_color"] == detail,
                "still": fact["still"],
            }[event]
            if not truth:
                what = f"{event} {detail}" if detail else event
                raise Mismatch(f"'{what}' does not happen to the {fact['shape']}")

    def clip_answer(self, clip: ClipTruth, question: str) -> str:
        family, shape = parse_video_question(question)
        facts = self.clip_facts(clip)
        if family in ("appear", "disappear"):
            actors = [f for f in facts.values() if f["appears" if family == "appear" else "disappears"]]
            if len(actors) != 1:
                raise Mismatch(f"{len(actors)} objects {family}")
            return actors[0]["shape"]
        if family == "count_end":
            return str(sum(1 for state in clip.frames[-1] if state["visible"]))
        found = [f for f in facts.values() if f["shape"] == shape]
        if len(found) != 1:
            raise Mismatch(f"{len(found)} objects are {shape}s")
        fact = found[0]
        if family == "color_change":
            if fact["first_color"] == fact["last_color"]:
                raise Mismatch(f"the {shape} does not change colour")
            return fact["last_color"]
        if family == "direction":
            if fact["direction"] is None:
                raise Mismatch(f"the {shape} does not move in one direction")
            return fact["direction"]
        if family == "color":
            return fact["first_color"]
        return "yes" if fact["moved"] else "no"

    def clip_for(self, video_id: str, where: str, split: str) -> ClipTruth | None:
        clip = self.clips.get(video_id)
        if clip is None:
            self.report(where, f"video {video_id!r} is not a clip of the world")
        elif clip.split != split:
            self.report(where, f"video {video_id!r} is from split {clip.split!r}, expected {split!r}")
        return clip

    def check_video_datasets(self) -> None:
        for split in self.splits:
            role = f"video_retrieval_{split}"
            keys = self.manifest["keys"][role]
            if split == "train":
                items = [(p.index, p.image, [p.caption]) for p in readers.read_karpathy_train(
                    self.path(role), keys["index_key"], keys["vision_key"], keys["text_key"])]
            else:
                items = [(e.index, e.image, e.captions) for e in readers.read_karpathy_eval(
                    self.path(role), keys["vision_key"], keys["text_key"], keys["index_key"])]
            for k, (video_id, video, captions) in enumerate(items):
                where = f"{self.files[role]}[{k}]"
                clip = self.clip_for(video_id, where, split)
                if clip is None:
                    continue
                if video != clip.file_name:
                    self.report(where, f"video path {video!r} is not {clip.file_name!r}")
                for caption in captions:
                    try:
                        self.verify_clip_caption(clip, caption)
                    except (ParseError, Mismatch) as error:
                        self.report(where, f"{caption!r}: {error}")
        for name, split in (("pretrain", "train"), ("pretrain_val", "val")):
            keys = self.manifest["keys"][f"{name}_video_text"]
            for where, item in self.shard_records(f"{name}_video_text", readers.parse_video_text,
                                                  video_key=keys["video_key"], text_key=keys["text_key"]):
                clip = self.clip_for(str(item.video).rsplit(".", 1)[0], where, split)
                if clip is None:
                    continue
                for caption in item.texts:
                    try:
                        self.verify_clip_caption(clip, caption)
                    except (ParseError, Mismatch) as error:
                        self.report(where, f"{caption!r}: {error}")
        ans2label = readers.read_ans2label(self.path("video_qa_ans2label"))
        for split in self.splits:
            role = f"video_qa_{split}"
            for k, example in enumerate(readers.read_video_qa(self.path(role))):
                where = f"{self.files[role]}:{k + 1}"
                clip = self.clip_for(example.video_id, where, split)
                if clip is None:
                    continue
                try:
                    answer = self.clip_answer(clip, example.question)
                except (ParseError, Mismatch) as error:
                    self.report(where, f"{example.question!r}: {error}")
                    continue
                if answer != example.answer:
                    self.report(where, f"{example.question!r}: answer {example.answer!r}, clip says {answer!r}")
                if split == "train" and example.answer not in ans2label:
                    self.report(where, f"train answer {example.answer!r} missing from ans2label")

    def run(self) -> list[str]:
        steps = [
            ("manifest", self.check_manifest),
            ("scenes", self.load_scenes),
            ("clips", self.load_clips),
            ("image pixels", self.check_image_pixels if self.check_pixels else None),
            ("video files", self.check_video_files),
            ("captions", self.check_captions),
            ("multilingual", self.check_multilingual),
            ("pre-training", self.check_pretraining),
            ("vqa", self.check_vqa),
            ("nlvr2", self.check_nlvr2),
            ("refcoco+", self.check_refcoco),
            ("video datasets", self.check_video_datasets),
        ]
        for name, step in steps:
            if step is None:
                continue
            logger.info("checking %s", name)
            try:
                step()
            except (readers.DataFormatError, KeyError, FileNotFoundError) as error:
                self.report(name, f"cannot be checked: {type(error).__name__}: {error}")
        return self.problems


def check(out_dir: str | Path, check_pixels: bool = True) -> list[str]:
    """All problems found in the world at ``out_dir`` (empty when it is consistent)."""
    return WorldChecker(out_dir, check_pixels).run()
