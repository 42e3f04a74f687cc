"""example_generation: frames + 3 seeds (+ knowledge point) -> one QA example with CoT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plugins.steps.schemas import GeneratedExample, GenerationRound
from vkr_core.context import StepContext, fence, with_untrusted_note
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import Candidate, SeedExample, SkillSpec, Video
from vkr_core.steps import Generator, Prompt

PROMPT = Prompt(Path(__file__).parent / "prompts" / "example_generation.txt", "v1")


def format_seed(number: int, seed: SeedExample) -> str:
    lines = [f"Example {number} ({seed.subject or seed.discipline}):", f"Question: {seed.question}"]
    if seed.options:
        lines += seed.options
    lines += [f"Answer: {seed.answer}", f"Reasoning: {seed.reasoning}"]
    return "\n".join(lines)


def metadata_fences(video: Video, with_knowledge: bool) -> list[str]:
    """Every metadata field the generator sees, each in its own fence (all are untrusted)."""
    cut = video.truncated
    blocks = [fence("discipline", video.discipline, one_line=True)]
    if with_knowledge:
        if video.subject:
            blocks.append(
                fence("subject", video.subject, original_length=cut.get("subject"), one_line=True)
            )
        point = video.knowledge_point
        if point:
            blocks.append(
                fence(
                    "knowledge point",
                    point.term,
                    original_length=cut.get("knowledge_point.term"),
                    one_line=True,
                )
            )
            if point.definition:
                blocks.append(
                    fence(
                        "knowledge point definition",
                        point.definition,
                        original_length=cut.get("knowledge_point.definition"),
                    )
                )
    if video.title:
        blocks.append(
            fence("video title", video.title, original_length=cut.get("title"), one_line=True)
        )
    if video.description:
        blocks.append(
            fence("video description", video.description, original_length=cut.get("description"))
        )
    return blocks


class ExampleGeneration(Generator[GenerationRound, GeneratedExample]):
    name = "example_generation"
    modality = "vision"
    prompt = PROMPT
    output_schema = GeneratedExample
    temperature = 0.8

    def format_input(self, inp: GenerationRound, ctx: StepContext) -> list[dict[str, Any]]:
        video, skill = ctx.video, inp.skill
        seeds = ctx.seeds(skill.name, inp.round)
        system = PROMPT.render(
            skill=skill.name,
            skill_description=skill.description,
            guidance=skill.guidance,
            seed_count=len(seeds),
            seeds="\n\n".join(format_seed(i + 1, s) for i, s in enumerate(seeds)),
        )
        intro = "About the video, as given with it:\n" + "\n".join(
            metadata_fences(video, with_knowledge=skill.uses_knowledge)
        )
        content = [{"type": "text", "text": intro + "\n\nFrames of the video:"}]
        content += ctx.frame_parts()
        content.append({"type": "text", "text": f"Write one {skill.name} example as JSON."})
        return with_untrusted_note(system, content)

    async def generate(self, ctx: StepContext, skill: SkillSpec, round: int) -> Candidate:
        reply = await ctx.call(
            self,
            GenerationRound(skill=skill, round=round),
            skill.name,
            round,
            sample=round,
            meta={"skill": skill.name, "round": round},
        )
        parsed = reply.output
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
            models={self.name: [reply.model]},
        )


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(ExampleGeneration())
