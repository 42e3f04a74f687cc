"""Which model answers which call: eligible models per step, chosen at random, reproducibly.

A model is eligible for a step when the eligibility registry (written by qualification
pilots) says so for the step's current prompt version, the pool allows it for the step, and
it can see images if the step shows frames.

The seeded choice is made among every eligible model, whatever their health, so an outage
changes only the instances that would have gone to the cooled-down model: those go to
another eligible model, picked from a seed of their own (vkr_core.health).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Collection, Iterable
from typing import Any

from vkr_core.config import EligibilityRegistry, ModelSpec, Pool
from vkr_core.health import ModelHealth, Route
from vkr_core.log import get_logger
from vkr_core.schemas import VkrError

log = get_logger("vkr.router")


class RoutingError(VkrError):
    """No model can serve a step: raised before any call is paid for."""


def seeded_rng(*parts: Any) -> random.Random:
    """A Random seeded from the parts, the same on every machine and Python version."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class Router:
    def __init__(
        self,
        pool: Pool,
        registry: EligibilityRegistry,
        steps: dict[str, Any],
        seed: int = 0,
        allow_stale: bool = False,
        health: ModelHealth | None = None,
    ):
        self.health = health if health is not None else ModelHealth()
        self.pool = pool
        self.registry = registry
        self.steps = steps
        self.seed = seed
        self.allow_stale = allow_stale
        self.stale: list[tuple[str, str, str | None, str]] = []
        unknown = sorted(set(pool.steps) - set(steps))
        if unknown:
            raise RoutingError(
                f"pool file names unknown step(s) {', '.join(map(repr, unknown))}; "
                f"known steps: {', '.join(sorted(steps))}"
            )
        for conf in pool.steps.values():
            for model in conf.models or []:
                pool.get(model)  # a model the pool does not define is an error here

    def eligible(self, step_name: str) -> list[ModelSpec]:
        """Eligible models for a step, in pool order."""
        step = self.steps[step_name]
        allowed = self.pool.steps.get(step_name)
        names: Iterable[str] = allowed.models if allowed and allowed.models else self.pool.names()
        out = []
        for name in names:
            spec = self.pool.get(name)
            entry = self.registry.entry(step_name, name)
            if entry is None or not entry.eligible:
                continue
            if step.modality == "vision" and not spec.sees_images():
                continue
            current = step.version()
            if entry.prompt_version is not None and entry.prompt_version != current:
                if (step_name, name, entry.prompt_version, current) not in self.stale:
                    self.stale.append((step_name, name, entry.prompt_version, current))
                    log.warning(
                        "stale eligibility entry",
                        step=step_name,
                        model=name,
                        qualified_for=entry.prompt_version,
                        current=current,
                    )
                if not self.allow_stale:
                    continue
            out.append(spec)
        return out

    def check(self, step_names: Iterable[str]) -> None:
        """Fail before any money is spent if a step has no usable model."""
        problems = self.problems(step_names)
        if problems:
            raise RoutingError("; ".join(problems))

    def problems(self, step_names: Iterable[str], without: Collection[str] = ()) -> list[str]:
        """What keeps steps from running, if the models in ``without`` were left out."""
        problems = []
        for name in step_names:
            step = self.steps[name]
            models = [m for m in self.eligible(name) if m.name not in without]
            stale = [s for s in self.stale if s[0] == name]
            hint = (
                f" ({len(stale)} entr{'y is' if len(stale) == 1 else 'ies are'} stale: the prompt "
                "or output schema changed since qualification; re-qualify or allow stale entries)"
                if stale and not self.allow_stale
                else ""
            )
            if not models:
                if without and self.eligible(name):
                    problems.append(f"step {name!r} would have no model left")
                else:
                    problems.append(f"step {name!r} has no eligible model{hint}")
            elif step.selection == "all":
                conf = self.pool.steps.get(name)
                fixed = conf.models if conf and conf.models else None
                if not fixed:
                    problems.append(
                        f"step {name!r} needs a fixed model set: set steps.{name}.models in the pool"
                    )
                else:
                    left_out = sorted(set(fixed) & set(without))
                    missing = sorted(set(fixed) - {m.name for m in models} - set(without))
                    if missing:
                        problems.append(
                            f"step {name!r}: fixed model(s) {', '.join(missing)} not eligible{hint}"
                        )
                    if left_out:
                        problems.append(
                            f"step {name!r} needs every model of its fixed set, "
                            f"{', '.join(left_out)} included"
                        )
            elif step.selection == "exclude_generator" and len(models) < 2:
                problems.append(
                    f"step {name!r} must use a model other than the generator, but only "
                    f"{models[0].name!r} is {'left' if without else 'eligible'}"
                )
        return problems

    def models_in_use(self, step_names: Iterable[str]) -> list[ModelSpec]:
        """Every model a run of these steps may call, in pool order."""
        names: set[str] = set()
        for name in step_names:
            step = self.steps[name]
            conf = self.pool.steps.get(name)
            if step.selection == "all" and conf and conf.models:
                names.update(conf.models)
            else:
                names.update(m.name for m in self.eligible(name))
        return [m for m in self.pool.models if m.name in names]

    def choose(self, step_name: str, *key: Any, exclude: Iterable[str] = ()) -> ModelSpec:
        """One eligible model, uniformly at random, reproducible from (seed, step, key)."""
        return self.route(step_name, *key, exclude=exclude)[0]

    def route(
        self, step_name: str, *key: Any, exclude: Iterable[str] = ()
    ) -> tuple[ModelSpec, Route]:
        """The model of one instance and how it was picked.

        The seeded pick among every eligible model stands while that model is available;
        if it is cooled down, another available candidate is picked from a seed of its own;
        if none is, the one to be probed first (the call will wait for it).
        """
        excluded = set(exclude)
        candidates = sorted(
            (m for m in self.eligible(step_name) if m.name not in excluded), key=lambda m: m.name
        )
        if not candidates:
            raise RoutingError(
                f"step {step_name!r} has no eligible model"
                + (f" other than {', '.join(sorted(excluded))}" if excluded else "")
            )
        first = seeded_rng(self.seed, step_name, *key).choice(candidates)
        chosen = first
        if not self.health.available(first.name):
            usable = [m for m in candidates if self.health.available(m.name)]
            if usable:
                rng = seeded_rng(self.seed, step_name, *key, "reroute", first.name)
                chosen = rng.choice(usable)
                log.info("rerouted", step=step_name, model=chosen.name, instead_of=first.name)
            else:
                soonest = self.health.soonest(m.name for m in candidates)
                chosen = next((m for m in candidates if m.name == soonest), first)
        names = tuple(m.name for m in candidates)
        return chosen, Route(step_name, chosen.name, first.name, names)

    def fixed(self, step_name: str) -> list[ModelSpec]:
        """The fixed model set of a step that asks every model (selection "all")."""
        eligible = {m.name: m for m in self.eligible(step_name)}
        conf = self.pool.steps.get(step_name)
        names = conf.models if conf and conf.models else sorted(eligible)
        missing = [n for n in names if n not in eligible]
        if missing:
            raise RoutingError(
                f"step {step_name!r}: fixed model(s) {', '.join(missing)} not eligible"
            )
        return [eligible[n] for n in names]

    def fixed_route(self, step_name: str) -> tuple[list[ModelSpec], Route]:
        """The fixed set and its route: each of its calls waits for its own model."""
        specs = self.fixed(step_name)
        names = tuple(m.name for m in specs)
        return specs, Route(step_name, names[0], names[0], names, fixed=True)
