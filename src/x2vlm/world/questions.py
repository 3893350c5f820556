"""VQA questions about scenes, with answers balanced by construction.

Every question family (colour, shape, count, existence, relation) enumerates all questions it
can ask about a scene; an ``AnswerBalancer`` then picks, per family, the answer that is currently
rarest among those available for the scene, so no family can be answered well from its most
common answer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from x2vlm.world import vocabulary as vocab
from x2vlm.world.captions import phrase_for, pick
from x2vlm.world.language import Description, english_description, english_noun_phrase, sentence_case
from x2vlm.world.scene import SceneIndex, attribute_subsets, attributes_of

QUESTION_FAMILIES: tuple[str, ...] = ("color", "shape", "count", "existence", "relation")
#: Official VQA v2 style ``question_type`` (leading words) and ``answer_type`` per family.
QUESTION_TYPES: dict[str, str] = {
    "color": "what color is the",
    "shape": "what shape is the",
    "count": "how many",
    "existence": "is there a",
    "relation": "is the",
}
ANSWER_TYPES: dict[str, str] = {
    "color": "other",
    "shape": "other",
    "count": "number",
    "existence": "yes/no",
    "relation": "yes/no",
}
ANSWERS_PER_QUESTION = 10


@dataclass(frozen=True)
class Question:
    family: str
    text: str
    answer: str
    #: True when the question is about, or names, a held-out colour-shape pair.
    about_held_out: bool


def names_held_out(attributes: dict[str, str]) -> bool:
    return ("color" in attributes and "shape" in attributes
            and vocab.is_held_out(attributes["color"], attributes["shape"]))


def target_descriptions(index: SceneIndex, obj, head_allowed: tuple[str, ...],
                        rng: np.random.Generator) -> list[Description]:
    """Definite descriptions that pick out ``obj`` using only ``head_allowed`` attributes for
    the object itself (the reference of a relational description may use any attribute)."""
    found = [Description(phrase_for(attributes_of(obj, names), "the"))
             for names in index.unique_attribute_sets(obj, head_allowed)]
    for head, relation, reference, _ in index.relational_descriptions(obj, head_allowed):
        reference_sets = index.unique_attribute_sets(reference)
        found.append(Description(phrase_for(attributes_of(obj, head), "the"), relation,
                                 phrase_for(attributes_of(reference, pick(rng, reference_sets)), "the")))
    return found


def color_questions(index: SceneIndex, rng: np.random.Generator) -> list[Question]:
    questions = []
    for obj in index.objects:
        for description in target_descriptions(index, obj, ("size", "shape"), rng):
            text = sentence_case(f"what color is {english_description(description)}", "?")
            questions.append(Question("color", text, obj.color,
                                      vocab.is_held_out(obj.color, obj.shape)))
    return questions


def shape_questions(index: SceneIndex, rng: np.random.Generator) -> list[Question]:
    questions = []
    for obj in index.objects:
        for description in target_descriptions(index, obj, ("size", "color"), rng):
            text = sentence_case(f"what shape is {english_description(description)}", "?")
            questions.append(Question("shape", text, obj.shape,
                                      vocab.is_held_out(obj.color, obj.shape)))
    return questions


def attribute_filters(index: SceneIndex, novel: bool, rng: np.random.Generator) -> list[dict[str, str]]:
    """Attribute combinations to ask about: every combination present in the scene and, for
    each kind of combination, a few absent ones (held-out pairs only in the novel split)."""
    filters: list[dict[str, str]] = []
    seen: set[tuple] = set()

    def add(attributes: dict[str, str]) -> None:
        key = tuple(sorted(attributes.items()))
        if key in seen or (names_held_out(attributes) and not novel):
            return
        seen.add(key)
        filters.append(attributes)

    for obj in index.objects:
        for names in attribute_subsets():
            add(attributes_of(obj, names))
    value_lists = {"size": vocab.SIZES, "color": vocab.COLOR_NAMES, "shape": vocab.SHAPES}
    for names in attribute_subsets():
        for _ in range(2):
            add({name: pick(rng, list(value_lists[name])) for name in names})
    return filters


def count_questions(index: SceneIndex, novel: bool, rng: np.random.Generator) -> list[Question]:
    questions = [Question("count", "How many objects are there?", str(len(index.objects)), False)]
    for attributes in attribute_filters(index, novel, rng):
        noun_phrase = english_noun_phrase(phrase_for(attributes, "bare", plural=True))
        text = sentence_case(f"how many {noun_phrase} are there", "?")
        questions.append(Question("count", text, str(len(index.matching(attributes))),
                                  names_held_out(attributes)))
    return questions


def existence_questions(index: SceneIndex, novel: bool, rng: np.random.Generator) -> list[Question]:
    questions = []
    for attributes in attribute_filters(index, novel, rng):
        if len(attributes) == 1 and "size" in attributes:
            continue  # "is there a large object?" is nearly always yes
        text = sentence_case(f"is there {english_noun_phrase(phrase_for(attributes, 'a'))}", "?")
        answer = "yes" if index.matching(attributes) else "no"
        questions.append(Question("existence", text, answer, names_held_out(attributes)))
    return questions


def relation_questions(index: SceneIndex, rng: np.random.Generator) -> list[Question]:
    """Yes when the relation holds; no only when the opposite relation clearly holds."""
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    questions = []
    for subject in index.objects:
        subject_sets = index.unique_attribute_sets(subject)
        for reference in index.objects:
            reference_sets = index.unique_attribute_sets(reference)
            if subject.id == reference.id or not subject_sets or not reference_sets:
                continue
            for relation in vocab.RELATIONS:
                if index.holds(subject, relation, reference):
                    answer = "yes"
                elif index.holds(subject, opposite[relation], reference):
                    answer = "no"
                else:
                    continue
                subject_text = english_noun_phrase(
                    phrase_for(attributes_of(subject, pick(rng, subject_sets)), "the"))
                reference_text = english_noun_phrase(
                    phrase_for(attributes_of(reference, pick(rng, reference_sets)), "the"))
                text = sentence_case(
                    f"is {subject_text} {vocab.RELATION_PHRASES[relation]} {reference_text}", "?")
                held = (vocab.is_held_out(subject.color, subject.shape)
                        or vocab.is_held_out(reference.color, reference.shape))
                questions.append(Question("relation", text, answer, held))
    return questions


def candidate_questions(index: SceneIndex, family: str, novel: bool,
                        rng: np.random.Generator) -> list[Question]:
    if family == "color":
        return color_questions(index, rng)
    if family == "shape":
        return shape_questions(index, rng)
    if family == "count":
        return count_questions(index, novel, rng)
    if family == "existence":
        return existence_questions(index, novel, rng)
    if family == "relation":
        return relation_questions(index, rng)
    raise ValueError(f"unknown question family {family!r}")


class AnswerBalancer:
    """Chooses among candidates so that each family's answers stay close to uniform."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}

    def choose(self, family: str, candidates: list, rng: np.random.Generator, answer_of=None):
        answer_of = answer_of or (lambda c: c.answer)
        counter = self.counts.setdefault(family, Counter())
        answers = sorted({answer_of(c) for c in candidates})
        lowest = min(counter[a] for a in answers)
        answer = pick(rng, [a for a in answers if counter[a] == lowest])
        counter[answer] += 1
        return pick(rng, [c for c in candidates if answer_of(c) == answer])


def scene_questions(index: SceneIndex, novel: bool, per_scene: int, balancer: AnswerBalancer,
                    rng: np.random.Generator) -> list[Question]:
    """Up to ``per_scene`` questions of different families about one scene. In the novel split
    questions about held-out pairs are preferred wherever a family has one."""
    families = list(QUESTION_FAMILIES)
    rng.shuffle(families)
    chosen: list[Question] = []
    for family in families[:per_scene]:
        candidates = candidate_questions(index, family, novel, rng)
        if novel:
            focused = [q for q in candidates if q.about_held_out]
            candidates = focused or candidates
        if candidates:
            chosen.append(balancer.choose(family, candidates, rng))
    return chosen
