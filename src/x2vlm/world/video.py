"""Short clips of the world: objects that move, appear, disappear or change colour.

A clip is written as a real MPEG-4 Part 2 ``.mp4`` (PyAV, yuv420p); its ground truth lists every
object's state in every frame, from which captions and answers can be re-derived.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction

import av
import numpy as np

from x2vlm.world import vocabulary as vocab
from x2vlm.world.captions import pick
from x2vlm.world.language import NounPhrase, english_noun_phrase, join_list, sentence_case
from x2vlm.world.render import DrawnObject, draw_objects, finish, render_background
from x2vlm.world.scene import Background, Box, occlusion_ok, sample_background

VIDEO_CODEC = "mpeg4"  # FFmpeg's own MPEG-4 Part 2 encoder: libx264 gave different bytes from run to run for identical frames
VIDEO_BIT_RATE = 2_000_000  # bits per second: near-lossless for 64-px clips, so colours and shapes survive


@dataclass(frozen=True)
class ClipObject:
    id: int
    shape: str
    size: str
    event: str
    color: str  # colour when first visible
    new_color: str | None  # colour from ``event_frame`` on (change_color)
    direction: str | None  # move
    event_frame: int | None  # appear / disappear / change_color
    start: tuple[int, int]  # top-left corner in the first frame
    end: tuple[int, int]  # top-left corner in the last frame
    side: int
    shade: float
    gradient_degrees: int

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "shape": self.shape,
            "size": self.size,
            "event": self.event,
            "color": self.color,
            "new_color": self.new_color,
            "direction": self.direction,
            "event_frame": self.event_frame,
            "start": list(self.start),
            "end": list(self.end),
            "side": self.side,
            "shade": self.shade,
            "gradient_degrees": self.gradient_degrees,
        }

    @classmethod
    def from_json(cls, data: dict) -> "ClipObject":
        return cls(
            id=data["id"], shape=data["shape"], size=data["size"], event=data["event"],
            color=data["color"], new_color=data["new_color"], direction=data["direction"],
            event_frame=data["event_frame"], start=tuple(data["start"]), end=tuple(data["end"]),
            side=data["side"], shade=data["shade"], gradient_degrees=data["gradient_degrees"],
        )

    def state(self, frame: int, num_frames: int) -> tuple[bool, str, Box]:
        """(visible, colour, box) in a frame."""
        visible = True
        if self.event == "appear":
            visible = frame >= self.event_frame
        elif self.event == "disappear":
            visible = frame < self.event_frame
        color = self.color
        if self.event == "change_color" and frame >= self.event_frame:
            color = self.new_color
        progress = frame / (num_frames - 1)
        x = round(self.start[0] + (self.end[0] - self.start[0]) * progress)
        y = round(self.start[1] + (self.end[1] - self.start[1]) * progress)
        return visible, color, (x, y, self.side, self.side)


@dataclass(frozen=True)
class Clip:
    video_id: str
    split: str
    file_name: str  # relative to the video root
    frame_size: int
    num_frames: int
    fps: int
    background: Background
    objects: tuple[ClipObject, ...]

    def frame_objects(self, frame: int) -> list[tuple[ClipObject, str, Box]]:
        """Visible objects of a frame in drawing order, with their colour and box."""
        found = []
        for obj in self.objects:
            visible, color, box = obj.state(frame, self.num_frames)
            if visible:
                found.append((obj, color, box))
        return found

    def to_json(self) -> dict:
        frames = []
        for t in range(self.num_frames):
            states = []
            for obj in self.objects:
                visible, color, box = obj.state(t, self.num_frames)
                states.append({"id": obj.id, "visible": visible, "color": color, "box": list(box)})
            frames.append({"index": t, "objects": states})
        return {
            "video_id": self.video_id,
            "split": self.split,
            "file_name": self.file_name,
            "width": self.frame_size,
            "height": self.frame_size,
            "num_frames": self.num_frames,
            "fps": self.fps,
            "background": self.background.to_json(),
            "objects": [o.to_json() for o in self.objects],
            "frames": frames,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Clip":
        return cls(
            video_id=data["video_id"], split=data["split"], file_name=data["file_name"],
            frame_size=data["width"], num_frames=data["num_frames"], fps=data["fps"],
            background=Background.from_json(data["background"]),
            objects=tuple(ClipObject.from_json(o) for o in data["objects"]),
        )


# --- sampling ---------------------------------------------------------------------------------


def clip_colors(rng: np.random.Generator, shape: str, event: str, novel: bool,
                forced_color: str | None) -> tuple[str, str | None]:
    while True:
        color = forced_color or str(rng.choice(vocab.COLOR_NAMES))
        new_color = None
        if event == "change_color":
            new_color = str(rng.choice([c for c in vocab.COLOR_NAMES if c != color]))
        colors = [color] + ([new_color] if new_color else [])
        if novel or not any(vocab.is_held_out(c, shape) for c in colors):
            return color, new_color


def sample_motion(rng: np.random.Generator, event: str, side: int, frame_size: int,
                  min_motion: int) -> tuple[str | None, tuple[int, int], tuple[int, int]]:
    if event != "move":
        corner = (int(rng.integers(0, frame_size - side + 1)), int(rng.integers(0, frame_size - side + 1)))
        return None, corner, corner
    direction = str(rng.choice(vocab.DIRECTIONS))
    distance = int(rng.integers(min_motion, frame_size - side + 1))
    along_start = int(rng.integers(0, frame_size - side - distance + 1))
    across = int(rng.integers(0, frame_size - side + 1))
    if direction in ("right", "down"):
        first, last = along_start, along_start + distance
    else:
        first, last = along_start + distance, along_start
    if direction in ("left", "right"):
        return direction, (first, across), (last, across)
    return direction, (across, first), (across, last)


def clip_occlusion_ok(objects: list[ClipObject], num_frames: int) -> bool:
    for t in range(num_frames):
        boxes = [obj.state(t, num_frames)[2] for obj in objects if obj.state(t, num_frames)[0]]
        if not occlusion_ok(boxes):
            return False
    return True


def sample_clip(rng: np.random.Generator, video_id: str, split: str, file_name: str,
                frame_size: int) -> Clip:
    novel = split == vocab.NOVEL_SPLIT
    num_frames = int(rng.integers(vocab.MIN_FRAMES, vocab.MAX_FRAMES + 1))
    min_motion = round(vocab.MIN_MOTION_FRACTION * frame_size)
    count = int(rng.integers(1, 4))
    forced_pair = vocab.HELD_OUT_PAIRS[int(rng.integers(len(vocab.HELD_OUT_PAIRS)))] if novel else None
    while True:
        shapes = [str(s) for s in rng.choice(vocab.SHAPES, size=count, replace=False)]
        if forced_pair is not None:
            shapes = [forced_pair[1]] + [s for s in shapes if s != forced_pair[1]][:count - 1]
        events = [str(rng.choice(vocab.EVENTS)) for _ in shapes]
        if all(e == "static" for e in events):
            events[int(rng.integers(len(events)))] = str(rng.choice(vocab.EVENTS[1:]))
        objects = []
        for index, (shape, event) in enumerate(zip(shapes, events)):
            size = str(rng.choice(vocab.SIZES))
            side = vocab.object_size_px(size, frame_size, video=True)
            forced_color = forced_pair[0] if (forced_pair is not None and index == 0) else None
            color, new_color = clip_colors(rng, shape, event, novel, forced_color)
            direction, start, end = sample_motion(rng, event, side, frame_size, min_motion)
            event_frame = int(rng.integers(2, num_frames - 1)) if event in (
                "appear", "disappear", "change_color") else None
            objects.append(ClipObject(
                id=index, shape=shape, size=size, event=event, color=color, new_color=new_color,
                direction=direction, event_frame=event_frame, start=start, end=end, side=side,
                shade=round(float(rng.uniform(0.9, 1.1)), 3),
                gradient_degrees=int(rng.integers(0, 360)),
            ))
        order = rng.permutation(len(objects))
        objects = [objects[i] for i in order]
        objects = [replace(o, id=k) for k, o in enumerate(objects)]
        if clip_occlusion_ok(objects, num_frames):
            break
    background = sample_background(rng, frame_size)
    return Clip(video_id=video_id, split=split, file_name=file_name, frame_size=frame_size,
                num_frames=num_frames, fps=vocab.VIDEO_FPS, background=background,
                objects=tuple(objects))


# --- rendering and encoding --------------------------------------------------------------------


def render_clip(clip: Clip) -> np.ndarray:
    """uint8 (T, H, W, 3) frames: one background, per-frame objects and pixel noise."""
    background = render_background(clip.background, clip.frame_size)
    frames = []
    for t in range(clip.num_frames):
        canvas = background.copy()
        draw_objects(canvas, [DrawnObject(obj.shape, color, box, obj.shade, obj.gradient_degrees)
                              for obj, color, box in clip.frame_objects(t)])
        rng = np.random.default_rng([clip.background.noise_seed, 2, t])
        frames.append(finish(canvas, clip.background.noise_sigma / 2, rng))
    return np.stack(frames)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 RGB frame as the (3H/2, W) planar YUV 4:2:0 array the encoder takes: BT.601
    limited range (what decoders assume for untagged SD video), chroma averaged over 2 x 2 pixels.

    Done here rather than by the encoder's own conversion (libswscale), whose output was seen to vary
    from run to run for identical frames, which made the videos' bytes non-deterministic."""
    height, width = frame.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sides, got {width}x{height}")
    rgb = frame.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    blue = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    red = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255

    def quarter(plane: np.ndarray) -> np.ndarray:
        return plane.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))

    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8).reshape(-1) for p in (luma, quarter(blue), quarter(red))]
    return np.concatenate(planes).reshape(height * 3 // 2, width)


def write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    """MPEG-4 Part 2 / yuv420p mp4 with deterministic bytes (our own colour conversion, FFmpeg's
    single-threaded mpeg4 encoder, bit-exact muxer)."""
    with av.open(path, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(VIDEO_CODEC, rate=fps)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.bit_rate = VIDEO_BIT_RATE
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")
            picture.pts, picture.time_base = index, Fraction(1, fps)  # explicit timestamps: rate control reads them
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _open_single_threaded(path: str):
    container = av.open(path)
    stream = container.streams.video[0]
    stream.thread_type = "NONE"  # threads cost more than they save on tiny clips
    stream.codec_context.thread_count = 1
    return container, stream


def decode_mp4(path: str) -> np.ndarray:
    """All frames of a video file as uint8 (T, H, W, 3)."""
    container, stream = _open_single_threaded(path)
    with container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no decodable video frames")
    return np.stack(frames)


def count_decoded_frames(path: str) -> int:
    """Number of frames the decoder gives back (without converting them)."""
    container, stream = _open_single_threaded(path)
    with container:
        return sum(1 for _ in container.decode(stream))


# --- captions and questions ---------------------------------------------------------------------

DIRECTION_PHRASES: dict[str, str] = {
    "left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down",
}


def clip_subject(obj: ClipObject, with_size: bool) -> NounPhrase:
    return NounPhrase(shape=obj.shape, color=obj.color, size=obj.size if with_size else None)


def event_clause(obj: ClipObject, with_size: bool) -> str:
    subject = english_noun_phrase(clip_subject(obj, with_size))
    if obj.event == "move":
        return f"{subject} {DIRECTION_PHRASES[obj.direction]}"
    if obj.event == "appear":
        return f"{subject} appears"
    if obj.event == "disappear":
        return f"{subject} disappears"
    if obj.event == "change_color":
        return f"{subject} turns {obj.new_color}"
    return f"{subject} stays still"


def clip_captions(clip: Clip, rng: np.random.Generator) -> list[str]:
    """Three distinct captions: every object's event, only the events, and a contrast."""
    objects = list(clip.objects)
    rng.shuffle(objects)
    events = [o for o in objects if o.event != "static"]
    static = [o for o in objects if o.event == "static"]
    captions = [
        sentence_case(join_list([event_clause(o, False) for o in objects], "and")),
        sentence_case("in this video, " + join_list([event_clause(o, True) for o in events], "and")),
    ]
    if static:
        captions.append(sentence_case(f"{event_clause(events[0], False)} while "
                                      f"{event_clause(static[0], False)}"))
    else:
        captions.append(sentence_case("a clip where " + join_list(
            [event_clause(o, rng.random() < 0.5) for o in reversed(events)], "and")))
    distinct = []
    for caption in captions:
        if caption not in distinct:
            distinct.append(caption)
    return distinct


@dataclass(frozen=True)
class VideoQuestion:
    family: str
    text: str
    answer: str


VIDEO_QUESTION_FAMILIES: tuple[str, ...] = (
    "color_change", "direction", "appear", "disappear", "color", "count_end", "moves",
)


def clip_questions_by_family(clip: Clip) -> dict[str, list[VideoQuestion]]:
    found: dict[str, list[VideoQuestion]] = {f: [] for f in VIDEO_QUESTION_FAMILIES}
    for obj in clip.objects:
        shape = obj.shape
        if obj.event == "change_color":
            found["color_change"].append(VideoQuestion(
                "color_change", f"what color does the {shape} turn?", obj.new_color))
        if obj.event == "move":
            found["direction"].append(VideoQuestion(
                "direction", f"which way does the {shape} move?", obj.direction))
        found["color"].append(VideoQuestion(
            "color", f"what color is the {shape} when it is first seen?", obj.color))
        if any(o.event == "move" for o in clip.objects):  # so that both answers are on offer
            found["moves"].append(VideoQuestion(
                "moves", f"does the {shape} move?", "yes" if obj.event == "move" else "no"))
    for event in ("appear", "disappear"):
        actors = [o for o in clip.objects if o.event == event]
        if len(actors) == 1:
            found[event].append(VideoQuestion(event, f"what {event}s in the video?", actors[0].shape))
    visible_at_end = len(clip.frame_objects(clip.num_frames - 1))
    found["count_end"].append(VideoQuestion(
        "count_end", "how many objects are visible at the end?", str(visible_at_end)))
    return found


def clip_questions(clip: Clip, per_clip: int, family_counts: Counter, balancer,
                   rng: np.random.Generator) -> list[VideoQuestion]:
    """``per_clip`` questions from different families, preferring the families asked least so
    far, each answer chosen by the balancer; a family whose answers on offer are already too
    common is skipped for this clip."""
    by_family = clip_questions_by_family(clip)
    available = [f for f in VIDEO_QUESTION_FAMILIES
                 if by_family[f] and balancer.admits("video:" + f, by_family[f])]
    chosen = []
    for _ in range(min(per_clip, len(available))):
        lowest = min(family_counts[f] for f in available)
        family = pick(rng, [f for f in available if family_counts[f] == lowest])
        available.remove(family)
        family_counts[family] += 1
        chosen.append(balancer.choose("video:" + family, by_family[family], rng))
    return chosen
