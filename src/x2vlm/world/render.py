"""Rendering of scenes and video frames with Pillow and numpy.

Shapes are rasterised at 4x resolution and box-filtered down, so edges are anti-aliased; each
shape exactly spans its ``[x, y, w, h]`` box. Objects carry a mild brightness gradient and the
whole image gets Gaussian pixel noise, on top of a textured background, so that no single pixel
value identifies a colour or an object.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from x2vlm.world import vocabulary as vocab
from x2vlm.world.scene import Background, Box, Scene

SUPERSAMPLING = 4
JPEG_QUALITY = 92


@dataclass(frozen=True)
class DrawnObject:
    shape: str
    color: str
    box: Box
    shade: float
    gradient_degrees: int


def _star_polygon() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    # stretch so that the star spans the whole box like every other shape
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [(2 * (x - x0) / (x1 - x0) - 1, 2 * (y - y0) / (y1 - y0) - 1) for x, y in points]


_ARM = 1.0 / 3.0
#: Polygons in unit coordinates [-1, 1]^2 (y down). The circle is drawn as an ellipse.
SHAPE_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM),
              (_ARM, 1), (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
    "star": _star_polygon(),
}


@lru_cache(maxsize=256)
def shape_coverage(shape: str, width: int, height: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape filling a ``width`` x ``height`` box."""
    big_w, big_h = width * SUPERSAMPLING, height * SUPERSAMPLING
    mask = Image.new("L", (big_w, big_h), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([0, 0, big_w - 1, big_h - 1], fill=255)
    else:
        points = [((u + 1) / 2 * (big_w - 1), (v + 1) / 2 * (big_h - 1))
                  for u, v in SHAPE_POLYGONS[shape]]
        draw.polygon(points, fill=255)
    array = np.asarray(mask, dtype=np.float32) / 255.0
    coverage = array.reshape(height, SUPERSAMPLING, width, SUPERSAMPLING).mean(axis=(1, 3))
    coverage.setflags(write=False)
    return coverage


def shape_outline(shape: str, box: Box, points: int = 16) -> list[float]:
    """A polygon outline [x1, y1, x2, y2, ...] of a shape in its box (COCO segmentation)."""
    x, y, w, h = box
    if shape == "circle":
        unit = [(math.cos(2 * math.pi * k / points), math.sin(2 * math.pi * k / points))
                for k in range(points)]
    else:
        unit = SHAPE_POLYGONS[shape]
    outline = []
    for u, v in unit:
        outline.extend([round(x + (u + 1) / 2 * w, 2), round(y + (v + 1) / 2 * h, 2)])
    return outline


def render_background(background: Background, size: int) -> np.ndarray:
    """Float32 (size, size, 3) background without the pixel noise."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = math.radians(background.angle_degrees)
    projection = xs * math.cos(angle) + ys * math.sin(angle)
    if background.kind == "gradient":
        low, high = projection.min(), projection.max()
        mix = (projection - low) / max(high - low, 1e-6)
    elif background.kind == "stripes":
        mix = 0.5 + 0.5 * np.sin(2 * math.pi * projection / background.period)
    elif background.kind == "checker":
        mix = ((xs // background.period + ys // background.period) % 2).astype(np.float32)
    elif background.kind in ("blotches", "noise"):
        rng = np.random.default_rng(background.noise_seed)
        cells = max(2, size // background.period) if background.kind == "blotches" else size // 2
        grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
        mix = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR),
                         dtype=np.float32) / 255.0
    else:
        raise ValueError(f"unknown background kind {background.kind!r}")
    color_a = np.asarray(background.color_a, dtype=np.float32)
    color_b = np.asarray(background.color_b, dtype=np.float32)
    return color_a * (1.0 - mix[..., None]) + color_b * mix[..., None]


def draw_objects(canvas: np.ndarray, objects: list[DrawnObject]) -> None:
    """Composite objects onto a float canvas in list order (later objects on top)."""
    for obj in objects:
        x, y, w, h = obj.box
        coverage = shape_coverage(obj.shape, w, h)[..., None]
        vs, us = np.mgrid[-1:1:complex(0, h), -1:1:complex(0, w)].astype(np.float32)
        angle = math.radians(obj.gradient_degrees)
        gradient = 1.0 + 0.08 * (us * math.cos(angle) + vs * math.sin(angle))
        base = np.asarray(vocab.COLORS[obj.color], dtype=np.float32) * obj.shade
        fill = np.clip(base[None, None, :] * gradient[..., None], 0, 255)
        region = canvas[y:y + h, x:x + w]
        canvas[y:y + h, x:x + w] = region * (1.0 - coverage) + fill * coverage


def finish(canvas: np.ndarray, noise_sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = canvas + rng.normal(0.0, noise_sigma, canvas.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def scene_drawn_objects(scene: Scene) -> list[DrawnObject]:
    return [DrawnObject(o.shape, o.color, o.box, o.shade, o.gradient_degrees) for o in scene.objects]


def render_scene(scene: Scene) -> np.ndarray:
    """uint8 (H, W, 3) image of a scene; a pure function of the scene ground truth."""
    canvas = render_background(scene.background, scene.image_size)
    draw_objects(canvas, scene_drawn_objects(scene))
    rng = np.random.default_rng([scene.background.noise_seed, 1])
    return finish(canvas, scene.background.noise_sigma, rng)


def encode_jpeg(image: np.ndarray) -> bytes:
    """Deterministic JPEG bytes (no metadata; 4:4:4 chroma so small objects keep their colour)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0,
                                optimize=False)
    return buffer.getvalue()
