"""Official key layouts, strict loading, our directory format, the convert command."""

import json

import pytest
import torch
from conftest import PARITY, build_tiny

from x2vlm.checkpoint import (
    CheckpointMismatchError,
    from_pretrained,
    infer_config,
    load_official,
    native_to_official,
    official_to_native,
    save_pretrained,
)
from x2vlm.cli import main as cli_main
from x2vlm.config import X2VLMConfig, from_official_yaml, preset
from x2vlm.models.x2vlm import X2VLM

OFFICIAL_CLASS_TASK = {
    "XVLM": "pretrain",
    "XVLMForRetrieval": "retrieval",
    "XVLMForGrounding": "grounding",
    "XVLMForNLVR": "nlvr",
    "XVLMForClassification": "classification",
    "XVLMForVQAClassification": "classification",
    "XVLMForVQA": "vqa",
    "XVLMForMLMCaptioning": "captioning",
}
LISTINGS = sorted(p.name for p in PARITY.glob("keys_*.json"))


def listing_state_dict(listing: dict) -> dict[str, torch.Tensor]:
    """A state dict with the listed keys and shapes; tied keys share one tensor as in the releases."""
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    state = {key: torch.zeros(shape, dtype=dtypes[dtype]) for key, shape, dtype, _ in listing["state_dict"]}
    for group in listing["storage_sharing_groups"]:
        for key in group[1:]:
            state[key] = state[group[0]]
    return state


@pytest.mark.parametrize("name", LISTINGS)
def test_official_layout_export_and_strict_load(name):
    listing = json.loads((PARITY / name).read_text())
    task = OFFICIAL_CLASS_TASK[listing["model_class"].split(":")[1]]
    cfg = from_official_yaml(listing["constructed_with_config"], task=task)
    with torch.device("meta"):
        model = X2VLM(cfg)
    exported = {k: list(v.shape) for k, v in native_to_official(model).items()}
    expected = {key: shape for key, shape, _, _ in listing["state_dict"]}
    assert sorted(set(exported) ^ set(expected)) == []
    assert {k: exported[k] for k in expected} == expected
    assert list(exported) == list(expected), "key order differs from the official state dict"
    # and the model accepts a state dict built from the listing, strictly (nothing new, nothing left)
    state = listing_state_dict(listing)
    assert load_official(model, state, from_pretraining=False) == []


def test_parameter_counts_match_the_releases():
    for name, expected in (("keys_x2vlm_base.json", 254_758_401), ("keys_x2vlm_large.json", 592_949_057)):
        listing = json.loads((PARITY / name).read_text())
        assert listing["num_parameters_unique"] == expected
        cfg = from_official_yaml(listing["constructed_with_config"], task="pretrain")
        with torch.device("meta"):
            model = X2VLM(cfg)
        assert sum(p.numel() for p in model.parameters()) == expected


def _tiny_official(tiny_state):
    return {k: v.clone() for k, v in tiny_state.items()}


def test_strict_loading_names_every_bad_key(tiny_state):
    state = _tiny_official(tiny_state)
    del state["vision_encoder.blocks.1.mlp.fc1.bias"]
    state["vision_encoder.blocks.0.unexpected_thing"] = torch.zeros(3)
    state["text_proj.weight"] = torch.zeros(7, 64)
    model = X2VLM(preset("x2vlm-tiny"))
    with pytest.raises(CheckpointMismatchError) as info:
        load_official(model, state)
    message = str(info.value)
    assert "vision_encoder.blocks.1.mlp.fc1.bias" in message and "missing (1)" in message
    assert "vision_encoder.blocks.0.unexpected_thing" in message and "unexpected (1)" in message
    assert "text_proj.weight: checkpoint (7, 64) vs model (32, 64)" in message and "mis-shaped (1)" in message


def test_tied_alias_must_match(tiny_state):
    state = _tiny_official(tiny_state)
    state["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ValueError, match="tied"):
        official_to_native(state)


def test_official_wrapped_checkpoint_file_and_unsafe_pickle_refusal(tmp_path, tiny_state):
    path = tmp_path / "model_state_epoch_0.th"
    torch.save({"model": _tiny_official(tiny_state)}, path)
    model = X2VLM(preset("x2vlm-tiny"))
    assert load_official(model, path) == []
    # a checkpoint that pickles a config object needs the explicit flag
    risky = tmp_path / "with_config.th"
    torch.save({"model": _tiny_official(tiny_state), "config": _Opaque()}, risky)
    with pytest.raises(ValueError, match="allow_unsafe_pickle"):
        load_official(model, risky)
    assert load_official(model, risky, allow_unsafe_pickle=True) == []


class _Opaque:
    """Stands for the YAML objects some official checkpoints pickle beside the weights."""


@torch.no_grad()
def test_round_trip_convert_from_pretrained_identical_outputs(tmp_path, tiny_state, tiny_inputs):
    src = tmp_path / "official.th"
    torch.save({"model": _tiny_official(tiny_state)}, src)
    vocab = PARITY / "tiny_vocab.txt"
    out = tmp_path / "converted"
    assert cli_main(["convert", str(src), str(out), "--preset", "x2vlm-tiny", "--tokenizer", str(vocab)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    reloaded = from_pretrained(out)
    reference = build_tiny("pretrain", tiny_state)
    images, ids, mask = tiny_inputs["images"], tiny_inputs["text_ids"], tiny_inputs["text_atts"]
    for model in (reference, reloaded):
        vision, vmask = model.encode_images(images)
        text = model.encode_text(ids, mask)
        model._outputs = (model.vision_features(vision), model.itm_logits(model.fuse(text, mask, vision, vmask)))
    for a, b in zip(reference._outputs, reloaded._outputs):
        assert torch.equal(a, b)
    # and our directory saves again byte-for-byte the same tensors
    again = tmp_path / "again"
    save_pretrained(reloaded, again)
    assert (again / "config.json").read_text() == (out / "config.json").read_text()


@torch.no_grad()
def test_checkpoint_loads_at_another_resolution(tmp_path, tiny_state, tiny_inputs):
    """A 64 px checkpoint built at 128 px: tables resized as the official loader does, forward works."""
    from safetensors.torch import load_file

    src = tmp_path / "official.th"
    torch.save(_tiny_official(tiny_state), src)
    out = tmp_path / "at128"
    assert cli_main(["convert", str(src), str(out), "--preset", "x2vlm-tiny", "--image-res", "128", "--task", "retrieval", "--tokenizer", str(PARITY / "tiny_vocab.txt")]) == 0
    model = from_pretrained(out)
    assert model.cfg.image_res == 128 and model.cfg.task == "retrieval"
    expected = load_file(str(PARITY / "tiny_relpos_interp.safetensors"))
    table = model.vision_encoder.blocks[0].attn.relative_position_bias_table
    torch.testing.assert_close(table, expected["vision_encoder.blocks.0.attn.relative_position_bias_table@128px"], atol=1e-6, rtol=0)
    images = torch.nn.functional.interpolate(tiny_inputs["images"], size=128, mode="bicubic")
    vision, _ = model.encode_images(images)
    assert vision.shape == (3, 65, 64) and torch.isfinite(vision).all()


def test_frame_positions_of_another_length_copy_the_overlap(tiny_state):
    model = X2VLM(preset("x2vlm-tiny", frame_len=5))
    load_official(model, _tiny_official(tiny_state))
    loaded = model.absolute_frame_pos_embed.detach()
    assert torch.equal(loaded[:, :3], tiny_state["absolute_frame_pos_embed"])


def test_infer_config_reads_task_resolution_and_frames(tiny_state):
    cfg = infer_config(tiny_state, preset("x2vlm-tiny", frame_len=0, add_frame_pos=False))
    assert (cfg.task, cfg.image_res, cfg.frame_len, cfg.add_frame_pos) == ("pretrain", 64, 3, True)
    vqa = native_to_official(build_tiny("vqa", tiny_state))
    cfg = infer_config(vqa, preset("x2vlm-tiny"))
    assert (cfg.task, cfg.num_dec_layers) == ("vqa", 2)


def test_pretrain_checkpoint_into_task_models(tiny_state):
    """The official fine-tune loader's rules: heads the task lacks are dropped; NLVR's head is new."""
    for task in ("retrieval", "grounding", "captioning", "vqa"):
        build_tiny(task, tiny_state)
    model = X2VLM(preset("x2vlm-tiny", task="nlvr"))
    new = load_official(model, _tiny_official(tiny_state))
    assert new == [f"cls_head.{i}.{p}" for i in (0, 1, 3) for p in ("bias", "weight")]


def test_config_json_rejects_unknown_keys(tmp_path):
    cfg = preset("x2vlm-tiny")
    data = cfg.to_dict()
    data["vision"]["widht"] = 3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json: vision: unknown key\(s\) \['widht'\]"):
        X2VLMConfig.load(path)
    assert X2VLMConfig.from_dict(cfg.to_dict()) == cfg


def test_official_yaml_conversion():
    yaml_data = {
        "use_beit_v2": True, "vision_config": "configs/config_beit2_large.json", "image_res": 384, "patch_size": 16,
        "text_encoder": "data/bert-large-uncased", "text_num_hidden_layers": 18, "text_fusion_start_at": 12,
        "text_drop_path_rate": 0.1, "cross_drop_path_rate": 0.1, "batch_size": 20, "optimizer": {"lr": 1e-5},
    }
    cfg = from_official_yaml(yaml_data, task="grounding")
    assert (cfg.vision.width, cfg.vision.depth, cfg.text.hidden_size, cfg.image_res) == (1024, 24, 1024, 384)
    assert cfg.text.text_drop_path_rate == 0.1 and cfg.task == "grounding"
    assert from_official_yaml({**yaml_data, "num_dec_layers": 6}).task == "vqa"
    with pytest.raises(ValueError, match="vision_config"):
        from_official_yaml({"vision_config": "configs/swin.json"})


@torch.no_grad()
def test_separate_cross_encoder_layout_and_roberta_positions():
    """The XLM-R variant: a text encoder without cross-attention and a 2-layer cross encoder."""
    cfg = preset("x2vlm-tiny", cross_num_layers=2, text={"fusion_start": 6, "position_style": "roberta", "pad_token_id": 1, "max_position_embeddings": 66})
    model = X2VLM(cfg).eval()
    keys = list(model.state_dict())
    assert not any("crossattention" in k for k in keys if k.startswith("text_encoder."))
    assert {k.split(".")[3] for k in keys if k.startswith("cross_encoder.")} == {"0", "1"}
    assert not any(k.startswith("cross_encoder.embeddings") for k in keys)
    ids = torch.tensor([[0, 50, 60, 2, 1, 1]])
    positions = model.text_encoder.embeddings.position_ids_for(ids)
    assert positions.tolist() == [[2, 3, 4, 5, 1, 1]]  # RoBERTa: from pad_id + 1, pads keep pad_id
    images = torch.randn(1, 3, 64, 64)
    vision, vmask = model.encode_images(images)
    mask = ids.ne(1).long()
    fused = model.fuse(model.encode_text(ids, mask), mask, vision, vmask)
    assert torch.allclose(fused, model.encode_multimodal(ids, mask, vision, vmask))


def test_absolute_position_embedding_option_saves_loads_and_resizes(tmp_path):
    """The small preset's ViT adds a learned absolute position embedding (the released models have
    none); it changes the output, survives save/load, and is resized for another resolution."""
    from x2vlm.checkpoint import adapt_to_model
    from x2vlm.models.beit import resize_abs_pos_embed

    torch.manual_seed(0)
    cfg = preset("x2vlm-tiny", vision={"abs_pos_embed": True})
    model = X2VLM(cfg).eval()
    assert model.vision_encoder.pos_embed.shape == (1, 1 + 16, 64)
    assert X2VLM(preset("x2vlm-tiny")).vision_encoder.pos_embed is None
    assert preset("x2vlm-small").vision.abs_pos_embed
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before, _ = model.encode_images(images)
        noise = torch.randn_like(model.vision_encoder.pos_embed)
        model.vision_encoder.pos_embed.add_(noise)
        shifted, _ = model.encode_images(images)
        model.vision_encoder.pos_embed.sub_(noise)
    assert not torch.allclose(before, shifted, atol=1e-3)
    save_pretrained(model, tmp_path / "m")
    with torch.no_grad():
        after, _ = from_pretrained(tmp_path / "m").eval().encode_images(images)
    torch.testing.assert_close(after, before)
    # resizing: CLS kept, a constant grid stays constant, the 4x4 grid becomes 6x6
    table = torch.cat([torch.full((1, 1, 2), 7.0), torch.ones(1, 16, 2)], dim=1)
    resized = resize_abs_pos_embed(table, 6)
    assert resized.shape == (1, 37, 2) and resized[0, 0].tolist() == [7.0, 7.0]
    torch.testing.assert_close(resized[:, 1:], torch.ones(1, 36, 2))
    bigger = X2VLM(preset("x2vlm-tiny", image_res=96, vision={"abs_pos_embed": True}))
    native = {"vision_encoder.pos_embed": model.vision_encoder.pos_embed.detach().clone()}
    notes = adapt_to_model(native, bigger)
    assert native["vision_encoder.pos_embed"].shape == (1, 37, 64) and any("pos_embed" in n for n in notes)


def test_sincos_position_table_initialises_the_small_preset():
    """``pos_embed_init: sincos`` starts the table as MAE's 2-D sine-cosine positions (column in the
    first half of the channels, row in the second), CLS slot zero."""
    from x2vlm.models.beit import sincos_position_table

    table = sincos_position_table(4, 16)
    assert table.shape == (16, 16)
    patch = 1 * 4 + 2  # row 1, column 2
    freqs = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat([torch.sin(2 * freqs), torch.cos(2 * freqs), torch.sin(1 * freqs), torch.cos(1 * freqs)]).float()
    torch.testing.assert_close(table[patch], expected)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_table(4, 18)

    assert preset("x2vlm-small").vision.pos_embed_init == "sincos"
    assert preset("x2vlm-tiny").vision.pos_embed_init == "trunc_normal"
    model = X2VLM(preset("x2vlm-tiny", vision={"abs_pos_embed": True, "pos_embed_init": "sincos"}))
    pos = model.vision_encoder.pos_embed.detach()[0]
    assert pos[0].abs().max() == 0.0
    torch.testing.assert_close(pos[1:], sincos_position_table(4, 64))
    with pytest.raises(ValueError, match="pos_embed_init"):
        X2VLM(preset("x2vlm-tiny", vision={"abs_pos_embed": True, "pos_embed_init": "learned"}))
