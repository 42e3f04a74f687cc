"""self_consistency: re-solve from question + frames; keep only on a match.

The re-derived reasoning becomes the example's final trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vkr_core.answers import answers_match, question_block
from vkr_core.context import StepContext, fence, with_untrusted_note
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import Candidate, SolvedAnswer, Verdict
from vkr_core.steps import Gate, Prompt

PROMPT = Prompt(Path(__file__).parent / "prompts" / "self_consistency.txt", "v1")


class SelfConsistency(Gate):
    name = "self_consistency"
    order = 10
    modality = "vision"
    output_schema = SolvedAnswer

    def version(self) -> str:
        return PROMPT.version

    async def check(self, ctx: StepContext, candidate: Candidate) -> Verdict:
        spec = ctx.choose(self.name, candidate.example_id)
        discipline = fence("discipline", ctx.video.discipline, one_line=True)
        content: list[dict[str, Any]] = [
            {
                "type": "text",
                "text": f"The video's discipline:\n{discipline}\n\nFrames of the video:",
            },
            *ctx.frame_parts(),
        ]
        content.append(
            {"type": "text", "text": question_block(candidate.question, candidate.options)}
        )
        messages = with_untrusted_note(PROMPT.render(), content)
        parsed, raw = await ctx.ask(self, spec, messages, meta={"skill": candidate.skill})
        assert isinstance(parsed, SolvedAnswer)
        match = answers_match(candidate.problem_type, candidate.answer, parsed.answer)
        return Verdict(
            step=self.name,
            passed=match,
            reason=(
                "re-solved answer matches"
                if match
                else f"re-solved answer {parsed.answer!r} differs from {candidate.answer!r}"
            ),
            models=[spec.name],
            detail={"answer": parsed.answer},
            raw_replies=[raw],
            revised_reasoning=parsed.reasoning if match else None,
        )


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(SelfConsistency())
