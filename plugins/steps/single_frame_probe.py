"""single_frame_probe: an evaluation question + ONE random frame -> an answer.

Used by ``vkr probe`` (corpus/probe.py), not by the generation graph: it is a plain step,
neither a generator nor a gate. The step also carries the small equivalence-judge prompt
that scores open-ended answers when ``--judge`` names a model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vkr_core.answers import question_block
from vkr_core.calls import image_part
from vkr_core.context import neutralise
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import (
    OPTION_LETTERS,
    EquivalenceJudgement,
    EvalQuestion,
    Frame,
    SolvedAnswer,
)
from vkr_core.steps import Prompt, ReplyError, Step, extract_json

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


class SingleFrameProbe(Step):
    name = "single_frame_probe"
    modality = "vision"
    output_schema = SolvedAnswer
    # Each trial is one draw (its own frame and sample index); sampling rather than greedy
    # decoding keeps a lucky guess from repeating across the three trials.
    temperature = 0.7
    max_tokens = 1024
    judge_step = "judge_equivalence"

    def version(self) -> str:
        return PROMPT.version

    def judge_version(self) -> str:
        """The judge prompt's version: part of every judge call's cache key."""
        return JUDGE_PROMPT.version

    def messages(self, question: EvalQuestion, frame: Frame) -> list[dict[str, Any]]:
        """The question and its options, with the one frame (timestamp label first)."""
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

    def judge_messages(
        self, question: EvalQuestion, reference: str, candidate: str
    ) -> list[dict[str, Any]]:
        """A text-only request: does ``candidate`` mean ``reference`` for this question?"""
        text = (
            question_block(question.question, None)
            + "\n\n"
            + _tagged("reference-answer", reference)
            + "\n"
            + _tagged("candidate-answer", candidate)
        )
        return [
            {"role": "system", "content": JUDGE_PROMPT.render()},
            {"role": "user", "content": text},
        ]

    def parse_judgement(self, text: str) -> EquivalenceJudgement:
        """Parse a judge reply or raise ReplyError('malformed')."""
        try:
            return EquivalenceJudgement.model_validate(extract_json(text))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "reply"
            raise ReplyError("malformed", f"{where}: {first['msg']}", text) from None
        except ValueError as exc:
            raise ReplyError("malformed", str(exc), text) from None


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(SingleFrameProbe())
