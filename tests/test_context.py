import numpy as np

from stt_server.context import (
    MAX_CONTEXT_COMPRESSION,
    RIGHT_SIZED_EXTRA,
    SELF_CONTEXT_SECONDS,
    RecentSpeech,
    compression_ratio,
)


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


def test_a_context_repeating_itself_stops_before_whisper_takes_it_for_a_loop() -> None:
    """The same sentence again and again: the context keeps only as many copies as stay
    under the compression bound (faster-whisper's fallback fires at 2.4, prefix included)."""
    sentence = "She had your dark suit in greasy wash water all year."
    recent = RecentSpeech(max_seconds=20)
    for _ in range(5):
        recent.add(sec(3), sentence)
    _, n, prefix = recent.prepend(sec(3))
    copies = prefix.count(sentence)
    assert 1 <= copies < 5 and n == copies * 3 * 16000
    assert compression_ratio(prefix) <= MAX_CONTEXT_COMPRESSION
    assert compression_ratio(f"{prefix} {sentence}") > MAX_CONTEXT_COMPRESSION  # one more: over


def test_ordinary_speech_keeps_its_whole_context(references) -> None:
    """Real sentences never compress that well: the bound costs normal context nothing."""
    words = references["lucier.wav"].split()
    recent = RecentSpeech(max_seconds=20)
    for i in range(0, 60, 10):
        recent.add(sec(3), " ".join(words[i : i + 10]))
    _, n, prefix = recent.prepend(sec(1))
    assert n == 6 * 3 * 16000 and prefix == " ".join(words[:60])


def test_for_right_sized_finals_a_long_utterance_takes_less_context_and_a_longer_none() -> None:
    """Context and speech within max_seconds + RIGHT_SIZED_EXTRA: a short utterance keeps the
    whole context, a longer one only what fits (whole utterances, newest first), and one of
    SELF_CONTEXT_SECONDS or more none at all: it is its own context."""
    recent = RecentSpeech(max_seconds=15, right_sized=True)
    for text in ("a", "b", "c", "d", "e"):
        recent.add(sec(3), text)
    assert recent.prepend(sec(3))[1:] == (15 * 16000, "a b c d e")
    longest = 15 + RIGHT_SIZED_EXTRA - 15  # the speech that leaves room for all five
    assert longest < SELF_CONTEXT_SECONDS
    assert recent.prepend(sec(longest))[1:] == (15 * 16000, "a b c d e")
    assert recent.prepend(sec(longest + 0.1))[1:] == (12 * 16000, "b c d e")
    assert recent.prepend(sec(SELF_CONTEXT_SECONDS - 0.1))[1:] == (12 * 16000, "b c d e")
    audio, n, prefix = recent.prepend(sec(SELF_CONTEXT_SECONDS))
    assert (n, prefix, audio.size) == (0, None, SELF_CONTEXT_SECONDS * 16000)
    full = RecentSpeech(max_seconds=15)  # full-window finals: only Whisper's window bounds it
    for text in ("a", "b", "c"):
        full.add(sec(5), text)
    assert full.prepend(sec(8))[1:] == (15 * 16000, "a b c")
