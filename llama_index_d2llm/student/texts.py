"""Checks on the texts a student embeds: clear errors where tokenizers fail obscurely."""

from __future__ import annotations

from collections.abc import Sequence


def check_texts(texts: Sequence[str]) -> None:
    """Every text a non-empty, valid Unicode string; the error names it by its position."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(
                f"text {i} is empty: empty texts have no meaning to embed; drop them first"
            )
        check_unicode(text, f"text {i}")


def check_unicode(text: str, what: str) -> None:
    """Refuse lone surrogates (e.g. from ``json`` escapes): tokenizers fail on them obscurely."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} is not valid Unicode: it holds a lone surrogate "
            f"{text[exc.start]!r} at position {exc.start} (half of a UTF-16 pair): repair the "
            "text, e.g. decode its source with errors='replace'"
        ) from None
