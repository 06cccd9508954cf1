"""Utterance segmentation (endpointing), sans-IO.

Theory of operation
-------------------
The segmenter is fed 32 ms windows of 16 kHz audio, each with Silero's speech probability, and
answers with events. It is in one of two states:

``idle``
    No utterance is open. The last ``speech_pad`` seconds are kept in a small ring so that the
    utterance that starts next includes the onset of its first word. A window at or above
    ``threshold`` opens an utterance (ids count up from 1 per session).
``speaking``
    Audio is appended to a preallocated buffer of ``max_utterance`` seconds (so memory is
    bounded by construction). Silence is counted Silero's way, with hysteresis: a window below
    ``neg_threshold`` starts a silent run, a window at or above ``threshold`` ends it, windows
    in between extend a run that has started. A run of ``min_silence`` closes the utterance,
    keeping ``speech_pad`` of the silence after the last speech. An utterance that reaches
    ``max_utterance`` is cut at its most recent pause in the second half when there is one
    (so no word is split), otherwise hard, and the rest continues as a new utterance.
    Every ``partial_interval`` of new audio a :class:`PartialDue` asks for a partial transcript,
    except while a pause is out (below): its audio is then being decoded as the final.

    Once a silent run reaches ``speech_pad``, the audio the utterance will end with if the
    silence lasts is already here: :class:`SpeechPaused` hands it over, so that the final can be
    decoded while the rest of ``min_silence`` is still being waited for. Speech before the run
    reaches ``min_silence`` sends :class:`SpeechResumed` (that audio is not the end after all);
    otherwise the :class:`UtteranceEnded` that follows carries exactly the same samples.

Times are counted in samples since the session's first sample, so ``start``/``end`` of an
utterance are "seconds of audio since the session started" as the protocol promises.
"""

from __future__ import annotations

import collections

import attrs
import numpy as np

from .protocol import MODEL_SAMPLE_RATE
from .vad import WINDOW


@attrs.frozen
class SegmenterSettings:
    threshold: float = 0.5
    min_silence: float = 0.6
    max_utterance: float = 25.0
    speech_pad: float = 0.3
    partial_interval: float = 0.5
    #: False: silence never ends an utterance, only a flush does (OpenAI's manual commits).
    endpointing: bool = True
    #: Announce each utterance as it opens (:class:`UtteranceStarted`).
    report_starts: bool = False

    @property
    def neg_threshold(self) -> float:
        # Silero's own default hysteresis.
        return max(self.threshold - 0.15, 0.01)


@attrs.frozen
class UtteranceStarted:
    """An utterance has opened; ``start`` includes the ``speech_pad`` before its speech."""

    utterance_id: int
    start: float


@attrs.frozen
class PartialDue:
    utterance_id: int
    audio: np.ndarray = attrs.field(eq=False, repr=False)


@attrs.frozen
class UtteranceEnded:
    utterance_id: int
    audio: np.ndarray = attrs.field(eq=False, repr=False)
    start: float
    end: float
    #: Seconds of windows Silero called speech; lets the session skip clicks and coughs.
    speech: float
    #: ``silence``, ``max_length`` or ``flush``.
    reason: str


@attrs.frozen
class SpeechPaused:
    """The open utterance, as it will end if the silence that has begun lasts."""

    utterance_id: int
    audio: np.ndarray = attrs.field(eq=False, repr=False)
    #: Seconds of windows Silero called speech so far.
    speech: float = 0.0


@attrs.frozen
class SpeechResumed:
    """Speech came back before the pause became an endpoint: the paused audio is not final."""

    utterance_id: int


SegmenterEvent = UtteranceStarted | PartialDue | UtteranceEnded | SpeechPaused | SpeechResumed


def _samples(seconds: float) -> int:
    return round(seconds * MODEL_SAMPLE_RATE)


class Segmenter:
    def __init__(self, settings: SegmenterSettings) -> None:
        self._s = settings
        self._min_silence = _samples(settings.min_silence)
        self._pad = _samples(settings.speech_pad)
        self._partial_every = _samples(settings.partial_interval)
        self._capacity = _samples(settings.max_utterance)
        self._buf = np.zeros(self._capacity, dtype=np.float32)
        self._preroll: collections.deque[np.ndarray] = collections.deque()
        self._preroll_len = 0
        self._position = 0  # samples consumed since the session started
        self._next_id = 1
        self._open_id: int | None = None
        self._reset_utterance()

    def configure(self, settings: SegmenterSettings) -> None:
        """New endpointing (a client's turn detection) from the next window on; the open
        utterance, if any, goes on under it. The buffer's size and the partial cadence stay."""
        if (settings.max_utterance, settings.partial_interval) != (
            self._s.max_utterance,
            self._s.partial_interval,
        ):
            raise ValueError("max_utterance and partial_interval are fixed for a segmenter")
        self._s = settings
        self._min_silence = _samples(settings.min_silence)
        self._pad = _samples(settings.speech_pad)

    @property
    def settings(self) -> SegmenterSettings:
        return self._s

    # -- state -----------------------------------------------------------------------------
    @property
    def open_utterance_id(self) -> int | None:
        return self._open_id

    @property
    def position(self) -> float:
        """Seconds of audio consumed since the session started."""
        return self._position / MODEL_SAMPLE_RATE

    def _reset_utterance(self) -> None:
        self._len = 0
        self._start = 0
        self._silence_run = 0
        self._last_speech_end = 0
        self._last_pause = 0
        self._speech = 0
        self._since_partial = 0
        self._paused = False  # a SpeechPaused is out for the current silent run

    def _open(self, start: int, audio: np.ndarray) -> None:
        self._open_id = self._next_id
        self._next_id += 1
        self._reset_utterance()
        self._start = start
        self._buf[: audio.size] = audio
        self._len = audio.size
        self._since_partial = audio.size

    # -- input -----------------------------------------------------------------------------
    def push(self, window: np.ndarray, prob: float) -> list[SegmenterEvent]:
        """Feed one 512-sample window and its speech probability."""
        assert window.size == WINDOW
        self._position += WINDOW
        if self._open_id is None:
            return self._push_idle(window, prob)
        return self._push_speaking(window, prob)

    def _push_idle(self, window: np.ndarray, prob: float) -> list[SegmenterEvent]:
        if prob < self._s.threshold:
            self._preroll.append(window)
            self._preroll_len += window.size
            while self._preroll and self._preroll_len - self._preroll[0].size >= self._pad:
                self._preroll_len -= self._preroll.popleft().size
            return []
        pre = np.concatenate([*self._preroll, window]) if self._preroll else window
        pre = pre[-(self._pad + WINDOW) :]
        self._preroll.clear()
        self._preroll_len = 0
        self._open(self._position - pre.size, pre)
        self._speech = WINDOW
        self._last_speech_end = self._len
        return self._started()

    def _started(self) -> list[SegmenterEvent]:
        if not self._s.report_starts:
            return []
        assert self._open_id is not None
        return [UtteranceStarted(self._open_id, self._start / MODEL_SAMPLE_RATE)]

    def _push_speaking(self, window: np.ndarray, prob: float) -> list[SegmenterEvent]:
        if self._len + WINDOW > self._capacity:
            events: list[SegmenterEvent] = [self._cut_for_length(), *self._started()]
        else:
            events = []
        self._buf[self._len : self._len + WINDOW] = window
        self._len += WINDOW
        self._since_partial += WINDOW
        if prob >= self._s.threshold:
            self._silence_run = 0
            self._speech += WINDOW
            self._last_speech_end = self._len
            if self._paused:
                self._paused = False
                events.append(SpeechResumed(self._open_id))
        elif prob < self._s.neg_threshold or self._silence_run:
            self._silence_run += WINDOW
            self._last_pause = self._len
        # Without endpointing, silence is still counted (for the cut at max_utterance), but
        # it neither pauses nor ends anything.
        if (
            self._s.endpointing
            and not self._paused
            and 0 < self._silence_run < self._min_silence
            and self._silence_run >= self._pad
            and self._last_speech_end + self._pad <= self._len
        ):
            self._paused = True
            end = self._last_speech_end + self._pad
            events.append(
                SpeechPaused(
                    self._open_id, self._buf[:end].copy(), self._speech / MODEL_SAMPLE_RATE
                )
            )
        if self._s.endpointing and self._silence_run >= self._min_silence:
            end = min(self._len, self._last_speech_end + self._pad)
            events.append(self._close(end, "silence"))
            # The silence past the kept pad is the next utterance's pre-roll.
            tail = self._buf[end : self._len]
            if tail.size:
                self._preroll.append(tail[-self._pad :].copy() if self._pad else tail[:0].copy())
                self._preroll_len = self._preroll[-1].size
            return events
        # While a pause is out its audio is already being decoded as the final: a partial of
        # the same speech would only take a worker from it. The audio counts on, so a partial
        # is due as soon as speech resumes.
        if self._since_partial >= self._partial_every and self._speech and not self._paused:
            self._since_partial = 0
            events.append(PartialDue(self._open_id, self._buf[: self._len].copy()))
        return events

    def _cut_for_length(self) -> UtteranceEnded:
        cut = self._last_pause if self._last_pause > self._capacity // 2 else self._len
        rest = self._buf[cut : self._len].copy()
        start_of_rest = self._start + cut
        ended = self._close(cut, "max_length")
        # Speech is still going on: what follows the cut opens the next utterance at once.
        self._open(start_of_rest, rest)
        self._speech = rest.size
        self._last_speech_end = rest.size
        return ended

    def flush(self) -> list[SegmenterEvent]:
        """Close the open utterance now (client ``flush``/``end``, kick, shutdown)."""
        if self._open_id is None:
            return []
        return [self._close(self._len, "flush")]

    def discard(self) -> int | None:
        """Throw the open utterance away, with the pre-roll (the client cleared its audio);
        returns its id, if one was open. Time goes on counting from where it was."""
        dropped = self._open_id
        self._open_id = None
        self._reset_utterance()
        self._preroll.clear()
        self._preroll_len = 0
        return dropped

    def empty_utterance(self) -> UtteranceEnded:
        """An utterance without audio, ended now (a client that commits audio without speech
        still expects an item for it). Only while none is open."""
        assert self._open_id is None
        utterance_id = self._next_id
        self._next_id += 1
        now = self._position / MODEL_SAMPLE_RATE
        return UtteranceEnded(utterance_id, np.zeros(0, np.float32), now, now, 0.0, "flush")

    def append_tail(self, samples: np.ndarray) -> None:
        """Add samples shorter than a window to the open utterance (only before a flush)."""
        self._position += samples.size
        if self._open_id is not None:
            room = min(samples.size, self._capacity - self._len)
            self._buf[self._len : self._len + room] = samples[:room]
            self._len += room

    def _close(self, end: int, reason: str) -> UtteranceEnded:
        assert self._open_id is not None
        event = UtteranceEnded(
            utterance_id=self._open_id,
            audio=self._buf[:end].copy(),
            start=self._start / MODEL_SAMPLE_RATE,
            end=(self._start + end) / MODEL_SAMPLE_RATE,
            speech=self._speech / MODEL_SAMPLE_RATE,
            reason=reason,
        )
        self._open_id = None
        self._reset_utterance()
        return event
