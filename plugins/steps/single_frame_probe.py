"""single_frame_probe: an evaluation question + ONE random frame -> an answer.

Used by ``vkr probe`` (corpus/probe.py), not by the generation graph: it is a plain step,
neither a generator nor a gate. The step also carries the small equivalence-judge prompt
that scores open-ended answers when ``--judge`` names a model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from plugins.steps.schemas import JudgedAnswers, ProbeQuestion, SolvedAnswer
from vkr_core.answers import question_block
from vkr_core.calls import image_part
from vkr_core.context import StepContext, neutralise
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import OPTION_LETTERS, EquivalenceJudgement, EvalQuestion, Frame
from vkr_core.steps import Prompt, Step

PROMPT = Prompt(Path(__file__).parent / "prompts" / "single_frame_probe.txt", "v1")
JUDGE_PROMPT = Prompt(Path(__file__).parent / "prompts" / "judge_equivalence.txt", "v1")

_HAS_LETTER = re.compile(r"^\(?[A-J][\).:]\s*")


def lettered_options(options: list[str] | None) -> list[str] | None:
    """Options as "A. ...", "B. ...": eval files from other benchmarks may leave letters out."""
    if not options:
        return None
    return [
        option if _HAS_LETTER.match(option) else f"{letter}. {option}"
        for letter, option in zip(OPTION_LETTERS, options, strict=False)
    ]


def _tagged(tag: str, text: str) -> str:
    # The candidate is another model's output: it must not be able to close its own block,
    # in any case or spelling (neutralise leaves no "<" in it at all).
    return f"<{tag}>\n{neutralise(text)}\n</{tag}>"


class EquivalenceJudge(Step[JudgedAnswers, EquivalenceJudgement]):
    """The text-only judge of open-ended probe answers (called only when ``--judge`` is set)."""

    name = "judge_equivalence"
    modality = "text"
    prompt = JUDGE_PROMPT
    output_schema = EquivalenceJudgement
    max_tokens = 256

    def format_input(
        self, inp: JudgedAnswers, ctx: StepContext | None = None
    ) -> list[dict[str, Any]]:
        text = (
            question_block(inp.question.question, None)
            + "\n\n"
            + _tagged("reference-answer", inp.reference)
            + "\n"
            + _tagged("candidate-answer", inp.candidate)
        )
        return [
            {"role": "system", "content": JUDGE_PROMPT.render()},
            {"role": "user", "content": text},
        ]


class SingleFrameProbe(Step[ProbeQuestion, SolvedAnswer]):
    name = "single_frame_probe"
    modality = "vision"
    prompt = PROMPT
    output_schema = SolvedAnswer
    # Each trial is one draw (its own frame and sample index); sampling rather than greedy
    # decoding keeps a lucky guess from repeating across the three trials.
    temperature = 0.7
    max_tokens = 1024
    judge = EquivalenceJudge()
    judge_step = judge.name

    def format_input(
        self, inp: ProbeQuestion, ctx: StepContext | None = None
    ) -> list[dict[str, Any]]:
        """The question and its options, with the one frame (timestamp label first)."""
        frame, question = inp.frame, inp.question
        content = [
            {"type": "text", "text": f"[Frame at {frame.clock}]"},
            image_part(frame),
            {
                "type": "text",
                "text": question_block(question.question, lettered_options(question.options)),
            },
        ]
        return [
            {"role": "system", "content": PROMPT.render()},
            {"role": "user", "content": content},
        ]

    # The probe runner (corpus/probe.py, ProbeStep) calls the step and its judge by these
    # names, with no step context: a probe is not a run of videos.

    def messages(self, question: EvalQuestion, frame: Frame) -> list[dict[str, Any]]:
        return self.format_input(ProbeQuestion(question=question, frame=frame))

    def judge_version(self) -> str:
        """The judge's version (prompt and output schema): part of every judge call's key."""
        return self.judge.version()

    def judge_messages(
        self, question: EvalQuestion, reference: str, candidate: str
    ) -> list[dict[str, Any]]:
        """A text-only request: does ``candidate`` mean ``reference`` for this question?"""
        return self.judge.format_input(
            JudgedAnswers(question=question, reference=reference, candidate=candidate)
        )

    def parse_judgement(self, text: str) -> EquivalenceJudgement:
        """Parse a judge reply or raise ReplyError('malformed')."""
        return self.judge.format_output(text)


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(SingleFrameProbe())
