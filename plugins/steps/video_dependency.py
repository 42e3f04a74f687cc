"""video_dependency: two fixed models answer from the question + 4 random frames.

If both answer correctly the question does not need the video: drop it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from vkr_core.answers import answers_match, question_block
from vkr_core.context import StepContext
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import BlindAnswer, Candidate, Verdict
from vkr_core.steps import Gate, Prompt

PROMPT = Prompt(Path(__file__).parent / "prompts" / "video_dependency.txt", "v1")


class VideoDependency(Gate):
    name = "video_dependency"
    order = 20
    modality = "vision"
    output_schema = BlindAnswer
    selection = "all"

    def version(self) -> str:
        return PROMPT.version

    async def check(self, ctx: StepContext, candidate: Candidate) -> Verdict:
        frames = ctx.random_frames(ctx.config.dependency_frames, "dependency", candidate.example_id)
        content = [{"type": "text", "text": question_block(candidate.question, candidate.options)}]
        content += [
            {"type": "text", "text": "A few frames from the video:"},
            *ctx.frame_parts(frames),
        ]
        messages = [
            {"role": "system", "content": PROMPT.render()},
            {"role": "user", "content": content},
        ]
        answers: dict[str, str] = {}
        right: dict[str, bool] = {}
        raws = []
        specs = ctx.fixed(self.name)
        # The models answer independently: ask them at once, so the gate costs one model
        # latency, not the sum. A reply that fails to parse still rejects the candidate, and
        # the other reply is cached all the same.
        replies = await asyncio.gather(
            *(ctx.ask(self, spec, messages, meta={"skill": candidate.skill}) for spec in specs)
        )
        for spec, (parsed, raw) in zip(specs, replies, strict=True):
            assert isinstance(parsed, BlindAnswer)
            answers[spec.name] = parsed.answer
            right[spec.name] = answers_match(
                candidate.problem_type, candidate.answer, parsed.answer
            )
            raws.append(raw)
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
            raw_replies=raws,
        )


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(VideoDependency())
