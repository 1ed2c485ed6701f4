"""Reading a folder of documents: which files a reader handles, and each file's documents."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from examples.chatbot.errors import ChatbotError
from llama_index_d2llm.text_blocks import text_blocks

# Plain-text formats read as they are; the rest go through llama-index-readers-file.
TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".markdown", ".rst", ".py", ".json", ".jsonl", ".html", ".htm", ".xml",
    ".yaml", ".yml", ".toml", ".ini", ".cfg", ".tex", ".org", ".adoc", ".js", ".ts", ".c",
    ".h", ".cpp", ".hpp", ".java", ".go", ".rs", ".sh", ".sql", ".log", ".css",
})
READER_SUFFIXES = frozenset({".pdf", ".docx", ".pptx", ".epub", ".ipynb", ".csv", ".mbox"})
# Metadata the splitter and reader add; none of it is passage text for the student.
HIDDEN_FROM_LLM = ("file_path", "file_name", "file_type", "file_size", "creation_date",
                    "last_modified_date", "last_accessed_date", "file_sha256", "page_label")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def looks_like_text(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(8192)
        head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return b"\0" not in head


def scan_folder(docs: Path) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """Files a reader handles, by path relative to ``docs``; and the skipped ones with why."""
    docs = Path(docs).expanduser()
    if not docs.exists():
        raise ChatbotError(f"the documents folder {docs} does not exist: pass --docs with a "
                           "folder of your documents (.txt, .md, .pdf, .docx, ...)")
    if not docs.is_dir():
        raise ChatbotError(f"--docs {docs} is a file, not a folder: put it in a folder and pass "
                           "the folder")
    if not os.access(docs, os.R_OK | os.X_OK):
        raise ChatbotError(f"the documents folder {docs} is not readable by this user: fix its "
                           "permissions (chmod u+rx) or copy the documents elsewhere")
    usable: dict[str, Path] = {}
    skipped: list[tuple[str, str]] = []
    for path in sorted(docs.rglob("*")):
        relative = path.relative_to(docs).as_posix()
        if any(part.startswith(".") for part in path.relative_to(docs).parts):
            continue  # hidden files and folders (.git, editor swap files)
        if not path.is_file():
            continue
        suffix = path.suffix.lower()
        if not os.access(path, os.R_OK):
            skipped.append((relative, "not readable by this user (check its permissions)"))
        elif suffix in TEXT_SUFFIXES or suffix in READER_SUFFIXES or looks_like_text(path):
            usable[relative] = path
        else:
            skipped.append((relative, f"no reader handles {suffix or 'binary files'} "
                                      "(convert it to text, Markdown, PDF or DOCX)"))
    if not usable:
        found = f" (found only: {', '.join(r for r, _ in skipped[:5])})" if skipped else ""
        raise ChatbotError(f"no documents to index in {docs}{found}: add .txt, .md, .pdf, .docx "
                           "or other text files to it")
    return usable, skipped


def load_file(path: Path, relative: str, sha256: str) -> list[Any]:
    """The file's documents (a PDF gives one per page), with stable ids and our metadata."""
    from llama_index.core import SimpleDirectoryReader
    from llama_index.core.readers.file.base import default_file_metadata_func

    # No extractors of our own: SimpleDirectoryReader picks its reader for PDF, DOCX...
    # and reads every other suffix as UTF-8 text.
    documents = SimpleDirectoryReader.load_file(
        path, default_file_metadata_func, {}, filename_as_id=False,
        encoding="utf-8", errors="replace", raise_on_error=True)
    documents = [piece for document in documents for piece in _in_blocks(document, relative)]
    for number, document in enumerate(documents):
        document.id_ = f"{relative}#{number}"
        document.metadata.update({"source": relative, "file_sha256": sha256})
        document.excluded_llm_metadata_keys = list(HIDDEN_FROM_LLM)
        # The student was distilled on passage text alone: embed exactly that.
        document.excluded_embed_metadata_keys = sorted(set(document.metadata) | {"source"})
    return [d for d in documents if d.text and d.text.strip()]


#: A Markdown heading line; its text names the section below it.
HEADING = re.compile(r"^#{1,6}\s+(.*\S)\s*$", re.M)


def section_at(text: str, start: int | None, passage: str) -> str:
    """The heading a passage sits under: the last one of ``text`` before its ``start`` (its
    own first line included), or the first in the passage; "" when there is none."""
    first_line = passage.lstrip().split("\n", 1)[0]
    before = text[:start] if start is not None else ""
    headings = HEADING.findall(before + "\n" + first_line) or HEADING.findall(passage)[:1]
    return headings[-1] if headings else ""


def _in_blocks(document: Any, relative: str) -> list[Any]:
    """A long document as several, each short enough for the sentence splitter (see
    ``llama_index_d2llm.text_blocks``); a short one as it is."""
    from llama_index.core import Document

    blocks = list(text_blocks(document.text or "", relative))
    if len(blocks) == 1:
        return [document]
    return [Document(text=block, metadata=dict(document.metadata)) for block in blocks]
