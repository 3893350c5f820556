"""NLVR2: left/right-aware flipping, configuration checks, loss and evaluation on the tiny model and a
tiny world."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ThreadGather, integer_row_gathers
from x2vlm.checkpoint import load_official
from x2vlm.config import preset
from x2vlm.data.readers import DataFormatError
from x2vlm.models.x2vlm import X2VLM
from x2vlm.tasks import nlvr as N
from x2vlm.tasks.common import EvalContext
from x2vlm.train.distributed import DistInfo


@pytest.fixture(scope="module")
def world(micro_world) -> Path:
    return micro_world


def world_data(world: Path, **changes) -> dict:
    return {
        "train_file": str(world / "nlvr2/nlvr_train.json"),
        "eval_files": {"val": str(world / "nlvr2/nlvr_val.json"), "test": str(world / "nlvr2/nlvr_test.json")},
        "image_root": str(world / "images"),
        "max_tokens": 24,
        **changes,
    }


def tiny_nlvr_model(tiny_state) -> X2VLM:
    torch.manual_seed(0)
    model = X2VLM(preset("x2vlm-tiny", task="nlvr"))
    assert sorted(load_official(model, tiny_state)) == [f"cls_head.{i}.{p}" for i in (0, 1, 3) for p in ("bias", "weight")]
    return model.eval()


@pytest.mark.parametrize("statement, spatial", [
    ("The left image has more dogs than the right image.", False),
    ("There are two dogs in the right picture", False),
    ("In the left-hand photo a bird faces right.", True),
    ("In the left image, the dog is left of the cat.", True),
    ("The rightmost dog in the right image is brown", True),
    ("A bright copyright notice is in both images", False),
    ("Both images show the same number of birds", False),
])
def test_spatial_left_right(statement, spatial):
    assert N.spatial_left_right(statement) is spatial


def half_white(path: Path, size=(40, 20)) -> None:
    """White left half, black right half: a flip shows as a dark left column."""
    img = Image.new("RGB", size, (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, size[0] // 2, size[1]))
    img.save(path)


def flips_seen(tmp_path: Path, statement: str, **settings) -> list[bool]:
    half_white(tmp_path / "a.png")
    item = N.NLVRItem("a.png", "a.png", statement.lower(), statement, 1)
    transform = N.FinetuneTrainTransform(16, scale=(1.0, 1.0), randaug=False, hflip=settings.get("hflip", True))
    train_set = N.NLVRTrainSet([item], ["t.json"], str(tmp_path), transform, settings.get("careful_hflip", True))
    flips = []
    for seed in range(12):
        sample = train_set.get(0, np.random.default_rng(seed))
        flips += [bool(image[:, :, 0].mean() < image[:, :, -1].mean()) for image in (sample.left, sample.right)]
    return flips


def test_flips_respect_statements_about_positions_inside_an_image(tmp_path):
    assert any(flips_seen(tmp_path, "The left image has more dogs than the right image."))  # flips allowed
    assert not any(flips_seen(tmp_path, "In the left image, the dog is left of the cat."))  # spatial: never
    assert any(flips_seen(tmp_path, "In the left image, the dog is left of the cat.", careful_hflip=False))  # official
    assert not any(flips_seen(tmp_path, "Two dogs.", hflip=False))
    both = flips_seen(tmp_path, "Two dogs.")
    assert both[0::2] != both[1::2]  # each image draws its own coin


def test_build_task_reads_files_and_rejects_bad_configuration(world, tokenizer, tmp_path):
    cfg = preset("x2vlm-tiny")
    task = N.build_task(world_data(world), cfg, tokenizer, "data")
    assert task.model_task == "nlvr" and task.eval_splits == ["val", "test"] and task.selection_metric == "acc"
    # what inference reads beside the selected weights (Model.verify): the evaluation's token limits
    assert task.inference_files == {"inference.json": {"task": "nlvr", "max_tokens": world_data(world)["max_tokens"], "max_words": 30}}
    raw = json.loads((world / "nlvr2/nlvr_train.json").read_text())
    assert [it.label for it in task.train_set.items] == [int(r["label"] == "True") for r in raw]
    two = N.build_task(world_data(world, train_file=[world_data(world)["train_file"]] * 2), cfg, tokenizer, "data")
    assert len(two.train_set) == 2 * len(task.train_set)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['augment'\]"):
        N.build_task(world_data(world, augment=True), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="'crop_scale' must be"):
        N.build_task(world_data(world, crop_scale=[0.9, 0.5]), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="'max_tokens' must be a positive integer"):
        N.build_task(world_data(world, max_tokens=0), cfg, tokenizer, "data")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"images": ["a.png"], "sentence": "x", "label": True}]))
    with pytest.raises(DataFormatError, match=r"bad.json\[0\].*images"):
        N.build_task(world_data(world, eval_files={"val": str(bad)}), cfg, tokenizer, "data")


def test_loss_and_evaluation_on_the_tiny_world(world, tokenizer, tiny_state):
    task = N.build_task(world_data(world), preset("x2vlm-tiny"), tokenizer, "data")
    model = tiny_nlvr_model(tiny_state)
    batch = task.collate([task.train_set.get(i, np.random.default_rng(i)) for i in range(4)])
    assert batch.left.shape == batch.right.shape == (4, 3, 64, 64) and batch.labels.dtype == torch.long
    model.train()
    losses = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert set(losses) == {"cls"} and torch.isfinite(losses["cls"])
    assert integer_row_gathers(losses["cls"]) == 0  # a deterministic backward (conftest)
    losses["cls"].backward()
    assert model.cls_head[0].weight.grad.abs().sum() > 0
    model.eval()
    ctx = EvalContext(DistInfo(), batch_size=4)
    items = N.load_nlvr_file(world / "nlvr2/nlvr_val.json")
    result = task.evaluate(model, "val", ctx)
    assert set(result) == {"acc"}
    preds = N.predict_nlvr(model, items, range(len(items)), str(world / "images"), tokenizer, 64, 24, "val", batch_size=len(items))
    assert result["acc"] == pytest.approx(100 * np.mean(preds == np.array([it.label for it in items])))
    assert set(task.evaluate(model, "test", ctx)) == {"acc"}
    with pytest.raises(ValueError, match="unknown split"):
        task.evaluate(model, "dev", ctx)


@pytest.mark.parametrize("name", ["nlvr2_base", "nlvr2_large", "nlvr2_small_world"])
def test_shipped_configs_parse_and_use_known_keys(name):
    from x2vlm.tasks.common import check_keys
    from x2vlm.train.finetune import load_finetune_config

    cfg = load_finetune_config(Path(N.__file__).parents[1] / "configs" / "finetune" / f"{name}.yaml", task="nlvr")
    check_keys(cfg.data, N.DATA_KEYS, name)
    assert next(iter(cfg.data["eval_files"])) == "val"


def test_statement_text_layers_run_once_for_both_images(tiny_state):
    """``nlvr_logits`` runs the statement's text layers once and fuses them with each image: the
    logits of the official form (text + fusion stack run once per image) with less work."""
    model = tiny_nlvr_model(tiny_state).eval()
    g = torch.Generator().manual_seed(2)
    res = model.cfg.image_res
    left, right = torch.randn(2, 3, res, res, generator=g), torch.randn(2, 3, res, res, generator=g)
    ids = torch.randint(5, model.cfg.text.vocab_size, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        got = model.nlvr_logits(left, right, ids, mask)
        cls = [model.encode_multimodal(ids, mask, *model.encode_images(images))[:, 0] for images in (left, right)]
        expected = model.classify(torch.cat(cls, dim=-1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_classifier_inputs_are_what_the_head_reads_at_evaluation(world, tokenizer, tiny_state):
    """The head warm-up's inputs: one fused-CLS pair per training statement, in order, at the
    evaluation transform; the head on them gives exactly the evaluation's logits."""
    task = N.build_task(world_data(world), preset("x2vlm-tiny"), tokenizer, "data")
    model = tiny_nlvr_model(tiny_state)
    torch.nn.init.normal_(model.cls_head[3].weight, std=1.0)  # spread the predictions over both labels
    items = task.train_set.items
    features, labels = task.classifier_inputs(model, EvalContext(DistInfo(), batch_size=3))
    assert features.shape == (len(items), 2 * model.cfg.text.hidden_size) and features.dtype == torch.float32
    assert labels.tolist() == [it.label for it in items]
    preds = N.predict_nlvr(model, items, range(len(items)), str(world / "images"), tokenizer, 64, 24, "train", batch_size=5)
    with torch.no_grad():
        assert np.array_equal(model.classify(features).argmax(-1).numpy(), preds)
        first = [task.train_set.items[0]]
        inputs = next(N._eval_inputs(model, first, [0], str(world / "images"), tokenizer, 64, 24, lambda i: "train", 1))
        torch.testing.assert_close(model.classify(features[:1]), model.nlvr_logits(*inputs))


def test_classifier_inputs_split_across_ranks_equal_one_process(world, tokenizer, tiny_state, monkeypatch):
    """Each rank computes its share of the warm-up inputs; after the gather every rank holds all of
    them, in item order, as one process computes them."""
    task = N.build_task(world_data(world), preset("x2vlm-tiny"), tokenizer, "data")
    model = tiny_nlvr_model(tiny_state)
    whole = task.classifier_inputs(model, EvalContext(DistInfo(), batch_size=4))
    computed: dict[int, int] = {}
    real_features = model.nlvr_features

    def counting(left, *args):
        computed[threading.get_ident()] = computed.get(threading.get_ident(), 0) + len(left)
        return real_features(left, *args)

    monkeypatch.setattr(model, "nlvr_features", counting)
    world_size = 3
    gathers = ThreadGather(world_size)
    import x2vlm.tasks.common as C

    monkeypatch.setattr(C, "gather_tensors", lambda local, info: gathers.for_rank(info.rank)(local))
    results = gathers.run(lambda rank, gather: task.classifier_inputs(model, EvalContext(DistInfo(rank=rank, world_size=world_size), batch_size=4)))
    for features, labels in results.values():
        torch.testing.assert_close(features, whole[0], atol=1e-5, rtol=0)
        assert torch.equal(labels, whole[1])
    assert sorted(computed.values()) == sorted(len(N.shard_range(len(whole[1]), r, world_size)) for r in range(world_size))
