"""The capacity benchmark's step shape: every client stays on the server to the end of a step.

A step that let the short clips' clients finish after a third of it measured most finals with
a fraction of N users on the server; these pin the two helpers that prevent that.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from stt_server.loadtest.client import read_wav
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
