"""Stop a generated reply when it starts repeating itself, for any LLM.

A small base model that has run out of things to say loops: the same line ("import uuid2")
fifty times, or one phrase over and over, until the token limit. ``RepetitionGuard`` watches
the stream and ends the reply at the first repeat:

- a line, or a sentence, that was already written (compared without case or extra spaces)
  ends the reply before that line. The start of a line that could still turn into a repeat
  is held back until it either completes as one (dropped) or differs (written), so a user
  never sees the repeated copy;
- a short phrase repeated back to back (``"a b c a b c a b c a b c"``) ends the reply (as
  text streams, the copies already shown stay shown: a dozen words of the loop at most).

``guard_stream`` applies it to a token stream and closes the source (which stops the LLM)
when it cuts. ``NoRepeatInReply`` is the generation-side control for ``transformers``: it bans
a token that would repeat an n-gram of the reply itself (unlike ``no_repeat_ngram_size``,
which also bans n-grams of the prompt, so the model could no longer quote its context).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

_SENTENCE_ENDS = (".", "!", "?", ":")


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


class RepetitionGuard:
    """Feed it a stream's deltas; it says what to show now and when to stop.

    The stream is cut into units: lines, and sentences within a line (a unit ends at a
    newline, or at a space after ``.``, ``!``, ``?`` or ``:``).

    Args:
        min_chars: units shorter than this (a closing bracket, "[or]", "e.g.", a blank line)
            may repeat freely.
        max_phrase_words: longest phrase checked for back-to-back repetition.
        max_phrase_repeats, min_loop_words: a phrase written this many times in a row, and
            over at least this many words, ends the reply.
    """

    def __init__(self, min_chars: int = 12, max_phrase_words: int = 8,
                 max_phrase_repeats: int = 3, min_loop_words: int = 12):
        self.min_chars = min_chars
        self.max_phrase_words = max_phrase_words
        self.max_phrase_repeats = max_phrase_repeats
        self.min_loop_words = min_loop_words
        self.shown = ""  # what has been let through
        self._unit = ""  # the current, unfinished unit (partly shown, partly held)
        self._held = ""  # its tail not shown yet
        self._seen: set[str] = set()  # finished units, normalised
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The part of ``delta`` (plus held-back text) to show now; ``""`` once stopped."""
        out = []
        for char in delta:
            if self.stopped:
                break
            self._unit += char
            self._held += char
            if char == "\n" or (char.isspace() and self._unit[:-1].endswith(_SENTENCE_ENDS)):
                out.append(self._end_unit())
            elif not self._could_repeat():
                out.append(self._release())
            if char.isspace() and self._phrase_loop(self.shown + "".join(out)):
                self.stopped = True
        text = "".join(out)
        self.shown += text
        return text

    def flush(self) -> str:
        """At the end of the stream: the held-back text, unless it is a repeat."""
        if self.stopped or self._is_repeat(self._unit):
            return ""
        text = self._release()
        self.shown += text
        return text

    def _release(self) -> str:
        text, self._held = self._held, ""
        return text

    def _end_unit(self) -> str:
        unit, self._unit = self._unit, ""
        if self._is_repeat(unit):
            self.stopped = True
            self._held = ""
            return ""
        if len(_normal(unit)) >= self.min_chars:
            self._seen.add(_normal(unit))
        return self._release()

    def _is_repeat(self, unit: str) -> bool:
        key = _normal(unit)
        return len(key) >= self.min_chars and key in self._seen

    def _could_repeat(self) -> bool:
        """Whether the unfinished unit is still the start of a unit already written."""
        key = _normal(self._unit)
        return any(seen.startswith(key) for seen in self._seen)

    def _phrase_loop(self, text: str) -> bool:
        """The text ends with one phrase written ``copies`` times in a row: at least
        ``max_phrase_repeats`` copies and ``min_loop_words`` words ("| | |" in a table, or
        "text text text", is not a loop yet)."""
        words = text.split()
        for size in range(1, self.max_phrase_words + 1):
            copies = max(self.max_phrase_repeats, -(-self.min_loop_words // size))
            span = size * copies
            if len(words) < span:
                continue
            tail = [w.casefold() for w in words[-span:]]
            if all(tail[i:i + size] == tail[:size] for i in range(size, span, size)):
                return True
        return False


def guard_stream(tokens: Iterable[str], guard: RepetitionGuard | None = None
                 ) -> Iterator[str]:
    """``tokens`` with repetition cut off; the source is closed when it is cut or left."""
    guard = guard or RepetitionGuard()
    source = iter(tokens)
    try:
        for token in source:
            text = guard.feed(token)
            if text:
                yield text
            if guard.stopped:
                return
        text = guard.flush()
        if text:
            yield text
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


class NoRepeatInReply:
    """A ``transformers`` logits processor: no n-gram of the reply is generated twice.

    Only tokens after ``prompt_length`` count, so quoting the context stays possible.
    """

    def __init__(self, ngram_size: int, prompt_length: int):
        if ngram_size < 2:
            raise ValueError(f"ngram_size must be at least 2, got {ngram_size}")
        self.ngram_size = ngram_size
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        n = self.ngram_size
        for row in range(input_ids.shape[0]):
            reply = input_ids[row, self.prompt_length:].tolist()
            if len(reply) < n:
                continue
            prefix = tuple(reply[-(n - 1):])
            banned = {reply[i + n - 1] for i in range(len(reply) - n + 1)
                      if tuple(reply[i:i + n - 1]) == prefix}
            if banned:
                scores[row, list(banned)] = float("-inf")
        return scores
