"""Which model answers which call: eligible models per step, chosen at random, reproducibly.

A model is eligible for a step when the eligibility registry (written by qualification
pilots) says so for the step's current prompt version, the pool allows it for the step, and
it can see images if the step shows frames.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from typing import Any

from vkr_core.config import EligibilityRegistry, ModelSpec, Pool
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
    ):
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
        problems = []
        for name in step_names:
            step = self.steps[name]
            models = self.eligible(name)
            stale = [s for s in self.stale if s[0] == name]
            hint = (
                f" ({len(stale)} entr{'y is' if len(stale) == 1 else 'ies are'} stale: the prompt "
                "changed since qualification; re-qualify or allow stale entries)"
                if stale and not self.allow_stale
                else ""
            )
            if not models:
                problems.append(f"step {name!r} has no eligible model{hint}")
            elif step.selection == "all":
                conf = self.pool.steps.get(name)
                fixed = conf.models if conf and conf.models else None
                if not fixed:
                    problems.append(
                        f"step {name!r} needs a fixed model set: set steps.{name}.models in the pool"
                    )
                else:
                    missing = sorted(set(fixed) - {m.name for m in models})
                    if missing:
                        problems.append(
                            f"step {name!r}: fixed model(s) {', '.join(missing)} not eligible{hint}"
                        )
            elif step.selection == "exclude_generator" and len(models) < 2:
                problems.append(
                    f"step {name!r} must use a model other than the generator, but only "
                    f"{models[0].name!r} is eligible"
                )
        if problems:
            raise RoutingError("; ".join(problems))

    def choose(self, step_name: str, *key: Any, exclude: Iterable[str] = ()) -> ModelSpec:
        """One eligible model, uniformly at random, reproducible from (seed, step, key)."""
        excluded = set(exclude)
        candidates = sorted(
            (m for m in self.eligible(step_name) if m.name not in excluded), key=lambda m: m.name
        )
        if not candidates:
            raise RoutingError(
                f"step {step_name!r} has no eligible model"
                + (f" other than {', '.join(sorted(excluded))}" if excluded else "")
            )
        return seeded_rng(self.seed, step_name, *key).choice(candidates)

    def fixed(self, step_name: str) -> list[ModelSpec]:
        """The fixed model set of a step that asks every model (video_dependency)."""
        eligible = {m.name: m for m in self.eligible(step_name)}
        conf = self.pool.steps.get(step_name)
        names = conf.models if conf and conf.models else sorted(eligible)
        missing = [n for n in names if n not in eligible]
        if missing:
            raise RoutingError(
                f"step {step_name!r}: fixed model(s) {', '.join(missing)} not eligible"
            )
        return [eligible[n] for n in names]
