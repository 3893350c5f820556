"""Tests of x2vlm.data.transforms: normalisation, crops, RandAugment, flips, boxes, patch masks."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from x2vlm.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    PHOTOMETRIC_OPS,
    RANDAUG_FILL,
    RANDAUG_OPS,
    AugmentParams,
    AugOp,
    BoxTransform,
    EvalTransform,
    FinetuneTrainTransform,
    PretrainImageTransform,
    RandAugment,
    RegionView,
    apply_aug_op,
    apply_augment,
    box_preserving_crop,
    box_to_cxcywh_target,
    hflip_box,
    mentions_left_or_right,
    random_resized_crop,
    region_patch_mask,
    resize_for_eval,
    sample_augment_params,
    sample_box_preserving_crop,
    sample_region_view,
    sample_resized_crop,
    swap_left_right,
    to_tensor_normalized,
    whole_image_patch_mask,
)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def noise_img() -> Image.Image:
    arr = rng(0).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- basic conversions


def test_to_tensor_normalized_values_shape_dtype():
    img = Image.new("RGB", (5, 3), (255, 0, 128))
    x = to_tensor_normalized(img)
    assert x.shape == (3, 3, 5) and x.dtype == torch.float32
    expected = [(v - m) / s for v, m, s in zip((1.0, 0.0, 128 / 255), CLIP_MEAN, CLIP_STD)]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((3, 5), expected[c]), atol=1e-6)


def test_to_tensor_normalized_converts_grey_and_rgba():
    assert to_tensor_normalized(Image.new("L", (4, 4), 7)).shape == (3, 4, 4)
    assert to_tensor_normalized(Image.new("RGBA", (4, 4), (1, 2, 3, 4))).shape == (3, 4, 4)


def test_resize_for_eval_ignores_aspect(noise_img):
    out = resize_for_eval(noise_img, 32)
    assert out.size == (32, 32) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(noise_img.resize((32, 32), Image.Resampling.BICUBIC)))


def test_eval_transform_is_resize_plus_normalise(noise_img):
    t = EvalTransform(48)
    assert torch.equal(t(noise_img), to_tensor_normalized(resize_for_eval(noise_img, 48)))
    clip = t.clip([noise_img, noise_img])
    assert clip.shape == (2, 3, 48, 48)


# ----------------------------------------------------------------------------- RandomResizedCrop


def test_resized_crop_params_inside_and_in_range():
    w_img, h_img = 120, 90
    for seed in range(300):
        left, top, w, h = sample_resized_crop(w_img, h_img, (0.2, 1.0), rng(seed))
        assert 0 <= left and 0 <= top and left + w <= w_img and top + h <= h_img and w > 0 and h > 0
        # Rounding of w, h moves area and ratio a little; allow for it.
        assert 0.2 * w_img * h_img * 0.9 <= w * h <= w_img * h_img
        assert 0.75 * 0.9 <= w / h <= (4 / 3) * 1.1


def test_resized_crop_fallback_is_torchvision_centre_crop():
    # No area in [0.9, 1] of a 1000x10 image has a ratio <= 4/3 that fits: all 10 tries fail.
    assert sample_resized_crop(1000, 10, (0.9, 1.0), rng(0)) == ((1000 - 13) // 2, 0, 13, 10)
    assert sample_resized_crop(10, 1000, (0.9, 1.0), rng(0)) == (0, (1000 - 13) // 2, 10, 13)


def test_random_resized_crop_deterministic(noise_img):
    a = random_resized_crop(noise_img, 40, (0.2, 1.0), rng(3))
    b = random_resized_crop(noise_img, 40, (0.2, 1.0), rng(3))
    c = random_resized_crop(noise_img, 40, (0.2, 1.0), rng(4))
    assert a.size == (40, 40)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


# ----------------------------------------------------------------------------- RandAugment


def test_randaugment_sampling_statistics():
    ra = RandAugment()
    names, counts, values = Counter(), Counter(), {}
    n = 4000
    for seed in range(n):
        ops = ra.sample(rng(seed))
        counts[len(ops)] += 1
        for op in ops:
            names[op.name] += 1
            values.setdefault(op.name, set()).add(round(op.value, 6))
    # Two slots, each kept with p = 0.5: 0/1/2 ops with probability 1/4, 1/2, 1/4.
    assert abs(counts[0] / n - 0.25) < 0.03 and abs(counts[1] / n - 0.5) < 0.03
    total = sum(names.values())
    assert set(names) == set(RANDAUG_OPS)
    assert all(abs(c / total - 0.1) < 0.02 for c in names.values())
    assert values["Brightness"] == {1.36} and values["Sharpness"] == {1.36}
    assert values["ShearX"] == {0.21, -0.21} and values["ShearY"] == {0.21, -0.21}
    assert values["TranslateX"] == {7.0, -7.0} and values["TranslateY"] == {7.0, -7.0}
    assert values["Rotate"] == {21.0, -21.0}
    assert values["Identity"] == values["AutoContrast"] == values["Equalize"] == {0.0}


def test_photometric_randaugment_has_no_geometric_ops():
    ra = RandAugment(ops=PHOTOMETRIC_OPS)
    seen = {op.name for seed in range(500) for op in ra.sample(rng(seed))}
    assert seen == set(PHOTOMETRIC_OPS)


def test_randaugment_rejects_unknown_op():
    with pytest.raises(ValueError):
        RandAugment(ops=("Solarize",))


def test_translate_and_fill():
    black = Image.new("RGB", (20, 10))
    out = np.asarray(apply_aug_op(black, AugOp("TranslateX", 7.0)))
    # Output (x, y) takes input (x + 7, y): the 7 right-most columns are uncovered.
    assert (out[:, :13] == 0).all() and (out[:, 13:] == np.array(RANDAUG_FILL)).all()
    out = np.asarray(apply_aug_op(black, AugOp("TranslateY", -7.0)))
    assert (out[:7] == np.array(RANDAUG_FILL)).all() and (out[7:] == 0).all()


def test_shear_rotate_fill_and_identity(noise_img):
    black = Image.new("RGB", (40, 40))
    sheared = np.asarray(apply_aug_op(black, AugOp("ShearX", 0.21)))
    assert (sheared[0] == 0).all()  # row 0 is the shear's fixed line
    assert (sheared[-1, :5] == np.array(RANDAUG_FILL)).all()  # bottom-left uncovered for +0.21
    rotated = np.asarray(apply_aug_op(black, AugOp("Rotate", 21.0)))
    assert (rotated[0, 0] == np.array(RANDAUG_FILL)).all() and (rotated[20, 20] == 0).all()
    assert np.array_equal(np.asarray(apply_aug_op(noise_img, AugOp("Identity"))), np.asarray(noise_img))


def test_brightness_factor():
    out = np.asarray(apply_aug_op(Image.new("RGB", (4, 4), (100, 50, 200)), AugOp("Brightness", 1.36)))
    assert tuple(out[0, 0]) == (136, 68, 255)


def test_every_op_keeps_size_and_mode(noise_img):
    for name in RANDAUG_OPS:
        out = apply_aug_op(noise_img, AugOp(name, 1.36 if name in ("Brightness", "Sharpness") else 0.21))
        assert out.size == noise_img.size and out.mode == "RGB"


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize(
    "transform",
    [
        PretrainImageTransform(32),
        FinetuneTrainTransform(32, hflip=True),
        FinetuneTrainTransform(32, hflip=False),
    ],
)
def test_train_pipelines_shape_and_determinism(transform, noise_img):
    a = transform(noise_img, rng(11))
    b = transform(noise_img, rng(11))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, transform(noise_img, rng(12)))


def test_finetune_transform_requires_explicit_hflip():
    with pytest.raises(TypeError):
        FinetuneTrainTransform(32)  # type: ignore[call-arg]


def test_pipeline_flip_settings(noise_img):
    no_flip = FinetuneTrainTransform(32, hflip=False)
    assert not any(no_flip.sample_params(noise_img.size, rng(s)).flip for s in range(100))
    pre = PretrainImageTransform(32)
    flips = [pre.sample_params(noise_img.size, rng(s)).flip for s in range(200)]
    assert 60 < sum(flips) < 140
    # Caption-aware: a caption about left/right blocks the flip; 'bright' does not.
    left = ["the dog on the left"]
    assert not any(pre.sample_params(noise_img.size, rng(s), texts=left).flip for s in range(100))
    assert any(pre.sample_params(noise_img.size, rng(s), texts=["a bright room"]).flip for s in range(100))


def test_pretrain_scale_range(noise_img):
    pre = PretrainImageTransform(32, randaug=False)
    areas = []
    for s in range(300):
        _, _, w, h = pre.sample_params(noise_img.size, rng(s)).crop
        areas.append(w * h / (noise_img.width * noise_img.height))
    assert min(areas) < 0.3 and max(areas) > 0.9


def test_clip_uses_one_parameter_set_for_all_frames(noise_img):
    t = PretrainImageTransform(24)
    frames = [noise_img, Image.fromarray(255 - np.asarray(noise_img)), noise_img]
    out = t.clip(frames, rng(5))
    assert out.shape == (3, 3, 24, 24)
    params = t.sample_params(noise_img.size, rng(5))
    expected = torch.stack([t.apply(f, params) for f in frames])
    assert torch.equal(out, expected)
    assert torch.equal(out[0], out[2])
    # Whereas drawing per frame (the official behaviour, spec §6.8) gives different views.
    g = rng(5)
    assert not torch.equal(t(noise_img, g), t(noise_img, g))


def test_clip_rejects_mixed_sizes(noise_img):
    with pytest.raises(ValueError):
        PretrainImageTransform(24).clip([noise_img, noise_img.resize((10, 10))], rng(0))


def test_apply_augment_manual_params():
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :10] = 255  # left half white
    img = Image.fromarray(arr)
    params = AugmentParams(crop=(0, 0, 20, 10), flip=True, ops=(), res=8)
    out = np.asarray(apply_augment(img, params))
    assert out.shape == (8, 8, 3)
    assert out[:, :3].mean() < 10 and out[:, 5:].mean() > 245  # white moved to the right
    with pytest.raises(ValueError):
        apply_augment(img, AugmentParams(crop=(15, 0, 10, 10), flip=False, ops=(), res=8))


def test_sample_augment_params_flip_coin_is_always_drawn():
    a = sample_augment_params(rng(9), (50, 40), 16, scale=(0.5, 1.0), hflip=True)
    b = sample_augment_params(rng(9), (50, 40), 16, scale=(0.5, 1.0), hflip=False)
    assert a.crop == b.crop and a.ops == b.ops and not b.flip


def test_box_transform_is_photometric_only():
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, 16:] = 200
    img = Image.fromarray(arr)
    t = BoxTransform(16)
    for s in range(50):
        x = t(img, rng(s))
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
        assert x[:, :, :7].mean() < x[:, :, 9:].mean()  # nothing moved
    assert torch.equal(t(img, rng(1)), t(img, rng(1)))


# ----------------------------------------------------------------------------- left / right


def test_mentions_left_or_right_whole_words():
    assert mentions_left_or_right("the man on the left")
    assert mentions_left_or_right(["a cat", "Right side of the road"])
    assert mentions_left_or_right("LEFT-hand corner")
    assert mentions_left_or_right("the rightmost car")
    assert mentions_left_or_right("turn left.")
    assert not mentions_left_or_right("a bright light")
    assert not mentions_left_or_right(["copyright 2020", "a cleft chin", "leftover pizza", "righteous"])
    assert not mentions_left_or_right([])
    assert not mentions_left_or_right(None)


def test_swap_left_right():
    swapped = swap_left_right("Left of the RIGHT car, leftmost; bright")
    assert swapped == "Right of the LEFT car, rightmost; bright"
    assert swap_left_right(swap_left_right("man at left, right-hand door")) == "man at left, right-hand door"


def test_hflip_box():
    assert hflip_box((10, 5, 20, 8), 100) == (70.0, 5.0, 20.0, 8.0)


# ----------------------------------------------------------------------------- boxes


def test_box_preserving_crop_contains_box():
    g = rng(0)
    for _ in range(500):
        W, H = int(g.integers(20, 200)), int(g.integers(20, 200))
        x, y = g.uniform(0, W - 2), g.uniform(0, H - 2)
        w, h = g.uniform(1, W - x), g.uniform(1, H - y)
        x0, y0, x1, y1 = sample_box_preserving_crop((W, H), (x, y, w, h), g)
        assert 0 <= x0 <= x and 0 <= y0 <= y
        assert min(math.ceil(x + w), W) <= x1 <= W and min(math.ceil(y + h), H) <= y1 <= H


def test_box_preserving_crop_degenerate_box_still_gives_a_crop():
    x0, y0, x1, y1 = sample_box_preserving_crop((50, 40), (50, 40, 0, 0), rng(0))
    assert x1 > x0 and y1 > y0 and x1 <= 50 and y1 <= 40


def test_box_preserving_crop_image(noise_img):
    crop_img, (x0, y0, x1, y1) = box_preserving_crop(noise_img, (30, 20, 40, 30), rng(2))
    assert crop_img.size == (x1 - x0, y1 - y0)
    assert np.array_equal(np.asarray(crop_img), np.asarray(noise_img)[y0:y1, x0:x1])


def test_map_box_hand_computed():
    # Crop (50, 20)-(150, 100) of a 200x100 image: 100 x 80, resized to 40 -> x scale 0.4, y scale 0.5.
    view = RegionView(crop=(50, 20, 150, 100), flip=False, res=40)
    assert view.map_box((60, 30, 20, 10)) == pytest.approx((4.0, 5.0, 8.0, 5.0))
    assert box_to_cxcywh_target((4.0, 5.0, 8.0, 5.0), 40) == pytest.approx((0.2, 0.1875, 0.2, 0.125))
    flipped = RegionView(crop=(50, 20, 150, 100), flip=True, res=40)
    # Shifted box (10, 10, 20, 10) mirrors to x = 100 - 10 - 20 = 70 -> 28.
    assert flipped.map_box((60, 30, 20, 10)) == pytest.approx((28.0, 5.0, 8.0, 5.0))
    # 75 % inside -> kept and clipped to (50, 30, 15, 10) -> shifted (0, 10, 15, 10).
    assert view.map_box((45, 30, 20, 10)) == pytest.approx((0.0, 5.0, 6.0, 5.0))
    # Exactly 50 % inside is not "> min_perc_in_image" -> dropped; kept with a lower threshold.
    assert view.map_box((40, 30, 20, 10)) is None
    assert view.map_box((40, 30, 20, 10), min_perc_in_image=0.4) == pytest.approx((0.0, 5.0, 4.0, 5.0))
    assert view.map_box((0, 0, 10, 10)) is None  # outside the crop
    assert view.map_box((60, 30, 0, 10)) is None  # degenerate
    # Clipped at the bottom-right corner, flipped: stays inside [0, res].
    bx, by, bw, bh = flipped.map_box((140, 90, 20, 20), min_perc_in_image=0.2)
    assert (bx, by, bw, bh) == pytest.approx((0.0, 35.0, 4.0, 5.0))


def _colour_bbox(arr: np.ndarray, channel: int) -> tuple[int, int, int, int] | None:
    others = [c for c in range(3) if c != channel]
    sel = (arr[..., channel] > 128) & (arr[..., others[0]] < 100) & (arr[..., others[1]] < 100)
    if not sel.any():
        return None
    ys, xs = np.nonzero(sel)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_region_view_moves_boxes_with_pixels():
    """Red and green rectangles drawn in the image are found where map_box says they are."""
    arr = np.zeros((80, 120, 3), dtype=np.uint8)
    red, green = (30, 20, 40, 30), (90, 50, 25, 25)
    arr[20:50, 30:70] = (255, 0, 0)
    arr[50:75, 90:115] = (0, 255, 0)
    img = Image.fromarray(arr)
    res, flips, kept_green = 64, 0, 0
    for seed in range(40):
        view = sample_region_view(img.size, red, res, rng(seed))
        flips += view.flip
        out = np.asarray(view.apply_image(img))
        assert out.shape == (res, res, 3)
        for box, channel in ((red, 0), (green, 1)):
            mapped = view.map_box(box, min_perc_in_image=0.3)
            if mapped is None:
                continue
            kept_green += channel == 1
            x, y, w, h = mapped
            assert 0 <= x and 0 <= y and x + w <= res + 1e-6 and y + h <= res + 1e-6
            found = _colour_bbox(out, channel)
            assert found is not None
            assert np.allclose(found, (x, y, x + w, y + h), atol=2.5), (seed, view, found, mapped)
    assert 5 < flips < 35 and kept_green > 3


def test_sample_region_view_respects_allow_flip():
    views = [sample_region_view((100, 100), (10, 10, 20, 20), 32, rng(s), allow_flip=False) for s in range(50)]
    assert not any(v.flip for v in views)


# ----------------------------------------------------------------------------- region patch masks


@pytest.mark.parametrize(
    "box, expected",
    [
        ((5, 10, 30, 20), [1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        ((20, 3, 40, 50), [1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1]),
        ((33.5, 33, 25, 28.5), [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1]),
    ],
)
def test_region_patch_mask_matches_official(box, expected):
    mask = region_patch_mask(box, 64, 16)
    assert mask.dtype == torch.int64 and mask.shape == (17,)
    assert mask.tolist() == expected


def test_region_patch_mask_edge_cases():
    # A zero-size box at the far corner still selects one patch (x_min clamped to g-1, x_max = x_min+1).
    assert region_patch_mask((64, 64, 0, 0), 64, 16).tolist() == [1] + [0] * 15 + [1]
    assert region_patch_mask((0, 0, 64, 64), 64, 16).tolist() == [1] * 17
    assert whole_image_patch_mask(224, 16).shape == (197,)
    with pytest.raises(ValueError):
        region_patch_mask((0, 0, 1, 1), 60, 16)
