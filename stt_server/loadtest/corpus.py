"""The speech the simulated users speak: audio files with optional reference transcripts.

``--audio`` names a directory or a manifest:

- a directory: every ``*.wav`` and ``*.flac`` in it (sorted by name); reference texts from a
  ``manifest.tsv`` there when it exists, else from a ``NAME.txt`` beside each file;
- a manifest: a tab-separated file with a header that has a ``file`` column and, optionally, a
  ``reference_transcript`` column; relative paths are relative to the manifest.

Nothing given: the clips shipped in the package (``stt_server.loadtest.clips``), so
``stt-loadtest`` runs out of the box. Every clip is converted to 16 kHz mono PCM16 once, at load.
"""

from __future__ import annotations

import csv
import wave
from pathlib import Path

import attrs
import numpy as np

from .clips import MANIFEST

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac")


@attrs.frozen(eq=False)
class Clip:
    name: str
    samples: np.ndarray  # int16, 16 kHz mono
    reference: str | None = None

    @property
    def seconds(self) -> float:
        return self.samples.size / SAMPLE_RATE


class CorpusError(Exception):
    """The audio given cannot be used (missing, empty, undecodable); the message says why."""


def load_corpus(spec: str | Path | None = None) -> list[Clip]:
    """The clips named by ``spec`` (a directory or a manifest; None: the shipped clips)."""
    path = Path(spec) if spec is not None else MANIFEST
    if not path.exists():
        raise CorpusError(f"{path}: no such file or directory")
    entries = _directory(path) if path.is_dir() else _manifest(path)
    if not entries:
        raise CorpusError(f"{path}: no .wav or .flac files")
    return [Clip(file.name, read_audio(file), reference) for file, reference in entries]


def _directory(directory: Path) -> list[tuple[Path, str | None]]:
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    manifest = directory / "manifest.tsv"
    refs = {Path(f).name: r for f, r in _manifest(manifest)} if manifest.exists() else {}
    out = []
    for file in files:
        reference = refs.get(file.name)
        sidecar = file.with_suffix(".txt")
        if reference is None and sidecar.exists():
            reference = sidecar.read_text(encoding="utf-8").strip() or None
        out.append((file, reference))
    return out


def _manifest(manifest: Path) -> list[tuple[Path, str | None]]:
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if reader.fieldnames is None or "file" not in reader.fieldnames:
            raise CorpusError(f"{manifest}: need a tab-separated header with a 'file' column")
        out = []
        for row in reader:
            file = Path(row["file"])
            if not file.is_absolute():
                file = manifest.parent / file
            if not file.exists():
                raise CorpusError(f"{manifest}: {file} does not exist")
            reference = (row.get("reference_transcript") or "").strip() or None
            out.append((file, reference))
    return out


def read_audio(path: Path) -> np.ndarray:
    """16 kHz mono int16 samples from a WAV (PCM16, any rate, mixed down) or any file PyAV
    decodes (FLAC, ...), through faster-whisper's decoder."""
    if path.suffix.lower() == ".wav":
        try:
            samples = _read_pcm16_wav(path)
        except (OSError, EOFError, wave.Error) as exc:
            raise CorpusError(f"{path}: cannot read: {exc}") from None
        if samples is not None:
            return samples
    import av  # faster-whisper's decoder: FFmpeg through PyAV
    from faster_whisper.audio import decode_audio

    try:
        audio = decode_audio(str(path), sampling_rate=SAMPLE_RATE)
    except (OSError, ValueError, av.error.FFmpegError) as exc:
        raise CorpusError(f"{path}: cannot decode: {exc}") from None
    samples = np.clip(np.asarray(audio) * 32768.0, -32768, 32767).astype("<i2")
    if samples.size == 0:
        raise CorpusError(f"{path}: no audio")
    return samples


def _read_pcm16_wav(path: Path) -> np.ndarray | None:
    """A PCM16 WAV read directly (resampled with soxr when not 16 kHz); None for other WAVs."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            return None
        channels, rate = wav.getnchannels(), wav.getframerate()
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    if data.size == 0:
        raise CorpusError(f"{path}: no audio")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:
        import soxr

        data = soxr.resample(data.astype(np.float32), rate, SAMPLE_RATE)
    return np.clip(np.round(data), -32768, 32767).astype("<i2")
