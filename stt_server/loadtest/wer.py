"""Word error rate with the normalisation the shared clips' manifest asks for."""

from __future__ import annotations

import re

import jiwer

_NON_WORD = re.compile(r"[^\w\s']+")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, punctuation dropped (hyphens split words), whitespace collapsed."""
    text = text.lower().replace("-", " ")
    text = _NON_WORD.sub(" ", text).replace("'", "")
    return _SPACE.sub(" ", text).strip()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER in [0, inf) after :func:`normalize`; an empty hypothesis scores 1.0."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp or "<empty>"))
