"""Image, clip and box transforms shared by pre-training and every fine-tuning task (spec §3.3.4-§3.3.6).

Only Pillow, numpy and torch are used. The behaviour follows the official release:

* ``RandomResizedCrop`` with torchvision's sampling algorithm (10 tries, then a centre crop with the
  aspect ratio clamped to ``ratio``), bicubic resampling;
* ``RandomAugment(N=2, M=7)``: two ops drawn uniformly with replacement, each applied with
  probability 0.5 at magnitude 7/10 (factor 1.36, shear +-0.21, translate +-7 px, rotate +-21 deg,
  fill (128, 128, 128)); the official OpenCV ops are re-expressed with ``Image.transform`` so that a
  signed parameter means the same geometric operation;
* test transform = bicubic resize to ``res x res`` (aspect ratio not kept);
* CLIP normalisation statistics (the released checkpoints were trained with them even though the
  backbone is BEiT-v2, spec §6.12; they are parameters here so another backbone can pass its own).

Deliberate differences from the official code (its defects, spec §6):

* Randomness is explicit: every random function takes a ``numpy.random.Generator``; nothing reads
  global RNG state, so a resumed run that restores the generator reproduces its samples.
* Sampling and application are split (``sample_augment_params`` / ``apply_augment``), so a video clip
  draws one crop / flip / RandAugment and applies it to all of its frames (§6.8).
* Caption-aware flipping matches whole words (``bright``, ``copyright``, ``cleft`` do not count,
  §6.11), and the pre-training transform can be made caption-aware by passing the sample's texts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR

# Normalisation statistics used by every released X²-VLM checkpoint (OpenAI CLIP's).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

# RandomResizedCrop defaults (torchvision's).
DEFAULT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

# RandAugment op lists (spec §3.3.6).
RANDAUG_OPS: tuple[str, ...] = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
PHOTOMETRIC_OPS: tuple[str, ...] = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness")
RANDAUG_FILL: tuple[int, int, int] = (128, 128, 128)
_MAX_LEVEL = 10.0
_SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})


# --------------------------------------------------------------------------------------------------
# Basic conversions
# --------------------------------------------------------------------------------------------------


def as_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` in RGB mode (palette, alpha, grey and CMYK images are converted)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def to_tensor_normalized(
    img: Image.Image,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """``ToTensor`` + ``Normalize``: an RGB image -> ``(3, H, W)`` float32 tensor ``(x/255 - mean) / std``."""
    arr = np.asarray(as_rgb(img), dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def resize_for_eval(img: Image.Image, res: int) -> Image.Image:
    """The official test transform's resize: bicubic to ``(res, res)``, aspect ratio not kept."""
    img = as_rgb(img)
    if img.size == (res, res):
        return img
    return img.resize((res, res), BICUBIC)


# --------------------------------------------------------------------------------------------------
# RandomResizedCrop
# --------------------------------------------------------------------------------------------------


def sample_resized_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> tuple[int, int, int, int]:
    """Draw a RandomResizedCrop window ``(left, top, crop_w, crop_h)`` for a ``width x height`` image.

    Same algorithm as torchvision: up to 10 tries of an area fraction ``U(scale)`` and a log-uniform
    aspect ratio in ``ratio``; a try is accepted if the window fits, and its position is uniform.
    If all tries fail, a centre crop of the whole image with its aspect ratio clamped to ``ratio``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: centre crop.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    img: Image.Image,
    res: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> Image.Image:
    """torchvision-style ``RandomResizedCrop(res, scale, ratio, bicubic)`` driven by ``rng``."""
    left, top, w, h = sample_resized_crop(img.width, img.height, scale, rng, ratio)
    return as_rgb(img).crop((left, top, left + w, top + h)).resize((res, res), BICUBIC)


# --------------------------------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugOp:
    """One RandAugment op that *will* be applied.

    ``value`` is the op's signed parameter: the enhancement factor (Brightness, Sharpness), the
    shear coefficient, the translation in pixels or the rotation in degrees; 0.0 for ops without a
    parameter (Identity, AutoContrast, Equalize).
    """

    name: str
    value: float = 0.0


def _op_value(name: str, magnitude: float, negative: bool) -> float:
    level = magnitude / _MAX_LEVEL
    if name in ("Brightness", "Sharpness"):
        return 0.1 + 1.8 * level  # 1.36 at M=7, never signed
    if name in ("ShearX", "ShearY"):
        value = 0.3 * level  # 0.21
    elif name in ("TranslateX", "TranslateY"):
        value = 10.0 * level  # translate_const 10 -> 7 px
    elif name == "Rotate":
        value = 30.0 * level  # 21 degrees
    else:
        return 0.0
    return -value if negative else value


@dataclass(frozen=True)
class RandAugment:
    """``RandomAugment(N, M)`` of the official release, with explicit randomness.

    ``sample(rng)`` draws ``num_ops`` op names uniformly with replacement from ``ops``; each is kept
    with probability ``prob`` and, for geometric ops, gets a random sign. The result is a tuple of
    ``AugOp`` to give to ``apply_randaugment`` (as often as needed: all frames of a clip).
    """

    ops: tuple[str, ...] = RANDAUG_OPS
    num_ops: int = 2
    magnitude: float = 7.0
    prob: float = 0.5

    def __post_init__(self) -> None:
        unknown = [op for op in self.ops if op not in RANDAUG_OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {list(RANDAUG_OPS)}")

    def sample(self, rng: np.random.Generator) -> tuple[AugOp, ...]:
        """Draw the ops to apply (three draws per slot: op, keep coin, sign coin)."""
        if not self.ops:
            return ()
        chosen = []
        for _ in range(self.num_ops):
            name = self.ops[int(rng.integers(len(self.ops)))]
            keep = rng.random() < self.prob
            negative = rng.random() < 0.5
            if keep:
                chosen.append(AugOp(name, _op_value(name, self.magnitude, negative)))
        return tuple(chosen)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Sample and apply in one go."""
        return apply_randaugment(img, self.sample(rng))


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    # ``coeffs`` map *output* pixel coordinates to input coordinates (PIL's convention).
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=BILINEAR, fillcolor=RANDAUG_FILL)


def apply_aug_op(img: Image.Image, op: AugOp) -> Image.Image:
    """Apply one RandAugment op to an RGB image.

    Geometry follows the official OpenCV code: shears act about the top-left corner
    (``ShearX``: output ``(x, y)`` takes input ``(x - v*y, y)``), translations move content by
    ``-v`` pixels (output ``(x, y)`` takes input ``(x + v, y)``), rotation is counter-clockwise by
    ``v`` degrees about the image centre; uncovered pixels get ``RANDAUG_FILL``; bilinear sampling.
    """
    img = as_rgb(img)
    name, v = op.name, op.value
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(v)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(v)
    if name == "ShearX":
        return _affine(img, (1.0, -v, 0.0, 0.0, 1.0, 0.0))
    if name == "ShearY":
        return _affine(img, (1.0, 0.0, 0.0, -v, 1.0, 0.0))
    if name == "TranslateX":
        return _affine(img, (1.0, 0.0, v, 0.0, 1.0, 0.0))
    if name == "TranslateY":
        return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, v))
    if name == "Rotate":
        return img.rotate(v, resample=BILINEAR, fillcolor=RANDAUG_FILL)
    raise ValueError(f"unknown RandAugment op {name!r}")


def apply_randaugment(img: Image.Image, ops: Iterable[AugOp]) -> Image.Image:
    """Apply the sampled ops in order."""
    img = as_rgb(img)
    for op in ops:
        img = apply_aug_op(img, op)
    return img


# --------------------------------------------------------------------------------------------------
# Caption-aware horizontal flip
# --------------------------------------------------------------------------------------------------

# Whole words only; the directional derived forms count too (leftmost, right-hand is "right" + "-hand").
_LEFT_RIGHT_RE = re.compile(r"\b(left|right)(most|ward|wards|hand|handed)?\b", re.IGNORECASE)


def _iter_texts(texts: str | Iterable[str] | None) -> Iterable[str]:
    if texts is None:
        return ()
    if isinstance(texts, str):
        return (texts,)
    return (t for t in texts if t)


def mentions_left_or_right(texts: str | Iterable[str] | None) -> bool:
    """True if any text contains the *word* ``left`` or ``right`` (or leftmost/rightward/...).

    Unlike the official substring test, ``bright``, ``copyright``, ``cleft``, ``leftover`` do not count.
    """
    return any(_LEFT_RIGHT_RE.search(t) for t in _iter_texts(texts))


def swap_left_right(text: str) -> str:
    """Swap the words ``left`` and ``right`` (and derived forms), keeping capitalisation.

    For datasets that prefer to flip a mirrored image *and* its text instead of not flipping.
    """

    def repl(m: re.Match[str]) -> str:
        word, suffix = m.group(1), m.group(2) or ""
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            new = new.upper()
        elif word[0].isupper():
            new = new.capitalize()
        return new + suffix

    return _LEFT_RIGHT_RE.sub(repl, text)


def hflip_box(box_xywh: Sequence[float], image_width: float) -> tuple[float, float, float, float]:
    """Mirror an ``(x, y, w, h)`` box horizontally in an image of width ``image_width``."""
    x, y, w, h = (float(v) for v in box_xywh)
    return image_width - x - w, y, w, h


# --------------------------------------------------------------------------------------------------
# Whole-view augmentation parameters (crop + flip + RandAugment), drawn once, applied many times
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentParams:
    """Everything random about one augmented view, so it can be re-applied to every frame of a clip.

    ``crop`` is ``(left, top, width, height)`` in pixels of the source image; ``res`` the output side.
    """

    crop: tuple[int, int, int, int]
    flip: bool
    ops: tuple[AugOp, ...]
    res: int


def sample_augment_params(
    rng: np.random.Generator,
    image_size: tuple[int, int],
    res: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = DEFAULT_RATIO,
    hflip: bool = True,
    randaug: RandAugment | None = RandAugment(),
) -> AugmentParams:
    """Draw crop, flip and RandAugment ops for an image of ``image_size = (width, height)``.

    Draw order: crop, flip coin (always drawn, so the stream does not depend on ``hflip``), ops.
    """
    width, height = image_size
    crop = sample_resized_crop(width, height, scale, rng, ratio)
    flip = bool(rng.random() < 0.5) and hflip
    ops = randaug.sample(rng) if randaug is not None else ()
    return AugmentParams(crop=crop, flip=flip, ops=ops, res=res)


def apply_augment(img: Image.Image, params: AugmentParams) -> Image.Image:
    """Crop + bicubic resize, flip, RandAugment — exactly as drawn in ``params``."""
    left, top, w, h = params.crop
    if left < 0 or top < 0 or left + w > img.width or top + h > img.height:
        raise ValueError(f"crop {params.crop} does not fit a {img.width}x{img.height} image")
    # Crop first (as torchvision does): the bicubic filter must not see pixels outside the window.
    out = as_rgb(img).crop((left, top, left + w, top + h)).resize((params.res, params.res), BICUBIC)
    if params.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return apply_randaugment(out, params.ops)


def _check_clip(frames: Sequence[Image.Image]) -> tuple[int, int]:
    if len(frames) == 0:
        raise ValueError("a clip needs at least one frame")
    size = frames[0].size
    for i, f in enumerate(frames):
        if f.size != size:
            raise ValueError(f"frame {i} has size {f.size}, frame 0 has {size}; a clip needs equal sizes")
    return size


class _RandomViewTransform:
    """Shared behaviour of the training pipelines (the dataclasses below hold the settings)."""

    res: int
    scale: tuple[float, float]
    hflip: bool
    randaug: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def sample_params(
        self, image_size: tuple[int, int], rng: np.random.Generator, texts: str | Iterable[str] | None = None
    ) -> AugmentParams:
        """Draw one view's parameters; flipping is disabled if ``texts`` mention left/right."""
        allow_flip = self.hflip and not mentions_left_or_right(texts)
        return sample_augment_params(
            rng,
            image_size,
            self.res,
            scale=self.scale,
            hflip=allow_flip,
            randaug=RandAugment() if self.randaug else None,
        )

    def apply(self, img: Image.Image, params: AugmentParams) -> torch.Tensor:
        """Apply drawn parameters and normalise: ``(3, res, res)`` float32."""
        return to_tensor_normalized(apply_augment(img, params), self.mean, self.std)

    def __call__(
        self, img: Image.Image, rng: np.random.Generator, texts: str | Iterable[str] | None = None
    ) -> torch.Tensor:
        """Augment one image: ``(3, res, res)`` float32."""
        return self.apply(img, self.sample_params(img.size, rng, texts))

    def clip(
        self,
        frames: Sequence[Image.Image],
        rng: np.random.Generator,
        texts: str | Iterable[str] | None = None,
    ) -> torch.Tensor:
        """Augment a clip with ONE set of parameters for all frames: ``(F, 3, res, res)`` float32."""
        params = self.sample_params(_check_clip(frames), rng, texts)
        return torch.stack([self.apply(f, params) for f in frames])


@dataclass(frozen=True)
class PretrainImageTransform(_RandomViewTransform):
    """Pre-training image/frame transform: RandomResizedCrop(scale 0.2-1) + flip + RandAugment(2, 7).

    Call ``t(img, rng)`` -> ``(3, res, res)``; ``t.clip(frames, rng)`` -> ``(F, 3, res, res)`` with one
    crop/flip/RandAugment for the whole clip. Pass ``texts=`` (the sample's captions) to make the flip
    caption-aware; the official pre-training transform flips unconditionally (spec §6.11).
    """

    res: int
    scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    randaug: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class FinetuneTrainTransform(_RandomViewTransform):
    """Fine-tuning train transform: RandomResizedCrop(scale 0.5-1) [+ flip] + RandAugment(2, 7).

    ``hflip`` must be given: ``True`` is the official ``train_transform``; ``False`` is
    ``train_transform_wohflip`` for tasks whose dataset decides the flip itself (VQA, video QA), which
    can also pass ``texts=`` here with ``hflip=True`` to get a caption-aware flip in one place.
    """

    res: int
    scale: tuple[float, float] = (0.5, 1.0)
    randaug: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    hflip: bool = field(kw_only=True)


@dataclass(frozen=True)
class EvalTransform:
    """Test transform: bicubic resize to ``res x res`` + normalise. ``rng`` is accepted and ignored."""

    res: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None, texts=None) -> torch.Tensor:
        """``(3, res, res)`` float32."""
        return to_tensor_normalized(resize_for_eval(img, self.res), self.mean, self.std)

    def clip(
        self, frames: Sequence[Image.Image], rng: np.random.Generator | None = None, texts=None
    ) -> torch.Tensor:
        """``(F, 3, res, res)`` float32."""
        _check_clip(frames)
        return torch.stack([self(f) for f in frames])


@dataclass(frozen=True)
class BoxTransform:
    """Region / grounding image transform: bicubic resize to ``res`` (if needed) + photometric
    RandAugment(2, 7) (Identity, AutoContrast, Equalize, Brightness, Sharpness) + normalise.

    Geometric changes (box-preserving crop, flip, resize) must go through ``RegionView`` so that boxes
    follow the image; nothing here moves pixels.
    """

    res: int
    randaug: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """``(3, res, res)`` float32."""
        img = resize_for_eval(img, self.res)
        if self.randaug:
            img = RandAugment(ops=PHOTOMETRIC_OPS)(img, rng)
        return to_tensor_normalized(img, self.mean, self.std)


# --------------------------------------------------------------------------------------------------
# Boxes: box-preserving crop, flip, resize, region patch masks (spec §3.3.4, §4.4, §1.4)
# --------------------------------------------------------------------------------------------------


def sample_box_preserving_crop(
    image_size: tuple[int, int], box_xywh: Sequence[float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Draw a crop ``(x0, y0, x1, y1)`` (integer pixels, ``x1``/``y1`` exclusive) containing the box.

    ``x0 ~ U{0..floor(x)}``, ``y0 ~ U{0..floor(y)}``, ``x1 ~ U{min(ceil(x+w), W)..W}``,
    ``y1 ~ U{min(ceil(y+h), H)..H}`` (spec §3.3.4 step 1). Boxes reaching outside the image are
    clamped to it first; the crop is always at least one pixel wide and high.
    """
    width, height = image_size
    x, y, w, h = (float(v) for v in box_xywh)
    x0_hi = min(max(math.floor(x), 0), width - 1)
    y0_hi = min(max(math.floor(y), 0), height - 1)
    x0 = int(rng.integers(0, x0_hi + 1))
    y0 = int(rng.integers(0, y0_hi + 1))
    x1_lo = max(min(math.ceil(x + w), width), x0 + 1)
    y1_lo = max(min(math.ceil(y + h), height), y0 + 1)
    x1 = int(rng.integers(x1_lo, width + 1))
    y1 = int(rng.integers(y1_lo, height + 1))
    return x0, y0, x1, y1


def box_preserving_crop(
    img: Image.Image, box_xywh: Sequence[float], rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Crop ``img`` randomly so that it still contains ``box_xywh``; returns ``(crop, (x0, y0, x1, y1))``."""
    crop = sample_box_preserving_crop(img.size, box_xywh, rng)
    return img.crop(crop), crop


def box_to_cxcywh_target(box_xywh: Sequence[float], res: float) -> tuple[float, float, float, float]:
    """``(x, y, w, h)`` in pixels of the ``res x res`` image -> normalised ``(cx, cy, w, h)``."""
    x, y, w, h = (float(v) for v in box_xywh)
    return (x + w / 2) / res, (y + h / 2) / res, w / res, h / res


@dataclass(frozen=True)
class RegionView:
    """A box-preserving crop, an optional horizontal flip and a bicubic resize to ``res x res``.

    ``apply_image`` transforms the image; ``map_box`` sends a box of the *original* image to pixel
    coordinates of the output (``None`` if too little of it survives the crop). Photometric
    augmentation (``BoxTransform``) comes after ``apply_image``.
    """

    crop: tuple[int, int, int, int]  # (x0, y0, x1, y1) in original pixels, x1/y1 exclusive
    flip: bool
    res: int

    def apply_image(self, img: Image.Image) -> Image.Image:
        """Crop, flip, resize (bicubic) — the geometric part of §3.3.4 steps 1-3."""
        out = as_rgb(img).crop(self.crop)
        if self.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out.resize((self.res, self.res), BICUBIC)

    def map_box(
        self, box_xywh: Sequence[float], min_perc_in_image: float = 0.5
    ) -> tuple[float, float, float, float] | None:
        """Original-pixel ``(x, y, w, h)`` -> output-pixel ``(x, y, w, h)`` of its part inside the crop.

        Dropped (``None``) unless ``inside_area / box_area > min_perc_in_image`` (degenerate boxes are
        always dropped). The result lies inside ``[0, res] x [0, res]``.
        """
        x, y, w, h = (float(v) for v in box_xywh)
        if w <= 0 or h <= 0:
            return None
        x0, y0, x1, y1 = self.crop
        ix0, iy0 = max(x0, x), max(y0, y)
        ix1, iy1 = min(x1, x + w), min(y1, y + h)
        if ix1 <= ix0 or iy1 <= iy0:
            return None
        if (ix1 - ix0) * (iy1 - iy0) / (w * h) <= min_perc_in_image:
            return None
        crop_w, crop_h = x1 - x0, y1 - y0
        bx, by, bw, bh = ix0 - x0, iy0 - y0, ix1 - ix0, iy1 - iy0
        if self.flip:
            bx = crop_w - bx - bw
        sx, sy = self.res / crop_w, self.res / crop_h
        return bx * sx, by * sy, bw * sx, bh * sy


def sample_region_view(
    image_size: tuple[int, int],
    box_xywh: Sequence[float],
    res: int,
    rng: np.random.Generator,
    allow_flip: bool = True,
) -> RegionView:
    """Draw a ``RegionView`` whose crop contains ``box_xywh``; flip with probability 0.5 if allowed.

    For caption-aware flipping pass ``allow_flip=not mentions_left_or_right(all_texts_of_the_image)``.
    The flip coin is always drawn, so the random stream does not depend on ``allow_flip``.
    """
    crop = sample_box_preserving_crop(image_size, box_xywh, rng)
    flip = bool(rng.random() < 0.5) and allow_flip
    return RegionView(crop=crop, flip=flip, res=res)


def region_patch_mask(box_xywh: Sequence[float], res: int, patch_size: int) -> torch.Tensor:
    """0/1 int64 mask of length ``1 + g*g`` (``g = res // patch_size``) over ``[pooled, patches]``.

    Spec §1.4: ``x_min = min(floor(x/ps), g-1)``, ``x_max = max(x_min+1, min(ceil((x+w)/ps), g))``
    (exclusive), same for y; position 0 and every patch ``1 + g*row + col`` of the box are 1. The box is
    in pixels of the resized ``res x res`` image; negative coordinates are treated as 0.
    """
    if res % patch_size:
        raise ValueError(f"res {res} is not a multiple of patch_size {patch_size}")
    g = res // patch_size
    x, y, w, h = (float(v) for v in box_xywh)
    x_min = max(0, min(math.floor(x / patch_size), g - 1))
    x_max = max(x_min + 1, min(math.ceil((x + w) / patch_size), g))
    y_min = max(0, min(math.floor(y / patch_size), g - 1))
    y_max = max(y_min + 1, min(math.ceil((y + h) / patch_size), g))
    grid = torch.zeros(g, g, dtype=torch.int64)
    grid[y_min:y_max, x_min:x_max] = 1
    return torch.cat([torch.ones(1, dtype=torch.int64), grid.flatten()])


def whole_image_patch_mask(res: int, patch_size: int) -> torch.Tensor:
    """All-ones int64 mask of length ``1 + g*g`` (a whole-image caption, ``is_image = 1``)."""
    if res % patch_size:
        raise ValueError(f"res {res} is not a multiple of patch_size {patch_size}")
    return torch.ones(1 + (res // patch_size) ** 2, dtype=torch.int64)
