"""Image captions, region phrases and referring expressions derived from a scene."""

from __future__ import annotations

import numpy as np

from x2vlm.world import vocabulary as vocab
from x2vlm.world.language import (
    Caption,
    ListCaption,
    LocatedCaption,
    NounPhrase,
    RelationCaption,
    english_caption,
    english_noun_phrase,
)
from x2vlm.world.scene import ATTRIBUTE_NAMES, SceneIndex, SceneObject, attributes_of, union_box

CAPTIONS_PER_IMAGE = 5
PREFIXES: tuple[str, ...] = ("none", "there_is", "picture_of", "image_with")


def phrase_for(attributes: dict[str, str], determiner: str = "a", count: int = 1,
               plural: bool = False) -> NounPhrase:
    return NounPhrase(shape=attributes.get("shape"), color=attributes.get("color"),
                      size=attributes.get("size"), determiner=determiner, count=count,
                      plural=plural)


def grouped_phrases(objects: tuple[SceneObject, ...], names: tuple[str, ...],
                    rng: np.random.Generator) -> tuple[NounPhrase, ...]:
    """One counted phrase per group of objects that agree on ``names`` ("two red circles")."""
    counts: dict[tuple, int] = {}
    for obj in objects:
        key = tuple(obj.attribute(name) for name in names)
        counts[key] = counts.get(key, 0) + 1
    phrases = [
        phrase_for(dict(zip(names, key)), determiner="a" if n == 1 else "count", count=n)
        for key, n in counts.items()
    ]
    order = rng.permutation(len(phrases))
    return tuple(phrases[i] for i in order)


def pick(rng: np.random.Generator, items: list):
    """A uniformly random element (one uniform draw; cheaper than ``rng.choice``)."""
    return items[int(rng.random() * len(items))]


def preferred_unique_set(index: SceneIndex, obj: SceneObject, rng: np.random.Generator,
                         allowed: tuple[str, ...] = ATTRIBUTE_NAMES) -> tuple[str, ...] | None:
    """A random attribute set that describes ``obj`` uniquely, preferring sets naming a shape."""
    sets = index.unique_attribute_sets(obj, allowed)
    if not sets:
        return None
    with_shape = [s for s in sets if "shape" in s]
    return pick(rng, with_shape or sets)


def relation_caption(index: SceneIndex, rng: np.random.Generator, prefix: str) -> RelationCaption | None:
    candidates = []
    for subject in index.objects:
        for reference in index.objects:
            for relation in vocab.RELATIONS:
                if index.holds(subject, relation, reference):
                    candidates.append((subject, relation, reference))
    rng.shuffle(candidates)
    for subject, relation, reference in candidates:
        subject_set = preferred_unique_set(index, subject, rng)
        reference_set = preferred_unique_set(index, reference, rng)
        if subject_set is not None and reference_set is not None:
            return RelationCaption(
                subject=phrase_for(attributes_of(subject, subject_set)),
                relation=relation,
                reference=phrase_for(attributes_of(reference, reference_set)),
                prefix=prefix,
            )
    return None


def located_caption(index: SceneIndex, image_size: int, rng: np.random.Generator,
                    prefix: str) -> LocatedCaption | None:
    describable = [(o, preferred_unique_set(index, o, rng)) for o in index.objects]
    describable = [(o, names) for o, names in describable if names is not None]
    if not describable:
        return None
    obj, names = pick(rng, describable)
    return LocatedCaption(phrase_for(attributes_of(obj, names)), vocab.location_of(obj.box, image_size),
                          prefix)


def with_prefix(caption: Caption, prefix: str) -> Caption:
    if isinstance(caption, ListCaption):
        return ListCaption(caption.phrases, prefix)
    if isinstance(caption, LocatedCaption):
        return LocatedCaption(caption.subject, caption.location, prefix)
    return RelationCaption(caption.subject, caption.relation, caption.reference, prefix)


def image_captions(index: SceneIndex, image_size: int, rng: np.random.Generator) -> list[Caption]:
    """Five distinct paraphrased captions. Three name every object by colour and shape (one with
    sizes too), in different orders and wordings; one states a spatial relation where one is
    clear and one says where an object is, each naming objects that are unique in the image.
    No caption is a bare summary ("two objects"): such a caption fits hundreds of other images,
    so contrastive and matching negatives drawn for it are mostly true matches."""
    objects = index.objects
    plan: list[Caption] = [
        ListCaption(grouped_phrases(objects, ("color", "shape"), rng), "none"),
        ListCaption(grouped_phrases(objects, ("size", "color", "shape"), rng),
                    pick(rng, ["there_is", "picture_of"])),
        ListCaption(grouped_phrases(objects, ("color", "shape"), rng),
                    pick(rng, ["image_with", "picture_of", "there_is"])),
    ]
    relational = relation_caption(index, rng, pick(rng, ["none", "there_is"]))
    if relational is not None:
        plan.append(relational)
    located = located_caption(index, image_size, rng, pick(rng, ["none", "there_is"]))
    if located is not None:
        plan.append(located)

    fallbacks = [ListCaption(grouped_phrases(objects, names, rng), "none")
                 for names in (("size", "color", "shape"), ("color", "shape"), ("size", "shape"),
                               ("shape",), ("color",), ("size", "color"), ())]
    chosen: list[Caption] = []
    seen: set[str] = set()
    for caption in plan + fallbacks:
        for prefix in [caption.prefix] + [p for p in PREFIXES if p != caption.prefix]:
            candidate = with_prefix(caption, prefix)
            text = english_caption(candidate)
            if text not in seen:
                seen.add(text)
                chosen.append(candidate)
                break
        if len(chosen) == CAPTIONS_PER_IMAGE:
            break
    return chosen


def definite_text(attributes: dict[str, str]) -> str:
    return english_noun_phrase(phrase_for(attributes, determiner="the"))


def region_elements(index: SceneIndex, rng: np.random.Generator) -> list[dict]:
    """Region-text ``elems``: one per object (``caption`` + ``attributes``, read as
    "attribute caption") and one per group of objects (union box)."""
    elements = []
    for obj in index.objects:
        captions = [obj.shape]
        relational = index.relational_descriptions(obj, head_allowed=("shape",))
        rng.shuffle(relational)
        for head, relation, reference in relational[:2]:
            reference_set = preferred_unique_set(index, reference, rng)
            captions.append(f"{obj.shape} {vocab.RELATION_PHRASES[relation]} "
                            f"{definite_text(attributes_of(reference, reference_set))}")
        elements.append({
            "bb": list(obj.box),
            "caption": captions,
            "attributes": [obj.color, f"{obj.size} {obj.color}", obj.size],
        })

    groups: list[tuple[list[SceneObject], list[str]]] = []
    if len(index.objects) >= 2:
        n = len(index.objects)
        groups.append((list(index.objects), [f"{vocab.NUMBER_WORDS[n]} objects", "the objects"]))
    for name in ("color", "shape"):
        values: dict[str, list[SceneObject]] = {}
        for obj in index.objects:
            values.setdefault(obj.attribute(name), []).append(obj)
        for value, members in values.items():
            if len(members) < 2:
                continue
            noun = f"{value} objects" if name == "color" else vocab.SHAPE_PLURALS[value]
            groups.append((members, [f"{vocab.NUMBER_WORDS[len(members)]} {noun}", f"the {noun}"]))
    describable = [(o, preferred_unique_set(index, o, rng)) for o in index.objects]
    describable = [(o, s) for o, s in describable if s is not None]
    if len(describable) >= 2:
        order = rng.permutation(len(describable))[:2]
        (first, first_set), (second, second_set) = describable[order[0]], describable[order[1]]
        groups.append(([first, second], [
            f"{definite_text(attributes_of(first, first_set))} and "
            f"{definite_text(attributes_of(second, second_set))}"
        ]))
    for members, captions in groups:
        elements.append({"bb": list(union_box([m.box for m in members])), "caption": captions})
    return elements


def referring_expressions(index: SceneIndex, obj: SceneObject, rng: np.random.Generator,
                          limit: int = 3) -> list[str]:
    """Up to ``limit`` distinct expressions that each pick out ``obj`` alone (RefCOCO style:
    lower case, no final punctuation)."""
    attribute_based = []
    for names in index.unique_attribute_sets(obj):
        determiner = "the" if rng.random() < 0.5 else "bare"
        attribute_based.append(english_noun_phrase(phrase_for(attributes_of(obj, names), determiner)))
    relational = []
    for head, relation, reference in index.relational_descriptions(obj, ATTRIBUTE_NAMES):
        reference_set = preferred_unique_set(index, reference, rng)
        determiner = "the" if rng.random() < 0.5 else "bare"
        head_text = english_noun_phrase(phrase_for(attributes_of(obj, head), determiner))
        relational.append(f"{head_text} {vocab.RELATION_PHRASES[relation]} "
                          f"{definite_text(attributes_of(reference, reference_set))}")
    rng.shuffle(attribute_based)
    rng.shuffle(relational)
    ordered = attribute_based[:1] + relational[:1] + attribute_based[1:] + relational[1:]
    chosen: list[str] = []
    for text in ordered:
        if text not in chosen:
            chosen.append(text)
        if len(chosen) == limit:
            break
    return chosen
