"""Loading the released CCLM-X²-VLM (``XVLMPlus*``) checkpoints in their own layout (spec §1.7, §2.4,
§2.5.4): a state dict with exactly that key layout is written here at tiny size, key by key from a
reference model's modules, saved as the official ``.th``/``.pth`` files, and loaded through
``load_official`` / ``x2vlm convert`` / ``init: official:``.

The layout: ``text_encoder.embeddings.*`` (a bare XLM-R: word/position/token-type embeddings, LayerNorm,
the ``position_ids`` buffer), ``text_encoder.encoder.layer.N.*`` (no cross-attention),
``cross_encoder.encoder.layer.N.*`` (every layer with ``crossattention``, no embeddings),
``mlm_head.predictions.*`` (pre-training only; ``BertOnlyMLMHead``, its decoder *not* tied to the word
embeddings, ``decoder.bias`` the same tensor as ``predictions.bias``), ``vision_encoder.*`` with the
relative-position index buffers, ``vision_proj``, ``text_proj``, ``temp``, ``itm_head``, ``bbox_head``.
"""

import io
import json

import pytest
import torch

from x2vlm.checkpoint import cclm_config, from_pretrained, load_official, multilingual_config, native_to_official, read_state_dict
from x2vlm.cli import main as cli_main
from x2vlm.config import preset
from x2vlm.models.x2vlm import X2VLM
from x2vlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = ["ein roter Kreis links", "une étoile verte en haut", "un círculo azul grande", "a small red circle on the left",
             "zwei blaue Sterne", "trois losanges rouges"] + [str(i) for i in range(20)]
BERT_LAYER = [f"{part}.{p}" for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                                         "attention.output.dense", "attention.output.LayerNorm", "intermediate.dense",
                                         "output.dense", "output.LayerNorm") for p in ("weight", "bias")]
CROSS_ATTENTION = [f"crossattention.{part}.{p}" for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
                   for p in ("weight", "bias")]
HEADS = [f"{head}.{i}.{p}" for head in ("itm_head", "bbox_head") for i in (0, 1, 3) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """What a CCLM release is used with: the XLM-R directory (config.json + sentencepiece.bpe.model), tiny."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("xlmr")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 3), model_writer=model, vocab_size=80, hard_vocab_limit=False,
                                   model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
                                   num_threads=1, minloglevel=2)
    (out / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    vocab = load_tokenizer(out).vocab_size
    (out / "config.json").write_text(json.dumps({
        "model_type": "xlm-roberta", "vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 34, "type_vocab_size": 1, "layer_norm_eps": 1e-5, "pad_token_id": 1}))
    return out


def reference(text_dir, task="pretrain", untied=True) -> X2VLM:
    """A CCLM-shaped model with every weight moved off its initial value."""
    base = preset("x2vlm-tiny", task=task).replace(add_frame_pos=False, frame_len=0)
    cfg = multilingual_config(base, text_dir).replace(untied_mlm_decoder=untied)
    torch.manual_seed(0)
    model = X2VLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def cclm_state(model: X2VLM) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The official CCLM state dict of ``model``, written key by key from its modules (not through
    ``native_to_official``), and for every official key the native parameter it must land in."""
    cfg, state, where = model.cfg, {}, {}

    def put(official: str, tensor: torch.Tensor, native: str | None = None):
        state[official] = tensor.detach().clone()
        if native is not None:
            where[official] = native

    put("temp", model.temp, "temp")
    ve = model.vision_encoder
    for name, tensor in ve.state_dict().items():
        put(f"vision_encoder.{name}", tensor, f"vision_encoder.{name}")
        if name.endswith("relative_position_bias_table"):  # a buffer the releases store, after its table
            index = name.replace("bias_table", "index")
            put(f"vision_encoder.{index}", ve.get_buffer(index))
    assert any(k.endswith("relative_position_index") for k in state)  # the buffers the releases store
    emb = model.text_encoder.embeddings
    put("text_encoder.embeddings.position_ids", torch.arange(cfg.text.max_position_embeddings)[None])
    for name in ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        put(f"text_encoder.embeddings.{name}", emb.get_parameter(name), f"text_encoder.embeddings.{name}")
    assert state["text_encoder.embeddings.token_type_embeddings.weight"].shape[0] == 1  # XLM-R: one token type
    for i, layer in enumerate(model.text_encoder.encoder.layer):
        for name in BERT_LAYER:
            put(f"text_encoder.encoder.layer.{i}.{name}", layer.get_parameter(name), f"text_encoder.encoder.layer.{i}.{name}")
    for i, layer in enumerate(model.cross_encoder.encoder.layer):
        for name in BERT_LAYER + CROSS_ATTENTION:
            put(f"cross_encoder.encoder.layer.{i}.{name}", layer.get_parameter(name), f"cross_encoder.encoder.layer.{i}.{name}")
    if "mlm" in cfg.heads:
        head = model.mlm_head
        for name in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
            put(f"mlm_head.predictions.transform.{name}", head.transform.get_parameter(name), f"mlm_head.transform.{name}")
        put("mlm_head.predictions.bias", head.bias, "mlm_head.bias")
        decoder = head.decoder.weight if cfg.untied_mlm_decoder else emb.word_embeddings.weight
        put("mlm_head.predictions.decoder.weight", decoder, "mlm_head.decoder.weight" if cfg.untied_mlm_decoder else None)
        put("mlm_head.predictions.decoder.bias", head.bias)  # the same tensor as predictions.bias
    for proj in ("vision_proj", "text_proj"):
        for p in ("weight", "bias"):
            put(f"{proj}.{p}", model.get_parameter(f"{proj}.{p}"), f"{proj}.{p}")
    for name in HEADS:
        if name.split(".")[0] in dict(model.named_children()):
            put(name, model.get_parameter(name), name)
    return state, where


def outputs(model: X2VLM, ids, mask, images):
    vision, vmask = model.encode_images(images)
    text = model.encode_text(ids, mask)
    fused = model.fuse(text, mask, vision, vmask)
    out = [model.vision_features(vision), model.text_features(text), model.itm_logits(fused)]
    if "bbox" in model.cfg.heads:
        out.append(model.predict_boxes(vision, text, mask))
    if "mlm" in model.cfg.heads:
        out.append(model.mlm_logits(ids, mask, vision, vmask, torch.tensor([[1, 2]] * len(ids))))
    return out


def inputs(text_dir, size=preset("x2vlm-tiny").image_res):
    ids, mask = load_tokenizer(text_dir)(SENTENCES[:2])
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(5))
    return ids, mask, images


@pytest.mark.parametrize("suffix", [".th", ".pth"])
@torch.no_grad()
def test_cclm_pretraining_checkpoint_loads_key_by_key(text_dir, tmp_path, suffix):
    ref = reference(text_dir)
    state, where = cclm_state(ref)
    # the layout: no bert./roberta. infix, no cls.*, no embeddings in the cross encoder, no pooler
    assert not any(".bert." in k or ".roberta." in k or "cls." in k or "pooler" in k for k in state)
    assert not any(k.startswith("cross_encoder.embeddings") for k in state)
    assert not any("crossattention" in k for k in state if k.startswith("text_encoder."))
    # the released decoder is untied: a matrix of its own, (V, H)
    assert not torch.equal(state["mlm_head.predictions.decoder.weight"], state["text_encoder.embeddings.word_embeddings.weight"])
    path = tmp_path / f"cclm{suffix}"
    torch.save({"model": state} if suffix == ".th" else state, path)

    cfg = cclm_config(read_state_dict(path), preset("x2vlm-tiny"), text_dir)
    assert cfg.replace(name=ref.cfg.name) == ref.cfg  # everything the file and the text encoder's config say
    model = X2VLM(cfg)
    assert load_official(model, path) == []
    loaded = model.state_dict()
    for official, native in where.items():  # every tensor where it should be
        assert torch.equal(loaded[native], state[official]), official
    # and nothing of the model is left out
    assert set(where.values()) == {k for k in loaded if not k.endswith("relative_position_index")}
    model.eval()
    ids, mask, images = inputs(text_dir)
    for got, want in zip(outputs(model, ids, mask, images), outputs(ref, ids, mask, images)):
        assert torch.equal(got, want)
    # and back: our export writes the same layout
    exported = native_to_official(ref)
    assert set(exported) == set(state)
    for key, value in state.items():
        assert torch.equal(exported[key], value), key


@torch.no_grad()
def test_convert_command_and_finetuning_init(text_dir, tmp_path):
    ref = reference(text_dir)
    state, _ = cclm_state(ref)
    src = tmp_path / "cclm_x2vlm_base.th"
    torch.save({"model": state}, src)
    out = tmp_path / "converted"
    assert cli_main(["convert", str(src), str(out), "--preset", "x2vlm-tiny", "--text-encoder", str(text_dir)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "sentencepiece.bpe.model"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["cross_num_layers"] == 2 and saved["untied_mlm_decoder"] is True and saved["text"]["position_style"] == "roberta"
    reloaded = from_pretrained(out)
    ids, mask, images = inputs(text_dir)
    for got, want in zip(outputs(reloaded, ids, mask, images), outputs(ref, ids, mask, images)):
        assert torch.equal(got, want)

    # fine-tuning from the release (``init: official:FILE`` with a multilingual model config): the
    # retrieval model takes encoders, projections and ITM head; the MLM head (and its decoder) is dropped
    from x2vlm.train.pretrain import initialise

    task_model = X2VLM(reloaded.cfg.replace(task="retrieval"))
    assert initialise(task_model, f"official:{src}") == []
    task_model.eval()
    want = outputs(ref, ids, mask, images)[:3]
    for got, w in zip(outputs(task_model, ids, mask, images), want):
        assert torch.equal(got, w)


def test_tied_decoder_and_fine_tuned_files(text_dir, tmp_path):
    # a file whose decoder equals the word embeddings loads into a tied head
    ref = reference(text_dir, untied=False)
    state, _ = cclm_state(ref)
    cfg = cclm_config(state, preset("x2vlm-tiny"), text_dir)
    assert cfg.untied_mlm_decoder is False and "untied_mlm_decoder" not in cfg.to_dict()
    model = X2VLM(cfg)
    assert load_official(model, state) == []
    # a fine-tuned (retrieval) CCLM file: no MLM head, task read off the heads
    ret = reference(text_dir, task="retrieval")
    state, where = cclm_state(ret)
    assert not any(k.startswith("mlm_head") for k in state)
    cfg = cclm_config(state, preset("x2vlm-tiny"), text_dir)
    assert cfg.task == "retrieval"
    model = X2VLM(cfg)
    assert load_official(model, state) == []
    for official, native in where.items():
        assert torch.equal(model.state_dict()[native], state[official]), official


def test_cclm_file_without_text_encoder_config_names_what_is_missing(text_dir, tmp_path, caplog):
    state, _ = cclm_state(reference(text_dir))
    src = tmp_path / "cclm.th"
    torch.save({"model": state}, src)
    vocab = state["text_encoder.embeddings.word_embeddings.weight"].shape[0]
    with pytest.raises(ValueError, match=rf"CCLM / XVLMPlus checkpoint \(XLM-R/RoBERTa text encoder of vocabulary {vocab}.*--text-encoder HF_DIR"):
        cclm_config(state, preset("x2vlm-tiny"), None)
    assert cli_main(["convert", str(src), str(tmp_path / "out"), "--preset", "x2vlm-tiny"]) != 0
    assert "needs its text encoder's configuration" in caplog.text and "--text-encoder HF_DIR" in caplog.text
    # into a model without a cross encoder (an X²-VLM config as ``model:`` of a fine-tuning)
    with pytest.raises(ValueError, match=r"cclm.th: a CCLM / XVLMPlus checkpoint .* has no cross encoder. Its text encoder's configuration is missing"):
        load_official(X2VLM(preset("x2vlm-tiny", task="retrieval")), src)
    # an untied decoder into a tied head is refused by name
    model = X2VLM(cclm_config(state, preset("x2vlm-tiny"), text_dir).replace(untied_mlm_decoder=False))
    with pytest.raises(ValueError, match="mlm_head.predictions.decoder.weight\\) is not tied"):
        load_official(model, state)
