"""Comparing answers: option letters for multiple choice, normalised text for open-ended.

Open-ended comparison (documented in the README): both answers are lower-cased, stripped of
punctuation and of the articles a/an/the, and whitespace is collapsed; they match when the
normalised strings are equal or their token F1 is at least 0.8.
"""

from __future__ import annotations

import re
import string

from vkr_core.schemas import OPTION_LETTERS

_LETTER = re.compile(r"^\(?([A-J])(?:[\).:\s]|$)")
_ARTICLES = {"a", "an", "the"}
OPEN_ENDED_F1 = 0.8
_PUNCTUATION_TO_SPACE = str.maketrans(string.punctuation, " " * len(string.punctuation))


def option_letter(answer: str) -> str | None:
    """The option letter an answer names: "B", "B.", "(B)", "B. text" -> "B"."""
    text = answer.strip()
    match = _LETTER.match(text)
    if match:
        return match.group(1)
    upper = text.upper()
    if len(upper) == 1 and upper in OPTION_LETTERS:
        return upper
    return None


def normalise(text: str) -> list[str]:
    text = text.lower().translate(_PUNCTUATION_TO_SPACE)
    return [t for t in text.split() if t not in _ARTICLES]


def token_f1(a: list[str], b: list[str]) -> float:
    if not a or not b:
        return 0.0
    common = 0
    remaining = list(b)
    for token in a:
        if token in remaining:
            remaining.remove(token)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def answers_match(problem_type: str, expected: str, given: str) -> bool:
    """Whether ``given`` gives the same answer as ``expected`` for this problem type."""
    if problem_type == "multiple choice":
        want = option_letter(expected)
        return want is not None and option_letter(given) == want
    a, b = normalise(expected), normalise(given)
    return bool(a) and (a == b or token_f1(a, b) >= OPEN_ENDED_F1)


def question_block(question: str, options: list[str] | None) -> str:
    """The question as shown to answering models."""
    if options:
        return "Question: " + question + "\nOptions:\n" + "\n".join(options)
    return "Question (open-ended): " + question
