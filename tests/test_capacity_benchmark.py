"""The capacity benchmark's step shape: every client stays on the server to the end of a step,
the clients do not start in step, and only the time when all of them stream is measured.

A step that let the short clips' clients finish after a third of it measured most finals with
a fraction of N users on the server, and clients of one clip started together paused
together; these pin the helpers that prevent both.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from stt_server.loadtest.client import StreamResult, read_wav
from stt_server.loadtest.clips import CLIPS_DIR

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "capacity.py"


@pytest.fixture(scope="module")
def capacity():
    spec = importlib.util.spec_from_file_location("capacity_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_a_looped_clip_is_the_whole_number_of_readings_nearest_the_step(capacity) -> None:
    rate, pause = capacity.RATE, capacity.PAUSE
    clip = np.ones(int(3.5 * rate), dtype=np.int16)  # 3.5 s + 1.5 s pause = 5 s a reading
    for seconds, readings in [(22.0, 4), (23.0, 5), (1.0, 1), (100.0, 20)]:
        audio, count = capacity.looped(clip, seconds)
        assert count == readings
        assert audio.size == readings * (clip.size + int(pause * rate))
        # Every reading is the whole clip, followed by its pause.
        gap = audio[clip.size : clip.size + int(pause * rate)]
        assert audio[: clip.size].all() and not gap.any()


def test_a_step_is_never_shorter_than_the_longest_clip(capacity) -> None:
    clips = ["cats.wav", "lucier.wav", "ldc93s1.wav"]
    longest = max(read_wav(CLIPS_DIR / c).size for c in clips) / capacity.RATE + capacity.PAUSE
    assert capacity.sustained_seconds(clips, 30.0) == pytest.approx(longest)
    assert capacity.sustained_seconds(clips, 300.0) == 300.0
    # Each client then streams within one of its readings of the longest client's time.
    seconds = capacity.sustained_seconds(clips, 30.0)
    for name in clips:
        clip = read_wav(CLIPS_DIR / name)
        audio, _ = capacity.looped(clip, seconds)
        reading = (clip.size + int(capacity.PAUSE * capacity.RATE)) / capacity.RATE
        assert abs(audio.size / capacity.RATE - seconds) <= reading / 2 + 1e-6


def test_clients_reading_one_clip_start_seconds_apart(capacity) -> None:
    """Started in step, the clients of one clip paused together: a burst of finals at each of
    its pauses, which independent speakers do not make."""
    spread, clips = 40.0, 3
    offsets = capacity.start_offsets(16, spread)
    assert offsets[0] == 0.0 and all(0.0 <= o < spread for o in offsets)
    for first in range(clips):
        same_clip = sorted(offsets[first::clips])
        assert min(b - a for a, b in itertools.pairwise(same_clip)) >= 5.0


def _streamed(first: float, last: float, *events: tuple[float, dict]) -> StreamResult:
    sent = [(first + t, t) for t in np.arange(0.0, last - first + 0.05, 0.1)]
    return StreamResult(messages=list(events), sent=sent)


def test_only_what_happens_while_every_client_streams_is_measured(capacity) -> None:
    early = _streamed(
        0.0,
        50.0,
        (3.5, {"type": "completed", "end": 3.0, "text": "alone"}),  # before the other started
        (20.6, {"type": "completed", "end": 20.0, "text": "loaded"}),
        (21.0, {"type": "realtime", "utterance_id": 7, "text": "a"}),
        (22.2, {"type": "realtime", "utterance_id": 7, "text": "a b"}),
    )
    late = _streamed(10.0, 60.0)
    window = capacity.full_load([early, late])
    assert window == pytest.approx((10.0, 50.0), abs=0.11)
    assert early.final_latencies() == pytest.approx([0.5, 0.6], abs=0.11)
    assert early.final_latencies(within=window) == pytest.approx([0.6], abs=0.11)
    assert early.partial_intervals(within=window) == pytest.approx([1.2])
    assert early.partial_intervals(within=(0.0, 22.0)) == []
    with pytest.raises(SystemExit):
        capacity.full_load([early, _streamed(55.0, 90.0)])


def test_the_server_counters_are_summed_over_devices_and_keyed_by_their_label(capacity) -> None:
    page = "\n".join(
        [
            "# TYPE stt_engine_busy_seconds counter",
            'stt_engine_busy_seconds_total{device="cuda:0",kind="final"} 2.5',
            'stt_engine_busy_seconds_total{device="cuda:1",kind="final"} 1.5',
            'stt_engine_busy_seconds_total{device="cuda:1",kind="partial"} 0.5',
            "# TYPE stt_engine_batches counter",
            'stt_engine_batches_total{device="cuda:0"} 3.0',
            'stt_engine_batches_total{device="cuda:1"} 4.0',
            "# TYPE stt_speculative_finals counter",
            'stt_speculative_finals_total{outcome="used"} 9.0',
            'stt_speculative_finals_created{outcome="used"} 1.7e9',
            "# TYPE stt_sessions_active gauge",
            "stt_sessions_active 16.0",
            "",
        ]
    )
    assert capacity.counters_from_text(page) == {
        "stt_engine_busy_seconds_total:final": 4.0,
        "stt_engine_busy_seconds_total:partial": 0.5,
        "stt_engine_batches_total": 7.0,
        "stt_speculative_finals_total:used": 9.0,
    }


def test_the_profile_covers_only_the_time_when_every_client_streamed(capacity) -> None:
    Sample = capacity.Sample
    reads = [
        Sample(at=0.0, counters={}, own_cpu=0.0),  # before the last client started
        Sample(
            at=10.0,
            counters={
                "stt_engine_busy_seconds_total:final": 10.0,
                "stt_engine_busy_seconds_total:partial": 5.0,
                "stt_engine_batches_total": 10.0,
                "stt_engine_batched_requests_total": 10.0,
                "stt_speculative_finals_total:used": 4.0,
                "process_cpu_seconds_total": 100.0,
            },
            own_cpu=1.0,
        ),
        Sample(at=30.0, counters={}, own_cpu=2.0),
        Sample(
            at=50.0,
            counters={
                "stt_engine_busy_seconds_total:final": 30.0,
                "stt_engine_busy_seconds_total:guess": 40.0,
                "stt_engine_busy_seconds_total:partial": 25.0,
                "stt_engine_unused_seconds_total:guess": 4.0,
                "stt_engine_unused_seconds_total:partial": 1.2,
                "stt_engine_batches_total": 110.0,
                "stt_engine_batched_requests_total": 260.0,
                "stt_speculative_finals_total:used": 84.0,
                "stt_speculative_finals_total:discarded": 16.0,
                "stt_speculative_finals_total:shown": 9.0,
                "process_cpu_seconds_total": 176.0,
            },
            own_cpu=5.0,
        ),
        Sample(at=60.0, counters={}, own_cpu=9.0),  # after the first client ended
    ]
    first, last = capacity.within(reads, (5.0, 55.0))
    assert (first.at, last.at) == (10.0, 50.0)
    assert capacity.within(reads, (31.0, 49.0)) is None  # no two reads inside: no profile
    line = capacity.profile_line(first, last)
    # Over those 40 s: 76 s of server CPU, 4 of the clients'; 20 s of finals, 40 of guesses
    # and 20 of partials on the workers, 4 and 1.2 of them unread; 250 requests in 100 calls.
    assert "all streaming, 40 s: cores: server 1.90, clients 0.10;" in line
    assert "workers busy: final 0.50  guess 1.00  partial 0.50 (sum 2.00)" in line
    assert "of it unread: guess 0.10  partial 0.03;" in line
    assert "requests per model call 2.50" in line
    assert "guesses used 80, thrown away 16 (shown as partials 9)" in line
