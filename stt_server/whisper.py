"""faster-whisper behind the engine's :class:`~stt_server.engine.SpeechModel` interface."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import attrs
import numpy as np

from .config import Config
from .context import compression_ratio
from .cudalibs import preload_cuda_libraries
from .engine import Recognition, Segment, TranscribeOptions, Word
from .modelfiles import resolve_model
from .windowing import (
    cut_loop,
    cut_restart,
    is_looping,
    keep_spoken,
    split_segments,
    stitch_tail,
)

log = logging.getLogger(__name__)

#: Whisper's no-speech gate (faster-whisper's own defaults): a segment is dropped when the model
#: both thinks it is not speech and is unsure of its words. Keeps coughs and hum out of finals.
_NO_SPEECH_THRESHOLD = 0.6
_LOG_PROB_THRESHOLD = -1.0

#: faster-whisper's loop test: text that gzip compresses better than this is decoded again at a
#: higher temperature. With a context prefix, the test is ours, on the new words alone: the
#: prefix is part of what faster-whisper measures, and a speaker who repeats a sentence would
#: otherwise make every final a cascade of six decodes.
_COMPRESSION_RATIO_THRESHOLD = 2.4

SAMPLE_RATE = 16000

#: Silence after the audio in a short window: the decoder needs a little to end on.
SHORT_WINDOW_PAD = 0.5

#: Tail partials: a partial decodes only the utterance's last seconds where an earlier partial
#: of it was shown. The tail reaches back ``TAIL_OVERLAP`` s into the audio that partial was
#: decoded on, and is used only where it leaves out ``TAIL_SAVES`` s of the utterance or more.
#: The words the tail reads in its first second or so had no sentence before them, and what
#: the tail reads after the joint stays in every later partial of the utterance
#: (``stitch_tail``): 3 s of overlap rather than 2 gave the same saving with fewer misread
#: words kept (benchmarks/tail_partials.py, docs/benchmarks.md).
TAIL_OVERLAP = 3.0
TAIL_SAVES = 1.5

#: A shown text of fewer whitespace pieces is no text to join to: too short, or written without
#: spaces (Japanese, Chinese, Thai), where a piece holds a whole phrase and pieces seldom line
#: up, so that nearly every tail would be decoded again whole.
TAIL_SHOWN_PIECES = 4

#: Silence after a right-sized final's audio. Decoded without timestamps, Whisper on a short
#: window tends to read it again from the start once past the speech; such a restart is cut
#: (``cut_restart``), so the pad only has to let the decoder end its sentence. Measured on the
#: shipped clips (benchmarks/final_windows.py): 3 s reads as well as 5 s, and costs 6 % less
#: CPU per final; with 2 s lucier.wav lost a word in one run of two.
FINAL_PAD = 3.0

#: Right-sized windows of one batch differ in length by at most this factor (plus a second):
#: each is padded to the longest, and padding costs encoder time.
BATCH_LENGTH_SPREAD = 1.3

#: Whisper's full window in mel frames (30 s); a short window never exceeds it.
FULL_WINDOW_FRAMES = 3000

#: The decoder reads at most 448 tokens, its prompt included. Budgets for what goes before the
#: speech, leaving at least 448 - 2 * 8 - 120 - 40 - 160 = 112 tokens for the answer (about
#: 28 s of fast speech): the client's prompt, its hotwords, the context's text.
MAX_PROMPT_TOKENS = 120
MAX_HOTWORD_TOKENS = 40
MAX_PREFIX_TOKENS = 160

#: Token budget of a short-window decode per second of audio (read speech is ~4 tokens a
#: second, timestamps included); a looping decoder runs out instead of filling 448 tokens.
TOKENS_PER_SECOND = 7

#: A partial's budget is tighter: a preview cut a word short costs nothing (the next one has
#: it), while a decoder let run on the padding restarts the sentence and is redone on the full
#: window. Read speech with its timestamps is about 3.5 tokens a second.
PARTIAL_TOKENS_PER_SECOND = 4

#: CTranslate2's Whisper ``generate`` returned at most ``max_length / 2`` tokens in our
#: measurements (4.8: 30 tokens at 60, 67 of 67 needed at 150, with 2 or 26 prompt tokens),
#: and nothing at all when a long previous-text prompt filled ``max_length``: a budget of N
#: tokens asks for the prompt's length plus 2 N.
_MAX_LENGTH_PER_TOKEN = 2
_MAX_LENGTH = 448


def limit_blas_threads() -> None:
    """numpy's BLAS (OpenBLAS) does one small matrix product per request, in faster-whisper's
    feature extractor. Left to its own pool, its threads spin between calls: on the 2-core box
    a process used twice the CPU time of the inference it ran (a whole second core, taken
    from the other worker), for no speed. One thread does that product as fast."""
    import threadpoolctl

    threadpoolctl.threadpool_limits(1, user_api="blas")


def cuda_device_count() -> int:
    import ctranslate2

    preload_cuda_libraries()  # before CTranslate2 touches CUDA, which opens them by name
    try:
        return ctranslate2.get_cuda_device_count()
    except Exception:  # CTranslate2 built without CUDA, or the driver is broken
        return 0


def resolve_compute_type(compute_type: str, device: str) -> str:
    if compute_type != "default":
        return compute_type
    return "float16" if device == "cuda" else "int8"


@attrs.define(eq=False)
class WhisperModel:
    """One loaded faster-whisper model on one device; ``transcribe`` runs on worker threads."""

    name: str
    device: str
    beam_size: int
    partial_beam_size: int
    _model: object
    short_partials: bool = False
    tail_partials: bool = False
    short_finals: bool = False
    _tokenizers: dict = attrs.field(factory=dict)
    _warm: bool = False

    @classmethod
    def load(cls, config: Config, *, device: str, device_index: int = 0) -> WhisperModel:
        import faster_whisper

        limit_blas_threads()
        source, name = resolve_model(config.model)
        compute_type = resolve_compute_type(config.compute_type, device)
        label = f"{device}:{device_index}" if device == "cuda" else device
        log.info("loading model %s on %s (%s)", name, label, compute_type)
        if device == "cuda":
            preload_cuda_libraries()
        model = faster_whisper.WhisperModel(
            source,
            device=device,
            device_index=device_index,
            compute_type=compute_type,
            cpu_threads=config.cpu_threads,
            num_workers=config.inference_workers,
            local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1",
        )
        return cls(
            name=name,
            device=label,
            beam_size=config.beam_size,
            partial_beam_size=config.partial_beam_size,
            model=model,
            short_partials=config.short_partials,
            tail_partials=config.tail_partials,
            short_finals=config.short_finals,
        )

    def warm_up(self) -> None:
        """One final and one partial on a second of faint noise (once per loaded model)."""
        if self._warm:
            return
        noise = np.random.default_rng(0).normal(0, 1e-3, SAMPLE_RATE).astype(np.float32)
        language = None if self.is_multilingual else "en"
        self.transcribe(noise, TranscribeOptions(final=True, language=language))
        self.transcribe(noise, TranscribeOptions(final=False, language=language))
        self._warm = True

    @property
    def is_multilingual(self) -> bool:
        return bool(self._model.model.is_multilingual)

    def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Recognition:
        result = self.transcribe_batch([(audio, options)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def transcribe_batch(
        self, requests: Sequence[tuple[np.ndarray, TranscribeOptions]]
    ) -> list[Recognition | BaseException]:
        """Every request of the batch; right-sized windows (partials, and finals when
        ``short_finals``) are decoded together, a few model calls for all of them, the rest
        (files, full-window fallbacks) one by one. A request's failure is its own answer."""
        results: list[Recognition | BaseException | None] = [None] * len(requests)
        planned: list[_Planned] = []
        for i, (audio, options) in enumerate(requests):
            try:
                audio, options, detected = self._prepare(audio, options)
                plan = self._plan(i, audio, options, detected)
                if plan is None:
                    results[i] = detected.apply(self._recognize(audio, options))
                else:
                    planned.append(plan)
            except Exception as exc:
                results[i] = exc
        groups = _groups(planned)
        while groups:
            group = groups.pop()
            try:
                outputs = self._generate(group)
            except Exception as exc:
                if len(group) > 1:
                    # Which request broke it? Each alone, so that only that one fails.
                    groups.extend([plan] for plan in group)
                    continue
                results[group[0].index] = exc
                continue
            for plan, output in zip(group, outputs, strict=True):
                try:
                    results[plan.index] = plan.detected.apply(self._conclude(plan, output))
                except Exception as exc:
                    results[plan.index] = exc
        return [r if r is not None else RuntimeError("request not decoded") for r in results]

    def _prepare(
        self, audio: np.ndarray, options: TranscribeOptions
    ) -> tuple[np.ndarray, TranscribeOptions, _Detected]:
        if not self.is_multilingual:
            # English-only models know one language and one task; translating English into
            # English is transcribing it.
            options = attrs.evolve(options, language="en", task="transcribe")
        if options.language is None and options.context_samples:
            # faster-whisper would detect on the first 30 s, mostly the context: a speaker who
            # changes language would be heard in the old one. Detect on the new speech alone.
            speech = audio[options.context_samples :]
            language, probability, _ = self._model.detect_language(speech)
            if options.context_language not in (None, language):
                # The context's forced text would pull the decoder back into the old language.
                options = attrs.evolve(options, prefix=None)
            options = attrs.evolve(options, language=language)
            return audio, options, _Detected(language, round(probability, 3))
        return audio, options, _Detected()

    def _plan(
        self, index: int, audio: np.ndarray, options: TranscribeOptions, detected: _Detected
    ) -> _Planned | None:
        """A right-sized decode for this request, or None where it takes the full window."""
        if options.timestamps or options.language is None:
            return None
        tokenizer = self._tokenizer(options.language, options.task)
        if not options.final:
            if not self.short_partials:
                return None
            # A partial reads neither the prompt nor the context: it is a preview, and the
            # speech alone on its own short window is the cheapest thing that shows it.
            speech = audio[options.context_samples :]
            whole = self._partial_plan(index, speech, options, detected, tokenizer)
            tail = self._tail_samples(speech.size, options)
            if tail is None:
                return whole
            return attrs.evolve(
                self._partial_plan(index, speech[-tail:], options, detected, tokenizer),
                whole=whole,
            )
        if not self.short_finals or audio.size / SAMPLE_RATE + FINAL_PAD > 30.0:
            return None
        options = self._within_budget(options)
        prefix = options.prefix.strip() if options.prefix and options.context_samples else ""
        if not prefix:
            # Context audio without its text (left out for its length) would be transcribed
            # again as if it were new.
            audio = audio[options.context_samples :]
            options = attrs.evolve(options, context_samples=0, prefix=None)
        prefix_tokens = self._tokens(" " + prefix) if prefix else []
        duration = (audio.size - options.context_samples) / SAMPLE_RATE
        budget = len(prefix_tokens) + int(duration * TOKENS_PER_SECOND) + 8
        previous = self._previous_tokens(options)
        prompt = (
            ([tokenizer.sot_prev, *previous] if previous else [])
            + list(tokenizer.sot_sequence)
            + [tokenizer.no_timestamps]
            + prefix_tokens
        )
        if len(prompt) + budget * _MAX_LENGTH_PER_TOKEN > _MAX_LENGTH:
            return None
        return _Planned(
            index=index,
            audio=audio,
            options=options,
            detected=detected,
            pad=FINAL_PAD,
            prompt=prompt,
            budget=budget,
            beam=self.beam_size,
            tokenizer=tokenizer,
            duration=duration,
            prefix=prefix,
        )

    def _partial_plan(
        self,
        index: int,
        speech: np.ndarray,
        options: TranscribeOptions,
        detected: _Detected,
        tokenizer,
    ) -> _Planned:
        duration = speech.size / SAMPLE_RATE
        return _Planned(
            index=index,
            audio=speech,
            options=options,
            detected=detected,
            pad=SHORT_WINDOW_PAD,
            prompt=list(tokenizer.sot_sequence),
            budget=int(duration * PARTIAL_TOKENS_PER_SECOND) + 6,
            beam=self.partial_beam_size,
            tokenizer=tokenizer,
            duration=duration,
        )

    def _tail_samples(self, samples: int, options: TranscribeOptions) -> int | None:
        """How much of the utterance's end a partial decodes where it may decode only that: an
        earlier partial of it was shown (words to join to, in pieces that can line up), it is
        transcribed (a translation's words need not follow the audio's order), and the tail,
        reaching ``TAIL_OVERLAP`` back into that partial's audio, leaves ``TAIL_SAVES`` out."""
        if not (
            self.tail_partials
            and options.task == "transcribe"
            and options.shown
            and len(options.shown.split()) >= TAIL_SHOWN_PIECES
            and options.shown_samples <= samples
        ):
            return None
        tail = samples - options.shown_samples + int(TAIL_OVERLAP * SAMPLE_RATE)
        return tail if samples - tail >= TAIL_SAVES * SAMPLE_RATE else None

    def _previous_tokens(self, options: TranscribeOptions) -> list[int]:
        """Whisper's previous-text slot, as faster-whisper fills it: hotwords (only without a
        context prefix, as faster-whisper has it), then the client's prompt (both already
        within their budgets)."""
        tokens: list[int] = []
        if options.hotwords and not (options.prefix and options.context_samples):
            tokens += self._tokens(" " + options.hotwords.strip())
        if options.prompt:
            tokens += self._tokens(" " + options.prompt.strip())
        return tokens

    def _generate(self, group: list[_Planned]) -> list:
        """One CTranslate2 call for a group: every window padded with silence to the longest."""
        import ctranslate2

        longest = max(p.audio.size + int(p.pad * SAMPLE_RATE) for p in group)
        frames = min(longest // self._model.feature_extractor.hop_length, FULL_WINDOW_FRAMES)
        frames -= frames % 2
        features = np.stack(
            [
                self._model.feature_extractor(p.audio, padding=longest - p.audio.size)[:, :frames]
                for p in group
            ]
        )
        return self._model.model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32)),
            [p.prompt for p in group],
            beam_size=group[0].beam,
            max_length=min(max(p.max_length for p in group), _MAX_LENGTH),
            suppress_blank=True,
            suppress_tokens=[-1],
            return_scores=True,
            return_no_speech_prob=True,
        )

    def _conclude(self, plan: _Planned, output) -> Recognition:
        """The text of a right-sized decode; cut where it starts reading its window again
        (``cut_restart``); or the full-window answer where it cannot be trusted otherwise (it
        loops, runs out of tokens, says nothing new, or is unsure of itself)."""
        tokens = output.sequences_ids[0] if output.sequences_ids else []
        if not plan.options.final:
            segments = split_segments(tokens, plan.tokenizer.timestamp_begin)
            # A preview that starts its sentence again is cut where it does: far cheaper than
            # the full window, and the next partial or the final has the rest.
            text = cut_loop(keep_spoken(segments, plan.duration, plan.tokenizer.decode))
            if plan.whole is None:
                return Recognition(text)
            stitched = stitch_tail(plan.options.shown or "", text)
            if stitched is not None:
                return Recognition(stitched)
            # The tail's words do not carry on from what was shown (a misreading on either
            # side, or a tail that heard nothing): the whole utterance, as without a tail.
            return self._whole_partial(plan.whole)
        text = plan.tokenizer.decode(tokens).strip()
        # faster-whisper's figures: the sequence's mean log-probability, the no-speech gate.
        avg_logprob = output.scores[0] * len(tokens) / (len(tokens) + 1)
        if output.no_speech_prob > _NO_SPEECH_THRESHOLD and avg_logprob < _LOG_PROB_THRESHOLD:
            return Recognition("")
        new = text[len(plan.prefix) :].strip() if text.startswith(plan.prefix) else None
        if not new or avg_logprob < _LOG_PROB_THRESHOLD:
            # Nothing after the prefix, the prefix not echoed, or the decoder unsure.
            return self._full_window(plan)
        ran_out = len(tokens) >= plan.budget
        if ran_out or is_looping(new) or compression_ratio(new) > _COMPRESSION_RATIO_THRESHOLD:
            # Past the speech, the decoder read its window again from the start: what it said
            # before that is the answer (the full window cost a second of a core, and misheard
            # jfk.wav's "And so my fellow Americans" that the short window had right).
            kept = cut_restart(new, plan.prefix, ran_out=ran_out)
            if not kept or is_looping(kept):
                return self._full_window(plan)
            return Recognition(kept)
        return Recognition(new)

    def _whole_partial(self, plan: _Planned) -> Recognition:
        log.debug("tail partial does not join the text shown; decoding the whole utterance")
        return self._conclude(plan, self._generate([plan])[0])

    def _full_window(self, plan: _Planned) -> Recognition:
        log.debug("right-sized final not trusted; decoding it on the full window")
        return self._recognize(plan.audio, plan.options)

    def _recognize(self, audio: np.ndarray, options: TranscribeOptions) -> Recognition:
        """Whisper's full 30 s window (faster-whisper's own loop, with its fallbacks)."""
        options = self._within_budget(options)
        if options.prefix and options.context_samples and not options.timestamps:
            # Whisper decodes the context audio as the forced prefix and carries on from there;
            # the prefix comes back at the start of the text and is cut off again.
            prefix = options.prefix.strip()
            recognized = self._decode(audio, options, prefix=prefix)
            if recognized.text.startswith(prefix):
                new = recognized.text[len(prefix) :].strip()
                if compression_ratio(new) <= _COMPRESSION_RATIO_THRESHOLD:
                    return attrs.evolve(recognized, text=new)
                log.debug("new text after the context loops; transcribing without context")
            else:
                log.debug("context prefix not echoed; transcribing without context")
        return self._decode(audio[options.context_samples :], options, prefix=None)

    def _tokens(self, text: str) -> list[int]:
        return self._model.hf_tokenizer.encode(text, add_special_tokens=False).ids

    def _within_budget(self, options: TranscribeOptions) -> TranscribeOptions:
        """Keep the decoder's prompt (the client's prompt, hotwords, the context's text) within
        ``PROMPT_BUDGET`` tokens. faster-whisper caps each at 223 but not their sum, and the
        decoder holds 448 in all: past that every decode fails, and what is left for the
        answer shrinks long before. The client's prompt keeps its last words (nearest the
        speech), hotwords their first; a context that does not fit is left out."""
        prompt, hotwords = options.prompt, options.hotwords
        if prompt and len(tokens := self._tokens(" " + prompt.strip())) > MAX_PROMPT_TOKENS:
            prompt = self._model.hf_tokenizer.decode(tokens[-MAX_PROMPT_TOKENS:]).strip()
        if hotwords and len(tokens := self._tokens(" " + hotwords.strip())) > MAX_HOTWORD_TOKENS:
            hotwords = self._model.hf_tokenizer.decode(tokens[:MAX_HOTWORD_TOKENS]).strip()
        options = attrs.evolve(options, prompt=prompt, hotwords=hotwords)
        if options.prefix and len(self._tokens(" " + options.prefix.strip())) > MAX_PREFIX_TOKENS:
            log.debug("context text over %d tokens; transcribing without it", MAX_PREFIX_TOKENS)
            options = attrs.evolve(options, prefix=None)
        return options

    def _tokenizer(self, language: str, task: str):
        from faster_whisper.tokenizer import Tokenizer

        if (language, task) not in self._tokenizers:
            model = self._model
            self._tokenizers[language, task] = Tokenizer(
                model.hf_tokenizer, model.model.is_multilingual, task, language
            )
        return self._tokenizers[language, task]

    def _decode(
        self, audio: np.ndarray, options: TranscribeOptions, prefix: str | None
    ) -> Recognition:
        segments, info = self._model.transcribe(
            audio,
            language=options.language,
            task=options.task,
            initial_prompt=options.prompt or None,
            hotwords=options.hotwords or None,
            beam_size=self.beam_size if options.final else self.partial_beam_size,
            # Partials are re-done every half second; a temperature fallback would only make
            # a slow partial slower. Finals keep faster-whisper's fallback schedule.
            temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if options.final else 0.0,
            condition_on_previous_text=False,
            prefix=prefix,
            without_timestamps=not options.timestamps,
            word_timestamps=options.words,
            vad_filter=False,
            no_speech_threshold=_NO_SPEECH_THRESHOLD,
            log_prob_threshold=_LOG_PROB_THRESHOLD,
            compression_ratio_threshold=None if prefix else _COMPRESSION_RATIO_THRESHOLD,
        )
        # The generator is lazy: consuming it here keeps all model work on this thread.
        kept = [s for s in segments if s.text.strip()]
        detected = options.language is None
        return Recognition(
            " ".join(s.text.strip() for s in kept),
            language=info.language if detected else None,
            language_probability=round(info.language_probability, 3) if detected else None,
            segments=tuple(_segment(s) for s in kept) if options.timestamps else (),
        )


@attrs.frozen
class _Detected:
    """The language a request's speech was detected in, where it was."""

    language: str | None = None
    probability: float | None = None

    def apply(self, recognized: Recognition) -> Recognition:
        if self.language is None:
            return recognized
        return attrs.evolve(
            recognized, language=self.language, language_probability=self.probability
        )


@attrs.frozen
class _Planned:
    """One request's right-sized decode: its audio, the silence after it, its prompt."""

    index: int
    audio: np.ndarray = attrs.field(eq=False, repr=False)
    options: TranscribeOptions
    detected: _Detected
    pad: float
    prompt: list[int]
    #: Tokens it may take (prefix included); one that uses them all has run on.
    budget: int
    beam: int
    tokenizer: object = attrs.field(eq=False, repr=False)
    #: Seconds of new speech (the context excluded).
    duration: float
    #: The context's text, forced on the decoder ("" without context).
    prefix: str = ""
    #: A tail partial's: the plan that decodes the whole utterance where the tail's words do
    #: not join the text shown (``options.shown``).
    whole: _Planned | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def max_length(self) -> int:
        """What to ask of CTranslate2 for ``budget`` tokens: the prompt counts in its
        ``max_length``, and it returns at most half of the rest (measured)."""
        return len(self.prompt) + self.budget * _MAX_LENGTH_PER_TOKEN

    @property
    def length(self) -> float:
        return self.audio.size / SAMPLE_RATE + self.pad

    @property
    def layout(self) -> tuple[int, int]:
        """CTranslate2 decodes in one call only prompts whose previous text (the client's
        prompt, hotwords) has one length and whose task tokens are as many; it raises
        otherwise. Where ``<|startoftranscript|>`` is, and how many task tokens follow."""
        start = self.prompt.index(self.tokenizer.sot)
        task = {*self.tokenizer.sot_sequence, self.tokenizer.no_timestamps}
        count = 0
        while start + count < len(self.prompt) and self.prompt[start + count] in task:
            count += 1
        return start, count


def _groups(planned: list[_Planned]) -> list[list[_Planned]]:
    """Batches for the model: the same beam size and prompt layout, windows of similar
    length."""
    groups: list[list[_Planned]] = []
    for plan in sorted(planned, key=lambda p: (p.beam, p.layout, p.length)):
        group = groups[-1] if groups else None
        if (
            group is not None
            and (group[0].beam, group[0].layout) == (plan.beam, plan.layout)
            and plan.length <= group[0].length * BATCH_LENGTH_SPREAD + 1.0
        ):
            group.append(plan)
        else:
            groups.append([plan])
    return groups


def _segment(segment) -> Segment:
    return Segment(
        start=segment.start,
        end=segment.end,
        text=segment.text.strip(),
        avg_logprob=segment.avg_logprob,
        no_speech_prob=segment.no_speech_prob,
        compression_ratio=segment.compression_ratio,
        temperature=segment.temperature or 0.0,
        words=tuple(Word(w.start, w.end, w.word, w.probability) for w in segment.words or ()),
    )
