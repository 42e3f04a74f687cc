"""Preflight: before any video, is every model the run may call usable?

Two checks per model, all models at once:

- **key**: the variable the pool names (``api_key_env``) is set. A model without its own
  ``api_base`` goes to a hosted provider, which refuses every request without a key, so an
  unset variable is a problem. A model with an ``api_base`` (vLLM, a local server) may take
  requests without a key; there the reach check decides.
- **reach** (skipped with ``--skip-preflight``): one cheap request through the model's
  provider plugin with a short timeout: a model list where the provider has one (free),
  else a one-token completion. Never cached.

A model that fails is left out of the run, with a warning, when the run does not need it:
every step it serves has other eligible models, and it is not in a step's fixed set. A model
that cannot recover during the run (no key, key refused, unknown model) is excluded for the
whole run; one that may (unreachable, server errors, no answer in time) starts cooled down
and comes back if a later probe gets an answer. If the run does need a failing model,
nothing starts and one message lists every problem.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vkr_core.calls import MODEL_DOWN_STATUSES, PermanentError, Provider, TransientError
from vkr_core.config import ModelSpec
from vkr_core.health import ModelHealth
from vkr_core.log import get_logger, redact
from vkr_core.router import Router
from vkr_core.schemas import CallRecord, VkrError

log = get_logger("vkr.preflight")

DEFAULT_TIMEOUT_S = 15.0


class PreflightError(VkrError):
    """Models the run needs are not usable: nothing was started or paid for."""


@dataclass
class ModelProblem:
    model: str
    # key: no key; auth: key refused or model unknown; down: unreachable, 5xx, no answer.
    kind: str
    message: str

    @property
    def recoverable(self) -> bool:
        return self.kind == "down"


def key_problem(spec: ModelSpec) -> ModelProblem | None:
    if not spec.api_key_env or spec.api_key() or spec.api_base:
        return None
    return ModelProblem(
        spec.name,
        "key",
        f"its key variable {spec.api_key_env} is not set (the pool names it as api_key_env)",
    )


def _describe(exc: BaseException, spec: ModelSpec, timeout: float) -> ModelProblem:
    where = spec.api_base or spec.model
    status = getattr(exc, "status", None)
    text = redact(str(exc))
    if isinstance(exc, TimeoutError):
        return ModelProblem(spec.name, "down", f"no answer from {where} within {timeout:g}s")
    if isinstance(exc, PermanentError) and status in MODEL_DOWN_STATUSES:
        if status == 404:
            what = f"{where} does not know model {spec.model!r} (HTTP 404)"
        else:
            hint = f" (check {spec.api_key_env})" if spec.api_key_env else ""
            what = f"{where} refused the key (HTTP {status}){hint}"
        return ModelProblem(spec.name, "auth", what)
    if isinstance(exc, TransientError):
        if status is None:
            return ModelProblem(spec.name, "down", f"cannot reach {where}: {text}")
        return ModelProblem(spec.name, "down", f"{where} answers HTTP {status}: {text}")
    return ModelProblem(spec.name, "auth", f"{where} refused the request: {text}")


async def _reach(
    provider: Provider, spec: ModelSpec, timeout: float
) -> tuple[ModelProblem | None, CallRecord]:
    started = time.perf_counter()
    problem: ModelProblem | None = None
    cost = 0.0
    tokens = (0, 0)
    try:
        # A server the provider starts may take minutes to load its weights: its own
        # readiness bound applies there, the short reach timeout once it is up.
        await provider.wait_ready(spec)
        reply = await asyncio.wait_for(provider.check(spec), timeout=timeout)
        if reply is not None:
            tokens = (reply.prompt_tokens, reply.completion_tokens)
            if reply.cost_usd is not None:
                cost = reply.cost_usd
            else:
                cost = (spec.input_cost_per_token or 0.0) * tokens[0] + (
                    spec.output_cost_per_token or 0.0
                ) * tokens[1]
    except TransientError as exc:
        # A 429 is an answer: the model is there and takes the key, it is only busy.
        if exc.status != 429:
            problem = _describe(exc, spec, timeout)
    except (PermanentError, TimeoutError) as exc:
        problem = _describe(exc, spec, timeout)
    except VkrError as exc:
        problem = ModelProblem(spec.name, "auth", redact(str(exc)))
    record = CallRecord(
        step="preflight",
        model=spec.name,
        cache_key=hashlib.sha256(f"preflight|{spec.name}|{time.time()}".encode()).hexdigest(),
        latency_s=time.perf_counter() - started,
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        cost_usd=cost,
        cache_hit=False,
        attempts=1,
        outcome="error" if problem else "ok",
        error=problem.message if problem else None,
    )
    return problem, record


@dataclass
class PreflightResult:
    problems: list[ModelProblem]
    left_out: list[ModelProblem]
    records: list[CallRecord]


async def preflight(
    router: Router,
    step_names: Iterable[str],
    providers: dict[str, Provider],
    health: ModelHealth,
    *,
    reach: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    on_record: Callable[[CallRecord], None] | None = None,
    warn: Callable[[str], None] | None = None,
    required: Iterable[ModelSpec] = (),
) -> PreflightResult:
    """Check every model the steps may call, and the ``required`` ones the run calls by
    name; leave out the ones not needed, else raise."""
    steps = list(step_names)
    named = {spec.name for spec in required}
    in_use = {spec.name for spec in router.models_in_use(steps)} | named
    specs = [spec for spec in router.pool.models if spec.name in in_use]
    problems: list[ModelProblem] = []
    to_reach: list[ModelSpec] = []
    for spec in specs:
        found = key_problem(spec)
        if found is not None:
            problems.append(found)
        elif spec.provider not in providers:
            problems.append(
                ModelProblem(
                    spec.name,
                    "auth",
                    f"it names provider {spec.provider!r}, which no plugin registers",
                )
            )
        elif reach:
            to_reach.append(spec)
    records: list[CallRecord] = []
    if to_reach:
        results = await asyncio.gather(
            *(_reach(providers[s.provider], s, timeout) for s in to_reach)
        )
        for problem, record in results:
            records.append(record)
            if on_record is not None:
                on_record(record)
            if problem is not None:
                problems.append(problem)
    order = {s.name: i for i, s in enumerate(specs)}
    problems.sort(key=lambda p: order[p.model])
    if not problems:
        return PreflightResult([], [], records)
    consequences = router.problems(steps, without={p.model for p in problems})
    consequences += [
        f"model {p.model!r} is named for the run" for p in problems if p.model in named
    ]
    if consequences:
        listed = "; ".join(f"model {p.model!r}: {p.message}" for p in problems)
        raise PreflightError(
            f"preflight: {listed}. The run needs them: {'; '.join(consequences)}. "
            "Nothing was started; fix the pool or the environment and run again"
        )
    for problem in problems:
        if problem.recoverable:
            health.cool(problem.model, problem.message)
            fate = "starts cooled down and is probed again later"
        else:
            health.exclude(problem.model, problem.message)
            fate = "is left out of this run"
        message = (
            f"preflight: model {problem.model!r} {fate}: {problem.message} "
            "(other eligible models serve its steps)"
        )
        log.warning(message)
        if warn is not None:
            warn(message)
    return PreflightResult(problems, problems, records)
