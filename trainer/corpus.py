"""Stage 1: documents -> passages.

Two sources: a folder of documents (read by LlamaIndex's ``SimpleDirectoryReader`` and cut by
its ``SentenceSplitter`` into passages no longer than the student reads), or a BEIR corpus
(``corpus.jsonl`` with ``_id``, ``title``, ``text``), whose ids the relevance judgements name.
Passage ids are stable across runs (relative path + chunk number), because the caches of later
stages (negatives, teacher scores) and the vector store refer to them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_index_d2llm.student.errors import D2LLMError
from llama_index_d2llm.text_blocks import text_blocks

logger = logging.getLogger(__name__)

BEIR_CORPUS_NAME = "corpus.jsonl"
# Readers LlamaIndex has for these need models or media tools and give no passage text.
_MEDIA_SUFFIXES = frozenset({".gif", ".jpg", ".jpeg", ".png", ".webp", ".mp3", ".mp4"})
_SNIFF_BYTES = 8192


class CorpusError(D2LLMError, ValueError):
    """The corpus cannot be read or is unusable; the message says what to change."""


@dataclass(frozen=True)
class Passage:
    """One unit of retrieval: what is embedded, stored and returned. ``title``: the title a
    BEIR document has (the first line of its text), for heading queries."""

    id: str
    text: str
    title: str | None = field(default=None, compare=False)


def load_corpus(path: str | Path, *, max_tokens: int | None = None, tokenizer: Any = None,
                chunk_overlap: int = 20, exclude: list[str] | None = None,
                show_progress: bool = False) -> list[Passage]:
    """Passages from a document folder or a BEIR corpus (``corpus.jsonl`` or a folder with one).

    Folders are read recursively (hidden files skipped, ``exclude`` globs honoured) and split
    into passages of at most ``max_tokens`` tokens as counted by ``tokenizer`` (a Hugging Face
    tokenizer or any ``str -> list`` callable; pass the student's so that passages fit its
    ``max_passage_length``; without one, words and punctuation are counted). With no
    ``max_tokens`` each document is one passage. BEIR passages are never split: the
    relevance judgements name whole documents.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CorpusError(
            f"corpus path {str(path)!r} does not exist: pass a folder of documents, a BEIR "
            f"{BEIR_CORPUS_NAME}, or a BEIR folder that contains one"
        )
    if path.is_file() and path.suffix == ".jsonl":
        passages = load_beir_corpus(path)
    elif path.is_dir() and (path / BEIR_CORPUS_NAME).is_file():
        passages = load_beir_corpus(path / BEIR_CORPUS_NAME)
    else:
        passages = _load_documents(path, max_tokens=max_tokens, tokenizer=tokenizer,
                                   chunk_overlap=chunk_overlap, exclude=exclude,
                                   show_progress=show_progress)
    if not passages:
        raise CorpusError(
            f"the corpus at {str(path)!r} has no passages (no file with text in it): add text "
            "documents (.txt, .md, .pdf, .docx, ...) or point at another folder"
        )
    _check_unique(passages, path)
    return passages


def load_beir_corpus(path: str | Path) -> list[Passage]:
    """One passage per line of a BEIR ``corpus.jsonl``: text is ``title\\ntext`` (title if any)."""
    path = Path(path)
    passages: list[Passage] = []
    skipped = 0
    for number, record in read_jsonl(path, CorpusError):
        doc_id = record.get("_id", record.get("id"))
        if doc_id is None:
            raise CorpusError(
                f"{path}:{number} has no '_id' field: each BEIR corpus line needs "
                '{"_id": ..., "title": ..., "text": ...}'
            )
        title = str(record.get("title") or "").strip()
        text = str(record.get("text") or "").strip()
        joined = f"{title}\n{text}" if title and text else title or text
        if not joined:
            skipped += 1
            continue
        passages.append(Passage(str(doc_id), joined, title if title and text else None))
    if skipped:
        logger.warning("%s: skipped %d documents with neither title nor text", path, skipped)
    return passages


def read_jsonl(path: Path, error: type[Exception]) -> Iterable[tuple[int, dict]]:
    """(line number, object) per non-blank line; a bad line is an error naming its number."""
    try:
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise error(
                        f"{path}:{number} is not valid JSON ({exc}): each line of a .jsonl file "
                        "must be one JSON object; fix or remove that line"
                    ) from exc
                if not isinstance(record, dict):
                    raise error(f"{path}:{number} is not a JSON object: write one object a line")
                yield number, record
    except (OSError, UnicodeDecodeError) as exc:
        raise error(
            f"cannot read {str(path)!r} ({exc}): check that it exists, is readable and is UTF-8"
        ) from exc


def token_counter(tokenizer: Any) -> Callable[[str], list]:
    """A ``str -> list of tokens`` callable for the splitter, from a tokenizer or a callable."""
    if tokenizer is None:
        return lambda text: re.findall(r"\w+|[^\w\s]", text)
    if hasattr(tokenizer, "encode"):
        def encode(text: str) -> list:
            try:  # Hugging Face tokenizers: count content tokens, not <bos>
                return tokenizer.encode(text, add_special_tokens=False)
            except TypeError:
                return tokenizer.encode(text)
        return encode
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer must be a tokenizer with .encode or a callable, got {tokenizer!r}")


def _load_documents(root: Path, *, max_tokens: int | None, tokenizer: Any, chunk_overlap: int,
                    exclude: list[str] | None, show_progress: bool) -> list[Passage]:
    from llama_index.core import SimpleDirectoryReader

    splitter = _splitter(max_tokens, tokenizer, chunk_overlap)
    # absolute, as the reader's file paths are: a relative folder ("./my_docs") would not
    # contain them
    root = Path(os.path.abspath(root))
    try:
        if root.is_dir():
            reader = SimpleDirectoryReader(input_dir=str(root), recursive=True, exclude=exclude,
                                           exclude_empty=True)
            base = root
        else:
            reader = SimpleDirectoryReader(input_files=[str(root)])
            base = root.parent
    except ValueError as exc:  # "No files found in ...", empty files left out
        raise CorpusError(f"{_no_files(root, exclude)}: add text files (.txt, .md, .pdf, ...) "
                          "or point at another folder") from exc
    files = sorted(reader.input_files, key=lambda f: Path(f).relative_to(base).as_posix())
    if show_progress:
        from tqdm.auto import tqdm

        files = tqdm(files, desc="reading documents", unit="file")
    passages: list[Passage] = []
    for file in files:
        relative = Path(file).relative_to(base).as_posix()
        chunks = _read_file(Path(file), relative, reader)
        if splitter is not None:  # a long text in blocks: the splitter takes any whole
            chunks = [chunk for text in chunks for block in text_blocks(text, str(file))
                      for chunk in splitter(block)]
        chunks = [chunk.strip() for chunk in chunks if chunk.strip()]
        passages.extend(Passage(f"{relative}#{number}", chunk)
                        for number, chunk in enumerate(chunks))
    return passages


def _no_files(root: Path, exclude: list[str] | None) -> str:
    """What the reader found under ``root`` when it took no file: nothing, or empty files."""
    if not root.is_dir():
        return f"no document in {str(root)!r}"
    visible = [path for path in root.rglob("*") if path.is_file()
               and not any(part.startswith(".") for part in path.relative_to(root).parts)]
    empty = sorted(path.relative_to(root).as_posix() for path in visible
                   if path.stat().st_size == 0)
    if visible and len(empty) == len(visible):
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        return f"the {len(empty)} files under {str(root)!r} are all empty ({shown})"
    excluded = f" outside --exclude {' '.join(exclude)}" if exclude else ""
    return f"no documents found under {str(root)!r}{excluded}"


def _read_file(file: Path, relative: str, reader: Any) -> list[str]:
    """The texts of one file (several for paged formats such as PDF)."""
    suffix = file.suffix.lower()
    every = f"*{suffix or file.name}"  # when no file of its kind can be read
    try:
        file.stat()
        head = b""
        if suffix not in _MEDIA_SUFFIXES and not _has_reader(reader, suffix):
            with file.open("rb") as handle:
                head = handle.read(_SNIFF_BYTES)
    except OSError as exc:
        raise CorpusError(f"cannot read {str(file)!r}: {_os_problem(file, exc)}; fix that, or "
                          f"{_leave_out(relative)}") from exc
    if suffix in _MEDIA_SUFFIXES:
        raise CorpusError(f"{str(file)!r}: no reader turns {suffix} files into text: "
                          f"{_leave_out(every)}")
    if b"\x00" in head:
        raise CorpusError(
            f"{str(file)!r} is a binary file and no reader handles {suffix or 'its'} files: "
            f"convert it to text or PDF, or {_leave_out(every)}"
        )
    try:
        documents = reader.load_file(file, file_metadata=None, file_extractor=reader.file_extractor,
                                     encoding="utf-8", errors="strict", raise_on_error=True)
    except ImportError as exc:
        raise CorpusError(f"reading {str(file)!r} needs an optional package ({exc}): install it, "
                          f"or {_leave_out(every)}") from exc
    except Exception as exc:  # readers raise anything; the cause is chained for the user
        cause = exc.__cause__ or exc
        if isinstance(cause, UnicodeDecodeError):
            raise CorpusError(
                f"{str(file)!r} is not UTF-8 text (byte {cause.object[cause.start]:#04x} at "
                f"position {cause.start}): convert it to UTF-8, or {_leave_out(relative)}"
            ) from exc
        raise CorpusError(
            f"cannot read {str(file)!r} ({type(cause).__name__}: {cause}): repair it, or "
            f"{_leave_out(relative)}"
        ) from exc
    return [document.text for document in documents if document.text.strip()]


def _has_reader(reader: Any, suffix: str) -> bool:
    return suffix in type(reader).supported_suffix_fn() or suffix in reader.file_extractor


def _leave_out(pattern: str) -> str:
    return (f"remove it or leave it out with exclude=['{pattern}'] (d2llm-rag distill: "
            f"--exclude '{pattern}')")


def _os_problem(file: Path, exc: OSError) -> str:
    """Why the system could not open ``file``, in words (not only "permission")."""
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link that loops back on itself"
    if exc.errno == errno.ENOENT and file.is_symlink():
        return f"it is a symbolic link to {os.readlink(file)!r}, which does not exist"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "this user may not read it (check its permissions)"
    return exc.strerror or str(exc)


def _splitter(max_tokens: int | None, tokenizer: Any, chunk_overlap: int
              ) -> Callable[[str], list[str]] | None:
    if max_tokens is None:
        return None
    if max_tokens < 8:
        raise CorpusError(f"max_tokens={max_tokens} is too small to hold a sentence: use the "
                          "student's max_passage_length (256 by default)")
    if not 0 <= chunk_overlap < max_tokens:
        raise CorpusError(f"chunk_overlap={chunk_overlap} must be >= 0 and smaller than "
                          f"max_tokens={max_tokens}: lower it (20 is a good default)")
    from llama_index.core.node_parser import SentenceSplitter

    splitter = SentenceSplitter(chunk_size=max_tokens, chunk_overlap=chunk_overlap,
                                tokenizer=token_counter(tokenizer))
    return splitter.split_text


def _check_unique(passages: list[Passage], path: Path) -> None:
    seen: set[str] = set()
    duplicates: list[str] = []
    for passage in passages:
        if passage.id in seen:
            duplicates.append(passage.id)
        seen.add(passage.id)
    if duplicates:
        shown = ", ".join(repr(d) for d in duplicates[:5])
        raise CorpusError(
            f"the corpus at {str(path)!r} has {len(duplicates)} duplicate passage ids ({shown}): "
            "every document needs its own id; remove or renumber the duplicates"
        )
