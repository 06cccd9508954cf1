"""One client session: a nursery of intake, recognizer and emitter tasks.

::

    intake ──(UtteranceEnded, bounded channel)──> finalizer ──┐
       └────(latest PartialDue, one slot)───────> partials ───┴─> outbox ──> emitter ──> client
    heartbeat: ping every ping_interval, drop the peer after ping_timeout without a pong

Every piece of recognition state (resampler, VAD state, segmenter, prompt, error counter) lives
on the session object and nowhere else, so sessions can never see each other's audio or text.

What goes over the wire is the session's *dialect* (:mod:`.dialect`): the native protocol, or
OpenAI's Realtime protocol (:mod:`.realtime_protocol`). The session parses through it and tells
it what happened; the dialect answers with the messages to send. One recognizer, any protocol.

Ending a session has exactly two shapes. A *graceful close* (the client's ``end``, a fatal
protocol error, server shutdown, a kick) stops intake, flushes the open utterance, lets the
finalizer transcribe everything owed, sends the optional ``error`` and then closes with the
requested code, all within ``shutdown_grace``. An *abort* (peer gone, pings unanswered, a
client that stopped reading) cancels everything at once, because nobody is left to receive.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Sequence

import attrs
import numpy as np
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .audio import Resampler, pcm16_to_float
from .config import Config
from .context import RecentSpeech
from .dialect import Clear, Dialect, NativeDialect, SessionEvent, SessionUpdate, TurnDetection
from .engine import Engine, TranscribeOptions, Transcript
from .errors import (
    MAX_CONSECUTIVE_ERRORS,
    AudioTooFast,
    CloseCode,
    ErrorCode,
    InvalidMessage,
    SttError,
)
from .metrics import Metrics
from .outbox import Outbox, OutboxOverflow
from .protocol import (
    DETECT_LANGUAGE,
    AudioChunk,
    ConfigUpdate,
    End,
    Flush,
)
from .ratelimit import TokenBucket
from .segmenter import (
    PartialDue,
    Segmenter,
    SegmenterEvent,
    SegmenterSettings,
    SpeechPaused,
    SpeechResumed,
    UtteranceEnded,
    UtteranceStarted,
)
from .stats import SessionStatistics
from .vad import SileroModel, VadStream

log = logging.getLogger(__name__)

#: Finished utterances waiting for their final transcript. Small, because each holds up to
#: ``max_utterance`` seconds of audio; when full, intake waits (backpressure on the socket).
_FINALS_QUEUE = 4

#: How long the WebSocket closing handshake may take before the TCP stream is just closed.
CLOSE_TIMEOUT = 5.0

#: How long an aborted session's close frame may take to go out before the socket is closed.
ABORT_CLOSE_WAIT = 1.0

#: What a client is told when something failed inside the server; the details go to the log.
INTERNAL_ERROR_MESSAGE = "internal server error; the details are in the server's log"


def finish_timeout(config: Config) -> float:
    """Longest a graceful close may take: transcribing what is owed, then delivering it."""
    return config.inference_timeout + config.send_timeout


@attrs.frozen
class CloseRequest:
    """How to end a session gracefully: the close code and the error, if any, to send first."""

    close_code: CloseCode
    error_code: ErrorCode | None = None
    message: str = ""


@attrs.define(eq=False)
class _Speculation:
    """A final decoded while the endpoint's silence is still being waited for."""

    utterance_id: int
    samples: int  # length of the audio it was decoded on
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)
    #: None until it succeeds: failed, cancelled or replaced all leave it so.
    transcript: Transcript | None = None
    #: Speech resumed before the endpoint: no final, but its text, when it comes, is the
    #: utterance so far, decoded with context, and is shown as a partial rather than thrown
    #: away.
    resumed: bool = False
    #: What it was decoded in (the language None where the model detected it).
    language: str | None = None
    task: str = "transcribe"


@attrs.frozen
class _ShownPartial:
    """The last partial the client was shown. The next partial of the same utterance, in the
    same language and task, may decode only the utterance's end and join this text."""

    utterance_id: int
    language: str | None
    task: str
    text: str
    samples: int  # of the utterance it was decoded on


class _LatestPartial:
    """A one-slot mailbox: the partials task only ever wants the newest request."""

    def __init__(self) -> None:
        self._value: PartialDue | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def set(self, value: PartialDue) -> None:
        self._value = value
        self._lot.unpark_all()

    def discard_up_to(self, utterance_id: int) -> None:
        if self._value is not None and self._value.utterance_id <= utterance_id:
            self._value = None

    async def take(self) -> PartialDue:
        while self._value is None:
            await self._lot.park()
        value, self._value = self._value, None
        return value


class Session:
    def __init__(
        self,
        ws: WebSocketConnection,
        *,
        session_id: str,
        peer: str,
        config: Config,
        engine: Engine,
        vad_model: SileroModel,
        model_name: str,
        language_check: LanguageCheck,
        metrics: Metrics,
        token_label: str | None = None,
        dialect: Dialect | None = None,
    ) -> None:
        self.session_id = session_id
        self._dialect: Dialect = dialect if dialect is not None else NativeDialect()
        self.token_label = token_label
        self._metrics = metrics
        self.peer = peer
        self._ws = ws
        self._config = config
        self._engine = engine
        self._model_name = model_name
        self._language_check = language_check
        self._language = config.language  # None: the model detects it
        self._task = "transcribe"
        self._prompt: str | None = None
        self._hotwords: str | None = None
        # Partials are previews: when the language is detected, they reuse what the last final
        # found instead of paying for a detection each time.
        self._detected_language: str | None = None
        self._resampler = Resampler(self._dialect.sample_rate or config.sample_rate)
        self._vad = VadStream(vad_model)
        self._segmenter = Segmenter(
            SegmenterSettings(
                threshold=config.vad_threshold,
                min_silence=config.min_silence,
                max_utterance=config.max_utterance,
                speech_pad=config.speech_pad,
                partial_interval=config.partial_interval,
                report_starts=self._dialect.reports_speech_start,
            )
        )
        self._outbox = Outbox(config.max_pending_finals, config.max_pending_bytes)
        self._finals_send, self._finals_recv = trio.open_memory_channel[
            tuple[UtteranceEnded, float]
        ](_FINALS_QUEUE)
        self._finals_pending = 0
        # Finals that intake had produced when a close cancelled it; _finish sends them first.
        self._undelivered: list[UtteranceEnded] = []
        self._latest_partial = _LatestPartial()
        self._partial_in_flight: tuple[int, trio.CancelScope] | None = None
        self._shown_partial: _ShownPartial | None = None
        self._speculation: _Speculation | None = None
        self._last_partial_at: tuple[int, float] | None = None  # (utterance id, time shown)
        self._partial_gap: float | None = None  # moving average
        self._recent = RecentSpeech(config.context_seconds, right_sized=config.short_finals)
        self._consecutive_errors = 0
        self._errors_total = 0
        self._audio_in = 0.0
        self._utterances = 0
        self._last_partial_latency: float | None = None
        self._last_final_latency: float | None = None
        self._started_wall = time.time()
        self._started = trio.current_time()
        self._close_request: CloseRequest | None = None
        self._audio_rate = (
            TokenBucket.full(config.max_realtime_factor, config.audio_burst, self._started)
            if config.max_realtime_factor
            else None
        )
        self._close_after_utterance: CloseRequest | None = None
        self._intake_scope = trio.CancelScope()
        self._finalizer_done = trio.Event()
        self._emitter_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._heartbeat_scope = trio.CancelScope()
        self._abort_close: CloseCode | None = None
        self.end_reason = "running"

    # -- public ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the client until the session ends one way or the other."""
        self._put_all(self._dialect.greeting(self.session_id, self._model_name, self._language))
        log.info(
            "session %s start peer=%s protocol=%s",
            self.session_id,
            self.peer,
            self._dialect.name,
            extra=self._fields("start"),
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._emitter)
                nursery.start_soon(self._finalizer)
                nursery.start_soon(self._partials)
                nursery.start_soon(self._heartbeat)
                if self._config.max_session_length:
                    nursery.start_soon(self._length_limit)
                nursery.start_soon(self._intake_then_close)
            if self._abort_close is not None:
                # The peer may still be there (it stopped reading, or its pongs are lost): it
                # learns that this was no normal end, if it is listening at all.
                with trio.move_on_after(ABORT_CLOSE_WAIT) as scope:
                    scope.shield = True
                    await self._ws.aclose(int(self._abort_close), self.end_reason)
        finally:
            duration = trio.current_time() - self._started
            log.info(
                "session %s end peer=%s reason=%s duration=%.1fs audio=%.1fs utterances=%d "
                "errors=%d",
                self.session_id,
                self.peer,
                self.end_reason,
                duration,
                self._audio_in,
                self._utterances,
                self._errors_total,
                extra=self._fields(
                    "end",
                    reason=self.end_reason,
                    duration_s=round(duration, 3),
                    audio_s=round(self._audio_in, 3),
                    utterances=self._utterances,
                    errors=self._errors_total,
                ),
            )

    def _fields(self, event: str, **more: object) -> dict[str, object]:
        """Fields a JSON log line carries as keys (see logs.JsonFormatter)."""
        return {
            "event": f"session_{event}",
            "session_id": self.session_id,
            "peer": self.peer,
            "token_label": self.token_label,
            "device": self._engine.device,
            **more,
        }

    def move_to(self, engine: Engine, why: str) -> None:
        """Continue on another device (its old one failed); the client is told, not closed."""
        self._engine = engine
        log.warning("session %s: %s", self.session_id, why)
        with contextlib.suppress(OutboxOverflow, trio.ClosedResourceError):
            self._send_error(ErrorCode.DEVICE_CHANGED, why)

    def finish_current_utterance(self, request: CloseRequest) -> None:
        """Close gracefully once the open utterance has ended by itself (now, if none is open)."""
        if self._segmenter.open_utterance_id is None:
            self.close(request)
        else:
            self._close_after_utterance = request

    def _send_error(self, code: ErrorCode, message: str, *, reply: bool = False) -> None:
        """``reply``: the error is about the client message being handled."""
        self._metrics.errors.labels(code.value).inc()
        self._outbox.put(self._dialect.error(code, message, reply=reply))

    def _put_all(self, messages: list[str]) -> None:
        for message in messages:
            self._outbox.put(message)

    def close(self, request: CloseRequest) -> None:
        """Ask the session to end gracefully (server shutdown, operator kick)."""
        if self._close_request is None:
            self._close_request = request
        self._intake_scope.cancel()

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            session_id=self.session_id,
            peer=self.peer,
            started=self._started_wall,
            duration=trio.current_time() - self._started,
            audio_seconds=self._audio_in,
            utterances=self._utterances,
            errors=self._errors_total,
            device=self._engine.device,
            last_partial_latency=self._last_partial_latency,
            last_final_latency=self._last_final_latency,
            token_label=self.token_label,
            partial_gap=self._partial_gap,
        )

    # -- ending ----------------------------------------------------------------------------
    def _abort(self, reason: str, close: CloseCode | None = CloseCode.POLICY_VIOLATION) -> None:
        """End at once: nobody is left to receive, or the client broke a liveness rule
        (``close`` then tells it so, if it still listens)."""
        self.end_reason = reason
        self._abort_close = close
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _intake_then_close(self) -> None:
        request = None
        with self._intake_scope:
            try:
                request = await self._intake()
            except OutboxOverflow:
                self._abort("client stopped reading")
                return
            except Exception:
                # A bug or a library failure on this client's input (decoding, resampling,
                # VAD): this session ends, gracefully, so that the finals it is owed still
                # arrive; nothing about the failure reaches the client.
                log.exception(
                    "session %s: internal error in intake",
                    self.session_id,
                    extra=self._fields("error", error_code=ErrorCode.INTERNAL_ERROR.value),
                )
                request = CloseRequest(
                    CloseCode.INTERNAL_ERROR, ErrorCode.INTERNAL_ERROR, INTERNAL_ERROR_MESSAGE
                )
            if request is None:
                self._abort("peer closed", close=None)
                return
        request = request or self._close_request
        assert request is not None
        self.end_reason = request.error_code.value if request.error_code else "end"
        # From here the close is bounded by finish_timeout, not by liveness: stop pinging (a
        # slow final must not turn into a ping timeout that drops it), and keep taking what
        # the client still sends, so the WebSocket's reader goes on seeing pongs and the close.
        self._heartbeat_scope.cancel()
        assert self._nursery is not None
        self._nursery.start_soon(self._discard_incoming)
        with trio.move_on_after(finish_timeout(self._config)):
            try:
                await self._finish(request)
            except OutboxOverflow:
                self._abort("client stopped reading")
                return
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self._ws.aclose(int(request.close_code), request.message or None)
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()

    async def _discard_incoming(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self._ws.get_message()

    async def _finish(self, request: CloseRequest) -> None:
        undelivered, self._undelivered = self._undelivered, []
        try:
            tail = self._flush()
        except Exception:
            # What failed in intake may fail again on the last samples (a broken resampler or
            # VAD): the open utterance then ends without them, but it still gets its final.
            log.exception(
                "session %s: internal error flushing the last audio",
                self.session_id,
                extra=self._fields("error", error_code=ErrorCode.INTERNAL_ERROR.value),
            )
            tail = self._flush(decode=False)
        await self._dispatch_all([*undelivered, *tail])
        self._finals_send.close()
        await self._finalizer_done.wait()
        if request.error_code is not None:
            self._send_error(request.error_code, request.message)
        self._outbox.close()
        await self._emitter_done.wait()

    # -- intake ----------------------------------------------------------------------------
    async def _receive(self) -> str | bytes | SttError | None:
        """The next message, or the connection's report of a frame limit broken; ``None`` on
        idle timeout. Raises ConnectionClosed."""
        if not self._config.idle_timeout:
            return await self._ws.get_message()
        with trio.move_on_after(self._config.idle_timeout):
            return await self._ws.get_message()
        return None

    async def _intake(self) -> CloseRequest | None:
        """Read until the session should end; ``None`` means the peer is gone."""
        while True:
            try:
                message = await self._receive()
            except ConnectionClosed:
                return None
            if message is None:
                return CloseRequest(
                    CloseCode.NORMAL,
                    ErrorCode.IDLE_TIMEOUT,
                    f"no message for {self._config.idle_timeout:g} s",
                )
            try:
                if isinstance(message, SttError):
                    raise message
                event = self._dialect.parse(message)
                if isinstance(event, End):
                    return CloseRequest(CloseCode.NORMAL)
                await self._handle(event)
            except SttError as exc:
                self._consecutive_errors += 1
                self._errors_total += 1
                log.info(
                    "session %s error %s: %s",
                    self.session_id,
                    exc.error_code.value,
                    exc.message,
                    extra=self._fields("error", error_code=exc.error_code.value),
                )
                if exc.close_code is not None:
                    return CloseRequest(exc.close_code, exc.error_code, exc.message)
                self._send_error(exc.error_code, exc.message, reply=True)
                if self._consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                    return CloseRequest(
                        CloseCode.POLICY_VIOLATION,
                        ErrorCode.TOO_MANY_ERRORS,
                        f"{MAX_CONSECUTIVE_ERRORS} consecutive errors",
                    )
                continue
            self._consecutive_errors = 0

    async def _handle(self, event: SessionEvent) -> None:
        """Act on one client event (``End`` never comes here: intake ends on it)."""
        if isinstance(event, AudioChunk):
            if event.sample_rate is not None:
                await self._feed(self._resampler.set_rate(event.sample_rate))
            samples = pcm16_to_float(event.pcm)
            seconds = samples.size / self._resampler.input_rate
            if self._audio_rate is not None and self._audio_rate.take(seconds, trio.current_time()):
                raise AudioTooFast(
                    f"audio arrives faster than {self._config.max_realtime_factor:g}x real time"
                )
            self._audio_in += seconds
            self._metrics.audio_seconds.inc(seconds)
            await self._feed(self._resampler.process(samples))
        elif isinstance(event, ConfigUpdate):
            await self._configure(event)
            self._put_all(self._dialect.updated())
        elif isinstance(event, SessionUpdate):
            await self._configure(event.config)
            if event.turn_detection is not None:
                self._set_turn_detection(event.turn_detection)
            self._put_all(self._dialect.updated())
        elif isinstance(event, Clear):
            self._clear()
        elif isinstance(event, Flush):
            ended = self._flush()
            if not ended and self._dialect.commit_empty():
                ended = [self._segmenter.empty_utterance()]
            await self._dispatch_all(ended)

    async def _configure(self, event: ConfigUpdate) -> None:
        # Checked before anything changes, so that a refused update changes nothing.
        language = self._language_check(event.language) if event.language is not None else None
        task = self._language_check.task(event.task) if event.task is not None else None
        if (event.language is not None and language != self._language) or (
            task is not None and task != self._task
        ):
            # The context's text is forced on the decoder: in the old language or task, it
            # would pull the next finals back into them.
            self._recent.clear()
        if event.language is not None:
            self._language = language
            self._detected_language = None
        if task is not None:
            self._task = task
        if event.prompt is not None:
            self._prompt = event.prompt or None
        if event.hotwords is not None:
            self._hotwords = event.hotwords or None
        if event.sample_rate is not None:
            await self._feed(self._resampler.set_rate(event.sample_rate))

    def _set_turn_detection(self, turn: TurnDetection) -> None:
        """This session's endpointing from now on (OpenAI's turn_detection)."""
        self._segmenter.configure(
            attrs.evolve(
                self._segmenter.settings,
                threshold=turn.threshold,
                min_silence=turn.silence,
                speech_pad=turn.prefix_padding,
                endpointing=turn.enabled,
            )
        )

    def _clear(self) -> None:
        """Throw away the audio not yet committed: the open utterance and any work on it."""
        dropped = self._segmenter.discard()
        if dropped is not None:
            self._latest_partial.discard_up_to(dropped)
            if self._partial_in_flight and self._partial_in_flight[0] == dropped:
                self._partial_in_flight[1].cancel()
            self._drop_speculation("audio cleared")
        self._put_all(self._dialect.cleared(dropped))

    async def _feed(self, samples: np.ndarray) -> None:
        if not samples.size:
            return
        windows, probs = self._vad.process(samples)
        events: list[SegmenterEvent] = []
        for window, prob in zip(windows, probs, strict=True):
            events.extend(self._segmenter.push(window, float(prob)))
        await self._dispatch_all(events)

    def _flush(self, *, decode: bool = True) -> list[UtteranceEnded]:
        """Push every sample still inside the resampler and VAD into the open utterance, and
        close it (``decode=False``: close it with what the segmenter already has)."""
        events: list[SegmenterEvent] = []
        if decode:
            tail = self._resampler.drain()
            if tail.size:
                windows, probs = self._vad.process(tail)
                for window, prob in zip(windows, probs, strict=True):
                    events.extend(self._segmenter.push(window, float(prob)))
            self._segmenter.append_tail(self._vad.take_pending())
        events.extend(self._segmenter.flush())
        return [e for e in events if isinstance(e, UtteranceEnded)]

    async def _dispatch_all(self, events: Sequence[SegmenterEvent]) -> None:
        for i, event in enumerate(events):
            try:
                await self._dispatch(event)
            except trio.Cancelled:
                # Only the finals channel can block; what it did not take is still owed.
                self._undelivered.extend(e for e in events[i:] if isinstance(e, UtteranceEnded))
                raise

    async def _dispatch(self, event: SegmenterEvent) -> None:
        if isinstance(event, UtteranceStarted):
            self._put_all(self._dialect.speech_started(event.utterance_id, event.start))
            return
        if isinstance(event, PartialDue):
            self._latest_partial.set(event)
            return
        if isinstance(event, SpeechPaused):
            self._speculate(event)
            return
        if isinstance(event, SpeechResumed):
            self._speech_resumed()
            return
        self._put_all(self._dialect.utterance_ended(event.utterance_id, event.end, event.reason))
        # A partial of an utterance that has just ended is wasted work: drop it, queued or running.
        self._latest_partial.discard_up_to(event.utterance_id)
        if self._partial_in_flight and self._partial_in_flight[0] <= event.utterance_id:
            self._partial_in_flight[1].cancel()
        self._finals_pending += 1
        try:
            await self._finals_send.send((event, trio.current_time()))
        except trio.Cancelled:
            self._finals_pending -= 1
            raise
        if self._close_after_utterance is not None and event.reason != "flush":
            # Draining: the utterance this session was in has ended by itself, so it may go.
            self.close(self._close_after_utterance)

    # -- recognizer ------------------------------------------------------------------------
    async def _finalizer(self) -> None:
        async with self._finals_recv:
            async for ended, ended_at in self._finals_recv:
                try:
                    await self._finalize(ended, ended_at)
                except OutboxOverflow:
                    self._abort("client stopped reading")
                    return
                finally:
                    self._finals_pending -= 1
        self._finalizer_done.set()

    # -- speculative finals ------------------------------------------------------------------
    def _speculate(self, paused: SpeechPaused) -> None:
        """Decode the final now, while the rest of ``min_silence`` is waited for. Only when no
        earlier final is owed: the speaker context must be what the real final would see."""
        self._drop_speculation("a newer pause")
        if (
            not self._config.speculative_finals
            or self._finals_pending
            or paused.speech < self._config.min_speech
            or self._nursery is None
        ):
            return
        speculation = _Speculation(paused.utterance_id, paused.audio.size)
        self._speculation = speculation
        self._nursery.start_soon(self._run_speculation, speculation, paused.audio)

    async def _run_speculation(self, speculation: _Speculation, audio: np.ndarray) -> None:
        if speculation.resumed:
            # Speech came back before this task got to run: nothing to guess. (From here to
            # the job being queued there is no checkpoint, so a later resume finds it queued.)
            speculation.done.set()
            return
        request, options = self._request(audio, final=True)
        options = attrs.evolve(options, speculative=True)
        speculation.language, speculation.task = options.language, options.task
        with speculation.scope:
            try:
                with trio.fail_after(self._config.inference_timeout):
                    speculation.transcript = await self._engine.transcribe(
                        request, options, owner=self
                    )
            except Exception:  # the real final will try again, and report what fails then
                pass
        speculation.done.set()
        if speculation.resumed:
            self._show_guess(speculation)

    def _speech_resumed(self) -> None:
        """The pause was no endpoint, so the guess is no final. Still queued, it leaves the
        queue; already running, it is left to end (its work cannot be taken back); its text,
        now or when it ends, is shown as a partial (a tenth of the workers' time at 16 users
        went on guesses dropped while they ran: docs/benchmarks.md, tenth round)."""
        speculation = self._discard_speculation("speech resumed")
        if speculation is None:
            return
        speculation.resumed = True
        self._engine.withdraw_speculative(self)
        if speculation.done.is_set():
            self._show_guess(speculation)

    def _show_guess(self, speculation: _Speculation) -> None:
        """A guess at a final that speech overtook, as the utterance's partial."""
        transcript = speculation.transcript
        if transcript is None:
            return
        # Decoded with the language detected, the text is in the one the partials will use.
        language = speculation.language or transcript.language
        utterance_id, samples = speculation.utterance_id, speculation.samples
        if self._show_partial(utterance_id, language, speculation.task, transcript.text, samples):
            self._metrics.speculative_finals.labels("shown").inc()

    def _drop_speculation(self, why: str) -> None:
        speculation = self._discard_speculation(why)
        if speculation is not None:
            speculation.scope.cancel()

    def _discard_speculation(self, why: str) -> _Speculation | None:
        """The guess, if any, is no final: forgotten as such, counted, and given back."""
        speculation, self._speculation = self._speculation, None
        if speculation is not None:
            self._metrics.speculative_finals.labels("discarded").inc()
            log.debug("session %s: speculative final dropped (%s)", self.session_id, why)
        return speculation

    async def _take_speculation(self, ended: UtteranceEnded) -> Transcript | None:
        """The speculative final for ``ended``, if one was decoded on exactly its audio."""
        speculation = self._speculation
        if speculation is None:
            return None
        if (speculation.utterance_id, speculation.samples) != (
            ended.utterance_id,
            ended.audio.size,
        ):
            self._drop_speculation("the utterance ended differently")
            return None
        self._speculation = None
        # Its endpoint is confirmed: from here it is this utterance's final, not a guess.
        self._engine.promote_speculative(self)
        await speculation.done.wait()
        if speculation.transcript is None:
            self._metrics.speculative_finals.labels("failed").inc()
            return None
        self._metrics.speculative_finals.labels("used").inc()
        return speculation.transcript

    async def _finalize(self, ended: UtteranceEnded, ended_at: float) -> None:
        # Utterance ids only grow: the last partial shown is of the highest id shown.
        last = self._shown_partial
        shown = last is not None and last.utterance_id >= ended.utterance_id
        # Dialects that announce utterances owe every one of them its end, text or not.
        owed = self._dialect.completes_every_utterance
        if ended.speech < self._config.min_speech and not shown:
            self._drop_speculation("too little speech")
            log.debug(
                "session %s utterance %d skipped: %.2fs of speech",
                self.session_id,
                ended.utterance_id,
                ended.speech,
            )
            if owed:
                self._put_final(ended, "")
            return
        try:
            # One deadline for the final, whether it comes from the speculation or anew.
            with trio.fail_after(self._config.inference_timeout):
                transcript = await self._take_speculation(ended)
                if transcript is None:
                    # Only now the context: a used speculation already had it.
                    audio, options = self._request(ended.audio, final=True)
                    transcript = await self._transcribe_final(audio, options)
        except trio.TooSlowError:
            self._report_failure(ended.utterance_id, "timed out")
            return
        except Exception:
            # The model's or the device's own words stay in the log: they can name paths,
            # devices and library internals that are none of the client's business.
            log.exception(
                "session %s utterance %d: transcription failed",
                self.session_id,
                ended.utterance_id,
                extra=self._fields("error", error_code=ErrorCode.TRANSCRIPTION_FAILED.value),
            )
            self._report_failure(ended.utterance_id, "internal error", logged=True)
            return
        self._metrics.observe_transcription(transcript, final=True)
        text = transcript.text if transcript else ""
        detected = transcript.language if transcript else None
        if detected is not None:
            self._detected_language = detected
        if not text and not shown:
            # Noise, a cough: the client was never shown anything for it.
            if owed:
                self._put_final(ended, "")
            return
        self._recent.add(ended.audio, text)
        self._utterances += 1
        self._last_final_latency = trio.current_time() - ended_at
        self._metrics.utterances.inc()
        self._metrics.final_latency.observe(self._last_final_latency)
        self._put_final(
            ended,
            text,
            language=detected,
            language_probability=transcript.language_probability if transcript else None,
        )

    def _put_final(
        self,
        ended: UtteranceEnded,
        text: str,
        *,
        language: str | None = None,
        language_probability: float | None = None,
    ) -> None:
        messages = self._dialect.final(
            text,
            ended.utterance_id,
            ended.start,
            ended.end,
            language=language,
            language_probability=language_probability,
        )
        for message in messages:
            self._outbox.put_final(message, ended.utterance_id)

    async def _transcribe_final(
        self, audio: np.ndarray, options: TranscribeOptions
    ) -> Transcript | None:
        engine = self._engine
        try:
            return await engine.transcribe(audio, options, owner=self)
        except Exception:
            if self._engine is engine:
                raise
            # The device failed under this request and the session has been moved: a final
            # is owed, so it gets one more try on the new device.
            return await self._engine.transcribe(audio, options, owner=self)

    def _request(self, audio: np.ndarray, *, final: bool) -> tuple[np.ndarray, TranscribeOptions]:
        audio, context_samples, prefix = self._recent.prepend(audio)
        language = self._language
        if language is None and not final:
            language = self._detected_language
        return audio, TranscribeOptions(
            final=final,
            language=language,
            task=self._task,
            prompt=self._prompt,
            hotwords=self._hotwords,
            context_samples=context_samples,
            prefix=prefix,
            context_language=self._detected_language if self._language is None else None,
        )

    def _report_failure(self, utterance_id: int, why: str, *, logged: bool = False) -> None:
        if not logged:
            log.warning(
                "session %s utterance %d: transcription failed: %s",
                self.session_id,
                utterance_id,
                why,
                extra=self._fields("error", error_code=ErrorCode.TRANSCRIPTION_FAILED.value),
            )
        self._metrics.errors.labels(ErrorCode.TRANSCRIPTION_FAILED.value).inc()
        self._put_all(
            self._dialect.failed(
                utterance_id, f"utterance {utterance_id} could not be transcribed: {why}"
            )
        )

    async def _partials(self) -> None:
        while True:
            due = await self._latest_partial.take()
            if due.utterance_id != self._segmenter.open_utterance_id:
                continue
            asked_at = trio.current_time()
            transcript = None
            with trio.CancelScope() as scope:
                self._partial_in_flight = (due.utterance_id, scope)
                audio, options = self._request(due.audio, final=False)
                shown = self._shown_partial
                if shown is not None and (shown.utterance_id, shown.language, shown.task) == (
                    due.utterance_id,
                    options.language,
                    options.task,
                ):
                    options = attrs.evolve(options, shown=shown.text, shown_samples=shown.samples)
                try:
                    with trio.fail_after(self._config.inference_timeout):
                        transcript = await self._engine.transcribe(audio, options, owner=self)
                except (trio.TooSlowError, Exception) as exc:
                    # A lost partial costs nothing: the next one or the final replaces it.
                    log.debug("session %s partial failed: %r", self.session_id, exc)
            self._partial_in_flight = None
            self._metrics.observe_transcription(transcript, final=False)
            if transcript is None:
                continue
            if self._show_partial(
                due.utterance_id, options.language, options.task, transcript.text, due.audio.size
            ):
                self._last_partial_latency = trio.current_time() - asked_at
                self._metrics.partial_latency.observe(self._last_partial_latency)

    def _show_partial(
        self, utterance_id: int, language: str | None, task: str, text: str, samples: int
    ) -> bool:
        """Send ``text``, decoded on the first ``samples`` of the utterance, as its partial;
        False where it is not shown."""
        if not text:
            return False
        # Shown only while its utterance is still open and no earlier final is owed, so the
        # client never sees realtime(n) after completed(n) or before completed(n-1); and never
        # after a partial of more of the utterance (a guess at a final can end after one).
        if utterance_id != self._segmenter.open_utterance_id or self._finals_pending:
            return False
        shown = self._shown_partial
        if shown is not None and shown.utterance_id == utterance_id and shown.samples >= samples:
            return False
        self._shown_partial = _ShownPartial(utterance_id, language, task, text, samples)
        self._observe_cadence(utterance_id)
        # Rendered when the emitter takes it: a dialect that appends (OpenAI's deltas)
        # computes it against what the client has really been sent.
        self._outbox.put_partial(
            functools.partial(self._dialect.partial, text, utterance_id), utterance_id
        )
        return True

    def _observe_cadence(self, utterance_id: int) -> None:
        now = trio.current_time()
        if self._last_partial_at is not None and self._last_partial_at[0] == utterance_id:
            gap = now - self._last_partial_at[1]
            self._metrics.partial_gap.observe(gap)
            self._partial_gap = (
                gap if self._partial_gap is None else 0.8 * self._partial_gap + 0.2 * gap
            )
        self._last_partial_at = (utterance_id, now)

    # -- emitter and liveness ----------------------------------------------------------------
    async def _emitter(self) -> None:
        while (message := await self._outbox.get()) is not None:
            with trio.move_on_after(self._config.send_timeout) as scope:
                try:
                    await self._ws.send_message(message)
                except ConnectionClosed:
                    self._abort("peer closed", close=None)
                    return
            if scope.cancelled_caught:
                log.warning(
                    "session %s: client has not read for %.0f s, dropping it",
                    self.session_id,
                    self._config.send_timeout,
                )
                self._abort("client stopped reading")
                return
        self._emitter_done.set()

    async def _length_limit(self) -> None:
        await trio.sleep(self._config.max_session_length)
        self.close(
            CloseRequest(
                CloseCode.POLICY_VIOLATION,
                ErrorCode.SESSION_TOO_LONG,
                f"sessions last at most {self._config.max_session_length:g} s; reconnect to go on",
            )
        )

    async def _heartbeat(self) -> None:
        with self._heartbeat_scope:
            await self._ping_until_silent()

    async def _ping_until_silent(self) -> None:
        while True:
            await trio.sleep(self._config.ping_interval)
            with trio.move_on_after(self._config.ping_timeout) as scope:
                try:
                    await self._ws.ping()
                except ConnectionClosed:
                    self._abort("peer closed", close=None)
                    return
            if scope.cancelled_caught:
                log.info(
                    "session %s: no pong within %.0f s", self.session_id, self._config.ping_timeout
                )
                self._abort("ping timeout")
                return


class LanguageCheck:
    """Validates a client's ``language`` and ``task`` against what the loaded model can do."""

    def __init__(self, multilingual: bool) -> None:
        self._multilingual = multilingual

    def __call__(self, language: str) -> str | None:
        """The language to decode in; None: detect it."""
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        if language == DETECT_LANGUAGE:
            return None if self._multilingual else "en"
        if not self._multilingual and language != "en":
            raise InvalidMessage(f"this server's model only transcribes English, not {language!r}")
        if language not in _LANGUAGE_CODES:
            raise InvalidMessage(f"unknown language code {language!r}")
        return language

    def task(self, task: str) -> str:
        if task == "translate" and not self._multilingual:
            # An English-only model hears English only, and English needs no translating.
            return "transcribe"
        return task
