"""A third-party skill with its own seed examples: reasoning about safety in a shown procedure."""

from pathlib import Path

from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import SkillSpec
from vkr_core.seeds import read_seeds

SAFETY = SkillSpec(
    name="SafetyR",
    description="Safety reasoning: spot a hazard in a demonstrated procedure and what controls it.",
    uses_knowledge=True,
    rounds=1,
    guidance=(
        "Ask about a hazard that arises in the procedure shown (heat, chemicals, sharp tools, "
        "electricity, moving parts) and the practice that controls it. The answer must rest on "
        "what the frames show and on standard safety practice of the discipline."
    ),
    # Shipped beside the module; a user's --seed-bank with SafetyR lines takes their place.
    seeds=read_seeds(Path(__file__).with_name("seeds.jsonl")),
)


@hookimpl
def vkr_register_skills(register):
    register(SAFETY)
