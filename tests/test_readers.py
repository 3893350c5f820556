"""Format readers: good records parse, malformed ones name the file, the record and the field."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from x2vlm.data import readers
from x2vlm.data.readers import DataFormatError
from x2vlm.data.text import pre_caption, pre_question


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- text cleaning ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, max_words, expected", [
    ("A Red circle, left of a BLUE square.", 30, "a red circle left of a blue square"),
    ("  two  cats!!\tand (one) dog  ", 30, "two cats and one dog"),
    ("well-known/unknown <person> here", 30, "well known unknown person here"),
    ("it's \"quoted\": yes; ok~ #1 *star*", 30, "it s quoted yes ok 1 star"),
    ("one two three four five", 3, "one two three"),
    ("trailing newline\n", 30, "trailing newline"),
])
def test_pre_caption(raw, max_words, expected):
    assert pre_caption(raw, max_words) == expected


@pytest.mark.parametrize("raw", ["", "   ", "?!.,", "-/-"])
def test_pre_caption_rejects_empty_text(raw):
    with pytest.raises(ValueError, match="pre_caption"):
        pre_caption(raw, 30)


@pytest.mark.parametrize("raw, max_words, expected", [
    ("What color is the circle?", 50, "what color is the circle"),
    ("Is the red-circle left/right?", 50, "is the red circle left right"),
    ("how  many, objects?", 50, "how  many  objects"),  # no whitespace collapsing
    ("a b c d e", 2, "a b"),
])
def test_pre_question(raw, max_words, expected):
    assert pre_question(raw, max_words) == expected


# --- JSON and JSON lines ----------------------------------------------------------------------------


def test_json_lines_errors_name_file_and_line(tmp_path):
    path = write_lines(tmp_path / "part.jsonl", ['{"image": "a.jpg", "caption": "x"}', "", "{not json"])
    with pytest.raises(DataFormatError, match=r"part\.jsonl:3: invalid JSON"):
        readers.read_json_lines(path)
    with pytest.raises(DataFormatError, match=r"broken\.json:\d+:\d+: invalid JSON"):
        readers.read_json(write_lines(tmp_path / "broken.json", ["[1, 2"]))


def test_list_shards_skips_success_markers(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("part-00001.jsonl", "part-00000.jsonl", "_SUCCESS"):
        (folder / name).write_text("")
    assert [p.name for p in readers.list_shards(folder)] == ["part-00000.jsonl", "part-00001.jsonl"]
    with pytest.raises(DataFormatError, match="no such file"):
        readers.list_shards(tmp_path / "missing")


def test_image_text_accepts_string_list_and_language_dict(tmp_path):
    path = write_lines(tmp_path / "it.jsonl", [
        json.dumps({"image": "a.jpg", "caption": "one"}),
        json.dumps({"image": "b.jpg", "caption": ["one", "two"]}),
        json.dumps({"image": "c.jpg", "caption": {"en": "one", "de": "eins"}}),
    ])
    records = readers.read_image_text(path)
    assert [r.captions for r in records] == [["one"], ["one", "two"], {"en": "one", "de": "eins"}]
    binary = readers.read_image_text_line('{"binary": "aGk=", "desc": "x"}', "line", "binary", "desc")
    assert binary.image == "aGk="
    with pytest.raises(DataFormatError, match=r"it2\.jsonl:2: field 'caption' must be"):
        readers.read_image_text(write_lines(tmp_path / "it2.jsonl", [
            json.dumps({"image": "a.jpg", "caption": "ok"}), json.dumps({"image": "b.jpg", "caption": 7})]))


def test_region_text_line(tmp_path):
    good = {"image": "a.jpg", "caption": ["whole"], "elems": [
        {"bb": [1, 2, 10, 12], "caption": ["circle"], "attributes": ["red"]},
        {"bb": [0, 0, 30, 30.5], "caption": "two objects"},
    ]}
    record = readers.read_region_text_line(json.dumps(good), "r.jsonl:1")
    assert record.regions[0].bbox == (1, 2, 10, 12) and record.regions[1].attributes is None
    assert record.captions == ["whole"]
    bad_box = dict(good, elems=[{"bb": [1, 2, 0, 5], "caption": "x"}])
    with pytest.raises(DataFormatError, match=r"r\.jsonl:7: elems\[0\]: field 'bb' must be \[x, y, w, h\]"):
        readers.read_region_text_line(json.dumps(bad_box), "r.jsonl:7")
    missing = dict(good, elems=[{"caption": "x"}])
    with pytest.raises(DataFormatError, match=r"elems\[0\]: missing field 'bb'"):
        readers.read_region_text_line(json.dumps(missing), "r.jsonl:2")
    with pytest.raises(DataFormatError, match="field 'elems' must be"):
        readers.read_region_text_line(json.dumps(dict(good, elems=[])), "r.jsonl:3")
    shard = write_lines(tmp_path / "regions.jsonl", [json.dumps(good), json.dumps({"image": "b.jpg"})])
    with pytest.raises(DataFormatError, match=r"regions\.jsonl:2: missing field 'elems'"):
        readers.read_region_text(shard)


def test_video_text(tmp_path):
    path = write_lines(tmp_path / "v.jsonl", [json.dumps({"video": "video1.mp4", "text": ["a", "b"]}),
                                              json.dumps({"video_frames": ["f1", "f2"], "text": "c"})])
    with pytest.raises(DataFormatError, match=r"v\.jsonl:2: missing field 'video'"):
        readers.read_video_text(path)
    frames = readers.read_video_text_line(json.dumps({"video_frames": ["f1"], "text": "c"}), "x",
                                          video_key="video_frames")
    assert frames.video == ["f1"] and frames.texts == ["c"]


# --- retrieval / captioning -------------------------------------------------------------------------


def test_karpathy_files(tmp_path):
    train = write(tmp_path / "train.json", [{"image": "a.jpg", "caption": "x", "image_id": 3}])
    assert readers.read_karpathy_train(train)[0].index == 3
    evaluation = write(tmp_path / "test.json", [{"image": "a.jpg", "caption": ["x", "y"]}])
    assert readers.read_karpathy_eval(evaluation)[0].captions == ["x", "y"]
    bad_train = write(tmp_path / "bad_train.json", [{"image": "a.jpg", "caption": "x", "image_id": 1},
                                                    {"image": "b.jpg", "image_id": 2}])
    with pytest.raises(DataFormatError, match=r"bad_train\.json\[1\]: missing field 'caption'"):
        readers.read_karpathy_train(bad_train)
    bad_eval = write(tmp_path / "bad_eval.json", [{"image": "a.jpg", "caption": "not a list"}])
    with pytest.raises(DataFormatError, match=r"bad_eval\.json\[0\]: field 'caption' must be a non-empty list"):
        readers.read_karpathy_eval(bad_eval)
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        readers.read_karpathy_eval(write(tmp_path / "obj.json", {"image": "a.jpg"}))
    video = write(tmp_path / "msrvtt.json", [{"video_id": "video7", "video": "video7.mp4", "caption": "c"}])
    assert readers.read_karpathy_train(video, "video_id", "video", "caption")[0].index == "video7"


def test_coco_caption_ground_truth(tmp_path):
    good = {"images": [{"id": 1}, {"id": 2}], "annotations": [
        {"image_id": 1, "caption": "a", "id": 1}, {"image_id": 2, "caption": "b", "id": 2}]}
    assert readers.read_coco_caption_gt(write(tmp_path / "gt.json", good)) == {1: ["a"], 2: ["b"]}
    bad = dict(good, annotations=good["annotations"] + [{"image_id": 9, "caption": "c", "id": 3}])
    with pytest.raises(DataFormatError, match=r"annotations\[2\]: field 'image_id' must be the id"):
        readers.read_coco_caption_gt(write(tmp_path / "bad.json", bad))


# --- VQA --------------------------------------------------------------------------------------------


def vqa_official(tmp_path, annotation_image_id=7):
    questions = write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 7, "question": "What color?", "question_id": 7001}]})
    annotations = write(tmp_path / "a.json", {"annotations": [{
        "question_type": "what color is the", "multiple_choice_answer": "red",
        "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
        "image_id": annotation_image_id, "answer_type": "other", "question_id": 7001}]})
    return questions, annotations


def test_vqa_official_and_processed(tmp_path):
    questions, annotations = vqa_official(tmp_path)
    [example] = readers.read_vqa_official(questions, annotations)
    assert example.image == "val2014/COCO_val2014_000000000007.jpg"
    assert example.answers == ["red"] * 10 and example.question_type == "what color is the"
    [unanswered] = readers.read_vqa_official(questions)
    assert unanswered.answers is None
    questions, annotations = vqa_official(tmp_path, annotation_image_id=8)
    with pytest.raises(DataFormatError, match=r"a\.json: field 'image_id' of question_id 7001"):
        readers.read_vqa_official(questions, annotations)

    processed = write(tmp_path / "vqa.json", [
        {"question_id": 1, "image": "a.jpg", "question": "q?", "answer": ["x", "y"], "dataset": "vqa"},
        {"question_id": 2, "image": "b.jpg", "question": "q?", "answer": "z", "dataset": "vg"}])
    assert [e.answers for e in readers.read_vqa_json(processed)] == [["x", "y"], ["z"]]
    test = write(tmp_path / "vqa_test.json", [{"question_id": 1, "image": "a.jpg", "question": "q?"}])
    assert readers.read_vqa_json(test, require_answers=False)[0].answers is None
    with pytest.raises(DataFormatError, match=r"vqa_test\.json\[0\]: missing field 'answer'"):
        readers.read_vqa_json(test)
    bad = write(tmp_path / "bad.json", [{"question_id": 1, "image": "a.jpg", "question": "q?",
                                         "answer": ["x"], "dataset": "coco"}])
    with pytest.raises(DataFormatError, match=r"bad\.json\[0\]: field 'dataset' must be one of"):
        readers.read_vqa_json(bad)
    with pytest.raises(DataFormatError, match="not unique"):
        readers.read_answer_list(write(tmp_path / "answers.json", ["yes", "no", "yes"]))


# --- NLVR2 ------------------------------------------------------------------------------------------


def test_nlvr2(tmp_path):
    path = write(tmp_path / "nlvr.json", [
        {"images": ["l.jpg", "r.jpg"], "sentence": "s", "label": "True"},
        {"images": ["l.jpg", "r.jpg"], "sentence": "s", "label": False}])
    assert [e.label for e in readers.read_nlvr2(path)] == [True, False]
    bad = write(tmp_path / "bad.json", [{"images": ["l.jpg", "r.jpg"], "sentence": "s", "label": "maybe"}])
    with pytest.raises(DataFormatError, match=r"bad\.json\[0\]: field 'label' must be true/false"):
        readers.read_nlvr2(bad)
    one_image = write(tmp_path / "one.json", [{"images": ["l.jpg"], "sentence": "s", "label": True}])
    with pytest.raises(DataFormatError, match="field 'images' must be a list of two image paths"):
        readers.read_nlvr2(one_image)


# --- RefCOCO+ ---------------------------------------------------------------------------------------


def refer_files(tmp_path, ref: dict | None = None):
    instances = write(tmp_path / "instances.json", {
        "images": [{"id": 5, "file_name": "train/x_000005.jpg", "height": 96, "width": 96}],
        "annotations": [{"id": 51, "image_id": 5, "bbox": [10, 20, 16, 16], "category_id": 1,
                         "area": 256, "iscrowd": 0, "segmentation": [[10, 20, 26, 20, 26, 36]]}],
        "categories": [{"id": 1, "name": "circle", "supercategory": "shape"}]})
    ref = ref or {"ref_id": 51, "ann_id": 51, "image_id": 5, "split": "testB", "category_id": 1,
                  "sent_ids": [0], "file_name": "x_000005_51.jpg",
                  "sentences": [{"sent": "red circle", "raw": "red circle", "tokens": ["red", "circle"],
                                 "sent_id": 0}]}
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([ref], protocol=2))
    return refs, instances


def test_refcoco_with_and_without_refer(tmp_path):
    refs, instances = refer_files(tmp_path)
    plain = write(tmp_path / "refcoco+_test.json", [{"image": "train/x_000005.jpg", "text": "red circle", "ref_id": 51}])
    [example] = readers.read_refcoco(plain, refs, instances)
    assert example.bbox == (10, 20, 16, 16) and example.split == "testB" and (example.height, example.width) == (96, 96)
    assert readers.read_refcoco(plain)[0].bbox is None
    vlue = write(tmp_path / "vlue.json", [{"image": "train/x_000005.jpg", "text": "red circle", "ref_id": 51,
                                            "bbox": [11, 20, 16, 16], "height": 96, "width": 96}])
    assert readers.read_refcoco(vlue)[0].bbox == (11, 20, 16, 16)
    with pytest.raises(DataFormatError, match=r"vlue\.json\[0\]: field 'bbox' must be the REFER box"):
        readers.read_refcoco(vlue, refs, instances)
    unknown = write(tmp_path / "unknown.json", [{"image": "a.jpg", "text": "t", "ref_id": 99}])
    with pytest.raises(DataFormatError, match="field 'ref_id' must be a ref_id"):
        readers.read_refcoco(unknown, refs, instances)


def test_refer_refs_are_validated(tmp_path):
    refs, instances = refer_files(tmp_path, {"ref_id": 1, "ann_id": 999, "image_id": 5, "split": "val",
                                             "category_id": 1, "sentences": [{"sent": "x"}]})
    with pytest.raises(DataFormatError, match=r"refs\(unc\)\.p\[0\]: field 'ann_id' must be"):
        readers.read_refer(refs, instances)
    refs.write_bytes(pickle.dumps([Path("x")]))
    with pytest.raises(DataFormatError, match="only plain data"):
        readers.read_refer(refs, instances)


# --- video QA ---------------------------------------------------------------------------------------


def test_video_qa_and_ans2label(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [
        json.dumps({"video_id": "video1", "question": "what?", "answer": "red"}),
        json.dumps({"video_id": "video2", "question": "what?"})])
    with pytest.raises(DataFormatError, match=r"qa\.jsonl:2: missing field 'answer'"):
        readers.read_video_qa(path)
    assert readers.read_ans2label(write(tmp_path / "a2l.json", {"red": 1, "blue": 0})) == {"red": 1, "blue": 0}
    with pytest.raises(DataFormatError, match="labels must be 0..1"):
        readers.read_ans2label(write(tmp_path / "gap.json", {"red": 0, "blue": 2}))
    with pytest.raises(DataFormatError, match="field 'red' must be an integer label"):
        readers.read_ans2label(write(tmp_path / "str.json", {"red": "0"}))
