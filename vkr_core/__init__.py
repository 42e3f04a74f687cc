"""vkr's engine. What a plugin imports comes from here::

    from vkr_core import hookimpl, Step, Gate, Pipeline, PipelineRun, StepContext

Names are resolved on first use, so ``import vkr_core`` stays cheap (the CLI imports it at
every start) and a plugin does not pay for parts it never touches.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> module that defines it: the public contract of the engine.
_PUBLIC = {
    "hookimpl": "vkr_core.hookspecs",
    "hookspec": "vkr_core.hookspecs",
    "Step": "vkr_core.steps",
    "Gate": "vkr_core.steps",
    "Generator": "vkr_core.steps",
    "Prompt": "vkr_core.steps",
    "ReplyError": "vkr_core.steps",
    "StepReply": "vkr_core.steps",
    "Pipeline": "vkr_core.pipelines",
    "PipelineRun": "vkr_core.pipelines",
    "ItemRecord": "vkr_core.pipelines",
    "Items": "vkr_core.pipelines",
    "ItemProblem": "vkr_core.pipelines",
    "StepContext": "vkr_core.context",
    "RunContext": "vkr_core.context",
    "fence": "vkr_core.context",
    "with_untrusted_note": "vkr_core.context",
    "Run": "vkr_core.run",
    "RunConfig": "vkr_core.config",
    "ModelSpec": "vkr_core.config",
    "SkillSpec": "vkr_core.schemas",
    "Video": "vkr_core.schemas",
    "Frame": "vkr_core.schemas",
    "Candidate": "vkr_core.schemas",
    "Verdict": "vkr_core.schemas",
    "VideoRecord": "vkr_core.schemas",
    "VkrError": "vkr_core.schemas",
    "InputError": "vkr_core.schemas",
}

__all__ = [
    "Candidate",
    "Frame",
    "Gate",
    "Generator",
    "InputError",
    "ItemProblem",
    "ItemRecord",
    "Items",
    "ModelSpec",
    "Pipeline",
    "PipelineRun",
    "Prompt",
    "ReplyError",
    "Run",
    "RunConfig",
    "RunContext",
    "SkillSpec",
    "Step",
    "StepReply",
    "StepContext",
    "Verdict",
    "Video",
    "VideoRecord",
    "VkrError",
    "fence",
    "hookimpl",
    "hookspec",
    "with_untrusted_note",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'vkr_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:
    from vkr_core.config import ModelSpec, RunConfig
    from vkr_core.context import RunContext, StepContext, fence, with_untrusted_note
    from vkr_core.hookspecs import hookimpl, hookspec
    from vkr_core.pipelines import ItemProblem, ItemRecord, Items, Pipeline, PipelineRun
    from vkr_core.run import Run
    from vkr_core.schemas import (
        Candidate,
        Frame,
        InputError,
        SkillSpec,
        Verdict,
        Video,
        VideoRecord,
        VkrError,
    )
    from vkr_core.steps import Gate, Generator, Prompt, ReplyError, Step, StepReply
