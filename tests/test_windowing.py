"""Right-sized windows for partials: what is kept of a short-window decode, loops caught and
redone on the full window, and the real model's partials on short windows."""

from __future__ import annotations

import numpy as np
import pytest

from stt_server.engine import TranscribeOptions
from stt_server.loadtest.wer import word_error_rate
from stt_server.windowing import is_looping, keep_spoken, split_segments

TS = 50000  # timestamp_begin in these made-up token ids: id TS + k is k * 20 ms


def decode(tokens: list[int]) -> str:
    return " ".join(f"w{t}" for t in tokens)


def test_segments_split_at_timestamps() -> None:
    tokens = [TS, 1, 2, TS + 100, TS + 100, 3, TS + 150, TS + 200, 4]
    assert split_segments(tokens, TS) == [(0.0, [1, 2]), (2.0, [3]), (4.0, [4])]


def test_segments_about_the_padding_and_restarts_are_dropped() -> None:
    # Audio of 3 s: a segment starting at 2.95 s talks about the padding.
    padding = [(0.0, [1, 2, 3]), (2.95, [9, 9])]
    assert keep_spoken(padding, 3.0, decode) == "w1 w2 w3"
    # The decoder starts the sentence again in a second segment.
    restart = [(0.0, [1, 2, 3]), (2.0, [1, 2])]
    assert keep_spoken(restart, 3.0, decode) == "w1 w2 w3"
    # It repeats its last words.
    repeat = [(0.0, [1, 2, 3, 4]), (2.0, [3, 4])]
    assert keep_spoken(repeat, 3.0, decode) == "w1 w2 w3 w4"
    # A real second sentence is kept.
    two = [(0.0, [1, 2]), (1.5, [5, 6])]
    assert keep_spoken(two, 3.0, decode) == "w1 w2 w5 w6"


@pytest.mark.parametrize(
    ("text", "looping"),
    [
        ("and so my fellow americans ask not what your country ask not what your country", True),
        ("there was there was there", True),
        ("i am sitting in a room different from the one that i am sitting in a room", True),
        ("no no no", True),
        ("ask not what your country can do for you ask what you can do for your country", False),
        ("there was in that singular caravan a little boy with no father or mother", False),
        ("very very good", False),
    ],
)
def test_loops_are_recognised(text: str, looping: bool) -> None:
    assert is_looping(text) is looping


def test_a_looping_short_window_partial_is_redone_on_the_full_window(
    speech_model, clip, monkeypatch
) -> None:
    monkeypatch.setattr(speech_model, "short_partials", True)
    monkeypatch.setattr(
        type(speech_model), "_decode_short", lambda self, audio, language, task: "so so so so"
    )
    audio = clip("ldc93s1.wav").astype(np.float32) / 32768
    text = speech_model.transcribe(audio, TranscribeOptions(final=False)).text
    assert "greasy" in text.lower() and not is_looping(text)


def test_short_window_partials_read_like_full_window_ones(speech_model, clip, monkeypatch):
    """Partials of a growing utterance, cut every 2 s, on both windows: the short window's words
    are as right (within 10 points of WER against the words spoken so far)."""
    audio = clip("jfk.wav").astype(np.float32) / 32768
    reference = "and so my fellow americans ask not what your country can do for you"
    results = {}
    full_decodes = []
    real_decode = type(speech_model)._decode

    def spy(self, *args, **kwargs):
        full_decodes.append(args[0].size)
        return real_decode(self, *args, **kwargs)

    monkeypatch.setattr(type(speech_model), "_decode", spy)
    for short in (True, False):
        full_decodes.clear()
        monkeypatch.setattr(speech_model, "short_partials", short)
        texts = [
            speech_model.transcribe(audio[: int(s * 16000)], TranscribeOptions(final=False)).text
            for s in (2.5, 4.5, 6.5, 8.5)
        ]
        assert all(texts), texts
        results[short] = word_error_rate(reference, texts[-1])
        # The short window is what ran (the full one only for a loop, and none here).
        assert len(full_decodes) == (0 if short else 4), full_decodes
        assert not any(is_looping(t) for t in texts), texts
    assert results[True] <= results[False] + 0.10, results


def test_a_repeated_sentence_in_the_context_costs_one_decode(speech_model, clip, monkeypatch):
    """Someone says the same sentence a third time: faster-whisper would measure its loop test
    on context and new words together (2.5:1 here) and decode five more times at rising
    temperatures. The test is made on the new words alone, so one decode does it."""
    import faster_whisper.transcribe

    attempts = []
    measure = faster_whisper.transcribe.get_compression_ratio

    def counting(text: str) -> float:
        attempts.append(text)
        return measure(text)

    monkeypatch.setattr(faster_whisper.transcribe, "get_compression_ratio", counting)
    sentence = clip("ldc93s1.wav").astype(np.float32) / 32768
    spoken = "She had your dark suit in greasy wash water all year."
    audio = np.concatenate([sentence, sentence, sentence])
    options = TranscribeOptions(
        final=True, language="en", context_samples=2 * sentence.size, prefix=f"{spoken} {spoken}"
    )
    recognized = speech_model.transcribe(audio, options)
    assert len(attempts) == 1, attempts
    assert word_error_rate(spoken, recognized.text) <= 0.1, recognized.text
