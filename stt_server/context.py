"""A session's recent speech, given back to the model as context for the next utterance.

Endpointing at every short pause cuts sentences apart, and Whisper transcribes a fragment like
"ask not" worse without the words before it (lucier.wav: 10.5% WER streamed without context,
2.9% with it, 1.0% offline on the whole file). So each request carries the session's last few
finished utterances in front of the new audio, with the text already sent for them as a forced
decoder prefix: the model hears the sentence so far and only writes what is new. Bounded in
seconds, so the request still fits Whisper's 30 s window and memory stays flat over a long
session.
"""

from __future__ import annotations

import collections
import zlib

import numpy as np

from .config import WHISPER_WINDOW_SECONDS
from .protocol import MODEL_SAMPLE_RATE

#: Room left in the 30 s window so that padding never pushes the request past it.
_WINDOW_MARGIN = 0.5

#: faster-whisper redoes a decode at rising temperatures (up to five more times) when its text
#: compresses better than 2.4:1, taking it for a loop, and the forced prefix counts as part of
#: that text. A context of one sentence said again and again (someone repeating themselves, a
#: test looping a clip) would set that off on every final. So the context stops short of
#: compressing this well by itself, leaving room for the new words.
MAX_CONTEXT_COMPRESSION = 2.0


def compression_ratio(text: str) -> float:
    """As faster-whisper measures it: bytes of text per byte of its zlib compression."""
    raw = text.encode()
    return len(raw) / len(zlib.compress(raw))


#: Context and speech together, for finals on right-sized windows: a long utterance carries
#: much of its own context, and every second of context costs it encoder time and decoder
#: steps (its text is forced on the decoder word by word).
RIGHT_SIZED_EXTRA = 5.0

#: For finals on right-sized windows, an utterance this long (in seconds, its pads included)
#: goes without context: it is its own. Measured on the shipped clips (benchmarks/
#: final_windows.py): cats.wav's 7-12 s sentences read the same without context (2.2 % WER) and
#: their finals cost 0.2-0.35 s instead of 0.5-0.65 s; lucier.wav's fragments, all under 5.5 s,
#: need theirs (one of 5.4 s without it: 2.9 % instead of 1.9 %). These long finals were the
#: tail of the capacity benchmark's final latency.
SELF_CONTEXT_SECONDS = 6.0


class RecentSpeech:
    def __init__(self, max_seconds: float, *, right_sized: bool = False) -> None:
        """``right_sized``: context and speech stay within ``max_seconds`` plus
        ``RIGHT_SIZED_EXTRA``, so a long utterance takes less context, and one of
        ``SELF_CONTEXT_SECONDS`` or more none; otherwise they only have to fit Whisper's
        window."""
        self._max = int(max_seconds * MODEL_SAMPLE_RATE)
        window = max_seconds + RIGHT_SIZED_EXTRA if right_sized else WHISPER_WINDOW_SECONDS
        self._window = int(min(window, WHISPER_WINDOW_SECONDS - _WINDOW_MARGIN) * MODEL_SAMPLE_RATE)
        self._self_context = int(SELF_CONTEXT_SECONDS * MODEL_SAMPLE_RATE) if right_sized else None
        self._items: collections.deque[tuple[np.ndarray, str]] = collections.deque()
        self._samples = 0

    def add(self, audio: np.ndarray, text: str) -> None:
        """Remember a finished utterance; one without text breaks the chain of context."""
        if not text or not self._max:
            self.clear()
            return
        self._items.append((audio, text))
        self._samples += audio.size
        while self._samples > self._max:
            old, _ = self._items.popleft()
            self._samples -= old.size

    def clear(self) -> None:
        self._items.clear()
        self._samples = 0

    def prepend(self, audio: np.ndarray) -> tuple[np.ndarray, int, str | None]:
        """``(audio with context in front, context length in samples, context text)``."""
        if self._self_context is not None and audio.size >= self._self_context:
            return audio, 0, None
        room = min(self._window - audio.size, self._max)
        chosen: list[tuple[np.ndarray, str]] = []
        used = 0
        text = ""
        for item in reversed(self._items):
            if used + item[0].size > room:
                break
            longer = f"{item[1]} {text}" if text else item[1]
            if compression_ratio(longer) > MAX_CONTEXT_COMPRESSION:
                break
            chosen.append(item)
            used += item[0].size
            text = longer
        if not chosen:
            return audio, 0, None
        chosen.reverse()
        context = np.concatenate([a for a, _ in chosen] + [audio])
        return context, used, text
