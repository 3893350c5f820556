"""The official VQA v2 accuracy (``vqaTools/vqaEval.py: VQAEval`` of the VQA evaluation kit, spec §4.2).

Per question, with the annotators' answers ``gt`` (ten in VQA v2) and a prediction ``p``:

* ``p`` is cleaned: newlines/tabs -> spaces, stripped, ``process_punctuation``, ``process_digit_article``;
* the ground-truth answers go through ``process_punctuation`` only, and only when the annotators
  disagree (unanimous answers are compared as they are written; the released annotation files are
  already normalised);
* accuracy = mean over the leave-one-out subsets (each annotator's answer removed in turn) of
  ``min(1, #matches among the others / 3)``: an answer given by 1, 2, 3, 4+ of 10 annotators scores
  0.3, 0.6, 0.9, 1.0.

The reported numbers are means (x100) over all questions, per answer type (``yes/no``, ``number``,
``other``) and per question type. Two quirks of the official script are kept on purpose, since they
decide the published numbers: the period rule deletes at most 32 periods (``re.UNICODE`` is passed
as the ``count`` argument of ``Pattern.sub``), and the contraction keys written with a capital
(``Im``, ``Ive``, ``Id've``) can never match the lower-cased words.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# -- normalisation tables of the official script -----------------------------------------------------
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# A period not followed by a digit (the official pattern's "(?!<=\d)" is a no-op look-ahead).
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_LIMIT = int(re.UNICODE)  # the official call passes re.UNICODE (32) where ``count`` goes
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")
MATCHES_FOR_FULL_CREDIT = 3


def process_punctuation(text: str) -> str:
    """The official punctuation rule: each mark of ``PUNCTUATION`` is deleted when it touches a space
    in the input (or the input has a comma between digits, ``1,000``), otherwise replaced by a space;
    then periods not followed by a digit are deleted (``3.5`` keeps its period)."""
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lower-case, split on whitespace, number words -> digits (``two`` -> ``2``, ``none`` -> ``0``),
    drop ``a``/``an``/``the``, restore apostrophes of contractions (``dont`` -> ``don't``), rejoin."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_prediction(answer: str) -> str:
    """What the official script compares a predicted answer as."""
    cleaned = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(cleaned))


def normalize_ground_truth(answers: Sequence[str]) -> list[str]:
    """What the official script compares annotators' answers as: punctuation rule only, and only
    when they are not all the same string."""
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return list(answers)


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy in [0, 1] of one prediction against the annotators' answers (ten in VQA v2):
    the mean over leave-one-out subsets of ``min(1, matches / 3)``."""
    if len(answers) < 2:
        raise ValueError(f"VQA accuracy needs the answers of at least two annotators (ten in VQA v2), got {list(answers)}")
    predicted = normalize_prediction(prediction)
    truth = normalize_ground_truth(answers)
    matches = sum(answer == predicted for answer in truth)
    per_subset = []
    for answer in truth:  # leave this annotator out: the others' matches are ``matches`` minus its own
        others = matches - (answer == predicted)
        per_subset.append(min(1.0, others / MATCHES_FOR_FULL_CREDIT))
    return sum(per_subset) / len(per_subset)


@dataclass(frozen=True)
class GroundTruth:
    """One question's annotation: the annotators' answers and, when known, its types."""

    answers: list[str]
    answer_type: str | None = None
    question_type: str | None = None


@dataclass
class VQAAccuracy:
    """Official accuracies in percent (not rounded; the official script rounds to two decimals)."""

    overall: float
    per_answer_type: dict[str, float] = field(default_factory=dict)
    per_question_type: dict[str, float] = field(default_factory=dict)
    per_question: dict = field(default_factory=dict)  # question_id -> accuracy in percent

    def metrics(self) -> dict[str, float]:
        """Flat metrics: ``acc`` and ``acc_<answer type>`` (``acc_yes/no``, ``acc_number``, ``acc_other``)."""
        return {"acc": self.overall, **{f"acc_{kind}": value for kind, value in self.per_answer_type.items()}}

    def to_dict(self) -> dict:
        return {"overall": self.overall, "perAnswerType": self.per_answer_type,
                "perQuestionType": self.per_question_type,
                "perQuestion": {str(k): v for k, v in self.per_question.items()}}


def vqa_accuracy(predictions: Mapping, ground_truth: Mapping[object, GroundTruth]) -> VQAAccuracy:
    """Accuracy of ``predictions`` (question_id -> answer) on the questions of ``ground_truth``
    (question_id -> ``GroundTruth``). Every annotated question must have a prediction, as the
    official evaluation requires; types that are ``None`` are left out of the per-type means."""
    if not ground_truth:
        raise ValueError("VQA accuracy: no annotated question")
    missing = [qid for qid in ground_truth if qid not in predictions]
    if missing:
        raise ValueError(f"VQA accuracy: {len(missing)} annotated question(s) have no prediction, e.g. {missing[:5]}")
    per_question = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for qid, truth in ground_truth.items():
        accuracy = question_accuracy(predictions[qid], truth.answers)
        per_question[qid] = 100.0 * accuracy
        if truth.answer_type is not None:
            by_answer_type[truth.answer_type].append(accuracy)
        if truth.question_type is not None:
            by_question_type[truth.question_type].append(accuracy)

    def mean_percent(values: list[float]) -> float:
        return 100.0 * sum(values) / len(values)

    return VQAAccuracy(
        overall=sum(per_question.values()) / len(per_question),
        per_answer_type={kind: mean_percent(v) for kind, v in sorted(by_answer_type.items())},
        per_question_type={kind: mean_percent(v) for kind, v in sorted(by_question_type.items())},
        per_question=per_question,
    )
