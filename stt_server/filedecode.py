"""Uploaded audio files: decoding with PyAV (FFmpeg) and cutting into model-sized chunks.

Decoding is blocking C work: :class:`AudioDecoder`'s methods are meant for
``trio.to_thread.run_sync``, one call at a time. It decodes incrementally, so a long file never
exists as one array: the caller asks for the next few seconds, hands them to a
:class:`Chunker`, and transcribes what comes out while the rest is still compressed.

Untrusted files meet FFmpeg here, so it may only use the demuxers of ordinary audio and video
containers (``format_whitelist``): playlists (HLS), concat scripts and image sequences, which
would make FFmpeg open other files or URLs named inside the upload, are refused before their
header is read.

:class:`Chunker` and :func:`quiet_cut` are sans-IO (arrays in, arrays out): a file is cut into
chunks of at most :data:`MAX_CHUNK_SECONDS` (Whisper's window) at the quietest moment of the
last seconds before that, so one inference never holds a worker for longer than a chunk takes,
and a cut rarely falls inside a word.
"""

from __future__ import annotations

import io

import attrs
import numpy as np

SAMPLE_RATE = 16000

#: Longest chunk given to the model: Whisper's 30 s window.
MAX_CHUNK_SECONDS = 30.0
#: A cut is looked for this many seconds before the longest chunk ends.
CUT_SEARCH_SECONDS = 8.0
#: Loudness is compared over frames of this length when looking for a cut.
CUT_FRAME_SECONDS = 0.1

#: Demuxers an upload may be read with: audio files and the sound of ordinary video files.
#: (FFmpeg demuxer names; a multi-name demuxer such as "mov,mp4,m4a,3gp,3g2,mj2" matches on any.)
ALLOWED_DEMUXERS = (
    "wav",
    "w64",
    "mp3",
    "flac",
    "ogg",
    "aac",
    "aiff",
    "caf",
    "amr",
    "au",
    "wv",
    "ape",
    "tta",
    "matroska",
    "mov",
    "avi",
    "asf",
    "flv",
    "mpeg",
    "mpegts",
)

#: Peak amplitude below which a chunk is digital silence (about -80 dBFS): not worth an
#: inference, and Whisper tends to invent a "Thank you." for it.
SILENCE_PEAK = 1e-4


class AudioFileError(ValueError):
    """The upload cannot be read as audio; the message is fit for the client."""


class AudioDecoder:
    """One uploaded file, decoded on demand to 16 kHz mono float32."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        import av

        self._av = av
        try:
            self._container = av.open(
                _ViewReader(memoryview(data)),
                container_options={"format_whitelist": ",".join(ALLOWED_DEMUXERS)},
            )
        except av.error.FFmpegError:
            raise AudioFileError(
                "the file is not audio in a format this server reads "
                "(WAV, MP3, FLAC, Ogg/Opus/Vorbis, AAC/M4A, WebM/Matroska, MP4, ...)"
            ) from None
        try:
            self._stream = next(s for s in self._container.streams if s.type == "audio")
        except StopIteration:
            self._container.close()
            raise AudioFileError("the file has no audio track") from None
        # Only this stream's packets are read: a video's picture is never decoded.
        self._frames = self._container.decode(self._stream)
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._ended = False

    @property
    def declared_duration(self) -> float | None:
        """Seconds, as the container's header states it (it may lie, or not know)."""
        if self._container.duration is not None and self._container.duration > 0:
            return self._container.duration / 1_000_000  # AV_TIME_BASE
        stream = self._stream
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        return None

    def read(self, max_samples: int) -> np.ndarray:
        """Up to ``max_samples`` more samples; an empty array once the file is over."""
        av = self._av
        while self._pending_samples < max_samples and not self._ended:
            try:
                frame = next(self._frames, None)
                resampled = self._resampler.resample(frame)  # None flushes at the end
            except (av.error.FFmpegError, ValueError) as exc:
                raise AudioFileError(f"the audio could not be decoded: {exc}") from None
            if frame is None:
                self._ended = True
            for out in resampled:
                samples = out.to_ndarray().reshape(-1).astype(np.float32, copy=False)
                self._pending.append(samples)
                self._pending_samples += samples.size
        joined = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
        head, rest = joined[:max_samples], joined[max_samples:]
        self._pending = [rest] if rest.size else []
        self._pending_samples = rest.size
        # Decoders may overshoot full scale slightly; the model expects [-1, 1].
        return np.clip(head, -1.0, 1.0)

    def close(self) -> None:
        self._container.close()


class _ViewReader(io.RawIOBase):
    """A read-only file over the upload's bytes: ``io.BytesIO`` would copy them first, and an
    upload may be 25 MiB."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        chunk = self._view[self._position : self._position + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def tell(self) -> int:
        return self._position


def quiet_cut(audio: np.ndarray, earliest: int, latest: int, frame: int) -> int:
    """A sample index in ``[earliest, latest]``: the middle of the quietest ``frame``-long
    stretch there (the first one, among equals)."""
    count = (latest - earliest) // frame
    if count <= 0:
        return latest
    frames = audio[earliest : earliest + count * frame].reshape(count, frame)
    energy = np.einsum("ij,ij->i", frames, frames)  # sum of squares per frame, no temporary
    return earliest + int(np.argmin(energy)) * frame + frame // 2


@attrs.frozen
class Chunk:
    #: Where it starts in the file, in samples.
    start: int
    audio: np.ndarray = attrs.field(eq=False, repr=lambda a: f"<{a.size} samples>")

    @property
    def silent(self) -> bool:
        return self.audio.size == 0 or float(np.max(np.abs(self.audio))) < SILENCE_PEAK


@attrs.define
class Chunker:
    """Audio in, in pieces of any size; chunks of at most ``max_chunk`` samples out."""

    max_chunk: int = int(MAX_CHUNK_SECONDS * SAMPLE_RATE)
    search: int = int(CUT_SEARCH_SECONDS * SAMPLE_RATE)
    frame: int = int(CUT_FRAME_SECONDS * SAMPLE_RATE)
    _buffer: np.ndarray = attrs.field(factory=lambda: np.zeros(0, np.float32))
    _start: int = 0

    def feed(self, audio: np.ndarray) -> list[Chunk]:
        self._buffer = np.concatenate([self._buffer, audio]) if self._buffer.size else audio
        chunks = []
        while self._buffer.size > self.max_chunk:
            cut = quiet_cut(self._buffer, self.max_chunk - self.search, self.max_chunk, self.frame)
            chunks.append(self._take(cut))
        return chunks

    def finish(self) -> list[Chunk]:
        return [self._take(self._buffer.size)] if self._buffer.size else []

    def _take(self, size: int) -> Chunk:
        chunk = Chunk(self._start, self._buffer[:size].copy())
        self._buffer = self._buffer[size:]
        self._start += size
        return chunk
