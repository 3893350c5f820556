"""Parameter groups and the learning-rate schedule."""

import pytest
import torch

from x2vlm.config import preset
from x2vlm.models.x2vlm import X2VLM
from x2vlm.train.optim import OptimizerConfig, ScheduleConfig, build_optimizer, lr_multiplier, parameter_groups


def groups_by_name(groups):
    return {g["name"]: g for g in groups}


def test_decay_rules_are_explicit():
    model = X2VLM(preset("x2vlm-tiny"))
    groups = groups_by_name(parameter_groups(model, OptimizerConfig(lr=1e-4, weight_decay=0.01)))
    no_decay = set(groups["base_no_decay"]["param_names"])
    decay = set(groups["base"]["param_names"])
    # vectors and lookup tables are not decayed (the official substring rule decayed gamma, temp, cls_token)
    for name in ("temp", "vision_encoder.blocks.0.gamma_1", "vision_encoder.blocks.0.attn.q_bias",
                 "vision_encoder.blocks.0.attn.relative_position_bias_table", "vision_encoder.cls_token",
                 "itm_head.1.weight", "text_encoder.embeddings.position_embeddings.weight", "absolute_frame_pos_embed"):
        assert name in no_decay, name
    for name in ("vision_encoder.blocks.0.attn.qkv.weight", "text_encoder.embeddings.word_embeddings.weight", "itm_head.0.weight"):
        assert name in decay, name
    assert groups["base"]["weight_decay"] == 0.01 and groups["base_no_decay"]["weight_decay"] == 0.0


def test_learning_rates_per_module_and_for_new_parameters():
    model = X2VLM(preset("x2vlm-tiny"))
    cfg = OptimizerConfig(lr=1e-4, lr_mult=2.0, vision_lr=2e-5, text_lr=4e-5)
    new = ["itm_head.0.weight", "text_encoder.encoder.layer.5.crossattention.self.query.weight"]
    groups = groups_by_name(parameter_groups(model, cfg, new))
    assert groups["vision"]["lr"] == 2e-5 and groups["text"]["lr"] == 4e-5
    assert groups["new"]["lr"] == 2e-4 and groups["new"]["param_names"] == ["itm_head.0.weight"]
    # an encoder parameter follows its module's rate even when new (the official precedence)
    assert "text_encoder.encoder.layer.5.crossattention.self.query.weight" in groups["text"]["param_names"]
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for _ in model.parameters())
    assert isinstance(build_optimizer(model, cfg, new), torch.optim.AdamW)


@pytest.mark.parametrize("warmup", [10, 0.1])
def test_linear_warmup_then_linear_decay_to_min_rate(warmup):
    cfg = ScheduleConfig(warmup=warmup, min_rate=0.1)
    values = [lr_multiplier(step, 100, cfg) for step in range(101)]
    assert values[0] == 0.0 and values[5] == pytest.approx(0.5) and values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(1.0 - 0.9 * 0.5)  # halfway through the decay
    assert values[100] == pytest.approx(0.1) and min(values[10:]) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # never above 1 after warm-up


def test_fusion_layers_take_their_own_rate_when_asked():
    model = X2VLM(preset("x2vlm-tiny"))
    start, total = model.num_text_layers, model.text_encoder.num_layers
    assert 0 < start < total
    fusion_query = f"text_encoder.encoder.layer.{start}.crossattention.self.query.weight"
    fusion_ffn = f"text_encoder.encoder.layer.{total - 1}.output.dense.weight"
    text_layer = f"text_encoder.encoder.layer.{start - 1}.attention.self.query.weight"
    # the official rule: the fusion layers inside the text encoder follow text_lr
    official = groups_by_name(parameter_groups(model, OptimizerConfig(lr=1e-4, vision_lr=2e-5, text_lr=4e-5)))
    assert fusion_query in official["text"]["param_names"] and "fusion" not in official
    groups = groups_by_name(parameter_groups(model, OptimizerConfig(lr=1e-4, vision_lr=2e-5, text_lr=4e-5, fusion_lr=3e-4)))
    assert groups["fusion"]["lr"] == 3e-4 and groups["fusion_no_decay"]["weight_decay"] == 0.0
    assert {fusion_query, fusion_ffn} <= set(groups["fusion"]["param_names"])
    assert text_layer in groups["text"]["param_names"]
    fusion_names = groups["fusion"]["param_names"] + groups["fusion_no_decay"]["param_names"]
    assert all(int(n.split(".")[3]) >= start for n in fusion_names)
    assert len(fusion_names) == sum(1 for n, _ in model.named_parameters()
                                    if n.startswith("text_encoder.encoder.layer.") and int(n.split(".")[3]) >= start)
    cross = X2VLM(preset("x2vlm-tiny", text={"num_layers": 4, "fusion_start": 4}, cross_num_layers=2))
    with pytest.raises(ValueError, match="cross_lr"):
        parameter_groups(cross, OptimizerConfig(fusion_lr=3e-4))


def test_cross_attention_takes_its_own_rate_when_asked():
    model = X2VLM(preset("x2vlm-tiny"))
    start = model.num_text_layers
    cross_names = [n for n, _ in model.named_parameters() if ".crossattention." in n]
    assert cross_names and all(int(n.split(".")[3]) >= start for n in cross_names)
    fusion_ffn = f"text_encoder.encoder.layer.{start}.output.dense.weight"
    groups = groups_by_name(parameter_groups(model, OptimizerConfig(lr=1e-4, text_lr=4e-5, cross_attention_lr=1e-3)))
    assert groups["cross_attention"]["lr"] == 1e-3 and groups["cross_attention_no_decay"]["weight_decay"] == 0.0
    assert sorted(groups["cross_attention"]["param_names"] + groups["cross_attention_no_decay"]["param_names"]) == sorted(cross_names)
    assert fusion_ffn in groups["text"]["param_names"]  # the rest of the fusion layer keeps the text rate
    # it takes precedence over fusion_lr, which then covers the fusion layers' other weights
    both = groups_by_name(parameter_groups(model, OptimizerConfig(text_lr=4e-5, fusion_lr=3e-4, cross_attention_lr=1e-3)))
    assert fusion_ffn in both["fusion"]["param_names"]
    assert not set(cross_names) & set(both["fusion"]["param_names"] + both["fusion_no_decay"]["param_names"])
    # a separate cross encoder's cross-attention follows the same rule
    separate = X2VLM(preset("x2vlm-tiny", text={"num_layers": 4, "fusion_start": 4}, cross_num_layers=2))
    names = groups_by_name(parameter_groups(separate, OptimizerConfig(text_lr=4e-5, cross_attention_lr=1e-3)))["cross_attention"]["param_names"]
    assert names and all(n.startswith("cross_encoder.") for n in names)


def test_optimizer_uses_the_fused_kernel_with_the_loop_kernels_result():
    """CPU parameters take torch's fused AdamW (one kernel, not a Python loop over parameters); its
    steps equal the reference loop implementation's with the same groups."""
    torch.manual_seed(0)
    model = X2VLM(preset("x2vlm-tiny", task="pretrain"))
    reference = X2VLM(preset("x2vlm-tiny", task="pretrain"))
    reference.load_state_dict(model.state_dict())
    cfg = OptimizerConfig(lr=1e-3, weight_decay=0.05)
    fused = build_optimizer(model, cfg, new_params=["itm_head.0.weight"])
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(parameter_groups(reference, cfg, new_params=["itm_head.0.weight"]), lr=cfg.lr, betas=cfg.betas,
                             eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
    for step in range(3):
        for m in (model, reference):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step + p.numel())) * 1e-2
        fused.step()
        loop.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _tiny_step(model, images, ids):
    """A loss that uses every tower, the fusion and the heads (tied word embeddings included)."""
    vision, vmask = model.encode_images(images)
    text = model.encode_text(ids, torch.ones_like(ids))
    fused = model.fuse(text, torch.ones_like(ids), vision, vmask)
    loss = model.itm_logits(fused).logsumexp(-1).mean() + model.vision_features(vision).pow(2).mean()
    return loss + model.mlm_logits(ids, torch.ones_like(ids), vision, vmask, torch.tensor([[1, 2]] * len(ids))).mean()


def test_step_in_backward_equals_a_step_after_backward_and_frees_the_gradients():
    from x2vlm.train.optim import StepInBackward, build_scheduler

    torch.manual_seed(0)
    plain = X2VLM(preset("x2vlm-tiny"))
    hooked = X2VLM(preset("x2vlm-tiny"))
    hooked.load_state_dict(plain.state_dict())
    plain.eval(), hooked.eval()  # no dropout: the two models must see the same computation
    cfg = OptimizerConfig(lr=1e-3, weight_decay=0.05, vision_lr=3e-4, text_lr=2e-4, lr_mult=2.0)
    optimizers = [build_optimizer(m, cfg, new_params=["itm_head"]) for m in (plain, hooked)]
    schedulers = [build_scheduler(o, 5, ScheduleConfig(warmup=2)) for o in optimizers]
    stepper = StepInBackward(optimizers[1])
    frozen = [p for n, p in hooked.named_parameters() if n.startswith("vision_proj.")]
    frozen_plain = [p for n, p in plain.named_parameters() if n.startswith("vision_proj.")]
    g = torch.Generator().manual_seed(1)
    res = plain.cfg.image_res
    for step in range(4):
        images = torch.randn(3, 3, res, res, generator=g)
        ids = torch.randint(5, plain.cfg.text.vocab_size, (3, 7), generator=g)
        _tiny_step(plain, images, ids).backward()
        if step < 2:  # a part held fixed for two steps, as text_tower_frozen_steps does
            for p in frozen_plain:
                p.grad = None
        optimizers[0].step()
        optimizers[0].zero_grad(set_to_none=True)
        stepper.skip = set(frozen) if step < 2 else set()
        _tiny_step(hooked, images, ids).backward()
        assert all(p.grad is None for p in hooked.parameters())
        for scheduler in schedulers:
            scheduler.step()
        if step == 1:
            assert not any(p in optimizers[1].state for p in frozen)
    for (name, a), b in zip(plain.state_dict().items(), hooked.state_dict().values()):
        assert torch.equal(a, b), name
    expected, got = optimizers[0].state_dict(), optimizers[1].state_dict()
    assert expected["state"].keys() == got["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(value, got["state"][index][key]), (index, key)
    assert [g["lr"] for g in expected["param_groups"]] == [g["lr"] for g in got["param_groups"]]
    stepper.remove()
    _tiny_step(hooked, images, ids).backward()
    assert any(p.grad is not None for p in hooked.parameters())  # hooks gone: gradients stay


def test_step_in_backward_refuses_what_it_cannot_do():
    from x2vlm.train.optim import check_step_in_backward

    check_step_in_backward(0.0, 1, False)
    check_step_in_backward(None, 1, False)
    for args, words in (((1.0, 1, False), "grad_clip=1.0"), ((0.0, 2, False), "accumulate=2"),
                        ((0.0, 1, True), "more than one process")):
        with pytest.raises(ValueError, match="step_in_backward") as info:
            check_step_in_backward(*args)
        assert words in str(info.value)
