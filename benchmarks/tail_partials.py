"""What tail partials save, and how their text compares with a partial of the whole utterance.

    python benchmarks/tail_partials.py               # a partial every 1 s and every 2 s of speech
    python benchmarks/tail_partials.py --more 1.0    # with the --more clips of final_windows.py

Every clip is cut into utterances by the server's own VAD and endpointing. Within each
utterance a partial is asked for every STEP seconds of its audio (1 s: a lightly loaded
server's cadence; 2 s: a loaded one's), twice over, one request at a time on one thread:

- *whole*: every partial decodes the utterance so far (``tail_partials = false``);
- *tail*: every partial is told the text and length of the one before it, as the server tells
  it, and the model decodes only the end where that pays (``tail_partials = true``).

Printed per clip: the CPU seconds of all its partials both ways; and in all: how many partials
were tails, and how many of those found nothing to join to and were decoded again whole; how
far the tails' text moves from the whole partial's at the same moment (the number that differ,
and their mean WER against it); and how right both are, each scored against the utterance's
own final (decoded once, right-sized, without context) cut to as many words as the partial
has, averaged over the moments a tail was decoded (where the two can differ at all).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from final_windows import CLIPS, more_clips, utterances

from stt_server.config import Config
from stt_server.engine import TranscribeOptions
from stt_server.loadtest.clips import CLIPS_DIR, references
from stt_server.loadtest.wer import word_error_rate
from stt_server.vad import SileroModel
from stt_server.whisper import WhisperModel

RATE = 16000


class Counting(WhisperModel):
    """Counts the tail partials decoded, and those decoded again on the whole utterance."""

    tails = 0
    wholes = 0

    def _generate(self, group):
        self.tails += sum(p.whole is not None for p in group)
        return super()._generate(group)

    def _whole_partial(self, plan):
        self.wholes += 1
        return super()._whole_partial(plan)


def partials(
    model: Counting, utterance: np.ndarray, step: float, tail: bool
) -> list[tuple[str, bool]]:
    """The utterance's partials, one every ``step`` s of its audio, each with whether it was
    decoded on a tail; their CPU time is added to ``model.cpu``."""
    model.tail_partials = tail
    texts: list[tuple[str, bool]] = []
    shown, shown_samples = None, 0
    samples = int(step * RATE)
    while samples <= utterance.size:
        options = TranscribeOptions(
            final=False, language="en", shown=shown, shown_samples=shown_samples
        )
        tails, started = model.tails, time.process_time()
        text = model.transcribe(utterance[:samples], options).text
        model.cpu += time.process_time() - started
        texts.append((text, model.tails > tails))
        if text:
            shown, shown_samples = text, samples
        samples += int(step * RATE)
    return texts


def against_final(final: str, partial: str) -> float:
    """WER of a partial against as many of the utterance's final words as it has."""
    words = final.split()[: len(partial.split())]
    return word_error_rate(" ".join(words), partial) if words else 0.0


def main() -> None:
    args = sys.argv[1:]
    more = "--more" in args
    steps = [float(a) for a in args if a != "--more"] or [1.0, 2.0]
    model = Counting.load(Config(cpu_threads=1, inference_workers=1), device="cpu")
    model.warm_up()
    vad_model = SileroModel()
    paths = {name: CLIPS_DIR / name for name in CLIPS}
    with tempfile.TemporaryDirectory() as scratch:
        if more:
            paths |= more_clips(Path(scratch), references())
        clips = {name: utterances(path, vad_model) for name, path in paths.items()}
    final = TranscribeOptions(final=True, language="en")
    finals = {name: [model.transcribe(u, final).text for u in cut] for name, cut in clips.items()}
    for step in steps:
        print(f"\na partial every {step:g} s of an utterance's audio")
        print(f"{'clip':16} {'whole CPU s':>11} {'tail CPU s':>10}")
        model.tails = model.wholes = 0
        totals = {False: 0.0, True: 0.0}
        differ, count = [], 0
        scores: dict[bool, list[float]] = {False: [], True: []}
        for name, cut in clips.items():
            cpu, texts = {}, {}
            for tail in (False, True):
                model.cpu = 0.0
                texts[tail] = [partials(model, utterance, step, tail) for utterance in cut]
                cpu[tail] = model.cpu
                totals[tail] += model.cpu
            for said, wholes, tails in zip(finals[name], texts[False], texts[True], strict=True):
                count += len(wholes)
                for (whole, _), (tailed, was_tail) in zip(wholes, tails, strict=True):
                    if not was_tail:
                        continue
                    differ += [word_error_rate(whole, tailed)] if whole and tailed != whole else []
                    scores[False].append(against_final(said, whole))
                    scores[True].append(against_final(said, tailed))
            print(f"{name:16} {cpu[False]:11.2f} {cpu[True]:10.2f}", flush=True)
        tails = len(scores[True]) or 1
        print(
            f"all: {totals[False]:.2f} -> {totals[True]:.2f} CPU s "
            f"({(1 - totals[True] / totals[False]) * 100:.0f} % less); {count} partials, "
            f"{model.tails} tails, {model.wholes} decoded again whole"
        )
        print(
            f"the tails' text: {len(differ)} differ from the whole partial's (mean WER against "
            f"it {sum(differ) / tails * 100:.1f} %); against the utterance's final, as many "
            f"words: whole {sum(scores[False]) / tails * 100:.1f} %, "
            f"tail {sum(scores[True]) / tails * 100:.1f} %"
        )


if __name__ == "__main__":
    main()
