"""``x2vlm predict``: each command prints, as JSON, what the inference API returns on the same input
(tiny task models saved by the fixtures of test_inference), ``--draw`` writes a PNG of the image's
size, and user errors exit with status 2 and a one-line message."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
import test_inference as inference_tests
from test_inference import image_paths, raw_texts

from x2vlm.cli import main
from x2vlm.inference import GalleryIndex

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny task models (saved directories and loaded handles), images and videos of the inference API's tests
dirs, models, images, videos = inference_tests.dirs, inference_tests.models, inference_tests.images, inference_tests.videos


def run(capsys, *argv: str) -> dict:
    assert main(["predict", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def fails(capsys, caplog, *argv: str) -> str:
    """The one-line message of a command that exits with status 2 (and prints nothing on stdout)."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="x2vlm"):
        assert main(["predict", *argv]) == 2
    assert capsys.readouterr().out == ""
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(messages) == 1 and "\n" not in messages[0]
    return messages[0]


def test_vqa_prints_the_answer_and_draws_it(dirs, models, images, capsys, tmp_path):
    path = image_paths(images)[1]
    out = run(capsys, "vqa", "--model", str(dirs["vqa"]), "--image", str(path), "--question", "what color is the dog",
              "--top-k", "3", "--draw", str(tmp_path / "drawn" / "vqa.png"))
    expected = models["vqa"].answer(path, "what color is the dog", top_k=3).to_dict()
    assert out["answer"] == expected["answer"] and [t["answer"] for t in out["top"]] == [t["answer"] for t in expected["top"]]
    assert [t["probability"] for t in out["top"]] == pytest.approx([t["probability"] for t in expected["top"]], abs=1e-6)
    assert out["question"] == "what color is the dog" and out["drawn"] == str(tmp_path / "drawn" / "vqa.png")
    drawn = Image.open(tmp_path / "drawn" / "vqa.png")
    assert drawn.format == "PNG" and drawn.size == Image.open(path).size
    assert len(run(capsys, "vqa", "--model", str(dirs["vqa"]), "--image", str(path), "--question", "is it red")["top"]) == 5  # k_test 5


def test_verify_prints_the_verdict(dirs, models, images, capsys):
    left, right = (str(p) for p in image_paths(images)[:2])
    out = run(capsys, "verify", "--model", str(dirs["nlvr"]), "--left", left, "--right", right, "--statement", "both images contain a dog")
    expected = models["nlvr"].verify(left, right, "both images contain a dog")
    assert out["true"] == expected.true and out["probability"] == pytest.approx(expected.probability, abs=1e-6)
    assert (out["left"], out["right"], out["statement"]) == (left, right, "both images contain a dog")


def test_entail_prints_the_labels(dirs, models, images, capsys):
    image = str(image_paths(images)[3])
    out = run(capsys, "entail", "--model", str(dirs["xvnli"]), "--image", image, "--hypothesis", "two dogs play")
    expected = models["xvnli"].entail(image, "two dogs play")
    assert out["answer"] == expected.answer and [t["answer"] for t in out["top"]] == [a for a, _ in expected.top]
    assert (out["image"], out["hypothesis"]) == (image, "two dogs play")


def test_video_qa_through_vqa(dirs, models, videos, capsys):
    clip = videos / "clip_a.mp4"
    out = run(capsys, "vqa", "--model", str(dirs["video_qa"]), "--video", str(clip), "--question", "what color is the dog")
    expected = models["video_qa"].answer(clip, "what color is the dog", top_k=5)
    assert out["video"] == str(clip) and [t["answer"] for t in out["top"]] == [a for a, _ in expected.top]


def test_ground_prints_the_box_in_pixels_and_draws_it(dirs, models, images, capsys, tmp_path):
    path = image_paths(images)[2]
    out = run(capsys, "ground", "--model", str(dirs["grounding"]), "--image", str(path), "--expression", "the white cat",
              "--draw", str(tmp_path / "ground.png"))
    assert out["box"] == pytest.approx(models["grounding"].ground(path, "the white cat"), abs=1e-4)
    assert Image.open(tmp_path / "ground.png").size == Image.open(path).size


def test_caption_prints_the_evaluation_caption(dirs, models, images, capsys, tmp_path):
    path = image_paths(images)[0]
    out = run(capsys, "caption", "--model", str(dirs["captioning"]), "--image", str(path), "--draw", str(tmp_path / "c.png"))
    assert out == {"image": str(path), "caption": models["captioning"].caption(path), "drawn": str(tmp_path / "c.png")}
    assert Image.open(tmp_path / "c.png").size == Image.open(path).size
    beams = run(capsys, "caption", "--model", str(dirs["captioning"]), "--image", str(path), "--beams", "3", "--max-length", "4")
    assert beams["caption"] == models["captioning"].caption(path, beams=3, max_length=4)


def test_match_prints_the_score_matrices(dirs, models, images, capsys):
    paths, texts = image_paths(images)[:3], raw_texts()[:2]
    out = run(capsys, "match", "--model", str(dirs["retrieval"]), "--image", *map(str, paths), "--text", *texts)
    expected = models["retrieval"].match(paths, texts)
    np.testing.assert_allclose(out["itc"], expected["itc"], atol=1e-5)
    np.testing.assert_allclose(out["itm"], expected["itm"], atol=1e-4)
    one = run(capsys, "match", "--model", str(dirs["retrieval"]), "--image", str(paths[0]), "--text", texts[0])
    assert np.shape(one["itm"]) == (1, 1) and one["itm"][0][0] == pytest.approx(out["itm"][0][0], abs=1e-4)


def test_retrieve_with_files_texts_and_saved_indexes(dirs, models, images, capsys, tmp_path):
    model, paths, texts = models["retrieval"], image_paths(images), raw_texts()
    retrieval = str(dirs["retrieval"])
    out = run(capsys, "retrieve", "--model", retrieval, "--text", texts[3], "--gallery", *map(str, paths), "--k", "4",
              "--save-index", str(tmp_path / "images"))
    expected = model.retrieve(texts[3], model.index(paths, kind="images", ids=[str(p) for p in paths]), k=4)
    assert [(h["index"], h["id"], h["item"]) for h in out["hits"]] == [(h.index, str(paths[h.index]), str(paths[h.index])) for h in expected]
    assert [h["itm"] for h in out["hits"][:3]] == pytest.approx([h.itm for h in expected[:3]], abs=1e-4)
    assert out["hits"][3]["itm"] is None  # beyond k_test 3
    assert out["gallery"] == {"kind": "images", "size": 6, "index": None} and GalleryIndex.load(out["saved_index"]).ids == [str(p) for p in paths]
    again = run(capsys, "retrieve", "--model", retrieval, "--text", texts[3], "--gallery", str(tmp_path / "images"), "--k", "4")
    assert [h["index"] for h in again["hits"]] == [h["index"] for h in out["hits"]] and again["gallery"]["index"] == str(tmp_path / "images")
    kept = run(capsys, "retrieve", "--model", retrieval, "--text", texts[3], "--gallery", *map(str, paths), "--k", "4",
               "--keep-embeddings", "bf16", "--save-index", str(tmp_path / "kept"))
    assert [h["index"] for h in kept["hits"]] == [h["index"] for h in out["hits"]]
    assert GalleryIndex.load(tmp_path / "kept").vision_embeds.dtype == torch.bfloat16
    from_kept = run(capsys, "retrieve", "--model", retrieval, "--text", texts[3], "--gallery", str(tmp_path / "kept"), "--k", "4")
    assert from_kept["hits"] == kept["hits"]
    # an image query over texts: given on the command line, in a file, or as a saved text index
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    expected = [h.index for h in model.retrieve(paths[1], model.index(texts, kind="texts"), k=3)]
    by_texts = run(capsys, "retrieve", "--model", retrieval, "--image", str(paths[1]), "--texts", *texts, "--k", "3",
                   "--save-index", str(tmp_path / "texts"))
    assert [h["index"] for h in by_texts["hits"]] == expected and [h["item"] for h in by_texts["hits"]] == [texts[i] for i in expected]
    by_file = run(capsys, "retrieve", "--model", retrieval, "--image", str(paths[1]), "--texts-file", str(tmp_path / "texts.txt"), "--k", "3")
    by_index = run(capsys, "retrieve", "--model", retrieval, "--image", str(paths[1]), "--gallery", str(tmp_path / "texts"), "--k", "3")
    assert by_file["hits"] == by_texts["hits"] and [h["index"] for h in by_index["hits"]] == expected


def test_errors_exit_2_with_one_line(dirs, models, images, capsys, caplog, tmp_path):
    path = str(image_paths(images)[0])
    message = fails(capsys, caplog, "ground", "--model", str(dirs["retrieval"]), "--image", path, "--expression", "a dog")
    assert "ground() needs a model with the box head" in message and "'retrieval' model" in message
    assert "answer() needs a VQA model" in fails(capsys, caplog, "vqa", "--model", str(dirs["grounding"]), "--image", path,
                                                 "--question", "what color")
    assert "caption() needs a captioning model" in fails(capsys, caplog, "caption", "--model", str(dirs["vqa"]), "--image", path)
    assert "match() needs a model with ITC and ITM heads" in fails(capsys, caplog, "match", "--model", str(dirs["captioning"]),
                                                                   "--image", path, "--text", "a dog")
    assert "image file not found" in fails(capsys, caplog, "caption", "--model", str(dirs["captioning"]),
                                           "--image", str(tmp_path / "missing.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert "corrupt image in file" in fails(capsys, caplog, "ground", "--model", str(dirs["grounding"]),
                                            "--image", str(tmp_path / "broken.png"), "--expression", "a dog")
    assert "--keep-embeddings stores the vision embeddings" in fails(capsys, caplog, "retrieve", "--model", str(dirs["retrieval"]),
                                                                     "--image", path, "--texts", "a dog", "--keep-embeddings", "fp32")
    assert "unsupported dtype 'fp16'" in fails(capsys, caplog, "caption", "--model", str(dirs["captioning"]), "--image", path,
                                               "--dtype", "fp16")
    assert "unsupported device 'quantum'" in fails(capsys, caplog, "caption", "--model", str(dirs["captioning"]),
                                                   "--image", path, "--device", "quantum")
    assert "needs a text gallery" in fails(capsys, caplog, "retrieve", "--model", str(dirs["retrieval"]), "--image", path)
    models["retrieval"].index(["a dog", "a cat"], kind="texts").save(tmp_path / "texts")
    assert "a text query needs an image or video index" in fails(capsys, caplog, "retrieve", "--model", str(dirs["retrieval"]),
                                                                 "--text", "a dog", "--gallery", str(tmp_path / "texts"))
