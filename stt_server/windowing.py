"""Right-sized decoding windows, sans-IO: what to keep of a short-window decode.

Whisper is trained on 30-second windows. Given only the utterance so far (plus a little
silence), its encoder costs a fraction as much, but the decoder, seeing the audio end early,
tends to go on: it restarts the sentence, repeats its last words, or makes up a segment in the
padding. Decoding with timestamps makes those visible: each segment says where it starts. So:

- a segment that starts at or past the end of the real audio is padding talk: dropped;
- a segment whose words restart the text already kept, or repeat its end, is a loop: dropped;
- if what is left still repeats itself (:func:`is_looping`), usually the sentence started again
  inside one segment, it is cut where the repetition begins (:func:`cut_loop`): a partial is a
  preview, and the next one or the final has the rest.

Finals are decoded without timestamps, and one that repeats itself is not trusted. Only one
kind is cut rather than decoded again on the full window (:func:`cut_restart`): the decoder,
past the end of the speech, reads its window again from the start, its own first words or the
context's, until it runs out of tokens. Every other loop might be speech that says the same
words twice, which only the full window can tell.

Token ids are plain integers here; timestamps are the ids at and above ``timestamp_begin``, one
step per 20 ms, as in Whisper's vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: Seconds per timestamp token step.
TIMESTAMP_STEP = 0.02

#: A segment must start this far before the end of the real audio to be kept.
END_MARGIN = 0.1

#: A run of this many words said twice in one utterance is a loop.
LOOP_WORDS = 5


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def split_segments(tokens: list[int], timestamp_begin: int) -> list[tuple[float | None, list[int]]]:
    """``[(start seconds or None, text tokens), ...]`` from a timestamped token sequence."""
    segments: list[tuple[float | None, list[int]]] = []
    start: float | None = None
    text: list[int] = []
    for token in tokens:
        if token >= timestamp_begin:
            seconds = (token - timestamp_begin) * TIMESTAMP_STEP
            if start is None and not text:
                start = seconds  # opens a segment
            else:
                segments.append((start, text))  # closes it
                start, text = None, []
        else:
            text.append(token)
    if text:
        segments.append((start, text))
    return segments


def _loop_start(words: list[str]) -> int | None:
    """Index of the first word that repeats what came just before it as a decoder does when it
    runs on: one word three times in a row, a run of 2 to 4 words twice in a row, or a run of
    ``LOOP_WORDS`` or more words twice anywhere (read speech does not say the same five words
    twice in one utterance)."""
    starts = []
    for i in range(len(words) - 2):
        if words[i] == words[i + 1] == words[i + 2]:
            starts.append(i + 1)
            break
    for size in range(2, LOOP_WORDS):
        for i in range(len(words) - 2 * size + 1):
            if words[i : i + size] == words[i + size : i + 2 * size]:
                starts.append(i + size)
                break
    seen = set()
    for i in range(len(words) - LOOP_WORDS + 1):
        run = tuple(words[i : i + LOOP_WORDS])
        if run in seen:
            starts.append(i)
            break
        seen.add(run)
    return min(starts, default=None)


def is_looping(text: str) -> bool:
    """Whether the text repeats itself as a decoder does when it runs on (see _loop_start)."""
    return _loop_start(_words(text)) is not None


def cut_loop(text: str) -> str:
    """The text up to where it starts repeating itself (all of it when it does not)."""
    pieces, words, owners = _words_with_owners(text)
    start = _loop_start(words)
    if start is None:
        return text
    return " ".join(pieces[: owners[start]]).strip()


def _words_with_owners(text: str) -> tuple[list[str], list[str], list[int]]:
    """The text's whitespace-separated pieces, its words, and for each word its piece."""
    pieces = text.split()
    owners: list[int] = []
    words: list[str] = []
    for index, piece in enumerate(pieces):
        for word in _words(piece):
            words.append(word)
            owners.append(index)
    return pieces, words, owners


def _reads_again(tail: list[str], source: list[str]) -> bool:
    """``tail`` is ``source`` read over again (and again), as far as it goes."""
    return all(word == source[k % len(source)] for k, word in enumerate(tail))


def cut_restart(text: str, lead: str = "", *, ran_out: bool = False) -> str | None:
    """The text up to where the decoder starts reading its window again, or None where it does
    not. A restart runs to the end of the text: from the start of a word on, everything is the
    text's own beginning again, or the window's beginning (``lead``, the context's text before
    it, then the text). Speech may say a few words twice ("thank you, thank you"), so unless
    the decoder ``ran_out`` of tokens (it was still going), the beginning read again must be at
    least three words, and all of it must come again. What is kept has two different words at
    least: "no no no no" is likelier said than a restart."""
    pieces, words, owners = _words_with_owners(text)
    lead_words = _words(lead)
    for i in range(2, len(words)):
        tail, head = words[i:], words[:i]
        if len(tail) < (min(len(head), 3) if ran_out else len(head)):
            break
        if (not ran_out and len(head) < 3) or owners[i] == owners[i - 1]:
            continue  # too little said to tell, or inside a piece ("suit.She"): no cut there
        sources = (head, lead_words + head) if lead_words else (head,)
        if any(_reads_again(tail, source) for source in sources):
            if len(set(head)) < 2:
                return None
            return " ".join(pieces[: owners[i]]).strip()
    return None


def _restarts_or_repeats(kept: list[str], new: list[str]) -> bool:
    if not kept or not new:
        return False
    if kept[: len(new)] == new or new[: len(kept)] == kept:
        return True  # the sentence starts again
    tail = kept[-len(new) :]
    return len(new) >= 2 and tail == new  # the last words again


def keep_spoken(
    segments: list[tuple[float | None, list[int]]],
    duration: float,
    decode: Callable[[list[int]], str],
) -> str:
    """The text of the segments that describe the real audio, without restarts and repeats.
    ``decode`` turns text tokens into text."""
    kept_text: list[str] = []
    kept_words: list[str] = []
    for start, tokens in segments:
        if start is not None and start >= duration - END_MARGIN:
            break  # everything from here on is about the padding
        text = decode(tokens).strip()
        words = _words(text)
        if not words:
            continue
        if _restarts_or_repeats(kept_words, words):
            break
        kept_text.append(text)
        kept_words.extend(words)
    return " ".join(kept_text)


#: The tail's words must meet the earlier text's in a run of at least this many.
STITCH_RUN = 2

#: The tail is aligned with the earlier text's last words only: its window covers the last few
#: seconds, and a match further back is a phrase said twice.
STITCH_SEARCH = 16


def stitch_tail(earlier: str, tail: str) -> str | None:
    """A partial's text from ``earlier`` (the text of the utterance up to a moment) and
    ``tail`` (the text of its last few seconds decoded alone, whose start overlaps the earlier
    text's end), or None where they cannot be joined.

    The tail is aligned with the earlier text (its first word at one of the earlier text's
    last ``STITCH_SEARCH``) where, over the words both cover, most meet and fewest differ: a
    phrase said twice meets as well further back, but there the earlier text goes on with
    other words than the tail. The alignment needs a run of ``STITCH_RUN`` words met. The
    joined text is the earlier text up to the last word both say, then the tail's text from
    that word on. Where the two disagree before that word, the earlier reading is kept: it
    heard the sentence from its start, while the tail's first words had no left context
    (measured: "called Menace" read as "called menus"). After it, the tail's is: the earlier
    text's last words were cut off by its window's end (and closed with a period).

    None where no alignment has such a run (a misreading on one side, or a tail that heard
    nothing), where the joint would fall inside a whitespace piece of either text (a word
    written "well-known" in one and "well known" in the other; text written without spaces),
    or where the tail has fewer words after the joint than the earlier text: it was cut short,
    and joining it would take back words already shown. Only the whole utterance settles
    those."""
    pieces, words, owners = _words_with_owners(earlier)
    tail_pieces, tail_words, tail_owners = _words_with_owners(tail)
    best: tuple[int, int, list[int]] | None = None  # (met less differing, offset, met)
    for offset in range(max(0, len(words) - STITCH_SEARCH), len(words)):
        both = range(offset, min(len(words), offset + len(tail_words)))
        met = [i for i in both if words[i] == tail_words[i - offset]]
        if not _has_run(met, STITCH_RUN):
            continue
        score = 2 * len(met) - len(both)
        if best is None or (score, offset) > best[:2]:
            best = (score, offset, met)
    if best is None:
        return None
    _, offset, met = best
    # The last word met that starts a piece in both texts: there the pieces line up.
    for last in reversed(met):
        t = last - offset
        if _starts_piece(owners, last) and _starts_piece(tail_owners, t):
            break
    else:
        return None
    if len(tail_words) - t < len(words) - last:
        return None
    return " ".join(pieces[: owners[last]] + tail_pieces[tail_owners[t] :]).strip()


def _starts_piece(owners: list[int], index: int) -> bool:
    return index == 0 or owners[index - 1] != owners[index]


def _has_run(indices: list[int], length: int) -> bool:
    """Whether the sorted ``indices`` hold ``length`` consecutive numbers."""
    run = 0
    for k, index in enumerate(indices):
        run = run + 1 if k and index == indices[k - 1] + 1 else 1
        if run >= length:
            return True
    return False
