"""The chatbot's core, shared by the terminal and web front ends, the quickstart and the tests.

Three steps:

1. ``open_store``: a Qdrant client, embedded on disk by default or a server by URL, with the
   two usual failures (a folder locked by another process, a server that does not answer)
   turned into one-line messages.
2. ``DocumentIndex.ingest``: a folder of documents into a Qdrant collection, embedded with
   the D2LLM student. A manifest of the ingested files (size, mtime, SHA-256, node ids)
   makes a second run re-embed only what changed; the student's fingerprint, recorded on
   the collection, makes sure a collection is never mixed or rescored by another student.
3. ``Chatbot.new_conversation`` -> ``Conversation.ask``: a LlamaIndex
   ``CondensePlusContextChatEngine`` whose retriever is ``D2LLMRetriever`` (hybrid search in
   Qdrant, then IEM rescoring); follow-ups are condensed with the history; the answer
   streams; the sources come with their IEM and first-stage scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index_d2llm.student.errors import D2LLMError, StudentMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import NodeWithScore, TextNode
    from qdrant_client import QdrantClient

    from llama_index_d2llm import D2LLMEmbedding

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
DEFAULT_STATE_DIR = Path("runs/chatbot")  # runs/ is git-ignored in this repository
DEFAULT_COLLECTION = "documents"
# Plain-text formats read as they are; the rest go through llama-index-readers-file.
TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".markdown", ".rst", ".py", ".json", ".jsonl", ".html", ".htm", ".xml",
    ".yaml", ".yml", ".toml", ".ini", ".cfg", ".tex", ".org", ".adoc", ".js", ".ts", ".c",
    ".h", ".cpp", ".hpp", ".java", ".go", ".rs", ".sh", ".sql", ".log", ".css",
})
READER_SUFFIXES = frozenset({".pdf", ".docx", ".pptx", ".epub", ".ipynb", ".csv", ".mbox"})
# Metadata the splitter and reader add; none of it is passage text for the student.
_HIDDEN_FROM_LLM = ("file_path", "file_name", "file_type", "file_size", "creation_date",
                    "last_modified_date", "last_accessed_date", "file_sha256", "page_label")
DEFAULT_CONTEXT_PROMPT = (
    "You answer questions about the user's documents. Use only the context below and name "
    "the source file of what you use. If the context does not answer the question, say that "
    "you do not know.\n\nContext:\n{context_str}\n"
)


class ChatbotError(D2LLMError):
    """A problem the user can fix; front ends print its message as one line, no traceback."""


# ============================================================================ Qdrant
@dataclass(frozen=True)
class StoreLocation:
    """Where the collection lives: an embedded folder (default) or a server URL."""

    path: Path | None = None
    url: str | None = None
    collection: str = DEFAULT_COLLECTION
    api_key: str | None = None

    def describe(self) -> str:
        where = self.url if self.url else str(self.path)
        return f"collection {self.collection!r} in Qdrant at {where}"

    def manifest_path(self, state_dir: Path) -> Path:
        """Manifests live beside the embedded store, or under the state dir for a server."""
        if self.url:
            server = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.url).strip("_")
            return Path(state_dir) / "manifests" / f"{server}__{self.collection}.json"
        return Path(self.path).parent / "manifests" / f"{self.collection}.json"


def processes_holding(lock_file: Path) -> list[str]:
    """``"PID (command)"`` of the processes with ``lock_file`` open (Linux /proc; else [])."""
    target = str(Path(lock_file).resolve())
    holders = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.name == str(os.getpid()):
                continue
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                holders.append(f"{proc.name} ({command[:80]})")
        except OSError:  # processes come and go, others' fds are private
            continue
    return holders


def open_store(location: StoreLocation, timeout: float = 10.0) -> QdrantClient:
    """A connected client, or a ``ChatbotError`` that says what to do."""
    from qdrant_client import QdrantClient

    if location.url:
        client = QdrantClient(url=location.url, api_key=location.api_key, timeout=int(timeout))
        try:
            client.get_collections()
        except Exception as exc:  # connection refused, DNS, TLS, auth: all say "not reachable"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ChatbotError(
                f"no Qdrant server answers at {location.url} ({reason}): start it (for example "
                "`docker run -p 6333:6333 qdrant/qdrant`), check the URL and --qdrant-api-key, "
                "or leave out --qdrant-url to use the embedded store on disk"
            ) from None
        return client
    path = Path(location.path).expanduser()
    # Said once per index creation, about indexes QdrantVectorStore asks for; harmless here.
    warnings.filterwarnings("ignore", message="Payload indexes have no effect in the local")
    try:
        path.mkdir(parents=True, exist_ok=True)
        return QdrantClient(path=str(path))
    except RuntimeError as exc:
        if "already accessed" not in str(exc):
            raise
        holders = processes_holding(path / ".lock")
        who = f"process {', '.join(holders)}" if holders else "another process"
        raise ChatbotError(
            f"the Qdrant folder {path} is in use by {who}: the embedded store allows one "
            "process at a time. Stop that process (another chatbot or quickstart), pass another "
            "--qdrant-path, or run a Qdrant server and pass --qdrant-url"
        ) from None
    except OSError as exc:
        raise ChatbotError(f"cannot open the Qdrant folder {path}: {exc.strerror or exc}; pass a "
                           "writable --qdrant-path") from None


# ============================================================================ documents
@dataclass
class FileRecord:
    """What the manifest remembers of one ingested file."""

    size: int
    mtime_ns: int
    sha256: str
    node_ids: list[str]


@dataclass
class Manifest:
    """Ingested files of one collection and the student that embedded them."""

    fingerprint: str
    files: dict[str, FileRecord] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            files = {k: FileRecord(**v) for k, v in data["files"].items()}
            return cls(fingerprint=data["fingerprint"], files=files, version=data["version"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring the unreadable manifest %s (%s); it is rebuilt from the "
                           "collection", path, exc)
            return None

    def save(self, path: Path) -> None:
        """Atomically: a temp file renamed into place, so a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(asdict(self), out, indent=1, sort_keys=True)
        os.replace(temp, path)

    @property
    def chunks(self) -> int:
        return sum(len(r.node_ids) for r in self.files.values())


@dataclass
class IngestReport:
    """What one ``ingest`` did; ``embedded_chunks == 0`` means the index was reused as is."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    embedded_chunks: int = 0
    total_chunks: int = 0

    def summary(self) -> str:
        parts = [f"{len(self.added)} new", f"{len(self.changed)} changed",
                 f"{len(self.removed)} removed", f"{len(self.unchanged)} unchanged"]
        text = (f"files: {', '.join(parts)}; embedded {self.embedded_chunks} chunks, "
                f"{self.total_chunks} in the index")
        if self.skipped:
            text += f"; skipped {len(self.skipped)}"
        return text


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _looks_like_text(path: Path) -> bool:
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
        elif suffix in TEXT_SUFFIXES or suffix in READER_SUFFIXES or _looks_like_text(path):
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
    for number, document in enumerate(documents):
        document.id_ = f"{relative}#{number}"
        document.metadata.update({"source": relative, "file_sha256": sha256})
        document.excluded_llm_metadata_keys = list(_HIDDEN_FROM_LLM)
        # The student was distilled on passage text alone: embed exactly that.
        document.excluded_embed_metadata_keys = sorted(set(document.metadata) | {"source"})
    return [d for d in documents if d.text and d.text.strip()]


# ============================================================================ index
class DocumentIndex:
    """A Qdrant collection of D2LLM passage vectors, kept in step with a folder of documents."""

    def __init__(self, client: QdrantClient, location: StoreLocation, embed: D2LLMEmbedding,
                 manifest_path: Path, *, chunk_tokens: int | None = None,
                 chunk_overlap: int = 32):
        self.client = client
        self.location = location
        self.embed = embed
        self.manifest_path = Path(manifest_path)
        self._open_collection()
        student = embed.student
        reserved = len(student.tokenize(["x"], "passage")["input_ids"][0])
        self.chunk_tokens = chunk_tokens or max(32, student.config.max_passage_length - reserved)
        self.chunk_overlap = min(chunk_overlap, self.chunk_tokens // 4)

    def _open_collection(self) -> None:
        # QdrantVectorStore remembers at construction whether the collection exists (it
        # creates it on the first insert), so it is built again after a rebuild drops it.
        from llama_index.core import VectorStoreIndex

        from llama_index_d2llm import D2LLMVectorStore

        # dense + BM25 vectors for a new collection (hybrid search); an older one as it is
        self.store = D2LLMVectorStore(self.location.collection, self.embed, client=self.client)
        self.index: VectorStoreIndex = VectorStoreIndex.from_vector_store(
            self.store, embed_model=self.embed)

    @property
    def fingerprint(self) -> str:
        return self.embed.fingerprint

    def exists(self) -> bool:
        return self.client.collection_exists(self.location.collection)

    def count(self) -> int:
        if not self.exists():
            return 0
        return int(self.client.count(self.location.collection, exact=True).count)

    # ------------------------------------------------------------------ ingestion
    def check_student(self) -> None:
        """Refuse a collection built by another student, before anything is written to it."""
        from llama_index_d2llm.qdrant import check_student

        if not self.exists():
            return
        try:
            check_student(self.store, self.embed.student)
        except StudentMismatchError as exc:
            raise ChatbotError(
                f"{exc}. Nothing was changed. Pass the student that built it, choose another "
                "--collection, or pass --rebuild to re-embed everything with this student"
            ) from None

    def rebuild(self) -> None:
        """Drop the collection and its manifest (only on request: the chatbot's --rebuild, or
        the quickstart re-embedding its own index after distilling a new student)."""
        if self.exists():
            self.client.delete_collection(self.location.collection)
        self.manifest_path.unlink(missing_ok=True)
        self._open_collection()

    def _manifest(self) -> Manifest:
        manifest = Manifest.load(self.manifest_path)
        if manifest is not None and manifest.fingerprint == self.fingerprint \
                and manifest.chunks == self.count():
            return manifest
        return self._manifest_from_collection()

    def _manifest_from_collection(self) -> Manifest:
        """Rebuild the manifest from the points' payloads (lost or stale manifest file)."""
        manifest = Manifest(fingerprint=self.fingerprint)
        if not self.exists():
            return manifest
        offset = None
        while True:
            points, offset = self.client.scroll(self.location.collection, limit=256,
                                                offset=offset, with_payload=True,
                                                with_vectors=False)
            for point in points:
                payload = point.payload or {}
                source, sha = payload.get("source"), payload.get("file_sha256")
                if source is None or sha is None:
                    raise ChatbotError(
                        f"{self.location.describe()} holds points that this chatbot did not "
                        "ingest (no source file recorded): choose another --collection, or "
                        "pass --rebuild to replace its content"
                    )
                record = manifest.files.setdefault(source, FileRecord(0, 0, sha, []))
                record.node_ids.append(str(point.id))
            if offset is None:
                break
        return manifest

    def ingest(self, docs: Path, *, rebuild: bool = False, show_progress: bool = True
               ) -> IngestReport:
        """Bring the collection in step with ``docs``: embed new and changed files only.

        Work is committed a batch of files at a time (new points first, then the old points
        of those files are deleted, then the manifest is saved), so an interruption loses at
        most the batch in flight and a rerun continues where it stopped.
        """
        usable, skipped = scan_folder(docs)
        if rebuild:
            self.rebuild()
        else:
            self.check_student()
        manifest = self._manifest()
        report = IngestReport(skipped=list(skipped))
        todo: list[tuple[str, Path, int, int]] = []
        for relative, path in usable.items():
            stat = path.stat()
            known = manifest.files.get(relative)
            if known and known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
                report.unchanged.append(relative)
            else:
                todo.append((relative, path, stat.st_size, stat.st_mtime_ns))
        # Gone from the folder; a file that is only unreadable now keeps its passages.
        report.removed = sorted(set(manifest.files) - set(usable) - {r for r, _ in skipped})
        if report.removed:
            self._delete([i for r in report.removed for i in manifest.files.pop(r).node_ids])
            manifest.save(self.manifest_path)
        batch: list[tuple[str, FileRecord, list[TextNode], bool]] = []
        pending_chunks = 0
        files = todo
        if show_progress and todo:
            from tqdm.auto import tqdm

            files = tqdm(todo, desc="indexing documents", unit="file")
        for relative, path, size, mtime_ns in files:
            sha = _sha256(path)
            known = manifest.files.get(relative)
            if known and known.sha256 == sha:  # touched, not changed: no re-embedding
                known.size, known.mtime_ns = size, mtime_ns
                report.unchanged.append(relative)
                continue
            try:
                nodes = self._split(load_file(path, relative, sha))
            except Exception as exc:  # a corrupt PDF, a missing optional reader package...
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                skipped_reason = f"could not be read ({type(exc).__name__}: {reason[:120]})"
                report.skipped.append((relative, skipped_reason))
                continue
            if not nodes:
                report.skipped.append((relative, "has no text"))
                continue
            batch.append((relative, FileRecord(size, mtime_ns, sha, [n.node_id for n in nodes]),
                          nodes, known is not None))
            pending_chunks += len(nodes)
            if pending_chunks >= 64:
                report.embedded_chunks += self._commit(batch, manifest, report)
                batch, pending_chunks = [], 0
        if batch:
            report.embedded_chunks += self._commit(batch, manifest, report)
        manifest.save(self.manifest_path)
        if report.embedded_chunks:
            from llama_index_d2llm.qdrant import record_student

            record_student(self.store, self.embed.student, overwrite=rebuild)
        report.total_chunks = manifest.chunks
        if report.total_chunks == 0:
            reasons = "; ".join(f"{r}: {why}" for r, why in report.skipped[:3])
            raise ChatbotError(f"nothing could be indexed from {docs} ({reasons}): add readable "
                               "text documents")
        return report

    def _split(self, documents: list[Any]) -> list[TextNode]:
        from llama_index.core.node_parser import SentenceSplitter

        tokenizer = self.embed.student.tokenizer
        splitter = SentenceSplitter(
            chunk_size=self.chunk_tokens, chunk_overlap=self.chunk_overlap,
            tokenizer=lambda text: tokenizer.encode(text, add_special_tokens=False))
        return splitter.get_nodes_from_documents(documents)

    def _commit(self, batch: list[tuple[str, FileRecord, list[TextNode], bool]],
                manifest: Manifest, report: IngestReport) -> int:
        nodes = [n for _, _, file_nodes, _ in batch for n in file_nodes]
        vectors = self.embed.get_text_embedding_batch(
            [n.get_content(metadata_mode="embed") for n in nodes])
        for node, vector in zip(nodes, vectors, strict=True):
            node.embedding = vector
        self.index.insert_nodes(nodes)  # embedded already: insert_nodes does not re-embed
        stale = [i for relative, _, _, _ in batch if relative in manifest.files
                 for i in manifest.files[relative].node_ids]
        self._delete(stale)
        for relative, record, _, was_known in batch:
            manifest.files[relative] = record
            (report.changed if was_known else report.added).append(relative)
        manifest.save(self.manifest_path)
        return len(nodes)

    def _delete(self, node_ids: list[str]) -> None:
        if node_ids and self.exists():
            self.store.delete_nodes(node_ids=node_ids)


# ============================================================================ chat
@dataclass(frozen=True)
class Source:
    """One passage behind an answer: D2LLM's rank and score, and the first stage's."""

    rank: int
    node_id: str
    source: str
    score: float  # IEM logit (D2LLM)
    retrieval_score: float | None  # first-stage cosine from Qdrant
    first_stage_rank: int | None  # rank by cosine among the passages shown
    text: str

    def snippet(self, width: int = 160) -> str:
        flat = " ".join(self.text.split())
        return flat if len(flat) <= width else flat[: width - 1] + "…"


def sources_from_nodes(nodes: list[NodeWithScore]) -> list[Source]:
    cosine = [n.node.metadata.get("retrieval_score") for n in nodes]
    by_cosine = sorted((i for i, c in enumerate(cosine) if c is not None),
                       key=lambda i: -cosine[i])
    first_rank = {i: r + 1 for r, i in enumerate(by_cosine)}
    return [Source(rank=i + 1, node_id=n.node.node_id,
                   source=str(n.node.metadata.get("source", n.node.node_id)),
                   score=float(n.score if n.score is not None else float("nan")),
                   retrieval_score=None if cosine[i] is None else float(cosine[i]),
                   first_stage_rank=first_rank.get(i), text=n.node.get_content())
            for i, n in enumerate(nodes)]


@dataclass
class Reply:
    """A streamed answer: iterate ``tokens`` (once); ``sources`` are known from the start."""

    question: str
    sources: list[Source]
    tokens: Iterator[str]
    text: str = ""

    def __iter__(self) -> Iterator[str]:
        for token in self.tokens:
            self.text += token
            yield token

    def read(self) -> str:
        """The whole answer (consumes the stream)."""
        for _ in self:
            pass
        return self.text


class Conversation:
    """One chat: a condense-plus-context engine over the D2LLM retriever, with its memory."""

    def __init__(self, engine: Any):
        self.engine = engine

    def ask(self, question: str) -> Reply:
        question = (question or "").strip()
        if not question:
            raise ChatbotError("the question is empty: type a question")
        try:
            response = self.engine.stream_chat(question)
        except D2LLMError as exc:  # StudentMismatchError and friends from the retriever
            raise ChatbotError(str(exc)) from None
        return Reply(question=question, sources=sources_from_nodes(response.source_nodes),
                     tokens=response.response_gen)

    def reset(self) -> None:
        self.engine.reset()

    @property
    def history(self) -> list[Any]:
        return list(self.engine.chat_history)


class Chatbot:
    """The index, the LLM and the retrieval settings; hands out conversations."""

    def __init__(self, index: DocumentIndex, llm: Any, *, similarity_top_k: int = 50,
                 top_n: int = 4, context_prompt: str = DEFAULT_CONTEXT_PROMPT,
                 system_prompt: str | None = None):
        if top_n > similarity_top_k:
            raise ChatbotError(f"--top-n {top_n} is larger than --top-k {similarity_top_k}: the "
                               "IEM reranks only the first-stage candidates; raise --top-k")
        self.documents = index
        self.llm = llm
        self.similarity_top_k = similarity_top_k
        self.top_n = top_n
        self.context_prompt = context_prompt
        self.system_prompt = system_prompt

    def retriever(self) -> Any:
        from llama_index_d2llm import D2LLMRetriever

        return D2LLMRetriever(index=self.documents.index, similarity_top_k=self.similarity_top_k,
                              top_n=self.top_n)

    def new_conversation(self) -> Conversation:
        from llama_index.core.chat_engine import CondensePlusContextChatEngine
        from llama_index.core.memory import ChatMemoryBuffer

        memory = ChatMemoryBuffer.from_defaults(
            token_limit=max(256, self.llm.metadata.context_window // 2))
        engine = CondensePlusContextChatEngine.from_defaults(
            retriever=self.retriever(), llm=self.llm, memory=memory,
            context_prompt=self.context_prompt, system_prompt=self.system_prompt)
        return Conversation(engine)

    def search(self, question: str) -> list[Source]:
        """D2LLM's ranking alone (first stage + IEM), without the LLM."""
        try:
            return sources_from_nodes(self.retriever().retrieve(question))
        except D2LLMError as exc:
            raise ChatbotError(str(exc)) from None

    def first_stage(self, question: str, n: int | None = None) -> list[Source]:
        """The cosine ranking of Qdrant alone, for comparison with D2LLM's."""
        retriever = self.documents.index.as_retriever(similarity_top_k=n or self.top_n)
        nodes = retriever.retrieve(question)
        for node in nodes:
            node.node.metadata["retrieval_score"] = node.score
        return sources_from_nodes(nodes)


# ============================================================================ assembly
@dataclass
class ChatbotOptions:
    """Everything the front ends take from the command line."""

    docs: Path
    student: Path
    llm: str = "hf"
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
    """Student + store + ingestion + LLM -> a chatbot (the LLM loads last: it is the slowest)."""
    from examples.chatbot.llm import LLMSpecError, llm_from_spec

    index, report = open_index(options, embed)
    try:
        if llm is None:
            try:
                llm = llm_from_spec(options.llm, max_new_tokens=options.max_new_tokens)
            except LLMSpecError as exc:
                raise ChatbotError(str(exc)) from None
        chatbot = Chatbot(index, llm, similarity_top_k=options.similarity_top_k,
                          top_n=options.top_n)
    except BaseException:
        index.client.close()
        raise
    return chatbot, report
