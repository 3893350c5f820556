"""Video QA (MSRVTT-QA / MSVD-QA style): data, classification loss, evaluation with unknown answers,
frames from video files and from base64 frame lists, and one pass through the fine-tuning loop."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_finetune_config

from x2vlm.checkpoint import load_official
from x2vlm.config import preset
from x2vlm.data.video import read_video_frames
from x2vlm.models.x2vlm import X2VLM
from x2vlm.tasks import video_qa as VQ
from x2vlm.tasks.common import EvalContext
from x2vlm.train.distributed import DistInfo


@pytest.fixture(scope="module")
def world(tiny_world) -> Path:
    return tiny_world


@pytest.fixture(scope="module")
def num_labels(world) -> int:
    return len(json.loads((world / "msrvtt/train_ans2label.json").read_text()))


@pytest.fixture(scope="module")
def model(tiny_state, num_labels):
    model = X2VLM(preset("x2vlm-tiny", task="classification", num_labels=num_labels))
    assert {n.split(".")[0] for n in load_official(model, tiny_state)} == {"cls_head"}
    return model.eval()


def world_data(world: Path, **changes) -> dict:
    data = {
        "train_file": str(world / "msrvtt/msrvtt_qa_train.jsonl"),
        "val_file": str(world / "msrvtt/msrvtt_qa_val.jsonl"),
        "test_file": str(world / "msrvtt/msrvtt_qa_test.jsonl"),
        "ans2label_file": str(world / "msrvtt/train_ans2label.json"),
        "video_root": str(world / "videos"),
        "max_tokens": 24,
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def with_unknown_answers(path: Path, out: Path, answer: str = "no such answer") -> Path:
    """A copy of a jsonl file whose first two questions have an answer outside the vocabulary."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in lines[:2]:
        record["answer"] = answer
    out.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return out


def test_task_shape_and_unknown_training_answers_are_skipped(world, tokenizer, tmp_path, num_labels, caplog):
    train = with_unknown_answers(world / "msrvtt/msrvtt_qa_train.jsonl", tmp_path / "train.jsonl")
    with caplog.at_level("INFO", logger="x2vlm.tasks.video_qa"):
        task = VQ.build_task(world_data(world, train_file=str(train)), preset("x2vlm-tiny"), tokenizer, "test")
    assert (task.model_task, task.model_changes) == ("classification", {"num_labels": num_labels})
    assert (task.eval_splits, task.selection_metric) == (["val", "test"], "acc")
    total = sum(1 for line in train.read_text().splitlines() if line.strip())
    assert len(task.train_set) == total - 2
    assert "skipped 2 of" in caplog.text


def test_training_sample_and_loss(world, tokenizer, model):
    task = VQ.build_task(world_data(world), preset("x2vlm-tiny"), tokenizer, "test")
    samples = [task.train_set.get(k, np.random.default_rng([3, k])) for k in range(3)]
    assert samples[0].frames.shape == (3, 3, 64, 64)  # the tiny preset's frame_len and resolution
    again = task.train_set.get(0, np.random.default_rng([3, 0]))
    assert torch.equal(again.frames, samples[0].frames)
    batch = task.collate(samples)
    loss = task.loss(model, batch, torch.Generator())["cls"]
    logits = VQ.answer_logits(model, batch.videos, batch.question_ids, batch.question_mask)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch.labels))
    items = task.train_set.items
    assert batch.labels.tolist() == [items[k].label for k in range(3)]


def test_evaluate_counts_unknown_answers_as_wrong(world, tokenizer, model, tmp_path):
    val = with_unknown_answers(world / "msrvtt/msrvtt_qa_val.jsonl", tmp_path / "val.jsonl")
    task = VQ.build_task(world_data(world, val_file=str(val)), preset("x2vlm-tiny"), tokenizer, "test")
    metrics = task.evaluate(model, "val", EvalContext(DistInfo(), batch_size=4, out_dir=tmp_path))
    result = json.loads((tmp_path / "video_qa_val_result.json").read_text())
    records = [json.loads(line) for line in val.read_text().splitlines() if line.strip()]
    assert [r["question"] for r in result] == [r["question"] for r in records]
    correct = [r["prediction"] == r["answer"] for r in result]
    assert not any(correct[:2])
    assert metrics["acc"] == pytest.approx(100 * sum(correct) / len(correct))
    vocabulary = json.loads((world / "msrvtt/train_ans2label.json").read_text())
    unknown = [r["answer"] not in vocabulary for r in records]
    assert unknown[:2] == [True, True]
    assert metrics["unknown_answers"] == sum(unknown) and metrics["questions"] == len(records)
    assert not any(c for c, u in zip(correct, unknown) if u)
    types = {r["answer_type"] for r in records}
    assert {f"acc_{t}" for t in types} <= set(metrics)

    # One clip per question in its own batch gives the same predictions.
    items = VQ.load_video_qa(str(val), json.loads((world / "msrvtt/train_ans2label.json").read_text()), VQ.EVAL_QUESTION_WORDS)
    labels = VQ.predict_labels(model, items, list(range(len(items))), task.train_set.videos, tokenizer,
                               task.train_set.settings, batch_size=1)
    names = {v: k for k, v in json.loads((world / "msrvtt/train_ans2label.json").read_text()).items()}
    assert [names[label] for label in labels.tolist()] == [r["prediction"] for r in result]


def test_base64_frame_lists_match_video_files(world, tokenizer, model, tmp_path):
    video_id = json.loads((world / "msrvtt/msrvtt_qa_val.jsonl").read_text().splitlines()[0])["video_id"]
    frames = read_video_frames(world / "videos" / f"{video_id}.mp4")
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    frame_dir = tmp_path / "frames"
    frame_dir.mkdir()
    (frame_dir / f"video_{int(video_id[5:])}.json").write_text(json.dumps(encoded))
    from_json = VQ.VideoSource(str(frame_dir), "video_{video_number}.json").frames(video_id, 3, training=False)
    from_mp4 = VQ.VideoSource(str(world / "videos")).frames(video_id, 3, training=False)
    assert [np.asarray(f).tolist() for f in from_json] == [np.asarray(f).tolist() for f in from_mp4]
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    trained_json = VQ.VideoSource(str(frame_dir), "video_{video_number}.json").frames(video_id, 3, True, rng_a)
    trained_mp4 = VQ.VideoSource(str(world / "videos")).frames(video_id, 3, True, rng_b)
    assert [np.asarray(f).tolist() for f in trained_json] == [np.asarray(f).tolist() for f in trained_mp4]
    (frame_dir / "video_999.json").write_text(json.dumps({"frames": encoded}))
    with pytest.raises(ValueError, match="list of base64 frames"):
        VQ.VideoSource(str(frame_dir), "video_{video_number}.json").frames("video999", 3, training=False)


def test_build_task_rejects_bad_configuration(world, tokenizer):
    with pytest.raises(ValueError, match="frame_len"):
        VQ.build_task(world_data(world), preset("x2vlm-base"), tokenizer, "t")
    with pytest.raises(ValueError, match="video_template"):
        VQ.build_task(world_data(world, video_template="{name}.mp4"), preset("x2vlm-tiny"), tokenizer, "t")
    with pytest.raises(ValueError, match="unknown key"):
        VQ.build_task(world_data(world, frames=3), preset("x2vlm-tiny"), tokenizer, "t")
    with pytest.raises(ValueError, match="'val_file'"):
        VQ.build_task(world_data(world, val_file=None), preset("x2vlm-tiny"), tokenizer, "t")
    novel = str(world / "msrvtt/msrvtt_qa_test_novel.jsonl")
    with pytest.raises(ValueError, match="t: key 'extra_eval_files': split name 'test' collides"):
        VQ.build_task(world_data(world, extra_eval_files={"test": novel}), preset("x2vlm-tiny"), tokenizer, "t")
    with pytest.raises(ValueError, match="t: key 'extra_eval_files' must map split names to files"):
        VQ.build_task(world_data(world, extra_eval_files=[novel]), preset("x2vlm-tiny"), tokenizer, "t")
    with pytest.raises(ValueError, match="t: key 'extra_eval_files': split name 'novel/a' must be"):
        VQ.build_task(world_data(world, extra_eval_files={"novel/a": novel}), preset("x2vlm-tiny"), tokenizer, "t")


def test_finetuning_loop_runs_the_task(world, tmp_path, capsys):
    from x2vlm.train import finetune as FT

    # an extra split reading the test file: evaluated after val and test, exactly as test is
    data = world_data(world, randaug=False, extra_eval_files={"test_again": str(world / "msrvtt/msrvtt_qa_test.jsonl")})
    cfg = tiny_finetune_config("video_qa", data, tmp_path / "run", max_steps=2, batch_size=4, eval_batch_size=16, log_every=1)
    summary = FT.run_finetuning(cfg)
    assert list(summary["results"]) == ["val", "test", "test_again"]
    assert 0.0 <= summary["results"]["test"]["acc"] <= 100.0
    assert summary["results"]["test_again"] == summary["results"]["test"]
    run = tmp_path / "run"
    assert (run / "video_qa_test_again_result.json").read_text() == (run / "video_qa_test_result.json").read_text()
    assert len(summary["pictures"]) == VQ.DRAWN_ITEMS
    assert all(Path(p).name[: -len("_00000.png")] == "video_qa_test" for p in summary["pictures"])  # test is drawn

    # the trained run, loaded for inference, answers the test questions (videos read from their files)
    # as the evaluation did; bf16 autocast agrees with fp32 on the top answer
    import x2vlm
    from x2vlm.cli import main

    result = json.loads((run / "video_qa_test_result.json").read_text())
    videos = [str(world / "videos" / f"{r['video_id']}.mp4") for r in result]
    questions = [r["question"] for r in result]
    model = x2vlm.load(run)
    answers = model.answer(videos, questions)
    assert [a.answer for a in answers] == [r["prediction"] for r in result]
    bf16 = x2vlm.load(run, dtype="bf16").answer(videos, questions)
    agree = sum(a.answer == b.answer for a, b in zip(answers, bf16)) / len(answers)
    assert agree >= 0.9, f"bf16 and fp32 agree on {agree:.0%} of the {len(answers)} test answers"
    # the command line prints what the API returns for one item
    assert main(["predict", "vqa", "--model", str(run), "--video", videos[0], "--question", questions[0]]) == 0
    printed = json.loads(capsys.readouterr().out)
    top_k = min(5, len(model.label_names()))
    assert printed == {"video": videos[0], "question": questions[0], **model.answer(videos[0], questions[0], top_k=top_k).to_dict()}
    assert printed["answer"] == result[0]["prediction"]
    print(f"video QA: bf16 answers = fp32 answers for {agree:.0%} of {len(answers)} test questions", file=sys.stderr)
