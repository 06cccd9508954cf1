"""The OpenAI-compatible file API (``POST /v1/audio/transcriptions`` and ``/translations``):
the Trio side. The wire shapes are :mod:`.openai_schema`'s, the body framing
:class:`~stt_server.http.RequestBody`'s, the form :mod:`.multipart`'s, the audio
:mod:`.filedecode`'s; this module reads, schedules and answers.

One request, after the server has checked the token, the address's connection rate and
concurrent sessions (an upload counts as one while it runs), and the drain:

1. capacity: at most ``max_uploads`` requests at once, else 503 with Retry-After;
2. the body: a declared ``Content-Length`` over the limit is refused (413) before a byte is
   read, ``Expect: 100-continue`` is answered only then, and the whole body must arrive within
   ``upload_timeout`` (408), so a slow sender holds a place for a bounded time;
3. the form is checked (400s); the file is decoded on a worker thread, ``max_upload_seconds``
   of audio at most;
4. transcription, chunk by chunk: each chunk of at most 30 s, cut at a quiet moment, is one
   engine job with ``upload=True``, which the engine runs after every live final, speculative
   final and partial, and never on the worker it keeps for finals. A live session therefore
   waits at most for one chunk already running, never for a whole file. Each chunk carries the
   text before it as its prompt (as Whisper does across its windows), and segment times are
   moved onto the file's clock;
5. a client that hangs up meanwhile cancels the rest (its queued chunk leaves the queue).
"""

from __future__ import annotations

import contextlib
import logging
import time

import attrs
import numpy as np
import trio

from .breaker import BreakerState
from .config import Config
from .devices import DevicePool
from .engine import Engine, Segment, TranscribeOptions, Transcript, Word
from .filedecode import SAMPLE_RATE, AudioDecoder, AudioFileError, Chunk, Chunker
from .http import CONTINUE, BadRequest, RequestBody, RequestHead, Response
from .metrics import Metrics
from .multipart import MultipartError, NotMultipart, boundary_of, parse_form
from .openai_schema import (
    ROUTES,
    ApiError,
    FileRequest,
    FileTranscript,
    TimedSegment,
    error_response,
    parse_request,
    render,
)

log = logging.getLogger(__name__)

#: What a client refused for capacity is told to wait, in seconds.
RETRY_AFTER_BUSY = 5.0

#: Room for the multipart framing and the small fields around the file, beyond
#: ``max_upload_size``: boundaries, part heads, model, language, prompt.
FORM_OVERHEAD = 64 * 1024

#: Bytes asked of the socket per read while a body arrives.
RECEIVE_CHUNK = 64 * 1024

#: Audio decoded per worker-thread call: one chunk's worth, so decoding keeps a step ahead.
DECODE_SAMPLES = 30 * SAMPLE_RATE

#: Text of the previous chunk given as the next one's prompt (Whisper keeps the last 223
#: tokens of a prompt, some 900 characters of English).
PROMPT_CARRY_CHARS = 900

#: A chunk decoded with a temperature above this was a struggle (Whisper's fallback): its
#: text is not carried into the next prompt, where it could make the next chunk repeat it
#: (openai-whisper's ``prompt_reset_on_temperature``).
PROMPT_RESET_TEMPERATURE = 0.5

#: Seconds a connection stays open after its answer, reading what the client still sends.
LINGER_SECONDS = 2.0

#: Bytes read and thrown away while waiting for a hangup: a client that sends more than this
#: after its request is not a client we owe attention to.
MAX_TRAILING_BYTES = 64 * 1024


def is_file_route(head: RequestHead) -> bool:
    return head.path in ROUTES


def endpoint_label(head: RequestHead) -> str:
    return head.path.rsplit("/", 1)[-1]


@attrs.define(eq=False)
class _Owner:
    """The engine's owner key for one request's jobs (identity only)."""

    peer: str


class FileApi:
    """Serves file requests; one per server. ``serve`` returns the response to send."""

    def __init__(
        self, config: Config, pool: DevicePool, metrics: Metrics, *, multilingual: bool
    ) -> None:
        self._config = config
        self._pool = pool
        self._metrics = metrics
        self._multilingual = multilingual
        self._active = 0
        self._finished = trio.lowlevel.ParkingLot()

    @property
    def active(self) -> int:
        return self._active

    async def wait_idle(self) -> None:
        """Return once no file request is being served (a drain waits for them)."""
        while self._active:
            await self._finished.park()

    def refuse(self, head: RequestHead, error: ApiError) -> Response:
        """The answer to a request refused before it got here (token, rate, drain), counted."""
        return self._count(head, error_response(error))

    async def serve(
        self, stream: trio.abc.Stream, head: RequestHead, raw: bytes, *, peer: str
    ) -> Response | None:
        """Answer one request whose head (and ``raw``, every byte read so far) the server has
        read. None: the client went away, there is nobody to answer."""
        if self._active >= self._config.max_uploads:
            return self.refuse(
                head,
                ApiError(
                    503,
                    f"server is at its limit of {self._config.max_uploads} file requests at once",
                    code="server_busy",
                    retry_after=RETRY_AFTER_BUSY,
                ),
            )
        self._active += 1
        self._metrics.files_active.inc()
        started = time.monotonic()
        audio_seconds = 0.0
        try:
            request = await self._receive(stream, head, raw)
            transcript = await self._transcribe_unless_hangup(stream, request, peer)
            if transcript is None:
                log.info("file request from %s: client went away; transcription stopped", peer)
                return None
            audio_seconds = transcript.duration
            self._metrics.file_audio_seconds.inc(transcript.duration)
            response = render(transcript, request)
        except ApiError as exc:
            response = error_response(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None  # the client went away while sending
        except Exception:
            # The model or a library failed on this file: the client gets OpenAI's shape for a
            # server error (its SDK retries those), the details go to the log.
            log.exception("file request %s from %s: internal error", head.path, peer)
            response = error_response(
                ApiError(
                    500,
                    "internal server error; the details are in the server's log",
                    code="server_error",
                )
            )
        finally:
            self._active -= 1
            self._metrics.files_active.dec()
            self._finished.unpark_all()
        elapsed = time.monotonic() - started
        self._metrics.file_duration.observe(elapsed)
        log.info(
            "file request %s from %s: %d, %.1f s of audio in %.2f s",
            head.path,
            peer,
            response.status,
            audio_seconds,
            elapsed,
            extra={
                "event": "file_request",
                "peer": peer,
                "endpoint": endpoint_label(head),
                "status": response.status,
                "audio_s": round(audio_seconds, 2),
                "duration_s": round(elapsed, 2),
            },
        )
        return self._count(head, response)

    async def answer(self, stream: trio.abc.Stream, response: Response) -> None:
        """Send ``response``, then read and drop whatever the client still sends, for at most
        ``LINGER_SECONDS``, before the server closes. A client refused while its body is still
        on the way (413, 401, 503) would otherwise meet a connection reset and never read why
        (a lingering close, as Apache and nginx do it)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            # A client that stops reading must not keep this task, and its address's and
            # token's places, forever.
            with trio.move_on_after(self._config.send_timeout) as sending:
                await stream.send_all(response.encode())
            if sending.cancelled_caught:
                return
            with trio.move_on_after(LINGER_SECONDS):
                if isinstance(stream, trio.SocketStream):
                    await stream.send_eof()  # the answer is complete: most clients close now
                while await stream.receive_some(RECEIVE_CHUNK):
                    pass

    def _count(self, head: RequestHead, response: Response) -> Response:
        self._metrics.file_requests.labels(endpoint_label(head), str(response.status)).inc()
        return response

    # -- the request ----------------------------------------------------------------------
    async def _receive(self, stream: trio.abc.Stream, head: RequestHead, raw: bytes) -> FileRequest:
        if head.method != "POST":
            raise ApiError(405, f"{head.path} takes POST requests", code="method_not_allowed")
        try:
            boundary = boundary_of(head.headers.get("content-type", ""))
            body = RequestBody(raw, limit=self._config.max_upload_size + FORM_OVERHEAD)
        except NotMultipart as exc:
            raise ApiError(415, f"{exc} (send the file as a form: curl -F file=@...)") from None
        except MultipartError as exc:
            raise ApiError(400, str(exc)) from None
        except BadRequest as exc:
            raise _framing_error(exc, self._config) from None
        with trio.move_on_after(self._config.upload_timeout) as deadline:
            try:
                complete = body.advance()
                if not complete and body.expects_continue:
                    await stream.send_all(CONTINUE)
                while not complete:
                    complete = body.receive(await stream.receive_some(RECEIVE_CHUNK))
            except BadRequest as exc:
                raise _framing_error(exc, self._config) from None
        if deadline.cancelled_caught:
            raise ApiError(
                408,
                f"the request body did not arrive within {self._config.upload_timeout:g} s",
                code="request_timeout",
            )
        try:
            parts = parse_form(body.data, boundary)
        except MultipartError as exc:
            raise ApiError(400, str(exc)) from None
        request = parse_request(
            parts,
            task=ROUTES[head.path],
            multilingual=self._multilingual,
            default_language=self._config.language,
        )
        if len(request.audio) > self._config.max_upload_size:
            raise ApiError(
                413,
                f"the file is larger than {self._config.max_upload_size} bytes",
                param="file",
                code="file_too_large",
            )
        if not len(request.audio):
            raise ApiError(400, "the file is empty", param="file", code="empty_file")
        return request

    async def _transcribe_unless_hangup(
        self, stream: trio.abc.Stream, request: FileRequest, peer: str
    ) -> FileTranscript | None:
        """Transcribe, and stop as soon as the client closes its connection: nobody would
        read the answer, and the queue it holds a place in is shared."""
        result: FileTranscript | None = None
        error: ApiError | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await _wait_for_hangup(stream)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                result = await self._transcribe(request, _Owner(peer))
            except ApiError as exc:
                error = exc  # raised here, a nursery would wrap it in an ExceptionGroup
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return result

    # -- decoding and transcription ---------------------------------------------------------
    async def _transcribe(self, request: FileRequest, owner: _Owner) -> FileTranscript:
        try:
            decoder = await trio.to_thread.run_sync(AudioDecoder, request.audio)
        except AudioFileError as exc:
            raise ApiError(400, str(exc), param="file", code="invalid_audio") from None
        limit = self._config.max_upload_seconds
        too_long = ApiError(
            400,
            f"the audio is longer than this server's limit of {limit:g} s",
            param="file",
            code="audio_too_long",
        )
        try:
            declared = decoder.declared_duration
            if declared is not None and declared > limit + 1.0:
                raise too_long  # refused before any work when the header says so
            state = _FileState(request, self._multilingual)
            chunker = Chunker()
            decoded = 0
            while True:
                try:
                    audio = await trio.to_thread.run_sync(decoder.read, DECODE_SAMPLES)
                except AudioFileError as exc:
                    raise ApiError(400, str(exc), param="file", code="invalid_audio") from None
                decoded += audio.size
                if decoded > limit * SAMPLE_RATE:
                    raise too_long  # the header said less, or nothing
                for chunk in chunker.feed(audio) if audio.size else chunker.finish():
                    if not chunk.silent:
                        state.add(chunk, await self._transcribe_chunk(chunk, state, owner))
                if not audio.size:
                    break
        finally:
            decoder.close()
        if decoded == 0:
            raise ApiError(400, "the file contains no audio", param="file", code="invalid_audio")
        return state.transcript(decoded / SAMPLE_RATE)

    async def _transcribe_chunk(self, chunk: Chunk, state: _FileState, owner: _Owner) -> Transcript:
        options = state.options()
        # Uploads wait behind every live request by design; this bounds the wait on a server
        # that never has a free moment.
        with trio.move_on_after(self._config.inference_timeout):
            transcript = await self._engine().transcribe(chunk.audio, options, owner=owner)
            assert transcript is not None  # only partials and speculative finals yield None
            self._metrics.observe_transcription(transcript, final=True, upload=True)
            return transcript
        raise ApiError(
            503,
            "the server is too busy with live sessions to transcribe files now",
            code="server_busy",
            retry_after=RETRY_AFTER_BUSY,
        )

    def _engine(self) -> Engine:
        """The least busy device whose breaker is closed, chosen again for every chunk, so a
        device that fails mid-file hands the rest to another."""
        usable = [
            d
            for d in self._pool.devices
            if d.breaker is None or d.breaker.state is BreakerState.CLOSED
        ]
        if not usable:
            raise ApiError(
                503, "no device is available", code="server_busy", retry_after=RETRY_AFTER_BUSY
            )

        def load(engine: Engine) -> int:
            s = engine.statistics()
            return s.busy + s.queued_finals + s.queued_partials + s.queued_uploads

        return min((d.engine for d in usable), key=load)


class _FileState:
    """What one file's transcription carries from chunk to chunk."""

    def __init__(self, request: FileRequest, multilingual: bool) -> None:
        self._request = request
        self._multilingual = multilingual
        self._language = request.language  # None: detected on the first chunk with speech
        self._carried = ""
        self._segments: list[TimedSegment] = []

    def options(self) -> TranscribeOptions:
        request = self._request
        prompt = " ".join(p for p in (request.prompt, self._carried) if p)
        return TranscribeOptions(
            final=True,
            upload=True,
            timestamps=True,
            words="word" in request.granularities,
            language=self._language,
            # The client's prompt stays in front; the previous chunk's text follows, and
            # Whisper keeps the end of a prompt that is too long.
            prompt=prompt[-PROMPT_CARRY_CHARS:] or None,
            # English-only models know one task: translating English is transcribing it.
            task=request.task if self._multilingual else "transcribe",
        )

    def add(self, chunk: Chunk, transcript: Transcript) -> None:
        if self._language is None and transcript.language:
            # One language for the whole file, as Whisper decides it on the first window.
            self._language = transcript.language
        offset = chunk.start / SAMPLE_RATE
        end = offset + chunk.audio.size / SAMPLE_RATE
        for segment in transcript.segments:
            self._segments.append(
                TimedSegment(len(self._segments), chunk.start // 160, _shift(segment, offset, end))
            )
        struggled = any(s.temperature > PROMPT_RESET_TEMPERATURE for s in transcript.segments)
        self._carried = "" if struggled else transcript.text.strip()

    def transcript(self, duration: float) -> FileTranscript:
        task = self._request.task
        return FileTranscript(
            task=task,
            # A translation's language is its output's, always English (as OpenAI reports it).
            language="en" if task == "translate" else self._language or "en",
            duration=duration,
            segments=tuple(self._segments),
        )


def _shift(segment: Segment, offset: float, limit: float) -> Segment:
    """A chunk's segment on the file's clock (never past the chunk's end: Whisper's last
    timestamp can overshoot the audio it was given)."""

    def at(t: float) -> float:
        return float(np.clip(t + offset, offset, limit))

    return attrs.evolve(
        segment,
        start=at(segment.start),
        end=at(segment.end),
        words=tuple(Word(at(w.start), at(w.end), w.word, w.probability) for w in segment.words),
    )


async def _wait_for_hangup(stream: trio.abc.Stream) -> None:
    """Return when the peer closes (or breaks) the connection. HTTP/1.1 clients send nothing
    while they wait for an answer, so end of stream means they have gone."""
    trailing = 0
    try:
        while trailing <= MAX_TRAILING_BYTES:
            data = await stream.receive_some(RECEIVE_CHUNK)
            if not data:
                return
            trailing += len(data)
        await trio.sleep_forever()  # it keeps sending: stop reading, let the answer decide
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


def _framing_error(exc: BadRequest, config: Config) -> ApiError:
    if exc.status == 413:
        return ApiError(
            413,
            f"the request is larger than this server's limit of {config.max_upload_size} bytes "
            "for a file",
            code="request_too_large",
        )
    if exc.status == 411:
        return ApiError(411, str(exc), code="length_required")
    return ApiError(exc.status, str(exc))
