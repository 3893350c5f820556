"""Answer ranking (VQA) and caption generation (UniLM-style [MASK]-append decoding).

``rank_answers`` scores a fixed answer list with the answer decoder: top-k candidates by the
probability of their first token, then the full-sequence likelihood. The official score adds the
first-token log-probability to a sequence NLL that already contains it; ``double_count_first_token``
(default on) keeps that so released checkpoints reproduce their predictions.

``beam_search`` / ``greedy_caption`` / ``sample_captions`` generate with the captioning MLM head: each step feeds the
last token and a ``[MASK]``; the ``[MASK]`` output predicts the next token; every layer's inputs of
earlier positions are cached so keys and values are computed over history + current tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from x2vlm.models.x2vlm import X2VLM

BLOCKED = -10000.0


@torch.no_grad()
def rank_answers(
    model: X2VLM,
    question_states: torch.Tensor,
    question_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    k: int,
    double_count_first_token: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank the answer list for every question. Returns (Q, k) answer indices and probabilities,
    best first. ``answer_ids`` are ``[CLS] answer [SEP] [PAD]..`` rows (A, L)."""
    num_questions = question_states.shape[0]
    k = min(k, answer_ids.shape[0])
    start = answer_ids[:1, :1].expand(num_questions, 1)
    first_logits = model.answer_logits(start, torch.ones_like(start), question_states, question_mask)[:, 0]
    first_token_probs = F.softmax(first_logits.float(), dim=-1).index_select(1, answer_ids[:, 1])
    topk_probs, topk_ids = first_token_probs.topk(k, dim=1)
    candidates = answer_ids[topk_ids.flatten()]
    candidate_mask = answer_mask[topk_ids.flatten()]
    nll = model.answer_nll(
        candidates, candidate_mask, question_states.repeat_interleave(k, 0), question_mask.repeat_interleave(k, 0)
    ).view(num_questions, k)
    scores = -nll + (topk_probs.log() if double_count_first_token else 0.0)
    probs, order = F.softmax(scores, dim=-1).topk(k, dim=1)
    return topk_ids.gather(1, order), probs


@dataclass
class CaptionSettings:
    """Caption decoding: ``max_new_tokens`` counts the tokens generated after the prompt ([SEP]
    included); ``greedy`` asks callers that offer both for greedy decoding instead of beam search."""

    num_beams: int = 3
    max_new_tokens: int = 20
    min_length: int = 5
    length_penalty: float = 0.0
    block_repeated_trigrams: bool = True
    greedy: bool = False


class _IncrementalTextStack:
    """Runs the text+fusion stack one step at a time, caching every layer's inputs."""

    def __init__(self, model: X2VLM, vision_embeds: torch.Tensor, vision_mask: torch.Tensor):
        self.model = model
        self.vision_embeds, self.vision_mask = vision_embeds, vision_mask
        self.history: list[torch.Tensor] | None = None  # per layer: inputs at earlier positions

    def step(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed ``token_ids`` (B, L) at ``positions`` (L,), causally; returns last-layer states (B, L, H)."""
        enc = self.model.text_encoder
        batch, length = token_ids.shape
        past = 0 if self.history is None else self.history[0].shape[1]
        mask = torch.ones(batch, length, past + length, dtype=torch.long, device=token_ids.device)
        mask[:, :, past:] = torch.tril(mask[:, :, past:])
        hidden = enc.embeddings(token_ids, positions.expand(batch, -1))
        history = self.history if self.history is not None else [hidden[:, :0]] * enc.num_layers
        states, inputs = enc.run_layers(hidden, mask, 0, enc.num_layers, self.vision_embeds, self.vision_mask, history=history)
        self._new_inputs = inputs[:-1]  # input of each layer
        return states

    def commit(self, keep: int, order: torch.Tensor | None = None) -> None:
        """Append the first ``keep`` positions of the last step to the cache, then reorder beams."""
        new = [x[:, :keep] for x in self._new_inputs]
        if self.history is None:
            self.history = new
        else:
            self.history = [torch.cat([h, n], dim=1) for h, n in zip(self.history, new)]
        if order is not None:
            self.history = [h[order] for h in self.history]

    def expand(self, times: int) -> None:
        self.vision_embeds = self.vision_embeds.repeat_interleave(times, 0)
        self.vision_mask = self.vision_mask.repeat_interleave(times, 0)
        if self.history is not None:
            self.history = [h.repeat_interleave(times, 0) for h in self.history]


def _next_token_log_probs(model: X2VLM, states: torch.Tensor) -> torch.Tensor:
    logits = model.mlm_head(states[:, -1], model.text_encoder.embeddings.word_embeddings.weight)
    return F.log_softmax(logits.float(), dim=-1)


def _block_trigrams(log_probs: torch.Tensor, sequences: torch.Tensor) -> None:
    """Forbid tokens that would repeat a trigram already in the beam's sequence (in place)."""
    if sequences.shape[1] < 3:
        return
    seqs = sequences.tolist()
    for row, seq in enumerate(seqs):
        last_two = tuple(seq[-2:])
        for i in range(len(seq) - 2):
            if (seq[i], seq[i + 1]) == last_two:
                log_probs[row, seq[i + 2]] = BLOCKED


@torch.no_grad()
def beam_search(
    model: X2VLM,
    vision_embeds: torch.Tensor,
    vision_mask: torch.Tensor,
    prompt_ids: torch.Tensor,
    settings: CaptionSettings,
) -> list[list[int]]:
    """Generate captions (token ids after the prompt, ending with [SEP] if it was produced).

    Beam bookkeeping follows the official decoder: a beam that emitted [SEP] is penalised so it does
    not continue, [SEP] is forbidden until ``min_length`` tokens exist, and the result is the best
    beam that ended at any step up to the first step where every beam ended (or the last step).
    """
    cfg = model.cfg.text
    sep, mask_id = cfg.sep_token_id, cfg.mask_token_id
    batch, beams = vision_embeds.shape[0], settings.num_beams
    device = vision_embeds.device
    prompt = prompt_ids.to(device).view(1, -1).expand(batch, -1)
    prompt_len = prompt.shape[1]
    stack = _IncrementalTextStack(model, vision_embeds, vision_mask)
    step_tokens: list[torch.Tensor] = []  # (batch, beams) token chosen at each step
    step_parents: list[torch.Tensor] = []  # (batch, beams) index of the parent beam
    step_scores: list[torch.Tensor] = []  # (batch, beams) cumulative log-probability
    sequences = prompt  # rows: batch, then batch*beams after the first step
    current = torch.cat([prompt, prompt.new_full((batch, 1), mask_id)], dim=1)
    positions = torch.arange(prompt_len + 1, device=device)
    for step in range(settings.max_new_tokens):
        states = stack.step(current, positions)
        log_probs = _next_token_log_probs(model, states)
        if step + 1 <= settings.min_length:
            log_probs[:, sep] = BLOCKED
        if settings.block_repeated_trigrams:
            _block_trigrams(log_probs, sequences[:, prompt_len:])
        top_scores, top_tokens = log_probs.topk(beams, dim=-1)
        if step == 0:
            tokens, scores = top_tokens.view(batch, beams), top_scores.view(batch, beams)
            parents = torch.zeros(batch, beams, dtype=torch.long, device=device)
        else:
            finished = step_tokens[-1].eq(sep).float().view(-1, 1)
            candidate_scores = top_scores + finished * BLOCKED + step_scores[-1].view(-1, 1)
            scores, flat = candidate_scores.view(batch, beams * beams).topk(beams, dim=1)
            parents = torch.div(flat, beams, rounding_mode="floor")
            tokens = top_tokens.view(batch, beams * beams).gather(1, flat)
        step_tokens.append(tokens)
        step_parents.append(parents)
        step_scores.append(scores)
        rows = (parents + torch.arange(batch, device=device).view(-1, 1) * (1 if step == 0 else beams)).flatten()
        keep = current.shape[1] - 1  # everything but the [MASK]
        stack.commit(keep, order=rows if step > 0 else None)
        if step == 0:
            stack.expand(beams)
            sequences = sequences.repeat_interleave(beams, 0)
        else:
            sequences = sequences[rows]
        sequences = torch.cat([sequences, tokens.view(-1, 1)], dim=1)
        next_pos = prompt_len + step + 1
        current = torch.cat([tokens.view(-1, 1), tokens.new_full((batch * beams, 1), mask_id)], dim=1)
        positions = torch.arange(next_pos - 1, next_pos + 1, device=device)
    return _select_beams(step_tokens, step_parents, step_scores, sep, settings.length_penalty)


def _select_beams(step_tokens, step_parents, step_scores, sep: int, length_penalty: float) -> list[list[int]]:
    tokens = torch.stack(step_tokens, dim=1).tolist()  # (batch, steps, beams)
    parents = torch.stack(step_parents, dim=1).tolist()
    scores = torch.stack(step_scores, dim=1).tolist()
    results = []
    for b in range(len(tokens)):
        steps = len(tokens[b])
        last = next((i for i, row in enumerate(tokens[b]) if all(t == sep for t in row)), steps - 1)
        best, best_step, best_beam = -math.inf, -1, -1
        for step in range(last + 1):
            for beam, token in enumerate(tokens[b][step]):
                if token == sep or step == last:
                    score = scores[b][step][beam]
                    if length_penalty > 0:
                        score /= ((5 + step + 1) / 6.0) ** length_penalty
                    if score > best:
                        best, best_step, best_beam = score, step, beam
        sequence = [tokens[b][best_step][best_beam]]
        beam = best_beam
        for step in range(best_step, 0, -1):
            beam = parents[b][step][beam]
            sequence.append(tokens[b][step - 1][beam])
        results.append(sequence[::-1])
    return results


@torch.no_grad()
def greedy_caption(
    model: X2VLM, vision_embeds: torch.Tensor, vision_mask: torch.Tensor, prompt_ids: torch.Tensor, max_new_tokens: int, min_length: int = 0
) -> list[list[int]]:
    """Greedy decoding with the same incremental stack; stops a row at [SEP]."""
    outputs, _ = _decode_one_path(model, vision_embeds, vision_mask, prompt_ids, max_new_tokens, min_length, generator=None)
    return outputs


@torch.no_grad()
def sample_captions(
    model: X2VLM,
    vision_embeds: torch.Tensor,
    vision_mask: torch.Tensor,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    generator: torch.Generator,
    min_length: int = 0,
) -> tuple[list[list[int]], torch.Tensor]:
    """Multinomial sampling (SCST): token ids per row (ending with [SEP] if produced) and the summed
    log-probability of each row's tokens. Uniforms come from ``generator`` (CPU), so the draw does not
    depend on the device."""
    return _decode_one_path(model, vision_embeds, vision_mask, prompt_ids, max_new_tokens, min_length, generator)


def _decode_one_path(model, vision_embeds, vision_mask, prompt_ids, max_new_tokens, min_length, generator):
    """One token per step (argmax, or sampled when ``generator`` is given); a row stops at [SEP]."""
    cfg = model.cfg.text
    batch, device = vision_embeds.shape[0], vision_embeds.device
    prompt = prompt_ids.to(device).view(1, -1).expand(batch, -1)
    stack = _IncrementalTextStack(model, vision_embeds, vision_mask)
    current = torch.cat([prompt, prompt.new_full((batch, 1), cfg.mask_token_id)], dim=1)
    positions = torch.arange(prompt.shape[1] + 1, device=device)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    total_log_prob = torch.zeros(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        log_probs = _next_token_log_probs(model, stack.step(current, positions))
        if step + 1 <= min_length:
            log_probs[:, cfg.sep_token_id] = BLOCKED
        if generator is None:
            token = log_probs.argmax(dim=-1)
        else:
            uniform = torch.rand(batch, 1, generator=generator).to(device)
            cdf = log_probs.softmax(dim=-1).cumsum(dim=-1)
            token = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1).clamp(max=log_probs.shape[1] - 1)
        total_log_prob += torch.where(done, 0.0, log_probs.gather(1, token.view(-1, 1)).squeeze(1))
        for row in torch.nonzero(~done).flatten().tolist():
            outputs[row].append(int(token[row]))
        done |= token.eq(cfg.sep_token_id)
        if bool(done.all()):
            break
        stack.commit(current.shape[1] - 1)
        next_pos = prompt.shape[1] + step + 1
        current = torch.cat([token.view(-1, 1), token.new_full((batch, 1), cfg.mask_token_id)], dim=1)
        positions = torch.arange(next_pos - 1, next_pos + 1, device=device)
    return outputs, total_log_prob
