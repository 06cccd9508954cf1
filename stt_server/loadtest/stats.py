"""What a load test counted, and the figures made from it (sans-IO: no sockets, no clock).

The simulated users (:mod:`users`) feed events in; :func:`summarize` turns the counts into the
report that the live display, the summary table, ``--json`` and ``--fail-if`` all read, so they
can never disagree.

Theory of the figures:

- a *session attempt* is one connection; it is *accepted* when the server's ``session`` message
  arrives, *refused* when the server says ``server_busy``/``rate_limited``/``unauthorized``
  instead (or answers the upgrade with HTTP 401/403), and a *client error* when it never gets
  that far (connection refused, a proxy's 502, a timeout) or ends abnormally;
- a *clip* is one audio file a user speaks; it is *complete* when all of it was sent (a clip cut
  by the end of the run or by the server closing is *interrupted* and not scored); each
  ``completed`` belongs to the clip its audio overlaps most, and a complete clip's text is
  scored against its reference (WER over all complete clips' words);
- *final latency* runs from the moment the client had sent the audio up to a final's ``end``
  (end of speech plus the server's padding) to the ``completed``'s arrival, so it includes the
  endpointing wait;
- a complete clip that got no text is *unfinalized*, a failure; except when the server sent the
  session away (``going_away``) and the clip began after the last ``completed``: a draining
  server stops reading at the end of its current utterance and says ``going_away`` only after
  that utterance's final, so speech in between is never heard. Such clips are counted apart,
  as *dropped at close*, and not scored;
- an utterance is *lost* when a partial of it was shown but no ``completed`` came before the
  session ended: the one failure the server promises never to commit.
"""

from __future__ import annotations

import array
import collections
import math
from typing import Any

import attrs

from .events import INFORMATIONAL_CODES, Final, Partial
from .scrape import ServerSample, memory_report, server_report
from .wer import normalize, word_error_rate

#: Clips without text listed per user in the report (the count is always complete).
MAX_LISTED = 20

#: Seconds of recent finals that the live display's "now" percentiles cover.
RECENT_WINDOW = 60.0


def percentile(values: Any, q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation, as numpy's default); None when empty."""
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@attrs.define(eq=False)
class ClipRecord:
    name: str
    reference: str | None
    start: float  # session audio seconds when the clip began
    end: float | None = None  # ... and when its last sample had been sent
    complete: bool = False
    texts: list[str] = attrs.Factory(list)


@attrs.define(eq=False)
class SessionTally:
    """One accepted session: which clips went where, which utterances were shown and finished."""

    clips: list[ClipRecord] = attrs.Factory(list)
    finals: list[Final] = attrs.Factory(list)
    partial_ids: set[int] = attrs.Factory(set)
    final_ids: set[int] = attrs.Factory(set)
    #: The server ended the session itself with ``going_away`` (drain, shutdown).
    sent_away: bool = False
    _open_partial: tuple[int, float] | None = None  # utterance id and time of the last partial

    def start_clip(self, name: str, reference: str | None, position: float) -> None:
        self.clips.append(ClipRecord(name, reference, position))

    def end_clip(self, position: float, complete: bool) -> None:
        clip = self.clips[-1]
        clip.end, clip.complete = position, complete

    def on_partial(self, partial: Partial) -> float | None:
        """Record a partial; the gap since the previous partial of its utterance, if any."""
        self.partial_ids.add(partial.utterance_id)
        last = self._open_partial
        self._open_partial = (partial.utterance_id, partial.at)
        if last is None or last[0] != partial.utterance_id:
            return None
        return partial.at - last[1]

    def on_final(self, final: Final) -> None:
        self.finals.append(final)
        self.final_ids.add(final.utterance_id)

    def interrupt(self, position: float) -> None:
        """The session ended while a clip was being spoken: that clip is not complete."""
        if self.clips and self.clips[-1].end is None:
            self.end_clip(position, complete=False)

    def heard_until(self) -> float:
        """The end of the last ``completed`` (session audio seconds; 0 when none came)."""
        return max((f.end for f in self.finals), default=0.0)

    def lost_utterances(self) -> int:
        return len(self.partial_ids - self.final_ids)

    def assign_finals(self) -> None:
        """Give each final's text to the clip whose audio it overlaps most (or, overlapping
        none, to the last clip that began before it)."""
        for clip in self.clips:
            clip.texts.clear()
        for final in self.finals:
            if not final.text.strip():
                continue
            best, best_overlap = None, 0.0
            for clip in self.clips:
                end = clip.end if clip.end is not None else math.inf
                overlap = min(end, final.end) - max(clip.start, final.start)
                if overlap > best_overlap:
                    best, best_overlap = clip, overlap
            if best is None:
                earlier = [c for c in self.clips if c.start <= final.start]
                best = earlier[-1] if earlier else None
            if best is not None:
                best.texts.append(final.text.strip())


@attrs.define(eq=False)
class UserRecord:
    """Everything one simulated user lived through, over all its sessions."""

    index: int
    source_address: str | None = None
    silent: bool = False
    attempts: int = 0
    accepted: int = 0
    refused: collections.Counter[str] = attrs.Factory(collections.Counter)
    #: Every ``error`` message received, by code (refusals included): what the server counted.
    errors: collections.Counter[str] = attrs.Factory(collections.Counter)
    #: Failures seen by the client alone (connect failed, proxy status, lost connection, ...).
    client_errors: collections.Counter[str] = attrs.Factory(collections.Counter)
    #: Error messages inside an accepted session that are not informational.
    session_errors: int = 0
    closes: collections.Counter[str] = attrs.Factory(collections.Counter)
    clips_started: int = 0
    clips_complete: int = 0
    clips_unfinalized: int = 0
    #: Complete clips sent after a leaving server had stopped listening (see finish_session).
    clips_dropped_at_close: int = 0
    #: The first few clips that got no text: (clip, audio start, audio end), to look into.
    unfinalized: list[tuple[str, float, float]] = attrs.Factory(list)
    finals: int = 0
    partials: int = 0
    lost_utterances: int = 0
    latencies: list[float] = attrs.Factory(list)
    wer_errors: float = 0.0
    wer_words: int = 0
    lag_max: float = 0.0
    connected: bool = False

    @property
    def reconnects(self) -> int:
        return max(0, self.attempts - 1)

    @property
    def failures(self) -> int:
        return self.session_errors + sum(self.client_errors.values())


@attrs.define(eq=False)
class RunStats:
    """The whole run, as the users and the sampler report it."""

    users: list[UserRecord]
    started: float = 0.0  # trio clock at the start
    connecting: int = 0
    #: (seconds since start, latency) of every final, in arrival order.
    final_times: array.array = attrs.Factory(lambda: array.array("d"))
    final_latencies: array.array = attrs.Factory(lambda: array.array("d"))
    partial_gaps: array.array = attrs.Factory(lambda: array.array("d"))
    #: Worst send lag behind real time, per clip.
    clip_lags: array.array = attrs.Factory(lambda: array.array("d"))
    #: (seconds since start, users connected, users connecting) once a second.
    activity: list[tuple[float, int, int]] = attrs.Factory(list)
    samples: list[ServerSample] = attrs.Factory(list)
    #: Per clip name: [complete clips, word errors, reference words].
    per_clip: dict[str, list[float]] = attrs.Factory(dict)
    scrape_errors: collections.Counter[str] = attrs.Factory(collections.Counter)

    @property
    def connected(self) -> int:
        return sum(u.connected for u in self.users)

    def add_final(self, at: float, latency: float | None) -> None:
        if latency is not None:
            self.final_times.append(at - self.started)
            self.final_latencies.append(latency)

    def finish_session(self, user: UserRecord, tally: SessionTally) -> None:
        """Score a session's clips once it is over."""
        tally.assign_finals()
        user.lost_utterances += tally.lost_utterances()
        heard_until = tally.heard_until()
        for clip in tally.clips:
            if not clip.complete:
                continue
            text = " ".join(clip.texts)
            if not text and tally.sent_away and clip.start >= heard_until - 0.05:
                # Spoken after the server's last utterance while it was leaving: it stopped
                # reading at that utterance's end, and going_away arrived only after its final.
                user.clips_dropped_at_close += 1
                continue
            user.clips_complete += 1
            tally_clip = self.per_clip.setdefault(clip.name, [0, 0.0, 0])
            tally_clip[0] += 1
            if not text:
                user.clips_unfinalized += 1
                if len(user.unfinalized) < MAX_LISTED:
                    user.unfinalized.append(
                        (clip.name, round(clip.start, 2), round(clip.end or 0, 2))
                    )
            if clip.reference:
                words = len(normalize(clip.reference).split())
                errors = word_error_rate(clip.reference, text) * words
                user.wer_errors += errors
                user.wer_words += words
                tally_clip[1] += errors
                tally_clip[2] += words

    def recent_latencies(self, now: float, window: float = RECENT_WINDOW) -> list[float]:
        """Latencies of the finals that arrived in the last ``window`` seconds."""
        since = now - self.started - window
        out = []
        for i in range(len(self.final_times) - 1, -1, -1):
            if self.final_times[i] < since:
                break
            out.append(self.final_latencies[i])
        return out


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _counter_sum(counters: Any) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for counter in counters:
        total.update(counter)
    return dict(sorted(total.items()))


def summarize(stats: RunStats, settings: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """The report: overall figures at the top level, then ``server``, ``memory`` and ``users``."""
    users = stats.users
    latencies = list(stats.final_latencies)
    attempts = sum(u.attempts for u in users)
    refused = _counter_sum(u.refused for u in users)
    failures = sum(u.failures for u in users)
    wer_words = sum(u.wer_words for u in users)
    report: dict[str, Any] = {
        "settings": settings,
        "elapsed_s": round(elapsed, 2),
        "users": len(users),
        "session_attempts": attempts,
        "sessions_accepted": sum(u.accepted for u in users),
        "sessions_refused": sum(refused.values()),
        "sessions_refused_by_reason": refused,
        "reconnects": sum(u.reconnects for u in users),
        "users_never_connected": sum(1 for u in users if u.accepted == 0),
        "users_with_errors": sum(1 for u in users if u.failures),
        "errors": _counter_sum(u.errors for u in users),
        "client_errors": _counter_sum(u.client_errors for u in users),
        "errors_total": failures,
        "error_rate": round(failures / attempts, 4) if attempts else None,
        "refusal_rate": round(sum(refused.values()) / attempts, 4) if attempts else None,
        "closes": _counter_sum(u.closes for u in users),
        "clips_started": sum(u.clips_started for u in users),
        "clips_complete": sum(u.clips_complete for u in users),
        "clips_unfinalized": sum(u.clips_unfinalized for u in users),
        "clips_dropped_at_close": sum(u.clips_dropped_at_close for u in users),
        "utterances_finalized": sum(u.finals for u in users),
        "utterances_lost": sum(u.lost_utterances for u in users),
        "partials": sum(u.partials for u in users),
        "final_latency_p50_s": _rounded(percentile(latencies, 50)),
        "final_latency_p95_s": _rounded(percentile(latencies, 95)),
        "final_latency_p99_s": _rounded(percentile(latencies, 99)),
        "final_latency_max_s": _rounded(max(latencies) if latencies else None),
        "partial_gap_p50_s": _rounded(percentile(stats.partial_gaps, 50)),
        "partial_gap_p95_s": _rounded(percentile(stats.partial_gaps, 95)),
        "realtime_lag_p95_s": _rounded(percentile(stats.clip_lags, 95)),
        "realtime_lag_max_s": _rounded(max(stats.clip_lags) if stats.clip_lags else None),
        "wer": round(sum(u.wer_errors for u in users) / wer_words, 4) if wer_words else None,
        "wer_words": wer_words,
        "per_clip": {
            name: {
                "complete": int(n),
                "wer": round(errors / words, 4) if words else None,
                "words": int(words),
            }
            for name, (n, errors, words) in sorted(stats.per_clip.items())
        },
        "latency_over_time": _latency_over_time(stats),
        "server": server_report(stats.samples),
        "memory": memory_report(stats.samples, settings.get("warmup_s", 0.0)),
        "per_user": [_user_report(u) for u in users],
    }
    if stats.scrape_errors:
        report["scrape_errors"] = dict(stats.scrape_errors)
    return report


def _latency_over_time(stats: RunStats, buckets: int = 10) -> list[dict[str, Any]]:
    """Final latency p50/p95 per tenth of the run: flat means no degradation over time."""
    if not stats.final_times:
        return []
    span = max(stats.final_times) or 1.0
    width = span / buckets
    rows = []
    for b in range(buckets):
        lo, hi = b * width, (b + 1) * width
        values = [
            lat
            for t, lat in zip(stats.final_times, stats.final_latencies, strict=True)
            if lo <= t < hi or (b == buckets - 1 and t == hi)
        ]
        rows.append(
            {
                "from_s": round(lo, 1),
                "to_s": round(hi, 1),
                "finals": len(values),
                "p50_s": _rounded(percentile(values, 50)),
                "p95_s": _rounded(percentile(values, 95)),
            }
        )
    return rows


def _user_report(user: UserRecord) -> dict[str, Any]:
    return {
        "user": user.index,
        "source_address": user.source_address,
        "silent": user.silent,
        "attempts": user.attempts,
        "sessions_accepted": user.accepted,
        "sessions_refused": dict(user.refused),
        "reconnects": user.reconnects,
        "errors": dict(user.errors),
        "client_errors": dict(user.client_errors),
        "closes": dict(user.closes),
        "clips_started": user.clips_started,
        "clips_complete": user.clips_complete,
        "clips_unfinalized": user.clips_unfinalized,
        "clips_dropped_at_close": user.clips_dropped_at_close,
        "unfinalized_clips": [list(c) for c in user.unfinalized],
        "utterances_finalized": user.finals,
        "utterances_lost": user.lost_utterances,
        "partials": user.partials,
        "final_latency_p50_s": _rounded(percentile(user.latencies, 50)),
        "final_latency_p95_s": _rounded(percentile(user.latencies, 95)),
        "wer": round(user.wer_errors / user.wer_words, 4) if user.wer_words else None,
        "realtime_lag_max_s": round(user.lag_max, 3),
    }


def is_failure_code(code: str) -> bool:
    """An error message inside a session that counts against the error rate."""
    return code not in INFORMATIONAL_CODES
