"""Tests of x2vlm.data.masking: the n_pred rule, spans, whole words, 80/10/10, excluded ids."""

import numpy as np
import pytest
import torch

from x2vlm.data.masking import (
    IGNORE_INDEX,
    MaskingConfig,
    mask_tokens,
    num_predictions,
    pad_masked_targets,
    special_ids_from_vocab,
)

# A BERT-like toy vocabulary: [PAD] 0, [unused0-98] 1-99, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103.
VOCAB_TOKENS = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB_TOKENS += [f"w{i}" for i in range(448)] + [f"##p{i}" for i in range(448)]
VOCAB = {t: i for i, t in enumerate(VOCAB_TOKENS)}
VOCAB_SIZE = len(VOCAB)
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = special_ids_from_vocab(VOCAB)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_text(g: np.random.Generator, n_words: int, max_pieces: int = 3, pad: int = 0):
    """``[CLS] w.. ##p.. ... [SEP] [PAD]*pad`` with 1..max_pieces word pieces per word."""
    tokens = ["[CLS]"]
    for _ in range(n_words):
        tokens.append(f"w{int(g.integers(448))}")
        tokens += [f"##p{int(g.integers(448))}" for _ in range(int(g.integers(max_pieces)))]
    tokens += ["[SEP]"] + ["[PAD]"] * pad
    return [VOCAB[t] for t in tokens], tokens


def run(ids, tokens, cfg, seed, num_protected=0):
    return mask_tokens(ids, tokens, cfg, rng(seed), VOCAB_SIZE, SPECIAL, MASK, num_protected=num_protected)


def test_special_ids_from_vocab():
    assert SPECIAL == frozenset(range(0, 104))


def test_num_predictions_rule():
    cfg = MaskingConfig(mask_prob=0.5, max_masks=12)
    assert num_predictions(13, cfg) == 6  # round(6.5) = 6 (Python rounds half to even)
    assert num_predictions(15, cfg) == 8  # round(7.5) = 8
    assert num_predictions(40, cfg) == 12  # capped by max_masks
    assert num_predictions(3, MaskingConfig(0.1, 12)) == 1  # at least one
    assert num_predictions(20, MaskingConfig(0.6, 18), num_protected=5) == 9  # round(15 * 0.6)


def test_n_pred_rule_holds():
    g = rng(0)
    for seed in range(300):
        n_words = int(g.integers(1, 30))
        cfg = MaskingConfig(
            mask_prob=float(g.choice([0.15, 0.4, 0.5, 0.6])),
            max_masks=int(g.integers(3, 20)),
            whole_word=bool(g.integers(2)),
        )
        ids, tokens = make_text(g, n_words)
        _, positions, original = run(ids, tokens, cfg, seed)
        n_candidates = len(ids) - 2
        assert len(positions) == min(num_predictions(len(ids), cfg), n_candidates)
        assert positions == sorted(set(positions))
        assert original == [ids[p] for p in positions]


def test_never_masks_cls_sep_padding_or_protected_prefix():
    g = rng(1)
    cfg = MaskingConfig(mask_prob=0.9, max_masks=40)
    for seed in range(300):
        ids, tokens = make_text(g, int(g.integers(4, 15)), pad=5)
        protected = int(g.integers(0, 3))
        masked, positions, _ = run(ids, tokens, cfg, seed, num_protected=protected)
        last_real = ids.index(SEP) - 1
        assert all(1 + protected <= p <= last_real for p in positions)
        untouched = [i for i in range(len(ids)) if i not in positions]
        assert [masked[i] for i in untouched] == [ids[i] for i in untouched]
        assert masked[0] == CLS and masked[last_real + 1] == SEP and masked[-5:] == [PAD] * 5


def test_nothing_to_mask():
    ids, tokens = [CLS, SEP], ["[CLS]", "[SEP]"]
    assert run(ids, tokens, MaskingConfig(0.5, 12), 0) == ([CLS, SEP], [], [])


def test_whole_word_spans():
    # Every word is two pieces, no skip-grams and an even n_pred: whole words are masked, never halves.
    tokens = ["[CLS]"] + [t for i in range(10) for t in (f"w{i}", f"##p{i}")] + ["[SEP]"]
    ids = [VOCAB[t] for t in tokens]
    cfg = MaskingConfig(mask_prob=0.2, max_masks=12, whole_word=True, skipgram_prb=0.0)
    assert num_predictions(len(ids), cfg) == 4
    for seed in range(200):
        _, positions, _ = run(ids, tokens, cfg, seed)
        assert len(positions) == 4
        for p in positions:
            partner = p + 1 if tokens[p].startswith("w") else p - 1
            assert partner in positions
    # Control: without whole-word masking, half words do occur.
    cfg_pieces = MaskingConfig(mask_prob=0.2, max_masks=12, whole_word=False, skipgram_prb=0.0)
    halves = 0
    for seed in range(200):
        _, positions, _ = run(ids, tokens, cfg_pieces, seed)
        halves += any((p + 1 if tokens[p].startswith("w") else p - 1) not in positions for p in positions)
    assert halves > 100


def test_skipgram_spans_make_neighbours():
    tokens = ["[CLS]"] + [f"w{i}" for i in range(40)] + ["[SEP]"]
    ids = [VOCAB[t] for t in tokens]

    def neighbour_fraction(prb):
        cfg = MaskingConfig(mask_prob=0.25, max_masks=10, whole_word=False, skipgram_prb=prb)
        hits = total = 0
        for seed in range(300):
            _, positions, _ = run(ids, tokens, cfg, seed)
            s = set(positions)
            hits += sum((p - 1 in s) or (p + 1 in s) for p in positions)
            total += len(positions)
        return hits / total

    assert neighbour_fraction(1.0) > neighbour_fraction(0.0) + 0.3


def test_replacement_statistics_and_excluded_ids():
    g = rng(2)
    cfg = MaskingConfig(mask_prob=1.0, max_masks=64)
    n_mask = n_random = n_keep = 0
    for seed in range(600):
        ids, tokens = make_text(g, 20)
        masked, positions, original = run(ids, tokens, cfg, seed)
        for p, o in zip(positions, original):
            m = masked[p]
            assert 0 <= m < VOCAB_SIZE
            if m == MASK:
                n_mask += 1
            elif m == o:
                n_keep += 1
            else:
                n_random += 1
                assert m not in SPECIAL  # never [PAD]/[CLS]/[SEP]/[UNK]/[unused*]
    total = n_mask + n_random + n_keep
    assert total > 15000
    assert abs(n_mask / total - 0.8) < 0.015
    assert abs(n_random / total - 0.1) < 0.01
    assert abs(n_keep / total - 0.1) < 0.01


def test_replacement_with_mostly_excluded_vocabulary():
    # Only ids 104..109 are allowed: exercises the explicit-list fallback of the sampler.
    tokens = ["[CLS]"] + ["w0"] * 30 + ["[SEP]"]
    ids = [VOCAB[t] for t in tokens]
    cfg = MaskingConfig(mask_prob=1.0, max_masks=30, mask_token_prob=0.0, random_token_prob=1.0)
    seen = set()
    for seed in range(50):
        masked, positions, _ = mask_tokens(ids, tokens, cfg, rng(seed), 110, SPECIAL, MASK)
        seen |= {masked[p] for p in positions}
    assert seen == set(range(104, 110))
    with pytest.raises(ValueError):
        mask_tokens(ids, tokens, cfg, rng(0), 104, SPECIAL, MASK)


def test_deterministic_with_seed():
    ids, tokens = make_text(rng(3), 12)
    cfg = MaskingConfig(mask_prob=0.5, max_masks=12)
    assert run(ids, tokens, cfg, 7) == run(ids, tokens, cfg, 7)
    assert any(run(ids, tokens, cfg, 7) != run(ids, tokens, cfg, s) for s in range(8, 12))


def test_input_validation():
    with pytest.raises(ValueError):
        run([CLS, 200, SEP], ["[CLS]", "w0"], MaskingConfig(0.5, 12), 0)
    with pytest.raises(ValueError):
        MaskingConfig(mask_prob=1.5, max_masks=12)
    with pytest.raises(ValueError):
        MaskingConfig(mask_prob=0.5, max_masks=0)


def test_pad_masked_targets():
    pos, ids = pad_masked_targets([2, 5, 6], [300, 301, 302], 5)
    assert pos.dtype == ids.dtype == torch.int64
    assert pos.tolist() == [2, 5, 6, 0, 0]
    assert ids.tolist() == [300, 301, 302, IGNORE_INDEX, IGNORE_INDEX]
    pos, ids = pad_masked_targets([], [], 3)
    assert pos.tolist() == [0, 0, 0] and ids.tolist() == [-100] * 3
    with pytest.raises(ValueError):
        pad_masked_targets([1, 2, 3], [1, 2, 3], 2)
