"""The built-in steps' inputs and outputs: every reply is parsed into one of these.

They belong to the steps, not to the engine: a step's output schema is part of its version
(``Step.version``), so editing one here changes the step's cache keys and marks its
eligibility entries stale.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from vkr_core.schemas import OPTION_LETTERS, EvalQuestion, Frame, ProblemType, SkillSpec, Strict

# ---------------------------------------------------------------- step inputs


class GenerationRound(Strict):
    """What example_generation works on for a video: one round of one skill."""

    skill: SkillSpec
    round: int = Field(ge=0)


class ProbeQuestion(Strict):
    """What single_frame_probe works on: an evaluation question and the one frame shown."""

    question: EvalQuestion
    frame: Frame


class JudgedAnswers(Strict):
    """What the equivalence judge works on: does ``candidate`` mean ``reference``?"""

    question: EvalQuestion
    reference: str
    candidate: str


# ---------------------------------------------------------------- step outputs


class GeneratedExample(Strict):
    """What example_generation must return."""

    problem_type: ProblemType
    question: str = Field(min_length=1)
    options: list[str] | None = None
    answer: str = Field(min_length=1)
    reasoning: str = Field(min_length=1)

    @model_validator(mode="after")
    def _options_match_type(self) -> GeneratedExample:
        if self.problem_type == "multiple choice":
            if not self.options or len(self.options) < 2:
                raise ValueError("a multiple-choice question needs at least two options")
            letters = OPTION_LETTERS[: len(self.options)]
            for letter, option in zip(letters, self.options, strict=True):
                if not option.startswith(f"{letter}."):
                    raise ValueError(f"option {option!r} must start with '{letter}.'")
            if self.answer.strip() not in letters:
                raise ValueError(
                    f"answer {self.answer!r} is not one of the option letters {letters}"
                )
        elif self.options:
            raise ValueError("an open-ended question has no options")
        return self


class SolvedAnswer(Strict):
    """A re-derived answer with its step-by-step reasoning (self_consistency, probes)."""

    reasoning: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class BlindAnswer(Strict):
    """An answer from limited visual context (video_dependency)."""

    answer: str = Field(min_length=1)


class CheckedStep(Strict):
    step: str
    support: Literal["visual", "knowledge", "unsupported"]
    critical: bool = False
    note: str = ""


class CoTCheck(Strict):
    """What cot_verification must return."""

    steps: list[CheckedStep] = Field(min_length=1)
    rules_out_alternatives: bool
    verdict: Literal["pass", "fail"]
    reason: str = ""
