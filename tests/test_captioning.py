"""COCO captioning task: FG-free caption masking and attention, generation length, evaluation files
and COCO metrics on the tiny model + tiny world, CIDEr-D, and the SCST objective."""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny, tiny_finetune_config

from x2vlm import objectives as O
from x2vlm.config import preset
from x2vlm.data.masking import MaskingConfig
from x2vlm.data.readers import DataFormatError
from x2vlm.data.transforms import EvalTransform
from x2vlm.generation import CaptionSettings, beam_search, greedy_caption, sample_captions
from x2vlm.inference import read_image
from x2vlm.tasks import captioning as C
from x2vlm.tasks.common import EvalContext
from x2vlm.train.distributed import DistInfo
from x2vlm.train.finetune import load_finetune_config

CLS, SEP, MASK, PAD = 101, 102, 103, 0
PROMPT = [101, 142, 211, 209]  # [CLS] a picture of (tiny vocabulary)
CONFIGS = Path(C.__file__).parents[1] / "configs" / "finetune"


@pytest.fixture(scope="module")
def model(tiny_state):
    return build_tiny("captioning", tiny_state)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from x2vlm.world import generate

    root = tmp_path_factory.mktemp("caption_world")
    generate(root, size="tiny", seed=0, image_size=64)
    return root


def world_data(world: Path, **changes) -> dict:
    k = world / "karpathy"
    data = {"train_file": str(k / "coco_karpathy_train.json"), "val_file": str(k / "coco_karpathy_val.json"),
            "val_gt": str(k / "coco_karpathy_val_gt.json"), "test_file": str(k / "coco_karpathy_test.json"),
            "test_gt": str(k / "coco_karpathy_test_gt.json"), "image_root": str(world / "images"),
            "num_beams": 2, "max_length": 5, "min_length": 1, "metrics": ["bleu", "rouge_l", "cider"], "draw_images": 2}
    data.update(changes)
    return data


# -- training rows --------------------------------------------------------------------------------
def test_fg_free_layout_and_attention_on_a_hand_example():
    #            0    1    2    3    4    5    6    7
    ids = [CLS, 142, 211, 209, 300, 301, 302, SEP]
    row = C.fg_free_layout(ids, [5, 7], MASK)  # predict 301 and [SEP]
    assert row.input_ids == [CLS, 142, 211, 209, 300, MASK, 301, 302, MASK, SEP]
    assert row.position_ids == [0, 1, 2, 3, 4, 5, 5, 6, 7, 7]  # a [MASK] shares its token's position
    assert row.masked_pos == [5, 8] and row.masked_ids == [301, SEP]
    attention = C.caption_attention(torch.tensor([row.inserted_mask]))[0]
    expected = torch.tensor([
        # 0  1  2  3  4  M  6  7  M  9
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # [MASK] for 301: earlier real tokens and itself
        [1, 1, 1, 1, 1, 0, 1, 0, 0, 0],  # 301 never sees a [MASK]
        [1, 1, 1, 1, 1, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 1, 1, 1, 0],  # [MASK] for [SEP]: not the other [MASK]
        [1, 1, 1, 1, 1, 0, 1, 1, 0, 1],
    ])
    assert torch.equal(attention, expected)


def test_collate_pads_invisibly(model):
    a = C.fg_free_layout([CLS, 142, 211, 209, 300, 301, 302, SEP], [5, 7], MASK)
    b = C.fg_free_layout([CLS, 142, 211, 209, 310, SEP], [4], MASK)
    batch = C.collate_sequences([a, b], PAD, CLS)
    assert batch.input_ids[1].tolist() == [CLS, 142, 211, 209, MASK, 310, SEP, PAD, PAD, PAD]
    assert batch.position_ids[1].tolist() == [0, 1, 2, 3, 4, 4, 5, 6, 7, 8]  # pads keep counting
    assert batch.masked_ids[1].tolist() == [310, CLS] and batch.masked_weight.tolist() == [[1, 1], [1, 0]]
    vision, vmask = model.encode_images(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        padded = model.mlm_logits(batch.input_ids, batch.attention, vision.expand(2, -1, -1), vmask.expand(2, -1),
                                  batch.masked_pos, batch.position_ids)[1, :1]
        alone = C.collate_sequences([b], PAD, CLS)
        single = model.mlm_logits(alone.input_ids, alone.attention, vision, vmask, alone.masked_pos, alone.position_ids)[0]
    torch.testing.assert_close(padded, single, atol=1e-4, rtol=0)


def test_in_place_rows_reproduce_the_official_caption_loss(model, tiny_inputs, tiny_outputs):
    I = tiny_inputs
    rows = []
    for b in range(2):
        weight = I["caption_train_masked_weight"][b].bool()
        rows.append(C.in_place_layout(I["caption_train_ids_masked"][b].tolist(), I["caption_train_masked_pos"][b][weight].tolist(),
                                      I["caption_train_masked_ids"][b][weight].tolist()))
    batch = C.collate_sequences(rows, PAD, CLS)
    assert torch.equal(batch.attention, I["caption_attention_mask_3d"])
    assert torch.equal(batch.position_ids, I["caption_position_ids"])
    vision, vmask = model.encode_images(I["images"][:2])
    with torch.no_grad():
        logits = model.mlm_logits(batch.input_ids, batch.attention, vision, vmask, batch.masked_pos, batch.position_ids)
    loss = O.caption_loss(logits, batch.masked_ids, batch.masked_weight, smoothing=0.1, ignore_id=CLS)
    torch.testing.assert_close(loss, tiny_outputs["caption_mlm_train_loss"], atol=1e-5, rtol=1e-5)


def test_caption_encoder_protects_the_prompt_and_can_mask_sep(tokenizer):
    masking = MaskingConfig(mask_prob=0.6, max_masks=18)
    encoder = C.CaptionEncoder(tokenizer, tuple(PROMPT), masking, max_tokens=12, max_words=40, fg_free=True)
    ids = encoder.token_ids("A red picture of a red red, red picture of a red picture!")
    assert len(ids) == 12 and ids[:4] == PROMPT and ids[-1] == SEP  # cut to max_tokens, [SEP] kept
    sep_predicted = 0
    for seed in range(40):
        row = encoder.encode("a red picture", np.random.default_rng(seed))
        real = [t for t, inserted in zip(row.input_ids, row.inserted_mask) if not inserted]
        assert real == encoder.token_ids("a red picture")  # FG-free keeps every original token
        assert all(row.input_ids[p] == MASK and row.position_ids[p] >= len(PROMPT) for p in row.masked_pos)
        sep_predicted += SEP in row.masked_ids
    assert 0 < sep_predicted < 40
    classic = C.CaptionEncoder(tokenizer, tuple(PROMPT), masking, 12, 40, fg_free=False).encode("a red picture", np.random.default_rng(1))
    assert not any(classic.inserted_mask) and len(classic.input_ids) == len(encoder.token_ids("a red picture"))


# -- generation -------------------------------------------------------------------------------------
@torch.no_grad()
def test_generation_length_comes_from_the_prompt_not_the_batch(model, tokenizer):
    pixels = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompt = torch.tensor(PROMPT)  # 4 tokens; batch of 5: the official length would be 5 + 3 - 4 = 4
    vision, vmask = model.encode_images(pixels)
    for greedy in (False, True):
        gen = CaptionSettings(num_beams=2, min_length=3, max_new_tokens=3, greedy=greedy)  # [SEP] blocked throughout
        settings = C.check_generation_length(gen, len(PROMPT), model.cfg.text.max_position_embeddings)
        assert settings.max_new_tokens == 3
        if greedy:
            sequences = greedy_caption(model, vision, vmask, prompt, settings.max_new_tokens, settings.min_length)
        else:
            from x2vlm.generation import beam_search

            sequences = beam_search(model, vision, vmask, prompt, settings)
        assert [len(s) for s in sequences] == [3] * 5
        one = C.generate_captions(model, pixels[:1], prompt, gen, tokenizer)
        assert one == C.generate_captions(model, pixels, prompt, gen, tokenizer)[:1]
    with pytest.raises(ValueError, match="position embeddings"):
        C.check_generation_length(CaptionSettings(max_new_tokens=61), len(PROMPT), 64)


@torch.no_grad()
def test_fg_free_pass_equals_incremental_decoding(model, tokenizer):
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    vision, vmask = model.encode_images(pixels)
    prompt = torch.tensor(PROMPT)
    sampled, incremental = sample_captions(model, vision, vmask, prompt, 6, torch.Generator().manual_seed(0))
    parallel = C.sequence_log_probs(model, vision, vmask, PROMPT, sampled, tokenizer)
    torch.testing.assert_close(parallel, incremental, atol=1e-4, rtol=1e-5)
    greedy = greedy_caption(model, vision, vmask, prompt, 6)
    rows = [C.fg_free_layout(PROMPT + g, range(4, 4 + len(g)), MASK) for g in greedy]
    batch = C.collate_sequences(rows, PAD, CLS)
    logits = model.mlm_logits(batch.input_ids, batch.attention, vision, vmask, batch.masked_pos, batch.position_ids)
    for b, g in enumerate(greedy):
        assert logits[b, : len(g)].argmax(-1).tolist() == g


# -- evaluation -------------------------------------------------------------------------------------
def test_evaluate_writes_coco_results_and_returns_metrics(world, model, tokenizer, tmp_path):
    # an extra split reading the val files: evaluated after val and test, exactly as they are
    k = world / "karpathy"
    extra = {"val_again": {"file": str(k / "coco_karpathy_val.json"), "gt": str(k / "coco_karpathy_val_gt.json")}}
    task = C.build_task(world_data(world, extra_eval_files=extra), preset("x2vlm-tiny"), tokenizer, "data")
    assert (task.model_task, task.eval_splits, task.selection_metric) == ("captioning", ["val", "test", "val_again"], "cider")
    ctx = EvalContext(DistInfo(), batch_size=5, out_dir=tmp_path)
    metrics = task.evaluate(model, "val", ctx)
    assert set(metrics) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"}
    assert all(np.isfinite(v) and v >= 0 for v in metrics.values())
    results = json.loads((tmp_path / "caption_val_result.json").read_text())
    gt = json.loads((k / "coco_karpathy_val_gt.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(im["id"] for im in gt["images"])
    assert all(isinstance(r["caption"], str) for r in results)
    assert task.evaluate(model, "val_again", ctx) == metrics
    assert json.loads((tmp_path / "caption_val_again_result.json").read_text()) == results
    pictures = task.draw(model, tmp_path / "pictures", ctx)
    assert len(pictures) == 2 and all(p.exists() and p.suffix == ".png" for p in pictures)
    assert all(p.name.startswith("caption_test_") for p in pictures)  # the test split is drawn, not the extra one


def test_finetuning_loop_then_inference_captions_equal_the_evaluation(world, tmp_path, capsys):
    """A short fine-tuning on the world; the run, loaded for inference, captions the test images as
    the evaluation wrote them (its beam search and prompt, saved by the fine-tuning); bf16 gives the
    same captions up to near ties (see below); the command line prints the API's caption."""
    import x2vlm
    from x2vlm.cli import main
    from x2vlm.train import finetune as FT

    data = world_data(world, randaugment=False, draw_images=1)
    cfg = tiny_finetune_config("captioning", data, tmp_path / "run", max_steps=2, batch_size=4, eval_batch_size=8)
    summary = FT.run_finetuning(cfg)
    assert list(summary["results"]) == ["val", "test"]
    run = tmp_path / "run"
    written = {r["image_id"]: r["caption"] for r in json.loads((run / "caption_test_result.json").read_text())}
    records = json.loads(Path(data["test_file"]).read_text())
    images = [str(world / "images" / r["image"]) for r in records]
    model = x2vlm.load(run)
    gen = model.caption_settings()
    assert (gen.num_beams, gen.max_new_tokens, gen.min_length) == (2, 5, 1)  # the evaluation's, saved by the fine-tuning
    captions = model.caption(images)
    assert captions == [written[r["image_id"]] for r in records]

    # bf16 autocast. After two steps the model's next-token distributions are nearly flat, so its two
    # beams often end within bf16's rounding of each other and bf16 may pick the other one (measured:
    # 10 of 12 images as fp32). What bf16 must keep: its captions are the beam search of the same
    # model under autocast, and where one differs, fp32 scores it within 2e of fp32's own caption
    # (e: the largest bf16 error of a caption's summed log-probability), i.e. it was a near tie.
    bf16 = x2vlm.load(run, dtype="bf16").caption(images)
    agree = sum(a == b for a, b in zip(captions, bf16)) / len(images)
    pixels = torch.stack([EvalTransform(model.cfg.image_res)(read_image(path)) for path in images])
    prompt, n = model.prompt_ids(), len(images)
    gen = C.check_generation_length(gen, len(prompt), model.cfg.text.max_position_embeddings)
    precisions = {"fp32": nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    ids = {}
    with torch.no_grad():
        for name, autocast in precisions.items():  # the token ids of the captions of each precision
            with autocast():
                vision, vision_mask = model.model.encode_images(pixels)
                ids[name] = beam_search(model.model, vision, vision_mask, prompt, gen)
            assert [C.decode_caption(model.tokenizer, s) for s in ids[name]] == (captions if name == "fp32" else bf16)
        scores = {}  # each precision's log-probabilities of the fp32 captions, then of the bf16 ones
        for name, autocast in precisions.items():
            with autocast():
                vision, vision_mask = model.model.encode_images(pixels)
                scores[name] = C.sequence_log_probs(model.model, torch.cat([vision, vision]), torch.cat([vision_mask, vision_mask]),
                                                    prompt, ids["fp32"] + ids["bf16"], model.tokenizer)
    fp32_scores, bf16_scores = scores["fp32"], scores["bf16"]
    error = float((bf16_scores - fp32_scores).abs().max())
    assert error < 0.1, f"bf16 changes a caption's log-probability by {error}"
    assert (fp32_scores[n:] >= fp32_scores[:n] - 2 * error - 1e-4).all()

    assert main(["predict", "caption", "--model", str(run), "--image", images[0]]) == 0
    assert json.loads(capsys.readouterr().out) == {"image": images[0], "caption": model.caption(images[0])}
    assert model.caption(images[0]) == captions[0]
    print(f"captioning: {len(images)} test images; bf16 caption = fp32 caption for {agree:.0%}; log-probability error "
          f"{error:.2g}, fp32 score gaps {(fp32_scores[:n] - fp32_scores[n:]).tolist()}", file=sys.stderr)


def test_coco_metrics_on_three_captions():  # needs java on the PATH (a declared requirement)
    refs = {1: ["A red star.", "a big red star"], 2: ["a blue circle on the left", "a blue circle"], 3: ["two green squares", "green squares"]}
    perfect = C.score_captions(refs, {1: "a big red star", 2: "a blue circle", 3: "two green squares"})
    assert set(perfect) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}
    assert perfect["bleu_1"] == pytest.approx(100.0, abs=1e-3) and perfect["rouge_l"] == pytest.approx(100.0)
    assert perfect["meteor"] > 90  # METEOR's java start-up is slow: run it once
    wrong = C.score_captions(refs, {1: "a dog", 2: "a cat", 3: "one tree"}, ["bleu", "rouge_l", "cider"])
    assert set(wrong) == set(perfect) - {"meteor"} and all(perfect[k] > wrong[k] for k in wrong)
    with pytest.raises(ValueError, match="same images"):
        C.score_captions(refs, {1: "a star"}, ["bleu"])


def test_build_task_rejects_bad_configuration(world, tokenizer, tmp_path):
    cfg = preset("x2vlm-tiny")
    with pytest.raises(ValueError, match="unknown key"):
        C.build_task(world_data(world, beam_size=3), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="cider is required"):
        C.build_task(world_data(world, metrics=["bleu"]), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="position embeddings"):  # 40 + 30 > 64 positions
        C.build_task(world_data(world, max_tokens=40, max_masks=30), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="key 'num_beams': expected int"):
        C.build_task(world_data(world, num_beams="3"), cfg, tokenizer, "data")
    gt = json.loads((world / "karpathy" / "coco_karpathy_val_gt.json").read_text())
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != gt["images"][0]["id"]]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(DataFormatError, match=f"image id {gt['images'][0]['id']} has no caption in .*gt.json"):
        C.build_task(world_data(world, val_gt=str(tmp_path / "gt.json")), cfg, tokenizer, "data")
    novel = str(world / "karpathy" / "coco_karpathy_test_novel.json")
    with pytest.raises(ValueError, match="data: key 'extra_eval_files': split name 'test' collides"):
        C.build_task(world_data(world, extra_eval_files={"test": {"file": novel}}), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match=r"data: key 'extra_eval_files.novel' must be a mapping \{file: ..., gt: ... \(optional\)\}"):
        C.build_task(world_data(world, extra_eval_files={"novel": novel}), cfg, tokenizer, "data")
    with pytest.raises(ValueError, match="data: key 'extra_eval_files.novel' must be a mapping"):
        C.build_task(world_data(world, extra_eval_files={"novel": {"file": novel, "references": novel}}), cfg, tokenizer, "data")
    with pytest.raises(FileNotFoundError, match="data: key 'extra_eval_files.novel.gt': no file at"):
        C.build_task(world_data(world, extra_eval_files={"novel": {"file": novel, "gt": novel + ".gt"}}), cfg, tokenizer, "data")
    without_gt = C.build_task(world_data(world, extra_eval_files={"novel": {"file": novel}}), cfg, tokenizer, "data")
    assert without_gt.eval_splits == ["val", "test", "novel"]  # references: the file's own captions, as for test_file


def test_image_ids_from_coco_file_names():
    assert C.image_id_from_file_name("val2014/COCO_val2014_000000391895.jpg", "f[0]") == 391895
    assert C.image_id_from_file_name("test/world_test_002251.jpg", "f[0]") == 2251
    with pytest.raises(DataFormatError, match="f\\[3\\]: field 'image'"):
        C.image_id_from_file_name("images/cat.jpg", "f[3]")


@pytest.mark.parametrize("name", ["captioning_coco_base.yaml", "captioning_coco_large.yaml", "captioning_small_world.yaml"])
def test_shipped_configs_use_known_keys(name):
    cfg = load_finetune_config(CONFIGS / name, task="captioning")
    assert set(cfg.data) <= C.DATA_KEYS and "cider" in cfg.data["metrics"]


# -- CIDEr-D and SCST -----------------------------------------------------------------------------
CORPUS = [["a red star on the left", "a big red star"], ["a blue circle", "one blue circle at the top"],
          ["two green squares", "green squares near a circle"], ["a yellow triangle", "the triangle is yellow"]]


def test_cider_d_properties():
    cider = C.CiderD(CORPUS)
    refs = CORPUS[0]
    exact = cider.score("a big red star", refs)
    assert exact > cider.score("a big blue star", refs) > 0
    assert exact > cider.score("a red star on the big left", refs)
    assert cider.score("two green squares", refs) == 0.0  # no shared n-gram
    assert cider.score("", refs) == 0.0
    # clipping: repeating a matching word does not buy more than saying it once
    assert cider.score("red red red red", refs) < cider.score("red star", refs)


def test_cider_d_agrees_with_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    candidates = ["a big red star", "a blue circle at the top", "green squares", "a red triangle"]
    gts = {i: refs for i, refs in enumerate(CORPUS)}
    res = {i: [c] for i, c in enumerate(candidates)}
    _, theirs = Cider().compute_score(gts, res)
    cider = C.CiderD(CORPUS)
    ours = [cider.score(c, refs) for c, refs in zip(candidates, CORPUS)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def test_scst_loss_sign_and_gradient():
    log_probs = torch.tensor([-2.0, -3.0], requires_grad=True)
    loss = C.scst_loss(log_probs, torch.tensor([1.0, 0.2]), torch.tensor([0.5, 0.5]))
    loss.backward()
    # descending the loss raises the better-than-greedy sample and lowers the worse one
    assert log_probs.grad[0] < 0 < log_probs.grad[1]
    torch.testing.assert_close(loss, -(0.5 * -2.0 + (-0.3) * -3.0) / 2 * torch.ones(()))


def test_scst_objective_pushes_up_a_rewarded_sample(tiny_state, tokenizer):
    model = build_tiny("captioning", tiny_state)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        vision, vmask = model.encode_images(images)
        sampled, before = sample_captions(model, vision, vmask, prompt, 5, torch.Generator().manual_seed(11))
        greedy = greedy_caption(model, vision, vmask, prompt, 5)
    # the references of each image are its own sample: the sample beats the greedy caption
    references = [[C.decode_caption(tokenizer, s)] for s in sampled] + [["completely different words"], ["nothing alike here"]]
    reward = C.CiderD(references)
    advantage = torch.tensor([reward.score(C.decode_caption(tokenizer, s), references[b]) -
                              reward.score(C.decode_caption(tokenizer, g), references[b]) for b, (s, g) in enumerate(zip(sampled, greedy))])
    assert (advantage > 0).all()
    objective = C.ScstObjective(reward, references, prompt, tokenizer, max_length=5)
    loss = objective(model, C.ScstBatch(images, torch.tensor([0, 1])), torch.Generator().manual_seed(11))["scst"]
    assert loss.item() > 0  # -(positive advantage x negative log-probability)
    loss.backward()
    assert model.vision_encoder.patch_embed.proj.weight.grad.abs().sum() > 0  # reaches the vision tower
    torch.optim.SGD(model.parameters(), lr=1e-6).step()  # the random tiny model has huge gradients
    with torch.no_grad():
        after = C.sequence_log_probs(model, *model.encode_images(images), PROMPT, sampled, tokenizer)
    assert (advantage * after).sum() > (advantage * before).sum()


def test_scst_task_builds_image_level_training_set(world, model, tokenizer):
    task = C.build_task(world_data(world, scst=True), preset("x2vlm-tiny"), tokenizer, "data")
    train = json.loads((world / "karpathy" / "coco_karpathy_train.json").read_text())
    assert len(task.train_set) == len({item["image"] for item in train})
    batch = task.collate([task.train_set.get(i, np.random.default_rng(i)) for i in range(2)])
    model.train()
    losses = task.loss(model, batch, torch.Generator().manual_seed(0))
    assert model.training  # sampling ran in eval mode, the mode is restored
    model.eval()
    assert set(losses) == {"scst"} and torch.isfinite(losses["scst"])
