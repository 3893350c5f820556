"""The fused attention path (``scaled_dot_product_attention``) equals the explicit one (scores,
softmax, probabilities @ values): outputs and gradients, fp32, with padding masks and relative
position bias; dropout still applies in training; the CPU dropout's masks (drawn from 15-bit
integers) drop the right fraction everywhere and stay unbiased; the FLOP counter sees the fused CPU
kernel; the command line keeps freed memory for reuse. No timing here (bench/bench_speed.py measures)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny

from x2vlm.models import bert
from x2vlm.models.layers import (
    CROSS_ATTENTION_MASK_VALUE,
    DROPOUT_LEVELS,
    SELF_ATTENTION_MASK_VALUE,
    Dropout,
    attention,
    dropout,
    padding_bias,
)
from x2vlm.train import host_memory
from x2vlm.train.metrics import Spread, count_step_flops, source_commit

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL, RTOL = 2e-5, 1e-4


def explicit_attention(q, k, v, bias=None, dropout_p=0.0, return_probs=False, kv_rows=None):
    """``attention`` forced onto its explicit path (what ``return_probs`` selects; rows' keys/values gathered)."""
    out, probs = attention(q, k, v, bias, dropout_p=dropout_p, return_probs=True, kv_rows=kv_rows)
    return out, probs if return_probs else None


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(fused: dict, explicit: dict) -> None:
    assert fused.keys() == explicit.keys() and fused
    for name in fused:
        torch.testing.assert_close(fused[name], explicit[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("bias_kind", ["none", "padding", "relative_position"])
def test_attention_function_paths_agree_with_gradients(bias_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 7, 8, generator=g, dtype=torch.float64).float().requires_grad_() for _ in range(3))
    bias = None
    if bias_kind == "padding":  # (B, 1, 1, L): the text masks; the fused CPU kernel takes it
        mask = torch.ones(3, 7)
        mask[1, 5:] = 0
        mask[2, 2:] = 0
        bias = padding_bias(mask, SELF_ATTENTION_MASK_VALUE)
    elif bias_kind == "relative_position":  # (1, heads, L, L), learnt: needs its own gradient
        bias = (0.5 * torch.randn(1, 4, 7, 7, generator=g)).requires_grad_()
    leaves = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    results = []
    for return_probs in (False, True):
        out, probs = attention(q, k, v, bias, return_probs=return_probs)
        assert (probs is None) != return_probs
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        results.append((out.detach(), torch.autograd.grad((out * weights).sum(), leaves)))
    (fused_out, fused_grads), (explicit_out, explicit_grads) = results
    torch.testing.assert_close(fused_out, explicit_out, atol=ATOL, rtol=RTOL)
    for fused, explicit in zip(fused_grads, explicit_grads):
        torch.testing.assert_close(fused, explicit, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("rows", [[0, 0, 0, 1, 2, 2], [2, 0, 1, 1, 0, 2]], ids=["sorted", "unsorted"])
def test_attention_rows_share_keys_and_values_of_their_input(rows):
    """``kv_rows``: row b attends to input rows[b]. Sorted rows run one long query per input (no copy
    of keys/values per row), unsorted ones gather; both equal attending to the gathered tensors, with
    the inputs' own padding masks, in values and gradients."""
    g = torch.Generator().manual_seed(3)
    rows = torch.tensor(rows)
    q = torch.randn(6, 4, 5, 8, generator=g).requires_grad_()
    k, v = (torch.randn(3, 4, 9, 8, generator=g).requires_grad_() for _ in range(2))
    mask = torch.ones(3, 9)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    bias = padding_bias(mask[rows], CROSS_ATTENTION_MASK_VALUE)
    out, probs = attention(q, k, v, bias, kv_rows=rows)
    assert probs is None
    reference, _ = attention(q, k[rows], v[rows], bias, return_probs=True)
    torch.testing.assert_close(out, reference, atol=ATOL, rtol=RTOL)
    weights = torch.randn(out.shape, generator=g)
    for got, want in zip(torch.autograd.grad((out * weights).sum(), (q, k, v)),
                         torch.autograd.grad((reference * weights).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_cpu_training_attention_keeps_bf16_where_the_fused_kernel_cannot_run(monkeypatch):
    """Training on the CPU with dropout or a learnt bias: torch's fused kernels do neither and its
    fallback would compute (and keep for backward) everything in fp32; ours stays in bf16 under
    autocast. Inference and bias-free, dropout-free training still take the fused kernel."""
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g).requires_grad_() for _ in range(3))
    table = (0.5 * torch.randn(1, 4, 9, 9, generator=g)).requires_grad_()
    for bias, dropout_p in ((table, 0.0), (None, 0.1)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, probs = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, dropout_p=dropout_p)
        assert probs is None and out.dtype == torch.bfloat16 and torch.float32 not in saved and not calls
        out.float().sum().backward()
    attention(q, k, v, table.detach())  # a fixed bias (masks): fused
    with torch.no_grad():
        attention(q, k, v, table, dropout_p=0.1)  # inference: fused (dropout_p is the caller's: 0 in eval)
    assert len(calls) == 2


def test_vision_trunk_fused_equals_explicit_with_relative_position_bias(tiny_state):
    """``output_attentions=True`` takes the explicit path in every block; the relative position bias
    tables are learnt, so their gradients are compared too."""
    vision = build_tiny("pretrain", tiny_state).vision_encoder  # eval: no stochastic depth
    for block in vision.blocks:  # the fixture's tables are zeros: make the bias matter
        torch.nn.init.normal_(block.attn.relative_position_bias_table, std=0.5, generator=torch.Generator().manual_seed(2))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(4))
    outputs, gradients = [], []
    for explicit in (False, True):
        vision.zero_grad(set_to_none=True)
        out = vision(images, output_attentions=explicit)
        out = out[0] if explicit else out
        (out * weights).sum().backward()
        outputs.append(out.detach())
        gradients.append(grads(vision))
    torch.testing.assert_close(outputs[0], outputs[1], atol=ATOL, rtol=RTOL)
    assert_same_grads(*gradients)
    assert "blocks.0.attn.relative_position_bias_table" in gradients[0]
    with torch.no_grad():  # without gradients the bias is a plain float mask of the fused kernel
        torch.testing.assert_close(vision(images), vision(images, output_attentions=True)[0], atol=ATOL, rtol=RTOL)


def test_text_and_fusion_fused_equal_explicit_with_padding_masks(tiny_state, monkeypatch):
    """Text encoder and fusion layers with padded texts and a partly masked vision side (region
    masks), fused against explicit attention: outputs and the gradients of every parameter."""
    model = build_tiny("pretrain", tiny_state).eval()  # eval: no dropout, so both paths are deterministic
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(104, 512, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = ids * mask
    images = torch.randn(3, 3, 64, 64, generator=g)
    vision_mask = torch.ones(3, 17, dtype=torch.long)
    vision_mask[0, 9:] = 0
    vision_mask[2, 1:5] = 0

    def run():
        model.zero_grad(set_to_none=True)
        vision, _ = model.encode_images(images)
        text = model.encode_text(ids, mask)
        fused = model.fuse(text, mask, vision, vision_mask)
        loss = (fused * torch.linspace(-1, 1, fused.shape[-1])).sum() + model.itm_logits(fused).sum()
        loss.backward()
        return fused.detach(), grads(model)

    fused_out, fused_grads = run()
    monkeypatch.setattr(bert, "attention", explicit_attention)
    explicit_out, explicit_grads = run()
    torch.testing.assert_close(fused_out, explicit_out, atol=ATOL, rtol=RTOL)
    assert_same_grads(fused_grads, explicit_grads)
    assert any("crossattention.self.key" in name for name in fused_grads)


def test_cached_cross_kv_fused_equals_explicit(tiny_state, monkeypatch):
    """The retrieval re-ranking path (cached image-side keys/values, rows gathered per text)."""
    model = build_tiny("retrieval", tiny_state)
    g = torch.Generator().manual_seed(6)
    vision, vision_mask = model.encode_images(torch.randn(2, 3, 64, 64, generator=g))
    ids = torch.randint(104, 512, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 4:] = 0
    rows = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        fused = model.fuse(text, mask, None, vision_mask[rows], cross_kv=model.cross_attention_kv(vision).select(rows))
        monkeypatch.setattr(bert, "attention", explicit_attention)
        explicit = model.fuse(text, mask, vision[rows], vision_mask[rows])
    torch.testing.assert_close(fused, explicit, atol=ATOL, rtol=RTOL)


def test_training_itm_logits_equal_fusing_the_concatenated_pairs(tiny_state):
    """``objectives.matching_logits`` (keys/values projected once per image and gathered per row, the
    last layer at CLS only) gives the logits and gradients of fusing the concatenated (image, text)
    pairs, as the official code does; a region-like mask per row included."""
    from x2vlm import objectives as O

    def reference(model, vision, vmask, text, tmask, image_neg, text_neg):
        pairs_vision = torch.cat([vision, vision[image_neg], vision])
        pairs_vmask = torch.cat([vmask, vmask[image_neg], vmask])
        pairs_text = torch.cat([text, text, text[text_neg]])
        pairs_tmask = torch.cat([tmask, tmask, tmask[text_neg]])
        return model.itm_logits(model.fuse(pairs_text, pairs_tmask, pairs_vision, pairs_vmask))

    results = []
    for compute in (O.matching_logits, reference):
        model = build_tiny("retrieval", tiny_state)  # eval mode: no dropout, so both see the same numbers
        g = torch.Generator().manual_seed(11)
        vision, vmask = model.encode_images(torch.randn(3, 3, 64, 64, generator=g))
        vmask = vmask.clone()
        vmask[1, 5:] = 0  # a box: only some tokens visible
        ids = torch.randint(104, 512, (3, 7), generator=g)
        tmask = torch.ones_like(ids)
        tmask[2, 4:] = 0
        text = model.encode_text(ids, tmask)
        logits = compute(model, vision, vmask, text, tmask, torch.tensor([2, 0, 0]), torch.tensor([1, 2, 1]))
        O.matching_loss(logits).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=RTOL)
    assert fast_grads.keys() == ref_grads.keys() and fast_grads
    for name in ref_grads:
        torch.testing.assert_close(fast_grads[name], ref_grads[name], atol=ATOL, rtol=RTOL, msg=name)


def test_reranking_shortcuts_give_the_full_fusion_cls(tiny_state):
    """``fuse(cls_only=True)`` (last layer at CLS only) and ``self_attended=True`` (the first fusion
    layer's self-attention computed once per text, ``fusion_self_attention``) give the CLS state of
    the plain fusion, with padded texts, a partial vision mask and cached keys/values."""
    model = build_tiny("retrieval", tiny_state)
    g = torch.Generator().manual_seed(8)
    vision, vision_mask = model.encode_images(torch.randn(3, 3, 64, 64, generator=g))
    vision_mask[1, 6:11] = 0
    ids = torch.randint(104, 512, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    mask[4, 3:] = 0
    rows = torch.tensor([0, 1, 2, 1, 1])
    with torch.no_grad():
        text = model.encode_text(ids, mask)
        plain = model.fuse(text, mask, vision[rows], vision_mask[rows])
        cls = model.fuse(text, mask, vision[rows], vision_mask[rows], cls_only=True)
        assert cls.shape == (5, 1, plain.shape[-1])
        torch.testing.assert_close(cls, plain[:, :1], atol=1e-5, rtol=0)
        attended = model.fusion_self_attention(text, mask)
        kv = model.cross_attention_kv(vision).select(rows)
        for cls_only in (False, True):
            short = model.fuse(attended, mask, None, vision_mask[rows], cross_kv=kv, cls_only=cls_only, self_attended=True)
            torch.testing.assert_close(short, plain[:, :1] if cls_only else plain, atol=1e-5, rtol=0)
        # texts self-attended once, then paired with every image: what the re-ranker does
        torch.testing.assert_close(model.fuse(attended[[4, 4, 4]], mask[[4, 4, 4]], vision, vision_mask, cls_only=True, self_attended=True),
                                   model.fuse(text[[4, 4, 4]], mask[[4, 4, 4]], vision, vision_mask)[:, :1], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="per-layer"):
            model.fuse(text, mask, vision[rows], vision_mask[rows], output_hidden_states=True, cls_only=True)


def test_last_layer_at_position_zero_with_a_mask_matrix(tiny_state):
    """``run_layers(first_only=True)`` with a (B, L, L) mask (a causal or per-query mask) keeps row 0's mask."""
    model = build_tiny("retrieval", tiny_state)
    enc = model.text_encoder
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 6, model.cfg.text.hidden_size, generator=g)
    matrix = torch.tril(torch.ones(6, 6))[None].repeat(2, 1, 1)
    matrix[1, 0, 3] = 1  # row 0 of the second text also sees position 3
    with torch.no_grad():
        full, _ = enc.run_layers(hidden, matrix, 0, 2)
        first, _ = enc.run_layers(hidden, matrix, 0, 2, first_only=True)
    torch.testing.assert_close(first, full[:, :1], atol=1e-5, rtol=0)


def test_attention_dropout_applies_in_training_only(tiny_state):
    cfg = build_tiny("pretrain", tiny_state).cfg.text
    cfg.attention_dropout = 0.5
    layer = bert.MultiHeadAttention(cfg, cfg.hidden_size, drop_path=0.0)
    layer.output.dropout.p = 0.0  # only the attention probabilities drop
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(7))
    bias = padding_bias(torch.ones(2, 6), SELF_ATTENTION_MASK_VALUE)
    layer.eval()
    reference = layer(x, x, bias)
    torch.testing.assert_close(layer(x, x, bias), reference)  # eval: deterministic
    layer.train()
    torch.manual_seed(0)
    first = layer(x, x, bias)
    torch.manual_seed(1)
    second = layer(x, x, bias)
    assert not torch.allclose(first, reference) and not torch.allclose(first, second)
    first.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.self.parameters())


def test_cross_attention_mask_value_hides_tokens_in_the_fused_path():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 0]])
    out, _ = attention(q, k, v, padding_bias(mask, CROSS_ATTENTION_MASK_VALUE))
    expected, _ = attention(q, k[:, :, :2], v[:, :, :2])
    torch.testing.assert_close(out, expected)


def test_flop_counter_counts_fused_attention_like_explicit():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=g).requires_grad_() for _ in range(3))
    bias = padding_bias(torch.ones(2, 16), SELF_ATTENTION_MASK_VALUE)
    counts = []
    for return_probs in (False, True):
        def step(return_probs=return_probs):
            out, _ = attention(q, k, v, bias, return_probs=return_probs)
            out.sum().backward()

        counts.append(count_step_flops(step)[1])
    forward = 2 * (2 * 2 * 4 * 16 * 16 * 8)  # two batched matmuls
    assert counts[1] >= 3 * forward  # explicit: forward + the backward's four matmuls
    assert counts[0] == counts[1]


def test_flop_count_of_a_checkpointed_step_matches_torch_and_leaves_no_module_hooks(tiny_state):
    """``count_step_flops`` gives torch's FlopCounterMode total (its formulas, ours for the CPU
    attention kernel) without its module tracker, whose global hooks kept checkpointed blocks'
    activations alive during the counted step."""
    from torch.nn.modules import module as torch_module
    from torch.utils.flop_counter import FlopCounterMode

    from x2vlm.train.metrics import _EXTRA_FLOP_FORMULAS

    model = build_tiny("retrieval", tiny_state).train()
    model.set_grad_checkpointing(True)
    g = torch.Generator().manual_seed(4)
    images, ids = torch.randn(2, 3, 64, 64, generator=g), torch.randint(104, 512, (2, 7), generator=g)
    hooks = []

    def step():
        hooks.append(len(torch_module._global_forward_hooks) + len(torch_module._global_forward_pre_hooks))
        vision, vision_mask = model.encode_images(images)
        text = model.encode_text(ids, torch.ones_like(ids))
        model.fuse(text, torch.ones_like(ids), vision, vision_mask).sum().backward()

    _, ours = count_step_flops(step)
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        step()
    assert ours == counter.get_total_flops() > 0
    assert hooks[0] == 0 and hooks[1] > 0  # torch's counter tracks modules with global hooks; ours does not


def test_utilisation_measures_the_peak_again_when_a_run_beats_it(monkeypatch):
    """A FLOP rate above the measured matmul peak means the peak was taken in a slow moment: it is
    measured again and the best kept (a run once logged 124 % MFU); below it nothing is measured."""
    from x2vlm.train import metrics

    rates = iter([[100.0, 80.0], [300.0, 250.0], [200.0]])
    calls = []
    monkeypatch.setattr(metrics, "matmul_rates", lambda *a, **k: calls.append(a) or next(rates))
    monkeypatch.setattr(metrics, "_PEAKS", {})
    assert metrics.flops_utilisation(50.0, 1.0, torch.device("cpu"), "bf16") == pytest.approx(0.5)
    assert len(calls) == 1
    assert metrics.flops_utilisation(200.0, 1.0, torch.device("cpu"), "bf16") == pytest.approx(200 / 300)
    assert len(calls) == 2
    assert metrics.measure_matmul_peak("cpu", "bf16", again=True) == 300.0  # the best of all measurements
    assert metrics.flops_utilisation(0, 1.0, torch.device("cpu"), "bf16") == 0.0


def test_spread_and_source_commit(tmp_path):
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0, 3)
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text("0123456789abcdef0123456789abcdef01234567\n")
    (tmp_path / "repo" / "src").mkdir()
    assert source_commit(tmp_path / "repo" / "src") == "0123456"
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text("# pack-refs\nfedcba9876543210fedcba9876543210fedcba98 refs/heads/main\n")
    assert source_commit(tmp_path / "repo") == "fedcba9"


def test_grad_checkpointing_recomputes_and_gives_the_same_gradients(tiny_state):
    model = build_tiny("pretrain", tiny_state).train()  # dropout on: the recomputation must replay its masks
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, model.cfg.image_res, model.cfg.image_res, generator=g)
    ids = torch.randint(5, model.cfg.text.vocab_size, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    calls = {"vision": 0, "fusion": 0}

    def counted(name: str, module: torch.nn.Module) -> None:  # (forward hooks do not see the recomputation)
        forward = module.forward

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return forward(*args, **kwargs)
        module.forward = wrapper

    counted("vision", model.vision_encoder.blocks[0])
    counted("fusion", model.text_encoder.encoder.layer[-1])

    def step(enable: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        torch.manual_seed(0)
        vision, vision_mask = model.encode_images(images)
        text = model.encode_text(ids, mask)
        fused = model.fuse(text, mask, vision, vision_mask)
        loss = model.itm_logits(fused).logsumexp(-1).sum() + model.vision_features(vision).sum() + fused.square().mean()
        loss.backward()
        return grads(model)

    plain = step(False)
    assert calls == {"vision": 1, "fusion": 1}
    recomputed = step(True)
    assert calls == {"vision": 3, "fusion": 3}  # forward + the recomputation in backward
    assert_same_grads(recomputed, plain)
    with torch.no_grad():  # nothing to recompute without gradients
        model.encode_images(images)
    assert calls["vision"] == 4


def test_memoized_frozen_towers_give_the_recomputed_results_and_fusion_gradients(tiny_state):
    """Fine-tuning on frozen towers: each distinct image / text runs its tower once (a text keyed by
    its unpadded tokens, so another batch's padding still hits), and boxes and fusion gradients
    equal those of running the towers every time; the towers stay in eval mode and get no gradient."""
    plain = build_tiny("grounding", tiny_state)
    memo = build_tiny("grounding", tiny_state)
    memo.freeze(["vision", "text"], memoize=True)
    plain.freeze(["vision", "text"], memoize=False)
    for model in (plain, memo):
        model.train()
        for module in model.modules():  # dropout off everywhere (the fusion trains), so the two runs compare
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "dropout_p"):
                module.dropout_p = 0.0
    assert not memo.vision_encoder.training and not memo.text_encoder.encoder.layer[0].training
    assert memo.text_encoder.encoder.layer[-1].training
    g = torch.Generator().manual_seed(5)
    res, vocab = memo.cfg.image_res, memo.cfg.text.vocab_size
    images = torch.randn(3, 3, res, res, generator=g)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    lengths = [9, 6, 4]
    mask = (torch.arange(9) < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    calls = {"vision": 0}
    forward = memo.vision_encoder.forward
    memo.vision_encoder.forward = lambda x: (calls.__setitem__("vision", calls["vision"] + len(x)), forward(x))[1]

    def boxes_and_grads(model, rows, length):
        model.zero_grad(set_to_none=True)
        pick = torch.tensor(rows)
        vision, _ = model.encode_images(images[pick])
        text = model.encode_text(ids[pick, :length], mask[pick, :length])
        boxes = model.predict_boxes(vision, text, mask[pick, :length])
        boxes.sum().backward()
        return boxes.detach(), grads(model)

    for rows, length in [([0, 1, 1], 9), ([2, 1], 6), ([1, 2, 0], 9)]:  # repeats, another padding
        expected, expected_grads = boxes_and_grads(plain, rows, length)
        got, got_grads = boxes_and_grads(memo, rows, length)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
        assert_same_grads(got_grads, expected_grads)
        assert not any(name.startswith("vision_encoder.") or ".layer.0." in name for name in got_grads)
    assert calls["vision"] == 3  # three distinct images, each encoded once
    assert memo.memoized_inputs == 6  # three images + texts 0 (9 tokens), 1 (6), 2 (4)
    with pytest.raises(ValueError, match="unknown tower 'audio'"):
        memo.freeze(["audio"])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_cpu_dropout_drops_its_fraction_in_every_lane_and_is_unbiased(p):
    """Every element position of a draw (the four 15-bit quarters of each 63-bit number) drops
    with the rounded probability; kept values are scaled by 1 / (1 - p'); the gradient is that
    same multiplier."""
    rounded = round(p * DROPOUT_LEVELS) / DROPOUT_LEVELS
    assert abs(rounded - p) <= 0.5 / DROPOUT_LEVELS
    torch.manual_seed(0)
    x = torch.full((400, 1001), 2.0, requires_grad=True)  # 400,400 elements: not a multiple of 4
    y = dropout(x, p)
    dropped = y.detach().eq(0).flatten()
    sigma = (rounded * (1 - rounded) / (dropped.numel() / 4)) ** 0.5
    for lane in range(4):
        assert abs(dropped[lane::4].float().mean().item() - rounded) < 5 * sigma, lane
    torch.testing.assert_close(y.detach()[y.detach() != 0], torch.full(((~dropped).sum().item(),), 2.0 / (1 - rounded)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach() / 2.0)


def test_cpu_dropout_follows_the_default_generator_and_mode():
    x = torch.randn(3, 7, 5, dtype=torch.bfloat16)
    torch.manual_seed(3)
    first = dropout(x, 0.3)
    torch.manual_seed(3)
    again = dropout(x, 0.3)
    torch.manual_seed(4)
    other = dropout(x, 0.3)
    assert first.dtype == torch.bfloat16 and first.shape == x.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(x, 1.5)
    module = Dropout(0.3)
    assert isinstance(module, torch.nn.Dropout)
    torch.manual_seed(3)
    torch.testing.assert_close(module(x), first)
    assert module.eval()(x) is x



FAULTS_OF_REPEATED_ALLOCATIONS = """
import resource, sys, torch
from x2vlm.cli import main
print(main(["pretrain", "--config", sys.argv[1]]))  # fails at once (no such file), after the allocator's policy
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(9):  # 64 MiB: above glibc's largest mmap threshold (32 MiB)
    before = faults()
    torch.ones(16 * 2**20).sum()
    counts.append(faults() - before)
print(sorted(counts)[4])  # the median: the heap may still grow once or twice while it settles
"""


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's allocator only")
@pytest.mark.parametrize("opt_out", [False, True])
def test_command_line_reuses_freed_memory_without_page_faults(opt_out, tmp_path):
    """Under the command line (``host_memory.reuse_freed_memory``) a 64 MiB tensor allocated again
    after being freed takes no page faults; with the opt-out (glibc's defaults: every such tensor is
    a new mapping) it takes about one per 4 KiB page."""
    env = {**os.environ, host_memory.OPT_OUT: "1" if opt_out else "0"}
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_ALLOCATIONS, str(tmp_path / "missing.yaml")],
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "2"  # the CLI's error exit: the config file does not exist
    faults, pages = int(out[1]), 64 * 2**20 // 4096
    if opt_out:
        assert faults > pages // 2
    else:
        assert faults < pages // 100
