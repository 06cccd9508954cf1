"""The inference engine: one speech model per device, shared by every session placed there.

Scheduling
----------
Sessions call :meth:`Engine.transcribe` and wait. Requests go into two queues: finals, served
first-in first-out, and partials, at most one per session (a newer partial from the same session
replaces the queued one, whose caller gets ``None``: a partial of older audio is worthless once a
newer one is wanted). Worker tasks, as many as the device's ``CapacityLimiter`` has tokens,
always take a final before any partial and run it through ``trio.to_thread.run_sync`` on that
limiter; CTranslate2 releases the GIL, so the threads really run in parallel.

With more than one worker, partials may occupy all but one of them: a final that arrives never
waits behind partials alone, and partials (previews, cheap on right-sized windows) still keep
the other workers busy. (When guesses at finals hold the other workers, see below, a final
waits for whichever call ends first: a partial batch, or a guess.) Partials are served
round-robin across sessions: a session that asks again goes to the back of the line, so a
talkative client cannot starve the rest.

Uploads (files sent to the OpenAI-compatible file API) come last: after every live request, and
only on the workers partials may use, so a file never holds the worker kept for finals. With a
single worker there is none kept: a final may then wait for one upload chunk (at most 30 s of
audio) that is already running.

Speculative finals (decoded while an endpoint's silence is still being waited for) rank between
the two: after real finals, before partials, at most one per session queued (a newer one
replaces it) and none while that session's previous one still runs, so a speaker who pauses
often cannot fill the device with guesses. They may take any worker, the one kept for finals
included: nearly every final is first a guess, and kept to the partials' workers they left the
other idle while they queued behind partials (measured: 12 users, two workers, two requests
running at once for 10 % of the time).

Batching: a model that offers ``transcribe_batch`` gets up to ``max_batch`` requests in one
call. A worker takes what it may run (finals, else guesses, else partials) and its share of the
queue of that kind, split between the workers free to run it, without waiting for more to
arrive: under load batches form by themselves, a lone request never waits, and two finals
queued for two idle workers run side by side rather than in one batch. On a CPU the decoder is
mostly per-step overhead, so eight sequences decoded together cost little more than one (the
encoder still costs per request); on CUDA batching is the main lever. Kinds are never mixed,
so a final never waits for a partial's decode to end. On a CPU the engine is built with
``batch_finals=False`` (a batch of finals, long windows whose encoder dominates, costs what
they cost one after another, and each waits for the slowest) and ``max_batch_audio``, so that
a batch of partials holds a worker for a bounded time.

A caller that is cancelled while its request is still queued takes it out of the queue; one
cancelled while its request runs simply stops waiting (a thread cannot be interrupted).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Hashable
from typing import Protocol

import attrs
import numpy as np
import trio

from .protocol import MODEL_SAMPLE_RATE

log = logging.getLogger(__name__)


@attrs.frozen
class TranscribeOptions:
    """Per-request choices; they come from the requesting session, never from shared state."""

    final: bool
    #: None: the model detects it (multilingual models; English-only ones always say "en").
    language: str | None = None
    #: "transcribe", or "translate" into English (multilingual models).
    task: str = "transcribe"
    #: The client's own vocabulary and style hint (Whisper's initial prompt), and hotwords.
    prompt: str | None = None
    hotwords: str | None = None
    #: Segments with their times are wanted (files), not only the text; ``words``: and the
    #: times of each word in them.
    timestamps: bool = False
    words: bool = False
    #: A file upload: scheduled after every live request (see Engine).
    upload: bool = False
    #: The audio starts with this many samples of the session's earlier utterances, whose
    #: already-sent text is ``prefix``: context for the model, not part of the answer.
    context_samples: int = 0
    prefix: str | None = None
    #: The language the context was heard in, where it was detected: when the new speech is
    #: detected in another, the context is left out (its forced text would pull the decoder
    #: back into the old language).
    context_language: str | None = None
    #: A final decoded before its endpoint is certain (decoded as a final, scheduled below
    #: real finals, one per session at a time: see Engine).
    speculative: bool = False
    #: A partial's: the text of the last partial of this utterance that the client was shown,
    #: and how many samples of the utterance it was decoded on. A long utterance's partial may
    #: then decode only its last seconds and join their words to it (``tail_partials``).
    shown: str | None = None
    shown_samples: int = 0


class ModelCallFailed(RuntimeError):
    """The model call that carried this request failed (its cause says how)."""


@attrs.frozen
class Word:
    start: float
    end: float
    word: str
    probability: float


@attrs.frozen
class Segment:
    """A stretch of recognized text; seconds from the start of the audio it was decoded on."""

    start: float
    end: float
    text: str
    #: Whisper's own confidence figures, which the OpenAI-compatible verbose format reports.
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    temperature: float = 0.0
    words: tuple[Word, ...] = ()


@attrs.frozen
class Recognition:
    """What a model says about one request."""

    text: str
    #: The language spoken, where the model detected it (None when it was given).
    language: str | None = None
    language_probability: float | None = None
    segments: tuple[Segment, ...] = ()


class SpeechModel(Protocol):
    """What the engine needs from a model: a blocking call, run on a worker thread. A plain
    string is taken as the text alone.

    A model may also offer ``transcribe_batch(requests)``: a list of ``(audio, options)`` in,
    a list of the same length out, each a :class:`Recognition`, a string, or the exception that
    request raised (one request's failure is not its neighbours')."""

    name: str

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Recognition | str: ...


BatchResult = Recognition | str | BaseException


@attrs.frozen
class Transcript:
    text: str
    #: Seconds the request waited in the queue before a worker took it.
    queued: float
    #: Seconds the model spent on it.
    inference: float
    language: str | None = None
    language_probability: float | None = None
    segments: tuple[Segment, ...] = ()


#: What a model call carries, as the engine counts its time (``EngineStatistics.busy_seconds``).
CALL_KINDS = ("final", "guess", "partial", "upload")


@attrs.frozen
class EngineStatistics:
    device: str
    workers: int
    busy: int
    queued_finals: int
    queued_partials: int
    finals_done: int
    partials_done: int
    partials_superseded: int
    failures: int
    queued_uploads: int = 0
    uploads_done: int = 0
    #: Model calls made, and the requests they carried (requests / batches = mean batch size).
    batches: int = 0
    batched_requests: int = 0
    #: Worker seconds spent in model calls, each call counted once, by what it carried:
    #: "final", "guess" (a final decoded before its endpoint was confirmed, used or not),
    #: "partial", "upload". Where the device's time goes; per-request times overlap in a batch.
    busy_seconds: dict[str, float] = attrs.Factory(dict)
    #: The part of those seconds spent on calls whose every caller had stopped waiting before
    #: the call ended (see ``_Job.abandoned``): work thrown away, at least (a guess dropped
    #: after its call ended, or a batch some of whose callers still wait, is not counted).
    unused_seconds: dict[str, float] = attrs.Factory(dict)


@attrs.define(eq=False)
class _Job:
    audio: np.ndarray
    options: TranscribeOptions
    owner: Hashable
    submitted: float
    done: trio.Event = attrs.Factory(trio.Event)
    result: Transcript | None = None
    error: BaseException | None = None
    taken: bool = False
    #: A speculative final whose endpoint came while it was still queued: now a real final.
    promoted: bool = False
    #: Its caller stopped waiting while it ran (a guess at a final thrown away as speech
    #: resumed, a partial of an utterance that has ended): the answer will go unread.
    abandoned: bool = False

    def finish(self, result: Transcript | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class Engine:
    """Queue, workers and limiter in front of one :class:`SpeechModel` on one device."""

    def __init__(
        self,
        model: SpeechModel,
        *,
        device: str,
        workers: int,
        max_batch: int = 1,
        batch_finals: bool = True,
        max_batch_audio: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``batch_finals`` False: finals and guesses at them go to the model one per call
        (on a CPU, where batching them saves nothing and makes each wait for the others).
        ``max_batch_audio``: seconds of audio a batch of partials may hold at most (None = no
        bound), so that previews tie a worker up for a bounded time."""
        self.model = model
        self._transcribe_batch = getattr(model, "transcribe_batch", None)
        self._max_batch = max_batch if self._transcribe_batch is not None else 1
        self.batch_finals = batch_finals
        self.max_batch_audio = max_batch_audio
        self._max_batch_samples = (
            None if max_batch_audio is None else int(max_batch_audio * MODEL_SAMPLE_RATE)
        )
        self.device = device
        self.limiter = trio.CapacityLimiter(workers)
        self._clock = clock
        self._finals: collections.deque[_Job] = collections.deque()
        self._partials: dict[Hashable, _Job] = {}
        self._speculative: dict[Hashable, _Job] = {}
        self._speculating: set[Hashable] = set()  # owners whose speculative job runs
        self._uploads: collections.deque[_Job] = collections.deque()
        self._wakeup = trio.lowlevel.ParkingLot()
        self._busy = 0
        self._running_partials = 0
        self._partial_slots = max(1, workers - 1)
        self._finals_done = 0
        self._partials_done = 0
        self._superseded = 0
        self._uploads_done = 0
        self._failures = 0
        self._batches = 0
        self._batched = 0
        self._busy_seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        self._unused_seconds: collections.defaultdict[str, float] = collections.defaultdict(float)
        #: Told the outcome of every inference (None = success); feeds the device's breaker.
        self.on_outcome: Callable[[BaseException | None], None] = lambda exc: None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve requests until cancelled. Start with ``nursery.start(engine.run)``."""
        async with trio.open_nursery() as nursery:
            for _ in range(int(self.limiter.total_tokens)):
                nursery.start_soon(self._worker)
            task_status.started()

    async def transcribe(
        self, audio: np.ndarray, options: TranscribeOptions, *, owner: Hashable
    ) -> Transcript | None:
        """Transcribe ``audio`` (16 kHz float32). ``None`` means a newer partial replaced this
        one. Model errors propagate to the caller."""
        job = _Job(audio=audio, options=options, owner=owner, submitted=self._clock())
        if options.upload:
            self._uploads.append(job)
        elif options.speculative:
            if owner in self._speculating:
                return None  # its previous guess still runs: no second one at once
            self._queue_per_owner(self._speculative, job)
        elif options.final:
            self._finals.append(job)
        else:
            self._queue_per_owner(self._partials, job)
        self._wakeup.unpark()
        try:
            await job.done.wait()
        except trio.Cancelled:
            self._withdraw(job)
            raise
        if job.error is not None:
            raise job.error
        return job.result

    def promote_speculative(self, owner: Hashable) -> None:
        """The endpoint of ``owner``'s speculative final is confirmed: if the job is still
        queued, it becomes a real final, ahead of every guess still queued."""
        job = self._speculative.pop(owner, None)
        if job is None:
            return
        job.promoted = True
        self._finals.append(job)
        self._wakeup.unpark()

    def withdraw_speculative(self, owner: Hashable) -> None:
        """``owner``'s speculative final is no longer wanted as a final: if it is still queued
        it leaves the queue (its caller gets ``None``); one that already runs goes on, and its
        caller may still use what it says."""
        job = self._speculative.pop(owner, None)
        if job is not None:
            job.finish()

    def _queue_per_owner(self, queue: dict[Hashable, _Job], job: _Job) -> None:
        """One queued job per owner: a newer one replaces it (its caller gets ``None``) and
        goes to the back of the line."""
        replaced = queue.pop(job.owner, None)
        if replaced is not None:
            self._superseded += 1
            replaced.finish()
        queue[job.owner] = job

    def _withdraw(self, job: _Job) -> None:
        if job.taken:
            job.abandoned = True
            return
        if job.options.upload:
            self._uploads.remove(job)
        elif job.options.speculative and not job.promoted:
            if self._speculative.get(job.owner) is job:
                del self._speculative[job.owner]
        elif job.options.final:
            self._finals.remove(job)
        elif self._partials.get(job.owner) is job:
            del self._partials[job.owner]

    def _next_batch(self) -> list[_Job]:
        """What a free worker runs next: finals if any are queued, else guesses at finals
        (speculative), else partials (longest-waiting session first) while a partial slot is
        free, else one upload. Of one kind, never mixed, and no more than this worker's share
        of the queue: the workers that are free split it, so that two finals queued with two
        workers idle run side by side instead of one waiting for the other's batch."""
        if self._finals:
            return self._share(self._finals, self._free_workers(), batch=self.batch_finals)
        if self._speculative:
            return self._share(self._speculative, self._free_workers(), batch=self.batch_finals)
        free_slots = self._partial_slots - self._running_partials
        if free_slots <= 0:
            return []
        if self._partials:
            return self._share(self._partials, free_slots, max_samples=self._max_batch_samples)
        if self._uploads:
            # A file chunk is a full 30 s window: batched, it would hold the others' answers.
            return [self._uploads.popleft()]
        return []

    def _free_workers(self) -> int:
        return max(1, int(self.limiter.total_tokens) - self._busy)

    def _share(
        self,
        queue: collections.deque[_Job] | dict[Hashable, _Job],
        free: int,
        *,
        batch: bool = True,
        max_samples: int | None = None,
    ) -> list[_Job]:
        count = min(self._max_batch, -(-len(queue) // free)) if batch else 1
        taken: list[_Job] = []
        samples = 0
        while queue and len(taken) < count:
            # Per-session queues: the session that has waited longest comes first.
            job = queue[next(iter(queue))] if isinstance(queue, dict) else queue[0]
            if taken and max_samples is not None and samples + job.audio.size > max_samples:
                break
            if isinstance(queue, dict):
                del queue[job.owner]
            else:
                queue.popleft()
            taken.append(job)
            samples += job.audio.size
        if queue:
            self._wakeup.unpark()  # the rest is another free worker's share
        return taken

    async def _worker(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                await self._wakeup.park()
                continue
            for job in batch:
                job.taken = True
            await self._run_batch(batch)

    @staticmethod
    def _is_preview(job: _Job) -> bool:
        # Partials and uploads run on the workers left over by the one kept for finals;
        # finals and guesses at them may take any worker.
        return not job.options.final or job.options.upload

    async def _run_batch(self, batch: list[_Job]) -> None:
        started = self._clock()
        self._busy += 1
        preview = all(self._is_preview(job) for job in batch)
        if preview:
            self._running_partials += 1
        speculating = {job.owner for job in batch if job.options.speculative}
        self._speculating |= speculating
        try:
            results = await trio.to_thread.run_sync(self._call_model, batch, limiter=self.limiter)
        finally:
            self._busy -= 1
            self._speculating -= speculating
            if preview:
                self._running_partials -= 1
                self._wakeup.unpark()  # a worker that found only previews may take one now
        self._batches += 1
        self._batched += len(batch)
        elapsed = self._clock() - started
        kind = self._kind(batch[0])
        self._busy_seconds[kind] += elapsed
        if all(job.abandoned for job in batch):
            self._unused_seconds[kind] += elapsed
        if isinstance(results, BaseException):
            # The call itself failed: one outcome for the breaker, and each caller gets an
            # exception of its own (one object raised in several tasks would share state).
            self._failures += len(batch)
            log.warning("inference failed on %s: %s", self.device, results)
            for job in batch:
                error = ModelCallFailed(str(results))
                error.__cause__ = results
                job.finish(error=error)
            self.on_outcome(results)
            return
        for job, result in zip(batch, results, strict=True):
            try:
                self._finish(job, result, queued=started - job.submitted, inference=elapsed)
            except Exception as exc:  # a batch-mate must still get its answer
                log.exception("engine on %s: could not deliver a result", self.device)
                if not job.done.is_set():
                    job.finish(error=exc)

    @staticmethod
    def _kind(job: _Job) -> str:
        # A batch holds one kind (see _next_batch); a guess promoted while still queued ran
        # as the final it had become.
        if job.options.upload:
            return "upload"
        if job.options.speculative and not job.promoted:
            return "guess"
        return "final" if job.options.final else "partial"

    def _call_model(self, batch: list[_Job]) -> list[BatchResult] | BaseException:
        """On the worker thread: one model call for the batch, or what it raised."""
        try:
            if len(batch) == 1:
                job = batch[0]
                return [self.model.transcribe(job.audio, job.options)]
            assert self._transcribe_batch is not None
            results = list(self._transcribe_batch([(job.audio, job.options) for job in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"model answered {len(results)} of {len(batch)} requests")
            return results
        except Exception as exc:
            return exc

    def _finish(self, job: _Job, result: BatchResult, *, queued: float, inference: float) -> None:
        if isinstance(result, BaseException):
            self._failures += 1
            log.warning("inference failed on %s: %s", self.device, result)
            job.finish(error=result)
            self.on_outcome(result)
            return
        if not isinstance(result, str | Recognition):
            raise TypeError(f"model answered a {type(result).__name__}")
        if job.options.upload:
            self._uploads_done += 1
        elif job.options.final:
            self._finals_done += 1
        else:
            self._partials_done += 1
        if isinstance(result, str):
            result = Recognition(result)
        job.finish(
            Transcript(
                result.text,
                queued=queued,
                inference=inference,
                language=result.language,
                language_probability=result.language_probability,
                segments=result.segments,
            )
        )
        self.on_outcome(None)

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            device=self.device,
            workers=int(self.limiter.total_tokens),
            busy=self._busy,
            queued_finals=len(self._finals),
            queued_partials=len(self._partials),
            finals_done=self._finals_done,
            partials_done=self._partials_done,
            partials_superseded=self._superseded,
            failures=self._failures,
            queued_uploads=len(self._uploads),
            uploads_done=self._uploads_done,
            batches=self._batches,
            batched_requests=self._batched,
            busy_seconds=dict(self._busy_seconds),
            unused_seconds=dict(self._unused_seconds),
        )
