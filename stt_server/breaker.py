"""A per-device circuit breaker, sans-IO: outcomes and readings in, state out.

Theory of operation
-------------------
``closed``
    Normal service. A CUDA out-of-memory error, ``failure_threshold`` consecutive inference
    failures, or a memory reading past the threshold opens the breaker.
``open``
    The device takes no new sessions. After ``cooldown`` seconds (measured on the injected
    clock) the next :meth:`allows_new_session` question moves it to ``half_open``.
``half_open``
    Exactly one trial: the first new session may be placed here, and the next inference outcome
    decides. Success closes the breaker, failure opens it again for another cool-down.

Every transition is recorded (and counted per target state) so the control socket and
``/metrics`` can show how often a device has tripped and why.
"""

from __future__ import annotations

import collections
import enum
import logging
from collections.abc import Callable

import attrs

log = logging.getLogger(__name__)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@attrs.frozen
class Transition:
    at: float
    source: BreakerState
    target: BreakerState
    reason: str


@attrs.frozen
class BreakerStatistics:
    state: BreakerState
    consecutive_failures: int
    opened: int
    last_reason: str | None


#: Transitions kept per breaker for the operator's view; older ones only remain as counts.
_HISTORY = 32


class CircuitBreaker:
    def __init__(
        self, name: str, *, failure_threshold: int, cooldown: float, clock: Callable[[], float]
    ) -> None:
        self.name = name
        self._threshold = failure_threshold
        self._cooldown = cooldown
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_granted = False
        self._opened = 0
        self.history: collections.deque[Transition] = collections.deque(maxlen=_HISTORY)

    @property
    def state(self) -> BreakerState:
        return self._state

    def _move(self, target: BreakerState, reason: str) -> None:
        if target is self._state:
            return
        self.history.append(Transition(self._clock(), self._state, target, reason))
        log.warning("breaker %s: %s -> %s (%s)", self.name, self._state.value, target.value, reason)
        self._state = target
        if target is BreakerState.OPEN:
            self._opened += 1
            self._opened_at = self._clock()
            self._trial_granted = False

    def trip(self, reason: str) -> None:
        """Open now (out of memory, memory over threshold, operator)."""
        self._failures = 0
        if self._state is BreakerState.OPEN:
            self._opened_at = self._clock()  # a new reason restarts the cool-down
            return
        self._move(BreakerState.OPEN, reason)

    def record_failure(self, reason: str, *, out_of_memory: bool = False) -> None:
        self._failures += 1
        if out_of_memory:
            self.trip(f"out of memory: {reason}")
        elif self._state is BreakerState.HALF_OPEN:
            self.trip(f"trial failed: {reason}")
        elif self._failures >= self._threshold:
            self.trip(f"{self._failures} consecutive failures, last: {reason}")

    def record_success(self) -> None:
        self._failures = 0
        if self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED, "trial succeeded")

    def reset(self, reason: str = "reset by operator") -> None:
        self._failures = 0
        self._move(BreakerState.CLOSED, reason)

    def allows_new_session(self) -> bool:
        """May a new session be placed here? In half-open, yes exactly once (the trial)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._cooldown:
            self._move(BreakerState.HALF_OPEN, f"cool-down of {self._cooldown:g} s over")
        return self._state is BreakerState.CLOSED or (
            self._state is BreakerState.HALF_OPEN and not self._trial_granted
        )

    def grant_trial(self) -> None:
        """The admission decided to use this device's half-open trial."""
        if self._state is BreakerState.HALF_OPEN:
            self._trial_granted = True

    def statistics(self) -> BreakerStatistics:
        return BreakerStatistics(
            state=self._state,
            consecutive_failures=self._failures,
            opened=self._opened,
            last_reason=self.history[-1].reason if self.history else None,
        )
