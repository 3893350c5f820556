"""Caption decoding (x2vlm.generation): beam search against exhaustive search, trigram blocking,
minimum length. A toy captioning model (tiny preset, 120-token vocabulary, random weights)."""

from __future__ import annotations

import math

import pytest
import torch

from x2vlm import generation
from x2vlm.config import preset
from x2vlm.generation import BLOCKED, CaptionSettings, beam_search, greedy_caption
from x2vlm.models.x2vlm import X2VLM

VOCAB = 120  # above every special id: pad 0, unk 100, cls 101, sep 102, mask 103
SEP, MASK = 102, 103
PROMPT = torch.tensor([101, 110, 111])


@pytest.fixture(scope="module")
def toy():
    """(model, vision_embeds, vision_mask) for two random images. The text-side matrices are scaled up
    (x40, the word embeddings tied to the MLM decoder x10) so next-token distributions are far from
    uniform and depend on the earlier tokens; with this seed greedy decoding misses the best caption."""
    torch.manual_seed(3)
    model = X2VLM(preset("x2vlm-tiny", task="captioning", text={"vocab_size": VOCAB})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and not name.startswith("vision"):
                param.mul_(40.0)
        model.text_encoder.embeddings.word_embeddings.weight.mul_(10.0 / 40.0)
        vision, vmask = model.encode_images(torch.randn(2, 3, 64, 64))
    return model, vision, vmask


@torch.no_grad()
def next_token_log_probs(model, vision, vmask, prefixes: torch.Tensor) -> torch.Tensor:
    """Full (uncached) forward of ``[prompt, prefix, [MASK]]`` with a causal mask, as the official
    decoder's attention pattern implies: log-probabilities (N, V) at the [MASK]. ``vision`` is one image."""
    n = prefixes.shape[0]
    ids = torch.cat([PROMPT.expand(n, -1), prefixes, torch.full((n, 1), MASK)], dim=1)
    causal = torch.tril(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.long)).expand(n, -1, -1)
    masked_pos = torch.full((n, 1), ids.shape[1] - 1)
    logits = model.mlm_logits(ids, causal, vision.expand(n, -1, -1), vmask.expand(n, -1), masked_pos)[:, 0]
    return torch.log_softmax(logits.float(), dim=-1)


def exhaustive_best(model, vision, vmask, min_length: int, length_penalty: float) -> tuple[list[int], float]:
    """Best caption of at most 2 tokens by enumerating every candidate, scored as beam_search scores:
    summed log-probabilities, [SEP] replaced by BLOCKED while fewer than ``min_length`` tokens exist,
    a caption ending at step s (0-based) divided by ((6 + s) / 6) ** length_penalty when the penalty is > 0,
    and candidates ending at the last step (2 tokens) or with [SEP]. Continuing after a first [SEP]
    costs BLOCKED as well, so such candidates can never win and are left out."""

    def penalised(score: float, step: int) -> float:
        return score / ((6 + step) / 6.0) ** length_penalty if length_penalty > 0 else score

    first = next_token_log_probs(model, vision, vmask, torch.zeros(1, 0, dtype=torch.long))[0]
    if min_length >= 1:
        first[SEP] = BLOCKED
    second = next_token_log_probs(model, vision, vmask, torch.arange(VOCAB).view(-1, 1))
    if min_length >= 2:
        second[:, SEP] = BLOCKED
    candidates = {(SEP,): penalised(float(first[SEP]), 0)}
    for a in range(VOCAB):
        if a == SEP:
            continue
        for b in range(VOCAB):
            candidates[(a, b)] = penalised(float(first[a] + second[a, b]), 1)
    ranked = sorted(candidates.items(), key=lambda item: -item[1])
    (best, best_score), (_, runner_up) = ranked[0], ranked[1]
    assert best_score - runner_up > 1e-4, "near tie: the comparison would depend on rounding"
    return list(best), best_score


@pytest.mark.parametrize("min_length,length_penalty", [(0, 0.0), (1, 0.0), (1, 1.0), (2, 0.5)])
def test_beam_search_with_beam_equal_to_vocabulary_is_exhaustive(toy, monkeypatch, min_length, length_penalty):
    # With num_beams == vocabulary size and at most 2 new tokens the search is exhaustive: step 0
    # keeps every first token; step 1 keeps the top-V of all V*V two-token candidates (every beam
    # proposes all V tokens), which contains the best one; the result is the best of the [SEP]s that
    # ended at step 0 and the beams at step 1 (the last step). Trigram blocking cannot act on < 3 tokens.
    model, vision, vmask = toy
    recorded = {}
    original = generation._select_beams

    def record(step_tokens, step_parents, step_scores, sep, penalty):
        recorded.update(tokens=step_tokens, parents=step_parents, scores=step_scores)
        return original(step_tokens, step_parents, step_scores, sep, penalty)

    monkeypatch.setattr(generation, "_select_beams", record)
    settings = CaptionSettings(num_beams=VOCAB, max_new_tokens=2, min_length=min_length, length_penalty=length_penalty)
    results = beam_search(model, vision, vmask, PROMPT, settings)
    assert len(results) == 2
    for row, sequence in enumerate(results):
        expected, expected_score = exhaustive_best(model, vision[row : row + 1], vmask[row : row + 1], min_length, length_penalty)
        assert sequence == expected
        # The beam's own cumulative (cached) score for the returned sequence.
        step = len(sequence) - 1
        tokens, parents, scores = (x[step][row].tolist() for x in (recorded["tokens"], recorded["parents"], recorded["scores"]))
        matches = [
            scores[beam] for beam in range(VOCAB)
            if tokens[beam] == sequence[-1] and (step == 0 or recorded["tokens"][0][row, parents[beam]] == sequence[0])
        ]
        assert len(matches) == 1
        score = matches[0] / ((6 + step) / 6.0) ** length_penalty if length_penalty > 0 else matches[0]
        # fp32 rounding, amplified by the x40 weights: on an Intel Xeon with AMX both the cached beam
        # score and the uncached one are ~1e-4 from the float64 value (-3.36307 / -3.36317 vs -3.36325)
        assert math.isclose(score, expected_score, abs_tol=5e-4)
    if min_length >= 1:
        assert all(seq != [SEP] for seq in results)
    if (min_length, length_penalty) == (1, 0.0):  # the search problem is not trivial here
        assert greedy_caption(model, vision, vmask, PROMPT, max_new_tokens=2, min_length=1) != results


def repeats_trigram(sequence: list[int]) -> bool:
    trigrams = [tuple(sequence[i : i + 3]) for i in range(len(sequence) - 2)]
    return len(trigrams) != len(set(trigrams))


@pytest.fixture
def biased(toy):
    """The toy model with its MLM output bias restored after the test."""
    model, vision, vmask = toy
    saved = model.mlm_head.bias.detach().clone()
    yield model, vision, vmask
    with torch.no_grad():
        model.mlm_head.bias.copy_(saved)


def test_trigram_blocking(biased):
    model, vision, vmask = biased
    with torch.no_grad():
        model.mlm_head.bias[[110, 111]] += torch.tensor([60.0, 59.0])  # two tokens dominate every step
    settings = CaptionSettings(num_beams=3, max_new_tokens=8, min_length=8, block_repeated_trigrams=False)
    unblocked = beam_search(model, vision, vmask, PROMPT, settings)
    assert all(repeats_trigram(seq) for seq in unblocked)
    settings.block_repeated_trigrams = True
    blocked = beam_search(model, vision, vmask, PROMPT, settings)
    assert all(len(seq) == 8 and not repeats_trigram(seq) for seq in blocked)


@pytest.mark.parametrize("min_length", [1, 3, 5])
def test_minimum_length(biased, min_length):
    model, vision, vmask = biased
    with torch.no_grad():
        model.mlm_head.bias[SEP] += 60.0  # the model wants to end at once
    free = CaptionSettings(num_beams=3, max_new_tokens=8, min_length=0)
    assert beam_search(model, vision, vmask, PROMPT, free) == [[SEP], [SEP]]
    assert greedy_caption(model, vision, vmask, PROMPT, max_new_tokens=8) == [[SEP], [SEP]]
    bounded = CaptionSettings(num_beams=3, max_new_tokens=8, min_length=min_length)
    outputs = beam_search(model, vision, vmask, PROMPT, bounded) + greedy_caption(
        model, vision, vmask, PROMPT, max_new_tokens=8, min_length=min_length
    )
    for seq in outputs:
        # [SEP] is forbidden for the first min_length tokens, then ends the caption at once.
        assert SEP not in seq[:-1] and seq[-1] == SEP and len(seq) == min_length + 1
