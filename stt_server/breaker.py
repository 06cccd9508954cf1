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

    A trial has ``trial_timeout`` seconds to decide. A trial session that stays silent (or
    leaves, see :meth:`abandon_trial`) produces no inference at all; without a deadline the
    breaker would stay half-open with its one trial spent and take no session ever again. Once
    the deadline passes, the breaker stays half-open and the *next* new session gets the trial.
    Neither other choice is right: closing would trust a device that proved nothing, and
    reopening would punish it for a user's silence (with a silent user at every trial, a healthy
    GPU would never come back). The silent session stays where it is; should it speak after
    all, its outcome still decides like any other.

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
        self,
        name: str,
        *,
        failure_threshold: int,
        cooldown: float,
        clock: Callable[[], float],
        trial_timeout: float | None = None,
    ) -> None:
        self.name = name
        self._threshold = failure_threshold
        self._cooldown = cooldown
        #: Seconds a granted trial has to produce an outcome; by default, one cool-down.
        self._trial_timeout = cooldown if trial_timeout is None else trial_timeout
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_granted = False
        self._trial_granted_at = 0.0
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
        """May a new session be placed here? In half-open, yes once per trial (see above)."""
        now = self._clock()
        if self._state is BreakerState.OPEN and now - self._opened_at >= self._cooldown:
            self._move(BreakerState.HALF_OPEN, f"cool-down of {self._cooldown:g} s over")
        if (
            self._state is BreakerState.HALF_OPEN
            and self._trial_granted
            and now - self._trial_granted_at >= self._trial_timeout
        ):
            self.abandon_trial(f"no outcome within {self._trial_timeout:g} s")
        return self._state is BreakerState.CLOSED or (
            self._state is BreakerState.HALF_OPEN and not self._trial_granted
        )

    def grant_trial(self) -> bool:
        """The admission decided to use this device's half-open trial. Returns whether this
        placement is the trial (False when the breaker is closed)."""
        if self._state is not BreakerState.HALF_OPEN:
            return False
        self._trial_granted = True
        self._trial_granted_at = self._clock()
        return True

    def abandon_trial(self, reason: str) -> None:
        """The trial session proved nothing (silent past the deadline, or gone without a single
        inference): the next new session gets the trial."""
        if self._state is BreakerState.HALF_OPEN and self._trial_granted:
            log.warning(
                "breaker %s: trial abandoned (%s); next session is the trial", self.name, reason
            )
            self._trial_granted = False

    def statistics(self) -> BreakerStatistics:
        return BreakerStatistics(
            state=self._state,
            consecutive_failures=self._failures,
            opened=self._opened,
            last_reason=self.history[-1].reason if self.history else None,
        )
