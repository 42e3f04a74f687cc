"""The plugin manager: built-ins and third-party plugins load through the same path."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from vkr_core import hookspecs
from vkr_core.schemas import SkillSpec, VkrError

ENTRY_POINT_GROUP = "vkr"
# The distribution whose entry points are the built-ins: they load through the same
# entry-point group as a third party's, and ``VKR_LOAD_PLUGINS`` never filters them out.
BUILTIN_DISTRIBUTION = "vkr"


BACKEND_KINDS = ("checkpointer", "call_cache", "status", "executor")


class PluginError(VkrError):
    """A plugin could not be loaded or registered something twice."""


KINDS = ("skill", "step", "pipeline", "backend", "provider", "source", "exporter")


@dataclass
class Registry:
    """What the loaded plugins registered, with the plugin each came from."""

    skills: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, Any] = field(default_factory=dict)
    pipelines: dict[str, Any] = field(default_factory=dict)
    # "kind:name" (checkpointer:sqlite, call_cache:diskcache, executor:local, ...)
    backends: dict[str, Any] = field(default_factory=dict)
    providers: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    exporters: dict[str, Any] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)

    def table(self, kind: str) -> dict[str, Any]:
        return getattr(self, kind + "s")

    def add(self, kind: str, name: str, item: Any, plugin: str) -> None:
        key = (kind, name)
        if key in self.owners:
            raise PluginError(
                f"{kind} {name!r} is registered twice: by plugin {self.owners[key]!r} "
                f"and by plugin {plugin!r}"
            )
        self.owners[key] = plugin
        self.table(kind)[name] = item

    def gates(self) -> list[Any]:
        """Gates in the order they run."""
        from vkr_core.steps import Gate

        gates = [s for s in self.steps.values() if isinstance(s, Gate)]
        return sorted(gates, key=lambda g: (g.order, g.name))

    def get(self, kind: str, name: str) -> Any:
        table = self.table(kind)
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise PluginError(f"no {kind} named {name!r} is loaded (loaded: {known})")
        return table[name]


class VkrPluginManager(pluggy.PluginManager):
    registry: Registry


def _allowed_entry_points() -> set[str] | None:
    raw = os.environ.get("VKR_LOAD_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _origin(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{ep.value} from {dist.name}" if dist is not None else ep.value


def _one_line(exc: Exception) -> str:
    """An exception as one line: a plugin's error must not become a multi-line message."""
    from pydantic import ValidationError

    from vkr_core.errors import describe_validation_error

    if isinstance(exc, ValidationError):
        # The model's name says which of the plugin's objects was wrong.
        return f"{exc.title}: {describe_validation_error(exc)}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_builtin(ep: importlib.metadata.EntryPoint, names: dict[int, str] | None = None) -> bool:
    """``names``: distribution names already read, by distribution (``dist.name`` parses
    its METADATA file on every access: 72 times at each start without it)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return False
    if names is None:
        return bool(dist.name == BUILTIN_DISTRIBUTION)
    name = names.get(id(dist))
    if name is None:
        name = names[id(dist)] = dist.name
    return name == BUILTIN_DISTRIBUTION


def _entry_points() -> tuple[list[importlib.metadata.EntryPoint], dict[str, Any]]:
    """The built-ins (in declared order) and the third-party plugins by name."""
    builtins: list[importlib.metadata.EntryPoint] = []
    third_party: dict[str, importlib.metadata.EntryPoint] = {}
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    names: dict[int, str] = {}
    for ep in entry_points:
        if _is_builtin(ep, names):
            if ep.name not in {b.name for b in builtins}:  # an editable install lists twice
                builtins.append(ep)
            continue
        if ep.name in third_party:
            raise PluginError(
                f"two installed plugins are named {ep.name!r}: {_origin(third_party[ep.name])} "
                f"and {_origin(ep)}; uninstall one of them"
            )
        third_party[ep.name] = ep
    if not builtins:
        raise PluginError(
            "vkr's built-in plugins are not registered: vkr is not installed in this "
            "environment (run `pip install -e .` in the checkout)"
        )
    return builtins, third_party


def builtin_plugins() -> list[str]:
    """Names of the built-in plugins (``vkr plugins`` marks them built-in)."""
    return [ep.name for ep in _entry_points()[0]]


def _load(pm: VkrPluginManager, ep: importlib.metadata.EntryPoint) -> None:
    try:
        plugin = ep.load()
    except Exception as exc:  # a broken plugin must say which one
        raise PluginError(
            f"plugin {ep.name!r} ({ep.value}) failed to load: {_one_line(exc)}"
        ) from exc
    try:
        pm.register(plugin, name=ep.name)
    except ValueError as exc:  # pluggy: the same module under a second name
        raise PluginError(f"plugin {ep.name!r} ({ep.value}): {exc}") from None


def get_plugin_manager(
    extra_plugins: Iterable[Any] = (), load_entry_points: bool = True
) -> VkrPluginManager:
    """Load built-ins, then third-party plugins (limited by VKR_LOAD_PLUGINS), then ``extra_plugins``.

    Both come from the ``vkr`` entry-point group; the built-ins are the entries of vkr's
    own distribution (pyproject.toml), so they load exactly as a third party's do.

    ``VKR_LOAD_PLUGINS`` is a comma-separated list of third-party plugin names; set it to
    an empty string to load built-ins only. A name that is not installed is an error, as are
    two installed plugins of one name.
    """
    pm = VkrPluginManager("vkr")
    pm.add_hookspecs(hookspecs)
    # The engine's own embedded backends: part of vkr_core, not a plugin.
    pm.register(importlib.import_module("vkr_core.backends"), name="vkr_core.backends")
    builtins, third_party = _entry_points()
    for ep in builtins:
        _load(pm, ep)
    if load_entry_points:
        allowed = _allowed_entry_points()
        unknown = sorted((allowed or set()) - set(third_party))
        if unknown:
            raise PluginError(
                f"VKR_LOAD_PLUGINS names {', '.join(map(repr, unknown))}, which "
                f"{'is' if len(unknown) == 1 else 'are'} not installed (installed plugins: "
                f"{', '.join(sorted(third_party)) or 'none'})"
            )
        for ep in third_party.values():
            if allowed is None or ep.name in allowed:
                _load(pm, ep)
    for plugin in extra_plugins:
        # A readable name, so errors and `vkr plugins` can say which plugin did what.
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name if not pm.has_plugin(name) else f"{name}-{id(plugin)}")
    pm.check_pending()
    pm.registry = collect(pm)
    return pm


def collect(pm: pluggy.PluginManager) -> Registry:
    """Call every register hook, attributing each registration to its plugin."""
    from vkr_core.backends import Backend
    from vkr_core.pipelines import Pipeline
    from vkr_core.steps import Step

    registry = Registry()
    for kind in KINDS:
        hook = getattr(pm.hook, f"vkr_register_{kind}s")
        for impl in hook.get_hookimpls():
            plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)

            def register(item: Any, _kind: str = kind, _plugin: str = plugin_name) -> None:
                name = getattr(item, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin!r} registered a {_kind} without a name")
                if _kind == "backend":
                    if not isinstance(item, Backend) or item.kind not in BACKEND_KINDS:
                        raise PluginError(
                            f"plugin {_plugin!r} registered backend {name!r} that is not a "
                            "vkr_core.backends checkpointer, call cache, status or executor"
                        )
                    name = f"{item.kind}:{name}"
                if _kind == "step" and not isinstance(item, Step):
                    raise PluginError(
                        f"plugin {_plugin!r} registered step {name!r} that is not a vkr_core.steps.Step"
                    )
                if _kind == "pipeline" and not isinstance(item, Pipeline):
                    raise PluginError(
                        f"plugin {_plugin!r} registered pipeline {name!r} that is not a "
                        "vkr_core.pipelines.Pipeline"
                    )
                if _kind == "skill" and not isinstance(item, SkillSpec):
                    raise PluginError(
                        f"plugin {_plugin!r} registered skill {name!r} that is not a "
                        "vkr_core.schemas.SkillSpec"
                    )
                registry.add(_kind, name, item, _plugin)

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:  # third-party code: say whose hook failed
                raise PluginError(
                    f"plugin {plugin_name!r} failed in vkr_register_{kind}s: {_one_line(exc)}"
                ) from exc
    return registry


def describe(pm: VkrPluginManager) -> list[dict[str, Any]]:
    """Each loaded plugin with what it registered, for ``vkr plugins``."""
    builtins = {*builtin_plugins(), "vkr_core.backends"}
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0] or ""):
        registered: dict[str, list[str]] = {}
        for (kind, item), owner in pm.registry.owners.items():
            if owner == name:
                registered.setdefault(kind + "s", []).append(item)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        rows.append(
            {
                "name": name,
                "builtin": name in builtins,
                "hooks": hooks,
                "registers": {k: sorted(v) for k, v in sorted(registered.items())},
            }
        )
    return rows
