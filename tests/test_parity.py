"""Our model reproduces every output of the official implementation on the tiny random model."""

import pytest
import torch
from conftest import build_tiny
from safetensors.torch import load_file

from x2vlm import objectives as O
from x2vlm.generation import CaptionSettings, rank_answers, beam_search
from x2vlm.models.beit import relative_position_index, resize_relative_position_bias_table

# Tolerances suggested by the fixture README (float64 sensitivity of the official outputs).
STATES, LOGITS = 2e-5, 1e-4


def close(ours, name, outputs, atol=STATES, rtol=0.0):
    expected = outputs[name]
    assert ours.shape == expected.shape, name
    if not expected.is_floating_point():
        assert torch.equal(ours.to(expected.dtype), expected), name
        return
    torch.testing.assert_close(ours.float(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def close_loss(ours, name, outputs):
    torch.testing.assert_close(ours.float(), outputs[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def pretrain_model(tiny_state):
    return build_tiny("pretrain", tiny_state)


BLOCKS = {
    "img": dict(ids="text_ids", atts="text_atts", masked="text_ids_masked", pos="masked_pos", tgt="masked_ids"),
    "region": dict(ids="region_text_ids", atts="region_text_atts", masked="region_text_ids_masked", pos="region_masked_pos", tgt="region_masked_ids"),
    "video": dict(ids="video_text_ids", atts="video_text_atts", masked="video_text_ids_masked", pos="video_masked_pos", tgt="video_masked_ids"),
}


@torch.no_grad()
def test_vision_trunk_hidden_states_and_attention(pretrain_model, tiny_inputs, tiny_outputs):
    embeds, hidden, attn = pretrain_model.vision_encoder(tiny_inputs["images"], output_hidden_states=True, output_attentions=True)
    close(embeds, "img_vision_embeds", tiny_outputs)
    for i in range(3):
        close(hidden[i], f"img_vision_hidden_states_{i}", tiny_outputs)
    for i in range(2):
        close(attn[i], f"img_vision_attn_probs_{i}", tiny_outputs, atol=1e-6)
    # token 0 is the mean of the returned patch tokens
    torch.testing.assert_close(embeds[:, 0], embeds[:, 1:].mean(1))


@pytest.mark.parametrize("block", list(BLOCKS))
@torch.no_grad()
def test_pretraining_block(block, pretrain_model, tiny_inputs, tiny_outputs):
    m, I, names = pretrain_model, tiny_inputs, BLOCKS[block]
    if block == "img":
        vision, vmask = m.encode_images(I["images"])
    elif block == "region":
        vision, vmask, full = m.encode_regions(I["region_images"], I["region_idx_to_group_img"], I["region_image_atts"])
        close(full, "region_vision_embeds_fullatts", tiny_outputs)
        patch_mask = I["region_image_atts"][:, 1:].float()
        box_mean = (vision[:, 1:] * patch_mask[..., None]).sum(1) / patch_mask.sum(1, keepdim=True)
        torch.testing.assert_close(vision[:, 0], box_mean)
    else:
        close(m.encode_frames(I["video"]), "video_frame_embeds_with_pos", tiny_outputs)
        vision, vmask = m.encode_vision(I["video"])
    p = block + "_"
    close(vision, p + "vision_embeds", tiny_outputs)
    close(vmask, p + "vision_atts", tiny_outputs)
    text, hidden = m.encode_text(I[names["ids"]], I[names["atts"]], output_hidden_states=True)
    close(text, p + "text_embeds", tiny_outputs)
    for i in range(5):
        close(hidden[i], f"{p}text_hidden_states_{i}", tiny_outputs)
    vfeat, tfeat = m.vision_features(vision), m.text_features(text)
    close(vfeat, p + "image_feat", tiny_outputs, atol=1e-6)
    close(tfeat, p + "text_feat", tiny_outputs, atol=1e-6)
    close(O.contrastive_logits(vfeat, tfeat, m.temp), p + "itc_logits_i2t", tiny_outputs, atol=LOGITS)
    close_loss(O.contrastive_loss(vfeat, tfeat, m.temp), p + "loss_itc", tiny_outputs)
    fused, fused_hidden = m.fuse(text, I[names["atts"]], vision, vmask, output_hidden_states=True)
    close(fused, p + "cross_embeds", tiny_outputs)
    for i in range(3):
        close(fused_hidden[i], f"{p}cross_hidden_states_{i}", tiny_outputs)
    # text layers then fusion layers == one pass from ids
    torch.testing.assert_close(m.encode_multimodal(I[names["ids"]], I[names["atts"]], vision, vmask), fused, atol=1e-6, rtol=0)
    close(m.itm_logits(fused), p + "itm_logits_pos", tiny_outputs, atol=1e-5)
    logits = O.matching_logits(
        m, vision, vmask, text, I[names["atts"]], tiny_outputs[p + "itm_image_neg_idx"], tiny_outputs[p + "itm_text_neg_idx"]
    )
    close(logits, p + "itm_logits_all", tiny_outputs, atol=1e-5)
    close_loss(O.matching_loss(logits), p + "loss_itm", tiny_outputs)
    mlm = m.mlm_logits(I[names["masked"]], I[names["atts"]], vision, vmask, I[names["pos"]])
    close(mlm, p + "mlm_logits", tiny_outputs, atol=LOGITS)
    close_loss(O.mlm_loss(mlm, I[names["tgt"]]), p + "loss_mlm", tiny_outputs)


@torch.no_grad()
def test_boxes_and_box_losses(pretrain_model, tiny_inputs, tiny_outputs):
    m, I = pretrain_model, tiny_inputs
    vision, _ = m.encode_images(I["images"])
    close(m.predict_boxes(vision, m.encode_text(I["text_ids"], I["text_atts"]), I["text_atts"]), "img_bbox_pred_fullimage", tiny_outputs, atol=1e-6)
    _, _, full = m.encode_regions(I["region_images"], I["region_idx_to_group_img"], I["region_image_atts"])
    pred = m.predict_boxes(full, m.encode_text(I["region_text_ids"], I["region_text_atts"]), I["region_text_atts"])
    close(pred, "region_bbox_pred", tiny_outputs, atol=1e-6)
    l1, giou = O.box_losses(pred, I["region_target_bbox"], I["region_is_image"])
    close_loss(l1, "region_loss_bbox", tiny_outputs)
    close_loss(giou, "region_loss_giou", tiny_outputs)
    l1, giou = O.box_losses(pred, I["region_target_bbox"])
    close_loss(l1, "region_loss_bbox_is_image_none", tiny_outputs)
    close_loss(giou, "region_loss_giou_is_image_none", tiny_outputs)


@torch.no_grad()
def test_vqa_decoder_and_answer_ranking(tiny_state, tiny_inputs, tiny_outputs):
    m, I = build_tiny("vqa", tiny_state), tiny_inputs
    vision, vmask = m.encode_images(I["images"][:2])
    close(vision, "vqa_image_embeds", tiny_outputs)
    q, qmask = I["vqa_question_ids"], I["vqa_question_atts"]
    states = m.encode_multimodal(q, qmask, vision, vmask)
    close(states, "vqa_question_states", tiny_outputs)
    answers, amask = I["vqa_train_answer_ids"], I["vqa_train_answer_atts"]
    close(m.answer_logits(answers, amask, states, qmask), "vqa_decoder_logits", tiny_outputs, atol=LOGITS)
    nll = m.answer_nll(answers, amask, states, qmask)
    torch.testing.assert_close(nll, tiny_outputs["vqa_decoder_loss_per_sample"], atol=2e-5, rtol=1e-5)
    close_loss((I["vqa_train_weights"] * nll).sum() / 2, "vqa_train_loss", tiny_outputs)
    ids, probs = rank_answers(m, states, qmask, I["vqa_answer_cand_ids"], I["vqa_answer_cand_atts"], k=3)
    close(ids, "vqa_rank_topk_ids", tiny_outputs)
    close(probs, "vqa_rank_topk_probs", tiny_outputs, atol=1e-5)


@torch.no_grad()
def test_captioning_logits_loss_and_beam_search(tiny_state, tiny_inputs, tiny_outputs):
    m, I = build_tiny("captioning", tiny_state), tiny_inputs
    vision, vmask = m.encode_images(I["images"][:2])
    mask3d, positions = I["caption_attention_mask_3d"], I["caption_position_ids"]
    logits = m.mlm_logits(I["caption_prefix_ids"], mask3d, vision, vmask, I["caption_prefix_masked_pos"], positions)
    close(logits, "caption_prefix_mask_logits", tiny_outputs, atol=LOGITS)
    logits = m.mlm_logits(I["caption_train_ids_masked"], mask3d, vision, vmask, I["caption_train_masked_pos"], positions)
    loss = O.caption_loss(logits, I["caption_train_masked_ids"], I["caption_train_masked_weight"], smoothing=0.1, ignore_id=101)
    close_loss(loss, "caption_mlm_train_loss", tiny_outputs)
    # The fixture ran the official generate() with num_beams 2, max_length 6 and batch 2, whose
    # total length is batch + max_length = 8, i.e. 4 tokens after the 4-token prompt.
    settings = CaptionSettings(num_beams=2, max_new_tokens=4, min_length=1, length_penalty=0.0, block_repeated_trigrams=False)
    sequences = beam_search(m, vision, vmask, torch.tensor([101, 142, 211, 209]), settings)
    expected = tiny_outputs["caption_beam_search_ids"]
    padded = torch.zeros_like(expected)
    for i, seq in enumerate(sequences):
        padded[i, : len(seq)] = torch.tensor(seq)
    assert torch.equal(padded, expected)


def test_relative_position_tables_resized_like_official(tiny_state, parity_dir):
    expected = load_file(str(parity_dir / "tiny_relpos_interp.safetensors"))
    for res in (96, 128):
        grid = res // 16
        for block in (0, 1):
            table = tiny_state[f"vision_encoder.blocks.{block}.attn.relative_position_bias_table"]
            ours = resize_relative_position_bias_table(table, grid)
            ref = expected[f"vision_encoder.blocks.{block}.attn.relative_position_bias_table@{res}px"]
            torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
            assert torch.equal(relative_position_index(grid), expected[f"vision_encoder.blocks.{block}.attn.relative_position_index@{res}px"])
    assert torch.equal(relative_position_index(4), tiny_state["vision_encoder.blocks.0.attn.relative_position_index"])


def test_vqa_model_follows_official_pretrain_to_vqa_map(tiny_state, parity_dir):
    """Every key of the official VQA model holds the pre-training tensor the official loader put there."""
    import json

    from x2vlm.checkpoint import native_to_official

    key_map = json.loads((parity_dir / "tiny_vqa_key_map.json").read_text())
    exported = native_to_official(build_tiny("vqa", tiny_state))
    assert set(exported) == set(key_map)
    for key, entry in key_map.items():
        assert list(exported[key].shape) == entry["shape"], key
        sources = entry["equal_to_tiny_state_dict_keys"]
        if sources:
            assert torch.equal(exported[key], tiny_state[sources[0]]), key
