"""The knowledge bank's text steps: lecture -> knowledge points -> scenarios -> search keywords.

Everything an expert or a model wrote before (lecture titles, objectives, terms, definitions,
scenarios) reaches the next prompt fenced as data: a bank file is edited by many hands, and
a scenario is a model's text, so neither may steer the step that reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from knowledge.schemas import (
    KnowledgePoint,
    Lecture,
    PointDrafts,
    ScenarioInput,
    Scenarios,
    SearchKeywords,
)
from vkr_core.context import StepContext, fence, with_untrusted_note
from vkr_core.hookspecs import hookimpl
from vkr_core.steps import Prompt, Step

PROMPTS = Path(__file__).parent / "prompts"


def _strata(item: Lecture | KnowledgePoint) -> dict[str, str]:
    return {"discipline": item.discipline, "subject": item.subject}


def _point_block(point: KnowledgePoint) -> str:
    return "\n".join(
        [
            "Discipline:",
            fence("discipline", point.discipline, one_line=True),
            "Subject:",
            fence("subject", point.subject, one_line=True),
            "Knowledge point:",
            fence("term", point.term, one_line=True),
            "Its definition:",
            fence("definition", point.definition),
        ]
    )


class KnowledgePoints(Step[Lecture, PointDrafts]):
    """A lecture -> the knowledge points it teaches (term + paragraph definition)."""

    name = "knowledge_points"
    modality = "text"
    prompt = Prompt(PROMPTS / "knowledge_points.txt", "v1")
    output_schema = PointDrafts
    max_tokens = 4096

    def format_input(self, inp: Lecture, ctx: StepContext) -> list[dict[str, Any]]:
        objectives = "\n".join(f"- {o}" for o in inp.objectives) or "(none given)"
        content = "\n".join(
            [
                "Discipline:",
                fence("discipline", inp.discipline, one_line=True),
                "Subject:",
                fence("subject", inp.subject, one_line=True),
                "Course:",
                fence("course", inp.course, one_line=True),
                "Lecture title:",
                fence("lecture title", inp.title, one_line=True),
                "Learning objectives:",
                fence("objectives", objectives),
            ]
        )
        assert self.prompt is not None
        return with_untrusted_note(self.prompt.render(), content)

    def strata(self, inp: Lecture) -> dict[str, str]:
        return _strata(inp)


class ScenarioGeneration(Step[KnowledgePoint, Scenarios]):
    """A knowledge point -> 1-3 real-world scenes that embody it (not lectures about it)."""

    name = "scenario_generation"
    modality = "text"
    prompt = Prompt(PROMPTS / "scenario_generation.txt", "v1")
    output_schema = Scenarios
    temperature = 0.7

    def format_input(self, inp: KnowledgePoint, ctx: StepContext) -> list[dict[str, Any]]:
        assert self.prompt is not None
        return with_untrusted_note(self.prompt.render(), _point_block(inp))

    def strata(self, inp: KnowledgePoint) -> dict[str, str]:
        return _strata(inp)


class SearchKeywordsStep(Step[ScenarioInput, SearchKeywords]):
    """A scenario of a knowledge point -> YouTube search queries for footage of it."""

    name = "search_keywords"
    modality = "text"
    prompt = Prompt(PROMPTS / "search_keywords.txt", "v1")
    output_schema = SearchKeywords

    def format_input(self, inp: ScenarioInput, ctx: StepContext) -> list[dict[str, Any]]:
        content = "\n".join(
            [_point_block(inp.point), "The scenario:", fence("scenario", inp.scenario)]
        )
        assert self.prompt is not None
        return with_untrusted_note(self.prompt.render(), content)

    def strata(self, inp: ScenarioInput) -> dict[str, str]:
        return _strata(inp.point)


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(KnowledgePoints())
    register(ScenarioGeneration())
    register(SearchKeywordsStep())
