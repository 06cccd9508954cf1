"""Where a session's CPU seconds go, stage by stage, on one thread of this machine.

    python benchmarks/stage_costs.py

Each stage runs on the shipped clips as the server runs it, and is reported as CPU seconds per
second of audio (or per call for model calls): JSON + base64 decoding of 100 ms audio
messages, resampling 48 kHz to 16 kHz, Silero VAD, a partial on the right-sized window and on
the full 30 s window (alone, and batched by four), and a final with jfk.wav (11 s) as speaker
context on its right-sized window and on the full one. Together
with a session's request rate (a partial every 0.5 s of speech, a final per utterance) this is
the budget that benchmarks/capacity.py measures end to end.
"""

from __future__ import annotations

import base64
import json
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from stt_server.audio import Resampler, pcm16_to_float
from stt_server.config import Config
from stt_server.engine import TranscribeOptions
from stt_server.loadtest.client import read_wav
from stt_server.loadtest.clips import CLIPS_DIR, references
from stt_server.protocol import parse_client_message
from stt_server.vad import SileroModel, VadStream
from stt_server.whisper import WhisperModel

RATE = 16000


def cpu_timed(fn, repeat: int = 1) -> float:
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat


def main() -> None:
    speech = np.concatenate([read_wav(CLIPS_DIR / n) for n in ("cats.wav", "lucier.wav")])
    seconds = speech.size / RATE
    print(f"audio: {seconds:.0f} s of speech (cats.wav + lucier.wav)\n")

    chunks = [speech[i : i + RATE // 10] for i in range(0, speech.size, RATE // 10)]
    messages = [
        json.dumps({"type": "audio", "data": base64.b64encode(c.tobytes()).decode()})
        for c in chunks
    ]

    def decode_all() -> None:
        for m in messages:
            pcm16_to_float(parse_client_message(m).pcm)

    print(f"JSON + base64 + PCM decode   {cpu_timed(decode_all) / seconds * 1000:7.2f} ms/s audio")

    loud = np.repeat(pcm16_to_float(speech.tobytes()), 3)  # as if it came at 48 kHz

    def resample() -> None:
        r = Resampler(48000)
        for i in range(0, loud.size, 4800):
            r.process(loud[i : i + 4800])

    print(f"resample 48 kHz -> 16 kHz    {cpu_timed(resample) / seconds * 1000:7.2f} ms/s audio")
    audio = pcm16_to_float(speech.tobytes())
    vad_model = SileroModel()

    def vad() -> None:
        stream = VadStream(vad_model)
        for i in range(0, audio.size, 1600):
            stream.process(audio[i : i + 1600])

    print(f"Silero VAD                   {cpu_timed(vad) / seconds * 1000:7.2f} ms/s audio")

    model = WhisperModel.load(Config(cpu_threads=1, inference_workers=1), device="cpu")
    model.warm_up()
    # The context: jfk.wav (11 s) and what it says, as a session that heard it would send.
    context = pcm16_to_float(read_wav(CLIPS_DIR / "jfk.wav").tobytes())
    print(f"\nfinals: beam {model.beam_size}, {context.size / RATE:.0f} s of speaker context\n")
    for utterance in (2.0, 5.0, 10.0):
        piece = audio[: int(utterance * RATE)]
        model.short_partials = True
        short = cpu_timed(lambda p=piece: model.transcribe(p, TranscribeOptions(final=False)), 3)
        batched = cpu_timed(lambda p=piece: model.transcribe_batch([(p, PARTIAL)] * 4), 2) / 4
        model.short_partials = False
        full = cpu_timed(lambda p=piece: model.transcribe(p, TranscribeOptions(final=False)), 3)
        with_context = np.concatenate([context, piece])
        final_options = TranscribeOptions(
            final=True, language="en", context_samples=context.size, prefix=CONTEXT_TEXT
        )
        finals = {}
        for short_finals in (True, False):
            model.short_finals = short_finals
            finals[short_finals] = cpu_timed(
                lambda w=with_context, o=final_options: model.transcribe(w, o), 2
            )
        print(
            f"{utterance:4.0f} s utterance: partial short {short:.3f} s (batched by 4: "
            f"{batched:.3f} s each), partial full {full:.3f} s; final right-sized "
            f"{finals[True]:.3f} s, final full window {finals[False]:.3f} s  [CPU s per call]"
        )


PARTIAL = TranscribeOptions(final=False, language="en")
CONTEXT_TEXT = references()["jfk.wav"]


if __name__ == "__main__":
    main()
