"""The chatbot assembled from the command-line options, shared by the terminal and web front
ends, the quickstart and the tests.

The pieces, one module each: ``store.py`` opens Qdrant, ``documents.py`` reads a folder,
``ingest.py`` keeps the collection in step with it, ``chat.py`` answers. This module loads the
student, opens the store, ingests and builds the ``Chatbot``; the names of the pieces stay
importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from examples.chatbot.chat import (
    DEFAULT_CONTEXT_PROMPT,
    Chatbot,
    Conversation,
    Reply,
    Source,
    sources_from_nodes,
)
from examples.chatbot.documents import (
    READER_SUFFIXES,
    TEXT_SUFFIXES,
    load_file,
    scan_folder,
)
from examples.chatbot.errors import ChatbotError
from examples.chatbot.ingest import (
    MANIFEST_VERSION,
    DocumentIndex,
    FileRecord,
    IngestReport,
    Manifest,
)
from examples.chatbot.store import (
    DEFAULT_COLLECTION,
    StoreLocation,
    open_store,
)

if TYPE_CHECKING:  # pragma: no cover
    from llama_index_d2llm import D2LLMEmbedding

__all__ = [
    "DEFAULT_COLLECTION",
    "DEFAULT_CONTEXT_PROMPT",
    "DEFAULT_STATE_DIR",
    "MANIFEST_VERSION",
    "READER_SUFFIXES",
    "TEXT_SUFFIXES",
    "Chatbot",
    "ChatbotError",
    "ChatbotOptions",
    "Conversation",
    "DocumentIndex",
    "FileRecord",
    "IngestReport",
    "Manifest",
    "Reply",
    "Source",
    "StoreLocation",
    "build_chatbot",
    "load_embedding",
    "load_file",
    "open_index",
    "open_store",
    "scan_folder",
    "sources_from_nodes",
]

DEFAULT_STATE_DIR = Path("runs/chatbot")  # runs/ is git-ignored in this repository


@dataclass
class ChatbotOptions:
    """Everything the front ends take from the command line."""

    docs: Path
    student: Path
    llm: str = "hf"
    answer: str = "auto"  # answer.ANSWER_MODES
    condense: str = "auto"  # condense.CONDENSE_MODES
    qdrant_path: Path | None = None
    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    collection: str = DEFAULT_COLLECTION
    state_dir: Path = DEFAULT_STATE_DIR
    similarity_top_k: int = 50
    top_n: int = 4
    max_new_tokens: int = 256
    rebuild: bool = False
    device: str | None = None
    show_progress: bool = True

    def location(self) -> StoreLocation:
        path = None if self.qdrant_url else Path(self.qdrant_path or self.state_dir / "qdrant")
        return StoreLocation(path=path, url=self.qdrant_url, collection=self.collection,
                             api_key=self.qdrant_api_key)


def load_embedding(student_dir: Path, device: str | None = None) -> D2LLMEmbedding:
    from llama_index_d2llm import D2LLMEmbedding

    student_dir = Path(student_dir).expanduser()
    if not student_dir.exists():
        raise ChatbotError(
            f"no student at {student_dir}: distil one on your documents first "
            f"(d2llm-rag distill --corpus DOCS --output {student_dir}) or run "
            "examples/quickstart.py, then pass its directory to --student"
        )
    return D2LLMEmbedding(model_name=str(student_dir), device=device)


def open_index(options: ChatbotOptions, embed: D2LLMEmbedding | None = None
               ) -> tuple[DocumentIndex, IngestReport]:
    """Open the store, then ingest (or reuse) the documents. Closes the client on failure."""
    embed = embed or load_embedding(options.student, options.device)
    location = options.location()
    client = open_store(location)
    try:
        index = DocumentIndex(client, location, embed, location.manifest_path(options.state_dir))
        report = index.ingest(options.docs, rebuild=options.rebuild,
                              show_progress=options.show_progress)
    except BaseException:
        client.close()
        raise
    return index, report


def build_chatbot(options: ChatbotOptions, *, llm: Any = None, embed: D2LLMEmbedding | None = None
                  ) -> tuple[Chatbot, IngestReport]:
    """Student + store + ingestion + LLM -> a chatbot (the LLM loads last: it is the slowest;
    not at all when the offline base model would not be used)."""
    from examples.chatbot.answer import llm_for
    from examples.chatbot.llm import LLMSpecError, llm_from_spec

    def load() -> Any:
        try:
            return llm_from_spec(options.llm, max_new_tokens=options.max_new_tokens)
        except LLMSpecError as exc:
            raise ChatbotError(str(exc)) from None

    index, report = open_index(options, embed)
    try:
        if llm is None:
            llm = llm_for(options.llm, options.answer, options.condense, load)
        chatbot = Chatbot(index, llm, similarity_top_k=options.similarity_top_k,
                          top_n=options.top_n, answer=options.answer,
                          condense=options.condense, llm_spec=options.llm)
    except BaseException:
        index.close()
        raise
    return chatbot, report
