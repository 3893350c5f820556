"""VQA v2: official accuracy, answer weights, loss, ranking evaluation, result files, conversion of
the official files, free-form answers, and one pass through the fine-tuning loop (tiny model, tiny world)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny, tiny_finetune_config

from x2vlm.config import preset
from x2vlm.data.readers import read_vqa_json
from x2vlm.data.transforms import FinetuneTrainTransform
from x2vlm.tasks import vqa as V
from x2vlm.tasks.common import EvalContext
from x2vlm.tasks.vqa_accuracy import (
    GroundTruth,
    normalize_ground_truth,
    normalize_prediction,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    vqa_accuracy,
)
from x2vlm.tokenizer import WordPieceTokenizer
from x2vlm.train.distributed import DistInfo


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


@pytest.fixture(scope="module")
def model(tiny_state):
    return build_tiny("vqa", tiny_state)


def world_data(world: Path, **changes) -> dict:
    data = {
        "train_files": [str(world / "vqa/vqa_train.json")],
        "val_file": str(world / "vqa/vqa_val.json"),
        "val_questions_file": str(world / "vqa/v2_OpenEnded_world_val_questions.json"),
        "val_annotations_file": str(world / "vqa/v2_world_val_annotations.json"),
        "test_file": str(world / "vqa/vqa_test.json"),
        "answer_list": str(world / "vqa/answer_list.json"),
        "image_root": str(world / "images"),
        "max_tokens": 24,
        "k_test": 8,
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


# -- official accuracy -------------------------------------------------------------------------------
def test_punctuation_rule():
    assert process_punctuation("t-shirt") == "t shirt"  # a mark between letters becomes a space
    assert process_punctuation("hello, world") == "hello world"  # next to a space: deleted
    assert process_punctuation("1,000") == "1000"  # a digit comma deletes every mark
    assert process_punctuation("yes.") == "yes"  # periods go unless a digit follows
    assert process_punctuation("3.5") == "3.5"
    assert process_punctuation("don't") == "don't"  # apostrophes are not punctuation here


def test_digit_article_and_contraction_rule():
    assert process_digit_article("Two") == "2"
    assert process_digit_article("none") == "0"
    assert process_digit_article("ten dogs") == "10 dogs"
    assert process_digit_article("The Dog") == "dog"
    assert process_digit_article("a an the cat") == "cat"
    assert process_digit_article("dont know") == "don't know"
    assert process_digit_article("its whats up") == "its what's up"
    assert process_digit_article("Im") == "im"  # the official table's capitalised keys never match


def test_normalize_prediction_and_ground_truth():
    assert normalize_prediction("  Two Dogs.\n") == "2 dogs"
    assert normalize_prediction("A t-shirt!") == "t shirt"
    assert normalize_ground_truth(["t-shirt", "shirt"]) == ["t shirt", "shirt"]
    assert normalize_ground_truth(["t-shirt", "t-shirt"]) == ["t-shirt", "t-shirt"]  # unanimous: untouched


@pytest.mark.parametrize("given_by, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_average(given_by, expected):
    answers = ["red"] * given_by + ["blue"] * (10 - given_by)
    assert question_accuracy("red", answers) == pytest.approx(expected)


def test_accuracy_compares_normalised_answers():
    assert question_accuracy("Two", ["2"] * 10) == 1.0
    assert question_accuracy("the dog", ["dog"] * 10) == 1.0
    assert question_accuracy("T-Shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # Unanimous ground truth is compared raw (official): the normalised "t shirt" misses "t-shirt".
    assert question_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    with pytest.raises(ValueError, match="at least two"):
        question_accuracy("yes", ["yes"])


def test_overall_per_answer_type_and_per_question_type():
    truth = {
        1: GroundTruth(["yes"] * 10, "yes/no", "is there"),
        2: GroundTruth(["2"] * 2 + ["3"] * 8, "number", "how many"),
        3: GroundTruth(["red"] * 10, "other", "what color is the"),
        4: GroundTruth(["no"] * 10, "yes/no", "is the"),
    }
    result = vqa_accuracy({1: "yes", 2: "two", 3: "blue", 4: "no", 99: "extra"}, truth)
    assert result.overall == pytest.approx(100 * (1 + 0.6 + 0 + 1) / 4)
    assert result.metrics() == pytest.approx({"acc": result.overall, "acc_number": 60.0, "acc_other": 0.0, "acc_yes/no": 100.0})
    assert result.per_question_type == pytest.approx({"how many": 60.0, "is the": 100.0, "is there": 100.0, "what color is the": 0.0})
    assert result.per_question[2] == pytest.approx(60.0)
    with pytest.raises(ValueError, match="no prediction"):
        vqa_accuracy({1: "yes"}, truth)


# -- training targets and loss -----------------------------------------------------------------------
def test_answer_weights_are_annotator_shares():
    answers, weights = V.answer_weights(["yes"] * 7 + ["no"] * 2 + ["maybe"], "vqa")
    assert answers == ["yes", "no", "maybe"]
    assert weights == pytest.approx([0.7, 0.2, 0.1])
    assert V.answer_weights(["dog", "cat", "dog", "dog"], None) == (["dog", "cat"], [0.75, 0.25])
    assert V.answer_weights(["on the table"], "vg", vg_weight=0.5) == (["on the table"], [0.5])


def test_loss_is_weighted_nll_per_question(model, tokenizer):
    torch.manual_seed(0)
    samples = [V.VQASample(torch.randn(3, 64, 64), "what color is it", ["red", "blue"], [0.7, 0.3]),
               V.VQASample(torch.randn(3, 64, 64), "how many", ["2"], [1.0])]
    batch = V.make_collate(tokenizer, 16)(samples)
    assert batch.answers_per_question.tolist() == [2, 1]
    assert batch.answer_ids[:, 0].eq(tokenizer.cls_token_id).all()
    loss = V.vqa_loss(model, batch, torch.Generator())["vqa"]
    expected = 0.0
    for q, sample in enumerate(samples):
        states = V.encode_questions(model, batch.images[q : q + 1], batch.question_ids[q : q + 1], batch.question_mask[q : q + 1])
        for answer, weight in zip(sample.answers, sample.weights):
            a_ids, a_mask = tokenizer([answer])
            expected += weight * model.answer_nll(a_ids, a_mask, states, batch.question_mask[q : q + 1])[0]
    torch.testing.assert_close(loss, expected / 2, rtol=1e-5, atol=1e-5)


def test_careful_flip_follows_question_and_answers(world, tokenizer):
    task = V.build_task(world_data(world, randaug=False, crop_scale=[1.0, 1.0]), preset("x2vlm-tiny"), tokenizer, "test")
    no_flip = FinetuneTrainTransform(64, scale=(1.0, 1.0), randaug=False, hflip=False)
    examples = task.train_set.examples
    left_right = next(k for k, (ex, _) in enumerate(examples) if "left" in ex.question.split() or "right" in ex.question.split())
    plain = next(k for k, (ex, _) in enumerate(examples) if "left" not in ex.question and "right" not in ex.question)
    for seed in range(6):
        sample = task.train_set.get(left_right, np.random.default_rng(seed))
        image = V._load(task.train_set.image_roots, examples[left_right][0], "test")
        assert torch.equal(sample.pixels, no_flip(image, np.random.default_rng(seed)))
    image = V._load(task.train_set.image_roots, examples[plain][0], "test")
    flipped = [not torch.equal(task.train_set.get(plain, np.random.default_rng(s)).pixels, no_flip(image, np.random.default_rng(s)))
               for s in range(6)]
    assert any(flipped) and not all(flipped)


# -- evaluation --------------------------------------------------------------------------------------
def test_evaluate_ranks_answers_and_writes_results(world, model, tokenizer, tmp_path):
    task = V.build_task(world_data(world), preset("x2vlm-tiny"), tokenizer, "test")
    assert (task.model_task, task.eval_splits, task.selection_metric) == ("vqa", ["val", "test"], "acc")
    assert task.lr_mult_prefixes == ("answer_decoder.", "answer_head.")
    ctx = EvalContext(DistInfo(), batch_size=16, out_dir=tmp_path)
    metrics = task.evaluate(model, "val", ctx)
    assert {"acc", "acc_yes/no", "acc_number", "acc_other"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("acc", "acc_yes/no", "acc_number", "acc_other"))
    val = read_vqa_json(world / "vqa/vqa_val.json")
    result = json.loads((tmp_path / "vqa_val_result.json").read_text())
    answers = set(json.loads((world / "vqa/answer_list.json").read_text()))
    assert [r["question_id"] for r in result] == [ex.question_id for ex in val]
    assert all(r["answer"] in answers for r in result)
    truth = {ex.question_id: GroundTruth(ex.answers) for ex in val}
    assert metrics["acc"] == pytest.approx(vqa_accuracy({r["question_id"]: r["answer"] for r in result}, truth).overall)
    per_type = json.loads((tmp_path / "vqa_val_accuracy.json").read_text())
    assert set(per_type["perAnswerType"]) == {"yes/no", "number", "other"}
    assert per_type["perQuestionType"]

    # The predictions are the rank_answers top-1 of each question, whatever the batching.
    split = V.load_eval_split("val", str(world / "vqa/vqa_val.json"), None, None)
    answer_list = json.loads((world / "vqa/answer_list.json").read_text())
    ids, mask = tokenizer(answer_list)
    some = [0, 7, 20]
    best, _ = V.rank_split(model, split, some, task.train_set.image_roots, tokenizer, task.train_set.settings, ids, mask, batch_size=1)
    assert [result[k]["answer"] for k in some] == [answer_list[i] for i in best[:, 0].tolist()]

    test_metrics = task.evaluate(model, "test", ctx)  # processed json only: 10 answers each, no types
    assert "acc" in test_metrics and "acc_other" not in test_metrics
    assert (tmp_path / "vqa_test_result.json").exists()


def test_test_split_without_answers_still_writes_predictions(world, model, tokenizer, tmp_path):
    records = json.loads((world / "vqa/vqa_test.json").read_text())[:6]
    for record in records:
        del record["answer"]
    test_file = tmp_path / "test_dev.json"
    test_file.write_text(json.dumps(records))
    task = V.build_task(world_data(world, test_file=str(test_file)), preset("x2vlm-tiny"), tokenizer, "test")
    metrics = task.evaluate(model, "test", EvalContext(DistInfo(), batch_size=4, out_dir=tmp_path))
    assert metrics == {"questions": 6.0}
    result = json.loads((tmp_path / "vqa_test_result.json").read_text())
    assert [r["question_id"] for r in result] == [r["question_id"] for r in records]


def test_draw_writes_pictures(world, model, tokenizer, tmp_path):
    task = V.build_task(world_data(world), preset("x2vlm-tiny"), tokenizer, "test")
    paths = task.draw(model, tmp_path / "pictures", EvalContext(DistInfo()))
    assert len(paths) == V.DRAWN_ITEMS and all(p.exists() and p.suffix == ".png" for p in paths)


def test_generate_answers_is_greedy_and_stops_at_sep(model, tokenizer):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    q_ids, q_mask = tokenizer(["what color is the circle", "how many", "is there a red star on the left"], max_length=16)
    states = V.encode_questions(model, images, q_ids, q_mask)
    answers = V.generate_answers(model, states, q_mask, tokenizer, max_new_tokens=4)
    assert len(answers) == 3
    for q in range(3):  # one question at a time, recomputing each step's argmax from scratch
        ids = [tokenizer.cls_token_id]
        for _ in range(4):
            prefix = torch.tensor([ids])
            logits = model.answer_logits(prefix, torch.ones_like(prefix), states[q : q + 1], q_mask[q : q + 1])[0, -1]
            logits[[tokenizer.pad_token_id, tokenizer.cls_token_id]] = -torch.inf
            ids.append(int(logits.argmax()))
            if ids[-1] == tokenizer.sep_token_id:
                break
        tokens = ids[1:-1] if ids[-1] == tokenizer.sep_token_id else ids[1:]
        assert answers[q] == tokenizer.decode(tokens)


# -- configuration errors ----------------------------------------------------------------------------
def test_build_task_rejects_bad_configuration(world, tokenizer, tmp_path):
    cfg = preset("x2vlm-tiny")
    with pytest.raises(ValueError, match="unknown key"):
        V.build_task(world_data(world, k_tset=5), cfg, tokenizer, "t")
    with pytest.raises(ValueError, match="val_annotations_file"):
        V.build_task(world_data(world, val_annotations_file=None), cfg, tokenizer, "t")
    with pytest.raises(ValueError, match="'val_file'"):
        V.build_task(world_data(world, val_file=None, val_questions_file=None, val_annotations_file=None), cfg, tokenizer, "t")
    unanswered = tmp_path / "val_no_answers.json"
    unanswered.write_text(json.dumps([{k: v for k, v in r.items() if k != "answer"}
                                      for r in json.loads((world / "vqa/vqa_val.json").read_text())]))
    with pytest.raises(ValueError, match="need answers"):
        V.build_task(world_data(world, val_file=str(unanswered), val_questions_file=None, val_annotations_file=None),
                     cfg, tokenizer, "t")
    with pytest.raises(ValueError, match="crop_scale"):
        V.build_task(world_data(world, crop_scale=[0.0, 1.0]), cfg, tokenizer, "t")
    novel = str(world / "vqa/vqa_test_novel.json")
    with pytest.raises(ValueError, match="t: key 'extra_eval_files': split name 'val' collides"):
        V.build_task(world_data(world, extra_eval_files={"val": novel}), cfg, tokenizer, "t")
    with pytest.raises(ValueError, match="t: key 'extra_eval_files' must map split names to files"):
        V.build_task(world_data(world, extra_eval_files=novel), cfg, tokenizer, "t")
    with pytest.raises(ValueError, match="t: key 'extra_eval_files.test_novel' must be a file path"):
        V.build_task(world_data(world, extra_eval_files={"test_novel": {"file": novel}}), cfg, tokenizer, "t")


# -- official files -> processed json ----------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val"])
def test_conversion_reproduces_the_processed_json(world, tmp_path, split):
    manifest = json.loads((world / "manifest.json").read_text())
    out = tmp_path / f"vqa_{split}.json"
    n = V.convert_vqa_official(world / f"vqa/v2_OpenEnded_world_{split}_questions.json",
                               world / f"vqa/v2_world_{split}_annotations.json", out,
                               image_template=manifest["vqa_image_template"])
    expected = json.loads((world / f"vqa/vqa_{split}.json").read_text())
    assert n == len(expected)
    assert json.loads(out.read_text()) == expected


def test_conversion_without_annotations_and_with_coco_names(world, tmp_path):
    out = tmp_path / "vqa_test.json"
    V.convert_vqa_official(world / "vqa/v2_OpenEnded_world_test_questions.json", None, out, image_dir_prefix="coco/")
    records = json.loads(out.read_text())
    first = json.loads((world / "vqa/v2_OpenEnded_world_test_questions.json").read_text())["questions"][0]
    assert records[0] == {"question_id": first["question_id"], "question": first["question"], "dataset": "vqa",
                          "image": f"coco/test/COCO_test_{first['image_id']:012d}.jpg"}
    assert read_vqa_json(out, require_answers=False)[0].answers is None


# -- through the shared loop -------------------------------------------------------------------------
def test_finetuning_loop_runs_the_task(world, tmp_path):
    from x2vlm.train import finetune as FT

    # an extra split reading the test file: evaluated after val and test, exactly as test is
    data = world_data(world, randaug=False, extra_eval_files={"test_again": str(world / "vqa/vqa_test.json")})
    cfg = tiny_finetune_config("vqa", data, tmp_path / "run", max_steps=2, batch_size=4, eval_batch_size=32, log_every=1)
    summary = FT.run_finetuning(cfg)
    assert list(summary["results"]) == ["val", "test", "test_again"]
    assert "acc_yes/no" in summary["results"]["val"]
    assert summary["results"]["test_again"] == summary["results"]["test"]
    run = tmp_path / "run"
    assert (run / "vqa_test_again_result.json").read_text() == (run / "vqa_test_result.json").read_text()
    assert len(summary["pictures"]) == V.DRAWN_ITEMS
    assert all(Path(p).name[: -len("_00000.png")] == "vqa_test" for p in summary["pictures"])  # test is drawn, not the extra

    # the trained run, loaded for inference, answers the test questions as the evaluation did
    import x2vlm

    predicted = {r["question_id"]: r["answer"] for r in json.loads((run / "vqa_test_result.json").read_text())}
    questions = read_vqa_json(world / "vqa/vqa_test.json")
    images = [str(world / "images" / q.image) for q in questions]
    texts = [q.question for q in questions]
    answers = x2vlm.load(run).answer(images, texts)
    assert [a.answer for a in answers] == [predicted[q.question_id] for q in questions]
    bf16 = x2vlm.load(run, dtype="bf16").answer(images, texts)
    agree = sum(a.answer == b.answer for a, b in zip(answers, bf16)) / len(answers)
    assert agree >= 0.9, f"bf16 and fp32 agree on {agree:.0%} of the test answers"


def test_eval_subset_keeps_evenly_spaced_questions(world, model, tokenizer, tmp_path):
    task = V.build_task(world_data(world, eval_subset=5), preset("x2vlm-tiny"), tokenizer, "test")
    metrics = task.evaluate(model, "val", EvalContext(DistInfo(), batch_size=8, out_dir=tmp_path))
    assert metrics["questions"] == 5.0 and "acc" in metrics
    val = read_vqa_json(world / "vqa/vqa_val.json")
    result = json.loads((tmp_path / "vqa_val_result.json").read_text())
    assert len(result) == 5
    assert (result[0]["question_id"], result[-1]["question_id"]) == (val[0].question_id, val[-1].question_id)
    with pytest.raises(ValueError, match="eval_subset"):
        V.build_task(world_data(world, eval_subset=0), preset("x2vlm-tiny"), tokenizer, "test")


# -- shipped configurations --------------------------------------------------------------------------
CONFIGS = Path(V.__file__).parents[1] / "configs" / "finetune"


@pytest.mark.parametrize("name, task", [("vqa2_base", "vqa"), ("vqa2_large", "vqa"), ("msrvtt_qa_base", "video_qa"),
                                        ("msvd_qa_base", "video_qa"), ("vqa_small_world", "vqa"),
                                        ("video_qa_small_world", "video_qa")])
def test_shipped_configs_parse(name, task):
    from x2vlm.tasks import video_qa
    from x2vlm.train import finetune as FT

    cfg = FT.load_finetune_config(CONFIGS / f"{name}.yaml", task=task)
    module = V if task == "vqa" else video_qa
    assert set(cfg.data) <= module.DATA_KEYS
    FT.base_model_config(cfg)  # the preset and its changes exist


def relocated(value, world: Path):
    """A config value with every ``runs/world`` path (in lists and mappings too) pointed at ``world``."""
    if isinstance(value, dict):
        return {k: relocated(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [relocated(v, world) for v in value]
    return value.replace("runs/world", str(world)) if isinstance(value, str) else value


@pytest.mark.parametrize("name", ["vqa_small_world", "video_qa_small_world"])
def test_world_configs_build_on_a_world(world, name):
    from x2vlm.train import finetune as FT

    cfg = FT.load_finetune_config(CONFIGS / f"{name}.yaml")
    data = relocated(cfg.data, world)
    model_cfg = FT.base_model_config(cfg)
    task = FT.build_task(FT.dataclasses.replace(cfg, data=data), model_cfg, WordPieceTokenizer.from_name_or_path(model_cfg.tokenizer))
    assert task.eval_splits == ["val", "test", "test_novel"]
    assert len(task.train_set) > 0


def test_convert_vqa_command_writes_the_processed_json(world, tmp_path):
    from x2vlm.cli import main

    manifest = json.loads((world / "manifest.json").read_text())
    out = tmp_path / "vqa_val.json"
    rc = main(["convert-vqa", str(world / "vqa/v2_OpenEnded_world_val_questions.json"), str(out),
               "--annotations", str(world / "vqa/v2_world_val_annotations.json"),
               "--image-template", manifest["vqa_image_template"]])
    assert rc == 0
    assert json.loads(out.read_text()) == json.loads((world / "vqa/vqa_val.json").read_text())
