import numpy as np

from stt_server.context import RecentSpeech


def sec(n: float) -> np.ndarray:
    return np.ones(int(n * 16000), dtype=np.float32)


def test_context_is_the_most_recent_whole_utterances_within_the_bound() -> None:
    recent = RecentSpeech(max_seconds=5)
    recent.add(sec(3), "one")
    recent.add(sec(2), "two")
    recent.add(sec(2), "three")  # 7 s in all: "one" falls out
    audio, n, prefix = recent.prepend(sec(1))
    assert prefix == "two three"
    assert n == 4 * 16000 and audio.size == 5 * 16000


def test_context_never_pushes_a_request_past_whisper_window() -> None:
    recent = RecentSpeech(max_seconds=20)
    recent.add(sec(10), "a")
    recent.add(sec(8), "b")
    audio, n, prefix = recent.prepend(sec(20))
    assert prefix == "b" and audio.size <= 29.5 * 16000
    audio, n, prefix = recent.prepend(sec(25))
    assert (n, prefix) == (0, None) and audio.size == 25 * 16000


def test_an_utterance_without_text_breaks_the_chain() -> None:
    recent = RecentSpeech(max_seconds=20)
    recent.add(sec(1), "a")
    recent.add(sec(1), "")
    assert recent.prepend(sec(1))[1:] == (0, None)


def test_disabled_context() -> None:
    recent = RecentSpeech(max_seconds=0)
    recent.add(sec(1), "a")
    assert recent.prepend(sec(1))[1:] == (0, None)
