"""Reading the world's sentences back into claims, for the independent checker.

This parser shares only the word tables of ``vocabulary`` with the generator: it tokenises a
sentence, strips known openings, finds relation / location phrases and reads every noun phrase as
an unordered bag of words (count, size, colour, shape), so word order and agreement endings do
not matter. Anything it does not understand raises ``ParseError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

from x2vlm.world import vocabulary as vocab


class ParseError(ValueError):
    """A sentence the checker's grammar does not cover."""


@dataclass(frozen=True)
class Phrase:
    """A noun phrase read as a bag: ``count`` from a number word or indefinite article (None
    without one), ``definite`` for "the", ``plural`` from the noun's form."""

    attributes: dict[str, str] = field(default_factory=dict)
    count: int | None = None
    definite: bool = False
    plural: bool = False


@dataclass(frozen=True)
class Claim:
    """A parsed caption: ``kind`` is "list" (phrases with exact counts), "relation"
    (``phrases[0]`` ``relation`` ``phrases[1]``) or "located" (``phrases[0]`` in ``location``)."""

    kind: str
    phrases: tuple[Phrase, ...]
    relation: str | None = None
    location: str | None = None


@dataclass(frozen=True)
class Lexicon:
    language: str
    words: dict[str, tuple[str, object]]  # word -> (kind, value)
    relations: tuple[tuple[tuple[str, ...], str], ...]  # token sequences, longest first
    locations: tuple[tuple[tuple[str, ...], str], ...]
    openings: tuple[tuple[str, ...], ...]
    conjunction: str


def tokenize(text: str) -> list[str]:
    """Lower case; apostrophes and hyphens split words; commas become their own token."""
    text = text.lower().replace("'", " ").replace("-", " ")
    text = re.sub(r"[.?!;:]", " ", text)
    text = text.replace(",", " , ")
    return text.split()


def _phrase_variants(language: str, phrase: str) -> list[tuple[str, ...]]:
    tokens = tuple(tokenize(phrase))
    variants = [tokens]
    if language == "fr" and tokens[-1] == "de":  # elided before a vowel: "à gauche d'un"
        variants.append(tokens[:-1] + ("d",))
    return variants


@lru_cache(maxsize=None)
def lexicon(language: str) -> Lexicon:
    words: dict[str, tuple[str, object]] = {}

    def add(word: str, kind: str, value: object) -> None:
        word = word.lower()
        if word in words and words[word] != (kind, value):
            raise AssertionError(f"ambiguous word {word!r} in {language}")
        words[word] = (kind, value)

    if language == "en":
        for article in ("a", "an"):
            add(article, "count", 1)
        add("the", "definite", True)
        for number, word in vocab.NUMBER_WORDS.items():
            add(word, "count", number)
        for size in vocab.SIZES:
            add(size, "size", size)
        for color in vocab.COLOR_NAMES:
            add(color, "color", color)
        for shape, plural in vocab.SHAPE_PLURALS.items():
            add(shape, "shape", (shape, False))
            add(plural, "shape", (shape, True))
        for generic, plural in vocab.GENERIC_NOUNS.items():
            add(generic, "generic", (generic, False))
            add(plural, "generic", (generic, True))
        relations = vocab.RELATION_PHRASES
    elif language == "de":
        for word in set(vocab.GERMAN_ARTICLES.values()):
            add(word, "count", 1)
        for number, word in vocab.GERMAN_NUMBERS.items():
            add(word, "count", number)
        endings = ("", "e", "er", "es", "en")
        for attribute, (stem, _) in vocab.GERMAN_ADJECTIVES.items():
            kind = "size" if attribute in vocab.SIZES else "color"
            for ending in endings:
                add(stem + ending, kind, attribute)
        for key, (singular, plural, plural_dative, _) in vocab.GERMAN_NOUNS.items():
            kind = "shape" if key in vocab.SHAPES else "generic"
            add(singular, kind, (key, False))
            add(plural, kind, (key, True))
            add(plural_dative, kind, (key, True))
        relations = vocab.GERMAN_RELATIONS
    elif language in ("fr", "es"):
        nouns = vocab.FRENCH_NOUNS if language == "fr" else vocab.SPANISH_NOUNS
        adjectives = vocab.FRENCH_ADJECTIVES if language == "fr" else vocab.SPANISH_ADJECTIVES
        numbers = vocab.FRENCH_NUMBERS if language == "fr" else vocab.SPANISH_NUMBERS
        for article in ("un", "une") if language == "fr" else ("un", "una"):
            add(article, "count", 1)
        for number, word in numbers.items():
            add(word, "count", number)
        for attribute, forms in adjectives.items():
            kind = "size" if attribute in vocab.SIZES else "color"
            for form in forms:
                add(form, kind, attribute)
        for key, (singular, plural, _) in nouns.items():
            kind = "shape" if key in vocab.SHAPES else "generic"
            add(singular, kind, (key, False))
            if plural != singular:
                add(plural, kind, (key, True))
            else:  # "croix": the number word decides
                words[plural.lower()] = (kind, (key, None))
        if language == "fr":  # "une image d'un cercle et de deux carrés": "de" before each item
            add("de", "filler", None)
            add("d", "filler", None)
        relations = vocab.FRENCH_RELATIONS if language == "fr" else vocab.SPANISH_RELATIONS
    else:
        raise ParseError(f"no lexicon for language {language!r}")

    relation_list = [(v, r) for r, phrase in relations.items() for v in _phrase_variants(language, phrase)]
    location_list = [(tuple(tokenize(p)), loc) for loc, p in vocab.LOCATION_PHRASES[language].items()]
    openings = []
    for texts in vocab.CAPTION_PREFIXES.values():
        if texts[language]:
            openings.extend(_phrase_variants(language, texts[language]))
    if language == "en":
        openings.append(("there", "are"))
    return Lexicon(
        language=language,
        words=words,
        relations=tuple(sorted(relation_list, key=lambda item: -len(item[0]))),
        locations=tuple(sorted(location_list, key=lambda item: -len(item[0]))),
        openings=tuple(sorted(openings, key=len, reverse=True)),
        conjunction=vocab.CONJUNCTIONS[language],
    )


def parse_phrase(tokens: list[str], lex: Lexicon) -> Phrase:
    if not tokens:
        raise ParseError("empty noun phrase")
    attributes: dict[str, str] = {}
    count = None
    definite = False
    plural = None
    noun_seen = False
    for token in tokens:
        if token not in lex.words:
            raise ParseError(f"unknown word {token!r} in {' '.join(tokens)!r}")
        kind, value = lex.words[token]
        if kind == "count":
            if count is not None:
                raise ParseError(f"two counts in {' '.join(tokens)!r}")
            count = value
        elif kind == "definite":
            definite = True
        elif kind == "filler":
            continue
        elif kind in ("size", "color"):
            if kind in attributes:
                raise ParseError(f"two {kind}s in {' '.join(tokens)!r}")
            attributes[kind] = value
        elif kind in ("shape", "generic"):
            if noun_seen:
                raise ParseError(f"two nouns in {' '.join(tokens)!r}")
            noun_seen = True
            noun, plural = value
            if kind == "shape":
                attributes["shape"] = noun
    if not noun_seen:
        raise ParseError(f"no noun in {' '.join(tokens)!r}")
    if plural is None:  # a noun whose plural looks like its singular
        plural = count is not None and count > 1
    if count is not None and (count > 1) != plural:
        raise ParseError(f"number disagreement in {' '.join(tokens)!r}")
    return Phrase(attributes=attributes, count=count, definite=definite, plural=plural)


def _find(tokens: list[str], table) -> tuple[int, int, str] | None:
    """First occurrence (start, end, value) of any token sequence of ``table``."""
    for start in range(len(tokens)):
        for sequence, value in table:
            if tuple(tokens[start:start + len(sequence)]) == sequence:
                return start, start + len(sequence), value
    return None


def split_list(tokens: list[str], lex: Lexicon) -> list[list[str]]:
    parts, current = [], []
    for token in tokens:
        if token in (",", lex.conjunction):
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    if any(not part for part in parts):
        raise ParseError(f"empty list item in {' '.join(tokens)!r}")
    return parts


def strip_opening(tokens: list[str], lex: Lexicon) -> list[str]:
    for opening in lex.openings:
        if tuple(tokens[:len(opening)]) == opening:
            return tokens[len(opening):]
    return tokens


def parse_caption(text: str, language: str = "en") -> Claim:
    """A caption: a list of counted phrases, a relation between two phrases, or a located
    phrase, after an optional opening ("there is", "ein Bild mit", ...)."""
    lex = lexicon(language)
    tokens = strip_opening(tokenize(text), lex)
    for sequence, location in lex.locations:
        if len(tokens) > len(sequence) and tuple(tokens[-len(sequence):]) == sequence:
            head = tokens[:-len(sequence)]
            if _find(head, lex.relations) is None and lex.conjunction not in head:
                return Claim("located", (parse_phrase(head, lex),), location=location)
    found = _find(tokens, lex.relations)
    if found is not None:
        start, end, relation = found
        return Claim("relation", (parse_phrase(tokens[:start], lex), parse_phrase(tokens[end:], lex)),
                     relation=relation)
    return Claim("list", tuple(parse_phrase(part, lex) for part in split_list(tokens, lex)))


@dataclass(frozen=True)
class DescriptionClaim:
    """"[the] red circle [to the left of the blue square]"."""

    head: Phrase
    relation: str | None = None
    reference: Phrase | None = None


def parse_description(text: str) -> DescriptionClaim:
    lex = lexicon("en")
    tokens = tokenize(text)
    found = _find(tokens, lex.relations)
    if found is None:
        return DescriptionClaim(parse_phrase(tokens, lex))
    start, end, relation = found
    return DescriptionClaim(parse_phrase(tokens[:start], lex), relation,
                            parse_phrase(tokens[end:], lex))


def parse_phrase_text(text: str) -> Phrase:
    return parse_phrase(tokenize(text), lexicon("en"))


def parse_phrase_list(text: str) -> list[Phrase]:
    lex = lexicon("en")
    return [parse_phrase(part, lex) for part in split_list(tokenize(text), lex)]


# --- questions, statements and video sentences ---------------------------------------------------

QUESTION_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("color", re.compile(r"^what color is (?P<description>.+)\?$")),
    ("shape", re.compile(r"^what shape is (?P<description>.+)\?$")),
    ("count", re.compile(r"^how many (?P<phrase>.+) are there\?$")),
    ("existence", re.compile(r"^is there (?P<phrase>an? .+)\?$")),
    ("relation", re.compile(r"^is (?P<description>the .+)\?$")),
)


def parse_question(text: str) -> tuple[str, object]:
    """(family, parsed content) of a VQA question."""
    lowered = text.strip().lower()
    for family, pattern in QUESTION_PATTERNS:
        match = pattern.match(lowered)
        if not match:
            continue
        if family in ("color", "shape"):
            return family, parse_description(match["description"])
        if family in ("count", "existence"):
            return family, parse_phrase_text(match["phrase"])
        description = parse_description(match["description"])
        if description.relation is None:
            raise ParseError(f"relation question without a relation: {text!r}")
        return family, description
    raise ParseError(f"unknown question form: {text!r}")


STATEMENT_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("contains", re.compile(r"^the (?P<side>left|right) image contains (?P<phrase>.+)$")),
    ("both", re.compile(r"^both images contain (?P<phrase>.+)$")),
    ("exactly_one", re.compile(r"^exactly one image contains (?P<phrase>.+)$")),
    ("neither", re.compile(r"^neither image contains (?P<phrase>.+)$")),
    ("total", re.compile(r"^the two images contain (?P<phrase>.+) in total$")),
    ("more", re.compile(r"^the left image has more objects than the right image$")),
    ("fewer", re.compile(r"^the left image has fewer objects than the right image$")),
    ("same", re.compile(r"^the two images have the same number of objects$")),
    ("vertical", re.compile(
        r"^in the (?P<side>left|right) image, (?P<subject>.+) is (?P<relation>above|below) (?P<reference>.+)$")),
)


def parse_statement(text: str) -> tuple[str, dict]:
    """(template, parts) of an NLVR2 statement."""
    lowered = text.strip().lower().rstrip(".")
    for template, pattern in STATEMENT_PATTERNS:
        match = pattern.match(lowered)
        if not match:
            continue
        parts: dict = {}
        if "side" in pattern.groupindex:
            parts["side"] = match["side"]
        if "phrase" in pattern.groupindex:
            parts["phrase"] = parse_phrase_text(match["phrase"])
        if template == "vertical":
            parts["subject"] = parse_phrase_text(match["subject"])
            parts["reference"] = parse_phrase_text(match["reference"])
            parts["relation"] = match["relation"]
        return template, parts
    raise ParseError(f"unknown statement form: {text!r}")


VIDEO_OPENINGS: tuple[str, ...] = ("in this video, ", "a clip where ")
EVENT_PATTERN = re.compile(
    r"^(?P<subject>.+?) (?P<verb>moves to the left|moves to the right|moves up|moves down|appears|"
    r"disappears|stays still|turns (?P<color>\w+))$")
MOTION_VERBS: dict[str, str] = {
    "moves to the left": "left", "moves to the right": "right", "moves up": "up", "moves down": "down",
}


def parse_video_caption(text: str) -> list[tuple[Phrase, str, str | None]]:
    """Clauses (subject, event, detail) of a clip caption; events are move (detail: direction),
    appear, disappear, still and turn (detail: colour)."""
    lowered = text.strip().lower().rstrip(".")
    for opening in VIDEO_OPENINGS:
        if lowered.startswith(opening):
            lowered = lowered[len(opening):]
            break
    clauses = re.split(r", | and | while ", lowered)
    parsed = []
    for clause in clauses:
        match = EVENT_PATTERN.match(clause)
        if not match:
            raise ParseError(f"unknown clip clause {clause!r} in {text!r}")
        subject = parse_phrase_text(match["subject"])
        verb = match["verb"]
        if verb in MOTION_VERBS:
            parsed.append((subject, "move", MOTION_VERBS[verb]))
        elif verb.startswith("turns "):
            if match["color"] not in vocab.COLORS:
                raise ParseError(f"unknown colour in {clause!r}")
            parsed.append((subject, "turn", match["color"]))
        else:
            parsed.append((subject, {"appears": "appear", "disappears": "disappear",
                                     "stays still": "still"}[verb], None))
    return parsed


VIDEO_QUESTION_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("color_change", re.compile(r"^what color does the (?P<shape>\w+) turn\?$")),
    ("direction", re.compile(r"^which way does the (?P<shape>\w+) move\?$")),
    ("appear", re.compile(r"^what appears in the video\?$")),
    ("disappear", re.compile(r"^what disappears in the video\?$")),
    ("color", re.compile(r"^what color is the (?P<shape>\w+) when it is first seen\?$")),
    ("count_end", re.compile(r"^how many objects are visible at the end\?$")),
    ("moves", re.compile(r"^does the (?P<shape>\w+) move\?$")),
)


def parse_video_question(text: str) -> tuple[str, str | None]:
    """(family, shape or None) of a clip question."""
    lowered = text.strip().lower()
    for family, pattern in VIDEO_QUESTION_PATTERNS:
        match = pattern.match(lowered)
        if match:
            shape = match["shape"] if "shape" in pattern.groupindex else None
            if shape is not None and shape not in vocab.SHAPES:
                raise ParseError(f"unknown shape {shape!r} in {text!r}")
            return family, shape
    raise ParseError(f"unknown clip question form: {text!r}")
