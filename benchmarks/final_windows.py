"""What a final costs and how well it reads, per window, context and beam, clip by clip.

    python benchmarks/final_windows.py                          # the defaults, and the old way
    python benchmarks/final_windows.py short:15:3 full:20:5 short:10:3
    python benchmarks/final_windows.py --more short:15:3

Each argument is ``WINDOW:CONTEXT_SECONDS:BEAM``, WINDOW being ``short`` (right-sized finals,
the server's default) or ``full`` (Whisper's 30 s window). Every clip is cut into utterances
by the server's own VAD and endpointing (as a real-time stream would be), and each
utterance's final is decoded in order with the session's context rules (its earlier utterances
in front, their text forced on the decoder), one request at a time on one thread. Printed: the
mean wall seconds per final, how many right-sized finals were redone on the full window
(``full``), and the WER of the joined finals per clip and their mean, next to the same model
transcribing the whole file offline. Only the model's work is measured, not the server's.

``--more`` adds speech the defaults were not tuned on: the shipped clips read 15 % slower and
faster (sox ``tempo``: other pauses, so other utterances and contexts) and three passages read
by espeak-ng with pauses inside sentences; a clip whose tool is missing is left out, and said.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stt_server.config import Config
from stt_server.context import RecentSpeech
from stt_server.engine import TranscribeOptions
from stt_server.loadtest.client import read_wav
from stt_server.loadtest.clips import CLIPS_DIR, references
from stt_server.loadtest.wer import word_error_rate
from stt_server.segmenter import Segmenter, SegmenterSettings, UtteranceEnded
from stt_server.vad import SileroModel, VadStream
from stt_server.whisper import WhisperModel

RATE = 16000
CLIPS = ("cats.wav", "lucier.wav", "ldc93s1.wav", "jfk.wav")
DEFAULT = ("short:15:3", "full:20:5")

#: --more: read by espeak-ng, "|" marking a pause (0.7-1.4 s, seeded), most of them inside a
#: sentence, where a fragment's final needs its context.
PASSAGES = {
    "harbor": "The old harbor was quiet in the morning, | and the boats lay still against the"
    " stone wall. | A fisherman walked along the pier, | carrying a bucket of bait and a coil"
    " of rope. | He stopped to look at the sky, | which was turning from grey to a pale shade"
    " of blue. | By noon the wind would rise, | and the water would be rough again.",
    "library": "Every evening the library closed at nine o'clock. | The last visitors gathered"
    " their coats and books, | while the librarian switched off the lamps one by one. | She"
    " liked the silence that followed, | when the building seemed to breathe slowly in the"
    " dark. | On the top shelf, | behind a row of atlases, | she kept a notebook of her own.",
    "garden": "My grandmother grew tomatoes, beans and potatoes in a small garden behind the"
    " house. | Each spring she would turn the soil with a heavy fork, | and each autumn she"
    " would store the harvest in the cellar. | She never measured anything, | yet her soup"
    " tasted the same every winter. | When I asked for the recipe, | she laughed and said that"
    " the garden knew it better than she did.",
}
TEMPOS = ("0.85", "1.15")
#: sox, reading a WAV file from stdin: 16 kHz 16-bit mono samples, no header.
SOX_RAW = f"sox -t wav - -t raw -r {RATE} -e signed -b 16 -c 1 -".split()


def utterances(path: Path, vad_model: SileroModel) -> list[np.ndarray]:
    audio = read_wav(path).astype(np.float32) / 32768
    audio = np.concatenate([audio, np.zeros(RATE, np.float32)])
    vad, segmenter = VadStream(vad_model), Segmenter(SegmenterSettings())
    ended = []
    for i in range(0, audio.size, RATE // 10):
        windows, probs = vad.process(audio[i : i + RATE // 10])
        for window, prob in zip(windows, probs, strict=True):
            ended += [
                e for e in segmenter.push(window, float(prob)) if isinstance(e, UtteranceEnded)
            ]
    ended += [e for e in segmenter.flush() if isinstance(e, UtteranceEnded)]
    return [e.audio for e in ended]


def more_clips(directory: Path, refs: dict[str, str]) -> dict[str, Path]:
    """The --more clips, written to ``directory``; their references added to ``refs``."""
    paths: dict[str, Path] = {}
    if not shutil.which("sox"):
        print("sox not found: no tempo variants, no read passages", file=sys.stderr)
        return paths
    for name in ("cats.wav", "lucier.wav", "jfk.wav"):
        for tempo in TEMPOS:
            out = directory / f"{name.removesuffix('.wav')}@{tempo}.wav"
            command = ["sox", str(CLIPS_DIR / name), "-r", str(RATE), str(out), "tempo", tempo]
            subprocess.run(command, check=True, capture_output=True)
            paths[out.name], refs[out.name] = out, refs[name]
    if not shutil.which("espeak-ng"):
        print("espeak-ng not found: no read passages", file=sys.stderr)
        return paths
    pauses = random.Random(7)
    for title, text in PASSAGES.items():
        parts = [part.strip() for part in text.split("|")]
        pieces = [np.zeros(RATE // 2, np.int16)]
        for part in parts:
            spoken = subprocess.run(
                ["espeak-ng", "-v", "en-us", "-s", "160", "--stdout", part],
                check=True,
                capture_output=True,
            ).stdout
            raw = subprocess.run(SOX_RAW, input=spoken, check=True, capture_output=True).stdout
            pieces.append(np.frombuffer(raw, np.int16))
            pieces.append(np.zeros(int(RATE * pauses.uniform(0.7, 1.4)), np.int16))
        out = directory / f"{title}.wav"
        with wave.open(str(out), "wb") as file:
            file.setnchannels(1)
            file.setsampwidth(2)
            file.setframerate(RATE)
            file.writeframes(np.concatenate(pieces).tobytes())
        paths[out.name], refs[out.name] = out, " ".join(parts)
    return paths


class Counting(WhisperModel):
    """Counts the right-sized finals redone on the full window."""

    full = 0

    def _full_window(self, plan):
        self.full += 1
        return super()._full_window(plan)


def run(model: Counting, spec: str, clips: dict[str, list[np.ndarray]], refs) -> str:
    window, context, beam = spec.split(":")
    model.short_finals = window == "short"
    model.beam_size = int(beam)
    model.full = 0
    seconds, finals, wers = 0.0, 0, {}
    for name, pieces in clips.items():
        recent = RecentSpeech(float(context), right_sized=model.short_finals)
        texts = []
        for piece in pieces:
            audio, samples, prefix = recent.prepend(piece)
            options = TranscribeOptions(
                final=True, language="en", context_samples=samples, prefix=prefix
            )
            start = time.perf_counter()
            text = model.transcribe(audio, options).text
            seconds += time.perf_counter() - start
            finals += 1
            texts.append(text)
            recent.add(piece, text)
        wers[name] = word_error_rate(refs[name], " ".join(texts))
    cells = "".join(f"{wers[n] * 100:8.1f}%" for n in clips)
    mean = sum(wers.values()) / len(wers) * 100
    return f"{spec:12} {seconds / finals:6.3f} s {model.full:4d} {mean:5.2f}% {cells}"


def main() -> None:
    args = sys.argv[1:]
    more = "--more" in args
    specs = [a for a in args if a != "--more"] or list(DEFAULT)
    refs = references()
    model = Counting.load(Config(cpu_threads=1, inference_workers=1), device="cpu")
    model.warm_up()
    vad_model = SileroModel()
    paths = {name: CLIPS_DIR / name for name in CLIPS}
    with tempfile.TemporaryDirectory() as scratch:
        if more:
            paths |= more_clips(Path(scratch), refs)
        clips = {name: utterances(path, vad_model) for name, path in paths.items()}
        offline = []
        for path in paths.values():
            audio = read_wav(path).astype(np.float32) / 32768
            segments, _ = model._model.transcribe(audio, language="en")
            offline.append(word_error_rate(refs[path.name], " ".join(s.text for s in segments)))
    header = "".join(f"{n.removesuffix('.wav')[:8]:>9}" for n in clips)
    print(f"{'finals':12} {'s/final':>8} {'full':>4} {'mean':>6} {header}")
    mean = sum(offline) / len(offline) * 100
    cells = "".join(f"{w * 100:8.1f}%" for w in offline)
    print(f"{'offline':12} {'':8} {'':4} {mean:5.2f}% {cells}")
    counts = "".join(f"{len(clips[n]):9d}" for n in clips)
    print(f"{'utterances':12} {'':8} {'':4} {'':6} {counts}")
    for spec in specs:
        print(run(model, spec, clips, refs), flush=True)


if __name__ == "__main__":
    main()
