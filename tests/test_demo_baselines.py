"""Input-blind chance levels (``x2vlm.demo.baselines``): hand-built files with hand-computed values per
task, the random-ranking recalls against the retrieval task's own ranking code, a constant model
through the tasks' own ``evaluate`` (NLVR2, grounding), and every task on the tiny world."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY_VOCAB, tiny_finetune_config
from x2vlm.demo.baselines import chance_levels, random_hit_probability, random_ranking_recalls

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "x2vlm" / "configs" / "finetune"


def write_json(path: Path, value) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return str(path)


def write_jsonl(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- retrieval --------------------------------------------------------------------------------------
def retrieval_files(tmp_path, captions_per_image=(2, 2, 2, 2)):
    items = [{"image": f"img{i}.jpg", "caption": [f"caption {i} number {j}" for j in range(c)]}
             for i, c in enumerate(captions_per_image)]
    train = [{"image": "img0.jpg", "caption": "a caption", "image_id": 0}]
    return {"train_files": [write_json(tmp_path / "train.json", train)], "val_file": write_json(tmp_path / "val.json", items),
            "test_file": write_json(tmp_path / "test.json", items), "image_root": str(tmp_path)}


def test_retrieval_four_images_two_captions_by_hand(tmp_path):
    levels = chance_levels("retrieval", retrieval_files(tmp_path))
    assert list(levels) == ["val", "test"]
    m = levels["test"]
    # image -> text: 2 of 8 texts are right; hit at 1: 1 - C(6,1)/C(8,1) = 1 - 6/8; at 5: 1 - C(6,5)/C(8,5) = 1 - 6/56;
    # at 10 every text is ranked
    assert m["txt_r1"] == pytest.approx(100 * (1 - 6 / 8))
    assert m["txt_r5"] == pytest.approx(100 * (1 - 6 / 56))
    assert m["txt_r10"] == pytest.approx(100.0)
    # text -> image: 1 of 4 images; at 5 and 10 all 4 are ranked
    assert (m["img_r1"], m["img_r5"], m["img_r10"]) == pytest.approx((25.0, 100.0, 100.0))
    assert m["txt_r_mean"] == pytest.approx((25 + 100 * 50 / 56 + 100) / 3)
    assert m["img_r_mean"] == pytest.approx(75.0)
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + 75.0) / 2)
    # k_test (default 128) >= 10: the ITC and the re-ranked keys have the same chance level
    for key in ("txt_r1", "txt_r5", "img_r10", "r_mean"):
        assert m[f"itc_{key}"] == m[f"itm_plus_itc_{key}"] == m[key]


def test_retrieval_keys_are_the_tasks_and_k_test_caps_the_re_ranked_recalls(tmp_path):
    from x2vlm.tasks.retrieval import RECALL_KEYS

    data = retrieval_files(tmp_path)
    m = chance_levels("retrieval", {**data, "k_test": 2}, splits=["val"])["val"]
    assert set(m) == {prefix + key for prefix in ("", "itc_", "itm_plus_itc_") for key in RECALL_KEYS}
    # re-ranked (2 candidates per query): image -> text at 5 is a random top 2 of 8: 1 - C(6,2)/C(8,2) = 1 - 15/28;
    # at 10 all 8 texts fit, so even a positive left out of the candidates (ranked last) counts
    assert m["txt_r5"] == pytest.approx(100 * (1 - 15 / 28))
    assert m["txt_r10"] == pytest.approx(100.0)
    assert m["itc_txt_r5"] == pytest.approx(100 * (1 - 6 / 56))  # ITC ranks everything
    assert m["img_r5"] == pytest.approx(100.0)  # 4 images: all within 5


def test_hit_probability_by_hand():
    assert random_hit_probability(8, 2, 1) == pytest.approx(1 - 6 / 8)
    assert random_hit_probability(10, 3, 2) == pytest.approx(1 - (7 * 6) / (10 * 9))
    assert random_hit_probability(5, 5, 1) == 1
    assert random_hit_probability(4, 1, 10) == 1
    with pytest.raises(ValueError):
        random_hit_probability(4, 0, 1)


def test_random_ranking_recalls_match_the_tasks_ranking_code():
    """Random ITC similarities and random ITM logits through the task's candidate selection, score
    matrices and ``ranking_metrics``: the mean recalls approach the analytic values."""
    from x2vlm.tasks.retrieval import candidate_pairs, flat_metrics, ranking_metrics, scatter_scores

    counts = [1, 2, 3] * 4  # 12 items, 24 texts
    img2txt, txt2img = [], []
    for i, c in enumerate(counts):
        img2txt.append(list(range(len(txt2img), len(txt2img) + c)))
        txt2img += [i] * c
    k_test, trials = 3, 400
    gen = torch.Generator().manual_seed(0)
    total: dict[str, float] = {}
    for _ in range(trials):
        sims = torch.rand(len(counts), len(txt2img), generator=gen)
        pairs, inverse = candidate_pairs(sims, k_test)
        scores = scatter_scores(sims, pairs, inverse, torch.randn(len(pairs), generator=gen), k_test)
        for key, value in flat_metrics(ranking_metrics(scores, img2txt, txt2img)).items():
            total[key] = total.get(key, 0.0) + value / trials
    two_stage = random_ranking_recalls(img2txt, len(txt2img), k_test)
    itc = random_ranking_recalls(img2txt, len(txt2img))
    expected = flat_metrics({"itm": two_stage, "itc": itc, "itm_plus_itc": two_stage})
    assert set(total) == set(expected)
    for key, value in expected.items():
        assert total[key] == pytest.approx(value, abs=3.0), key
    assert expected["img_r10"] == pytest.approx(100 * 3 / 12) and expected["itc_img_r10"] == pytest.approx(100 * 10 / 12)


def test_retrieval_string_caption_is_read_as_the_task_reads_it(tmp_path):
    """The task's evaluation reader wants a list of captions per item; the chance levels read the
    file with the same reader, so they reject what the task rejects."""
    from x2vlm.data.readers import DataFormatError

    data = retrieval_files(tmp_path)
    write_json(Path(data["val_file"]), [{"image": "img0.jpg", "caption": "one caption"}])
    with pytest.raises(DataFormatError, match="caption"):
        chance_levels("retrieval", data)


def test_retrieval_video_keys_and_extra_splits(tmp_path):
    items = [{"video_id": f"v{i}", "video": f"v{i}.mp4", "clip_caption": ["a clip", "another clip"][: 1 + i % 2]}
             for i in range(5)]
    data = {"train_files": ["unused.json"], "val_file": write_json(tmp_path / "val.json", items),
            "test_file": write_json(tmp_path / "test.json", items), "image_root": str(tmp_path), "video": True,
            "text_key": "clip_caption", "extra_eval_files": {"test_novel": write_json(tmp_path / "novel.json", items[:3])}}
    levels = chance_levels("retrieval", data)
    assert list(levels) == ["val", "test", "test_novel"]
    assert levels["test"]["img_r1"] == pytest.approx(100 / 5)
    assert levels["test_novel"]["img_r1"] == pytest.approx(100 / 3)
    # 5 videos with 1, 2, 1, 2, 1 captions among 7 texts: image -> text at 1
    assert levels["test"]["txt_r1"] == pytest.approx(100 * (3 * (1 / 7) + 2 * (2 / 7)) / 5)
    assert chance_levels("retrieval", data, splits=["test_novel"]).keys() == {"test_novel"}
    with pytest.raises(ValueError, match="unknown split"):
        chance_levels("retrieval", data, splits=["nope"])
    with pytest.raises(ValueError, match="collides"):
        chance_levels("retrieval", {**data, "extra_eval_files": {"test": data["test_file"]}})


# -- VQA --------------------------------------------------------------------------------------------
def vqa_question(qid, answers, image="img.jpg", dataset="vqa"):
    return {"question_id": qid, "image": image, "question": f"question {qid}?", "answer": answers, "dataset": dataset}


def test_vqa_majority_by_training_weight_and_official_accuracy(tmp_path):
    train = [
        vqa_question(1, ["two"] * 10),  # two: 1.0 (10 annotator answers)
        vqa_question(2, ["yes"] * 5 + ["no"] * 5),  # yes: 0.5, no: 0.5
        vqa_question(3, ["yes"], dataset="vg"),  # Visual Genome answers weigh vg_answer_weight (0.5) each
        vqa_question(4, ["yes"], dataset="vg"),
    ]  # weights: yes 1.5 > two 1.0 (raw counts would pick "two": 10 against 7)
    val = [
        vqa_question(10, ["yes"] * 10),  # 10 of 10 agree: 1.0
        vqa_question(11, ["yes"] * 2 + ["no"] * 8),  # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
        vqa_question(12, ["no"] * 10),  # 0
    ]
    data = {"train_files": [write_json(tmp_path / "train.json", train)], "val_file": write_json(tmp_path / "val.json", val),
            "answer_list": write_json(tmp_path / "answers.json", ["yes", "no", "two"]), "image_root": str(tmp_path)}
    levels = chance_levels("vqa", data)
    assert list(levels) == ["val"]  # no test_file
    assert levels["val"] == pytest.approx({"acc": (100 + 60 + 0) / 3})
    assert chance_levels("vqa", {**data, "vg_answer_weight": 0.25})["val"]["acc"] == pytest.approx(0.0)  # "two" wins
    # eval_subset: the evenly spaced questions the task evaluates (the first and the last)
    assert chance_levels("vqa", {**data, "eval_subset": 2})["val"]["acc"] == pytest.approx(50.0)


def test_vqa_answer_types_from_the_official_files_and_extra_splits(tmp_path):
    train = [vqa_question(1, ["yes"] * 10), vqa_question(2, ["yes"] * 9 + ["2"])]
    val = [vqa_question(10, ["yes"] * 10)]
    test = [vqa_question(20, ["yes"] * 10), vqa_question(21, ["2"] * 10), vqa_question(22, ["yes"] * 3 + ["red"] * 7)]
    questions = {"data_subtype": "test", "questions": [{"question_id": q["question_id"], "image_id": 1, "question": q["question"]}
                                                       for q in test]}
    types = {20: "yes/no", 21: "number", 22: "other"}
    annotations = {"annotations": [{"question_id": q["question_id"], "image_id": 1, "answers": [{"answer": a} for a in q["answer"]],
                                    "multiple_choice_answer": q["answer"][0], "question_type": "what",
                                    "answer_type": types[q["question_id"]]} for q in test]}
    data = {"train_files": write_json(tmp_path / "train.json", train), "val_file": write_json(tmp_path / "val.json", val),
            "test_file": write_json(tmp_path / "test.json", test),
            "test_questions_file": write_json(tmp_path / "q.json", questions),
            "test_annotations_file": write_json(tmp_path / "a.json", annotations),
            "extra_eval_files": {"test_novel": str(tmp_path / "test.json"),
                                 "unanswered": write_json(tmp_path / "u.json", [{k: v for k, v in test[0].items() if k != "answer"}])},
            "answer_list": write_json(tmp_path / "answers.json", ["yes", "2", "red"]), "image_root": str(tmp_path)}
    levels = chance_levels("vqa", data)
    assert list(levels) == ["val", "test", "test_novel", "unanswered"]
    # "yes" for everything; question 22 has 3 of 10 "yes": (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert levels["test"] == pytest.approx({"acc": (100 + 0 + 90) / 3, "acc_yes/no": 100.0, "acc_number": 0.0, "acc_other": 90.0})
    assert levels["test_novel"] == pytest.approx({"acc": (100 + 0 + 90) / 3})  # the json's own answers carry no types
    assert levels["unanswered"] == {}  # no ground truth: evaluate reports no accuracy either


# -- video QA ---------------------------------------------------------------------------------------
def test_video_qa_majority_known_label(tmp_path):
    def row(answer, kind):
        return {"video_id": "video0", "question": "what?", "answer": answer, "answer_type": kind}

    # "zebra" is the most common training answer but not in ans2label: the task never trains on it
    train = [row("zebra", "color")] * 3 + [row("red", "color")] * 2 + [row("1", "count")]
    test = [row("red", "color"), row("blue", "color"), row("1", "count"), row("zebra", "color")]
    data = {"train_file": write_jsonl(tmp_path / "train.jsonl", train), "val_file": write_jsonl(tmp_path / "val.jsonl", test),
            "test_file": write_jsonl(tmp_path / "test.jsonl", test),
            "extra_eval_files": {"test_novel": write_jsonl(tmp_path / "novel.jsonl", test[:1])},
            "ans2label_file": write_json(tmp_path / "ans2label.json", {"red": 0, "blue": 1, "1": 2}),
            "video_root": str(tmp_path)}
    levels = chance_levels("video_qa", data)
    assert list(levels) == ["val", "test", "test_novel"]
    assert levels["test"] == pytest.approx({"acc": 25.0, "acc_color": 100 / 3, "acc_count": 0.0})
    assert levels["test_novel"] == pytest.approx({"acc": 100.0, "acc_color": 100.0})


# -- NLVR2 ------------------------------------------------------------------------------------------
def test_nlvr_majority_label(tmp_path):
    def row(label):
        return {"images": ["a.jpg", "b.jpg"], "sentence": "There is a dog.", "label": label}

    data = {"train_file": write_json(tmp_path / "train.json", [row("True"), row(True), row("False")]),
            "eval_files": {"dev": write_json(tmp_path / "dev.json", [row("True"), row("False"), row("False"), row("False")]),
                           "test": write_json(tmp_path / "test.json", [row("True")])},
            "image_root": str(tmp_path)}
    levels = chance_levels("nlvr", data)
    assert list(levels) == ["dev", "test"]
    assert levels["dev"] == pytest.approx({"acc": 25.0}) and levels["test"] == pytest.approx({"acc": 100.0})
    assert chance_levels("nlvr", {**data, "eval_subset": 2})["dev"]["acc"] == pytest.approx(50.0)  # items 0 and 3


# -- grounding --------------------------------------------------------------------------------------
def test_grounding_mean_box_and_inclusive_iou(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "wide.png")  # its size comes from the image itself
    train = [{"image": "square.png", "text": "left thing", "ref_id": 1, "bbox": [10, 10, 20, 20], "width": 100, "height": 100},
             {"image": "wide.png", "text": "right thing", "ref_id": 2, "bbox": [100, 50, 40, 20]}]
    # normalised (cx, cy, w, h): (0.2, 0.2, 0.2, 0.2) and (0.6, 0.6, 0.2, 0.2); mean (0.4, 0.4, 0.2, 0.2)
    test = [{"image": "small.png", "text": "thing", "ref_id": 3, "bbox": [15, 15, 10, 10], "width": 50, "height": 50},
            {"image": "square.png", "text": "thing", "ref_id": 4, "bbox": [40, 40, 20, 20], "width": 100, "height": 100}]
    # predicted: [15, 15, 10, 10] on 50x50 (IoU 1); [30, 30, 20, 20] on 100x100: the inclusive pixels 40..49
    # overlap, 10 x 10 = 100 of 400 + 400 - 100: IoU 1/7
    data = {"train_file": write_json(tmp_path / "train.json", train), "eval_files": {"val": write_json(tmp_path / "val.json", test)},
            "image_root": str(tmp_path)}
    levels = chance_levels("grounding", data)
    assert list(levels) == ["val"] and levels["val"] == pytest.approx({"acc": 50.0, "miou": 100 * (1 + 1 / 7) / 2})


# -- captioning -------------------------------------------------------------------------------------
def test_captioning_majority_caption_scores(tmp_path):
    train = [{"image": "img_1.jpg", "caption": "A big red circle, here.", "image_id": 1},
             {"image": "img_2.jpg", "caption": "One small blue square there.", "image_id": 2},
             {"image": "img_3.jpg", "caption": "a big red circle here", "image_id": 3}]  # the same after pre_caption
    val = [{"image": "img_7.jpg", "caption": ["a big red circle here"]},
           {"image": "img_8.jpg", "caption": ["one small blue square there"]}]
    gt = {"images": [{"id": 7}, {"id": 8}], "annotations": [{"image_id": 7, "caption": "a big red circle here", "id": 1},
                                                             {"image_id": 8, "caption": "one small blue square there", "id": 2}]}
    data = {"train_file": write_json(tmp_path / "train.json", train), "val_file": write_json(tmp_path / "val.json", val),
            "image_root": str(tmp_path), "metrics": ["bleu", "rouge_l", "cider"],
            "extra_eval_files": {"test_novel": {"file": str(tmp_path / "val.json"), "gt": write_json(tmp_path / "gt.json", gt)}}}
    levels = chance_levels("captioning", data)
    assert list(levels) == ["val", "test_novel"]
    # "a big red circle here" for both images: image 7 matches its reference exactly, image 8 shares no word.
    # Corpus BLEU-n: half of the candidate n-grams match, lengths equal: 50; ROUGE-L: mean of 1 and 0;
    # CIDEr: the mean over images of 10 x cosine of tf-idf vectors (idf log 2 for every n-gram): (10 + 0) / 2, x100
    expected = {"bleu_1": 50.0, "bleu_2": 50.0, "bleu_3": 50.0, "bleu_4": 50.0, "rouge_l": 50.0, "cider": 500.0}
    for split in ("val", "test_novel"):
        assert levels[split] == pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError, match="extra_eval_files.test_novel"):
        chance_levels("captioning", {**data, "extra_eval_files": {"test_novel": str(tmp_path / "val.json")}})


# -- a constant model through the tasks' own evaluate --------------------------------------------------
class ConstantNLVR(torch.nn.Module):
    """Ignores its inputs: always the same label."""

    def __init__(self, label: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.label = label

    def nlvr_logits(self, left, right, ids, mask):
        logits = torch.zeros(left.shape[0], 2)
        logits[:, self.label] = 1.0
        return logits


class ConstantBox(torch.nn.Module):
    """Ignores its inputs: always the same normalised (cx, cy, w, h) box."""

    def __init__(self, box):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.box = torch.as_tensor(box, dtype=torch.float32)

    def encode_images(self, pixels):
        return torch.zeros(pixels.shape[0], 1, 1), torch.ones(pixels.shape[0], 1)

    def encode_text(self, ids, mask):
        return torch.zeros(ids.shape[0], 1, 1)

    def predict_boxes(self, embeds, text, mask):
        return self.box.expand(embeds.shape[0], 4)


def world_data(config: str, world: Path) -> dict:
    from x2vlm.demo.run import relocate

    return relocate(yaml.safe_load((CONFIGS / config).read_text())["data"], world)


def test_chance_equals_a_constant_model_through_the_tasks_evaluate(tiny_world, tmp_path):
    from x2vlm.demo.baselines import mean_normalised_box
    from x2vlm.tasks.common import EvalContext
    from x2vlm.tasks.grounding import load_grounding_file
    from x2vlm.tasks.nlvr import load_nlvr_file
    from x2vlm.tokenizer import WordPieceTokenizer
    from x2vlm.train.distributed import DistInfo
    from x2vlm.train.finetune import base_model_config, build_task

    tokenizer = WordPieceTokenizer(TINY_VOCAB)
    ctx = EvalContext(DistInfo(), batch_size=64)
    for task_name, config in (("nlvr", "nlvr2_small_world.yaml"), ("grounding", "grounding_small_world.yaml")):
        data = world_data(config, tiny_world)
        cfg = tiny_finetune_config(task_name, data, tmp_path / task_name)
        task = build_task(cfg, base_model_config(cfg), tokenizer)
        if task_name == "nlvr":
            model = ConstantNLVR(Counter(item.label for item in load_nlvr_file(data["train_file"])).most_common(1)[0][0])
        else:
            train = load_grounding_file(data["train_file"], data["refs_file"], data["instances_file"])
            model = ConstantBox(mean_normalised_box(train))
        levels = chance_levels(task_name, data)
        assert list(levels) == task.eval_splits
        for split in task.eval_splits:
            assert levels[split] == pytest.approx(task.evaluate(model, split, ctx), abs=1e-4), (task_name, split)


# -- every task on the tiny world ---------------------------------------------------------------------
WORLD_TASKS = (
    ("retrieval", "retrieval_small_world.yaml"),
    ("retrieval", "video_retrieval_small_world.yaml"),
    ("vqa", "vqa_small_world.yaml"),
    ("video_qa", "video_qa_small_world.yaml"),
    ("nlvr", "nlvr2_small_world.yaml"),
    ("grounding", "grounding_small_world.yaml"),
    ("captioning", "captioning_small_world.yaml"),
)


def test_every_task_on_the_tiny_world(tiny_world, tmp_path):
    from x2vlm.tokenizer import WordPieceTokenizer
    from x2vlm.train.finetune import base_model_config, build_task

    tokenizer = WordPieceTokenizer(TINY_VOCAB)
    for task_name, config in WORLD_TASKS:
        data = world_data(config, tiny_world)
        cfg = tiny_finetune_config(task_name, data, tmp_path / config)
        task = build_task(cfg, base_model_config(cfg), tokenizer)
        levels = chance_levels(task_name, data)
        assert list(levels) == task.eval_splits, config  # the same splits as the task, in its order
        for split, metrics in levels.items():
            assert metrics, (config, split)
            assert task.selection_metric in metrics, (config, split)
            for key, value in metrics.items():
                assert np.isfinite(value), (config, split, key)
                assert 0.0 <= value <= 100.0, (config, split, key, value)
        if task_name == "retrieval":
            assert levels["test"]["itc_img_r1"] == pytest.approx(100 / len(json.loads(Path(data["test_file"]).read_text())))
