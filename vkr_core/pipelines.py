"""Pipelines: what a run does with each of its items, registered by plugins.

The engine (``vkr_core.run.Run``) opens a run directory, the router, the caller, preflight
and the checkpointer; a pipeline says what one item is, which steps it calls, and how one
item goes through them (usually a LangGraph graph whose nodes call steps). Generation and
the single-frame probe are built-in pipelines; a third party's registers the same way,
through ``vkr_register_pipelines``, and runs with ``vkr run --pipeline NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from vkr_core.files import read_jsonl
from vkr_core.schemas import InputError, check_video_id

if TYPE_CHECKING:
    from vkr_core.context import RunContext


class ItemRecord(BaseModel):
    """What one item of a pipeline produced, in ``records/<item_id>.json``.

    A pipeline may write its own record type; it needs an ``id``-like key (``item_id`` or
    ``video_id``), a ``status`` and, for the run's counters, something ``accepted`` counts.
    """

    model_config = ConfigDict(extra="forbid")

    item_id: str
    status: Literal["done", "failed", "unfinished"]
    failure: str | None = None
    item: dict[str, Any] = Field(default_factory=dict)
    output: dict[str, Any] = Field(default_factory=dict)
    accepted: int = 0


@dataclass
class ItemProblem:
    """An input line that never became an item (the run records it as a failure)."""

    line: int
    item_id: str | None
    path: str | None
    reason: str


@dataclass
class Items:
    """A pipeline's inputs, read and checked before anything is paid for."""

    source: str
    items: list[Any] = field(default_factory=list)
    problems: list[ItemProblem] = field(default_factory=list)
    # Settings the inputs fix for the run (the generation pipeline's video root).
    settings: dict[str, Any] = field(default_factory=dict)


class PipelineRun:
    """One run of a pipeline: what ``Pipeline.open`` returns, holding the run's state
    (compiled graph, caches), so one registered pipeline serves any number of runs."""

    async def prepare(self, item: Any) -> None:
        """Work an item needs before its first model call, done ahead of its turn so the
        model slots never wait for it (frame decoding). Optional."""

    async def process(self, item: Any) -> BaseModel:
        """Run (or resume, or replay) one item; return its record, already on disk."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the run took (executors, caches)."""


class Pipeline:
    """A kind of run. Subclasses set ``name``, ``item_schema`` and implement ``open``.

    Lifecycle, per run: ``check(run)`` before the run directory is touched (bad settings
    fail here, before anything is written); ``open(context, checkpointer)`` once the router,
    caller and checkpointer are ready, returning a :class:`PipelineRun` whose ``prepare``
    (work ahead of the model slots, e.g. decoding) and ``process`` run per item, many at once.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # What one item is called in messages ("video").
    noun: ClassVar[str] = "item"
    # One input line of `vkr run --pipeline NAME --inputs FILE` (jsonl).
    item_schema: ClassVar[type[BaseModel]]
    # The field of item_schema that identifies an item (its thread id and record name).
    id_field: ClassVar[str] = "item_id"

    def model_steps(self, registry: Any) -> list[str]:
        """Names of the model-backed steps this pipeline calls (routed, preflighted)."""
        raise NotImplementedError

    def fixed_models(self, run: Any) -> list[Any]:
        """Models (``ModelSpec``) the pipeline calls by name instead of through the router,
        because the person running it chose them (``vkr probe --models``): preflight checks
        each and the run needs every one. Called after ``check``.

        Such calls need no eligibility, so a pipeline that routes nothing returns ``[]`` from
        ``model_steps`` and then runs with a pool that names no eligibility registry."""
        return []

    def gate_order(self, registry: Any) -> list[str]:
        """The verdict steps in the order the pipeline applies them (saved with the run)."""
        return []

    def check(self, run: Any) -> None:
        """Validate settings against the loaded plugins; raise InputError. ``run`` is the
        engine's Run before its directory is opened."""

    def snapshot(self, run: Any) -> dict[str, Any]:
        """What, besides config, pool, eligibility and step versions, makes a run directory
        incompatible with another (saved in config.json)."""
        return {}

    def item_id(self, item: Any) -> str:
        return str(getattr(item, self.id_field))

    def read_items(self, path: str | Path, config: Any) -> Items:
        """The pipeline's inputs from a jsonl file of ``item_schema`` objects."""
        return read_jsonl_items(path, self.item_schema, self.id_field)

    async def open(self, context: RunContext, checkpointer: Any) -> PipelineRun:
        raise NotImplementedError

    def failed(self, item: Any, reason: str) -> BaseModel:
        """The record of an item that failed outside the graph (the engine writes it)."""
        return ItemRecord(
            item_id=self.item_id(item),
            status="failed",
            failure=reason,
            item=item.model_dump(mode="json") if isinstance(item, BaseModel) else {},
        )

    def accepted(self, record: Any) -> int:
        """How many results a record counts toward ``--target-accepted``."""
        return accepted_in(record)

    def tally(self) -> Any:
        """A per-run accumulator with ``add(record)`` for the end-of-run summary, or None."""
        return None

    def summary(self, run_dir: Path, counters: Any) -> str:
        """The text printed at the end of ``vkr run`` (report, funnel)."""
        return ""


def read_jsonl_items(path: str | Path, schema: type[BaseModel], id_field: str) -> Items:
    """Items of ``schema`` from a jsonl file: a bad line becomes a problem with its line
    number, a repeated or unsafe id too; the other lines go on."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"inputs not found: {file}")
    items = Items(source=str(file))
    seen: set[str] = set()

    def bad_line(problem: Any) -> None:
        items.problems.append(ItemProblem(problem.line, None, None, problem.reason))

    for number, item in read_jsonl(file, schema, on_problem=bad_line):
        item_id = str(getattr(item, id_field))
        try:
            check_video_id(item_id)
        except (ValueError, InputError) as exc:
            items.problems.append(ItemProblem(number, item_id, None, str(exc)))
            continue
        if item_id in seen:
            items.problems.append(
                ItemProblem(number, item_id, None, f"{id_field} {item_id!r} appears twice")
            )
            continue
        seen.add(item_id)
        items.items.append(item)
    return items


def accepted_in(record: Any) -> int:
    """A record's ``accepted``: a list of results (generation) or a count."""
    value = getattr(record, "accepted", 0)
    return len(value) if isinstance(value, list) else int(value or 0)
