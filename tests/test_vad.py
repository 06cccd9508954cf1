"""The streaming Silero wrapper against faster-whisper's own whole-file VAD."""

import numpy as np
from faster_whisper.vad import get_vad_model

from stt_server.vad import WINDOW, SileroModel, VadStream


def whole_windows(clip) -> np.ndarray:
    audio = clip("jfk.wav").astype(np.float32) / 32768
    return audio[: audio.size - audio.size % WINDOW]


def stream(audio: np.ndarray, sizes) -> np.ndarray:
    """Probabilities of ``audio`` fed to one VadStream in chunks of ``sizes``."""
    vad, got, start = VadStream(SileroModel()), [], 0
    for size in sizes:
        if start >= audio.size:
            break
        got.append(vad.process(audio[start : start + size])[1])
        start += size
    return np.concatenate(got)


def test_streaming_in_any_chunking_is_bit_identical_to_one_whole_call(clip) -> None:
    audio = whole_windows(clip)
    whole = stream(audio, [audio.size])
    assert whole.size == audio.size // WINDOW
    rng = np.random.default_rng(0)
    for sizes in (
        [1234] * audio.size,  # never lines up with windows
        [WINDOW - 1] * audio.size,
        [WINDOW + 1] * audio.size,
        [1] * audio.size,  # every window decided on its own, one call each
        rng.integers(0, 5000, size=audio.size).tolist(),
    ):
        np.testing.assert_array_equal(stream(audio, sizes), whole)


def test_streaming_matches_faster_whisper_whole_file_vad_to_the_bit(clip) -> None:
    audio = whole_windows(clip)
    # faster-whisper 1.2's SileroVADModel writes zeros into the last 64 samples of the array it
    # is given (``context[-1] = 0`` through a view of its input), so it judges its last window
    # on those zeros. Given a copy, it leaves in ``judged`` exactly the audio it looked at.
    judged = audio.copy()
    expected = get_vad_model()(judged).reshape(-1)
    np.testing.assert_array_equal(stream(judged, [1234] * audio.size), expected)
    # On the untouched audio, every window but that last one is equal too.
    np.testing.assert_array_equal(stream(audio, [1234] * audio.size)[:-1], expected[:-1])


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
