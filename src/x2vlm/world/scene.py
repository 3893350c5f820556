"""Scenes of the generated world: objects with attributes and boxes, backgrounds, relations."""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from x2vlm.world import vocabulary as vocab

Box = tuple[int, int, int, int]  # x, y, w, h in pixels
BACKGROUND_KINDS: tuple[str, ...] = ("gradient", "stripes", "checker", "blotches", "noise")


@dataclass(frozen=True)
class Background:
    """Parameters of a textured background; ``render.render_background`` draws it."""

    kind: str
    color_a: tuple[int, int, int]
    color_b: tuple[int, int, int]
    angle_degrees: int
    period: int
    noise_sigma: float
    noise_seed: int

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "color_a": list(self.color_a),
            "color_b": list(self.color_b),
            "angle_degrees": self.angle_degrees,
            "period": self.period,
            "noise_sigma": self.noise_sigma,
            "noise_seed": self.noise_seed,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Background":
        return cls(
            kind=data["kind"],
            color_a=tuple(data["color_a"]),
            color_b=tuple(data["color_b"]),
            angle_degrees=data["angle_degrees"],
            period=data["period"],
            noise_sigma=data["noise_sigma"],
            noise_seed=data["noise_seed"],
        )


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene. ``id`` is also the drawing order (higher ids are drawn on top)."""

    id: int
    shape: str
    color: str
    size: str
    box: Box
    shade: float
    gradient_degrees: int

    def attribute(self, name: str) -> str:
        return {"shape": self.shape, "color": self.color, "size": self.size}[name]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "box": list(self.box),
            "shade": self.shade,
            "gradient_degrees": self.gradient_degrees,
        }

    @classmethod
    def from_json(cls, data: dict) -> "SceneObject":
        return cls(
            id=data["id"],
            shape=data["shape"],
            color=data["color"],
            size=data["size"],
            box=tuple(data["box"]),
            shade=data["shade"],
            gradient_degrees=data["gradient_degrees"],
        )


@dataclass(frozen=True)
class Scene:
    image_id: int
    split: str
    file_name: str  # relative to the image root
    image_size: int
    background: Background
    objects: tuple[SceneObject, ...]

    @property
    def margin(self) -> int:
        return vocab.relation_margin_px(self.image_size)

    def relation_triples(self) -> list[tuple[int, str, int]]:
        """Every (subject id, relation, object id) that holds in the scene, in a fixed order."""
        triples = []
        for subject in self.objects:
            for other in self.objects:
                if subject.id == other.id:
                    continue
                for relation in vocab.RELATIONS:
                    if relation_holds(subject.box, other.box, relation, self.margin):
                        triples.append((subject.id, relation, other.id))
        return triples

    def signature(self) -> tuple:
        """Content identity of a scene, used to keep splits disjoint."""
        return tuple(sorted((o.shape, o.color, o.size, o.box) for o in self.objects))

    def to_json(self) -> dict:
        return {
            "image_id": self.image_id,
            "split": self.split,
            "file_name": self.file_name,
            "width": self.image_size,
            "height": self.image_size,
            "background": self.background.to_json(),
            "objects": [
                dict(o.to_json(), visible_fraction=visible_fraction(self.objects, index))
                for index, o in enumerate(self.objects)
            ],
            "relations": [
                {"subject": s, "relation": r, "object": o} for s, r, o in self.relation_triples()
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> "Scene":
        return cls(
            image_id=data["image_id"],
            split=data["split"],
            file_name=data["file_name"],
            image_size=data["width"],
            background=Background.from_json(data["background"]),
            objects=tuple(SceneObject.from_json(o) for o in data["objects"]),
        )


def doubled_center(box: Box) -> tuple[int, int]:
    """Twice the centre of a box, so that centre comparisons stay in integers."""
    x, y, w, h = box
    return 2 * x + w, 2 * y + h


def relation_holds(subject: Box, reference: Box, relation: str, margin: int) -> bool:
    """Whether ``subject`` stands in ``relation`` to ``reference`` (see vocabulary)."""
    sx, sy = doubled_center(subject)
    rx, ry = doubled_center(reference)
    if relation == "left of":
        return rx - sx >= 2 * margin
    if relation == "right of":
        return sx - rx >= 2 * margin
    if relation == "above":
        return ry - sy >= 2 * margin
    if relation == "below":
        return sy - ry >= 2 * margin
    raise ValueError(f"unknown relation {relation!r}")


def union_box(boxes: list[Box]) -> Box:
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    return (x0, y0, x1 - x0, y1 - y0)


def uncovered_fraction(box: Box, boxes_on_top: list[Box]) -> float:
    """Fraction of ``box`` not covered by any of ``boxes_on_top``."""
    x, y, w, h = box
    covered = np.zeros((h, w), dtype=bool)
    for lx, ly, lw, lh in boxes_on_top:
        x0, x1 = max(x, lx), min(x + w, lx + lw)
        y0, y1 = max(y, ly), min(y + h, ly + lh)
        if x0 < x1 and y0 < y1:
            covered[y0 - y:y1 - y, x0 - x:x1 - x] = True
    return 1.0 - float(covered.mean())


def visible_fraction(objects: tuple[SceneObject, ...] | list, index: int) -> float:
    """Fraction of an object's box not covered by the boxes of objects drawn after it."""
    return round(uncovered_fraction(objects[index].box, [o.box for o in objects[index + 1:]]), 4)


def center_covered(boxes_on_top: list[Box], box: Box) -> bool:
    """Whether the centre of ``box`` lies inside one of ``boxes_on_top``."""
    cx, cy = doubled_center(box)
    for lx, ly, lw, lh in boxes_on_top:
        if 2 * lx <= cx < 2 * (lx + lw) and 2 * ly <= cy < 2 * (ly + lh):
            return True
    return False


def occlusion_ok(boxes: list[Box]) -> bool:
    """Partial occlusion is allowed, but every object keeps its centre and most of its box
    (boxes are in drawing order)."""
    return all(
        not center_covered(boxes[index + 1:], box)
        and uncovered_fraction(box, boxes[index + 1:]) >= vocab.MIN_VISIBLE_FRACTION
        for index, box in enumerate(boxes)
    )


# --- sampling ---------------------------------------------------------------------------------


def sample_background(rng: np.random.Generator, image_size: int) -> Background:
    hue = float(rng.random())
    value_a = float(rng.uniform(0.35, 0.75))
    value_b = float(np.clip(value_a + rng.choice([-1, 1]) * rng.uniform(0.1, 0.25), 0.3, 0.8))
    color_a = hsv_to_rgb(hue, float(rng.uniform(0.0, 0.3)), value_a)
    color_b = hsv_to_rgb((hue + rng.uniform(-0.15, 0.15)) % 1.0, float(rng.uniform(0.0, 0.3)),
                         value_b)
    return Background(
        kind=str(rng.choice(BACKGROUND_KINDS)),
        color_a=color_a,
        color_b=color_b,
        angle_degrees=int(rng.integers(0, 180)),
        period=int(rng.integers(max(3, image_size // 24), max(4, image_size // 6) + 1)),
        noise_sigma=round(float(rng.uniform(3.0, 10.0)), 2),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def hsv_to_rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return (round(r * 255), round(g * 255), round(b * 255))


def allowed_pair(color: str, shape: str, novel: bool) -> bool:
    """Outside the novel split no held-out pair may appear; inside it any pair may."""
    return novel or not vocab.is_held_out(color, shape)


def sample_attributes(rng: np.random.Generator, count: int, novel: bool) -> list[tuple[str, str, str]]:
    """(shape, colour, size) triples; some scenes repeat a colour or shape on purpose, so that
    counting questions and referring expressions that need more than one attribute occur."""
    while True:
        triples = []
        shared = None
        if count >= 2 and rng.random() < 0.4:
            shared_attribute = str(rng.choice(["shape", "color"]))
            shared_value = str(rng.choice(vocab.SHAPES if shared_attribute == "shape" else vocab.COLOR_NAMES))
            shared_count = int(rng.integers(2, count + 1))
            shared = (shared_attribute, shared_value, shared_count)
        for index in range(count):
            shape = str(rng.choice(vocab.SHAPES))
            color = str(rng.choice(vocab.COLOR_NAMES))
            size = str(rng.choice(vocab.SIZES))
            if shared is not None and index < shared[2]:
                if shared[0] == "shape":
                    shape = shared[1]
                else:
                    color = shared[1]
            triples.append((shape, color, size))
        if novel:
            pair_color, pair_shape = vocab.HELD_OUT_PAIRS[int(rng.integers(len(vocab.HELD_OUT_PAIRS)))]
            triples[0] = (pair_shape, pair_color, triples[0][2])
        if all(allowed_pair(color, shape, novel) for shape, color, _ in triples):
            order = rng.permutation(count)
            return [triples[i] for i in order]


def place_boxes(rng: np.random.Generator, sides: list[int], image_size: int, grid_px: int = 1,
                tries_per_object: int = 40) -> list[Box | None]:
    """Random positions inside the image on a grid of ``grid_px`` pixel cells, keeping
    ``occlusion_ok``: one box per side, None for an object that could not be placed (the first
    always fits)."""
    boxes: list[Box | None] = []
    for side in sides:
        placed = [box for box in boxes if box is not None]
        for _ in range(tries_per_object):
            x = grid_px * int(rng.integers(0, (image_size - side) // grid_px + 1))
            y = grid_px * int(rng.integers(0, (image_size - side) // grid_px + 1))
            if occlusion_ok(placed + [(x, y, side, side)]):
                boxes.append((x, y, side, side))
                break
        else:
            boxes.append(None)
    return boxes


def sample_scene(rng: np.random.Generator, image_id: int, split: str, file_name: str,
                 image_size: int, grid_px: int = 1) -> Scene:
    novel = split == vocab.NOVEL_SPLIT
    count = int(rng.integers(1, 5))
    triples = sample_attributes(rng, count, novel)

    def place(triples):
        sides = [vocab.object_size_px(size, image_size, grid_px=grid_px) for _, _, size in triples]
        return place_boxes(rng, sides, image_size, grid_px)

    boxes = place(triples)
    if novel:
        # keep the held-out object: if it was dropped, place it first and the others around it
        held = [i for i, (shape, color, _) in enumerate(triples) if vocab.is_held_out(color, shape)]
        if held and boxes[held[0]] is None:
            triples = [triples[held[0]]] + [t for i, t in enumerate(triples) if i != held[0]]
            boxes = place(triples)
    placed = [(triple, box) for triple, box in zip(triples, boxes) if box is not None]
    objects = tuple(
        SceneObject(
            id=index,
            shape=shape,
            color=color,
            size=size,
            box=box,
            shade=round(float(rng.uniform(0.88, 1.12)), 3),
            gradient_degrees=int(rng.integers(0, 360)),
        )
        for index, ((shape, color, size), box) in enumerate(placed)
    )
    return Scene(image_id=image_id, split=split, file_name=file_name, image_size=image_size,
                 background=sample_background(rng, image_size), objects=objects)


# --- querying ---------------------------------------------------------------------------------

ATTRIBUTE_NAMES: tuple[str, ...] = ("size", "color", "shape")


def attribute_subsets(allowed: tuple[str, ...] = ATTRIBUTE_NAMES, include_empty: bool = False):
    """Subsets of attribute names in a fixed order (smallest first)."""
    subsets = [()] if include_empty else []
    for k in range(1, len(allowed) + 1):
        subsets.extend(combinations(allowed, k))
    return subsets


def matches(obj: SceneObject, attributes: dict[str, str]) -> bool:
    return all(obj.attribute(name) == value for name, value in attributes.items())


def attributes_of(obj: SceneObject, names: tuple[str, ...]) -> dict[str, str]:
    return {name: obj.attribute(name) for name in names}


class SceneIndex:
    """Relation lookups and unique descriptions for one scene (or one video frame), memoised."""

    def __init__(self, objects: tuple[SceneObject, ...] | list, margin: int):
        self.objects = tuple(objects)
        self.margin = margin
        self._relations = {
            (a.id, relation, b.id)
            for a in self.objects for b in self.objects if a.id != b.id
            for relation in vocab.RELATIONS if relation_holds(a.box, b.box, relation, margin)
        }
        self._matching: dict[tuple, list[SceneObject]] = {}
        self._unique_sets: dict[tuple, list[tuple[str, ...]]] = {}
        self._relational: dict[tuple, list] = {}

    def holds(self, subject: SceneObject, relation: str, reference: SceneObject) -> bool:
        return (subject.id, relation, reference.id) in self._relations

    def matching(self, attributes: dict[str, str]) -> list[SceneObject]:
        key = tuple(sorted(attributes.items()))
        found = self._matching.get(key)
        if found is None:
            found = [o for o in self.objects if matches(o, attributes)]
            self._matching[key] = found
        return found

    def unique_attribute_sets(self, obj: SceneObject,
                              allowed: tuple[str, ...] = ATTRIBUTE_NAMES) -> list[tuple[str, ...]]:
        """Attribute-name subsets (of ``allowed``) whose values pick out ``obj`` alone."""
        key = (obj.id, allowed)
        if key not in self._unique_sets:
            self._unique_sets[key] = [
                names for names in attribute_subsets(allowed)
                if len(self.matching(attributes_of(obj, names))) == 1
            ]
        return self._unique_sets[key]

    def describable_pairs(self):
        """Ordered pairs of distinct objects that both have a unique description:
        ``(subject, subject_sets, reference, reference_sets, held_out)``, where ``held_out`` says
        whether either object is a held-out colour-shape pair."""
        for subject in self.objects:
            subject_sets = self.unique_attribute_sets(subject)
            for reference in self.objects:
                reference_sets = self.unique_attribute_sets(reference)
                if subject.id == reference.id or not subject_sets or not reference_sets:
                    continue
                held = (vocab.is_held_out(subject.color, subject.shape)
                        or vocab.is_held_out(reference.color, reference.shape))
                yield subject, subject_sets, reference, reference_sets, held

    def relational_descriptions(self, obj: SceneObject, head_allowed: tuple[str, ...]):
        """(head attribute names, relation, reference object) such that exactly ``obj``
        matches the head attributes and stands in the relation to the reference, and the
        reference can itself be described uniquely."""
        key = (obj.id, head_allowed)
        if key in self._relational:
            return list(self._relational[key])
        found = []
        for relation in vocab.RELATIONS:
            for reference in self.objects:
                if not self.holds(obj, relation, reference):
                    continue
                if not self.unique_attribute_sets(reference):
                    continue
                for head in attribute_subsets(head_allowed, include_empty=True):
                    selected = [o for o in self.matching(attributes_of(obj, head))
                                if self.holds(o, relation, reference)]
                    if len(selected) == 1:
                        found.append((head, relation, reference))
                        break
        self._relational[key] = found
        return list(found)
