"""The paper's three skills: VidR, KnowVid and KnowVidR, with their seed examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import SkillSpec
from vkr_core.seeds import read_seeds

# Shipped with the skills the way a third-party skill ships its own (see the README).
SEED_BANK = Path(__file__).with_name("seed_bank.jsonl")
_SEEDS = read_seeds(SEED_BANK)

SKILLS = (
    SkillSpec(
        name="VidR",
        description="Basic video reasoning: observable events, actions, spatial and temporal relations.",
        uses_knowledge=False,
        guidance=(
            "Ask about what can be observed in the video: events, actions, counts, the order of "
            "events, spatial relations, changes over time. The answer must follow from the "
            "frames alone; no outside domain knowledge may be needed."
        ),
        seeds=[s for s in _SEEDS if s.skill == "VidR"],
    ),
    SkillSpec(
        name="KnowVid",
        description="Knowledge-enhanced perception: recognise domain objects and procedures and their roles.",
        uses_knowledge=True,
        guidance=(
            "Ask the viewer to recognise a domain-specific object, apparatus, material or "
            "procedure shown in the video, or its role, using the knowledge point and subject. "
            "The question must need both the video and domain knowledge."
        ),
        seeds=[s for s in _SEEDS if s.skill == "KnowVid"],
    ),
    SkillSpec(
        name="KnowVidR",
        description="Knowledge-intensive multi-hop reasoning fusing what is seen with domain knowledge.",
        uses_knowledge=True,
        guidance=(
            "Ask a question that takes several reasoning steps, combining what happens in the "
            "video with the knowledge point (a law, principle or procedure) to explain, predict "
            "or compare. Each step must rest on visible evidence or standard domain knowledge."
        ),
        seeds=[s for s in _SEEDS if s.skill == "KnowVidR"],
    ),
)


@hookimpl
def vkr_register_skills(register: Any) -> None:
    for skill in SKILLS:
        register(skill)
