"""Right-sized windows: what is kept of a short-window decode, a partial's loop cut, a final's
redone on the full window, batches, the real model's partials and finals on short windows, and
tail partials (a long utterance's partial decoded on its end, joined to the text shown)."""

from __future__ import annotations

import functools
import threading

import attrs
import numpy as np
import pytest
import trio

from stt_server import whisper
from stt_server.config import Config
from stt_server.engine import Recognition, TranscribeOptions
from stt_server.loadtest.client import stream_audio
from stt_server.loadtest.wer import word_error_rate
from stt_server.server import serve
from stt_server.windowing import (
    cut_loop,
    cut_restart,
    is_looping,
    keep_spoken,
    split_segments,
    stitch_tail,
)

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
    monkeypatch.setattr(speech_model, "short_finals", False)  # faster-whisper's own loop
    sentence = clip("ldc93s1.wav").astype(np.float32) / 32768
    spoken = "She had your dark suit in greasy wash water all year."
    audio = np.concatenate([sentence, sentence, sentence])
    options = TranscribeOptions(
        final=True, language="en", context_samples=2 * sentence.size, prefix=f"{spoken} {spoken}"
    )
    recognized = speech_model.transcribe(audio, options)
    assert len(attempts) == 1, attempts
    assert word_error_rate(spoken, recognized.text) <= 0.1, recognized.text


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("There was in that caravan. There was in that caravan", "There was in that caravan."),
        ("different different different different", "different"),
        ("who reinforce themselves, who reinforce themselves, who", "who reinforce themselves,"),
        ("ask not what your country can do for you", "ask not what your country can do for you"),
    ],
)  # fmt: skip
def test_a_preview_that_starts_over_is_cut_where_it_does(text: str, kept: str) -> None:
    assert cut_loop(text) == kept


def test_a_partial_that_starts_over_is_cut_not_redone(speech_model, clip, monkeypatch) -> None:
    """A short-window partial that says its sentence twice costs no full-window decode."""
    monkeypatch.setattr(speech_model, "short_partials", True)
    monkeypatch.setattr(
        whisper, "keep_spoken", lambda segments, duration, decode: "she had your. she had your"
    )
    full = []
    monkeypatch.setattr(type(speech_model), "_decode", lambda self, *a, **k: full.append(a))
    audio = clip("ldc93s1.wav").astype(np.float32) / 32768
    assert speech_model.transcribe(audio, TranscribeOptions(final=False)).text == "she had your."
    assert full == []


LDC = "She had your dark suit in greasy wash water all year."
JFK = "And so my fellow Americans, ask not what your country can do for you."


def context_request(clip) -> tuple[np.ndarray, TranscribeOptions]:
    """ldc93s1.wav said after jfk.wav's first 7 s, with jfk's words as the context's text."""
    context = clip("jfk.wav")[: 7 * 16000].astype(np.float32) / 32768
    speech = clip("ldc93s1.wav").astype(np.float32) / 32768
    options = TranscribeOptions(final=True, language="en", context_samples=context.size, prefix=JFK)
    return np.concatenate([context, speech]), options


class FullWindowSpy:
    def __init__(self, monkeypatch, model) -> None:
        self.calls: list[int] = []
        real = type(model)._decode

        def spy(this, audio, *args, **kwargs):
            self.calls.append(audio.size)
            return real(this, audio, *args, **kwargs)

        monkeypatch.setattr(type(model), "_decode", spy)


def test_a_final_with_context_is_decoded_on_a_right_sized_window(
    speech_model, clip, monkeypatch
) -> None:
    """Context and speech plus FINAL_PAD of silence, not 30 s: the new words alone come back,
    as right as on the full window, and no full-window decode ran."""
    audio, options = context_request(clip)
    windows = []
    real_generate = type(speech_model)._generate

    def measuring(self, group):
        windows.extend(p.length for p in group)
        return real_generate(self, group)

    monkeypatch.setattr(type(speech_model), "_generate", measuring)
    full = FullWindowSpy(monkeypatch, speech_model)
    monkeypatch.setattr(speech_model, "short_finals", True)
    short = speech_model.transcribe(audio, options).text
    assert full.calls == [] and windows == [audio.size / 16000 + whisper.FINAL_PAD]
    assert windows[0] < 20
    monkeypatch.setattr(speech_model, "short_finals", False)
    whole = speech_model.transcribe(audio, options).text
    assert len(full.calls) == 1
    assert "americans" not in short.lower()  # the context's words are not sent again
    assert word_error_rate(LDC, short) <= word_error_rate(LDC, whole) + 0.1, (short, whole)


@attrs.frozen
class FakeOutput:
    sequences_ids: list
    scores: tuple = (-0.1,)
    no_speech_prob: float = 0.0


def final_that_says(speech_model, clip, monkeypatch, said: str, score: float = -0.1):
    """A right-sized final of ``context_request`` whose decode answers the context's text, then
    ``said``: ``(its text, the audio sizes decoded on the full window, the request's audio)``."""
    audio, options = context_request(clip)
    tokenizer = speech_model._tokenizer("en", "transcribe")
    answer = tokenizer.encode(" " + JFK) + (tokenizer.encode(said) if said else [])

    def generate(self, group):
        return [FakeOutput([answer], (score,)) for _ in group]

    monkeypatch.setattr(type(speech_model), "_generate", generate)
    full = FullWindowSpy(monkeypatch, speech_model)
    monkeypatch.setattr(speech_model, "short_finals", True)
    return speech_model.transcribe(audio, options).text, full.calls, audio


@pytest.mark.parametrize("problem", ["loops", "runs out", "unsure", "says nothing new"])
def test_a_right_sized_final_that_cannot_be_trusted_is_redone_on_the_full_window(
    speech_model, clip, monkeypatch, problem
) -> None:
    said = {
        # A loop, but not a restart: speech may say the same five words twice.
        "loops": " she had your dark suit and she had your dark suit on.",
        # No word twice: only the budget can tell this one from a real answer.
        "runs out": "".join(f" w{i}x" for i in range(120)),
        "unsure": " she had your dark suit in greasy wash water.",
        "says nothing new": "",
    }[problem]
    score = -3.0 if problem == "unsure" else -0.1
    text, full, audio = final_that_says(speech_model, clip, monkeypatch, said, score)
    assert full == [audio.size]  # the full window, with the context in front
    assert word_error_rate(LDC, text) <= 0.3 and not is_looping(text), text


@pytest.mark.parametrize(
    ("said", "kept"),
    [
        # It reads its own words again until it runs out of tokens...
        (" She had your dark suit. She had your dark suit. She had", "She had your dark suit."),
        # ... or the window's, the context first.
        (" In greasy wash water. And so my fellow Americans, ask not what your country can do"
         " for you. In greasy wash water. And so my", "In greasy wash water."),
        # Two words said over and over until the token budget is spent.
        (" Ask not." * 12, "Ask not."),
    ],
)  # fmt: skip
def test_a_right_sized_final_that_reads_its_window_again_is_cut_not_redone(
    speech_model, clip, monkeypatch, said, kept
) -> None:
    text, full, _ = final_that_says(speech_model, clip, monkeypatch, said)
    assert text == kept
    assert full == []


@pytest.mark.parametrize(
    ("text", "lead", "ran_out", "kept"),
    [
        ("I am sitting in a room. I am sitting in a room. I", "", False, "I am sitting in a room."),
        # All of the beginning again, exactly: the shortest restart told without a spent budget.
        ("She had your dark suit. She had your dark suit.", "", False, "She had your dark suit."),
        # From the context's first word: the window read again.
        ("Different from the one you are in now. I am sitting in a room. Different from the one",
         "I am sitting in a room.", False, "Different from the one you are in now."),
        # Two words, or three words of a longer beginning, only when the budget ran out.
        ("Ask not. Ask not. Ask not. Ask", "", True, "Ask not."),
        ("Ask not. Ask not. Ask not. Ask", "", False, None),
        ("She had your dark suit. She had your", "", True, "She had your dark suit."),
        ("She had your dark suit. She had", "", True, None),
        # Speech that says words twice is not a restart: what follows differs, the kept text
        # is one word said over, or the beginning comes again only in part.
        ("We shall fight on the beaches, we shall fight on the landing grounds", "", False, None),
        ("We shall fight on the beaches, we shall fight on the landing grounds, we shall fight",
         "", False, None),
        ("thank you, thank you", "", False, None),
        ("no no no no", "", True, None),
        ("ask not what your country can do for you", "", False, None),
        # No cut inside a piece: "suit.She" is one, and so is text written without spaces.
        ("She had your dark suit.She had your dark suit.She had your dark suit.", "", True, None),
        ("你好世界。谢谢。你好世界。谢谢。", "", True, None),
    ],
)  # fmt: skip
def test_a_restart_is_told_from_speech_that_repeats_itself(
    text: str, lead: str, ran_out: bool, kept: str | None
) -> None:
    assert cut_restart(text, lead, ran_out=ran_out) == kept


def test_a_cut_final_that_still_loops_is_redone_on_the_full_window(
    speech_model, clip, monkeypatch
) -> None:
    """The text before the restart loops itself: only the full window can be trusted."""
    looping = " she she she had your. she she she had your."
    _, full, audio = final_that_says(speech_model, clip, monkeypatch, looping)
    assert full == [audio.size]


def test_a_batch_answers_each_request_as_alone_and_a_bad_one_fails_alone(
    speech_model, clip, monkeypatch
) -> None:
    monkeypatch.setattr(speech_model, "short_finals", True)
    monkeypatch.setattr(speech_model, "short_partials", True)
    with_context, options = context_request(clip)
    ldc = clip("ldc93s1.wav").astype(np.float32) / 32768
    jfk = clip("jfk.wav").astype(np.float32) / 32768
    requests = [
        (with_context, options),
        (jfk, TranscribeOptions(final=True, language="en")),
        (None, TranscribeOptions(final=True, language="en")),  # broken
        (ldc, TranscribeOptions(final=False, language="en")),
        (jfk[: 4 * 16000], TranscribeOptions(final=False, language="en")),
    ]
    generated = []
    real_generate = type(speech_model)._generate
    monkeypatch.setattr(
        type(speech_model),
        "_generate",
        lambda self, group: generated.append(len(group)) or real_generate(self, group),
    )
    batch = speech_model.transcribe_batch(requests)
    assert isinstance(batch[2], Exception)
    # The two finals in one model call, the two partials in another.
    assert sorted(generated) == [2, 2], generated
    alone = [speech_model.transcribe(a, o).text for a, o in requests if a is not None]
    together = [r.text for r in batch if not isinstance(r, Exception)]
    for a, b in zip(alone, together, strict=True):
        assert word_error_rate(a, b) <= 0.1, (a, b)
    assert word_error_rate(LDC, together[0]) <= 0.2 and "ask not" in together[1].lower()


def test_finals_whose_prompts_differ_in_length_go_to_the_model_apart(
    speech_model, clip, monkeypatch
) -> None:
    """CTranslate2 decodes in one call only prompts whose previous text has one length (it
    raises otherwise, and the batch would be decoded again one by one): finals whose client
    prompts differ in length go in separate calls, none failing."""
    monkeypatch.setattr(speech_model, "short_finals", True)
    ldc = clip("ldc93s1.wav").astype(np.float32) / 32768
    requests = [
        (ldc, TranscribeOptions(final=True, language="en", prompt="A reading.")),
        (ldc, TranscribeOptions(final=True, language="en", prompt="A reading of a sentence.")),
        (ldc, TranscribeOptions(final=True, language="en", prompt="Some reading.")),
    ]
    calls, failures = [], []
    real_generate = type(speech_model)._generate

    def spying(self, group):
        calls.append(len(group))
        try:
            return real_generate(self, group)
        except Exception as exc:
            failures.append(exc)
            raise

    monkeypatch.setattr(type(speech_model), "_generate", spying)
    results = speech_model.transcribe_batch(requests)
    assert failures == [], failures
    assert sorted(calls) == [1, 2]  # the two prompts of one length together
    for result in results:
        assert word_error_rate(LDC, result.text) <= 0.2, result.text


def test_a_loaded_model_keeps_numpy_blas_to_one_thread(speech_model, clip) -> None:
    """An idle OpenBLAS pool spins between requests; one thread must be all it has. Measured
    as a person would notice it: a partial costs no more CPU time than wall time."""
    import time

    from threadpoolctl import threadpool_info

    assert speech_model is not None  # loading it is what sets the limit
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    assert blas and all(i["num_threads"] == 1 for i in blas), blas
    audio = clip("cats.wav")[: 5 * 16000].astype(np.float32) / 32768
    options = TranscribeOptions(final=False, language="en")
    speech_model.transcribe(audio, options)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(3):
        speech_model.transcribe(audio, options)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # Spinning threads showed as twice the wall time; a busy machine only lowers the ratio.
    assert cpu < 1.6 * wall, (cpu, wall)


def test_a_request_that_breaks_its_batchs_decode_fails_alone(speech_model, clip, monkeypatch):
    """When a group's model call fails, each of its requests is decoded alone, so only the one
    that breaks it gets the error."""
    monkeypatch.setattr(speech_model, "short_partials", True)
    real_generate = type(speech_model)._generate
    poison = int(2.5 * 16000) + 7

    def generate(self, group):
        if any(p.audio.size == poison for p in group):
            raise RuntimeError("this request breaks the decoder")
        return real_generate(self, group)

    monkeypatch.setattr(type(speech_model), "_generate", generate)
    ldc = clip("ldc93s1.wav").astype(np.float32) / 32768
    options = TranscribeOptions(final=False, language="en")
    batch = speech_model.transcribe_batch(
        [(ldc[: poison - 7], options), (ldc[:poison], options), (ldc[: poison + 99], options)]
    )
    assert isinstance(batch[1], RuntimeError)
    assert all("greasy" in r.text.lower() for r in (batch[0], batch[2])), batch


@pytest.mark.parametrize(
    ("earlier", "tail", "joined"),
    [
        # The tail's first word cut by its window's start; the earlier text's last word
        # (cut by its own window's end) replaced by the tail's reading of it.
        (
            "And so, my fellow Americans, ask not what your coun",
            "ellow Americans, ask not what your country can do",
            "And so, my fellow Americans, ask not what your country can do",
        ),
        # Case and punctuation of the words both say are the earlier text's.
        (
            "She had your dark suit in",
            "Dark suit in greasy wash water.",
            "She had your dark suit in greasy wash water.",
        ),
        # A phrase said twice: the tail joins the later saying, nearest the window's start.
        (
            "we went to the shop and then we went to the",
            "went to the park.",
            "we went to the shop and then we went to the park.",
        ),
        # The alignment where most words meet wins over a later one ("the" alone).
        (
            "the cat sat on the mat with the",
            "cat sat on the mat with the dog",
            "the cat sat on the mat with the dog",
        ),
        # Where they disagree before their last common word, the earlier reading stays (the
        # tail's first words had no sentence before them; cats.wav, read by the real model).
        (
            "So the boy whom the dark people called Menace smiled more often than he",
            "people called menus smiled more often than he wept as",
            "So the boy whom the dark people called Menace smiled more often than he wept as",
        ),
        # The earlier text's last word closed its window with a period; the tail read it
        # mid-sentence.
        (
            "yet had left him this small furry thing to mitigate.",
            "thing to mitigate his sorrow, and when",
            "yet had left him this small furry thing to mitigate his sorrow, and when",
        ),
        # A phrase said twice that meets more of the tail further back: there the earlier
        # text goes on with other words, so the joint is the later saying (review).
        (
            "we talked about it. I want to go there and then I want to",
            "I want to go home now",
            "we talked about it. I want to go there and then I want to go home now",
        ),
        # One word in one text, two in the other: the joint is where the pieces line up.
        (
            "they say it is well-known",
            "it is well known to all",
            "they say it is well known to all",
        ),
        (
            "they say it is well known",
            "it is well-known to all",
            "they say it is well-known to all",
        ),
    ],
)
def test_a_tail_joins_the_earlier_text_where_their_words_meet(earlier, tail, joined) -> None:
    assert stitch_tail(earlier, tail) == joined


@pytest.mark.parametrize(
    ("earlier", "tail"),
    [
        ("She had your dark suit in", "something else entirely"),  # a misreading on one side
        ("She had your dark suit in", ""),  # the tail heard nothing
        ("She had your dark suit in", "in"),  # one word is no anchor
        ("", "greasy wash water"),
        # Words met here and there, never two in a row: common words by chance.
        ("the cat and the dog", "the bird and a fish"),
        # The words meet only if the tail began before the utterance did.
        ("She had your dark suit in", "oh my word and what a dark suit in greasy wash"),
        # Written without spaces: a piece is a phrase, and the joint would fall inside one.
        ("今日は、いい天気ですね、散歩に行こう", "いい天気ですね、散歩に行こう、うん"),
        # A tail cut short: joining it would take back words already shown.
        ("a b c d e f g h", "c d"),
    ],
)
def test_a_tail_that_does_not_meet_the_earlier_text_is_not_joined(earlier, tail) -> None:
    assert stitch_tail(earlier, tail) is None


def test_a_tail_matches_only_near_the_earlier_texts_end() -> None:
    """A run far back (the utterance's opening words, said again at its end) is not where the
    tail's window starts: joining there would drop everything said in between."""
    earlier = "one two three " + " ".join(f"w{i}" for i in range(20))
    assert stitch_tail(earlier, "one two three four") is None


def partial_windows(monkeypatch, model) -> tuple[list[float], list[int]]:
    """Spies: the windows (seconds, padding included) that partials were decoded on, and the
    tail partials decoded again on the whole utterance."""
    windows: list[float] = []
    wholes: list[int] = []
    real_generate, real_whole = type(model)._generate, type(model)._whole_partial

    def generate(self, group):
        windows.extend(round(p.length, 2) for p in group)
        return real_generate(self, group)

    def whole(self, plan):
        wholes.append(plan.audio.size)
        return real_whole(self, plan)

    monkeypatch.setattr(type(model), "_generate", generate)
    monkeypatch.setattr(type(model), "_whole_partial", whole)
    monkeypatch.setattr(model, "short_partials", True)
    monkeypatch.setattr(model, "tail_partials", True)
    return windows, wholes


def test_a_long_utterances_partial_decodes_its_end_and_joins_the_text_shown(
    speech_model, clip, monkeypatch
) -> None:
    """jfk.wav at 10 s, with its partial at 6 s shown: only the last 7 s (the 4 s since, and
    3 s the shown partial also read) are decoded, and the joined text reads as a partial of all
    10 s does."""
    audio = clip("jfk.wav").astype(np.float32) / 32768
    windows, wholes = partial_windows(monkeypatch, speech_model)
    shown = speech_model.transcribe(audio[: 6 * 16000], TranscribeOptions(final=False)).text
    options = TranscribeOptions(final=False, shown=shown, shown_samples=6 * 16000)
    windows.clear()
    joined = speech_model.transcribe(audio[: 10 * 16000], options).text
    assert windows == [7.0 + whisper.SHORT_WINDOW_PAD] and wholes == []
    monkeypatch.setattr(speech_model, "tail_partials", False)
    whole = speech_model.transcribe(audio[: 10 * 16000], options).text
    assert windows[1:] == [10.0 + whisper.SHORT_WINDOW_PAD]
    assert joined.split()[:3] == shown.split()[:3]  # the words already shown stay
    assert "your country" in joined.lower()  # and the tail's are joined after them
    assert word_error_rate(whole, joined) <= 0.1, (joined, whole)


def test_a_tail_that_does_not_join_the_text_shown_is_decoded_whole(
    speech_model, clip, monkeypatch
) -> None:
    """Shown text the tail's words do not carry on from: the partial is the whole utterance's,
    as if there were no tail, after one decode of the tail."""
    audio = clip("jfk.wav").astype(np.float32) / 32768
    windows, wholes = partial_windows(monkeypatch, speech_model)
    options = TranscribeOptions(
        final=False, shown="Completely unrelated words about", shown_samples=6 * 16000
    )
    text = speech_model.transcribe(audio[: 9 * 16000], options).text
    assert wholes == [9 * 16000]
    assert windows == [6.0 + whisper.SHORT_WINDOW_PAD, 9.0 + whisper.SHORT_WINDOW_PAD]
    assert "unrelated" not in text and "americans" in text.lower(), text


@pytest.mark.parametrize(
    ("seconds", "shown", "shown_seconds", "tails"),
    [
        (9, None, 0, True),  # nothing shown yet: nothing to join to
        (6, "And so, my fellow Americans", 4, True),  # a 5 s tail would leave out only 1 s
        (9, "And so, my fellow Americans", 6, False),  # tail partials off
        (9, "And so, my fellow Americans", 10, True),  # shown text of more audio: not this one's
        (9, "そして、私の仲間のアメリカ人", 6, True),  # no spaces: nothing to line up
    ],
)
def test_a_partial_decodes_the_whole_utterance_where_a_tail_would_not_do(
    speech_model, clip, monkeypatch, seconds, shown, shown_seconds, tails
) -> None:
    audio = clip("jfk.wav")[: seconds * 16000].astype(np.float32) / 32768
    windows, wholes = partial_windows(monkeypatch, speech_model)
    monkeypatch.setattr(speech_model, "tail_partials", tails)
    options = TranscribeOptions(final=False, shown=shown, shown_samples=shown_seconds * 16000)
    speech_model.transcribe(audio, options)
    assert windows == [seconds + whisper.SHORT_WINDOW_PAD] and wholes == []


@attrs.define
class HeardModel:
    """Answers each partial with how much speech it was given; remembers every partial asked
    for, with that amount."""

    name: str = "heard"
    is_multilingual: bool = False
    final: str = "the end."
    #: Partials answer nothing (as for noise) when False.
    hears: bool = True
    partials: list[tuple[TranscribeOptions, int]] = attrs.Factory(list)
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Recognition:
        if options.final:
            return Recognition(self.final)
        speech = audio.size - options.context_samples
        with self._lock:
            self.partials.append((options, speech))
        return Recognition(f"heard {speech}" if self.hears else "")


async def test_a_session_tells_each_partial_what_it_last_showed_of_the_utterance(clip) -> None:
    """Through a socket, two utterances: each partial request carries the text and the
    length of the last partial shown of its own utterance (never of the one before), so that
    the model may decode only what came since."""
    model = HeardModel()
    sentence = clip("ldc93s1.wav")
    audio = np.concatenate([sentence, np.zeros(2 * 16000, np.int16), sentence])
    config = Config(host="127.0.0.1", port=0, control_socket="")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config, model=model))
        with trio.fail_after(60):
            result = await stream_audio(f"ws://127.0.0.1:{server.port}/", audio, speed=3)
        nursery.cancel_scope.cancel()
    assert len(result.finals) == 2, result.finals
    told = [(options, speech) for options, speech in model.partials if options.shown]
    assert told, "no partial was told what was shown before it"
    for options, speech in told:
        assert options.shown == f"heard {options.shown_samples}"  # a partial that was shown
        assert 0 < options.shown_samples < speech  # of this utterance, and less of it
    # The latest shown, not the first of each utterance.
    assert len({options.shown_samples for options, _ in told}) >= 3, told
    # Each utterance's first partial has nothing shown before it.
    assert len(model.partials) - len(told) >= 2


def test_only_a_transcription_with_short_partials_decodes_a_tail(speech_model, monkeypatch):
    """A translation's words need not follow the audio's order, so its partials are decoded
    whole (tiny.en turns every task into transcription, so the rule is asked directly); with
    short partials off, a partial takes the full window and no tail at all."""
    monkeypatch.setattr(speech_model, "tail_partials", True)
    shown = dict(shown="And so, my fellow Americans", shown_samples=6 * 16000)
    transcribe = TranscribeOptions(final=False, language="en", **shown)
    assert speech_model._tail_samples(9 * 16000, transcribe) == 6 * 16000
    translate = attrs.evolve(transcribe, task="translate")
    assert speech_model._tail_samples(9 * 16000, translate) is None


def test_with_short_partials_off_a_partial_takes_the_full_window(
    speech_model, clip, monkeypatch
) -> None:
    audio = clip("jfk.wav")[: 9 * 16000].astype(np.float32) / 32768
    windows, wholes = partial_windows(monkeypatch, speech_model)
    monkeypatch.setattr(speech_model, "short_partials", False)
    full = FullWindowSpy(monkeypatch, speech_model)
    options = TranscribeOptions(final=False, shown="And so, my fellow", shown_samples=6 * 16000)
    speech_model.transcribe(audio, options)
    assert windows == [] and wholes == [] and full.calls == [audio.size]


@pytest.mark.parametrize("hears", [True, False])
async def test_an_empty_final_clears_a_shown_partial_and_else_sends_nothing(clip, hears) -> None:
    """A final that comes back empty: where a partial of the utterance was shown, an empty
    ``completed`` takes it back; where none was, the client hears nothing of it."""
    model = HeardModel(final="", hears=hears)
    config = Config(host="127.0.0.1", port=0, control_socket="")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config, model=model))
        with trio.fail_after(60):
            url = f"ws://127.0.0.1:{server.port}/"
            result = await stream_audio(url, clip("ldc93s1.wav"), speed=3)
        nursery.cancel_scope.cancel()
    assert bool(result.partials) == hears
    assert [final["text"] for final in result.finals] == ([""] if hears else [])
