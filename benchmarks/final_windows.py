"""What a final costs and how well it reads, per window, context and beam, clip by clip.

    python benchmarks/final_windows.py                          # the defaults, and the old way
    python benchmarks/final_windows.py short:15:3 full:20:5 short:10:3

Each argument is ``WINDOW:CONTEXT_SECONDS:BEAM``, WINDOW being ``short`` (right-sized finals,
the server's default) or ``full`` (Whisper's 30 s window). Every shipped clip is cut into
utterances by the server's own VAD and endpointing (as a real-time stream would be), and each
utterance's final is decoded in order with the session's context rules (its earlier utterances
in front, their text forced on the decoder), one request at a time on one thread. Printed: the
mean wall seconds per final and the WER of the joined finals per clip, next to the same model
transcribing the whole file offline. Only the model's work is measured, not the server's.
"""

from __future__ import annotations

import os
import sys
import time

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


def utterances(name: str, vad_model: SileroModel) -> list[np.ndarray]:
    audio = read_wav(CLIPS_DIR / name).astype(np.float32) / 32768
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


def run(model: WhisperModel, spec: str, clips: dict[str, list[np.ndarray]], refs) -> str:
    window, context, beam = spec.split(":")
    model.short_finals = window == "short"
    model.beam_size = int(beam)
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
    cells = "  ".join(f"{wers[n] * 100:5.1f}%" for n in clips)
    return f"{spec:12} {seconds / finals:6.3f} s   {cells}"


def main() -> None:
    specs = sys.argv[1:] or list(DEFAULT)
    refs = references()
    model = WhisperModel.load(Config(cpu_threads=1, inference_workers=1), device="cpu")
    model.warm_up()
    vad_model = SileroModel()
    clips = {name: utterances(name, vad_model) for name in CLIPS}
    header = "  ".join(f"{n.removesuffix('.wav')[:6]:>6}" for n in CLIPS)
    print(f"{'finals':12} {'s/final':>8}   {header}")
    offline = []
    for name in CLIPS:
        audio = read_wav(CLIPS_DIR / name).astype(np.float32) / 32768
        segments, _ = model._model.transcribe(audio, language="en")
        offline.append(word_error_rate(refs[name], " ".join(s.text for s in segments)))
    print(f"{'offline':12} {'':8}   " + "  ".join(f"{w * 100:5.1f}%" for w in offline))
    print(f"{'utterances':12} {'':8}   " + "  ".join(f"{len(clips[n]):6d}" for n in CLIPS))
    for spec in specs:
        print(run(model, spec, clips, refs), flush=True)


if __name__ == "__main__":
    main()
