"""The streaming Silero wrapper against faster-whisper's own whole-file VAD."""

import numpy as np
from faster_whisper.vad import get_vad_model

from stt_server.vad import WINDOW, SileroModel, VadStream


def test_streaming_in_odd_chunks_matches_whole_file_probabilities(clip) -> None:
    audio = clip("jfk.wav").astype(np.float32) / 32768
    usable = audio[: audio.size - audio.size % WINDOW]
    expected = get_vad_model()(usable).reshape(-1)
    stream = VadStream(SileroModel())
    got = []
    for start in range(0, usable.size, 1234):  # chunks that never line up with windows
        _, probs = stream.process(usable[start : start + 1234])
        got.append(probs)
    got = np.concatenate(got)
    assert got.size == expected.size
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sessions_do_not_share_state(clip) -> None:
    model = SileroModel()
    speech = clip("jfk.wav")[:16000].astype(np.float32) / 32768
    fresh, used = VadStream(model), VadStream(model)
    used.process(speech)
    silence = np.zeros(WINDOW * 4, dtype=np.float32)
    _, a = fresh.process(silence)
    _, b = VadStream(model).process(silence)
    np.testing.assert_array_equal(a, b)


def test_speech_is_detected_and_silence_and_noise_are_not(clip) -> None:
    stream = VadStream(SileroModel())
    speech = clip("jfk.wav")[: 3 * 16000].astype(np.float32) / 32768
    _, p_speech = stream.process(speech)
    assert p_speech.max() > 0.8
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(16000 * 3) * 0.05).astype(np.float32)
    _, p_noise = VadStream(SileroModel()).process(noise)
    assert p_noise.max() < 0.5
    _, p_silence = VadStream(SileroModel()).process(np.zeros(16000, dtype=np.float32))
    assert p_silence.max() < 0.1


def test_leftover_samples_wait_for_a_whole_window() -> None:
    stream = VadStream(SileroModel())
    windows, probs = stream.process(np.zeros(WINDOW + 100, dtype=np.float32))
    assert windows.shape == (1, WINDOW) and probs.shape == (1,)
    assert stream.take_pending().size == 100
    assert stream.take_pending().size == 0
