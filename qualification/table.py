"""The eligibility matrix: which model may serve which step, as the router will see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vkr_core.config import EligibilityRegistry, Pool, load_pool, load_registry
from vkr_core.plugins import VkrPluginManager, get_plugin_manager

ELIGIBLE = "✓"
FAILED = "✗"
UNSUPPORTED = "—"
NOT_PILOTED = "?"
STALE = "stale"

SCHEMA_NOTE = "schema"
LEGEND = (
    f"{ELIGIBLE} eligible   {FAILED} failed its pilot   {UNSUPPORTED} text-only model on a "
    f"vision step   {NOT_PILOTED} not piloted   {STALE} piloted on an older prompt version"
)
SCHEMA_LEGEND = (
    f"({SCHEMA_NOTE}): the pool sends this model each step's JSON schema (structured_output)"
)
ASKED_OTHERWISE = "*"
ASKED_OTHERWISE_LEGEND = (
    f"{ASKED_OTHERWISE} piloted with the response schema and the pool now sends none, or the "
    "reverse: its format failures were measured another way; pilot it again"
)


@dataclass
class EligibilityMatrix:
    steps: list[str]
    models: list[str]
    cells: dict[tuple[str, str], str]
    notes: dict[str, str]
    # model -> what the pool says about how it is asked (SCHEMA_NOTE: structured output).
    model_notes: dict[str, str] = field(default_factory=dict)

    def model_label(self, model: str) -> str:
        return model + (f" ({self.model_notes[model]})" if model in self.model_notes else "")

    def legend(self) -> str:
        lines = [LEGEND]
        if self.model_notes:
            lines.append(SCHEMA_LEGEND)
        if any(cell.endswith(ASKED_OTHERWISE) for cell in self.cells.values()):
            lines.append(ASKED_OTHERWISE_LEGEND)
        return "\n".join(lines)

    def rows(self) -> list[list[str]]:
        return [[step] + [self.cells[(step, m)] for m in self.models] for step in self.steps]

    def markdown(self) -> str:
        header = ["step", *(self.model_label(m) for m in self.models)]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + [":---:"] * len(self.models)) + "|",
        ]
        for step in self.steps:
            name = f"`{step}`" + (f" ({self.notes[step]})" if step in self.notes else "")
            lines.append(
                "| " + " | ".join([name] + [self.cells[(step, m)] for m in self.models]) + " |"
            )
        return "\n".join(lines) + "\n\n" + self.legend() + "\n"


def _cell(step: Any, spec: Any, entry: Any) -> str:
    if step is not None and step.modality == "vision" and not spec.sees_images():
        return UNSUPPORTED
    if entry is None:
        return NOT_PILOTED
    if (
        step is not None
        and entry.prompt_version is not None
        and entry.prompt_version != step.version()
    ):
        return STALE
    verdict = ELIGIBLE if entry.eligible else FAILED
    asked_with_schema = spec.structured_output and getattr(step, "structured_output", True)
    if bool(entry.structured_output) != bool(asked_with_schema):
        return verdict + ASKED_OTHERWISE
    return verdict


def eligibility_matrix(
    registry: EligibilityRegistry, pool: Pool, pm: VkrPluginManager
) -> EligibilityMatrix:
    """Steps (model-backed ones loaded, then any others the registry names) x pool models."""
    loaded = pm.registry.steps
    steps = sorted(n for n, s in loaded.items() if s.uses_model)
    extra = sorted(set(registry.steps) - set(steps))
    notes = {name: "not loaded" for name in extra}
    cells = {}
    for step_name in steps + extra:
        for spec in pool.models:
            cells[(step_name, spec.name)] = _cell(
                loaded.get(step_name), spec, registry.entry(step_name, spec.name)
            )
    model_notes = {spec.name: SCHEMA_NOTE for spec in pool.models if spec.structured_output}
    return EligibilityMatrix(steps + extra, pool.names(), cells, notes, model_notes)


def load_matrix(
    registry_path: str | Path, pool_path: str | Path, pm: VkrPluginManager | None = None
) -> EligibilityMatrix:
    return eligibility_matrix(
        load_registry(registry_path), load_pool(pool_path), pm or get_plugin_manager()
    )
