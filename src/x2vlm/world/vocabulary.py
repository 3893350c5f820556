"""The definition of the generated world: its shapes, colours, sizes, relations and words.

Everything that gives a word its meaning lives here, so that the generator (which turns scenes
into text) and the checker (which turns text back into claims about scenes) agree on the
language without sharing any of each other's logic.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")

#: Palette of object colours (RGB). Backgrounds are drawn from desaturated mid tones, so every
#: palette colour stays distinguishable from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 140, 25),
    "yellow": (240, 215, 35),
    "green": (40, 165, 65),
    "blue": (40, 85, 225),
    "purple": (145, 55, 195),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SIZES: tuple[str, ...] = ("small", "large")
#: Objects of an image are placed on a grid of square cells of this many pixels (positions and
#: sides are whole cells), aligned with the patches of a ViT of this patch size. A vision tower
#: trained from scratch for minutes learns the shapes of patch-aligned objects and hardly those of
#: freely placed ones: a supervised shape probe on the small preset's ViT (300 steps, batch 32)
#: reaches 98 % on objects aligned to its 16 px patches, 63 % on an 8 px grid, 29 % when free.
#: ``grid_px=1`` places objects freely (a harder world). Video clips are always free.
DEFAULT_GRID_PX = 16
#: Side of an object's (square) box as a fraction of the image side (rounded to whole grid cells;
#: a large object is at least one cell larger than a small one): at 96 px, 32 and 48 px, two and
#: three patches of the small preset. Against one and two patches (0.21 / 0.33), the demo's test
#: retrieval R@10 rose from 50.8 / 46.4 to 58.5 / 61.6, VQA from 32.5 to 36.0 and captioning BLEU-4
#: from 31.2 to 34.1 (session 8: demo runs demo_s7c and exp48 in the README), and a referring box
#: needs less precision for IoU >= 0.5 (a one-patch box tolerates only 5 px of offset).
SIZE_FRACTIONS: dict[str, float] = {"small": 0.33, "large": 0.5}
#: Objects of video frames (placed freely, not on the grid).
VIDEO_SIZE_FRACTIONS: dict[str, float] = {"small": 0.21, "large": 0.31}

#: Spatial relations. "A left of B" holds when B's centre is at least the relation margin to
#: the right of A's centre (and similarly for the other three); see ``scene.relation_holds``.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_MARGIN_FRACTION = 0.1
#: Coarse absolute locations: the image is cut into a 3 x 3 grid and an object is "in" the
#: cell that holds its centre (row-major order, see ``location_of``).
LOCATIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
    "bottom right",
)
#: An object must keep at least this fraction of its box unoccluded by boxes drawn after it.
MIN_VISIBLE_FRACTION = 0.6

#: Colour-shape pairs that never occur in the train/val/test splits; only the separate
#: ``test_novel`` split holds them, so compositional generalisation is measured on its own.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "triangle"),
    ("green", "cross"),
    ("yellow", "circle"),
)

IMAGE_SPLITS: tuple[str, ...] = ("train", "val", "test", "test_novel")
NOVEL_SPLIT = "test_novel"

# --- video -------------------------------------------------------------------------------------

EVENTS: tuple[str, ...] = ("static", "move", "appear", "disappear", "change_color")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
#: A moving object travels at least this fraction of the frame side between its first and
#: last frame; anything that "stays still" does not move at all.
MIN_MOTION_FRACTION = 0.3
MIN_FRAMES = 8
MAX_FRAMES = 16
VIDEO_FPS = 8

# --- English -----------------------------------------------------------------------------------

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "star": "stars",
    "cross": "crosses",
}
#: Nouns that name no particular shape ("a red object").
GENERIC_NOUNS: dict[str, str] = {"object": "objects", "shape": "shapes"}
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}

LOCATION_PHRASES: dict[str, dict[str, str]] = {
    "en": {
        "top left": "in the top left corner", "top": "at the top",
        "top right": "in the top right corner", "left": "on the left", "center": "in the center",
        "right": "on the right", "bottom left": "in the bottom left corner",
        "bottom": "at the bottom", "bottom right": "in the bottom right corner",
    },
    "de": {
        "top left": "oben links", "top": "oben", "top right": "oben rechts", "left": "links",
        "center": "in der Mitte", "right": "rechts", "bottom left": "unten links",
        "bottom": "unten", "bottom right": "unten rechts",
    },
    "fr": {
        "top left": "en haut à gauche", "top": "en haut", "top right": "en haut à droite",
        "left": "à gauche", "center": "au centre", "right": "à droite",
        "bottom left": "en bas à gauche", "bottom": "en bas", "bottom right": "en bas à droite",
    },
    "es": {
        "top left": "arriba a la izquierda", "top": "arriba", "top right": "arriba a la derecha",
        "left": "a la izquierda", "center": "en el centro", "right": "a la derecha",
        "bottom left": "abajo a la izquierda", "bottom": "abajo",
        "bottom right": "abajo a la derecha",
    },
}

# --- other languages (multilingual retrieval) ----------------------------------------------------

LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es")

#: German nouns: (singular, plural nominative, plural dative, gender m/f/n).
GERMAN_NOUNS: dict[str, tuple[str, str, str, str]] = {
    "circle": ("Kreis", "Kreise", "Kreisen", "m"),
    "square": ("Quadrat", "Quadrate", "Quadraten", "n"),
    "triangle": ("Dreieck", "Dreiecke", "Dreiecken", "n"),
    "diamond": ("Raute", "Rauten", "Rauten", "f"),
    "star": ("Stern", "Sterne", "Sternen", "m"),
    "cross": ("Kreuz", "Kreuze", "Kreuzen", "n"),
    "object": ("Objekt", "Objekte", "Objekten", "n"),
    "shape": ("Form", "Formen", "Formen", "f"),
}
#: German adjectives: (stem, declinable). Indeclinable ones ("lila", "orange") take no ending.
GERMAN_ADJECTIVES: dict[str, tuple[str, bool]] = {
    "red": ("rot", True),
    "orange": ("orange", False),
    "yellow": ("gelb", True),
    "green": ("grün", True),
    "blue": ("blau", True),
    "purple": ("lila", False),
    "white": ("weiß", True),
    "black": ("schwarz", True),
    "small": ("klein", True),
    "large": ("groß", True),
}
GERMAN_NUMBERS: dict[int, str] = {2: "zwei", 3: "drei", 4: "vier"}
#: Indefinite article by (gender, case).
GERMAN_ARTICLES: dict[tuple[str, str], str] = {
    ("m", "nom"): "ein", ("m", "acc"): "einen", ("m", "dat"): "einem",
    ("f", "nom"): "eine", ("f", "acc"): "eine", ("f", "dat"): "einer",
    ("n", "nom"): "ein", ("n", "acc"): "ein", ("n", "dat"): "einem",
}
#: Adjective ending after an indefinite article, by (gender, case); plural (no article) by case.
GERMAN_SINGULAR_ENDINGS: dict[tuple[str, str], str] = {
    ("m", "nom"): "er", ("m", "acc"): "en", ("m", "dat"): "en",
    ("f", "nom"): "e", ("f", "acc"): "e", ("f", "dat"): "en",
    ("n", "nom"): "es", ("n", "acc"): "es", ("n", "dat"): "en",
}
GERMAN_PLURAL_ENDINGS: dict[str, str] = {"nom": "e", "acc": "e", "dat": "en"}
GERMAN_RELATIONS: dict[str, str] = {
    "left of": "links von", "right of": "rechts von", "above": "über", "below": "unter",
}

#: French nouns: (singular, plural, gender).
FRENCH_NOUNS: dict[str, tuple[str, str, str]] = {
    "circle": ("cercle", "cercles", "m"),
    "square": ("carré", "carrés", "m"),
    "triangle": ("triangle", "triangles", "m"),
    "diamond": ("losange", "losanges", "m"),
    "star": ("étoile", "étoiles", "f"),
    "cross": ("croix", "croix", "f"),
    "object": ("objet", "objets", "m"),
    "shape": ("forme", "formes", "f"),
}
#: French adjectives: (masc. sing., fem. sing., masc. plural, fem. plural).
FRENCH_ADJECTIVES: dict[str, tuple[str, str, str, str]] = {
    "red": ("rouge", "rouge", "rouges", "rouges"),
    "orange": ("orange", "orange", "orange", "orange"),
    "yellow": ("jaune", "jaune", "jaunes", "jaunes"),
    "green": ("vert", "verte", "verts", "vertes"),
    "blue": ("bleu", "bleue", "bleus", "bleues"),
    "purple": ("violet", "violette", "violets", "violettes"),
    "white": ("blanc", "blanche", "blancs", "blanches"),
    "black": ("noir", "noire", "noirs", "noires"),
    "small": ("petit", "petite", "petits", "petites"),
    "large": ("grand", "grande", "grands", "grandes"),
}
FRENCH_NUMBERS: dict[int, str] = {2: "deux", 3: "trois", 4: "quatre"}
FRENCH_RELATIONS: dict[str, str] = {
    "left of": "à gauche de", "right of": "à droite de",
    "above": "au-dessus de", "below": "en dessous de",
}

#: Spanish nouns: (singular, plural, gender).
SPANISH_NOUNS: dict[str, tuple[str, str, str]] = {
    "circle": ("círculo", "círculos", "m"),
    "square": ("cuadrado", "cuadrados", "m"),
    "triangle": ("triángulo", "triángulos", "m"),
    "diamond": ("rombo", "rombos", "m"),
    "star": ("estrella", "estrellas", "f"),
    "cross": ("cruz", "cruces", "f"),
    "object": ("objeto", "objetos", "m"),
    "shape": ("forma", "formas", "f"),
}
SPANISH_ADJECTIVES: dict[str, tuple[str, str, str, str]] = {
    "red": ("rojo", "roja", "rojos", "rojas"),
    "orange": ("naranja", "naranja", "naranjas", "naranjas"),
    "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
    "green": ("verde", "verde", "verdes", "verdes"),
    "blue": ("azul", "azul", "azules", "azules"),
    "purple": ("morado", "morada", "morados", "moradas"),
    "white": ("blanco", "blanca", "blancos", "blancas"),
    "black": ("negro", "negra", "negros", "negras"),
    "small": ("pequeño", "pequeña", "pequeños", "pequeñas"),
    "large": ("grande", "grande", "grandes", "grandes"),
}
SPANISH_NUMBERS: dict[int, str] = {2: "dos", 3: "tres", 4: "cuatro"}
SPANISH_RELATIONS: dict[str, str] = {
    "left of": "a la izquierda de", "right of": "a la derecha de",
    "above": "encima de", "below": "debajo de",
}

#: Caption openings ("prefix" style -> text per language). German openings govern a case.
CAPTION_PREFIXES: dict[str, dict[str, str]] = {
    "none": {"en": "", "de": "", "fr": "", "es": ""},
    "there_is": {"en": "there is", "de": "es gibt", "fr": "il y a", "es": "hay"},
    "picture_of": {"en": "a picture of", "de": "ein Bild von", "fr": "une image de",
                   "es": "una imagen de"},
    "image_with": {"en": "an image with", "de": "ein Bild mit", "fr": "une image avec",
                   "es": "una imagen con"},
}
GERMAN_PREFIX_CASES: dict[str, str] = {
    "none": "nom", "there_is": "acc", "picture_of": "dat", "image_with": "dat",
}
CONJUNCTIONS: dict[str, str] = {"en": "and", "de": "und", "fr": "et", "es": "y"}


def is_held_out(color: str, shape: str) -> bool:
    """Whether a colour-shape pair is reserved for the ``test_novel`` split."""
    return (color, shape) in HELD_OUT_PAIRS


def location_of(box: tuple[int, int, int, int], image_size: int) -> str:
    """The 3 x 3 grid cell holding the centre of a box."""
    x, y, w, h = box
    column = min(2, (2 * x + w) * 3 // (2 * image_size))
    row = min(2, (2 * y + h) * 3 // (2 * image_size))
    return LOCATIONS[row * 3 + column]


def object_size_px(size: str, image_size: int, video: bool = False, grid_px: int = 1) -> int:
    """Side in pixels of an object's box of the given size class in an image (or a video frame)
    of this side, on a placement grid of ``grid_px`` pixel cells (1: free)."""
    if video:
        return max(4, round(VIDEO_SIZE_FRACTIONS[size] * image_size))
    cells_per_side = image_size / grid_px
    min_cells = (4 + grid_px - 1) // grid_px  # at least 4 px
    small_cells = max(min_cells, round(SIZE_FRACTIONS["small"] * cells_per_side))
    if size == "small":
        return small_cells * grid_px
    return max(small_cells + 1, round(SIZE_FRACTIONS[size] * cells_per_side)) * grid_px


def relation_margin_px(image_size: int) -> int:
    """Minimal centre offset (pixels) for a spatial relation to hold."""
    return max(1, round(RELATION_MARGIN_FRACTION * image_size))


def world_definition(image_size: int, video_size: int, grid_px: int = 1) -> dict:
    """The world's parameters as plain data, written to ``world/world.json`` for checkers."""
    return {
        "shapes": list(SHAPES),
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "sizes": list(SIZES),
        "relations": list(RELATIONS),
        "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
        "image_size": image_size,
        "grid_px": grid_px,
        "object_size_px": {size: object_size_px(size, image_size, grid_px=grid_px) for size in SIZES},
        "relation_margin_px": relation_margin_px(image_size),
        "min_visible_fraction": MIN_VISIBLE_FRACTION,
        "video": {
            "frame_size": video_size,
            "object_size_px": {size: object_size_px(size, video_size, video=True) for size in SIZES},
            "relation_margin_px": relation_margin_px(video_size),
            "fps": VIDEO_FPS,
            "min_frames": MIN_FRAMES,
            "max_frames": MAX_FRAMES,
            "events": list(EVENTS),
            "directions": list(DIRECTIONS),
            "min_motion_px": round(MIN_MOTION_FRACTION * video_size),
        },
        "languages": list(LANGUAGES),
        "locations": list(LOCATIONS),
        "location_rule": (
            "An object is in the cell (row, column) of a 3 x 3 grid with column = "
            "min(2, floor(3 * (2x + w) / (2 * image_size))) and row likewise with y and h; "
            "cells in row-major order are the 'locations' list."
        ),
        "relation_rule": (
            "A is 'left of' B when centre_x(B) - centre_x(A) >= relation_margin_px; 'right of' "
            "when centre_x(A) - centre_x(B) >= margin; 'above' when centre_y(B) - centre_y(A) >= "
            "margin; 'below' when centre_y(A) - centre_y(B) >= margin. Centres are x + w / 2, "
            "y + h / 2 of the [x, y, w, h] box in pixels."
        ),
    }
