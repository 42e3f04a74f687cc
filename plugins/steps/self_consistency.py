"""self_consistency: re-solve from question + frames; keep only on a match.

The re-derived reasoning becomes the example's final trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plugins.steps.schemas import SolvedAnswer
from vkr_core.answers import answers_match, question_block
from vkr_core.context import StepContext, fence, with_untrusted_note
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import Candidate, Verdict
from vkr_core.steps import Gate, Prompt, StepReply

PROMPT = Prompt(Path(__file__).parent / "prompts" / "self_consistency.txt", "v1")


class SelfConsistency(Gate[SolvedAnswer]):
    name = "self_consistency"
    order = 10
    modality = "vision"
    prompt = PROMPT
    output_schema = SolvedAnswer

    def format_input(self, inp: Candidate, ctx: StepContext) -> list[dict[str, Any]]:
        discipline = fence("discipline", ctx.video.discipline, one_line=True)
        content: list[dict[str, Any]] = [
            {
                "type": "text",
                "text": f"The video's discipline:\n{discipline}\n\nFrames of the video:",
            },
            *ctx.frame_parts(),
        ]
        content.append({"type": "text", "text": question_block(inp.question, inp.options)})
        return with_untrusted_note(PROMPT.render(), content)

    def verdict(self, candidate: Candidate, reply: StepReply[SolvedAnswer]) -> Verdict:
        solved = reply.output
        match = answers_match(candidate.problem_type, candidate.answer, solved.answer)
        return Verdict(
            step=self.name,
            passed=match,
            reason=(
                "re-solved answer matches"
                if match
                else f"re-solved answer {solved.answer!r} differs from {candidate.answer!r}"
            ),
            models=[reply.model],
            detail={"answer": solved.answer},
            raw_replies=[reply.raw],
            revised_reasoning=solved.reasoning if match else None,
        )


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(SelfConsistency())
