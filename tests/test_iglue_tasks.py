"""IGLUE tasks (spec §4.7): XVNLI (task ``xvnli``), xGQA (task ``vqa`` with ``format: gqa``) and
MaRVL (task ``nlvr`` with per-language evaluation files, ``x2vlm convert-marvl``).

Fixture files in every published form are written here (malformed lines too), the per-language
metrics and their mean are checked against predictions made directly, and each task is fine-tuned
for two steps and evaluated through the CLI, with the English tiny model and with the multilingual
(separate cross encoder, SentencePiece) model that ``x2vlm convert --text-encoder`` makes.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_VOCAB, build_tiny
import test_multilingual_tasks as ml_tasks

from x2vlm.checkpoint import load_official, native_to_official
from x2vlm.cli import main as cli_main
from x2vlm.config import preset
from x2vlm.data.readers import DataFormatError, read_gqa, read_gqa_answers, read_marvl, read_xvnli
from x2vlm.models.x2vlm import X2VLM
from x2vlm.tasks import nlvr as N
from x2vlm.tasks import vqa as V
from x2vlm.tasks import xvnli as X
from x2vlm.tasks.common import EvalContext
from x2vlm.train.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("one_thread")

# module fixtures shared with the multilingual retrieval tests: the generated world (seed 2, 64 px) and
# an XLM-R-style Hugging Face directory (SentencePiece trained on the world's captions, random weights)
world, xlmr_dir = ml_tasks.world, ml_tasks.xlmr_dir


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records), encoding="utf-8")
    return path


def copy_images(world: Path, folder: Path, names: list[str]) -> None:
    """World images copied to ``folder/<name>`` (sub-folders made as needed)."""
    sources = sorted((world / "images" / "val").glob("*.jpg"))
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[k % len(sources)], folder / name)


def check_per_language(metrics: dict[str, float], languages, keys=("acc",)) -> None:
    assert set(metrics) == set(keys) | {f"{lang}/{key}" for lang in languages for key in keys}
    for key in keys:
        assert metrics[key] == pytest.approx(np.mean([metrics[f"{lang}/{key}"] for lang in languages]))
        assert 0.0 <= metrics[key] <= 100.0


# -- fixture data ----------------------------------------------------------------------------------------
XVNLI_HYPOTHESES = {
    "en": [("A red circle is shown.", "entailment"), ("There is nothing.", "contradiction"), ("Two shapes.", "neutral"),
           ("A blue square.", "entailment"), ("No crosses.", "-"), ("Three crosses.", "contradiction")],
    "de": [("Ein roter Kreis.", "entailment"), ("Es gibt nichts.", "contradiction"), ("Zwei Formen.", "neutral"),
           ("Ein blaues Quadrat.", "neutral")],
}
FLICKR_IDS = ["1000092795", "10002456", "1000268201"]


@pytest.fixture(scope="module")
def xvnli_files(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("xvnli")
    copy_images(world, root / "flickr30k", [f"{i}.jpg" for i in FLICKR_IDS])
    files = {lang: write_lines(root / f"{lang}.jsonl", [{"Flikr30kID": FLICKR_IDS[k % 3], "sentence2": text, "gold_label": label,
                                                         "sentence1": "premise"} for k, (text, label) in enumerate(items)])
             for lang, items in XVNLI_HYPOTHESES.items()}
    return root / "flickr30k", files


GQA_LIST = [  # LXMERT / IGLUE few-shot form
    {"img_id": "n161313", "sent": "What color is the circle?", "label": {"red": 1.0}, "question_id": "q1"},
    {"img_id": "n161313", "sent": "Is there a square?", "label": {"yes": 1.0, "no": 0.5}, "question_id": "q2"},
    {"img_id": "n235859", "sent": "How many crosses?", "label": {"3": 1.0}, "question_id": "q3"},
    {"img_id": "n235859", "sent": "What shape is blue?", "label": {"square": 1.0}, "question_id": "q4"},
]
GQA_DICT_DE = {  # GQA balanced-questions form (the IGLUE test files)
    "201307251": {"imageId": "n161313", "question": "Welche Farbe hat der Kreis?", "answer": "red", "fullAnswer": "Rot."},
    "201640614": {"imageId": "n235859", "question": "Gibt es ein Quadrat?", "answer": "yes"},
    "202225914": {"imageId": "n235859", "question": "Wie viele Kreuze?", "answer": "3"},
}
GQA_ANSWERS = {"red": 0, "yes": 1, "no": 2, "3": 3, "square": 4, "circle": 5}


@pytest.fixture(scope="module")
def gqa_files(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("xgqa")
    copy_images(world, root / "images", ["n161313.jpg", "n235859.jpg"])
    (root / "train_en.json").write_text(json.dumps(GQA_LIST))
    (root / "test_de.json").write_text(json.dumps(GQA_DICT_DE, ensure_ascii=False))
    (root / "ans2label.json").write_text(json.dumps(GQA_ANSWERS))
    return root


MARVL_RECORDS = [
    {"id": "id-1", "language": "id", "concept": "3-Ayam", "chapter": "Animal", "left_img": "3-1.jpg", "right_img": "3-2.jpg",
     "caption": "Dua ekor ayam di gambar kiri.", "label": True},
    {"id": "id-2", "language": "id", "concept": "3-Ayam", "left_img": "3-2.jpg", "right_img": "3-3.jpg",
     "caption": "Tidak ada ayam.", "label": "False"},
    {"id": "id-3", "language": "id", "concept": "7-Bakso", "left_img": "7-1.jpg", "right_img": "7-2.jpg",
     "caption": "Semangkuk bakso.", "label": False},
]


@pytest.fixture(scope="module")
def marvl_files(world, tmp_path_factory):
    """IGLUE MaRVL lines in two languages with their images in the official layout, converted; and
    an English NLVR2 training file (the world's)."""
    root = tmp_path_factory.mktemp("marvl")
    sw = [{**r, "language": "sw", "caption": f"sw {r['caption']}", "concept": r["concept"].replace("Ayam", "Kuku")} for r in MARVL_RECORDS]
    converted = {}
    for lang, records in (("id", MARVL_RECORDS), ("sw", sw)):
        src = write_lines(root / f"marvl-{lang}.jsonl", records)
        N.convert_marvl(src, root / f"marvl_{lang}.json", root=str(root / "images"))
        converted[lang] = root / f"marvl_{lang}.json"
        copy_images(world, root, sorted({p for r in json.loads(converted[lang].read_text()) for p in r["images"]}))
    train = [{**r, "images": [str(world / "images" / p) for p in r["images"]]} for r in json.loads((world / "nlvr2/nlvr_train.json").read_text())]
    (root / "nlvr_train.json").write_text(json.dumps(train))
    return root, converted


# -- XVNLI -----------------------------------------------------------------------------------------------
def test_xvnli_reader_labels_skips_and_errors(xvnli_files, tmp_path):
    _, files = xvnli_files
    examples, skipped = read_xvnli(files["en"])
    assert skipped == 1  # the "-" line
    assert [(e.image_id, e.label) for e in examples] == [("1000092795", 0 + 1), ("10002456", 0), ("1000268201", 2), ("1000092795", 1),
                                                          ("1000268201", 0)]
    good = {"Flikr30kID": "1.jpg", "sentence2": "ok", "gold_label": "neutral"}
    assert read_xvnli(write_lines(tmp_path / "ok.jsonl", [good]))[0][0].image_id == "1"
    for record, message in [({**good, "sentence2": ""}, r"bad.jsonl:2: field 'sentence2' must be a non-empty string"),
                            ({"sentence2": "x", "gold_label": "neutral"}, r"bad.jsonl:2: missing field 'Flikr30kID'"),
                            ({**good, "gold_label": 1}, r"bad.jsonl:2: field 'gold_label' must be one of"),
                            ('{"Flikr30kID": "1", ', r"bad.jsonl:2: invalid JSON")]:
        with pytest.raises(DataFormatError, match=message):
            read_xvnli(write_lines(tmp_path / "bad.jsonl", [good, record]))


@torch.no_grad()
def test_xvnli_per_language_metrics_and_mean(xvnli_files, tokenizer, tiny_state, tmp_path, caplog):
    image_root, files = xvnli_files
    data = {"train_file": str(files["en"]), "val_file": {lang: str(p) for lang, p in files.items()}, "test_file": str(files["de"]),
            "image_root": str(image_root), "max_tokens": 16}
    with caplog.at_level("INFO"):
        task = X.build_task(data, preset("x2vlm-tiny"), tokenizer, "data")
    assert "en.jsonl: skipped 1 line(s)" in caplog.text
    assert task.model_task == "classification" and task.model_changes == {"num_labels": 3} and task.selection_metric == "acc"
    assert task.inference_files == {"inference.json": {"task": "xvnli", "max_tokens": 16, "max_words": 40}}  # for Model.entail
    assert [it.label for it in task.train_set.items] == [1, 0, 2, 1, 0]
    assert task.train_set.items[0].image == str(image_root / "1000092795.jpg")
    sample = task.train_set.get(0, np.random.default_rng(0))
    assert sample.pixels.shape == (3, 64, 64)
    torch.manual_seed(0)
    model = X2VLM(preset("x2vlm-tiny", task="classification", num_labels=3))
    assert {k.split(".")[0] for k in load_official(model, tiny_state)} == {"cls_head"}  # the fixture's encoders
    torch.nn.init.normal_(model.cls_head[3].weight, std=1.0)  # spread the predictions over the labels
    model.eval()
    batch = task.collate([task.train_set.get(i, np.random.default_rng(i)) for i in range(4)])
    assert torch.isfinite(X.xvnli_loss(model, batch, torch.Generator())["cls"])
    embeds, vision_mask = model.encode_images(batch.images)  # the head reads the fused CLS (token 0)
    fused = model.encode_multimodal(batch.text_ids, batch.text_mask, embeds, vision_mask)
    torch.testing.assert_close(X.xvnli_logits(model, batch.images, batch.text_ids, batch.text_mask), model.cls_head(fused[:, 0]))
    ctx = EvalContext(DistInfo(), batch_size=3, out_dir=tmp_path)
    val = task.evaluate(model, "val", ctx)
    check_per_language(val, ["en", "de"])
    for lang, path in files.items():  # each language's accuracy is that of direct predictions
        items = X.load_xvnli_file(str(path), str(image_root), 40)
        preds = X.predict_xvnli(model, items, list(range(len(items))), tokenizer, 64, 16, str(path), batch_size=1)
        assert val[f"{lang}/acc"] == pytest.approx(100 * np.mean(preds == np.array([it.label for it in items])))
    assert task.evaluate(model, "test", ctx) == {"acc": val["de/acc"]}  # a single file: plain metrics
    with pytest.raises(ValueError, match=r"'selection_metric' 'fr/acc' unknown"):
        X.build_task({**data, "selection_metric": "fr/acc"}, preset("x2vlm-tiny"), tokenizer, "data")
    assert X.build_task({**data, "selection_metric": "de/acc"}, preset("x2vlm-tiny"), tokenizer, "data").selection_metric == "de/acc"
    with pytest.raises(FileNotFoundError, match=r"key 'test_file.fr': no file"):
        X.build_task({**data, "test_file": {"fr": str(tmp_path / "no.jsonl")}}, preset("x2vlm-tiny"), tokenizer, "data")
    features, labels = task.classifier_inputs(model, ctx)  # the head warm-up's inputs: what the head reads
    assert labels.tolist() == [1, 0, 2, 1, 0] and features.shape == (5, model.cfg.text.hidden_size)
    train_preds = X.predict_xvnli(model, task.train_set.items, list(range(5)), tokenizer, 64, 16, "train", batch_size=2)
    with torch.no_grad():
        assert np.array_equal(model.classify(features).argmax(-1).numpy(), train_preds)
    moved = X.build_task({**data, "image_root": str(tmp_path)}, preset("x2vlm-tiny"), tokenizer, "data")
    with pytest.raises(FileNotFoundError, match=r"1000092795\.jpg \(field 'Flikr30kID' of .*en.jsonl\)"):
        moved.train_set.get(0, np.random.default_rng(0))


# -- xGQA ------------------------------------------------------------------------------------------------
def test_gqa_readers_both_forms_and_errors(gqa_files, tmp_path):
    listed = read_gqa(gqa_files / "train_en.json")
    assert [(e.question_id, e.image_id, e.question, e.answers) for e in listed][1] == ("q2", "n161313", "Is there a square?",
                                                                                      {"yes": 1.0, "no": 0.5})
    keyed = read_gqa(gqa_files / "test_de.json")
    assert [(e.question_id, e.image_id, e.answers) for e in keyed] == [("201307251", "n161313", {"red": 1.0}), ("201640614", "n235859", {"yes": 1.0}),
                                                                       ("202225914", "n235859", {"3": 1.0})]
    assert read_gqa_answers(gqa_files / "ans2label.json") == list(GQA_ANSWERS)
    bad = tmp_path / "bad.json"
    for content, message in [([GQA_LIST[0], {"img_id": "n1", "label": {"a": 1}}], r"bad.json\[1\]: missing field 'sent'"),
                             ([{**GQA_LIST[0], "label": {}}], r"bad.json\[0\]: field 'label' must be a non-empty mapping"),
                             ({"7": {"imageId": "n1", "question": "q?", "answer": ""}}, r"bad.json\['7'\]: field 'answer' must be a non-empty"),
                             ({"7": {"question": "q?", "answer": "a"}}, r"bad.json\['7'\]: missing field 'imageId'"),
                             ("text", r"bad.json: expected a JSON list")]:
        bad.write_text(json.dumps(content))
        with pytest.raises(DataFormatError, match=message):
            read_gqa(bad)
    bad.write_text('[{"img_id": "n1",\n "sent": }]')
    with pytest.raises(DataFormatError, match=r"bad.json:2:\d+: invalid JSON"):
        read_gqa(bad)
    bad.write_text(json.dumps([GQA_LIST[0], GQA_LIST[0]]))
    with pytest.raises(DataFormatError, match=r"question_id\(s\) \['q1'\] occur more than once"):
        V.gqa_examples(str(bad))


def gqa_data(root: Path, **changes) -> dict:
    return {"format": "gqa", "train_files": [str(root / "train_en.json")], "val_file": {"en": str(root / "train_en.json")},
            "test_file": {"en": str(root / "train_en.json"), "de": str(root / "test_de.json")}, "answer_list": str(root / "ans2label.json"),
            "image_root": str(root / "images"), "k_test": 3, "max_tokens": 16, **changes}


@torch.no_grad()
def test_xgqa_per_language_exact_match_and_mean(gqa_files, tokenizer, tiny_state, tmp_path):
    task = V.build_task(gqa_data(gqa_files), preset("x2vlm-tiny"), tokenizer, "data")
    assert task.model_task == "vqa" and task.eval_splits == ["val", "test"] and task.selection_metric == "acc"
    sample = task.train_set.get(1, np.random.default_rng(0))
    assert (sample.answers, sample.weights) == (["yes", "no"], [1.0, 0.5])  # the labels weighted by their scores
    assert task.train_set.get(0, np.random.default_rng(0)).pixels.shape == (3, 64, 64)
    model = build_tiny("vqa", tiny_state)
    ctx = EvalContext(DistInfo(), batch_size=2, out_dir=tmp_path)
    test = task.evaluate(model, "test", ctx)
    check_per_language(test, ["en", "de"])
    for lang, source in (("en", GQA_LIST), ("de", GQA_DICT_DE)):  # exact match of the written answers with the first label
        result = {r["question_id"]: r["answer"] for r in json.loads((tmp_path / f"vqa_test_{lang}_result.json").read_text())}
        first = {r["question_id"]: next(iter(r["label"])) for r in source} if lang == "en" else {q: r["answer"] for q, r in source.items()}
        assert set(result) == set(first) and set(result.values()) <= set(GQA_ANSWERS)
        assert test[f"{lang}/acc"] == pytest.approx(100 * np.mean([result[q] == first[q] for q in first]))
    with pytest.raises(ValueError, match=r"key 'format' 'xgqa' unknown"):
        V.build_task(gqa_data(gqa_files, format="xgqa"), preset("x2vlm-tiny"), tokenizer, "data")
    with pytest.raises(ValueError, match=r"official VQA v2 files"):
        V.build_task(gqa_data(gqa_files, val_questions_file="q.json", val_annotations_file="a.json"), preset("x2vlm-tiny"), tokenizer, "data")
    with pytest.raises(DataFormatError, match=r"ans2label.json: expected a JSON object keyed by answer"):
        (tmp_path / "ans2label.json").write_text("{}")
        V.build_task(gqa_data(gqa_files, answer_list=str(tmp_path / "ans2label.json")), preset("x2vlm-tiny"), tokenizer, "data")


# -- MaRVL -----------------------------------------------------------------------------------------------
def test_marvl_converter_paths_labels_and_errors(marvl_files, tmp_path):
    root, converted = marvl_files
    records = json.loads(converted["id"].read_text())
    images = str(root / "images")
    assert records[0] == {"images": [f"{images}/marvl_official/id/images/3-Ayam/3-1.jpg", f"{images}/marvl_official/id/images/3-Ayam/3-2.jpg"],
                          "sentence": "Dua ekor ayam di gambar kiri.", "label": True}
    assert [r["label"] for r in records] == [True, False, False]
    assert records[2]["images"][1] == f"{images}/marvl_official/id/images/7-Bakso/7-2.jpg"
    # the CLI, few-shot layout (no concept needed), default root "images"
    fewshot = write_lines(tmp_path / "fewshot.jsonl", [{k: v for k, v in r.items() if k != "concept"} for r in MARVL_RECORDS])
    assert cli_main(["convert-marvl", str(fewshot), str(tmp_path / "out.json"), "--fewshot", "--language", "id"]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert [r["images"] for r in out][1] == ["images/marvl_fewshot/id/all/3-2.jpg", "images/marvl_fewshot/id/all/3-3.jpg"]
    assert [r["label"] for r in out] == [True, False, False] and [r["sentence"] for r in out] == [r["caption"] for r in MARVL_RECORDS]
    assert N.load_nlvr_file(tmp_path / "out.json")[0].label == 1  # the task reads what the converter writes
    with pytest.raises(DataFormatError, match=r"fewshot.jsonl:1: missing field 'concept'"):
        N.convert_marvl(fewshot, tmp_path / "x.json")
    with pytest.raises(DataFormatError, match=r"marvl-id.jsonl:1: field 'language' is 'id', expected 'sw'"):
        N.convert_marvl(converted_src(root, "id"), tmp_path / "x.json", language="sw")
    bad = write_lines(tmp_path / "bad.jsonl", [MARVL_RECORDS[0], {**MARVL_RECORDS[1], "label": "yes"}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: field 'label' must be true/false"):
        read_marvl(bad)
    write_lines(bad, [MARVL_RECORDS[0], {k: v for k, v in MARVL_RECORDS[1].items() if k != "right_img"}])
    assert cli_main(["convert-marvl", str(bad), str(tmp_path / "y.json")]) == 2  # reported, no traceback
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: missing field 'right_img'"):
        read_marvl(bad)
    assert not (tmp_path / "y.json").exists()


def converted_src(root: Path, lang: str) -> Path:
    return root / f"marvl-{lang}.jsonl"


@torch.no_grad()
def test_marvl_per_language_accuracy_and_mean(marvl_files, tokenizer, tiny_state):
    root, converted = marvl_files
    data = {"train_file": str(root / "nlvr_train.json"), "eval_files": {"val": {k: str(v) for k, v in converted.items()},
                                                                         "test": str(converted["sw"])}, "max_tokens": 16}
    task = N.build_task(data, preset("x2vlm-tiny"), tokenizer, "data")
    torch.manual_seed(0)
    model = X2VLM(preset("x2vlm-tiny", task="nlvr"))
    assert {k.split(".")[0] for k in load_official(model, tiny_state)} == {"cls_head"}  # the fixture's encoders
    model.eval()
    ctx = EvalContext(DistInfo(), batch_size=2)
    val = task.evaluate(model, "val", ctx)
    check_per_language(val, ["id", "sw"])
    for lang, path in converted.items():
        items = N.load_nlvr_file(path)
        preds = N.predict_nlvr(model, items, range(len(items)), None, tokenizer, 64, 16, str(path))
        assert val[f"{lang}/acc"] == pytest.approx(100 * np.mean(preds == np.array([it.label for it in items])))
    assert task.evaluate(model, "test", ctx) == {"acc": val["sw/acc"]}
    with pytest.raises(FileNotFoundError, match=r"key 'eval_files.test.ta': no file"):
        N.build_task({**data, "eval_files": {"val": str(converted["id"]), "test": {"ta": str(root / "none.json")}}},
                     preset("x2vlm-tiny"), tokenizer, "data")


# -- end to end: fine-tune 2 steps and evaluate through the CLI, English and multilingual models -------------
@pytest.fixture(scope="module")
def multilingual_model(world, xlmr_dir, tiny_state, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml_model")
    official = out / "official.th"
    torch.save({"model": native_to_official(build_tiny("retrieval", tiny_state))}, official)
    assert cli_main(["convert", str(official), str(out / "model"), "--preset", "x2vlm-tiny", "--text-encoder", str(xlmr_dir)]) == 0
    return out / "model"


def task_data(task: str, xvnli_files, gqa_files, marvl_files) -> tuple[str, dict, list[str]]:
    """(CLI task, data section, the test languages) of each IGLUE task on the fixture files."""
    if task == "xvnli":
        image_root, files = xvnli_files
        return "xvnli", {"train_file": [str(files["en"])] * 2, "val_file": {"en": str(files["en"])},
                         "test_file": {lang: str(p) for lang, p in files.items()}, "image_root": str(image_root), "max_tokens": 16,
                         "randaug": False}, ["en", "de"]
    if task == "xgqa":
        return "vqa", gqa_data(gqa_files, randaug=False), ["en", "de"]
    root, converted = marvl_files
    return "nlvr", {"train_file": str(root / "nlvr_train.json"), "eval_files": {"val": {"id": str(converted["id"])},
                    "test": {k: str(v) for k, v in converted.items()}}, "max_tokens": 16, "randaug": False}, ["id", "sw"]


@pytest.mark.parametrize("model_kind", ["english", "multilingual"])
@pytest.mark.parametrize("iglue_task", ["xvnli", "xgqa", "marvl"])
def test_finetune_and_evaluate_through_the_cli(iglue_task, model_kind, xvnli_files, gqa_files, marvl_files, multilingual_model, tmp_path):
    cli_task, data, languages = task_data(iglue_task, xvnli_files, gqa_files, marvl_files)
    if model_kind == "english":
        model = {"model": "x2vlm-tiny", "model_changes": {"tokenizer": TINY_VOCAB}, "init": "scratch"}
    else:
        model = {"model": str(multilingual_model), "init": f"ours:{multilingual_model}"}
    run = tmp_path / "run"
    config = {"task": cli_task, **model, "data": data, "out_dir": str(run), "precision": "fp32", "tensorboard": False, "max_steps": 2,
              "batch_size": 2, "eval_every": 1, "eval_batch_size": 4, "log_every": 1}
    if iglue_task != "xgqa":  # the classifiers' head warm-up runs through the CLI too
        config["head_warmup"] = {"epochs": 2, "batch_size": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["finetune", cli_task, "--config", str(tmp_path / "run.yaml")]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    check_per_language(summary["results"]["test"], languages)
    history = summary["validation_history"]
    assert [h["step"] for h in history] == [1, 2] and summary["selection"]["metric"] == max(h["acc"] for h in history)
    warmup = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "head_warmup_epoch" in line]
    assert [r["head_warmup_epoch"] for r in warmup] == ([] if iglue_task == "xgqa" else [1, 2])
    saved = json.loads((run / "best" / "config.json").read_text())
    assert saved["cross_num_layers"] == (2 if model_kind == "multilingual" else 0)
    assert saved["task"] == {"xvnli": "classification", "xgqa": "vqa", "marvl": "nlvr"}[iglue_task]
    assert (run / "best" / "sentencepiece.bpe.model").exists() == (model_kind == "multilingual")
    assert cli_main(["evaluate", cli_task, "--checkpoint", str(run), "--config", str(tmp_path / "run.yaml"), "--out-dir", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())["results"]["test"]
    assert evaluated == pytest.approx(summary["results"]["test"])


def test_multilingual_answer_decoder_starts_from_the_cross_encoder(multilingual_model, gqa_files):
    """xGQA on a converted model: the decoder layers are the cross encoder's (``XVLMPlusForVQA``), its
    embeddings the XLM-R text encoder's."""
    from x2vlm.train import finetune as FT

    cfg = FT.build_finetune_config({"task": "vqa", "model": str(multilingual_model), "init": f"ours:{multilingual_model}",
                                    "data": gqa_data(gqa_files)}, "cfg")
    base = FT.base_model_config(cfg)
    task = FT.build_task(cfg, base, FT.run_tokenizer(cfg, base))
    model, new = FT.build_model(cfg, task, base)
    state = model.state_dict()
    for d in range(2):
        for key in ("attention.self.query.weight", "crossattention.self.key.weight", "output.dense.weight"):
            torch.testing.assert_close(state[f"answer_decoder.encoder.layer.{d}.{key}"], state[f"cross_encoder.encoder.layer.{d}.{key}"])
    torch.testing.assert_close(state["answer_decoder.embeddings.word_embeddings.weight"], state["text_encoder.embeddings.word_embeddings.weight"])
    assert any(n.startswith("answer_decoder.") for n in new)  # trained at lr * lr_mult like a new head


@pytest.mark.parametrize("name, task, module", [("xvnli_base", "xvnli", X), ("xgqa_base", "vqa", V), ("marvl_base", "nlvr", N)])
def test_shipped_configs_parse_and_use_known_keys(name, task, module):
    from x2vlm.tasks.common import check_keys
    from x2vlm.train.finetune import load_finetune_config

    cfg = load_finetune_config(Path(module.__file__).parents[1] / "configs" / "finetune" / f"{name}.yaml", task=task)
    check_keys(cfg.data, module.DATA_KEYS, name)
    tests = cfg.data["test_file"] if "test_file" in cfg.data else cfg.data["eval_files"]["test"]
    assert isinstance(tests, dict) and len(tests) >= 5  # every IGLUE test language
