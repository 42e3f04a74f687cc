"""cot_verification: an independent model checks each key step of the trace.

Drops the example on a critical unsupported step. The checker is never the generator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plugins.steps.schemas import CoTCheck
from vkr_core.answers import question_block
from vkr_core.context import StepContext, fence, with_untrusted_note
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import Candidate, Verdict
from vkr_core.steps import Gate, Prompt, StepReply

PROMPT = Prompt(Path(__file__).parent / "prompts" / "cot_verification.txt", "v1")


class CoTVerification(Gate[CoTCheck]):
    name = "cot_verification"
    order = 30
    modality = "vision"
    prompt = PROMPT
    output_schema = CoTCheck
    selection = "exclude_generator"

    def excluded_models(self, candidate: Candidate) -> tuple[str, ...]:
        return tuple(candidate.models.get("example_generation", []))

    def format_input(self, inp: Candidate, ctx: StepContext) -> list[dict[str, Any]]:
        text = (
            question_block(inp.question, inp.options)
            + f"\nAnswer: {inp.answer}\n\nReasoning trace to check:\n{inp.reasoning}"
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
        return with_untrusted_note(PROMPT.render(), content)

    def verdict(self, candidate: Candidate, reply: StepReply[CoTCheck]) -> Verdict:
        checked = reply.output
        critical = [s for s in checked.steps if s.critical and s.support == "unsupported"]
        passed = checked.verdict == "pass" and not critical
        if critical:
            reason = "critical unsupported step: " + critical[0].step
        elif checked.verdict == "fail":
            reason = "reviewer failed the trace: " + (checked.reason or "no reason given")
        else:
            reason = "every critical step is supported"
        return Verdict(
            step=self.name,
            passed=passed,
            reason=reason,
            models=[reply.model],
            detail=checked.model_dump(),
            raw_replies=[reply.raw],
        )


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(CoTVerification())
