"""Queries from the corpus's own structure: a passage's title or heading names what it is
about, so it serves as a query of that passage, at no teacher cost.

- a BEIR passage is ``title\\ntext``: its title is a query of it (an entity's name for
  DBpedia, a paper's title for SciFact);
- a document chunk's first Markdown heading (``## csv.reader (function)``) is a query of the
  chunk, without its ``#`` marks.

Like generated queries they are judged by the round trip before training (``round_trip.py``),
and they are split into train and dev by passage.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llama_index_d2llm.trainer.corpus import Passage
from llama_index_d2llm.trainer.queries import HEADING_PREFIX, Query

_MARKDOWN_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$")


def heading_of(passage: Passage) -> str | None:
    """The title of a BEIR passage, or the first Markdown heading of a document chunk."""
    if passage.title:
        return _usable(passage.title)
    for line in passage.text.splitlines():
        match = _MARKDOWN_HEADING.match(line)
        if match:
            return _usable(match.group(1))
    return None


def _usable(text: str) -> str | None:
    """The heading as a query: no emphasis marks, no argument lists of a code signature
    (``argparse.Action(option_strings, ...) (class)`` -> ``argparse.Action (class)``)."""
    text = re.sub(r"\([^()]*\)(?=\s*\(|$)", "", text) if "(" in text else text
    text = re.sub(r"\s+", " ", text).strip().strip("*_`").strip()
    return text if re.search(r"[^\W\d_]{2,}", text) else None


def heading_queries(passages: Sequence[Passage]) -> list[Query]:
    """One query per passage that has a title or heading; a heading shared by several
    passages (chunks of one section) makes one query with all of them as positives."""
    by_text: dict[str, Query] = {}
    for passage in passages:
        heading = heading_of(passage)
        if heading is None:
            continue
        key = heading.casefold()
        if key in by_text:
            by_text[key].positives.append(passage.id)
        else:
            by_text[key] = Query(f"{HEADING_PREFIX}{passage.id}", heading, [passage.id])
    return list(by_text.values())
