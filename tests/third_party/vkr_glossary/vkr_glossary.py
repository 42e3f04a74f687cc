"""A third-party pipeline that is not about video: each item is a glossary term, and one
text step asks a model which discipline the term belongs to.

It uses only the engine's public facade (``vkr_core``), the way a plugin author would:
a Step with ``format_input``/``format_output``, a Pipeline and a PipelineRun, registered
through the ``vkr`` entry point. Run it with::

    vkr run --pipeline glossary --inputs terms.jsonl --pool pool.yaml --out RUN_DIR
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vkr_core import ItemRecord, Pipeline, PipelineRun, Step, StepContext, fence, hookimpl


class Term(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str
    term: str = Field(min_length=1)
    definition: str = ""


class Discipline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer: str = Field(min_length=1)


class ClassifyTerm(Step[Term, Discipline]):
    name = "classify_term"
    modality = "text"
    prompt_version = "v1"
    output_schema = Discipline

    def format_input(self, inp: Term, ctx: StepContext) -> list[dict[str, Any]]:
        return [
            {"role": "system", "content": "Name the academic discipline of a term. Reply JSON."},
            {
                "role": "user",
                "content": fence("term", inp.term, one_line=True)
                + "\n"
                + fence("definition", inp.definition)
                + '\nReply {"answer": "<discipline>"}.',
            },
        ]


class GlossaryRun(PipelineRun):
    def __init__(self, context: Any):
        self.context = context
        self.step = context.registry.get("step", ClassifyTerm.name)

    async def process(self, item: Term) -> ItemRecord:
        ctx = StepContext(self.context, item_id=item.item_id)
        output = await ctx.run(self.step, item)
        record = ItemRecord(
            item_id=item.item_id,
            status="done",
            item=item.model_dump(),
            output=output.model_dump(),
            accepted=1,
        )
        self.context.store.write_record(record)
        return record


class GlossaryPipeline(Pipeline):
    name = "glossary"
    description = "glossary terms -> their discipline (a text step, no video)"
    noun = "term"
    item_schema = Term

    def model_steps(self, registry: Any) -> list[str]:
        return [ClassifyTerm.name]

    async def open(self, context: Any, checkpointer: Any) -> GlossaryRun:
        return GlossaryRun(context)

    def summary(self, run_dir: Any, counters: Any) -> str:
        return f"glossary: {counters.done} term(s) classified, {counters.failed} failed"


@hookimpl
def vkr_register_steps(register: Any) -> None:
    register(ClassifyTerm())


@hookimpl
def vkr_register_pipelines(register: Any) -> None:
    register(GlossaryPipeline())
