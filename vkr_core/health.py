"""Model health during a run: circuit breakers, reroutes and pauses.

A model whose calls keep failing is cooled down: a call that used up its retries without
the model answering anyone in the meantime (transport errors, 5xx, timeouts), or a refused
key or unknown model (at once), opens the model's breaker. While it is open the router sends
new instances to another eligible model. When the cool-down is over, the next call routed
to the model is a probe: an answer closes the breaker, a failure cools the model down twice
as long (up to ``max_cooldown``).

A call with nowhere else to go (every candidate of its step is cooled down, or the step
asks a fixed set of models: its selection is "all") waits for its model instead of failing:
the run pauses until a probe gets an answer.

A model that answers some requests and fails others is not cooled down: its failed calls
are retried as before, so a flaky provider changes nothing but the retry count.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

from vkr_core.log import get_logger

log = get_logger("vkr.health")

DEFAULT_COOLDOWN_S = 10.0
MAX_COOLDOWN_S = 600.0
# How often a waiting call looks again for another model that has started answering.
POLL_S = 1.0
# Provider errors can run long; a status line shows their start.
REASON_CHARS = 200


def _short(reason: str) -> str:
    return reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."


@dataclass(frozen=True)
class Route:
    """How the router picked the model of one call, so the caller knows its way out.

    ``candidates`` are the models this instance could use (after any exclusion); ``fixed``
    marks a step that needs every model of its set, which therefore waits and never reroutes.
    """

    step: str
    model: str
    first_choice: str
    candidates: tuple[str, ...]
    fixed: bool = False

    @property
    def rerouted_from(self) -> str | None:
        return self.first_choice if self.first_choice != self.model else None


# Set by the step context when a step picks its model, read by the caller in the same task:
# the call of that instance, and only it, may be rerouted or wait.
_ROUTE: ContextVar[Route | None] = ContextVar("vkr_route", default=None)


def set_route(route: Route) -> None:
    _ROUTE.set(route)


def route_for(step: str, model: str) -> Route | None:
    """The route of the current instance if this call belongs to it."""
    route = _ROUTE.get()
    if route is None or route.step != step:
        return None
    if route.fixed:
        return route if model in route.candidates else None
    return route if route.model == model else None


Admission = Literal["go", "probe", "wait", "excluded"]


@dataclass
class Breaker:
    name: str
    open: bool = False
    open_until: float = 0.0
    cooldown: float = 0.0
    probing: bool = False
    reason: str = ""
    excluded: str | None = None
    last_alive: float = -math.inf
    last_failed: float = -math.inf
    pause_noted: bool = False
    opened: int = 0


@dataclass
class ModelHealth:
    """The breakers of every model of a run, shared by its router and its caller."""

    cooldown: float = DEFAULT_COOLDOWN_S
    max_cooldown: float = MAX_COOLDOWN_S
    notify: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.monotonic
    breakers: dict[str, Breaker] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._changed: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def _say(self, message: str, **fields: object) -> None:
        if self.notify is None:
            log.warning(message, **fields)
        else:
            log.info(message, **fields)
            self.notify(message)

    def breaker(self, name: str) -> Breaker:
        found = self.breakers.get(name)
        if found is None:
            found = self.breakers[name] = Breaker(name)
        return found

    # -- state

    def exclude(self, name: str, reason: str) -> None:
        """Keep a model out of the whole run: a problem that no wait can fix (no key)."""
        self.breaker(name).excluded = reason

    def cool(self, name: str, reason: str) -> None:
        """Open a model's breaker now, quietly: preflight found it down and says so itself."""
        b = self.breaker(name)
        b.reason = reason
        b.last_failed = self.clock()
        if not b.open:
            self._open(b, self.cooldown, announce=False)

    def excluded(self, name: str) -> str | None:
        return self.breaker(name).excluded

    def is_open(self, name: str) -> bool:
        b = self.breaker(name)
        return b.open or b.excluded is not None

    def available(self, name: str) -> bool:
        """Worth routing a new instance to: closed, or cooled long enough to be probed."""
        b = self.breaker(name)
        if b.excluded is not None:
            return False
        return not b.open or (not b.probing and self.clock() >= b.open_until)

    def answering(self, name: str) -> bool:
        """Closed, and nothing failed since its last answer: a safe place to reroute to."""
        b = self.breaker(name)
        return b.excluded is None and not b.open and b.last_failed <= b.last_alive

    def failed_since(self, name: str, moment: float) -> bool:
        return self.breaker(name).last_failed > moment

    def soonest(self, names: Iterable[str]) -> str | None:
        """Of cooled models (none excluded), the one that may be probed first."""
        usable = [self.breaker(n) for n in names if self.breaker(n).excluded is None]
        if not usable:
            return None
        return min(usable, key=lambda b: (b.open_until, b.name)).name

    def admit(self, name: str) -> Admission:
        """May a request go to this model now? ``probe``: yes, as the half-open probe."""
        b = self.breaker(name)
        if b.excluded is not None:
            return "excluded"
        if not b.open:
            return "go"
        if not b.probing and self.clock() >= b.open_until:
            b.probing = True
            return "probe"
        return "wait"

    def describe(self, name: str) -> str:
        b = self.breaker(name)
        if b.excluded is not None:
            return f"{name} is excluded from this run: {b.excluded}"
        if not b.open:
            return f"{name} is answering"
        wait = max(0.0, b.open_until - self.clock())
        return f"{name} is cooled down ({_short(b.reason)}), next try in {wait:.0f}s"

    # -- what requests tell us

    def alive(self, name: str, probe: bool = False) -> None:
        """The model answered (any reply, a 429, a 4xx about the request itself)."""
        b = self.breaker(name)
        b.last_alive = self.clock()
        if probe:
            b.probing = False
        if b.open:
            b.open = False
            b.cooldown = 0.0
            b.pause_noted = False
            self._say(f"model {name} answers again: resuming its calls", model=name)
            self._wake()

    def failed(self, name: str, reason: str, *, probe: bool, definitive: bool) -> None:
        """A request got no answer from the model (transport, 5xx, timeout) or was refused
        for a reason that concerns every request (bad key, unknown model: ``definitive``)."""
        b = self.breaker(name)
        b.reason = reason
        b.last_failed = self.clock()
        if probe:
            b.probing = False
            self._open(b, max(self.cooldown, b.cooldown * 2))
        elif definitive and not b.open:
            self._open(b, self.cooldown)

    def gave_up(self, name: str, reason: str, since: float) -> None:
        """A call used up its retries. Cool the model down unless it answered someone else
        meanwhile: then it is flaky, not down, and a retry of the call may well succeed."""
        b = self.breaker(name)
        b.reason = reason
        if not b.open and b.last_alive < since:
            self._open(b, self.cooldown)

    def abandon_probe(self, name: str) -> None:
        """A probe that ended with no verdict (cancelled): let another call probe."""
        b = self.breaker(name)
        if b.probing:
            b.probing = False
            self._wake()

    def note_pause(self, name: str, step: str) -> None:
        b = self.breaker(name)
        if not b.pause_noted:
            b.pause_noted = True
            self._say(
                f"paused: {step} calls wait for {name}, no other model can take them: "
                f"{self.describe(name)} (Ctrl-C stops the run)",
                model=name,
                step=step,
            )

    def _open(self, b: Breaker, cooldown: float, announce: bool = True) -> None:
        was_open = b.open
        b.open = True
        b.opened += 1
        b.cooldown = min(self.max_cooldown, cooldown)
        b.open_until = self.clock() + b.cooldown
        if was_open:
            if b.pause_noted:
                self._say(
                    f"still waiting: {b.name} failed again ({_short(b.reason)}), next try in "
                    f"{b.cooldown:.0f}s",
                    model=b.name,
                )
            else:
                log.info("probe failed", model=b.name, reason=b.reason, cooldown_s=b.cooldown)
        elif announce:
            self._say(
                f"model {b.name} cooled down for {b.cooldown:.0f}s: {_short(b.reason)}",
                model=b.name,
            )
        self._wake()

    # -- waiting

    def _event(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._changed is None or self._changed[0] is not loop:
            self._changed = (loop, asyncio.Event())
        return self._changed[1]

    def _wake(self) -> None:
        if self._changed is not None:
            loop, event = self._changed
            self._changed = None
            if loop.is_closed():
                return
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                event.set()
            else:
                loop.call_soon_threadsafe(event.set)

    async def wait(self, name: str) -> None:
        """Until the model may be probed, its state changes, or POLL_S passes."""
        b = self.breaker(name)
        event = self._event()
        until = b.open_until - self.clock()
        # A probe in flight ends with alive() or failed(), both of which wake the waiters.
        timeout = POLL_S if b.probing or until <= 0 else min(POLL_S, until)
        try:
            await asyncio.wait_for(event.wait(), timeout=timeout)
        except TimeoutError:
            pass
