"""The GRPO reward for VideoKR data, usable as a verl custom reward function.

In verl: ``custom_reward_function.path=corpus/reward.py custom_reward_function.name=compute_score``.

score = 0.9 x accuracy + 0.1 x format, where

- format is 1 when the whole response matches ``<think>.*?</think>\\s*<answer>.*?</answer>``
  (dot matches newlines), so any text before ``<think>`` or after ``</answer>``, even one
  trailing newline, scores 0;
- the answer is the text inside the first ``<answer>...</answer>``, stripped;
- accuracy for ``"multiple choice"`` is an exact, case-sensitive match of the stripped
  answers; for ``"open-ended"`` the mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measures with
  stemming, clipped to [0, 1]; any other or missing problem type, a response without an
  answer, or an error while scoring accuracy gives accuracy 0 (format is still scored).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

DATA_SOURCE = "videokr"
FORMAT_WEIGHT = 0.1
ACCURACY_WEIGHT = 0.9
MULTIPLE_CHOICE = "multiple choice"
OPEN_ENDED = "open-ended"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def format_reward(response: str) -> float:
    """1.0 when the whole response is ``<think>...</think>`` then ``<answer>...</answer>``, else 0.0."""
    return 1.0 if _FORMAT.fullmatch(response) else 0.0


def extract_answer(text: str) -> str | None:
    """The stripped text inside the first ``<answer>...</answer>``, or None when there is none."""
    match = _ANSWER.search(text)
    return match.group(1).strip() if match else None


def ground_truth_answer(ground_truth: str) -> str:
    """The reference answer: the inside of ``<answer>X</answer>``, or the bare text, stripped."""
    inner = extract_answer(ground_truth)
    return inner if inner is not None else ground_truth.strip()


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    # rouge-score pulls in nltk (about a second): load it on first use, not at import.
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


@lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=_tokenizer())


def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE scores in ``text`` (lower-cased ASCII letters and digits, stemmed).

    An answer with none (only symbols, or a non-Latin script) can never earn open-ended
    accuracy: ROUGE sees nothing to match.
    """
    return list(_tokenizer().tokenize(text))


def rouge_reward(reference: str, prediction: str) -> float:
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measures with stemming, clipped to [0, 1]."""
    scores = _scorer().score(reference, prediction)
    mean = sum(scores[name].fmeasure for name in ROUGE_TYPES) / len(ROUGE_TYPES)
    return min(1.0, max(0.0, mean))


def accuracy_reward(problem_type: Any, prediction: str | None, reference: str) -> float:
    """Accuracy of an extracted prediction against the reference answer, in [0, 1]."""
    # An example without a reference answer cannot be verified: it earns nothing.
    if prediction is None or not reference:
        return 0.0
    if problem_type == MULTIPLE_CHOICE:
        return 1.0 if prediction == reference else 0.0
    if problem_type == OPEN_ENDED:
        return rouge_reward(reference, prediction)
    return 0.0


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict[str, Any] | None = None,
) -> float:
    """The VideoKR reward of one response: 0.9 x accuracy + 0.1 x format (verl's signature).

    ``data_source`` is accepted for verl's signature and not used: rows from other sources
    routed here are scored by the same rule. ``ground_truth`` may be ``<answer>X</answer>``
    or a bare ``X``; the problem type comes from ``extra_info["problem_type"]``.
    """
    fmt = format_reward(solution_str) if isinstance(solution_str, str) else 0.0
    try:
        problem_type = extra_info.get("problem_type") if extra_info else None
        accuracy = accuracy_reward(
            problem_type, extract_answer(solution_str), ground_truth_answer(ground_truth)
        )
    except Exception:  # a reward must never crash a training step: a bad row scores 0
        accuracy = 0.0
    return ACCURACY_WEIGHT * accuracy + FORMAT_WEIGHT * fmt
