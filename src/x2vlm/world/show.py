"""``show``: a PNG of one item of a generated world with its boxes and text, for a person."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from x2vlm.data import readers
from x2vlm.world.video import decode_mp4

SCALE = 4
TEXT_WIDTH = 64  # characters per line
BOX_COLORS = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0), (255, 128, 0))

ITEM_ID_HELP = (
    "an image id ('123' or 'image:123'), 'vqa:<question_id>', 'ref:<ref_id>', "
    "'nlvr2:<split>:<index>' or a video id ('video7' or 'video:video7')"
)


class World:
    """Lazy access to a generated world's manifest, ground truth and dataset files."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        self.manifest = readers.read_json(self.root / "manifest.json")
        self.files = self.manifest["files"]

    def path(self, role: str) -> Path:
        return self.root / self.files[role]

    def scenes(self) -> dict[int, dict]:
        found = {}
        for split in self.manifest["splits"]:
            for scene in readers.read_json(self.path(f"scenes_{split}"))["scenes"]:
                found[scene["image_id"]] = scene
        return found

    def scene_by_file(self, file_name: str) -> dict:
        for scene in self.scenes().values():
            if scene["file_name"] == file_name:
                return scene
        raise KeyError(f"no scene with image {file_name!r}")

    def clip(self, video_id: str) -> dict:
        for split in self.manifest["splits"]:
            for clip in readers.read_json(self.path(f"clips_{split}"))["clips"]:
                if clip["video_id"] == video_id:
                    return clip
        raise KeyError(f"no clip {video_id!r}")

    def image(self, file_name: str) -> Image.Image:
        return Image.open(self.root / self.manifest["image_root"] / file_name).convert("RGB")


def font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def draw_boxes(image: Image.Image, boxes: list[tuple[tuple, str]], scale: int) -> Image.Image:
    """Upscale (nearest) and outline each box with its label."""
    big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for k, (box, label) in enumerate(boxes):
        x, y, w, h = (v * scale for v in box)
        color = BOX_COLORS[k % len(BOX_COLORS)]
        draw.rectangle([x, y, x + w - 1, y + h - 1], outline=color, width=2)
        if label:
            draw.text((x + 3, y + 2), label, fill=color, font=font(), stroke_width=1, stroke_fill=(0, 0, 0))
    return big


def with_text(picture: Image.Image, lines: list[str]) -> Image.Image:
    wrapped = []
    for line in lines:
        wrapped.extend(textwrap.wrap(line, TEXT_WIDTH) or [""])
    line_height = 14
    canvas = Image.new("RGB", (max(picture.width, 8 * TEXT_WIDTH), picture.height + 8 + line_height * len(wrapped)),
                       (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(wrapped):
        draw.text((4, picture.height + 4 + k * line_height), line, fill=(0, 0, 0), font=font())
    return canvas


def object_label(obj: dict) -> str:
    return f"{obj['id']}: {obj['size']} {obj['color']} {obj['shape']}"


def show_image(world: World, image_id: int) -> Image.Image:
    scene = world.scenes()[image_id]
    picture = draw_boxes(world.image(scene["file_name"]),
                         [(o["box"], str(o["id"])) for o in scene["objects"]], SCALE)
    captions = {}
    for split in world.manifest["splits"]:
        role = f"karpathy_{split}"
        if split == scene["split"] and split != "train":
            for item in readers.read_karpathy_eval(world.path(role)):
                captions[item.image] = item.captions
        elif split == scene["split"]:
            for pair in readers.read_karpathy_train(world.path(role)):
                captions.setdefault(pair.image, []).append(pair.caption)
    lines = [f"image {image_id} ({scene['split']}) {scene['file_name']}",
             "objects: " + "; ".join(object_label(o) for o in scene["objects"]),
             "relations: " + "; ".join(f"{r['subject']} {r['relation']} {r['object']}"
                                       for r in scene["relations"]),
             "captions:"] + [f"  {c}" for c in captions.get(scene["file_name"], [])]
    return with_text(picture, lines)


def show_vqa(world: World, question_id: int) -> Image.Image:
    for split in world.manifest["splits"]:
        for example in readers.read_vqa_json(world.path(f"vqa_{split}")):
            if example.question_id == question_id:
                scene = world.scene_by_file(example.image)
                picture = draw_boxes(world.image(example.image),
                                     [(o["box"], str(o["id"])) for o in scene["objects"]], SCALE)
                return with_text(picture, [f"VQA {question_id} ({split}) {example.image}",
                                           f"Q: {example.question}",
                                           f"A: {example.answers[0]}  (all answers: {', '.join(sorted(set(example.answers)))})",
                                           "objects: " + "; ".join(object_label(o) for o in scene["objects"])])
    raise KeyError(f"no VQA question {question_id}")


def show_ref(world: World, ref_id: int) -> Image.Image:
    refer = readers.read_refer(world.path("refcoco_refs"), world.path("refcoco_instances"))
    if ref_id not in refer.refs:
        raise KeyError(f"no ref {ref_id}")
    ref = refer.refs[ref_id]
    file_name = refer.images[ref.image_id].file_name
    picture = draw_boxes(world.image(file_name), [(refer.ref_box(ref_id), "ref")], SCALE)
    return with_text(picture, [f"ref {ref_id} ({ref.split}) {file_name}, box {list(refer.ref_box(ref_id))}"]
                     + [f"  {s}" for s in ref.sentences])


def show_nlvr2(world: World, split: str, index: int) -> Image.Image:
    example = readers.read_nlvr2(world.path(f"nlvr2_{split}"))[index]
    pictures = []
    for file_name in example.images:
        scene = world.scene_by_file(file_name)
        pictures.append(draw_boxes(world.image(file_name),
                                   [(o["box"], str(o["id"])) for o in scene["objects"]], SCALE))
    gap = 8
    pair = Image.new("RGB", (pictures[0].width + gap + pictures[1].width, pictures[0].height), (255, 255, 255))
    pair.paste(pictures[0], (0, 0))
    pair.paste(pictures[1], (pictures[0].width + gap, 0))
    return with_text(pair, [f"NLVR2 {split}[{index}]: {example.images[0]} | {example.images[1]}",
                            f"{example.sentence}  ->  {example.label}"])


def show_video(world: World, video_id: str, frames_shown: int = 8) -> Image.Image:
    clip = world.clip(video_id)
    frames = decode_mp4(str(world.root / world.manifest["video_root"] / clip["file_name"]))
    picks = sorted({round(k * (len(frames) - 1) / max(1, frames_shown - 1)) for k in range(frames_shown)})
    tiles = []
    for t in picks:
        states = [s for s in clip["frames"][t]["objects"] if s["visible"]]
        tile = draw_boxes(Image.fromarray(np.asarray(frames[t])), [(s["box"], str(s["id"])) for s in states], 3)
        ImageDraw.Draw(tile).text((3, tile.height - 14), f"t={t}", fill=(255, 255, 255), font=font(),
                                  stroke_width=1, stroke_fill=(0, 0, 0))
        tiles.append(tile)
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), tiles[0].height), (255, 255, 255))
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + 4
    lines = [f"{video_id} ({clip['split']}), {clip['num_frames']} frames",
             "objects: " + "; ".join(
                 f"{o['id']}: {o['size']} {o['shape']} {o['event']}"
                 + (f" {o['direction']}" if o["direction"] else "")
                 + (f" {o['color']}->{o['new_color']}" if o["new_color"] else f" {o['color']}")
                 for o in clip["objects"])]
    split = clip["split"]
    role = f"video_retrieval_{split}"
    keys = world.manifest["keys"][role]
    if split == "train":
        captions = [p.caption for p in readers.read_karpathy_train(world.path(role), keys["index_key"],
                                                                   keys["vision_key"], keys["text_key"])
                    if p.index == video_id]
    else:
        captions = next((e.captions for e in readers.read_karpathy_eval(world.path(role), keys["vision_key"],
                                                                       keys["text_key"], keys["index_key"])
                         if e.index == video_id), [])
    lines += ["captions:"] + [f"  {c}" for c in captions]
    lines += ["questions:"] + [f"  {q.question} -> {q.answer}"
                               for q in readers.read_video_qa(world.path(f"video_qa_{split}"))
                               if q.video_id == video_id]
    return with_text(strip, lines)


def render_item(out_dir: str | Path, item_id: str) -> Image.Image:
    world = World(out_dir)
    item = item_id.strip()
    kind, _, rest = item.partition(":")
    if not rest:
        kind, rest = ("video", item) if item.startswith("video") else ("image", item)
    try:
        if kind == "image":
            return show_image(world, int(rest))
        if kind == "vqa":
            return show_vqa(world, int(rest))
        if kind == "ref":
            return show_ref(world, int(rest))
        if kind == "nlvr2":
            split, _, index = rest.rpartition(":")
            return show_nlvr2(world, split, int(index))
        if kind == "video":
            return show_video(world, rest)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"cannot show {item_id!r}: {error}") from None
    raise ValueError(f"unknown item id {item_id!r}; use {ITEM_ID_HELP}")


def show(out_dir: str | Path, item_id: str, out_png: str | Path) -> Path:
    """Write a PNG of one item (image, VQA question, ref, NLVR2 pair or video) with its boxes
    and text; returns the path written."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    render_item(out_dir, item_id).save(out_png, format="PNG")
    return out_png
