"""Simulated users: each connects, speaks real clips at real-time pace with pauses between
them like a person, and comes back when the server sends it away, until the run ends.

One task per user, all in one nursery; a semaphore of ``concurrent`` tokens is held from the
TCP connect until the server's first answer, so at most that many users connect at once (the
deployment guide's ``--concurrent``). Every user's choices (clips, pauses, backoff) come from its
own ``random.Random`` seeded with ``--seed`` and its index, so a run repeats.

A user's life:

- connect (from its source address, with the token), wait for ``session`` or a refusal;
- refused: wait ``retry_after`` (with jitter), try again; the connect failed: back off 1, 2, 4 ...
  up to :data:`MAX_BACKOFF` seconds;
- accepted: a short random pause, then clip, trailing silence, pause, clip ... Pauses are sent
  as silence (an open microphone), except for *silent* users, who after each clip's trailing
  silence send nothing for ``silent_pause`` seconds (a muted client, left open): only the
  server's pings keep their connection, and the balancer's, alive;
- the server closes the session (drain, kick, limits): count it, reconnect after a short pause;
- the run's time is up: stop between chunks, send ``end``, wait for the last ``completed`` and
  the close (at most ``finish_timeout``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import random
import ssl
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .client import ConnectFailed, ConnectionClosed, Stream, connect
from .corpus import Clip
from .events import (
    INFORMATIONAL_CODES,
    REFUSAL_CODES,
    Closed,
    Final,
    Partial,
    ServerError,
    SessionStarted,
)
from .scrape import ScrapeError, scrape
from .stats import RunStats, SessionTally, UserRecord

#: Seconds of silence after each clip, so the server hears the end of the utterance
#: (it needs ``min_silence``, 0.6 s by default).
TRAILING_SILENCE = 1.0

#: Longest wait between failed connection attempts.
MAX_BACKOFF = 10.0

#: Pause before reconnecting after the server ended a session (drain, kick): a person notices,
#: then clicks again.
RECONNECT_PAUSE = (0.2, 1.0)

#: Longest ``retry_after`` honoured as given (longer ones are capped: the run is finite).
MAX_RETRY_AFTER = 30.0

#: HTTP statuses at the upgrade that are the server's refusals, by the reason it counts.
HTTP_REFUSALS = {401: "unauthorized", 403: "origin_not_allowed", 429: "rate_limited"}


@attrs.frozen
class LoadSettings:
    url: str
    clients: int = 50
    concurrent: int = 5
    runtime: float = 300.0
    speed: float = 1.0
    binary: bool = False
    token: str | None = None
    seed: int = 0
    pause: tuple[float, float] = (1.0, 4.0)
    silent_users: int = 0
    silent_pause: float = 120.0
    source_addresses: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    finish_timeout: float = 30.0
    metrics_urls: tuple[str, ...] = ()
    sample_interval: float = 5.0
    warmup: float = 60.0
    cafile: str | None = None
    insecure: bool = False

    def describe(self) -> dict[str, Any]:
        """The settings as the report records them."""
        out = attrs.asdict(self)
        out["pause"] = list(self.pause)
        out["source_addresses"] = list(self.source_addresses)
        out["metrics_urls"] = list(self.metrics_urls)
        out["warmup_s"] = out.pop("warmup")
        out.pop("token")
        out["token"] = bool(self.token)
        return out

    def ssl_context(self) -> ssl.SSLContext | None:
        if not (
            self.url.startswith("wss:") or any(u.startswith("https:") for u in self.metrics_urls)
        ):
            return None
        context = ssl.create_default_context(cafile=self.cafile)
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def expand_addresses(spec: str) -> tuple[str, ...]:
    """``127.0.1.1,127.1.0.1`` or a range ``127.0.0.2-127.0.0.9`` (IPv4), or both mixed."""
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            first, last = (ipaddress.IPv4Address(p.strip()) for p in part.split("-", 1))
            if int(last) < int(first) or int(last) - int(first) > 4096:
                raise ValueError(f"bad address range {part!r}")
            out.extend(str(ipaddress.IPv4Address(i)) for i in range(int(first), int(last) + 1))
        else:
            out.append(str(ipaddress.ip_address(part)))
    return tuple(out)


@attrs.define(eq=False)
class _Session:
    """How one connection ended, as the user's loop needs it."""

    accepted: bool = False
    retry_after: float | None = None
    closed: Closed | None = None
    ended_by_us: bool = False
    failed: bool = False


@attrs.define(eq=False)
class LoadTest:
    """One run: the users, the sampler, and the figures they fill in."""

    settings: LoadSettings
    corpus: list[Clip]
    stats: RunStats = attrs.field(init=False)
    deadline: float = math.inf
    elapsed: float = 0.0  # seconds the whole run took, once it is over
    _gate: trio.Semaphore = attrs.field(init=False)
    _ssl: ssl.SSLContext | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        s = self.settings
        addresses = s.source_addresses
        self.stats = RunStats(
            [
                UserRecord(
                    i,
                    addresses[i % len(addresses)] if addresses else None,
                    silent=i >= s.clients - s.silent_users,
                )
                for i in range(s.clients)
            ]
        )
        self._gate = trio.Semaphore(max(1, s.concurrent))
        self._ssl = s.ssl_context()

    @property
    def now(self) -> float:
        return trio.current_time() - self.stats.started

    async def run(self, *, on_tick: Callable[[LoadTest], None] | None = None) -> RunStats:
        """Run every user until the runtime is over and each has finished; sample the servers
        before, during and after. ``on_tick`` is called about twice a second (the display)."""
        s = self.settings
        self.stats.started = trio.current_time()
        self.deadline = self.stats.started + s.runtime
        await self._sample_all()
        async with trio.open_nursery() as background:
            background.start_soon(self._sample_loop)
            background.start_soon(self._tick_loop, on_tick)
            # A run never outlives its runtime by more than the finishing and connecting bounds.
            with trio.move_on_at(self.deadline + s.finish_timeout + s.connect_timeout + 5):
                async with trio.open_nursery() as users:
                    for user in self.stats.users:
                        users.start_soon(self._user, user)
            background.cancel_scope.cancel()
        self._record_activity()
        await self._sample_all()
        self.elapsed = self.now
        return self.stats

    # -- one user --------------------------------------------------------------------------
    async def _user(self, user: UserRecord) -> None:
        rng = random.Random(f"{self.settings.seed}:{user.index}")
        backoff = 1.0
        while trio.current_time() < self.deadline:
            outcome = await self._session(user, rng)
            if outcome.ended_by_us:
                return
            if outcome.retry_after is not None:
                wait = min(outcome.retry_after, MAX_RETRY_AFTER) * rng.uniform(1.0, 1.5)
            elif outcome.failed:
                wait, backoff = backoff * rng.uniform(0.5, 1.0), min(backoff * 2, MAX_BACKOFF)
            else:
                wait, backoff = rng.uniform(*RECONNECT_PAUSE), 1.0
            await trio.sleep_until(min(self.deadline, trio.current_time() + wait))

    async def _session(self, user: UserRecord, rng: random.Random) -> _Session:
        """One connection, from the connect to its close."""
        s = self.settings
        outcome = _Session()
        user.attempts += 1
        gate_held = True
        await self._gate.acquire()
        self.stats.connecting += 1
        try:
            # The deadline covers the connect and the first answer; it is lifted once the
            # session is running (a nursery may not outlive a fail_after around its opening).
            with trio.CancelScope(deadline=trio.current_time() + s.connect_timeout) as scope:
                async with connect(
                    s.url,
                    token=s.token,
                    source_address=user.source_address,
                    ssl_context=self._ssl,
                    binary=s.binary,
                ) as stream:
                    first = await stream.receive()
                    scope.deadline = math.inf
                    self._gate.release()
                    self.stats.connecting -= 1
                    gate_held = False
                    if isinstance(first, SessionStarted):
                        outcome.accepted = True
                        user.accepted += 1
                        await self._converse(user, stream, rng, outcome)
                    else:
                        await self._refused(user, stream, first, outcome)
            if scope.cancelled_caught:
                user.client_errors["connect_timeout"] += 1
                outcome.failed = True
        except ConnectFailed as exc:
            if exc.status in HTTP_REFUSALS:
                user.refused[HTTP_REFUSALS[exc.status]] += 1
                outcome.retry_after = 5.0
            else:
                user.client_errors[f"http_{exc.status}" if exc.status else "connect_failed"] += 1
                outcome.failed = True
        finally:
            if gate_held:
                self._gate.release()
                self.stats.connecting -= 1
        return outcome

    async def _refused(
        self, user: UserRecord, stream: Stream, first: Any, outcome: _Session
    ) -> None:
        """The server's first answer was not ``session``: a refusal, or something worse."""
        if isinstance(first, ServerError):
            user.errors[first.code] += 1
            if first.code in REFUSAL_CODES:
                user.refused[first.code] += 1
                outcome.retry_after = first.retry_after if first.retry_after is not None else 5.0
            else:
                user.client_errors[f"before_session_{first.code}"] += 1
                outcome.failed = True
            with trio.move_on_after(2.0):  # the server's close follows
                event = first
                while not isinstance(event, Closed):
                    event = await stream.receive()
                user.closes[str(event.code)] += 1
        elif isinstance(first, Closed):
            user.closes[str(first.code)] += 1
            user.client_errors["closed_before_session"] += 1
            outcome.failed = True
        else:
            user.client_errors["unexpected_first_message"] += 1
            outcome.failed = True

    async def _converse(
        self, user: UserRecord, stream: Stream, rng: random.Random, outcome: _Session
    ) -> None:
        """An accepted session: speak and listen until the run ends or the server closes."""
        tally = SessionTally()
        user.connected = True
        speaking = trio.CancelScope()
        closed = trio.Event()

        async def listen() -> None:
            async for event in stream:
                if isinstance(event, Final):
                    tally.on_final(event)
                    user.finals += 1
                    latency = stream.latency(event)
                    if latency is not None:
                        user.latencies.append(latency)
                    self.stats.add_final(event.at, latency)
                elif isinstance(event, Partial):
                    user.partials += 1
                    gap = tally.on_partial(event)
                    if gap is not None:
                        self.stats.partial_gaps.append(gap)
                elif isinstance(event, ServerError):
                    user.errors[event.code] += 1
                    if event.code == "going_away":
                        tally.sent_away = True
                    if event.code not in INFORMATIONAL_CODES:
                        user.session_errors += 1
                    if event.retry_after is not None:
                        outcome.retry_after = event.retry_after
                elif isinstance(event, Closed):
                    outcome.closed = event
                    closed.set()
                    speaking.cancel()  # a silent user may be asleep: wake it

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                sent_on_closed = False
                with speaking:
                    try:
                        await self._speak(user, stream, rng, tally)
                    except ConnectionClosed:
                        # The server closed first; its going_away and close may still be
                        # queued for the listener, which records how the session ended.
                        sent_on_closed = True
                if not closed.is_set():
                    outcome.ended_by_us = not sent_on_closed
                    with trio.move_on_after(self.settings.finish_timeout) as waiting:
                        if outcome.ended_by_us:
                            with contextlib.suppress(ConnectionClosed):
                                await stream.end()
                        await closed.wait()
                    if waiting.cancelled_caught:
                        user.client_errors["finish_timeout"] += 1
                        nursery.cancel_scope.cancel()
        finally:
            user.connected = False
            tally.interrupt(stream.sent_seconds)
            self.stats.finish_session(user, tally)
        if outcome.closed is not None:
            user.closes[str(outcome.closed.code)] += 1
            if outcome.closed.code in (None, 1006):
                user.client_errors["connection_lost"] += 1

    async def _speak(
        self, user: UserRecord, stream: Stream, rng: random.Random, tally: SessionTally
    ) -> None:
        s = self.settings
        until = self.deadline
        # A first pause, so that the users do not all speak in step.
        await stream.silence(rng.uniform(0.0, s.pause[1]), speed=s.speed, until=until)
        while trio.current_time() < until:
            clip = rng.choice(self.corpus)
            user.clips_started += 1
            tally.start_clip(clip.name, clip.reference, stream.sent_seconds)
            progress = await stream.stream(clip.samples, speed=s.speed, until=until)
            tally.end_clip(stream.sent_seconds, progress.complete)
            self.stats.clip_lags.append(progress.lag_max)
            user.lag_max = max(user.lag_max, progress.lag_max)
            if not progress.complete:
                return
            await stream.silence(TRAILING_SILENCE, speed=s.speed, until=until)
            if user.silent:
                await trio.sleep_until(min(until, trio.current_time() + s.silent_pause))
            else:
                pause = max(0.0, rng.uniform(*s.pause) - TRAILING_SILENCE)
                await stream.silence(pause, speed=s.speed, until=until)

    # -- sampling --------------------------------------------------------------------------
    def _record_activity(self) -> None:
        self.stats.activity.append((self.now, self.stats.connected, self.stats.connecting))

    async def _tick_loop(self, on_tick: Callable[[LoadTest], None] | None) -> None:
        last_activity = -math.inf
        while True:
            if self.now - last_activity >= 1.0:
                self._record_activity()
                last_activity = self.now
            if on_tick is not None:
                on_tick(self)
            await trio.sleep(0.5)

    async def _sample_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.sample_interval)
            await self._sample_all()

    async def _sample_all(self) -> None:
        async def one(url: str) -> None:
            try:
                with trio.fail_after(5):
                    self.stats.samples.append(await scrape(url, self.now, ssl_context=self._ssl))
            except (ScrapeError, trio.TooSlowError) as exc:
                self.stats.scrape_errors[str(exc)[:120] or "timeout"] += 1

        async with trio.open_nursery() as nursery:
            for url in self.settings.metrics_urls:
                nursery.start_soon(one, url)
