"""NLVR2-style statements about a pair of scenes, with True/False labels balanced exactly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from x2vlm.world.captions import phrase_for, pick
from x2vlm.world.language import english_noun_phrase, sentence_case
from x2vlm.world.questions import attribute_filters, definite, names_held_out
from x2vlm.world.scene import SceneIndex


@dataclass(frozen=True)
class Statement:
    template: str
    text: str
    label: bool
    about_held_out: bool


@dataclass(frozen=True)
class StatementCandidate:
    template: str
    label: bool
    about_held_out: bool
    build_text: Callable[[np.random.Generator], str]


def existence_statements(left: SceneIndex, right: SceneIndex, novel: bool,
                         rng: np.random.Generator) -> list[StatementCandidate]:
    candidates = []
    filters = attribute_filters(left, novel, rng) + attribute_filters(right, novel, rng)
    seen = set()
    for attributes in filters:
        key = tuple(sorted(attributes.items()))
        if key in seen or attributes.keys() == {"size"}:
            continue
        seen.add(key)
        n_left, n_right = len(left.matching(attributes)), len(right.matching(attributes))
        held = names_held_out(attributes)

        def text(pattern: str, attributes=attributes):
            return lambda rng: pattern.format(english_noun_phrase(phrase_for(attributes, "a")))

        candidates += [
            StatementCandidate("contains", n_left > 0, held, text("the left image contains {}")),
            StatementCandidate("contains", n_right > 0, held, text("the right image contains {}")),
            StatementCandidate("both", n_left > 0 and n_right > 0, held,
                               text("both images contain {}")),
            StatementCandidate("exactly_one", (n_left > 0) != (n_right > 0), held,
                               text("exactly one image contains {}")),
            StatementCandidate("neither", n_left == 0 and n_right == 0, held,
                               text("neither image contains {}")),
        ]
        total = n_left + n_right
        for number in sorted({total - 1, total, total + 1}):
            if not 1 <= number <= 4:
                continue

            def counted(rng, attributes=attributes, number=number):
                phrase = english_noun_phrase(phrase_for(attributes, "count", count=number))
                return f"the two images contain {phrase} in total"
            candidates.append(StatementCandidate("total", total == number, held, counted))
    return candidates


def comparison_statements(left: SceneIndex, right: SceneIndex) -> list[StatementCandidate]:
    n_left, n_right = len(left.objects), len(right.objects)
    return [
        StatementCandidate("compare", n_left > n_right, False,
                           lambda rng: "the left image has more objects than the right image"),
        StatementCandidate("compare", n_left < n_right, False,
                           lambda rng: "the left image has fewer objects than the right image"),
        StatementCandidate("compare", n_left == n_right, False,
                           lambda rng: "the two images have the same number of objects"),
    ]


def vertical_statements(side: str, index: SceneIndex) -> list[StatementCandidate]:
    """"In the left image, the red circle is above the blue square." Only above/below are used,
    so a horizontal flip of either image never changes a label."""
    candidates = []
    for subject, subject_sets, reference, reference_sets, held in index.describable_pairs():
        for relation, opposite in (("above", "below"), ("below", "above")):
            if index.holds(subject, relation, reference):
                label = True
            elif index.holds(subject, opposite, reference):
                label = False
            else:
                continue

            def build(rng, subject=subject, reference=reference, relation=relation,
                      subject_sets=subject_sets, reference_sets=reference_sets):
                subject_text = english_noun_phrase(definite(subject, pick(rng, subject_sets)))
                reference_text = english_noun_phrase(definite(reference, pick(rng, reference_sets)))
                return f"in the {side} image, {subject_text} is {relation} {reference_text}"
            candidates.append(StatementCandidate("vertical", label, held, build))
    return candidates


def pair_statement(left: SceneIndex, right: SceneIndex, label: bool, novel: bool,
                   rng: np.random.Generator) -> Statement:
    """A statement about the pair whose truth is ``label``: a template family is drawn
    uniformly among those that can produce that label, then a statement within it."""
    candidates = (existence_statements(left, right, novel, rng) + comparison_statements(left, right)
                  + vertical_statements("left", left) + vertical_statements("right", right))
    candidates = [c for c in candidates if c.label == label]
    if novel:
        candidates = [c for c in candidates if c.about_held_out] or candidates
    template = pick(rng, sorted({c.template for c in candidates}))
    chosen = pick(rng, [c for c in candidates if c.template == template])
    return Statement(chosen.template, sentence_case(chosen.build_text(rng)), chosen.label,
                     chosen.about_held_out)
