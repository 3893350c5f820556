"""Multilingual retrieval (spec §4.7: XRetrieval, xFlickr&CO, WIT): per-language evaluation files,
metrics per language and their mean, model selection on the validation mean, the xFlickr&CO and WIT
file formats, and a converted multilingual model fine-tuned end to end on the generated world.

Offline there is no XLM-R: a small SentencePiece model is trained on the world's captions in four
languages and a small random RoBERTa-style encoder is written in the Hugging Face layout
(``config.json`` + ``model.safetensors``), then ``x2vlm convert --text-encoder`` builds the model.
"""

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import build_tiny
from safetensors.torch import save_file

from x2vlm.checkpoint import native_to_official
from x2vlm.cli import main as cli_main
from x2vlm.config import TextConfig, preset
from x2vlm.data.readers import DataFormatError, read_wit, read_xflickrco
from x2vlm.models.bert import TextTransformer
from x2vlm.tasks.common import EvalContext
from x2vlm.tasks.retrieval import RECALL_KEYS, build_task, mean_over_languages
from x2vlm.tokenizer import SentencePieceTokenizer, load_tokenizer
from x2vlm.train.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")

LANGUAGES = ("en", "de", "fr", "es")
PLAIN_KEYS = [prefix + key for prefix in ("", "itc_", "itm_plus_itc_") for key in RECALL_KEYS]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from x2vlm.world import generate

    root = tmp_path_factory.mktemp("ml_world")
    generate(root, size="tiny", seed=2, image_size=64)
    return root


def world_images(world: Path, count: int) -> list[Path]:
    return sorted((world / "images" / "val").glob("*.jpg"))[:count]


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def check_per_language(metrics: dict[str, float], languages) -> None:
    """Every metric per language (``<lang>/<metric>``) and, under its plain name, the mean over languages."""
    assert set(metrics) == set(PLAIN_KEYS) | {f"{lang}/{key}" for lang in languages for key in PLAIN_KEYS}
    for key in PLAIN_KEYS:
        assert metrics[key] == pytest.approx(np.mean([metrics[f"{lang}/{key}"] for lang in languages]))
    assert all(0.0 <= v <= 100.0 for v in metrics.values())


# -- xFlickr&CO ----------------------------------------------------------------------------------------
@pytest.fixture
def xflickrco_files(world, tmp_path):
    """Two image roots (a COCO-named image and Flickr-named ones) and test files in two languages."""
    coco, flickr = tmp_path / "coco", tmp_path / "flickr30k"
    coco.mkdir(), flickr.mkdir()
    sources = world_images(world, 3)
    names = ["COCO_val2014_000000000001.jpg", "1000092795.jpg", "1000268201.jpg"]
    for src, name in zip(sources, names):
        shutil.copy(src, (coco if "COCO" in name else flickr) / name)
    sentences = {"en": [["A red circle.", "Two stars."], ["A blue square."], ["Three green crosses!"]],
                 "de": [["Ein roter Kreis."], ["Ein blaues Quadrat.", "Ein Quadrat."], ["Drei grüne Kreuze!"]]}
    files = {lang: write_lines(tmp_path / f"test_{lang}.jsonl", [{"sentences": s, "id": str(i), "img_path": name}
                                                                 for i, (s, name) in enumerate(zip(sentences[lang], names))])
             for lang in sentences}
    return {"coco": str(coco), "flickr30k": str(flickr)}, files


def test_xflickrco_reader_and_errors(xflickrco_files, tmp_path):
    _, files = xflickrco_files
    images = read_xflickrco(files["de"])
    assert [(im.image, im.captions, im.index) for im in images][1] == ("1000092795.jpg", ["Ein blaues Quadrat.", "Ein Quadrat."], "1")
    bad = write_lines(tmp_path / "bad.jsonl", [{"sentences": ["ok"], "id": 1, "img_path": "a.jpg"}, {"id": 2, "img_path": "b.jpg"}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: missing field 'sentences'"):
        read_xflickrco(bad)
    bad.write_text('{"sentences": ["ok"], "id": 1, "img_path": "a.jpg"}\n\n{"sentences": [], "id": 2, "img_path": "b.jpg"}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:3: field 'sentences' must be a non-empty list"):
        read_xflickrco(bad)


@torch.no_grad()
def test_xflickrco_per_language_metrics_and_mean(xflickrco_files, tokenizer, tiny_state, tmp_path):
    """Images resolved under the COCO or Flickr30K root by their path; both languages evaluated, every
    metric per language and the mean; the draw makes one picture per language."""
    roots, files = xflickrco_files
    data = {"format": "xflickrco", "train_files": [str(files["en"])], "val_file": {"en": str(files["en"])},
            "test_file": {k: str(v) for k, v in files.items()}, "image_root": roots, "k_test": 2}
    task = build_task(data, preset("x2vlm-tiny"), tokenizer, "data")
    assert len(task.train_set) == 4 and task.train_set.ids == [0, 0, 1, 2]  # one pair per sentence, the record's id
    assert task.train_set.images[0] == str(Path(roots["coco"]) / "COCO_val2014_000000000001.jpg")
    assert task.train_set.images[1] == task.train_set.images[0] and task.train_set.images[2].startswith(roots["flickr30k"])
    model = build_tiny("retrieval", tiny_state)
    ctx = EvalContext(DistInfo(), batch_size=4, out_dir=tmp_path)
    metrics = task.evaluate(model, "test", ctx)
    check_per_language(metrics, ["en", "de"])
    pictures = task.draw(model, tmp_path / "pictures", ctx)
    assert [p.name for p in pictures] == ["retrieval_test_en.png", "retrieval_test_de.png"]
    # a COCO image without a COCO root is named with its file
    with pytest.raises(ValueError, match=r"test_en.jsonl: image 'COCO_val2014_000000000001.jpg' is under image_root.coco"):
        build_task({**data, "image_root": {"flickr30k": roots["flickr30k"]}}, preset("x2vlm-tiny"), tokenizer, "data")


# -- WIT -----------------------------------------------------------------------------------------------
@pytest.fixture
def wit_files(world, tmp_path):
    """WIT lines (one caption each) of three images in two languages; the first URL has two lines."""
    contents = [base64.b64encode(p.read_bytes()).decode() for p in world_images(world, 3)]
    captions = {"en": ["a red circle", "a circle that is red", "a blue square", "three green crosses"],
                "fr": ["un cercle rouge", "un cercle", "un carré bleu", "trois croix vertes"]}
    owners = [0, 0, 1, 2]
    files = {}
    for lang, texts in captions.items():
        files[lang] = write_lines(tmp_path / f"wit_{lang}.jsonl", [
            {"image_url": f"https://upload.example/img{k}.jpg", "image_content": contents[k], "caption_reference_description": text,
             "language": lang, "page_title": "x"} for text, k in zip(texts, owners)])
    return files


def test_wit_reader_groups_by_url_and_names_errors(wit_files, tmp_path):
    wit = read_wit(wit_files["en"])
    assert [im.image for im in wit.images] == [f"https://upload.example/img{k}.jpg" for k in range(3)]
    assert wit.images[0].captions == ["a red circle", "a circle that is red"] and wit.images[0].index == wit.images[0].image
    assert wit.contents[wit.images[2].image][:3] == b"\xff\xd8\xff"  # the JPEG file itself
    lines = wit_files["en"].read_text().splitlines()
    record = json.loads(lines[2])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], lines[1], json.dumps({**record, "image_content": "not base64 %%%"})]) + "\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:3: field 'image_content' must be base64 image data"):
        read_wit(bad)
    bad.write_text(json.dumps({**record, "caption_reference_description": None}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: field 'caption_reference_description' must be a non-empty string"):
        read_wit(bad)


@torch.no_grad()
def test_wit_per_language_metrics_and_training_pairs(wit_files, tokenizer, tiny_state, tmp_path):
    data = {"format": "wit", "train_files": [str(wit_files["en"])], "val_file": {k: str(v) for k, v in wit_files.items()},
            "test_file": str(wit_files["fr"]), "k_test": 2, "selection_metric": "fr/r_mean"}
    task = build_task(data, preset("x2vlm-tiny"), tokenizer, "data")
    assert len(task.train_set) == 4 and task.train_set.ids == [0, 0, 1, 2]
    sample = task.train_set.get(0, np.random.default_rng(0))  # decoded from the file's bytes
    assert sample.pixels.shape == (3, 64, 64)
    model = build_tiny("retrieval", tiny_state)
    ctx = EvalContext(DistInfo(), batch_size=4, out_dir=tmp_path)
    val = task.evaluate(model, "val", ctx)
    check_per_language(val, ["en", "fr"])
    test = task.evaluate(model, "test", ctx)  # a single file: plain metrics, as before
    assert set(test) == set(PLAIN_KEYS) and test["r_mean"] == pytest.approx(val["fr/r_mean"])
    with pytest.raises(ValueError, match="WIT files hold their images"):
        build_task({**data, "image_root": str(tmp_path)}, preset("x2vlm-tiny"), tokenizer, "data")


def test_config_errors_and_the_mean(tmp_path, tokenizer, world):
    ml = world / "multilingual"
    base = {"train_files": [str(ml / "coco_en_train.json")], "val_file": {"en": str(ml / "coco_en_val.json")},
            "test_file": str(ml / "coco_en_test.json"), "image_root": str(world / "images")}
    cfg = preset("x2vlm-tiny")
    with pytest.raises(FileNotFoundError, match=r"key 'val_file.de': no file at .*missing.json"):
        build_task({**base, "val_file": {"en": base["test_file"], "de": str(tmp_path / "missing.json")}}, cfg, tokenizer, "data")
    with pytest.raises(ValueError, match=r"key 'test_file': language 'd e' must be"):
        build_task({**base, "test_file": {"d e": base["test_file"]}}, cfg, tokenizer, "data")
    with pytest.raises(ValueError, match=r"'selection_metric' 'de/r_mean' unknown"):
        build_task({**base, "selection_metric": "de/r_mean"}, cfg, tokenizer, "data")
    with pytest.raises(ValueError, match=r"key 'format' 'iglue' unknown"):
        build_task({**base, "format": "iglue"}, cfg, tokenizer, "data")
    with pytest.raises(ValueError, match=r"'image_root' must be a mapping with keys among \['coco', 'flickr30k'\]"):
        build_task({**base, "format": "xflickrco"}, cfg, tokenizer, "data")
    task = build_task({**base, "extra_eval_files": {"test_all": {lang: str(ml / f"coco_{lang}_test.json") for lang in LANGUAGES}}},
                      cfg, tokenizer, "data")
    assert task.eval_splits == ["val", "test", "test_all"]
    means = mean_over_languages({"en": {"r_mean": 50.0, "txt_r1": 10.0}, "de": {"r_mean": 30.0, "txt_r1": 0.0}})
    assert means == {"r_mean": 40.0, "txt_r1": 5.0, "en/r_mean": 50.0, "en/txt_r1": 10.0, "de/r_mean": 30.0, "de/txt_r1": 0.0}


# -- a converted multilingual model, fine-tuned end to end ------------------------------------------------
@pytest.fixture(scope="module")
def xlmr_dir(world, tmp_path_factory):
    """A Hugging Face XLM-R-style directory: a SentencePiece model trained on the world's captions in
    four languages, ``config.json`` and random ``model.safetensors`` (``roberta.`` names), the tiny
    X²-VLM's text width."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("xlmr")
    sentences = [pair["caption"] for lang in LANGUAGES for pair in json.loads((world / "multilingual" / f"coco_{lang}_train.json").read_text())]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=300, hard_vocab_limit=False, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    (out / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    vocab_size = load_tokenizer(out).vocab_size
    hf = {"model_type": "xlm-roberta", "vocab_size": vocab_size, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "max_position_embeddings": 66, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1,
          "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    (out / "config.json").write_text(json.dumps(hf))
    text_cfg = TextConfig(vocab_size=vocab_size, hidden_size=64, num_heads=4, intermediate_size=128, max_position_embeddings=66,
                          type_vocab_size=1, layer_norm_eps=1e-5, num_layers=2, fusion_start=2, position_style="roberta",
                          pad_token_id=1, cls_token_id=0, sep_token_id=2, unk_token_id=3, mask_token_id=vocab_size - 1)
    torch.manual_seed(0)
    encoder = TextTransformer(text_cfg, 2, cross_start=2, cross_width=64)
    save_file({f"roberta.{k}": v.contiguous() for k, v in encoder.state_dict().items()}, str(out / "model.safetensors"))
    return out


def test_finetune_converted_multilingual_model_end_to_end(world, xlmr_dir, tiny_state, tmp_path):
    """``x2vlm convert --text-encoder`` then ``x2vlm finetune retrieval`` on English training captions
    with validation in English and German and test in four languages: metrics per language and
    their means in metrics.json, selection on the validation mean, the SentencePiece tokenizer saved
    with the selected weights, ``x2vlm.load`` of the run and ``x2vlm evaluate`` of it."""
    import x2vlm

    official = tmp_path / "official.th"
    torch.save({"model": native_to_official(build_tiny("retrieval", tiny_state))}, official)
    converted = tmp_path / "multilingual"
    assert cli_main(["convert", str(official), str(converted), "--preset", "x2vlm-tiny", "--text-encoder", str(xlmr_dir)]) == 0
    ml = world / "multilingual"
    data = {"train_files": [str(ml / "coco_en_train.json")], "val_file": {lang: str(ml / f"coco_{lang}_val.json") for lang in ("en", "de")},
            "test_file": {lang: str(ml / f"coco_{lang}_test.json") for lang in LANGUAGES}, "image_root": str(world / "images"),
            "k_test": 4, "hflip": False, "randaug": False, "crop_scale": [1.0, 1.0]}
    run = tmp_path / "run"
    config = {"task": "retrieval", "model": str(converted), "init": f"ours:{converted}", "data": data, "out_dir": str(run),
              "precision": "fp32", "tensorboard": False, "max_steps": 2, "batch_size": 8, "eval_every": 1, "eval_batch_size": 16}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["finetune", "retrieval", "--config", str(tmp_path / "run.yaml")]) == 0

    summary = json.loads((run / "metrics.json").read_text())
    check_per_language(summary["results"]["val"], ["en", "de"])
    check_per_language(summary["results"]["test"], LANGUAGES)
    history = summary["validation_history"]
    assert [h["step"] for h in history] == [1, 2]
    selection = summary["selection"]
    assert selection["metric"] == max(h["r_mean"] for h in history)
    assert selection["metric"] == pytest.approx((history[selection["step"] - 1]["en/r_mean"] + history[selection["step"] - 1]["de/r_mean"]) / 2)
    assert sorted(p.name for p in (run / "best").iterdir()) == ["config.json", "inference.json", "model.safetensors", "sentencepiece.bpe.model"]

    model = x2vlm.load(run)
    assert isinstance(model.tokenizer, SentencePieceTokenizer) and model.cfg.cross_num_layers == 2
    assert model.cfg.cross.layer_norm_eps == 1e-12 and model.cfg.text.layer_norm_eps == 1e-5
    german = json.loads((ml / "coco_de_test.json").read_text())[0]["caption"][0]
    ids = model.tokenizer.encode_one(german)
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids  # <s> pieces </s>, no <unk> for the world's German
    assert model.embed_texts([german, "A red circle."]).shape == (2, model.cfg.embed_dim)

    # ``x2vlm evaluate`` of the run reads the same tokenizer from best/ and gives the same test metrics
    assert cli_main(["evaluate", "retrieval", "--checkpoint", str(run), "--config", str(tmp_path / "run.yaml"),
                     "--out-dir", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())["results"]["test"]
    assert evaluated == pytest.approx(summary["results"]["test"])
