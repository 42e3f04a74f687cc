"""The extension contract: every skill, step, provider, source, exporter and reader enters here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("vkr")
hookimpl = pluggy.HookimplMarker("vkr")


@hookspec
def vkr_register_skills(register: Callable[[Any], None]) -> None:
    """Register skills: call ``register(SkillSpec(...))`` once per skill.

    :param register: takes a :class:`vkr_core.schemas.SkillSpec`.
    """


@hookspec
def vkr_register_steps(register: Callable[[Any], None]) -> None:
    """Register steps and gates: call ``register(step)`` with a :class:`vkr_core.steps.Step` instance.

    Gates (steps returning a Verdict) run in ascending ``order`` after example generation.

    :param register: takes a :class:`vkr_core.steps.Step` instance.
    """


@hookspec
def vkr_register_pipelines(register: Callable[[Any], None]) -> None:
    """Register pipelines: call ``register(pipeline)`` with a :class:`vkr_core.pipelines.Pipeline`.

    ``vkr run --pipeline NAME`` runs one; generation is the default.

    :param register: takes a pipeline instance, looked up by its ``name``.
    """


@hookspec
def vkr_register_backends(register: Callable[[Any], None]) -> None:
    """Register backends for the run's seams: call ``register(backend)`` with a
    :class:`vkr_core.backends.Backend` (a checkpointer, a call cache, an item status or an
    executor).

    A run picks one of each by name (``RunConfig.checkpointer``, ``call_cache``,
    ``executor``); the embedded SQLite, diskcache, no-status and local asyncio ones are the
    defaults. With ``RunConfig.state`` (a URL), the checkpointer, call cache and status are
    the backends whose ``schemes`` include the URL's scheme.

    :param register: takes a backend instance, looked up by its ``kind`` and ``name``.
    """


@hookspec
def vkr_register_providers(register: Callable[[Any], None]) -> None:
    """Register model providers: call ``register(provider)`` with a :class:`vkr_core.calls.Provider`.

    :param register: takes a provider instance; pool entries pick one by ``provider: NAME``.
    """


@hookspec
def vkr_register_sources(register: Callable[[Any], None]) -> None:
    """Register video sources: call ``register(source)`` with a :class:`vkr_core.sources.Source`.

    :param register: takes a source instance, looked up by its ``name``.
    """


@hookspec
def vkr_register_exporters(register: Callable[[Any], None]) -> None:
    """Register exporters: call ``register(exporter)`` with an exporter (a ``name`` and ``export(...)``).

    :param register: takes an exporter instance, chosen by ``vkr export --format NAME``.
    """


@hookspec(firstresult=True)
def vkr_frame_reader(path: str, exclude: tuple[str, ...]) -> Any:
    """Return a frame reader for ``path`` whose name is not in ``exclude``, or None.

    vkr asks again with the failed reader's name excluded when a reader fails on a file,
    so decord comes first and PyAV takes over where decord fails.

    :param path: the video file.
    :param exclude: names of readers that already failed on this file.
    """


@hookspec
def vkr_register_commands(cli: Any) -> None:
    """Add commands to the ``vkr`` click group.

    :param cli: the root :class:`click.Group`.
    """
