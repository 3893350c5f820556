"""The inference API (x2vlm.inference) on the tiny parity model saved as our directories: every method
equals the task's evaluation code on the same inputs, single calls equal batched ones, bf16 runs,
the gallery index round-trips, and every user error is raised with its message."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny
from PIL import Image

import x2vlm
from x2vlm.checkpoint import load_official, save_pretrained
from x2vlm.cli import main as cli_main
from x2vlm.config import preset
from x2vlm.data.text import pre_question
from x2vlm.data.transforms import EvalTransform
from x2vlm.data.video import load_image, read_video_frames
from x2vlm.generation import CaptionSettings
from x2vlm.inference import GalleryIndex, Model, StoredRows, TaskMismatchError, load
from x2vlm.models.x2vlm import X2VLM
from x2vlm.tasks import captioning as C
from x2vlm.tasks import grounding as G
from x2vlm.tasks import retrieval as R
from x2vlm.tasks import video_qa as VQ
from x2vlm.tasks import vqa as V

ANSWERS = ["red", "blue", "green", "white", "black", "yes", "no", "two", "three", "left", "right", "on the table"]
LABELS = ["red", "blue", "yes", "no", "two"]
VQA_SETTINGS = {"task": "vqa", "max_tokens": 12, "k_test": 5, "double_count_first_token": True}
GEN = CaptionSettings(num_beams=2, max_new_tokens=5, min_length=1)
QUESTIONS = ["what color is the dog", "is there a cat on the table", "how many people are sitting",
             "what color is the man on the left of the table in the picture of the city street at night"]
EXPRESSIONS = ["the red dog on the left", "a man sitting", "the white cat on the table", "two women"]
CAPTIONS = [["a red dog", "a dog on the street"], ["a man sitting at a table"], ["the white cat"],
            ["two women on the left", "women in the city"], ["a black dog and a cat"], ["a house on the river"]]
SIZES = [(80, 60), (64, 64), (50, 90), (72, 40), (64, 48), (96, 64)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six noisy non-square PNGs ``img_00000k.png`` (lossless: the path, PIL and numpy inputs agree)."""
    root = tmp_path_factory.mktemp("inference_images")
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(SIZES):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[h // 4 : h // 2, w // 4 : w // 2] = (200, 30 * k, 40)
        Image.fromarray(arr).save(root / f"img_{k + 1:06d}.png")
    return root


def assert_same_top(a, b) -> None:
    """Two answers rank the same answers with the same probabilities (up to float rounding)."""
    assert [name for name, _ in a.top] == [name for name, _ in b.top]
    assert [p for _, p in a.top] == pytest.approx([p for _, p in b.top], rel=1e-4, abs=1e-5)


def image_paths(images: Path) -> list[Path]:
    return [images / f"img_{k + 1:06d}.png" for k in range(len(SIZES))]


def write_video(path: Path, frames: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for k in range(frames):
            arr = np.zeros((32, 32, 3), dtype=np.uint8)
            arr[:, : 4 * (k + 1)] = (30 * k, 200, 255 - 20 * k)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inference_videos")
    write_video(root / "clip_a.mp4", 7)
    write_video(root / "clip_b.mp4", 2)
    return root


def save_dir(model: X2VLM, directory: Path, files: dict | None = None) -> Path:
    save_pretrained(model, directory, tokenizer_files={"vocab.txt": TINY_VOCAB})
    for name, content in (files or {}).items():
        (directory / name).write_text(json.dumps(content))
    return directory


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_state) -> dict[str, Path]:
    """One saved directory per task model, with the files fine-tuning writes beside best/."""
    root = tmp_path_factory.mktemp("inference_models")
    torch.manual_seed(0)
    video_qa = X2VLM(preset("x2vlm-tiny", task="classification", num_labels=len(LABELS)))
    load_official(video_qa, tiny_state)  # a fresh classifier on the tiny encoders
    nlvr = X2VLM(preset("x2vlm-tiny", task="nlvr"))
    load_official(nlvr, tiny_state)  # a fresh head on the tiny encoders
    xvnli = X2VLM(preset("x2vlm-tiny", task="classification", num_labels=3))
    load_official(xvnli, tiny_state)
    return {
        "vqa": save_dir(build_tiny("vqa", tiny_state), root / "vqa", {"answer_list.json": ANSWERS, "inference.json": VQA_SETTINGS}),
        "grounding": save_dir(build_tiny("grounding", tiny_state), root / "grounding",
                              {"inference.json": {"task": "grounding", "max_tokens": 10, "max_words": 30}}),
        "captioning": save_dir(build_tiny("captioning", tiny_state), root / "captioning",
                               {"inference.json": {"task": "captioning", "prompt": "a picture of ", "generation": dataclasses.asdict(GEN)}}),
        "retrieval": save_dir(build_tiny("retrieval", tiny_state), root / "retrieval",
                              {"inference.json": {"task": "retrieval", "max_tokens": 30, "k_test": 3, "video": False}}),
        "pretrain": save_dir(build_tiny("pretrain", tiny_state), root / "pretrain"),
        "nlvr": save_dir(nlvr.eval(), root / "nlvr", {"inference.json": {"task": "nlvr", "max_tokens": 12, "max_words": 8}}),
        "xvnli": save_dir(xvnli.eval(), root / "xvnli", {"inference.json": {"task": "xvnli", "max_tokens": 12, "max_words": 8}}),
        "video_qa": save_dir(video_qa.eval(), root / "video_qa",
                             {"ans2label.json": {a: i for i, a in enumerate(LABELS)}, "inference.json": {"task": "video_qa", "max_tokens": 16}}),
    }


@pytest.fixture(scope="module")
def models(dirs) -> dict[str, Model]:
    return {task: load(path) for task, path in dirs.items()}


# -- loading -------------------------------------------------------------------------------------------
def test_load_resolves_run_directories_and_stays_lazy(dirs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dirs["vqa"], run / "best")
    shutil.copytree(dirs["retrieval"], run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    assert load(run).directory == run / "best"  # a fine-tuning run: its selected weights
    shutil.rmtree(run / "best")
    model = x2vlm.load(run)  # else its latest checkpoint
    assert model.directory == run / "checkpoints" / "step_00000002" and model.task == "retrieval"
    assert model.tokenizer.vocab_file.name == "vocab.txt" and model.tokenizer.vocab_size == 512
    with pytest.raises(ValueError, match="is a checkpoint file: x2vlm.load needs preset=.*x2vlm convert"):
        load(dirs["vqa"] / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model directory or checkpoint not found"):
        load(tmp_path / "nowhere")
    # importing x2vlm does not import the inference module (and its task modules)
    code = "import sys, x2vlm; print('x2vlm.inference' in sys.modules, 'x2vlm.tasks.vqa' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]


def test_bad_device_and_dtype(dirs):
    with pytest.raises(ValueError, match="unsupported dtype 'fp16'"):
        load(dirs["vqa"], dtype="fp16")
    with pytest.raises(ValueError, match="unsupported dtype"):
        load(dirs["vqa"], dtype=torch.float16)
    with pytest.raises(ValueError, match="unsupported device 'quantum'"):
        load(dirs["vqa"], device="quantum")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        load(dirs["vqa"], device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:0' requested but CUDA is not available"):
            load(dirs["vqa"], device="cuda:0")


# -- VQA -----------------------------------------------------------------------------------------------
def test_answer_equals_the_vqa_evaluation(models, images, tokenizer, tmp_path):
    model = models["vqa"]
    paths = image_paths(images)[:4]
    records = [{"question_id": k, "image": p.name, "question": q} for k, (p, q) in enumerate(zip(paths, QUESTIONS))]
    records.append({"question_id": 9, "image": paths[0].name, "question": QUESTIONS[2]})  # a second question on image 0
    (tmp_path / "vqa.json").write_text(json.dumps(records))
    split = V.load_eval_split("test", str(tmp_path / "vqa.json"), None, None)
    settings = V.VQASettings(res=64, max_tokens=VQA_SETTINGS["max_tokens"], k_test=VQA_SETTINGS["k_test"])
    assert model.vqa_settings() == settings  # read from inference.json
    ids, mask = tokenizer(ANSWERS)
    best, probs = V.rank_split(model.model, split, list(range(len(records))), str(images), tokenizer, settings, ids, mask,
                               batch_size=2, top=3)
    got = model.answer([images / r["image"] for r in records], [r["question"] for r in records], top_k=3)
    assert [[a for a, _ in g.top] for g in got] == [[ANSWERS[i] for i in row] for row in best.tolist()]
    np.testing.assert_allclose([[p for _, p in g.top] for g in got], probs.numpy(), rtol=1e-5, atol=1e-6)
    assert [g.answer for g in got] == [ANSWERS[i] for i in best[:, 0].tolist()]
    assert got[0].to_dict()["top"][0] == {"answer": got[0].answer, "probability": got[0].probability}
    # single calls, other input kinds and broadcasting give the same answers
    single = model.answer(paths[3], QUESTIONS[3], top_k=3)
    assert_same_top(single, got[3])
    pil, array = Image.open(paths[0]), np.asarray(Image.open(paths[0]).convert("RGB"))
    one_image = model.answer(pil, [QUESTIONS[0], QUESTIONS[2]], top_k=3)
    assert [a.answer for a in one_image] == [got[0].answer, got[4].answer]
    assert_same_top(model.answer(array, QUESTIONS[0], top_k=3), got[0])
    assert model.answer(paths[0].read_bytes(), QUESTIONS[0]).answer == got[0].answer
    small_batches = Model(model.model, model.tokenizer, model.directory, batch_size=1)
    assert [a.answer for a in small_batches.answer([images / r["image"] for r in records], [r["question"] for r in records])] == \
        [g.answer for g in got]
    # another answer list, and the limits of top_k
    own = model.answer(paths[0], QUESTIONS[0], answers=["yes", "no"], top_k=2)
    assert sorted(a for a, _ in own.top) == ["no", "yes"] and sum(p for _, p in own.top) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top_k must be an integer from 1 to 5"):
        model.answer(paths[0], QUESTIONS[0], top_k=6)
    assert len(model.answer(paths[0], QUESTIONS[0], top_k=6, k_test=6).top) == 6
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        model.answer(paths[:2], QUESTIONS[:3])


def test_answer_list_comes_from_the_fine_tuning_run(models, images, tokenizer, tmp_path):
    """VQA fine-tuning writes its answer list and evaluation settings beside the selected weights."""
    from x2vlm.train import finetune as FT

    paths = image_paths(images)
    rows = [{"question_id": k, "image": p.name, "question": QUESTIONS[k % 4], "answer": ["red"] * 6 + ["blue"] * 4,
             "dataset": "vqa"} for k, p in enumerate(paths)]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "answers.json").write_text(json.dumps(ANSWERS[:6]))
    data = {"train_files": [str(tmp_path / "train.json")], "val_file": str(tmp_path / "train.json"),
            "answer_list": str(tmp_path / "answers.json"), "image_root": str(images), "max_tokens": 9, "k_test": 3}
    task = V.build_task(data, preset("x2vlm-tiny"), tokenizer, "test")
    assert task.inference_files["answer_list.json"] == ANSWERS[:6]
    FT._save_best(models["vqa"].model, tmp_path / "run", tokenizer, task.inference_files)
    model = load(tmp_path / "run")
    assert model.directory == tmp_path / "run" / "best"
    assert model.answer_list() == ANSWERS[:6] and (model.vqa_settings().max_tokens, model.vqa_settings().k_test) == (9, 3)
    assert model.answer(paths[0], "what color is it").answer in ANSWERS[:6]
    bare = Model(model.model, tokenizer)  # no directory: no answer list
    with pytest.raises(ValueError, match="no answer_list.json.*answers="):
        bare.answer(paths[0], "what color is it")


def test_video_qa_answer_equals_the_evaluation(models, videos, tokenizer):
    model = models["video_qa"]
    questions = ["what color is the dog", "is there a cat moving to the left"]
    items = [VQ.VideoQAItem(v, pre_question(q, VQ.EVAL_QUESTION_WORDS), q, "red", 0, None)
             for v, q in zip(["clip_a", "clip_b"], questions)]
    expected = VQ.predict_labels(model.model, items, [0, 1], VQ.VideoSource(str(videos), "{video_id}.mp4"), tokenizer,
                                 VQ.VideoQASettings(64, 3, max_tokens=16), batch_size=2)
    got = model.answer([videos / "clip_a.mp4", videos / "clip_b.mp4"], questions, top_k=2)
    assert [a.answer for a in got] == [LABELS[i] for i in expected.tolist()]
    frames = read_video_frames(videos / "clip_a.mp4")  # a frame list is sampled like the file
    assert_same_top(model.answer(frames, questions[0], top_k=2), got[0])
    assert model.answer(np.stack([np.asarray(f) for f in frames]), questions[0]).answer == got[0].answer


# -- grounding -----------------------------------------------------------------------------------------
def test_ground_equals_the_grounding_evaluation(models, images, tokenizer, tmp_path):
    model = models["grounding"]
    paths = image_paths(images)[:4]
    records = [{"image": p.name, "text": e, "ref_id": k, "bbox": [2, 3, 10, 12]} for k, (p, e) in enumerate(zip(paths, EXPRESSIONS))]
    records.append({"image": paths[2].name, "text": "the dog", "ref_id": 7, "bbox": [1, 1, 5, 5]})
    (tmp_path / "refs.json").write_text(json.dumps(records))
    items = G.load_grounding_file(tmp_path / "refs.json")
    settings = G.GroundingSettings(res=64, max_tokens=10, max_words=30)
    assert model.grounding_settings() == settings
    order, boxes = G.predict_split(model.model, items, str(images), tokenizer, settings, "refs.json", batch_size=2)
    got = np.array(model.ground([images / r["image"] for r in records], [r["text"] for r in records]))
    np.testing.assert_allclose(got[order], boxes, rtol=1e-5, atol=1e-4)
    single = model.ground(paths[2], EXPRESSIONS[2])
    assert len(single) == 4 and single == pytest.approx(got[2].tolist(), abs=1e-4)
    # one image, several expressions: the box is in that image's own pixels
    both = model.ground(Image.open(paths[2]), [EXPRESSIONS[2], "the dog"])
    np.testing.assert_allclose(both, got[[2, 4]], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="expression 0 .* no words left"):
        model.ground(paths[0], "?!")


# -- captioning ----------------------------------------------------------------------------------------
def test_caption_equals_the_captioning_evaluation(models, images, tokenizer, tmp_path):
    model = models["captioning"]
    paths = image_paths(images)[:4]
    (tmp_path / "eval.json").write_text(json.dumps([{"image": p.name, "caption": ["a dog"]} for p in paths]))
    split = C.load_caption_split("test", str(tmp_path / "eval.json"), None, None)
    prompt_ids = torch.tensor(tokenizer.encode_one(C.DEFAULT_PROMPT)[:-1])
    assert torch.equal(model.prompt_ids(), prompt_ids) and model.caption_settings() == GEN
    expected = C.caption_split(model.model, split, list(range(4)), str(images), prompt_ids, GEN, tokenizer, batch_size=3)
    assert model.caption(paths) == expected
    assert model.caption(paths[1]) == expected[1]
    # the pixels are the evaluation transform's
    transform = EvalTransform(64)
    assert torch.equal(model._pixels(paths, range(4)), torch.stack([transform(load_image(p, is_path=True)) for p in paths]))
    greedy = dataclasses.replace(GEN, greedy=True, max_new_tokens=4)
    assert model.caption(paths, greedy=True, max_length=4) == C.caption_split(
        model.model, split, list(range(4)), str(images), prompt_ids, greedy, tokenizer, batch_size=4)
    assert model.caption_settings(beams=3, min_length=0) == dataclasses.replace(GEN, num_beams=3, min_length=0)
    with pytest.raises(ValueError, match="position embeddings"):
        model.caption(paths[0], max_length=100)
    with pytest.raises(ValueError, match="beams must be a positive integer"):
        model.caption(paths[0], beams=0)


# -- retrieval, matching, embeddings, the gallery index ----------------------------------------------------
@pytest.fixture(scope="module")
def retrieval_eval(models, images, tokenizer, tmp_path_factory):
    """The retrieval evaluation's two-stage scores (k_test 3) of the six images and their captions."""
    path = tmp_path_factory.mktemp("retrieval_eval") / "eval.json"
    path.write_text(json.dumps([{"image": p.name, "caption": c} for p, c in zip(image_paths(images), CAPTIONS)]))
    eval_set = R.load_eval_set(path, images, 64, tokenizer, max_tokens=30)
    return R.two_stage_retrieval(models["retrieval"].model, eval_set.vision, eval_set.text_ids, eval_set.text_mask,
                                 R.RerankSettings(k_test=3, batch_size=4))


def raw_texts() -> list[str]:
    return [c for caps in CAPTIONS for c in caps]


def test_match_equals_the_retrieval_scores(models, images, retrieval_eval):
    model, scores = models["retrieval"], retrieval_eval
    paths = image_paths(images)
    result = model.match(paths, raw_texts())
    np.testing.assert_allclose(result["itc"], scores.sims.numpy(), rtol=0, atol=1e-5)
    for matrix in (scores.score_i2t, scores.score_t2i.t()):  # every pair the evaluation re-ranked
        scored = matrix.numpy() > R.NOT_A_CANDIDATE
        assert scored.any()
        np.testing.assert_allclose(result["itm"][scored], matrix.numpy()[scored], rtol=0, atol=1e-4)
    one = model.match(paths[2], raw_texts()[3])
    assert isinstance(one["itm"], float) and one["itm"] == pytest.approx(float(result["itm"][2, 3]), abs=1e-4)
    row = model.match(paths[2], raw_texts())
    np.testing.assert_allclose(row["itm"], result["itm"][2], atol=1e-4)
    pairs = model.match(paths[:3], raw_texts()[:3], pairs=True)
    np.testing.assert_allclose(pairs["itc"], np.diag(result["itc"][:3, :3]), atol=1e-5)
    np.testing.assert_allclose(pairs["itm"], np.diag(result["itm"][:3, :3]), atol=1e-4)
    # the embeddings are the evaluation's normalised ITC features
    image_features, text_features = model.embed_images(paths), model.embed_texts(raw_texts())
    np.testing.assert_allclose(image_features @ text_features.T, scores.sims.numpy(), atol=1e-5)
    assert image_features.shape == (6, 32) and np.allclose(np.linalg.norm(image_features, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(model.embed_texts(raw_texts()[4]), text_features[4], atol=1e-5)
    # a pre-training model has the same heads
    assert models["pretrain"].match(paths[2], raw_texts()[3])["itc"] == pytest.approx(one["itc"], abs=1e-5)


def test_official_checkpoint_file_loads_with_its_preset(models, images, tiny_state, tmp_path, capsys):
    """An official pre-training file (layout of the released checkpoints) used directly for retrieval:
    the same scores as the converted directory; the predict CLI reads it too."""
    official = tmp_path / "x2vlm_tiny_pretrain.th"
    torch.save({"model": tiny_state}, official)
    model = load(official, preset="x2vlm-tiny", task="retrieval", tokenizer=TINY_VOCAB)
    assert model.task == "retrieval" and model.directory is None and model.tokenizer.vocab_size == 512
    paths, texts = image_paths(images), raw_texts()
    expected = models["retrieval"].match(paths, texts)
    result = model.match(paths, texts)
    np.testing.assert_allclose(result["itc"], expected["itc"], atol=1e-6)
    np.testing.assert_allclose(result["itm"], expected["itm"], atol=1e-5)
    capsys.readouterr()
    assert cli_main(["predict", "match", "--model", str(official), "--preset", "x2vlm-tiny", "--task", "retrieval",
                     "--tokenizer", str(TINY_VOCAB), "--image", str(paths[0]), "--text", texts[0]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert np.ravel(out["itm"])[0] == pytest.approx(float(expected["itm"][0, 0]), abs=1e-5)
    with pytest.raises(ValueError, match="needs preset="):
        load(official)


def hits(result) -> list[int]:
    return [h.index for h in result]


def test_retrieve_equals_the_two_stage_evaluation(models, images, retrieval_eval, tmp_path):
    model, scores = models["retrieval"], retrieval_eval
    paths, texts = image_paths(images), raw_texts()
    index = model.index(paths, kind="images", ids=[p.name for p in paths])
    assert index.vision_embeds is None and index.sources == [str(p) for p in paths]  # re-encoded from the files
    text_to_image = model.retrieve(texts, index, k=3)
    assert [hits(r) for r in text_to_image] == scores.score_t2i.topk(3, dim=1).indices.tolist()
    for t, result in enumerate(text_to_image):
        assert [h.itm for h in result] == pytest.approx(scores.score_t2i[t, hits(result)].tolist(), abs=1e-4)
        assert [h.itc for h in result] == pytest.approx(scores.sims[hits(result), t].tolist(), abs=1e-5)
        assert [h.id for h in result] == [paths[i].name for i in hits(result)]
    text_index = model.index(texts, kind="texts")
    image_to_text = model.retrieve(paths, text_index, k=3)
    assert [hits(r) for r in image_to_text] == scores.score_i2t.topk(3, dim=1).indices.tolist()
    assert hits(model.retrieve(Image.open(paths[1]), text_index, k=3)) == hits(image_to_text[1])
    assert hits(model.retrieve(texts[5], index, k=3)) == hits(text_to_image[5])  # single == batched
    assert hits(model.retrieve(texts[5], paths, k=3)) == hits(text_to_image[5])  # a plain list as the gallery
    # beyond k_test the ranking continues by ITC, without ITM scores
    long = model.retrieve(texts[0], index, k=5)
    assert hits(long)[:3] == hits(text_to_image[0]) and [h.itm is None for h in long] == [False] * 3 + [True] * 2
    assert [h.itc for h in long[3:]] == sorted((h.itc for h in long[3:]), reverse=True)
    itc_only = model.retrieve(texts[0], index, k=6, k_test=0)
    assert hits(itc_only) == torch.argsort(scores.sims[:, 0], descending=True).tolist()
    # the index round trip: same results; in-memory items keep their embeddings
    loaded = GalleryIndex.load(index.save(tmp_path / "gallery"))
    assert loaded.ids == index.ids and torch.equal(loaded.features, index.features)
    assert model.retrieve(texts, loaded, k=3) == text_to_image
    kept = model.index([Image.open(p) for p in paths], kind="images")
    assert kept.vision_embeds is not None and kept.sources == [None] * 6
    kept_loaded = GalleryIndex.load(kept.save(tmp_path / "kept"))
    assert isinstance(kept_loaded.vision_embeds, StoredRows)  # read row by row by each query
    kept_results = model.retrieve(texts, kept_loaded, k=3)
    assert [hits(r) for r in kept_results] == [hits(r) for r in text_to_image]
    rows = torch.tensor([4, 0, 1, 5, 1])  # unsorted, a repeat, two runs of consecutive rows
    assert torch.equal(kept_loaded.vision_embeds[rows], kept.vision_embeds[rows])
    with pytest.raises(IndexError, match="outside the 6 stored vision_embeds"):
        kept_loaded.vision_embeds[torch.tensor([6])]
    in_memory = GalleryIndex.load(tmp_path / "kept", lazy=False)
    assert torch.equal(in_memory.vision_embeds, kept.vision_embeds)
    assert GalleryIndex.load(kept_loaded.save(tmp_path / "again")).vision_embeds[rows].equal(kept.vision_embeds[rows])
    # bfloat16 storage: half the bytes, the same ranking here, ITM scores within bf16 rounding
    half = model.index([Image.open(p) for p in paths], kind="images", embeddings_dtype="bf16")
    assert half.vision_embeds.dtype == torch.bfloat16
    half_results = model.retrieve(texts, GalleryIndex.load(half.save(tmp_path / "half")), k=3)
    assert [hits(r) for r in half_results] == [hits(r) for r in text_to_image]
    for mine, full in zip(half_results, kept_results):
        assert [h.itm for h in mine] == pytest.approx([h.itm for h in full], abs=0.05)
    assert model.retrieve(paths, GalleryIndex.load(text_index.save(tmp_path / "texts")), k=3) == image_to_text
    # another model's index is refused
    other = copy.deepcopy(model.model)
    with torch.no_grad():
        other.vision_proj.weight.add_(0.1)
    with pytest.raises(ValueError, match="built by another model"):
        Model(other, model.tokenizer).retrieve(texts[0], loaded)
    with pytest.raises(ValueError, match="ids must be unique"):
        model.index(paths[:2], kind="images", ids=["a", "a"])
    with pytest.raises(ValueError, match="keep_embeddings=False needs every item to be a file path"):
        model.index([Image.open(paths[0])], kind="images", keep_embeddings=False)
    with pytest.raises(FileNotFoundError, match="not a gallery index"):
        GalleryIndex.load(tmp_path)


def test_an_index_streamed_to_disk_piece_by_piece_equals_the_one_built_in_memory(models, images, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from x2vlm import inference

    monkeypatch.setattr(inference, "INDEX_CHUNK", 4)  # 6 images: pieces of 4 and 2
    model, paths, texts = models["retrieval"], image_paths(images), raw_texts()
    built = model.index([Image.open(p) for p in paths], kind="images", embeddings_dtype="bf16")
    streamed = model.index([Image.open(p) for p in paths], kind="images", embeddings_dtype="bf16", out=tmp_path / "streamed")
    assert isinstance(streamed.vision_embeds, StoredRows) and streamed.ids == built.ids
    stored = load_file(str(tmp_path / "streamed" / inference.INDEX_TENSORS))  # a valid safetensors file
    assert stored.keys() == {"features", "vision_embeds", "vision_mask"}
    assert torch.equal(stored["features"], built.features) and torch.equal(stored["vision_embeds"], built.vision_embeds)
    assert torch.equal(stored["vision_mask"], built.vision_mask)
    assert model.retrieve(texts, streamed, k=3) == model.retrieve(texts, built, k=3)
    # saving a lazily loaded index copies its stored rows piece by piece
    again = GalleryIndex.load(streamed.save(tmp_path / "again"), lazy=False)
    assert torch.equal(again.vision_embeds, built.vision_embeds) and torch.equal(again.features, built.features)
    text_index = model.index(texts, kind="texts", out=tmp_path / "texts")
    assert text_index.sources == texts and torch.equal(text_index.features, model.index(texts, kind="texts").features)
    # the file is read with plain reads, never mapped whole; a cut or foreign file is named
    tensors = tmp_path / "again" / inference.INDEX_TENSORS
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"index.safetensors: vision_(embeds|mask) ends early"):
        GalleryIndex.load(tmp_path / "again").vision_embeds[torch.tensor([5])]
    tensors.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        GalleryIndex.load(tmp_path / "again")
    # the writer refuses pieces that do not add up to the rows it announced
    rows = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="2 rows written, 3 announced"):
        inference.write_rows_safetensors(tmp_path / "short.safetensors", 3, [{"x": rows[:2]}])
    with pytest.raises(ValueError, match="more than the 3 rows announced"):
        inference.write_rows_safetensors(tmp_path / "long.safetensors", 3, [{"x": rows}, {"x": rows[:1]}])
    with pytest.raises(ValueError, match="x piece torch.float64"):
        inference.write_rows_safetensors(tmp_path / "mixed.safetensors", 3, [{"x": rows[:1]}, {"x": rows[1:].double()}])


def test_an_interrupted_index_build_resumes_after_its_last_piece(models, images, tmp_path, monkeypatch, caplog):
    from x2vlm import inference

    monkeypatch.setattr(inference, "INDEX_CHUNK", 2)  # 6 images: 3 pieces
    model, paths = models["retrieval"], [str(p) for p in image_paths(images)]
    expected = model.index(paths, kind="images", keep_embeddings=True, embeddings_dtype="bf16")
    encode = model._encode_vision
    calls = []

    def failing(items, *args, **kwargs):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while encoding the second piece
        return encode(items, *args, **kwargs)

    monkeypatch.setattr(model, "_encode_vision", failing)
    with pytest.raises(KeyboardInterrupt):
        model.index(paths, kind="images", keep_embeddings=True, embeddings_dtype="bf16", out=tmp_path / "gallery")
    assert not (tmp_path / "gallery" / inference.INDEX_TENSORS).exists()
    assert json.loads((tmp_path / "gallery" / inference.INDEX_PROGRESS).read_text())["rows"] == 2
    calls.clear()
    monkeypatch.setattr(model, "_encode_vision", lambda items, *a, **k: calls.append(len(items)) or encode(items, *a, **k))
    resumed = model.index(paths, kind="images", keep_embeddings=True, embeddings_dtype="bf16", out=tmp_path / "gallery")
    assert calls == [2, 2]  # only the pieces not on disk
    assert torch.equal(resumed.features, expected.features) and torch.equal(resumed.vision_embeds.load(), expected.vision_embeds)
    assert sorted(p.name for p in (tmp_path / "gallery").iterdir()) == [inference.INDEX_JSON, inference.INDEX_TENSORS]
    # an interrupted build of another layout (fp32 embeddings now) starts over
    monkeypatch.setattr(model, "_encode_vision", failing)
    calls.clear()  # the second piece fails again: the first (bf16) is on disk
    with pytest.raises(KeyboardInterrupt):
        model.index(paths, kind="images", keep_embeddings=True, embeddings_dtype="bf16", out=tmp_path / "other")
    monkeypatch.setattr(model, "_encode_vision", encode)
    with caplog.at_level(logging.INFO, logger="x2vlm"):
        other = model.index(paths, kind="images", keep_embeddings=True, out=tmp_path / "other")
    assert "another layout" in caplog.text and "starting over" in caplog.text
    assert other.vision_embeds.dtype == torch.float32 and torch.equal(other.features, expected.features)
    assert torch.equal(other.vision_embeds.load(), model.index(paths, kind="images", keep_embeddings=True).vision_embeds)


def test_verify_judges_statements_as_the_nlvr_evaluation(models, images, tmp_path):
    from x2vlm.tasks.nlvr import load_nlvr_file, predict_nlvr

    model, paths = models["nlvr"], image_paths(images)
    statements = ["both images contain a red dog", "the left image has more people than the right image",
                  "there are two white cats in total", "exactly one image shows a man sitting at a table on the left"]
    pairs = [(0, 1), (2, 3), (4, 5), (1, 4)]
    records = [{"images": [paths[a].name, paths[b].name], "sentence": t, "label": "True"} for (a, b), t in zip(pairs, statements)]
    (tmp_path / "nlvr.json").write_text(json.dumps(records))
    items = load_nlvr_file(tmp_path / "nlvr.json", max_words=8)  # the saved max_words: the last statement is cut
    with torch.no_grad():
        expected = predict_nlvr(model.model, items, range(len(items)), str(images), model.tokenizer, model.cfg.image_res,
                                12, "test")
        logits = model.model.nlvr_logits(*(R.FileVision([str(paths[p[side]]) for p in pairs], model.cfg.image_res).load(range(4))
                                           for side in (0, 1)), *model.tokenizer([it.text for it in items], max_length=12))
    verdicts = model.verify([paths[a] for a, _ in pairs], [paths[b] for _, b in pairs], statements)
    assert [v.true for v in verdicts] == [bool(p) for p in expected]
    assert [v.probability for v in verdicts] == pytest.approx(logits.softmax(dim=-1)[:, 1].tolist(), abs=1e-5)
    single = model.verify(Image.open(paths[2]), np.asarray(Image.open(paths[3])), statements[1])  # any image input
    assert single.true == verdicts[1].true and single.probability == pytest.approx(verdicts[1].probability, abs=1e-5)
    both = model.verify(paths[0], paths[1], statements[:2])  # one pair, several statements
    assert both[0].to_dict() == pytest.approx(verdicts[0].to_dict(), abs=1e-5)
    with pytest.raises(ValueError, match="2 left and 1 right images"):
        model.verify(paths[:2], paths[:1], statements[0])
    with pytest.raises(TaskMismatchError, match=r"verify\(\) needs an NLVR2 model .*'vqa' model"):
        models["vqa"].verify(paths[0], paths[1], statements[0])


def test_entail_classifies_as_the_xvnli_evaluation(models, images):
    from x2vlm.data.text import pre_caption
    from x2vlm.tasks.xvnli import LABEL_NAMES, XVNLIItem, predict_xvnli, xvnli_logits

    model, paths = models["xvnli"], image_paths(images)
    hypotheses = ["a red dog runs", "two people sit at a table in the city on a sunny day with a dog", "a cat", "no dog"]
    which = [0, 3, 3, 5]
    items = [XVNLIItem(str(paths[i]), pre_caption(h, 8), h, 0) for i, h in zip(which, hypotheses)]  # the saved max_words
    expected = predict_xvnli(model.model, items, list(range(4)), model.tokenizer, model.cfg.image_res, 12, "test")
    with torch.no_grad():
        pixels = R.FileVision([str(paths[i]) for i in which], model.cfg.image_res).load(range(4))
        probs = xvnli_logits(model.model, pixels, *model.tokenizer([it.text for it in items], max_length=12)).softmax(dim=-1)
    answers = model.entail([paths[i] for i in which], hypotheses)
    assert [a.answer for a in answers] == [LABEL_NAMES[p] for p in expected]
    for answer, row in zip(answers, probs):
        assert sorted(name for name, _ in answer.top) == sorted(LABEL_NAMES)
        assert [p for _, p in answer.top] == pytest.approx(sorted(row.tolist(), reverse=True), abs=1e-5)
        assert answer.probability == pytest.approx(float(row.max()), abs=1e-5)
    assert_same_top(model.entail(Image.open(paths[3]), hypotheses[2]), answers[2])  # single, any image input
    assert [a.answer for a in model.entail(paths[3], hypotheses[1:3])] == [a.answer for a in answers[1:3]]
    with pytest.raises(TaskMismatchError, match=r"entail\(\) needs an XVNLI model .*saved task 'video_qa'"):
        models["video_qa"].entail(paths[0], "a dog")  # a classifier too, of video questions
    with pytest.raises(TaskMismatchError, match=r"entail\(\) needs an XVNLI model .*'nlvr' model"):
        models["nlvr"].entail(paths[0], "a dog")


def test_videos_are_sampled_as_the_evaluation_samples_them(models, videos):
    model = models["retrieval"]
    files = [videos / "clip_a.mp4", videos / "clip_b.mp4"]
    pixels = R.FileVision([str(f) for f in files], 64, frame_len=3).load([0, 1])
    with torch.no_grad():
        expected = model.model.vision_features(model.model.encode_videos(pixels)[0])
    got = model.embed_videos(files)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(model.embed_videos(read_video_frames(files[0])), got[0], atol=1e-5)  # a frame list
    np.testing.assert_allclose(model.embed_videos([[np.asarray(f) for f in read_video_frames(files[1])]]), got[1:], atol=1e-5)
    index = model.index(files, kind="videos")
    result = model.retrieve(["a red dog moving", "a white cat"], index, k=2)
    assert all(sorted(hits(r)) == [0, 1] for r in result)
    scores = model.match(files, "a red dog moving", video=True)
    assert scores["itc"] == pytest.approx(got @ model.embed_texts("a red dog moving"), abs=1e-5)


def test_batching_changes_nothing_but_rounding(models, images):
    """In float64 a batch (padded texts, shared images) gives what single calls give, up to the
    float32 the evaluation code casts its outputs to: every padding position is masked."""
    paths = image_paths(images)[:4]
    double = {task: Model(copy.deepcopy(models[task].model).double(), models[task].tokenizer, models[task].directory)
              for task in ("vqa", "grounding", "retrieval")}
    batched = double["vqa"].answer(paths, QUESTIONS, top_k=3)
    for k in range(4):
        single = double["vqa"].answer(paths[k], QUESTIONS[k], top_k=3)
        assert [a for a, _ in single.top] == [a for a, _ in batched[k].top]
        assert [p for _, p in single.top] == pytest.approx([p for _, p in batched[k].top], abs=1e-6)  # rank_answers' float32 softmax
    boxes = double["grounding"].ground(paths, EXPRESSIONS)
    np.testing.assert_allclose([double["grounding"].ground(p, e) for p, e in zip(paths, EXPRESSIONS)], boxes, atol=1e-5)  # float32 boxes
    scores = double["retrieval"].match(paths, raw_texts())
    single = double["retrieval"].match(paths[1], raw_texts()[2])
    assert (single["itm"], single["itc"]) == pytest.approx((scores["itm"][1, 2], scores["itc"][1, 2]), abs=1e-6)


# -- bf16 ----------------------------------------------------------------------------------------------
def test_bf16_runs_every_method(dirs, models, images):
    paths = image_paths(images)[:3]
    vqa = load(dirs["vqa"], dtype="bf16")
    assert vqa.dtype == "bf16"
    answers = vqa.answer(paths, QUESTIONS[:3], top_k=2)
    assert all(a.answer in ANSWERS and 0 < a.probability <= 1 for a in answers)
    box = load(dirs["grounding"], dtype="bf16").ground(paths[0], EXPRESSIONS[0])
    assert box == pytest.approx(models["grounding"].ground(paths[0], EXPRESSIONS[0]), abs=5.0)
    assert all(isinstance(c, str) for c in load(dirs["captioning"], dtype=torch.bfloat16).caption(paths))
    retrieval = load(dirs["retrieval"], dtype="bf16")
    features = retrieval.embed_images(paths)
    assert features.dtype == np.float32
    assert (features * models["retrieval"].embed_images(paths)).sum(axis=1) == pytest.approx([1, 1, 1], abs=0.02)
    assert len(retrieval.retrieve(raw_texts()[:2], retrieval.index(paths, kind="images"), k=2)) == 2


# -- errors --------------------------------------------------------------------------------------------
def test_methods_name_the_task_they_need(models, images, videos):
    path = image_paths(images)[0]
    with pytest.raises(TaskMismatchError, match=r"ground\(\) needs a model with the box head .*'retrieval' model \(heads: itc, itm\)"):
        models["retrieval"].ground(path, "the dog")
    with pytest.raises(TaskMismatchError, match=r"answer\(\) needs a VQA model .*'grounding' model"):
        models["grounding"].answer(path, "what color")
    with pytest.raises(TaskMismatchError, match=r"caption\(\) needs a captioning model .*'vqa' model"):
        models["vqa"].caption(path)
    with pytest.raises(TaskMismatchError, match=r"caption\(\) needs a captioning model .*'pretrain' model"):
        models["pretrain"].caption(path)
    with pytest.raises(TaskMismatchError, match=r"match\(\) needs a model with ITC and ITM heads .*'captioning' model"):
        models["captioning"].match(path, "a dog")
    with pytest.raises(TaskMismatchError, match=r"retrieve\(\) needs a model with ITC and ITM heads .*'classification' model"):
        models["video_qa"].retrieve("a dog", [path])
    with pytest.raises(TaskMismatchError, match=r"embed_images\(\) needs a model with the ITC head .*'grounding' model"):
        models["grounding"].embed_images(path)
    assert isinstance(TaskMismatchError("x"), ValueError)


def test_unreadable_inputs_name_the_file(models, images, tmp_path):
    model = models["retrieval"]
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        model.embed_images(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(ValueError, match="corrupt image in file '.*broken.png'"):
        model.embed_images([image_paths(images)[0], tmp_path / "broken.png"])
    with pytest.raises(FileNotFoundError, match="video file not found: .*missing.mp4"):
        model.embed_videos(tmp_path / "missing.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01 garbage" * 20)
    with pytest.raises(ValueError, match="broken.mp4"):
        model.embed_videos(str(tmp_path / "broken.mp4"))
    with pytest.raises(TypeError, match="an image must be a PIL image, a path"):
        model.embed_images([3])
    with pytest.raises(TypeError, match="must be uint8"):
        model.embed_images(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"must be \(H, W, 3\)"):
        model.embed_images(np.zeros((8, 8, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="expected a string or a list of strings"):
        model.embed_texts(5)
    with pytest.raises(ValueError, match="no image given"):
        model.embed_images([])
