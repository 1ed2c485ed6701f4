"""Long texts cut into blocks a sentence splitter can take in bounded time and memory.

LlamaIndex's ``SentenceSplitter`` first counts the tokens of the whole text it is given, then
hands it whole to NLTK's sentence tokenizer. A 50 MB document on one line took 83 s and 7.4 GB
there, then failed in NLTK with a regular-expression time limit that named no file. Cut into
blocks of at most ``MAX_BLOCK_CHARS`` first, each piece costs what a normal document does; a
document shorter than that is left whole, so its passages do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)

#: Characters in one block (about 25,000 tokens of English): NLTK and the tokenizer take it
#: in milliseconds, and one passage is a few hundred tokens at most.
MAX_BLOCK_CHARS = 100_000
#: Where a block may end, best first: a paragraph, a line, a sentence, a word.
_BREAKS = ("\n\n", "\n", ". ", " ")


def text_blocks(text: str, source: str = "", max_chars: int = MAX_BLOCK_CHARS
                ) -> Iterator[str]:
    """``text`` in consecutive blocks of at most ``max_chars`` characters.

    Each block ends at the best break of its second half (paragraph, line, sentence, word);
    a stretch without any is cut where it falls, with a warning naming ``source``.
    """
    if max_chars < 2:
        raise ValueError(f"max_chars must be at least 2, got {max_chars}")
    start, warned = 0, False
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = _last_break(text, start + max_chars // 2, end)
        if cut is None:
            cut = end
            if not warned:
                logger.warning("%s: %d characters without a space or a line break (binary data "
                               "or minified text?) are cut into passages where they fall",
                               source or "a document", max_chars // 2)
                warned = True
        yield text[start:cut]
        start = cut
    yield text[start:]


def _last_break(text: str, low: int, high: int) -> int | None:
    """The end of the last break of the best kind within ``text[low:high]``, if any."""
    for separator in _BREAKS:
        found = text.rfind(separator, low, high)
        if found >= 0:
            return found + len(separator)
    return None
