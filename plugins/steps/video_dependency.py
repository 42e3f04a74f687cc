"""video_dependency: two fixed models answer from the question + 4 random frames.

If both answer correctly the question does not need the video: drop it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from plugins.steps.schemas import BlindAnswer
from vkr_core.answers import answers_match, question_block
from vkr_core.context import StepContext
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import Candidate, Frame, Verdict
from vkr_core.steps import Gate, Prompt

PROMPT = Prompt(Path(__file__).parent / "prompts" / "video_dependency.txt", "v1")


class VideoDependency(Gate[BlindAnswer]):
    name = "video_dependency"
    order = 20
    modality = "vision"
    prompt = PROMPT
    output_schema = BlindAnswer
    selection = "all"

    def shown_frames(self, ctx: StepContext, candidate: Candidate) -> list[Frame]:
        """The few frames the models see: the same ones for both, and on every rerun."""
        return ctx.random_frames(ctx.config.dependency_frames, "dependency", candidate.example_id)

    def format_input(self, inp: Candidate, ctx: StepContext) -> list[dict[str, Any]]:
        content = [{"type": "text", "text": question_block(inp.question, inp.options)}]
        content += [
            {"type": "text", "text": "A few frames from the video:"},
            *ctx.frame_parts(self.shown_frames(ctx, inp)),
        ]
        return [
            {"role": "system", "content": PROMPT.render()},
            {"role": "user", "content": content},
        ]

    async def check(self, ctx: StepContext, candidate: Candidate) -> Verdict:
        specs = ctx.fixed(self.name)
        # The models answer independently: ask them at once, so the gate costs one model
        # latency, not the sum. A reply that fails to parse still rejects the candidate, and
        # the other reply is cached all the same.
        replies = await asyncio.gather(
            *(
                ctx.call(self, candidate, spec=spec, meta={"skill": candidate.skill})
                for spec in specs
            )
        )
        answers: dict[str, str] = {}
        right: dict[str, bool] = {}
        for reply in replies:
            answers[reply.model] = reply.output.answer
            right[reply.model] = answers_match(
                candidate.problem_type, candidate.answer, reply.output.answer
            )
        frames = self.shown_frames(ctx, candidate)
        all_right = all(right.values())
        return Verdict(
            step=self.name,
            passed=not all_right,
            reason=(
                "answerable without the video: every model was right from the question and "
                f"{len(frames)} frames"
                if all_right
                else "needs the video: "
                + ", ".join(m for m, ok in right.items() if not ok)
                + " wrong"
            ),
            models=list(answers),
            detail={"answers": answers, "correct": right, "frames": [f.timestamp for f in frames]},
            raw_replies=[reply.raw for reply in replies],
        )


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(VideoDependency())
