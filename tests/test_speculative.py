"""Speculative finals: the final is decoded while the endpoint's silence is still being waited
for, sent at the endpoint, and thrown away when speech comes back.

The model here is slow on purpose and says which audio it was given (``n<samples>``), so the
tests can tell which decode became the ``completed`` and how long the client waited for it.
"""

from __future__ import annotations

import functools
import re
import threading
import time

import attrs
import numpy as np
import pytest
import trio

from stt_server.config import Config
from stt_server.engine import TranscribeOptions
from stt_server.loadtest.client import stream_audio
from stt_server.server import serve

from . import hostile

#: Seconds a final takes in the fake model: longer than min_silence - speech_pad (0.3 s).
FINAL_COST = 0.5


@attrs.define
class SlowModel:
    name: str = "slow"
    finals: list[int] = attrs.Factory(list)
    final_cost: float = FINAL_COST
    partials: bool = False  # answer partials at once with ``p<samples>``, else with nothing
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> str:
        if not options.final:
            return f"p{audio.size}" if self.partials else ""
        time.sleep(self.final_cost)
        with self._lock:
            self.finals.append(audio.size)
        return f"n{audio.size}"


async def run(
    speech_model,
    samples: np.ndarray,
    speculative: bool,
    metric: bytes = b"",
    model: SlowModel | None = None,
    chunk_seconds: float = 0.1,
):
    model = model or SlowModel()
    config = Config(
        host="127.0.0.1",
        port=0,
        control_socket="",
        context_seconds=0.0,  # the model sees exactly the utterance's audio
        # A long endpoint wait, so that starting the decode at the pause (speech_pad, 0.3 s)
        # saves much more than timing jitter on a loaded machine.
        min_silence=1.5,
        speculative_finals=speculative,
    )
    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(serve, config, model=model))
        with trio.fail_after(60):
            result = await stream_audio(
                f"ws://127.0.0.1:{server.port}/", samples, chunk_seconds=chunk_seconds
            )
            metrics = await hostile.exchange(
                server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            )
        nursery.cancel_scope.cancel()
    counts = dict(re.findall(rb'stt_speculative_finals_total\{outcome="(\w+)"\} (\d+)', metrics))
    counts = {k.decode(): int(float(v)) for k, v in counts.items()}
    if metric:  # one more sample of /metrics, by its name and labels
        (value,) = re.findall(re.escape(metric) + rb" ([0-9.e+-]+)", metrics)
        counts[metric.decode()] = float(value)
    return result, model, counts


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), dtype=np.int16)


async def test_a_speculative_final_arrives_sooner_and_is_the_same_decode(speech_model, clip):
    samples = np.concatenate([clip("ldc93s1.wav"), silence(2.5)])
    latencies = {}
    for speculative in (True, False):
        result, model, counts = await run(speech_model, samples, speculative)
        (final,) = result.finals
        # The completed text is the decode of exactly the utterance's audio, decoded once.
        size = round((final["end"] - final["start"]) * 16000)
        # (start and end are rounded to 10 ms on the wire)
        assert final["text"] == f"n{model.finals[0]}" and abs(model.finals[0] - size) <= 200
        assert len(model.finals) == 1
        assert counts.get("used", 0) == (1 if speculative else 0), counts
        latencies[speculative] = result.final_latencies()[0]
    # Decoding began at the pause, min_silence - speech_pad (1.2 s) before the endpoint: the
    # final arrives at the endpoint, not FINAL_COST after it.
    assert latencies[True] < latencies[False] - FINAL_COST * 0.6, latencies


async def test_speech_after_a_pause_throws_the_speculative_final_away(speech_model, clip):
    speech = clip("ldc93s1.wav")[: int(2.0 * 16000)]  # the sentence, without its own silence
    samples = np.concatenate([speech, silence(0.38), speech, silence(2.5)])
    result, _, counts = await run(speech_model, samples, speculative=True)
    (final,) = result.finals  # one utterance: the pause was shorter than min_silence
    size = round((final["end"] - final["start"]) * 16000)
    assert abs(int(final["text"][1:]) - size) <= 200
    assert int(final["text"][1:]) > speech.size + 0.38 * 16000  # both readings, not the first
    assert counts.get("discarded", 0) >= 1 and counts.get("used", 0) == 1, counts


async def test_a_guess_that_runs_when_speech_resumes_is_shown_as_a_partial(speech_model, clip):
    speech = clip("ldc93s1.wav")[: int(2.0 * 16000)]
    samples = np.concatenate([speech, silence(0.38), speech, silence(2.5)])
    unused = b'stt_engine_unused_seconds_total{device="cpu",kind="guess"}'
    # The guess takes 1 s: it runs when speech resumes, 0.08 s after the pause reached
    # speech_pad, and ends long before the utterance does.
    model = SlowModel(final_cost=1.0)
    result, _, counts = await run(
        speech_model, samples, speculative=True, metric=unused, model=model
    )
    (final,) = result.finals
    # The guess at the pause was decoded (the fake model answers partials with nothing, so
    # this is the only realtime message) and shown, before the utterance's completed.
    (partial,) = result.partials
    guessed = int(partial["text"][1:])
    assert abs(guessed - (speech.size + 0.3 * 16000)) <= 1600  # the audio to the pause
    assert guessed in model.finals and guessed < int(final["text"][1:])
    order = [m["type"] for _, m in result.messages if m["type"] in ("realtime", "completed")]
    assert order == ["realtime", "completed"]
    # Its answer was read: no worker time thrown away; no final, but shown.
    assert counts[unused.decode()] == 0
    assert counts.get("discarded", 0) >= 1 and counts.get("shown", 0) == 1


async def test_a_guess_done_before_speech_resumes_is_shown_when_it_does(speech_model, clip):
    speech = clip("ldc93s1.wav")[: int(2.0 * 16000)]
    # A 0.8 s pause: the guess (0.05 s) is done long before speech comes back, and min_silence
    # (1.5 s here) keeps the utterance open.
    samples = np.concatenate([speech, silence(0.8), speech, silence(2.5)])
    model = SlowModel(final_cost=0.05)
    result, _, counts = await run(speech_model, samples, speculative=True, model=model)
    (final,) = result.finals
    (partial,) = result.partials
    guessed = int(partial["text"][1:])
    assert guessed == min(model.finals) < int(final["text"][1:])
    assert counts.get("shown", 0) == 1 and counts.get("used", 0) == 1


async def test_a_guess_that_ends_after_a_newer_partial_is_not_shown(speech_model, clip):
    speech = clip("ldc93s1.wav")[: int(2.0 * 16000)]
    samples = np.concatenate([speech, silence(0.38), speech, silence(2.5)])
    # The guess at the pause takes 1.5 s; partials of the resumed speech, of more audio,
    # are shown before it ends.
    model = SlowModel(final_cost=1.5, partials=True)
    result, _, _ = await run(speech_model, samples, speculative=True, model=model)
    shown = [(p["text"][0], int(p["text"][1:])) for p in result.partials]
    guessed = min(model.finals)
    assert any(size > guessed for _, size in shown)  # partials of more audio came first
    # Never text of less of the utterance after text of more: the guess is not shown.
    assert ("n", guessed) not in shown
    sizes = [size for _, size in shown]
    assert sizes == sorted(sizes), shown


async def test_a_guess_overtaken_before_it_is_queued_is_never_decoded(speech_model, clip):
    speech = clip("ldc93s1.wav")[: int(2.0 * 16000)]
    samples = np.concatenate([speech, silence(0.38), speech, silence(2.5)])
    # One-second messages: the pause and the speech after it arrive in one, so the session
    # hears the pause reach speech_pad and the speech come back before the guess's task runs.
    model = SlowModel()
    result, _, counts = await run(
        speech_model, samples, speculative=True, model=model, chunk_seconds=1.0
    )
    (final,) = result.finals
    assert model.finals == [int(final["text"][1:])]  # the final alone was decoded
    assert result.partials == [] and counts.get("discarded", 0) == 1


@pytest.fixture
def speech_model():
    """Not the real model: these tests start their own servers on the slow fake."""
    return None
