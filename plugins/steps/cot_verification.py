"""cot_verification: an independent model checks each key step of the trace.

Drops the example on a critical unsupported step. The checker is never the generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vkr_core.answers import question_block
from vkr_core.context import StepContext, fence, with_untrusted_note
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import Candidate, CoTCheck, Verdict
from vkr_core.steps import Gate, Prompt

PROMPT = Prompt(Path(__file__).parent / "prompts" / "cot_verification.txt", "v1")


class CoTVerification(Gate):
    name = "cot_verification"
    order = 30
    modality = "vision"
    output_schema = CoTCheck
    selection = "exclude_generator"

    def version(self) -> str:
        return PROMPT.version

    async def check(self, ctx: StepContext, candidate: Candidate) -> Verdict:
        generators = tuple(candidate.models.get("example_generation", []))
        spec = ctx.choose(self.name, candidate.example_id, exclude=generators)
        text = (
            question_block(candidate.question, candidate.options)
            + f"\nAnswer: {candidate.answer}\n\nReasoning trace to check:\n{candidate.reasoning}"
        )
        discipline = fence("discipline", ctx.video.discipline, one_line=True)
        content: list[dict[str, Any]] = [
            {
                "type": "text",
                "text": f"The video's discipline:\n{discipline}\n\nFrames of the video:",
            },
            *ctx.frame_parts(),
        ]
        content.append({"type": "text", "text": text})
        messages = with_untrusted_note(PROMPT.render(), content)
        parsed, raw = await ctx.ask(self, spec, messages, meta={"skill": candidate.skill})
        assert isinstance(parsed, CoTCheck)
        critical = [s for s in parsed.steps if s.critical and s.support == "unsupported"]
        passed = parsed.verdict == "pass" and not critical
        if critical:
            reason = "critical unsupported step: " + critical[0].step
        elif parsed.verdict == "fail":
            reason = "reviewer failed the trace: " + (parsed.reason or "no reason given")
        else:
            reason = "every critical step is supported"
        return Verdict(
            step=self.name,
            passed=passed,
            reason=reason,
            models=[spec.name],
            detail=parsed.model_dump(),
            raw_replies=[raw],
        )


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(CoTVerification())
