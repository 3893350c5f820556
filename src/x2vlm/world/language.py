"""Structured phrases and their surface forms in English, German, French and Spanish.

The generator builds captions, questions and expressions as small structures (noun phrases,
lists, relations) and renders them here; translation is a deterministic template rendering of the
same structure with fixed word tables (``vocabulary``), including gender, number and (for German)
case agreement.
"""

from __future__ import annotations

from dataclasses import dataclass

from x2vlm.world import vocabulary as vocab

VOWELS = "aeiouéèêàâîôû"


@dataclass(frozen=True)
class NounPhrase:
    """``determiner``: "a" (one, indefinite), "count" (a number word), "the" (definite) or
    "bare" (no determiner). ``shape`` None means the generic noun (``generic``)."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    determiner: str = "a"
    count: int = 1
    plural: bool = False
    generic: str = "object"

    @property
    def is_plural(self) -> bool:
        return self.plural or (self.determiner == "count" and self.count > 1)

    @property
    def noun_key(self) -> str:
        return self.shape if self.shape is not None else self.generic

    def attributes(self) -> dict[str, str]:
        found = {}
        if self.size is not None:
            found["size"] = self.size
        if self.color is not None:
            found["color"] = self.color
        if self.shape is not None:
            found["shape"] = self.shape
        return found


@dataclass(frozen=True)
class Description:
    """A (possibly relational) description: "the circle to the left of the blue square"."""

    head: NounPhrase
    relation: str | None = None
    reference: NounPhrase | None = None


@dataclass(frozen=True)
class ListCaption:
    phrases: tuple[NounPhrase, ...]
    prefix: str = "none"


@dataclass(frozen=True)
class RelationCaption:
    subject: NounPhrase
    relation: str
    reference: NounPhrase
    prefix: str = "none"


@dataclass(frozen=True)
class LocatedCaption:
    """One object and the grid cell it is in: "a red circle in the top left corner"."""

    subject: NounPhrase
    location: str
    prefix: str = "none"


Caption = ListCaption | RelationCaption | LocatedCaption


def caption_phrases(caption: Caption) -> tuple[NounPhrase, ...]:
    if isinstance(caption, ListCaption):
        return caption.phrases
    if isinstance(caption, RelationCaption):
        return (caption.subject, caption.reference)
    return (caption.subject,)


def sentence_case(text: str, end: str = ".") -> str:
    return text[:1].upper() + text[1:] + end


def join_list(items: list[str], conjunction: str) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


# --- English ----------------------------------------------------------------------------------


def english_noun(phrase: NounPhrase) -> str:
    if phrase.shape is not None:
        return vocab.SHAPE_PLURALS[phrase.shape] if phrase.is_plural else phrase.shape
    return vocab.GENERIC_NOUNS[phrase.generic] if phrase.is_plural else phrase.generic


def english_article(next_word: str) -> str:
    return "an" if next_word[:1] in VOWELS else "a"


def english_noun_phrase(phrase: NounPhrase) -> str:
    words = [w for w in (phrase.size, phrase.color) if w is not None] + [english_noun(phrase)]
    if phrase.determiner == "a":
        words.insert(0, english_article(words[0]))
    elif phrase.determiner == "count":
        words.insert(0, vocab.NUMBER_WORDS[phrase.count])
    elif phrase.determiner == "the":
        words.insert(0, "the")
    elif phrase.determiner != "bare":
        raise ValueError(f"unknown determiner {phrase.determiner!r}")
    return " ".join(words)


def english_description(description: Description) -> str:
    text = english_noun_phrase(description.head)
    if description.relation is not None:
        text += f" {vocab.RELATION_PHRASES[description.relation]} "
        text += english_noun_phrase(description.reference)
    return text


def english_caption(caption: Caption) -> str:
    if isinstance(caption, ListCaption):
        body = join_list([english_noun_phrase(p) for p in caption.phrases], "and")
    elif isinstance(caption, RelationCaption):
        body = (f"{english_noun_phrase(caption.subject)} "
                f"{vocab.RELATION_PHRASES[caption.relation]} "
                f"{english_noun_phrase(caption.reference)}")
    else:
        body = (f"{english_noun_phrase(caption.subject)} "
                f"{vocab.LOCATION_PHRASES['en'][caption.location]}")
    first_plural = caption_phrases(caption)[0].is_plural
    prefix = vocab.CAPTION_PREFIXES[caption.prefix]["en"]
    if caption.prefix == "there_is" and first_plural:
        prefix = "there are"
    return sentence_case(f"{prefix} {body}" if prefix else body)


# --- German -----------------------------------------------------------------------------------


def german_adjective(attribute: str, ending: str) -> str:
    stem, declinable = vocab.GERMAN_ADJECTIVES[attribute]
    return stem + ending if declinable else stem


def german_noun_phrase(phrase: NounPhrase, case: str) -> str:
    singular, plural_nom, plural_dat, gender = vocab.GERMAN_NOUNS[phrase.noun_key]
    adjectives = [a for a in (phrase.size, phrase.color) if a is not None]
    if phrase.is_plural:
        ending = vocab.GERMAN_PLURAL_ENDINGS[case]
        noun = plural_dat if case == "dat" else plural_nom
        words = [vocab.GERMAN_NUMBERS[phrase.count]]
    else:
        ending = vocab.GERMAN_SINGULAR_ENDINGS[(gender, case)]
        noun = singular
        words = [vocab.GERMAN_ARTICLES[(gender, case)]]
    words += [german_adjective(a, ending) for a in adjectives] + [noun]
    return " ".join(words)


def german_caption(caption: Caption) -> str:
    case = vocab.GERMAN_PREFIX_CASES[caption.prefix]
    if isinstance(caption, ListCaption):
        body = join_list([german_noun_phrase(p, case) for p in caption.phrases], "und")
    elif isinstance(caption, LocatedCaption):
        body = (f"{german_noun_phrase(caption.subject, case)} "
                f"{vocab.LOCATION_PHRASES['de'][caption.location]}")
    else:
        body = (f"{german_noun_phrase(caption.subject, case)} "
                f"{vocab.GERMAN_RELATIONS[caption.relation]} "
                f"{german_noun_phrase(caption.reference, 'dat')}")
    prefix = vocab.CAPTION_PREFIXES[caption.prefix]["de"]
    return sentence_case(f"{prefix} {body}" if prefix else body)


# --- French and Spanish -------------------------------------------------------------------------


def romance_adjective(table: dict, attribute: str, gender: str, plural: bool) -> str:
    masc_sing, fem_sing, masc_plural, fem_plural = table[attribute]
    if plural:
        return fem_plural if gender == "f" else masc_plural
    return fem_sing if gender == "f" else masc_sing


def french_noun_phrase(phrase: NounPhrase) -> str:
    singular, plural, gender = vocab.FRENCH_NOUNS[phrase.noun_key]
    plural_form = phrase.is_plural
    if plural_form:
        words = [vocab.FRENCH_NUMBERS[phrase.count]]
    else:
        words = ["une" if gender == "f" else "un"]
    if phrase.size is not None:  # petit / grand precede the noun
        words.append(romance_adjective(vocab.FRENCH_ADJECTIVES, phrase.size, gender, plural_form))
    words.append(plural if plural_form else singular)
    if phrase.color is not None:
        words.append(romance_adjective(vocab.FRENCH_ADJECTIVES, phrase.color, gender, plural_form))
    return " ".join(words)


def french_after_de(preposition: str, phrase_text: str) -> str:
    """Join a preposition ending in "de" with what follows, eliding "de" before a vowel."""
    if preposition.endswith("de") and phrase_text[:1] in VOWELS:
        return preposition[:-2] + "d'" + phrase_text
    return f"{preposition} {phrase_text}"


def french_caption(caption: Caption) -> str:
    prefix = vocab.CAPTION_PREFIXES[caption.prefix]["fr"]
    if isinstance(caption, ListCaption) and prefix.endswith(" de"):
        # "une image d'un cercle, d'une étoile et de deux carrés": "de" before every item
        items = [french_after_de("de", french_noun_phrase(p)) for p in caption.phrases]
        return sentence_case(f"{prefix[:-3]} {join_list(items, 'et')}")
    if isinstance(caption, ListCaption):
        body = join_list([french_noun_phrase(p) for p in caption.phrases], "et")
    elif isinstance(caption, LocatedCaption):
        body = (f"{french_noun_phrase(caption.subject)} "
                f"{vocab.LOCATION_PHRASES['fr'][caption.location]}")
    else:
        body = (f"{french_noun_phrase(caption.subject)} "
                + french_after_de(vocab.FRENCH_RELATIONS[caption.relation],
                                  french_noun_phrase(caption.reference)))
    return sentence_case(french_after_de(prefix, body) if prefix else body)


def spanish_noun_phrase(phrase: NounPhrase) -> str:
    singular, plural, gender = vocab.SPANISH_NOUNS[phrase.noun_key]
    plural_form = phrase.is_plural
    if plural_form:
        words = [vocab.SPANISH_NUMBERS[phrase.count]]
    else:
        words = ["una" if gender == "f" else "un"]
    words.append(plural if plural_form else singular)
    for attribute in (phrase.color, phrase.size):  # "un círculo rojo pequeño"
        if attribute is not None:
            words.append(romance_adjective(vocab.SPANISH_ADJECTIVES, attribute, gender, plural_form))
    return " ".join(words)


def spanish_caption(caption: Caption) -> str:
    if isinstance(caption, ListCaption):
        body = join_list([spanish_noun_phrase(p) for p in caption.phrases], "y")
    elif isinstance(caption, LocatedCaption):
        body = (f"{spanish_noun_phrase(caption.subject)} "
                f"{vocab.LOCATION_PHRASES['es'][caption.location]}")
    else:
        body = (f"{spanish_noun_phrase(caption.subject)} "
                f"{vocab.SPANISH_RELATIONS[caption.relation]} "
                f"{spanish_noun_phrase(caption.reference)}")
    prefix = vocab.CAPTION_PREFIXES[caption.prefix]["es"]
    return sentence_case(f"{prefix} {body}" if prefix else body)


CAPTION_RENDERERS = {
    "en": english_caption,
    "de": german_caption,
    "fr": french_caption,
    "es": spanish_caption,
}


def render_caption(caption: Caption, language: str = "en") -> str:
    """Surface form of a structured caption. Other languages only use "a"/"count" phrases."""
    if language != "en" and any(p.determiner not in ("a", "count") for p in caption_phrases(caption)):
        raise ValueError("translated captions use indefinite or counted noun phrases only")
    return CAPTION_RENDERERS[language](caption)
