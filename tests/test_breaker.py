"""The breaker's state table, on a clock the test moves by hand."""

import pytest

from stt_server.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(clock: Clock) -> CircuitBreaker:
    return CircuitBreaker("gpu0", failure_threshold=3, cooldown=30.0, clock=clock)


def test_n_consecutive_failures_open_and_a_success_resets_the_count(breaker) -> None:
    breaker.record_failure("boom")
    breaker.record_failure("boom")
    breaker.record_success()
    breaker.record_failure("boom")
    breaker.record_failure("boom")
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure("boom")
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows_new_session()
    assert "3 consecutive failures" in breaker.statistics().last_reason


def test_out_of_memory_opens_at_once(breaker) -> None:
    breaker.record_failure("CUDA failed with error out of memory", out_of_memory=True)
    assert breaker.state is BreakerState.OPEN
    assert breaker.statistics().last_reason.startswith("out of memory")


def test_cooldown_then_exactly_one_trial_then_success_closes(breaker, clock) -> None:
    breaker.trip("memory 90% over the 85% threshold")
    clock.now += 29.9
    assert not breaker.allows_new_session()
    clock.now += 0.2
    assert breaker.allows_new_session()
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.grant_trial()
    assert not breaker.allows_new_session()  # one trial at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allows_new_session()


def test_a_failed_trial_opens_again_for_a_full_cooldown(breaker, clock) -> None:
    breaker.trip("x")
    clock.now += 30
    assert breaker.allows_new_session()
    breaker.grant_trial()
    breaker.record_failure("still broken")
    assert breaker.state is BreakerState.OPEN
    clock.now += 29
    assert not breaker.allows_new_session()
    clock.now += 1
    assert breaker.allows_new_session()


def test_every_transition_is_recorded_and_counted(breaker, clock) -> None:
    breaker.trip("first")
    clock.now += 30
    breaker.allows_new_session()
    breaker.record_success()
    breaker.trip("second")
    breaker.reset()
    moves = [(t.source.value, t.target.value) for t in breaker.history]
    assert moves == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
        ("closed", "open"),
        ("open", "closed"),
    ]
    assert breaker.statistics().opened == 2
    assert breaker.statistics().state is BreakerState.CLOSED


def test_a_silent_trial_hands_the_trial_on_at_its_deadline(breaker, clock) -> None:
    """A trial session that never speaks yields no outcome; the breaker must not wait forever."""
    breaker.trip("x")
    clock.now += 30
    assert breaker.allows_new_session()
    assert breaker.grant_trial()
    clock.now += 29.9  # the trial's deadline is one cool-down (30 s) after it was granted
    assert not breaker.allows_new_session()
    clock.now += 0.1
    # It proved nothing: not closed (trusting an untested device), not reopened (punishing it
    # for a user's silence); the next session gets the trial.
    assert breaker.allows_new_session()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.grant_trial()
    assert not breaker.allows_new_session()  # still one trial at a time
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    moves = [(t.source.value, t.target.value) for t in breaker.history]
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_the_trial_deadline_is_configurable_and_restarts_with_each_trial(clock) -> None:
    breaker = CircuitBreaker(
        "gpu0", failure_threshold=3, cooldown=30.0, clock=clock, trial_timeout=5.0
    )
    breaker.trip("x")
    clock.now += 30
    assert breaker.allows_new_session()
    breaker.grant_trial()
    clock.now += 5
    assert breaker.allows_new_session()
    breaker.grant_trial()  # a second trial gets its own 5 s, counted from now
    clock.now += 4.9
    assert not breaker.allows_new_session()
    # A late outcome of the first, silent trial session still decides.
    breaker.record_failure("still broken")
    assert breaker.state is BreakerState.OPEN


def test_an_abandoned_trial_is_offered_again_at_once(breaker, clock) -> None:
    breaker.trip("x")
    clock.now += 30
    breaker.allows_new_session()
    breaker.grant_trial()
    breaker.abandon_trial("trial session left")
    assert breaker.allows_new_session()
    assert breaker.state is BreakerState.HALF_OPEN
    # Abandoning outside half-open changes nothing.
    breaker.record_success()
    breaker.abandon_trial("late")
    assert breaker.state is BreakerState.CLOSED and breaker.allows_new_session()
    assert not breaker.grant_trial()  # a closed breaker has no trial to grant
