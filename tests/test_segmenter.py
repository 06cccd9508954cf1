"""Endpointing rules, driven window by window with chosen speech probabilities."""

import itertools

import attrs
import numpy as np
import pytest

from stt_server.segmenter import (
    PartialDue,
    Segmenter,
    SegmenterSettings,
    SpeechPaused,
    SpeechResumed,
    UtteranceEnded,
)
from stt_server.vad import WINDOW

SETTINGS = SegmenterSettings(
    threshold=0.5, min_silence=0.6, max_utterance=5.0, speech_pad=0.3, partial_interval=0.5
)
W = WINDOW / 16000  # seconds per window


def feed(seg: Segmenter, probs: list[float], value: float = 0.1) -> list:
    events = []
    for i, p in enumerate(probs):
        # Each window carries its own index so tests can check which audio ended up where.
        events += seg.push(np.full(WINDOW, value + i * 1e-6, dtype=np.float32), p)
    return events


def secs(seconds: float) -> int:
    return round(seconds / W)


def ended(events: list) -> list[UtteranceEnded]:
    return [e for e in events if isinstance(e, UtteranceEnded)]


def test_silence_and_noise_below_threshold_open_nothing() -> None:
    seg = Segmenter(SETTINGS)
    events = feed(seg, [0.0] * secs(10) + [0.3, 0.49] * secs(5))
    assert events == []
    assert seg.open_utterance_id is None
    assert seg.flush() == []


def test_speech_then_silence_gives_one_utterance_with_times_and_padding() -> None:
    seg = Segmenter(SETTINGS)
    events = feed(seg, [0.0] * secs(1.0) + [0.9] * secs(2.0) + [0.0] * secs(1.0))
    (utt,) = ended(events)
    assert utt.utterance_id == 1 and utt.reason == "silence"
    # Starts one pad (plus the triggering window) before the speech, ends one pad after it.
    assert utt.start == pytest.approx(1.0 - 0.3, abs=2 * W)
    assert utt.end == pytest.approx(3.0 + 0.3, abs=2 * W)
    assert utt.audio.size == pytest.approx((utt.end - utt.start) * 16000, abs=1)
    assert utt.speech == pytest.approx(2.0, abs=2 * W)
    assert seg.open_utterance_id is None


def test_a_pause_shorter_than_min_silence_does_not_split() -> None:
    seg = Segmenter(SETTINGS)
    events = feed(seg, [0.9] * secs(1) + [0.0] * secs(0.5) + [0.9] * secs(1) + [0.0] * secs(1))
    assert len(ended(events)) == 1


def test_hysteresis_between_thresholds_neither_opens_nor_keeps_alive() -> None:
    seg = Segmenter(SETTINGS)
    # 0.4 is between neg_threshold (0.35) and threshold: it cannot open an utterance...
    assert feed(seg, [0.4] * secs(2)) == []
    # ...and once a silent run has started it counts as silence, so this utterance ends.
    events = feed(seg, [0.9] * secs(1) + [0.1] + [0.4] * secs(1))
    assert len(ended(events)) == 1


def test_consecutive_utterances_get_increasing_ids_and_session_times() -> None:
    seg = Segmenter(SETTINGS)
    pattern = [0.9] * secs(1) + [0.0] * secs(1)
    utts = ended(feed(seg, pattern * 3))
    assert [u.utterance_id for u in utts] == [1, 2, 3]
    assert [round(u.start) for u in utts] == [0, 2, 4]
    assert all(a.end < b.start for a, b in itertools.pairwise(utts))


def test_long_speech_is_cut_at_max_utterance_at_the_last_pause() -> None:
    seg = Segmenter(SETTINGS)
    # 3.5 s speech, a 0.3 s pause (too short to end it), then speech on past 5 s.
    probs = [0.9] * secs(3.5) + [0.0] * secs(0.3) + [0.9] * secs(4)
    events = feed(seg, probs)
    (first,) = ended(events)
    assert first.reason == "max_length"
    assert first.end - first.start <= SETTINGS.max_utterance
    assert first.end == pytest.approx(3.8, abs=2 * W)  # cut inside the pause, not mid-word
    assert seg.open_utterance_id == 2  # the rest goes on as the next utterance
    (second,) = seg.flush()
    assert second.start == pytest.approx(first.end, abs=1e-9)  # nothing lost at the cut
    assert second.end == pytest.approx(3.5 + 0.3 + 4, abs=2 * W)


def test_uninterrupted_speech_is_cut_hard_and_never_exceeds_the_window() -> None:
    seg = Segmenter(SETTINGS)
    utts = ended(feed(seg, [0.9] * secs(12)))
    assert len(utts) == 2
    assert all(u.end - u.start <= SETTINGS.max_utterance + 1e-9 for u in utts)
    assert utts[0].end == utts[1].start


def test_partials_come_every_partial_interval_of_new_audio() -> None:
    seg = Segmenter(SETTINGS)
    events = feed(seg, [0.9] * secs(2.6))
    partials = [e for e in events if isinstance(e, PartialDue)]
    assert 4 <= len(partials) <= 6
    sizes = [p.audio.size for p in partials]
    assert sizes == sorted(sizes)  # each covers the whole utterance so far
    assert all(d == pytest.approx(0.5 * 16000, abs=WINDOW) for d in np.diff(sizes))
    assert all(p.utterance_id == 1 for p in partials)


def test_partial_audio_is_a_copy() -> None:
    seg = Segmenter(SETTINGS)
    partial = next(e for e in feed(seg, [0.9] * secs(1)) if isinstance(e, PartialDue))
    before = partial.audio.copy()
    feed(seg, [0.0] * secs(1) + [0.9] * secs(1), value=0.7)  # reuses the buffer
    np.testing.assert_array_equal(partial.audio, before)


def test_flush_closes_the_open_utterance_and_only_that() -> None:
    seg = Segmenter(SETTINGS)
    feed(seg, [0.0] * secs(1) + [0.9] * secs(1))
    seg.append_tail(np.zeros(100, dtype=np.float32))
    (utt,) = seg.flush()
    assert utt.reason == "flush"
    assert seg.flush() == []
    # pre-roll + speech + the samples short of a window
    assert utt.audio.size == pytest.approx((0.3 + 1.0) * 16000 + 100, abs=WINDOW)


def test_memory_is_bounded_by_max_utterance() -> None:
    seg = Segmenter(SETTINGS)
    feed(seg, [0.9] * secs(60))
    assert seg._buf.size == SETTINGS.max_utterance * 16000


def test_a_pause_hands_over_the_final_audio_before_the_endpoint() -> None:
    seg = Segmenter(SETTINGS)
    events = feed(seg, [0.9] * secs(1.0) + [0.0] * secs(1.0))
    kinds = [type(e).__name__ for e in events if not isinstance(e, PartialDue)]
    assert kinds == ["SpeechPaused", "UtteranceEnded"]
    paused = next(e for e in events if isinstance(e, SpeechPaused))
    (utt,) = ended(events)
    # The same samples, handed over min_silence - speech_pad earlier.
    assert paused.utterance_id == utt.utterance_id
    assert np.array_equal(paused.audio, utt.audio)
    # Handed over min_silence - speech_pad (0.3 s) before the endpoint.
    seg = Segmenter(SETTINGS)
    at = {}
    for i, p in enumerate([0.9] * secs(1.0) + [0.0] * secs(1.0)):
        for event in seg.push(np.zeros(WINDOW, dtype=np.float32), p):
            at.setdefault(type(event).__name__, i)
    assert (at["UtteranceEnded"] - at["SpeechPaused"]) * W == pytest.approx(0.3, abs=2 * W)


def test_speech_after_a_short_pause_takes_the_paused_audio_back() -> None:
    seg = Segmenter(SETTINGS)
    events = feed(seg, [0.9] * secs(1.0) + [0.0] * secs(0.45) + [0.9] * secs(1.0) + [0.0] * secs(1))
    kinds = [type(e).__name__ for e in events if not isinstance(e, PartialDue)]
    assert kinds == ["SpeechPaused", "SpeechResumed", "SpeechPaused", "UtteranceEnded"]
    first, second = (e for e in events if isinstance(e, SpeechPaused))
    (utt,) = ended(events)
    assert first.audio.size < utt.audio.size and np.array_equal(second.audio, utt.audio)


def test_no_partial_is_due_while_a_pause_is_out_and_one_is_as_soon_as_speech_resumes() -> None:
    # Partials every 0.1 s: two or three would be due in the 0.25 s the pause is out.
    seg = Segmenter(attrs.evolve(SETTINGS, partial_interval=0.1))
    # 1 s of speech, then a pause of 0.55 s: out from 0.3 s on, under min_silence (0.6 s).
    probs = [0.9] * secs(1.0) + [0.0] * secs(0.55) + [0.9] * secs(0.2)
    events = feed(seg, probs)
    paused = next(i for i, e in enumerate(events) if isinstance(e, SpeechPaused))
    resumed = next(i for i, e in enumerate(events) if isinstance(e, SpeechResumed))
    assert not any(isinstance(e, PartialDue) for e in events[paused:resumed])
    # More than partial_interval of new audio had come by the time speech resumed: the partial
    # comes with the first window of speech again, and has it.
    due = events[resumed + 1]
    assert isinstance(due, PartialDue)
    first_again = secs(1.0) + secs(0.55)  # the index of the first window of speech again
    assert due.audio[-1] == pytest.approx(0.1 + first_again * 1e-6, abs=1e-7)


def test_no_pause_is_announced_for_a_flush_or_a_length_cut() -> None:
    seg = Segmenter(SETTINGS)
    events = feed(seg, [0.9] * secs(6.0))  # max_utterance 5 s: a hard cut, no silence
    assert not any(isinstance(e, SpeechPaused | SpeechResumed) for e in events)
    assert not any(isinstance(e, SpeechPaused) for e in seg.flush())


# --- what the OpenAI dialect asks of the segmenter ------------------------------------------------


def test_utterance_starts_are_announced_when_asked_with_the_pad_included() -> None:
    seg = Segmenter(attrs.evolve(SETTINGS, report_starts=True))
    events = feed(seg, [0.0] * secs(1.0) + [0.9] * secs(5.5))
    kinds = [type(e).__name__ for e in events if not isinstance(e, PartialDue)]
    # The first opens on speech; the cut at max_utterance opens the second at once.
    assert kinds == ["UtteranceStarted", "UtteranceEnded", "UtteranceStarted"]
    first, cut, second = (e for e in events if not isinstance(e, PartialDue))
    assert first.utterance_id == 1 and first.start == pytest.approx(1.0 - 0.3, abs=2 * W)
    assert events.index(first) < min(events.index(e) for e in events if isinstance(e, PartialDue))
    assert second.utterance_id == 2 and second.start == pytest.approx(cut.end, abs=1e-9)
    # Off (the native protocol), nothing new is said.
    quiet = Segmenter(SETTINGS)
    assert not [e for e in feed(quiet, [0.9] * secs(1)) if not isinstance(e, PartialDue)]


def test_without_endpointing_only_a_flush_ends_an_utterance() -> None:
    seg = Segmenter(attrs.evolve(SETTINGS, endpointing=False))
    events = feed(seg, [0.9] * secs(1.0) + [0.0] * secs(2.0) + [0.9] * secs(1.0))
    assert not [e for e in events if not isinstance(e, PartialDue)]  # no pause, no end
    (utt,) = seg.flush()
    assert utt.start == pytest.approx(0.0, abs=2 * W) and utt.end == pytest.approx(4.0, abs=2 * W)


def test_endpointing_can_change_mid_session() -> None:
    seg = Segmenter(SETTINGS)
    seg.configure(attrs.evolve(SETTINGS, min_silence=2.0, speech_pad=0.1))
    assert ended(feed(seg, [0.9] * secs(1.0) + [0.0] * secs(1.0))) == []  # 1 s is no end now
    (utt,) = ended(feed(seg, [0.0] * secs(1.1)))
    assert utt.end - utt.start == pytest.approx(1.0 + 0.1, abs=2 * W)
    with pytest.raises(ValueError):
        seg.configure(attrs.evolve(SETTINGS, max_utterance=10.0))  # the buffer is sized


def test_discard_drops_the_open_utterance_and_time_goes_on() -> None:
    seg = Segmenter(SETTINGS)
    feed(seg, [0.9] * secs(1.0))
    assert seg.discard() == 1 and seg.open_utterance_id is None
    assert seg.discard() is None
    feed(seg, [0.0] * secs(0.5) + [0.9] * secs(1.0))
    (utt,) = seg.flush()
    assert utt.utterance_id == 2  # ids never repeat
    assert utt.start == pytest.approx(1.5 - 0.3, abs=2 * W)  # the session's clock went on


def test_an_empty_utterance_takes_the_next_id_and_ends_now() -> None:
    seg = Segmenter(SETTINGS)
    feed(seg, [0.0] * secs(2.0))
    empty = seg.empty_utterance()
    assert (empty.utterance_id, empty.audio.size, empty.speech) == (1, 0, 0.0)
    assert empty.reason == "flush"
    assert empty.start == empty.end == pytest.approx(2.0, abs=W)
    feed(seg, [0.9] * secs(1.0))
    assert seg.open_utterance_id == 2
