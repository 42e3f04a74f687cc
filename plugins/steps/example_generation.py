"""example_generation: frames + 3 seeds (+ knowledge point) -> one QA example with CoT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vkr_core.context import UNTRUSTED_NOTE, StepContext, fence
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import Candidate, GeneratedExample, SeedExample, SkillSpec
from vkr_core.steps import Generator, Prompt

PROMPT = Prompt(Path(__file__).parent / "prompts" / "example_generation.txt", "v1")


def format_seed(number: int, seed: SeedExample) -> str:
    lines = [f"Example {number} ({seed.subject or seed.discipline}):", f"Question: {seed.question}"]
    if seed.options:
        lines += seed.options
    lines += [f"Answer: {seed.answer}", f"Reasoning: {seed.reasoning}"]
    return "\n".join(lines)


class ExampleGeneration(Generator):
    name = "example_generation"
    modality = "vision"
    output_schema = GeneratedExample
    temperature = 0.8

    def version(self) -> str:
        return PROMPT.version

    def messages(self, ctx: StepContext, skill: SkillSpec, round: int) -> list[dict[str, Any]]:
        video = ctx.video
        seeds = ctx.seeds(skill.name, round)
        knowledge = ""
        if skill.uses_knowledge:
            kp = video.knowledge_point
            knowledge = f"Subject: {video.subject or video.discipline}\n"
            if kp:
                knowledge += (
                    f"Knowledge point: {kp.term}"
                    + (f" — {kp.definition}" if kp.definition else "")
                    + "\n"
                )
        system = PROMPT.render(
            discipline=video.discipline,
            skill=skill.name,
            skill_description=skill.description,
            guidance=skill.guidance,
            knowledge=knowledge,
            seed_count=len(seeds),
            seeds="\n\n".join(format_seed(i + 1, s) for i, s in enumerate(seeds)),
            untrusted_note=UNTRUSTED_NOTE if (video.title or video.description) else "",
        )
        intro = "Frames of the video:"
        if video.title or video.description:
            intro = (
                fence("video title", video.title)
                + "\n"
                + fence("video description", video.description)
                + "\n\n"
                + intro
            )
        content = [{"type": "text", "text": intro}, *ctx.frame_parts()]
        content.append({"type": "text", "text": f"Write one {skill.name} example as JSON."})
        return [{"role": "system", "content": system}, {"role": "user", "content": content}]

    async def generate(self, ctx: StepContext, skill: SkillSpec, round: int) -> Candidate:
        spec = ctx.choose(self.name, skill.name, round)
        messages = self.messages(ctx, skill, round)
        parsed, _ = await ctx.ask(
            self, spec, messages, sample=round, meta={"skill": skill.name, "round": round}
        )
        assert isinstance(parsed, GeneratedExample)
        return Candidate(
            example_id=f"{ctx.video.video_id}-{skill.name}-{round}",
            video_id=ctx.video.video_id,
            skill=skill.name,
            round=round,
            problem_type=parsed.problem_type,
            question=parsed.question,
            options=parsed.options,
            answer=parsed.answer.strip(),
            reasoning=parsed.reasoning,
            models={self.name: [spec.name]},
        )


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(ExampleGeneration())
