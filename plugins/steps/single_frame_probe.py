"""single_frame_probe: an evaluation question + ONE random frame -> an answer.

Used by the probe pipeline (graphs/probe.py, run by ``vkr probe``), not by the generation
graph: it is a plain step, neither a generator nor a gate. The step also carries the small
equivalence-judge step that scores open-ended answers when ``--judge`` names a model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from plugins.steps.schemas import JudgedAnswers, ProbeQuestion, SolvedAnswer
from vkr_core.answers import question_block
from vkr_core.calls import image_part
from vkr_core.config import ModelSpec
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

    # The probe pipeline (graphs/probe.py) calls these two: the step builds its own inputs,
    # and the engine makes, caches and records each call.

    async def answer(
        self, ctx: StepContext, question: EvalQuestion, frame: Frame, *, spec: ModelSpec, trial: int
    ) -> SolvedAnswer:
        """One trial: ``question`` with ``frame`` to ``spec``; the trial number is the sample
        index, so each trial is a draw of its own."""
        # Kept with the recorded input, for pilots sampled from a probe's folder.
        meta: dict[str, Any] = {"question_id": question.id, "dataset": question.dataset}
        skill = getattr(question, "skill", None)  # an eval file's own field, when it has one
        if isinstance(skill, str):
            meta["skill"] = skill
        meta["trial"] = trial
        inp = ProbeQuestion(question=question, frame=frame)
        return await ctx.run(self, inp, spec=spec, sample=trial, meta=meta)

    async def same_meaning(
        self, ctx: StepContext, question: EvalQuestion, candidate: str, *, spec: ModelSpec
    ) -> EquivalenceJudgement:
        """The judge ``spec`` on whether ``candidate`` means the question's own answer."""
        inp = JudgedAnswers(question=question, reference=question.answer, candidate=candidate)
        return await ctx.run(self.judge, inp, spec=spec)

    # The same requests built without a run (tests and bench/bench_probe.py use them).

    def messages(self, question: EvalQuestion, frame: Frame) -> list[dict[str, Any]]:
        return self.format_input(ProbeQuestion(question=question, frame=frame))

    def judge_messages(
        self, question: EvalQuestion, reference: str, candidate: str
    ) -> list[dict[str, Any]]:
        """A text-only request: does ``candidate`` mean ``reference`` for this question?"""
        return self.judge.format_input(
            JudgedAnswers(question=question, reference=reference, candidate=candidate)
        )


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(SingleFrameProbe())
