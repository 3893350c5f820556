"""XLM-R / RoBERTa text encoders from Hugging Face directories, their SentencePiece tokenizer, and the
X²-VLM -> multilingual conversion (spec §1.7, §2.5.4).

Offline there is no XLM-R: a small SentencePiece model is trained here on the world's captions in
four languages and tiny random RoBERTa-family models are written in the Hugging Face layout, so the
real loading paths run end to end against ``transformers`` (and ``sentencepiece``) as references.
"""

import io
import json
import random

import pytest
import torch
import transformers
from conftest import build_tiny

from x2vlm.checkpoint import CheckpointMismatchError, convert_to_multilingual, from_pretrained, native_to_official
from x2vlm.cli import main as cli_main
from x2vlm.models.hf_text import read_hf_text_config, rename_hf_text_key, text_encoder_from_hf
from x2vlm.tokenizer import SentencePieceTokenizer, WordPieceTokenizer, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny X²-VLM preset's text dimensions: the fusion layers moved to the cross encoder keep them.
HIDDEN, HEADS, INTERMEDIATE = 64, 4, 128
TEXTS = [
    "Ein kleiner roter Kreis links von zwei blauen Sternen.",
    "Une petite étoile verte en haut à droite.",
    "Un círculo azul grande encima de tres rombos rojos.",
    "A zebra quietly jumps over the 7 lazy dogs!",  # words (and characters) the vocabulary lacks
    "Ж  and  ЖЖ   with   odd    spacing ",
    "ＡＢＣ full-width letters ①",  # NFKC normalisation through the model's character map
    "",
]


def world_sentences(count: int = 400) -> list[str]:
    """Captions of the generated world in English, German, French and Spanish."""
    from x2vlm.world import vocabulary as vocab
    from x2vlm.world.language import LocatedCaption, NounPhrase, RelationCaption, render_caption

    rng = random.Random(0)
    shapes = sorted(vocab.SHAPE_PLURALS)
    colors = [c for c in vocab.GERMAN_ADJECTIVES if c not in ("small", "large")]
    sentences = []
    for i in range(count):
        subject = NounPhrase(shape=rng.choice(shapes), color=rng.choice(colors), size=rng.choice([None, "small", "large"]))
        if i % 2:
            other = NounPhrase(shape=rng.choice(shapes), color=rng.choice(colors), determiner="count", count=rng.choice([2, 3, 4]))
            caption = RelationCaption(subject, rng.choice(sorted(vocab.RELATION_PHRASES)), other)
        else:
            caption = LocatedCaption(subject, rng.choice(sorted(vocab.LOCATION_PHRASES["en"])))
        sentences.append(render_caption(caption, vocab.LANGUAGES[i % len(vocab.LANGUAGES)]))
    return sentences


@pytest.fixture(scope="module")
def spm():
    """The sentencepiece library: trains the test's model and is the reference for its ids."""
    import sentencepiece

    return sentencepiece


@pytest.fixture(scope="module")
def spm_dir(spm, tmp_path_factory):
    """An XLM-R tokenizer directory holding only ``sentencepiece.bpe.model`` (unigram, XLM-R ids)."""
    out = tmp_path_factory.mktemp("spm")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(world_sentences()), model_writer=model, vocab_size=200, hard_vocab_limit=False,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, num_threads=1,
        minloglevel=2,
    )
    (out / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(spm_dir):
    """transformers' XLM-R tokenizer of ``spm_dir`` (converting the .model needs protobuf)."""
    import google.protobuf  # noqa: F401  (transformers converts the .model file with it)

    return transformers.XLMRobertaTokenizer.from_pretrained(str(spm_dir))


@pytest.fixture(scope="module")
def json_dir(hf_tokenizer, tmp_path_factory):
    """The same tokenizer as transformers saves it: ``tokenizer.json`` + ``tokenizer_config.json``."""
    out = tmp_path_factory.mktemp("tokjson")
    hf_tokenizer.save_pretrained(str(out))
    return out


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its initial value (LayerNorm 1/0, zero biases), so that a swapped or
    unloaded weight shows in outputs and key-by-key comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def hf_config(kind: str, vocab_size: int, eps: float = 1e-5, layers: int = 2, hidden: int = HIDDEN):
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=HEADS,
                  intermediate_size=INTERMEDIATE, layer_norm_eps=eps)
    if kind == "bert":
        return transformers.BertConfig(max_position_embeddings=32, type_vocab_size=2, **common)
    cls = transformers.XLMRobertaConfig if kind == "xlm-roberta" else transformers.RobertaConfig
    return cls(max_position_embeddings=34, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)


def write_hf_model(directory, kind: str, vocab_size: int, seed: int = 0, eps: float = 1e-5, layers: int = 2, hidden: int = HIDDEN):
    """A random Hugging Face model directory; returns the bare encoder (``XLMRobertaModel`` ...) for reference.

    XLM-R is saved as ``XLMRobertaForMaskedLM`` in safetensors (``roberta.`` prefix, ``lm_head``);
    RoBERTa as ``RobertaModel`` in ``pytorch_model.bin`` (with pooler); BERT as a TF-era
    ``pytorch_model.bin`` (``bert.`` prefix, ``LayerNorm.gamma/beta``, ``cls`` head, position-id buffer)."""
    torch.manual_seed(seed)
    cfg = hf_config(kind, vocab_size, eps, layers, hidden)
    if kind == "xlm-roberta":
        full = transformers.XLMRobertaForMaskedLM(cfg)
        perturb(full, seed)
        full.save_pretrained(str(directory))
        encoder = full.roberta
    else:
        encoder = (transformers.RobertaModel if kind == "roberta" else transformers.BertModel)(cfg)
        perturb(encoder, seed)
        cfg.save_pretrained(str(directory))
        state = {k: v.clone() for k, v in encoder.state_dict().items()}
        if kind == "bert":
            state = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                     for k, v in state.items()}
            state["bert.embeddings.position_ids"] = torch.arange(32)[None]
            state["cls.predictions.bias"] = torch.zeros(vocab_size)
        torch.save(state, directory / "pytorch_model.bin")
    return encoder.eval()


def padded_batch(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return ids, (ids != pad).long()


# -- the text encoder ------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("kind", ["xlm-roberta", "roberta", "bert"])
def test_hf_directory_text_states_equal_transformers(kind, tmp_path):
    """Every layer's states of our encoder built from the directory equal transformers' on the same
    padded ids (at the real tokens), for XLM-R (safetensors, MLM head), RoBERTa (.bin, pooler) and
    BERT (.bin, legacy gamma/beta names)."""
    vocab = 120
    reference = write_hf_model(tmp_path, kind, vocab)
    ours = text_encoder_from_hf(tmp_path)
    pad = 1 if kind != "bert" else 0
    cls, sep = (0, 2) if kind != "bert" else (101 % vocab, 102 % vocab)
    gen = torch.Generator().manual_seed(1)
    rows = [[cls, *torch.randint(5, vocab, (n,), generator=gen).tolist(), sep] for n in (9, 3, 14)]
    ids, mask = padded_batch(rows, pad)
    expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    states, per_layer = ours(ids, mask, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(states[real], expected.last_hidden_state[real], atol=1e-5, rtol=0)
    assert len(per_layer) == len(expected.hidden_states) == 3
    for got, want in zip(per_layer, expected.hidden_states):
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def test_hf_config_becomes_text_config(tmp_path, spm_dir):
    (tmp_path / "sentencepiece.bpe.model").write_bytes((spm_dir / "sentencepiece.bpe.model").read_bytes())
    vocab_size = load_tokenizer(tmp_path).vocab_size
    write_hf_model(tmp_path, "xlm-roberta", vocab_size=vocab_size, layers=3)
    cfg = read_hf_text_config(tmp_path)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (vocab_size, HIDDEN, HEADS, INTERMEDIATE)
    assert (cfg.num_layers, cfg.fusion_start, cfg.max_position_embeddings, cfg.type_vocab_size) == (3, 3, 34, 1)
    assert cfg.layer_norm_eps == 1e-5 and cfg.position_style == "roberta"
    assert (cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id, cfg.unk_token_id, cfg.mask_token_id) == (1, 0, 2, 3, vocab_size - 1)
    # without the tokenizer: XLM-R's fixed layout (<mask> the last id) gives the same ids
    assert read_hf_text_config(tmp_path, use_tokenizer=False) == cfg
    # a tokenizer with more ids than the model has embeddings is refused
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "vocab_size": vocab_size - 1}))
    with pytest.raises(ValueError, match=f"field 'vocab_size' is {vocab_size - 1} but the directory's tokenizer has {vocab_size} ids"):
        read_hf_text_config(tmp_path)
    bert = tmp_path / "bert"
    bert.mkdir()
    write_hf_model(bert, "bert", vocab_size=120)
    cfg = read_hf_text_config(bert)
    assert cfg.position_style == "absolute" and (cfg.pad_token_id, cfg.cls_token_id, cfg.type_vocab_size) == (0, 101, 2)


def test_key_renaming_rules():
    assert rename_hf_text_key("roberta.encoder.layer.3.output.LayerNorm.weight") == "text_encoder.encoder.layer.3.output.LayerNorm.weight"
    assert rename_hf_text_key("bert.embeddings.LayerNorm.gamma") == "text_encoder.embeddings.LayerNorm.weight"
    assert rename_hf_text_key("encoder.layer.0.attention.output.LayerNorm.beta") == "text_encoder.encoder.layer.0.attention.output.LayerNorm.bias"
    for dropped in ("pooler.dense.weight", "roberta.pooler.dense.bias", "lm_head.dense.weight", "lm_head.bias",
                    "cls.predictions.bias", "bert.embeddings.position_ids", "roberta.embeddings.token_type_ids"):
        assert rename_hf_text_key(dropped) is None, dropped


# -- the tokenizer ---------------------------------------------------------------------------------
def sentencepiece_reference(spm, spm_dir, text: str) -> list[int]:
    """XLM-R ids straight from the sentencepiece library: fairseq offset +1, its <unk> (0) -> 3."""
    proc = spm.SentencePieceProcessor(model_file=str(spm_dir / "sentencepiece.bpe.model"))
    return [0, *(i + 1 if i else 3 for i in proc.encode(text)), 2]


@pytest.mark.parametrize("source", ["tokenizer.json", "sentencepiece.bpe.model"])
def test_sentencepiece_tokenizer_equals_transformers(source, spm, spm_dir, json_dir, hf_tokenizer):
    """Ids, truncation, padding, decoding and special ids of our tokenizer (read through
    ``tokenizers`` from tokenizer.json, or from the .model file directly) equal transformers'."""
    tok = load_tokenizer(json_dir if source == "tokenizer.json" else spm_dir)
    assert isinstance(tok, SentencePieceTokenizer) and tok.source.name == source
    assert tok.vocab_size == len(hf_tokenizer)
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "unk_token_id", "mask_token_id"):
        assert getattr(tok, name) == getattr(hf_tokenizer, name), name
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, tok.vocab_size - 1)
    for text in TEXTS:
        ids = tok.encode_one(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert ids == sentencepiece_reference(spm, spm_dir, text), text
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
    assert 3 in tok.encode_one(TEXTS[3])  # unknown characters become <unk>
    for length in (2, 5, 9):
        expected = hf_tokenizer(TEXTS[0], max_length=length, truncation=True)["input_ids"]
        assert tok.encode_one(TEXTS[0], max_length=length) == expected
    ids, mask = tok(TEXTS[:4], max_length=12)
    reference = hf_tokenizer(TEXTS[:4], max_length=12, truncation=True, padding=True, return_tensors="pt")
    assert torch.equal(ids, reference["input_ids"]) and torch.equal(mask, reference["attention_mask"])
    assert tok.encode_one("<mask> rot") == hf_tokenizer("<mask> rot")["input_ids"]  # the mask token is matched in text
    assert tok.encode_one("<mask>")[1] == tok.mask_token_id
    pieces = tok.tokenize(TEXTS[1])
    assert pieces[0].startswith("\u2581") and [tok.vocab[p] for p in pieces] == tok.encode_one(TEXTS[1])[1:-1]
    assert {0, 1, 2, 3, tok.mask_token_id} <= tok.special_ids


def test_sentencepiece_model_file_vocabulary_layout(spm, spm_dir):
    """The .model path (the sentencepiece library) gives XLM-R's fairseq layout: every SentencePiece
    piece i >= 3 at id i + 1, <s> <pad> </s> <unk> first, <mask> last; it survives pickling (data
    loader workers)."""
    import pickle

    tok = load_tokenizer(spm_dir / "sentencepiece.bpe.model")
    proc = spm.SentencePieceProcessor(model_file=str(spm_dir / "sentencepiece.bpe.model"))
    assert tok.vocab_size == proc.get_piece_size() + 2
    tokens = sorted(tok.vocab, key=tok.vocab.get)
    assert tokens[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and tokens[-1] == "<mask>"
    for i in range(3, proc.get_piece_size()):
        assert tok.vocab[proc.id_to_piece(i)] == i + 1
    copy = pickle.loads(pickle.dumps(tok))
    assert [copy.encode_one(t) for t in TEXTS] == [tok.encode_one(t) for t in TEXTS]
    assert tok.decode(tok.encode_one(TEXTS[0]), skip_special_tokens=False).startswith("<s>")


def test_tokenizer_factory_and_save(spm_dir, json_dir, tmp_path):
    assert isinstance(load_tokenizer("bert-base-uncased"), WordPieceTokenizer)
    assert isinstance(load_tokenizer(spm_dir / "sentencepiece.bpe.model"), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(json_dir / "tokenizer.json"), SentencePieceTokenizer)
    both = tmp_path / "both"  # tokenizer.json wins over the .model file
    load_tokenizer(json_dir).save(both)
    load_tokenizer(spm_dir).save(both)
    assert load_tokenizer(both).source.name == "tokenizer.json"
    assert sorted(p.name for p in both.iterdir()) == ["sentencepiece.bpe.model", "tokenizer.json", "tokenizer_config.json"]
    wordpiece = tmp_path / "wp"
    wordpiece.mkdir()
    load_tokenizer("bert-base-uncased").save(wordpiece)
    assert isinstance(load_tokenizer(wordpiece), WordPieceTokenizer)
    assert load_tokenizer(wordpiece).files == {"vocab.txt": wordpiece / "vocab.txt"}


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, sentencepiece.bpe.model or vocab.txt"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "sentencepiece.bpe.model"
    bad.write_bytes(b"\xff\xff\xff\xff not a model")
    with pytest.raises(ValueError, match="sentencepiece.bpe.model: not a SentencePiece model file"):
        load_tokenizer(tmp_path)


# -- X²-VLM -> multilingual --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory, spm_dir):
    """A tiny XLM-R with the tiny X²-VLM's text width, heads and feed-forward size, XLM-R's LayerNorm eps
    (1e-5, while the X²-VLM fusion layers use BERT's 1e-12), and the tokenizer."""
    out = tmp_path_factory.mktemp("xlmr")
    (out / "sentencepiece.bpe.model").write_bytes((spm_dir / "sentencepiece.bpe.model").read_bytes())
    vocab_size = load_tokenizer(out).vocab_size
    encoder = write_hf_model(out, "xlm-roberta", vocab_size, seed=3, eps=1e-5)
    return out, encoder


@torch.no_grad()
def test_conversion_moves_fusion_layers_and_keeps_outputs(tiny_state, tiny_inputs, xlmr_dir):
    """Every fusion weight lands in the cross encoder (key by key), everything else but the text
    encoder is kept, the text encoder is the XLM-R's; for the same text states the fusion output,
    ITM logits, boxes and vision features are unchanged."""
    text_dir, reference_text = xlmr_dir
    source = build_tiny("pretrain", tiny_state)
    model, new = convert_to_multilingual(source, text_dir)
    model.eval()
    assert new == ["mlm_head.bias"]
    cfg = model.cfg
    assert cfg.cross_num_layers == 2 and cfg.text.num_layers == cfg.text.fusion_start == 2
    # XLM-R's text layers keep eps 1e-5, the cross encoder the fusion layers' BERT eps 1e-12
    assert cfg.text.layer_norm_eps == 1e-5 and cfg.cross.layer_norm_eps == source.cfg.text.layer_norm_eps == 1e-12
    assert model.cross_encoder.encoder.layer[0].output.LayerNorm.eps == 1e-12
    assert cfg.text.position_style == "roberta" and cfg.tokenizer == str(text_dir)
    before, after = source.state_dict(), model.state_dict()
    fusion_start = source.cfg.text.fusion_start
    moved = {}
    for key, value in before.items():
        parts = key.split(".")
        if key.startswith("text_encoder.encoder.layer.") and int(parts[3]) >= fusion_start:
            target = ".".join(["cross_encoder", "encoder", "layer", str(int(parts[3]) - fusion_start), *parts[4:]])
            assert torch.equal(after[target], value), key
            moved[target] = key
        elif not key.startswith("text_encoder.") and key != "mlm_head.bias":
            assert torch.equal(after[key], value), key
    assert set(moved) == {k for k in after if k.startswith("cross_encoder.")}
    assert any("crossattention" in k for k in moved)
    hf_state = reference_text.state_dict()
    text_keys = [k for k in after if k.startswith("text_encoder.")]
    for key in text_keys:
        assert torch.equal(after[key], hf_state[key[len("text_encoder."):]]), key
    assert len(text_keys) == len([k for k in hf_state if rename_hf_text_key(k) is not None])

    images, mask = tiny_inputs["images"], tiny_inputs["text_atts"]
    states = torch.randn(*mask.shape, HIDDEN, generator=torch.Generator().manual_seed(0))
    outputs = []
    for m in (source, model):
        vision, vmask = m.encode_images(images)
        fused = m.fuse(states, mask, vision, vmask)
        # (not the MLM transform: as officially, the head is built with the text encoder's config, eps 1e-5)
        outputs.append((vision, m.vision_features(vision), fused, m.itm_logits(fused), m.predict_boxes(vision, states, mask)))
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # and the new text encoder is the XLM-R
    ids, text_mask = load_tokenizer(text_dir)(TEXTS[:3])
    real = text_mask.bool()
    expected = reference_text(input_ids=ids, attention_mask=text_mask).last_hidden_state
    torch.testing.assert_close(model.encode_text(ids, text_mask)[real], expected[real], atol=1e-5, rtol=0)


@torch.no_grad()
def test_convert_command_with_text_encoder(tmp_path, tiny_state, tiny_inputs, xlmr_dir):
    """``x2vlm convert --text-encoder``: an official X²-VLM file -> a multilingual model directory
    with the XLM-R tokenizer, which loads back with the same outputs."""
    text_dir, _ = xlmr_dir
    source = build_tiny("retrieval", tiny_state)
    src = tmp_path / "official.th"
    torch.save({"model": native_to_official(source)}, src)
    out = tmp_path / "multilingual"
    assert cli_main(["convert", str(src), str(out), "--preset", "x2vlm-tiny", "--text-encoder", str(text_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "sentencepiece.bpe.model"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["cross_num_layers"] == 2 and saved["cross"]["layer_norm_eps"] == 1e-12 and saved["text"]["layer_norm_eps"] == 1e-5
    reloaded = from_pretrained(out)
    expected, _ = convert_to_multilingual(source, text_dir)
    images = tiny_inputs["images"]
    ids, text_mask = load_tokenizer(out)(TEXTS[: len(images)])
    for m in (expected.eval(), reloaded):
        vision, vmask = m.encode_images(images)
        text = m.encode_text(ids, text_mask)
        m._out = (m.text_features(text), m.itm_logits(m.fuse(text, text_mask, vision, vmask)))
    for a, b in zip(expected._out, reloaded._out):
        assert torch.equal(a, b)


def test_cross_config_round_trip_and_old_files(tmp_path):
    """``X2VLMConfig.cross`` survives config.json; files without it (older directories, or models
    without a separate cross encoder) load with ``cross`` None and are written back without it;
    inconsistent cross settings are refused by field."""
    from x2vlm.config import X2VLMConfig, preset

    plain = preset("x2vlm-tiny")
    assert "cross" not in plain.to_dict() and X2VLMConfig.from_dict(plain.to_dict()).cross is None
    text = {"num_layers": 2, "fusion_start": 2, "layer_norm_eps": 1e-5, "position_style": "roberta", "pad_token_id": 1}
    cross = {**plain.to_dict()["text"], "num_layers": 2, "fusion_start": 0}
    cfg = plain.replace(text=text, cross_num_layers=2, cross=cross)
    assert cfg.cross_text.layer_norm_eps == 1e-12 and cfg.text.layer_norm_eps == 1e-5
    cfg.save(tmp_path / "config.json")
    assert X2VLMConfig.load(tmp_path / "config.json") == cfg
    old = cfg.to_dict()
    del old["cross"]  # a multilingual directory written before ``cross`` existed: the text settings
    assert X2VLMConfig.from_dict(old).cross_text == X2VLMConfig.from_dict(old).text
    with pytest.raises(ValueError, match="config field 'cross': num_layers 3"):
        cfg.replace(cross={"num_layers": 3})
    with pytest.raises(ValueError, match="config field 'cross.hidden_size': 32 differs"):
        cfg.replace(cross={"hidden_size": 32})
    with pytest.raises(ValueError, match="cross-encoder settings given but cross_num_layers is 0"):
        plain.replace(cross=cross)
    with pytest.raises(ValueError, match=r"cross: unknown key\(s\) \['eps'\]"):
        X2VLMConfig.from_dict({**cfg.to_dict(), "cross": {**cross, "eps": 1}})


# -- errors ----------------------------------------------------------------------------------------
def test_missing_files_and_unknown_model_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        read_hf_text_config(tmp_path)
    hf_config("xlm-roberta", 50).save_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no weights file .*model.safetensors, pytorch_model.bin"):
        text_encoder_from_hf(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="config.json: field 'model_type' is 'gpt2'"):
        read_hf_text_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**data, "hidden_act": "gelu_new"}))
    with pytest.raises(ValueError, match="config.json: field 'hidden_act'"):
        read_hf_text_config(tmp_path)
    del data["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="config.json: missing field 'hidden_size'"):
        read_hf_text_config(tmp_path)


def test_shape_mismatches_are_named(tmp_path, tiny_state):
    # weights of another size than config.json says: every mis-shaped key, and the weights file, named
    write_hf_model(tmp_path, "xlm-roberta", vocab_size=60)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "vocab_size": 61, "intermediate_size": 2 * INTERMEDIATE}))
    with pytest.raises(CheckpointMismatchError) as info:
        text_encoder_from_hf(tmp_path)
    message = str(info.value)
    assert "model.safetensors" in message and "text_encoder.embeddings.word_embeddings.weight: checkpoint (60, 64) vs model (61, 64)" in message
    assert "text_encoder.encoder.layer.1.intermediate.dense.weight" in message
    # a text model whose width differs from the X²-VLM text width cannot take over the fusion layers
    wide = tmp_path / "wide"
    wide.mkdir()
    write_hf_model(wide, "xlm-roberta", vocab_size=60, hidden=32)
    with pytest.raises(ValueError, match="wide/config.json: field 'hidden_size' is 32 but the X²-VLM model has text.hidden_size=64"):
        convert_to_multilingual(build_tiny("retrieval", tiny_state), wide)
