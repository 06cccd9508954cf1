"""faster-whisper behind the engine's :class:`~stt_server.engine.SpeechModel` interface."""

from __future__ import annotations

import logging
import os

import attrs
import numpy as np

from .config import Config
from .context import compression_ratio
from .cudalibs import preload_cuda_libraries
from .engine import Recognition, Segment, TranscribeOptions, Word
from .modelfiles import resolve_model
from .windowing import is_looping, keep_spoken, split_segments

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
    _tokenizers: dict = attrs.field(factory=dict)
    _warm: bool = False

    @classmethod
    def load(cls, config: Config, *, device: str, device_index: int = 0) -> WhisperModel:
        import faster_whisper

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
            recognized = self._recognize(audio, attrs.evolve(options, language=language))
            return attrs.evolve(
                recognized, language=language, language_probability=round(probability, 3)
            )
        return self._recognize(audio, options)

    def _recognize(self, audio: np.ndarray, options: TranscribeOptions) -> Recognition:
        short = not options.final and self.short_partials and not options.timestamps
        if short and options.language is not None:
            speech = audio[options.context_samples :]
            text = self._decode_short(speech, options.language, options.task)
            if not is_looping(text):
                return Recognition(text)
            log.debug("short-window partial loops; decoding it on the full window")
            return self._decode(speech, self._within_budget(options), prefix=None)
        # Only here: a short-window partial reads neither the prompt nor the context's text.
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

    def _decode_short(self, audio: np.ndarray, language: str, task: str) -> str:
        """A partial on a window the length of the audio plus ``SHORT_WINDOW_PAD``: the encoder
        costs in proportion to its input. Timestamps on and a token budget by duration, so
        that what the decoder says about the padding can be told apart and dropped."""
        import ctranslate2

        model = self._model
        tokenizer = self._tokenizer(language, task)
        duration = audio.size / SAMPLE_RATE
        features = model.feature_extractor(audio, padding=int(SHORT_WINDOW_PAD * SAMPLE_RATE))
        frames = min(features.shape[-1] - features.shape[-1] % 2, FULL_WINDOW_FRAMES)
        window = ctranslate2.StorageView.from_array(
            np.ascontiguousarray(features[None, :, :frames], dtype=np.float32)
        )
        prompt = list(tokenizer.sot_sequence)
        result = model.model.generate(
            window,
            [prompt],
            beam_size=self.partial_beam_size,
            max_length=len(prompt) + int(duration * TOKENS_PER_SECOND) + 8,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        segments = split_segments(result[0].sequences_ids[0], tokenizer.timestamp_begin)
        return keep_spoken(segments, duration, tokenizer.decode)

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
