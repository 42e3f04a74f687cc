"""The GRPO reward a verl run calls: format 0.1, accuracy 0.9, exactly as FORMATS.md says."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corpus.reward import compute_score, rouge_reward

MC = {"problem_type": "multiple choice"}
OPEN = {"problem_type": "open-ended"}

# Text that cannot close or open a tag by itself.
plain = st.text(
    alphabet=st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=40
)
letters = st.sampled_from("ABCDEFGHIJ")
whitespace = st.text(alphabet=" \t\n\r", max_size=4)
settings.register_profile("reward", deadline=None, max_examples=80)
settings.load_profile("reward")


def respond(think: str, answer: str, between: str = "\n") -> str:
    return f"<think>{think}</think>{between}<answer>{answer}</answer>"


# ---------------------------------------------------------------- worked examples


@pytest.mark.parametrize(
    ("response", "ground_truth", "expected"),
    [
        (respond("The pan tilts, so A.", "A"), "<answer>A</answer>", 1.0),
        (respond("The pan tilts, so A.", "A"), "A", 1.0),  # bare ground truth
        (respond("reasoning", " A "), "<answer> A </answer>", 1.0),  # both stripped
        (respond("reasoning", "B"), "<answer>A</answer>", 0.1),  # well formed, wrong
        ("<answer>A</answer>", "<answer>A</answer>", 0.9),  # right, no think
        (respond("reasoning", "A") + "\n", "<answer>A</answer>", 0.9),  # one trailing newline
        ("Sure! " + respond("reasoning", "A"), "<answer>A</answer>", 0.9),  # text before
        (respond("reasoning", "a"), "<answer>A</answer>", 0.1),  # case-sensitive
        (respond("reasoning", "A."), "<answer>A</answer>", 0.1),  # "A." is not "A"
        (respond("reasoning", "A. Flips the pan"), "<answer>A</answer>", 0.1),
        ("The answer is A", "<answer>A</answer>", 0.0),  # nothing to extract
        # The first <answer> counts; the full-match still accepts the whole response.
        ("<think>t</think><answer>A</answer><answer>B</answer>", "<answer>A</answer>", 1.0),
        ("<think>t</think><answer>B</answer><answer>A</answer>", "<answer>A</answer>", 0.1),
        ("<think>multi\nline\nreasoning</think>\n\n<answer>C</answer>", "C", 1.0),
    ],
)
def test_multiple_choice_worked_examples(response: str, ground_truth: str, expected: float) -> None:
    assert compute_score("videokr", response, ground_truth, MC) == expected


def test_open_ended_scores_mean_rouge_with_stemming() -> None:
    # ROUGE-1 F 2/3 (the, cat, sat of 6 words), ROUGE-2 F 4/7 (2 of 5 bigrams), ROUGE-L F 2/3.
    score = compute_score(
        "videokr", respond("r", "the cat sat"), "<answer>the cat sat on the mat</answer>", OPEN
    )
    assert score == pytest.approx(0.9 * (2 / 3 + 4 / 7 + 2 / 3) / 3 + 0.1)
    # Stemming: dogs -> dog, running/runs -> run. ROUGE-1 and ROUGE-L F 2/3, no shared bigram.
    stemmed = compute_score("videokr", respond("r", "dog runs"), "The dogs were running", OPEN)
    assert stemmed == pytest.approx(0.9 * (4 / 9) + 0.1)
    exact = compute_score(
        "videokr", respond("r", "heat browns the batter"), "heat browns the batter", OPEN
    )
    assert exact == 1.0
    assert (
        compute_score("videokr", respond("r", "cold water"), "heat browns the batter", OPEN) == 0.1
    )


def test_a_perfect_one_word_open_ended_answer_is_capped_at_two_thirds() -> None:
    # ROUGE-2 F is 0 without a bigram, so the mean of the three is 2/3: the spec's rule, kept.
    assert compute_score("videokr", respond("r", "osmosis"), "osmosis", OPEN) == pytest.approx(0.7)
    # ROUGE keeps only ASCII letters and digits: a symbol-only answer cannot be matched.
    assert compute_score("videokr", respond("r", "½ → ¼"), "½ → ¼", OPEN) == 0.1


@pytest.mark.parametrize(
    "extra_info",
    [None, {}, {"problem_type": "multiple-choice"}, {"problem_type": "yes/no"}, {"split": "train"}],
)
def test_unknown_or_missing_problem_type_scores_format_only(extra_info: dict | None) -> None:
    assert compute_score("videokr", respond("r", "A"), "<answer>A</answer>", extra_info) == 0.1
    assert compute_score("videokr", "A", "<answer>A</answer>", extra_info) == 0.0


def test_an_error_while_scoring_accuracy_keeps_the_format_score() -> None:
    # A ground truth that is not text (a broken parquet row) cannot be scored.
    assert compute_score("videokr", respond("r", "A"), None, MC) == 0.1  # type: ignore[arg-type]
    assert compute_score("videokr", respond("r", "A"), 3, OPEN) == 0.1  # type: ignore[arg-type]
    assert compute_score("videokr", None, "<answer>A</answer>", MC) == 0.0  # type: ignore[arg-type]


def test_verl_can_call_it_by_keyword() -> None:
    score = compute_score(
        data_source="videokr",
        solution_str=respond("r", "B"),
        ground_truth="<answer>B</answer>",
        extra_info={
            "problem_id": "x",
            "problem_type": "multiple choice",
            "split": "train",
            "index": 0,
        },
    )
    assert score == 1.0


# ---------------------------------------------------------------- properties


# An unknown problem type scores no accuracy, so the score is the format point alone.
FORMAT_ONLY = {"problem_type": "format only"}


@given(think=plain, answer=plain, between=whitespace)
def test_well_formed_responses_get_the_format_point(think: str, answer: str, between: str) -> None:
    assert compute_score("videokr", respond(think, answer, between), "x", FORMAT_ONLY) == 0.1


@given(think=plain, answer=plain, tail=st.text(min_size=1, max_size=5))
def test_anything_after_the_answer_loses_the_format_point(
    think: str, answer: str, tail: str
) -> None:
    response = respond(think, answer) + tail
    assert compute_score("videokr", response, "x", FORMAT_ONLY) == 0.0


@given(think=plain, answer=letters, head=st.text(min_size=1, max_size=5))
def test_anything_before_think_loses_the_format_point(think: str, answer: str, head: str) -> None:
    score = compute_score("videokr", head + respond(think, answer), answer, MC)
    assert score == 0.9


@given(think=plain, letter=letters)
def test_multiple_choice_is_case_sensitive_and_exact(think: str, letter: str) -> None:
    truth = f"<answer>{letter}</answer>"
    assert compute_score("videokr", respond(think, letter), truth, MC) == 1.0
    assert compute_score("videokr", respond(think, letter.lower()), truth, MC) == 0.1
    assert compute_score("videokr", respond(think, letter + "."), truth, MC) == 0.1
    assert compute_score("videokr", respond(think, f"({letter})"), truth, MC) == 0.1


@given(response=st.text(max_size=60), truth=st.text(max_size=20))
def test_multiple_choice_scores_only_four_values(response: str, truth: str) -> None:
    assert compute_score("videokr", response, truth, MC) in {0.0, 0.1, 0.9, 1.0}


@given(prediction=st.text(max_size=60), reference=st.text(max_size=60))
def test_rouge_is_clipped_to_the_unit_interval(prediction: str, reference: str) -> None:
    assert 0.0 <= rouge_reward(reference, prediction) <= 1.0
    score = compute_score("videokr", respond("t", prediction), reference, OPEN)
    assert 0.0 <= score <= 1.0


@given(
    words=st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8),
        min_size=2,
        max_size=8,
    )
)
def test_the_exact_open_ended_answer_scores_one(words: list[str]) -> None:
    answer = " ".join(words)
    assert compute_score("videokr", respond("t", answer), f"<answer>{answer}</answer>", OPEN) == 1.0
