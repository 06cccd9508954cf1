"""Decoding uploads with PyAV and cutting them into chunks, without a server or a model."""

from __future__ import annotations

import io

import numpy as np
import pytest

from stt_server.filedecode import (
    SAMPLE_RATE,
    AudioDecoder,
    AudioFileError,
    Chunker,
    quiet_cut,
)


def encode(samples: np.ndarray, rate: int, container: str, codec: str, channels: int = 1) -> bytes:
    """int16 mono ``samples`` as a file of ``container`` format, encoded with ``codec``."""
    import av

    layout = "mono" if channels == 1 else "stereo"
    out = io.BytesIO()
    with av.open(out, "w", format=container) as file:
        stream = file.add_stream(codec, rate=rate, layout=layout)
        # Packed s16: the channels' samples interleaved in one row.
        interleaved = np.repeat(samples.astype(np.int16), channels).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout=layout)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            file.mux(packet)
        for packet in stream.encode(None):
            file.mux(packet)
    return out.getvalue()


def tone(seconds: float, rate: int = SAMPLE_RATE, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16)


def decode_all(data: bytes) -> np.ndarray:
    decoder = AudioDecoder(data)
    pieces = []
    try:
        while (piece := decoder.read(SAMPLE_RATE * 7)).size:
            assert piece.size <= SAMPLE_RATE * 7 and piece.dtype == np.float32
            pieces.append(piece)
    finally:
        decoder.close()
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


@pytest.mark.parametrize(
    ("container", "codec", "rate", "channels"),
    [
        ("wav", "pcm_s16le", 16000, 1),
        ("wav", "pcm_s16le", 44100, 2),
        ("flac", "flac", 48000, 1),
        ("mp3", "libmp3lame", 44100, 1),
        ("ogg", "libopus", 48000, 1),
        ("webm", "libopus", 48000, 2),
        ("ipod", "aac", 44100, 1),  # .m4a
    ],
)
def test_containers_and_codecs_decode_to_16khz_mono(
    container: str, codec: str, rate: int, channels: int
) -> None:
    audio = decode_all(encode(tone(2.5, rate), rate, container, codec, channels))
    # Lossy codecs add their priming delay and padding: the length is 2.5 s give or take.
    assert abs(audio.size / SAMPLE_RATE - 2.5) < 0.12
    assert 0.1 < float(np.sqrt(np.mean(audio**2))) < 0.25  # the tone survives, at its level
    assert float(np.max(np.abs(audio))) <= 1.0


def test_declared_duration_comes_from_the_header() -> None:
    decoder = AudioDecoder(encode(tone(3.0), SAMPLE_RATE, "wav", "pcm_s16le"))
    try:
        assert decoder.declared_duration == pytest.approx(3.0, abs=0.01)
    finally:
        decoder.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not audio"),
        (b"hello, this is a text file and not a recording\n" * 20, "not audio"),
        (b"\x89PNG\r\n\x1a\n" + bytes(2000), "not audio"),
        # A playlist whose segment is a local file: FFmpeg's HLS demuxer would open it.
        (b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
         "not audio"),
        (b"ffconcat version 1.0\nfile '/etc/passwd'\n", "not audio"),
    ],
)  # fmt: skip
def test_what_is_not_audio_is_refused_with_a_message(data: bytes, message: str) -> None:
    with pytest.raises(AudioFileError, match=message):
        decode_all(data)


def test_a_video_without_sound_has_no_audio_track() -> None:
    import av

    out = io.BytesIO()
    with av.open(out, "w", format="matroska") as file:
        stream = file.add_stream("ffv1", rate=5)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            file.mux(packet)
        for packet in stream.encode(None):
            file.mux(packet)
    with pytest.raises(AudioFileError, match="no audio track"):
        AudioDecoder(out.getvalue())


def test_a_truncated_file_gives_what_it_has_or_a_clear_error() -> None:
    data = encode(tone(3.0, 44100), 44100, "mp3", "libmp3lame")
    for cut in (len(data) // 2, 200):
        try:
            audio = decode_all(data[:cut])
        except AudioFileError:
            continue
        assert audio.size < 3.0 * SAMPLE_RATE


def test_quiet_cut_finds_the_pause() -> None:
    audio = np.ones(10 * SAMPLE_RATE, np.float32) * 0.3
    audio[int(6.0 * SAMPLE_RATE) : int(6.3 * SAMPLE_RATE)] = 0.0  # the pause
    cut = quiet_cut(audio, 4 * SAMPLE_RATE, 10 * SAMPLE_RATE, 1600)
    assert 6.0 * SAMPLE_RATE <= cut <= 6.3 * SAMPLE_RATE
    assert quiet_cut(audio, 5, 5, 1600) == 5  # nothing to search: the latest point


def test_chunks_are_at_most_30_s_cut_at_pauses_and_cover_the_file_exactly() -> None:
    rng = np.random.default_rng(1)
    audio = (rng.normal(0, 0.1, 95 * SAMPLE_RATE)).astype(np.float32)
    pauses = [26.0, 49.5, 78.0]
    for p in pauses:
        audio[int(p * SAMPLE_RATE) : int((p + 0.25) * SAMPLE_RATE)] = 0.0
    chunker = Chunker()
    chunks = []
    for start in range(0, audio.size, 7 * SAMPLE_RATE):  # pieces as the decoder gives them
        chunks += chunker.feed(audio[start : start + 7 * SAMPLE_RATE])
    chunks += chunker.finish()
    assert np.array_equal(np.concatenate([c.audio for c in chunks]), audio)
    assert [c.start for c in chunks[1:]] == [
        c.start + c.audio.size for c in chunks[:-1]
    ]  # contiguous, no gap or overlap
    assert all(c.audio.size <= 30 * SAMPLE_RATE for c in chunks)
    for chunk, pause in zip(chunks[1:], pauses, strict=True):
        assert pause <= chunk.start / SAMPLE_RATE <= pause + 0.25


def test_silent_chunks_are_recognized() -> None:
    chunker = Chunker()
    (silent,) = chunker.feed(np.zeros(SAMPLE_RATE, np.float32)) + chunker.finish()
    assert silent.silent
    chunker = Chunker()
    chunker.feed(np.full(10, 0.1, np.float32))
    (loud,) = chunker.finish()
    assert not loud.silent
