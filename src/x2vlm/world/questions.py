"""VQA questions about scenes, with answers balanced by construction.

Every question family (colour, shape, count, existence, relation) enumerates all questions it
can ask about a scene; an ``AnswerBalancer`` then picks, per family, the answer that is currently
rarest among those available for the scene, so no family can be answered well from its most
common answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from x2vlm.world import vocabulary as vocab
from x2vlm.world.captions import phrase_for, pick
from x2vlm.world.language import (
    Description,
    NounPhrase,
    english_description,
    english_noun_phrase,
    sentence_case,
)
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


@dataclass(frozen=True)
class Candidate:
    """A question that could be asked; its text is only built (``build_text``) once chosen."""

    family: str
    answer: str
    about_held_out: bool
    build_text: Callable[[np.random.Generator], str]

    def realise(self, rng: np.random.Generator) -> Question:
        return Question(self.family, self.build_text(rng), self.answer, self.about_held_out)


def names_held_out(attributes: dict[str, str]) -> bool:
    return ("color" in attributes and "shape" in attributes
            and vocab.is_held_out(attributes["color"], attributes["shape"]))


def definite(obj, names: tuple[str, ...]) -> NounPhrase:
    return phrase_for(attributes_of(obj, names), "the")


def target_descriptions(index: SceneIndex, obj, head_allowed: tuple[str, ...]) -> list[Callable]:
    """Builders of definite descriptions that pick out ``obj`` using only ``head_allowed``
    attributes for the object itself (a relational reference may use any attribute)."""
    builders = []
    for names in index.unique_attribute_sets(obj, head_allowed):
        builders.append(lambda rng, names=names: Description(definite(obj, names)))
    for head, relation, reference in index.relational_descriptions(obj, head_allowed):
        def build(rng, head=head, relation=relation, reference=reference):
            reference_names = pick(rng, index.unique_attribute_sets(reference))
            return Description(definite(obj, head), relation, definite(reference, reference_names))
        builders.append(build)
    return builders


def attribute_question(family: str, opening: str, index: SceneIndex, head_allowed: tuple[str, ...],
                       answer_of: Callable) -> list[Candidate]:
    candidates = []
    for obj in index.objects:
        held = vocab.is_held_out(obj.color, obj.shape)
        for describe in target_descriptions(index, obj, head_allowed):
            def build(rng, describe=describe):
                return sentence_case(f"{opening} {english_description(describe(rng))}", "?")
            candidates.append(Candidate(family, answer_of(obj), held, build))
    return candidates


def color_questions(index: SceneIndex) -> list[Candidate]:
    return attribute_question("color", "what color is", index, ("size", "shape"), lambda o: o.color)


def shape_questions(index: SceneIndex) -> list[Candidate]:
    return attribute_question("shape", "what shape is", index, ("size", "color"), lambda o: o.shape)


def attribute_filters(index: SceneIndex, novel: bool, rng: np.random.Generator) -> list[dict[str, str]]:
    """Attribute combinations to ask about: every combination present in the scene and, for
    each kind of combination, two random ones that are usually absent (held-out pairs only in
    the novel split)."""
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
    subsets = attribute_subsets()
    draws = iter(rng.random(2 * sum(len(names) for names in subsets)))
    for names in subsets:
        for _ in range(2):
            add({name: value_lists[name][int(next(draws) * len(value_lists[name]))] for name in names})
    return filters


def count_questions(index: SceneIndex, novel: bool, rng: np.random.Generator) -> list[Candidate]:
    candidates = [Candidate("count", str(len(index.objects)), False,
                            lambda rng: "How many objects are there?")]
    for attributes in attribute_filters(index, novel, rng):
        def build(rng, attributes=attributes):
            noun_phrase = english_noun_phrase(phrase_for(attributes, "bare", plural=True))
            return sentence_case(f"how many {noun_phrase} are there", "?")
        candidates.append(Candidate("count", str(len(index.matching(attributes))),
                                    names_held_out(attributes), build))
    return candidates


def existence_questions(index: SceneIndex, novel: bool, rng: np.random.Generator) -> list[Candidate]:
    candidates = []
    for attributes in attribute_filters(index, novel, rng):
        if len(attributes) == 1 and "size" in attributes:
            continue  # "is there a large object?" is nearly always yes
        def build(rng, attributes=attributes):
            return sentence_case(f"is there {english_noun_phrase(phrase_for(attributes, 'a'))}", "?")
        answer = "yes" if index.matching(attributes) else "no"
        candidates.append(Candidate("existence", answer, names_held_out(attributes), build))
    return candidates


OPPOSITE_RELATIONS: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
}


def relation_questions(index: SceneIndex) -> list[Candidate]:
    """Yes when the relation holds; no only when the opposite relation clearly holds."""
    candidates = []
    for subject, subject_sets, reference, reference_sets, held in index.describable_pairs():
        for relation in vocab.RELATIONS:
            if index.holds(subject, relation, reference):
                answer = "yes"
            elif index.holds(subject, OPPOSITE_RELATIONS[relation], reference):
                answer = "no"
            else:
                continue

            def build(rng, subject=subject, reference=reference, relation=relation,
                      subject_sets=subject_sets, reference_sets=reference_sets):
                subject_text = english_noun_phrase(definite(subject, pick(rng, subject_sets)))
                reference_text = english_noun_phrase(definite(reference, pick(rng, reference_sets)))
                return sentence_case(
                    f"is {subject_text} {vocab.RELATION_PHRASES[relation]} {reference_text}", "?")
            candidates.append(Candidate("relation", answer, held, build))
    return candidates


def candidate_questions(index: SceneIndex, family: str, novel: bool,
                        rng: np.random.Generator) -> list[Candidate]:
    if family == "color":
        return color_questions(index)
    if family == "shape":
        return shape_questions(index)
    if family == "count":
        return count_questions(index, novel, rng)
    if family == "existence":
        return existence_questions(index, novel, rng)
    if family == "relation":
        return relation_questions(index)
    raise ValueError(f"unknown question family {family!r}")


class AnswerBalancer:
    """Chooses among candidates so that each family's answers stay close to uniform."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}

    def admits(self, key: str, candidates: list, tolerance: float = 1.5) -> bool:
        """False when even the rarest answer the candidates offer is already ``tolerance``
        times more frequent (for ``key``) than the average answer: asking would skew the
        distribution further."""
        counter = self.counts.get(key, Counter())
        if not counter:
            return True
        average = sum(counter.values()) / len(counter)
        return min(counter[c.answer] for c in candidates) <= tolerance * average + 1

    def choose(self, key: str, candidates: list, rng: np.random.Generator,
               prefer: Callable | None = None):
        """Pick the rarest answer (for ``key``) among the candidates' answers, then a random
        candidate with that answer, among those satisfying ``prefer`` when there are any."""
        counter = self.counts.setdefault(key, Counter())
        answers = sorted({c.answer for c in candidates})
        lowest = min(counter[a] for a in answers)
        answer = pick(rng, [a for a in answers if counter[a] == lowest])
        counter[answer] += 1
        pool = [c for c in candidates if c.answer == answer]
        if prefer is not None:
            pool = [c for c in pool if prefer(c)] or pool
        return pick(rng, pool)


def scene_questions(index: SceneIndex, novel: bool, per_scene: int, balancer: AnswerBalancer,
                    rng: np.random.Generator) -> list[Question]:
    """Up to ``per_scene`` questions of different families about one scene. In the novel split
    questions about held-out pairs are preferred wherever the balanced answer allows one."""
    families = list(QUESTION_FAMILIES)
    rng.shuffle(families)
    prefer = (lambda c: c.about_held_out) if novel else None
    chosen: list[Question] = []
    for family in families[:per_scene]:
        candidates = candidate_questions(index, family, novel, rng)
        if candidates:
            chosen.append(balancer.choose(family, candidates, rng, prefer).realise(rng))
    return chosen
