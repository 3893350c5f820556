"""NLVR2-style statements about a pair of scenes, with True/False labels balanced exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from x2vlm.world import vocabulary as vocab
from x2vlm.world.captions import phrase_for, pick
from x2vlm.world.language import english_noun_phrase, sentence_case
from x2vlm.world.questions import attribute_filters, names_held_out
from x2vlm.world.scene import SceneIndex, attributes_of

SIDES: tuple[str, ...] = ("left", "right")


@dataclass(frozen=True)
class Statement:
    template: str
    text: str
    label: bool
    about_held_out: bool


def existence_statements(left: SceneIndex, right: SceneIndex, novel: bool,
                         rng: np.random.Generator) -> list[Statement]:
    statements = []
    filters = attribute_filters(left, novel, rng) + attribute_filters(right, novel, rng)
    seen = set()
    for attributes in filters:
        key = tuple(sorted(attributes.items()))
        if key in seen or attributes.keys() == {"size"}:
            continue
        seen.add(key)
        phrase = english_noun_phrase(phrase_for(attributes, "a"))
        in_left = bool(left.matching(attributes))
        in_right = bool(right.matching(attributes))
        held = names_held_out(attributes)
        for side, present in (("left", in_left), ("right", in_right)):
            statements.append(Statement("contains", f"the {side} image contains {phrase}", present, held))
        statements.append(Statement("both", f"both images contain {phrase}", in_left and in_right, held))
        statements.append(Statement("exactly_one", f"exactly one image contains {phrase}",
                                    in_left != in_right, held))
        statements.append(Statement("neither", f"neither image contains {phrase}",
                                    not in_left and not in_right, held))
        total = len(left.matching(attributes)) + len(right.matching(attributes))
        for number in sorted({max(1, total - 1), total, total + 1}):
            if number > 4:
                continue
            counted = english_noun_phrase(phrase_for(attributes, "count", count=number))
            statements.append(Statement("total", f"the two images contain {counted} in total",
                                        total == number, held))
    return statements


def comparison_statements(left: SceneIndex, right: SceneIndex) -> list[Statement]:
    n_left, n_right = len(left.objects), len(right.objects)
    return [
        Statement("compare", "the left image has more objects than the right image",
                  n_left > n_right, False),
        Statement("compare", "the left image has fewer objects than the right image",
                  n_left < n_right, False),
        Statement("compare", "the two images have the same number of objects",
                  n_left == n_right, False),
    ]


def vertical_statements(side: str, index: SceneIndex, rng: np.random.Generator) -> list[Statement]:
    """"In the left image, the red circle is above the blue square." Only above/below are used,
    so a horizontal flip of either image never changes a label."""
    statements = []
    for subject in index.objects:
        subject_sets = index.unique_attribute_sets(subject)
        for reference in index.objects:
            reference_sets = index.unique_attribute_sets(reference)
            if subject.id == reference.id or not subject_sets or not reference_sets:
                continue
            for relation, opposite in (("above", "below"), ("below", "above")):
                if index.holds(subject, relation, reference):
                    label = True
                elif index.holds(subject, opposite, reference):
                    label = False
                else:
                    continue
                subject_text = english_noun_phrase(
                    phrase_for(attributes_of(subject, pick(rng, subject_sets)), "the"))
                reference_text = english_noun_phrase(
                    phrase_for(attributes_of(reference, pick(rng, reference_sets)), "the"))
                held = (vocab.is_held_out(subject.color, subject.shape)
                        or vocab.is_held_out(reference.color, reference.shape))
                statements.append(Statement(
                    "vertical", f"in the {side} image, {subject_text} is {relation} {reference_text}",
                    label, held))
    return statements


def pair_statement(left: SceneIndex, right: SceneIndex, label: bool, novel: bool,
                   rng: np.random.Generator) -> Statement:
    """A statement about the pair whose truth is ``label``: a template family is drawn
    uniformly among those that can produce that label, then a statement within it."""
    candidates = (existence_statements(left, right, novel, rng) + comparison_statements(left, right)
                  + vertical_statements("left", left, rng) + vertical_statements("right", right, rng))
    candidates = [s for s in candidates if s.label == label]
    if novel:
        candidates = [s for s in candidates if s.about_held_out] or candidates
    templates = sorted({s.template for s in candidates})
    template = pick(rng, templates)
    chosen = pick(rng, [s for s in candidates if s.template == template])
    return Statement(chosen.template, sentence_case(chosen.text), chosen.label, chosen.about_held_out)
