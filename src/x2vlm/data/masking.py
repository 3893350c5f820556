"""Masked-language-model input corruption (spec §3.3.3, the official ``TextMaskingGenerator``).

Given one tokenised text ``[CLS] ... [SEP]`` (ids and the matching WordPiece strings), choose up to
``n_pred = min(max_masks, max(1, round((len - num_protected) * mask_prob)))`` positions with
skip-gram spans and whole-word extension, then corrupt them 80 % ``[MASK]`` / 10 % random token /
10 % unchanged.

Deliberate differences from the official code (spec §6.9), everything else is kept:

* ``[SEP]`` (and any other special token, e.g. padding) is never a candidate position unless the
  caller allows it (``maskable_ids``; captioning does, as the official caption masking); ``n_pred``
  is therefore also capped by the number of candidates.
* Random replacement tokens are drawn uniformly from the *non-special* vocabulary only (the caller
  passes the excluded ids: ``[PAD]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, ``[UNK]``, ``[unused*]``;
  ``special_ids_from_vocab`` builds that set from a vocabulary).
* All randomness comes from an explicit ``numpy.random.Generator``; positions are returned sorted.

Whole-word extension relies on BERT's ``##`` continuation prefix; the official code forces it off
for other tokenisers (e.g. XLM-R), and callers should do the same (``MaskingConfig.whole_word``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # label padding understood by torch's cross-entropy

_SPECIAL_TOKEN_RE = re.compile(r"^\[[^\]]+\]$|^<[^>]+>$")


@dataclass(frozen=True)
class MaskingConfig:
    """MLM masking settings. X²-VLM pre-training: ``mask_prob 0.5, max_masks 12, whole_word True``;
    captioning: ``0.6, 18, True``; CCLM (XLM-R): ``0.4, 10, False``."""

    mask_prob: float
    max_masks: int
    whole_word: bool = True
    skipgram_prb: float = 0.2
    skipgram_size: int = 3
    mask_token_prob: float = 0.8  # chosen position -> [MASK]
    random_token_prob: float = 0.1  # chosen position -> random non-special token; the rest unchanged

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.max_masks < 1:
            raise ValueError(f"max_masks must be >= 1, got {self.max_masks}")
        probs = (self.mask_token_prob, self.random_token_prob)
        if min(probs) < 0 or sum(probs) > 1:
            raise ValueError("mask_token_prob and random_token_prob must be >= 0 and sum to <= 1")


def special_ids_from_vocab(vocab: Mapping[str, int]) -> frozenset[int]:
    """Ids of bracketed tokens (``[PAD] [UNK] [CLS] [SEP] [MASK] [unused*]``, ``<s> </s> <pad> ...``)."""
    return frozenset(i for tok, i in vocab.items() if _SPECIAL_TOKEN_RE.match(tok))


def num_predictions(length: int, cfg: MaskingConfig, num_protected: int = 0) -> int:
    """The official ``n_pred`` rule; ``length`` includes ``[CLS]`` and ``[SEP]``."""
    return min(cfg.max_masks, max(1, int(round((length - num_protected) * cfg.mask_prob))))


def _random_token(rng: np.random.Generator, vocab_size: int, excluded: frozenset[int]) -> int:
    # Rejection sampling: exactly uniform over the allowed ids, O(1) expected for real vocabularies
    # (BERT excludes ~1k of 30k ids). Falls back to an explicit list when most ids are excluded.
    for _ in range(32):
        i = int(rng.integers(vocab_size))
        if i not in excluded:
            return i
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(excluded, dtype=np.int64))
    return int(rng.choice(allowed))


def mask_tokens(
    token_ids: Sequence[int],
    tokens: Sequence[str],
    cfg: MaskingConfig,
    rng: np.random.Generator,
    vocab_size: int,
    special_ids: Iterable[int],
    mask_id: int,
    num_protected: int = 0,
    maskable_ids: Iterable[int] = (),
) -> tuple[list[int], list[int], list[int]]:
    """Corrupt one *unpadded* ``[CLS] ... [SEP]`` sequence for MLM.

    ``tokens`` are the WordPiece strings of ``token_ids`` (same length; used for ``##`` whole-word
    extension). ``special_ids`` are never masked and never used as replacements; ``mask_id`` is added
    to them. Position 0 and the next ``num_protected`` positions (a captioning prompt) are never masked.
    ``maskable_ids`` are special ids that may still be chosen as positions (never as replacements):
    captioning passes ``[SEP]``, the end of the caption the model has to learn to predict.

    Returns ``(masked_ids, masked_positions, original_ids)``: the corrupted copy of ``token_ids``, the
    chosen positions in increasing order, and the original ids at those positions (the MLM labels).
    """
    n = len(token_ids)
    if len(tokens) != n:
        raise ValueError(f"token_ids ({n}) and tokens ({len(tokens)}) differ in length")
    if num_protected < 0:
        raise ValueError(f"num_protected must be >= 0, got {num_protected}")
    excluded = frozenset(int(i) for i in special_ids) | {int(mask_id)}
    if len({i for i in excluded if 0 <= i < vocab_size}) >= vocab_size:
        raise ValueError("every vocabulary id is excluded; no replacement token can be drawn")

    not_candidates = excluded - {int(i) for i in maskable_ids}
    candidates = [p for p in range(1 + num_protected, n) if int(token_ids[p]) not in not_candidates]
    masked = [int(i) for i in token_ids]
    if not candidates:
        return masked, [], []
    n_pred = min(num_predictions(n, cfg, num_protected), len(candidates))
    valid = set(candidates)

    chosen: set[int] = set()
    for pos in rng.permutation(candidates).tolist():
        if len(chosen) >= n_pred:
            break
        if pos in chosen:
            continue
        span = 1
        if cfg.skipgram_prb > 0 and cfg.skipgram_size >= 2 and rng.random() < cfg.skipgram_prb:
            span = int(rng.integers(2, cfg.skipgram_size + 1))
        start, end = pos, pos + span
        if cfg.whole_word:
            while start >= 0 and tokens[start].startswith("##"):
                start -= 1
            while end < n and tokens[end].startswith("##"):
                end += 1
        for p in range(start, end):
            if p not in valid:  # [CLS], protected prefix, special token or past the end
                break
            chosen.add(p)

    positions = sorted(chosen)
    if len(positions) > n_pred:
        positions = sorted(rng.choice(positions, size=n_pred, replace=False).tolist())

    original = [masked[p] for p in positions]
    for p in positions:
        u = rng.random()
        if u < cfg.mask_token_prob:
            masked[p] = int(mask_id)
        elif u < cfg.mask_token_prob + cfg.random_token_prob:
            masked[p] = _random_token(rng, vocab_size, excluded)
    return masked, positions, original


def pad_masked_targets(
    masked_positions: Sequence[int], original_ids: Sequence[int], max_masks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-size MLM targets: ``masked_pos`` (pad 0), ``masked_ids`` (pad -100); int64 ``(max_masks,)``."""
    if len(masked_positions) != len(original_ids):
        raise ValueError("masked_positions and original_ids differ in length")
    if len(masked_positions) > max_masks:
        raise ValueError(f"{len(masked_positions)} masked positions exceed max_masks={max_masks}")
    pos = torch.zeros(max_masks, dtype=torch.int64)
    ids = torch.full((max_masks,), IGNORE_INDEX, dtype=torch.int64)
    k = len(masked_positions)
    if k:
        pos[:k] = torch.as_tensor(list(masked_positions), dtype=torch.int64)
        ids[:k] = torch.as_tensor(list(original_ids), dtype=torch.int64)
    return pos, ids
