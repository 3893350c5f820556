"""RefCOCO+ grounding: official IoU, mapping predictions to original pixels, training-sample geometry,
configuration checks, and loss / evaluation / pictures on the tiny model and a tiny world."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny, tiny_finetune_config
from PIL import Image

from x2vlm.config import preset
from x2vlm.data.readers import DataFormatError
from x2vlm.data.transforms import CLIP_MEAN, CLIP_STD, sample_box_preserving_crop
from x2vlm.tasks import grounding as G
from x2vlm.tasks.common import EvalContext
from x2vlm.tokenizer import WordPieceTokenizer
from x2vlm.train.distributed import DistInfo


@pytest.fixture(scope="module")
def world(micro_world) -> Path:
    return micro_world


def world_data(world: Path, refer: bool = True, **changes) -> dict:
    data = {
        "train_file": str(world / "refcoco+/refcoco+_train.json"),
        "eval_files": {"val": str(world / "refcoco+/refcoco+_val.json"), "test": str(world / "refcoco+/refcoco+_test.json")},
        "image_root": str(world / "images"),
        "max_tokens": 24,
    }
    if refer:
        data["refs_file"] = str(world / "refcoco+/refs(unc).p")
        data["instances_file"] = str(world / "refcoco+/instances.json")
    return {**data, **changes}


# -- IoU ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("box1, box2, expected", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),                  # identical
    ([0, 0, 10, 10], [5, 0, 10, 10], 50 / 150),             # half overlap: 5x10 px
    ([2, 2, 4, 4], [0, 0, 10, 10], 16 / 100),               # contained
    ([0, 0, 10, 10], [20, 20, 5, 5], 0.0),                  # apart
    ([0, 0, 10, 10], [10, 0, 10, 10], 0.0),                 # touching borders: no shared pixel
    ([0, 0, 10, 10], [9, 0, 10, 10], 0.0),                  # one shared column: official strict test gives 0
    ([0, 0, 10, 10], [8, 0, 10, 10], 20 / 180),             # two shared columns: (9-8+1) * 10
    ([5, 5, 0, 0], [0, 0, 10, 10], 0.0),                    # zero-area box
    ([5, 5, 0, 0], [5, 5, 0, 0], 0.0),                      # both zero-area: union 0 -> 0, not NaN
    ([0.5, 0, 10, 10], [0, 0, 10, 10], 95 / 105),           # sub-pixel: (9 - 0.5 + 1) * 10
])
def test_inclusive_iou_hand_computed(box1, box2, expected):
    assert G.inclusive_iou(box1, box2) == pytest.approx(expected)
    assert G.inclusive_iou(box2, box1) == pytest.approx(expected)


def test_inclusive_iou_rows_equal_single_calls():
    rng = np.random.default_rng(0)
    a = np.column_stack([rng.uniform(0, 50, (20, 2)), rng.uniform(0, 30, (20, 2))])
    b = np.column_stack([rng.uniform(0, 50, (20, 2)), rng.uniform(0, 30, (20, 2))])
    rows = G.inclusive_iou(a, b)
    assert rows.shape == (20,)
    assert rows.tolist() == pytest.approx([G.inclusive_iou(x, y) for x, y in zip(a, b)])
    with pytest.raises(ValueError, match=r"\[x, y, w, h\]"):
        G.inclusive_iou([1, 2, 3], [1, 2, 3])


def test_grounding_metrics_accuracy_and_refer_splits():
    m = G.grounding_metrics(np.array([0.5, 0.49, 0.9, 0.0]), ["testA", "testA", "testB", "testB"])
    assert m["acc"] == 50.0 and m["miou"] == pytest.approx(100 * 1.89 / 4)
    assert m["acc_testA"] == 50.0 and m["acc_testB"] == 50.0 and m["miou_testB"] == pytest.approx(45.0)
    assert set(G.grounding_metrics(np.array([0.7]), ["val"])) == {"acc", "miou"}  # one split: no sub-keys
    with pytest.raises(ValueError, match="no expression"):
        G.grounding_metrics(np.zeros(0))


# -- mapping predictions to the original image -------------------------------------------------------
def test_prediction_maps_to_original_pixels_of_a_non_square_image():
    # a 200 x 100 image was squashed to res x res; the prediction is relative to that square
    box = G.box_to_original_pixels(np.array([0.5, 0.25, 0.5, 0.1]), 200, 100)
    assert box.tolist() == pytest.approx([50.0, 20.0, 100.0, 10.0])
    rows = G.box_to_original_pixels(torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.75, 0.1, 0.2]]), np.array([200, 64]), np.array([100, 32]))
    np.testing.assert_allclose(rows, [[0, 0, 200, 100], [16 - 3.2, 24 - 3.2, 6.4, 6.4]], rtol=1e-6)


class FixedBoxModel(torch.nn.Module):
    """Predicts the same normalised box for every expression (for testing the evaluation plumbing)."""

    def __init__(self, box):
        super().__init__()
        self.box = torch.nn.Parameter(torch.tensor(box), requires_grad=False)

    def encode_images(self, images):
        return images.new_zeros(len(images), 5, 4), None

    def encode_text(self, ids, mask):
        return ids.new_zeros(len(ids), ids.shape[1], 4).float()

    def predict_boxes(self, image_embeds, text_states, text_mask):
        return self.box.expand(len(image_embeds), 4)


def write_refcoco(root: Path, records: list[dict], images: dict[str, tuple[int, int]]) -> Path:
    for name, size in images.items():
        Image.new("RGB", size, (0, 0, 0)).save(root / name)
    path = root / "refs.json"
    path.write_text(json.dumps(records))
    return path


def test_evaluation_uses_each_images_own_size(tmp_path):
    # predicted normalised box (0.5, 0.5, 0.5, 0.5) = [50, 25, 100, 50] on 200x100, [10, 20, 20, 40] on 40x80
    path = write_refcoco(tmp_path, [
        {"image": "wide.png", "text": "a thing", "ref_id": 1, "bbox": [50, 25, 100, 50]},            # exact
        {"image": "wide.png", "text": "another", "ref_id": 2, "bbox": [50, 25, 100, 51]},            # nearly
        {"image": "tall.png", "text": "tall thing", "ref_id": 3, "bbox": [0, 0, 20, 40]},            # apart-ish
        {"image": "tall.png", "text": "tall", "ref_id": 4, "bbox": [10, 20, 20, 40], "width": 40, "height": 80},
    ], {"wide.png": (200, 100), "tall.png": (40, 80)})
    items = G.load_grounding_file(path)
    settings = G.GroundingSettings(res=32)
    tok = WordPieceTokenizer(TINY_VOCAB)
    order, boxes = G.predict_split(FixedBoxModel([0.5, 0.5, 0.5, 0.5]), items, str(tmp_path), tok, settings, str(path), batch_size=1)
    by_item = dict(zip(order.tolist(), boxes.tolist()))
    assert by_item[0] == pytest.approx([50, 25, 100, 50]) and by_item[3] == pytest.approx([10, 20, 20, 40])
    ctx = EvalContext(DistInfo(), batch_size=3)
    m = G.evaluate_grounding(FixedBoxModel([0.5, 0.5, 0.5, 0.5]), items, str(tmp_path), tok, settings, str(path), ctx)
    iou_tall = G.inclusive_iou([10, 20, 20, 40], [0, 0, 20, 40])
    assert m["acc"] == 75.0
    assert iou_tall == pytest.approx(200 / 1400)
    assert m["miou"] == pytest.approx(100 * (1 + 5000 / 5100 + iou_tall + 1) / 4)


def test_stated_image_size_must_match_the_file(tmp_path):
    path = write_refcoco(tmp_path, [{"image": "a.png", "text": "x", "ref_id": 1, "bbox": [1, 1, 5, 5], "width": 30, "height": 20}],
                         {"a.png": (20, 30)})
    items = G.load_grounding_file(path)
    with pytest.raises(DataFormatError, match="a.png is 20x30, the annotations say 30x20"):
        G.predict_split(FixedBoxModel([0.5] * 4), items, str(tmp_path), WordPieceTokenizer(TINY_VOCAB), G.GroundingSettings(res=32), str(path))


# -- training samples --------------------------------------------------------------------------------
def white_box_image(size, box) -> Image.Image:
    img = Image.new("RGB", size, (0, 0, 0))
    x, y, w, h = box
    img.paste((255, 255, 255), (x, y, x + w, y + h))
    return img


def brightness(pixels: torch.Tensor) -> np.ndarray:
    """Back from normalised (3, H, W) to a 0..1 grey image."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels * std + mean).mean(0).numpy()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_training_target_follows_crop_flip_and_resize(tmp_path, seed):
    size, box, res = (120, 60), (70, 10, 30, 20), 32
    white_box_image(size, box).save(tmp_path / "img.png")
    item = G.GroundingItem("img.png", "thing", "thing", tuple(float(v) for v in box), 1, None, None)
    settings = G.GroundingSettings(res=res, randaug=False, careful_hflip=True)
    sample = G.GroundingTrainSet([item], str(tmp_path), settings, "test").get(0, np.random.default_rng(seed))
    # the same draws by hand: crop containing the box, flip coin, then crop -> flip -> scale
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = sample_box_preserving_crop(size, box, rng)
    flip = rng.random() < 0.5
    bx, by = box[0] - x0, box[1] - y0
    if flip:
        bx = (x1 - x0) - bx - box[2]
    sx, sy = res / (x1 - x0), res / (y1 - y0)
    expected = ((bx + box[2] / 2) * sx / res, (by + box[3] / 2) * sy / res, box[2] * sx / res, box[3] * sy / res)
    assert sample.target == pytest.approx(expected)
    assert all(0.0 <= v <= 1.0 for v in sample.target)
    # the white square sits where the target says
    grey = brightness(sample.pixels)
    cx, cy, w, h = (v * res for v in sample.target)
    assert grey[int(cy), int(cx)] > 0.9
    inside = np.zeros_like(grey, dtype=bool)
    margin = 2  # bicubic blur
    inside[max(0, int(cy - h / 2) - margin) : int(cy + h / 2) + margin + 1, max(0, int(cx - w / 2) - margin) : int(cx + w / 2) + margin + 1] = True
    assert grey[~inside].max() < 0.1


def test_flip_is_caption_aware_and_crop_can_be_off(tmp_path):
    size, box, res = (100, 50), (10, 10, 20, 20), 50
    white_box_image(size, box).save(tmp_path / "img.png")
    # without the crop, the flip coin is the first draw
    seeds_that_flip = [s for s in range(20) if np.random.default_rng(s).random() < 0.5]
    for text, flipped in (("the square", True), ("the left square", False), ("bright square", True)):
        item = G.GroundingItem("img.png", text, text, tuple(map(float, box)), 1, None, None)
        sample = G.GroundingTrainSet([item], str(tmp_path), G.GroundingSettings(res=res, randaug=False, random_crop=False), "t").get(
            0, np.random.default_rng(seeds_that_flip[0]))
        # no crop: the whole 100x50 image; x centre 20 -> 0.2, or mirrored 0.8
        assert sample.target == pytest.approx((0.8 if flipped else 0.2, 0.4, 0.2, 0.4))


def test_box_outside_the_image_is_an_error(tmp_path):
    white_box_image((40, 40), (0, 0, 5, 5)).save(tmp_path / "img.png")
    item = G.GroundingItem("img.png", "x", "x", (50.0, 50.0, 5.0, 5.0), 7, None, None)
    with pytest.raises(DataFormatError, match="ref_id 7.*outside"):
        G.GroundingTrainSet([item], str(tmp_path), G.GroundingSettings(res=32), "train.json").get(0, np.random.default_rng(0))


# -- configuration -----------------------------------------------------------------------------------
def test_build_task_rejects_bad_configuration(world, tokenizer):
    cfg = preset("x2vlm-tiny")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['eval_file'\]"):
        G.build_task({**world_data(world), "eval_file": "x"}, cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="both 'refs_file' and 'instances_file'"):
        G.build_task({k: v for k, v in world_data(world).items() if k != "instances_file"}, cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="missing key 'train_file'"):
        G.build_task({k: v for k, v in world_data(world).items() if k != "train_file"}, cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="'careful_hflip' must be true or false"):
        G.build_task(world_data(world, careful_hflip="yes"), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="'eval_files' must map"):
        G.build_task(world_data(world, eval_files=["a.json"]), cfg, tokenizer, "data")


def test_boxes_come_from_refer_files_or_from_the_json(world, tokenizer, tmp_path):
    cfg = preset("x2vlm-tiny")
    with_refer = G.build_task(world_data(world), cfg, tokenizer, "data")
    from_json = G.build_task(world_data(world, refer=False), cfg, tokenizer, "data")
    assert with_refer.model_task == "grounding" and with_refer.eval_splits == ["val", "test"] and with_refer.selection_metric == "acc"
    a, b = with_refer.train_set.items, from_json.train_set.items
    assert [i.box for i in a] == [i.box for i in b]  # the world writes the REFER box into the json
    assert {i.refer_split for i in a} == {"train"} and {i.refer_split for i in b} == {None}
    # a json without boxes needs the REFER files
    records = json.loads((world / "refcoco+/refcoco+_train.json").read_text())
    stripped = tmp_path / "train_no_box.json"
    stripped.write_text(json.dumps([{k: r[k] for k in ("image", "text", "ref_id")} for r in records]))
    assert [i.box for i in G.build_task(world_data(world, train_file=str(stripped)), cfg, tokenizer, "d").train_set.items] == [i.box for i in a]
    with pytest.raises(DataFormatError, match=r"train_no_box.json\[0\].*'bbox' missing"):
        G.build_task(world_data(world, refer=False, train_file=str(stripped)), cfg, tokenizer, "d")


# -- the tiny model ----------------------------------------------------------------------------------
def test_loss_and_evaluation_on_the_tiny_world(world, tokenizer, tiny_state, tmp_path):
    task = G.build_task(world_data(world, randaug=True), preset("x2vlm-tiny"), tokenizer, "data")
    model = build_tiny("grounding", tiny_state)
    batch = task.collate([task.train_set.get(i, np.random.default_rng(i)) for i in range(4)])
    assert batch.images.shape == (4, 3, 64, 64) and batch.target_boxes.shape == (4, 4)
    model.train()
    losses = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert set(losses) == {"bbox", "giou"} and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.bbox_head[0].weight.grad.abs().sum() > 0
    model.eval()
    ctx = EvalContext(DistInfo(), batch_size=16)
    val = task.evaluate(model, "val", ctx)
    assert set(val) == {"acc", "miou"} and 0 <= val["acc"] <= 100 and 0 < val["miou"] < 100
    test = task.evaluate(model, "test", ctx)  # the world's test file holds REFER testA and testB refs
    assert {"acc", "miou", "acc_testA", "acc_testB", "miou_testA", "miou_testB"} == set(test)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task.evaluate(model, "dev", ctx)
    pictures = task.draw(model, tmp_path / "pictures", ctx)
    assert len(pictures) == G.DRAWN_ITEMS and all(p.exists() and p.suffix == ".png" for p in pictures)
    subset = G.build_task(world_data(world, eval_subset=5), preset("x2vlm-tiny"), tokenizer, "data")
    assert subset.evaluate(model, "val", ctx)["acc"] % 20 == 0  # 5 expressions


def test_finetuning_loop_then_inference_boxes_equal_the_evaluation(world, tmp_path, capsys):
    """A short fine-tuning on the world; the run, loaded for inference, finds the test expressions'
    boxes (pixels of each image) as the evaluation does, and they give the metrics the run reported;
    bf16 keeps the boxes (IoU >= 0.9 with fp32); the command line prints the API's box."""
    import x2vlm
    from x2vlm.cli import main
    from x2vlm.train import finetune as FT

    data = world_data(world, randaug=False)
    cfg = tiny_finetune_config("grounding", data, tmp_path / "run", max_steps=2, batch_size=4, eval_batch_size=16)
    summary = FT.run_finetuning(cfg)
    assert list(summary["results"]) == ["val", "test"]
    run = tmp_path / "run"
    model = x2vlm.load(run)
    settings = model.grounding_settings()
    assert (settings.max_tokens, settings.max_words) == (24, 30)  # saved by the fine-tuning
    test_file = data["eval_files"]["test"]
    items = G.load_grounding_file(test_file, data["refs_file"], data["instances_file"], settings.max_words)
    # the evaluation's own prediction on the selected weights (images encoded once per image)
    order, expected = G.predict_split(model.model, items, data["image_root"], model.tokenizer, settings, test_file, batch_size=16)
    images = [str(Path(data["image_root"]) / item.image) for item in items]
    boxes = np.array(model.ground(images, [item.raw_text for item in items]))
    assert boxes.shape == (len(items), 4)
    assert np.abs(boxes[order] - expected).max() < 1e-3  # pixels
    ious = G.inclusive_iou(boxes, np.array([item.box for item in items]))
    assert G.grounding_metrics(ious, [item.refer_split for item in items]) == pytest.approx(summary["results"]["test"])

    bf16 = np.array(x2vlm.load(run, dtype="bf16").ground(images, [item.raw_text for item in items]))
    same = G.inclusive_iou(bf16, boxes) >= 0.9
    assert same.mean() >= 0.9, f"bf16 boxes have IoU >= 0.9 with the fp32 ones for {same.mean():.0%} of {len(items)} expressions"

    assert main(["predict", "ground", "--model", str(run), "--image", images[0], "--expression", items[0].raw_text]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"image": images[0], "expression": items[0].raw_text, "box": model.ground(images[0], items[0].raw_text)}
    assert printed["box"] == pytest.approx(boxes[0].tolist(), abs=1e-3)
    print(f"grounding: {len(items)} test expressions; bf16 box IoU >= 0.9 with fp32 for {same.mean():.0%}", file=sys.stderr)


@pytest.mark.parametrize("name", ["grounding_refcoco_base", "grounding_refcoco_large", "grounding_small_world"])
def test_shipped_configs_parse_and_use_known_keys(name):
    from x2vlm.tasks.common import check_keys
    from x2vlm.train.finetune import base_model_config, load_finetune_config

    cfg = load_finetune_config(Path(G.__file__).parents[1] / "configs" / "finetune" / f"{name}.yaml", task="grounding")
    check_keys(cfg.data, G.DATA_KEYS, name)
    assert next(iter(cfg.data["eval_files"])) == "val" and cfg.data["refs_file"] and cfg.data["instances_file"]
    assert base_model_config(cfg).image_res == (96 if name.endswith("small_world") else 384)
