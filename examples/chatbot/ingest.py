"""Incremental ingestion: a folder of documents kept in step with a Qdrant collection.

A manifest of the ingested files (size, mtime, SHA-256, node ids) makes a second run re-embed
only what changed; the student's fingerprint, recorded on the collection, makes sure a
collection is never mixed or rescored by another student.

Why a manifest of our own and not LlamaIndex's ``IngestionPipeline`` with a persisted
docstore: the pipeline hashes every document on every run (so it reads and parses every PDF
again, where a size and mtime check skips unchanged files), deletes a changed document's old
points *before* embedding the new ones (an interruption loses them; here new points are
written first), deletes the passages of a file that is only unreadable now (with
``UPSERTS_AND_DELETE``), says nothing of what it added, changed or removed, and cannot be
rebuilt from the collection when its docstore file is lost (here the manifest is rebuilt from
the points' payloads without re-embedding).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from examples.chatbot.documents import load_file, scan_folder, section_at, sha256_of
from examples.chatbot.errors import ChatbotError
from examples.chatbot.store import StoreLocation
from llama_index_d2llm.student.errors import StudentMismatchError

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode
    from qdrant_client import QdrantClient

    from llama_index_d2llm import D2LLMEmbedding

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


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
        from llama_index_d2llm.student.files import atomic_write_json

        atomic_write_json(path, asdict(self), sort_keys=True)

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

    def close(self) -> None:
        """Close the Qdrant client (an embedded store flushes and frees its folder)."""
        self.client.close()

    def __enter__(self) -> DocumentIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
            sha = sha256_of(path)
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
            self.store.optimize()  # the embedded store's HNSW index, built once per ingestion
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
        nodes = splitter.get_nodes_from_documents(documents)
        texts = {document.doc_id: document.text or "" for document in documents}
        for node in nodes:  # the section a passage sits under, shown with its file
            section = section_at(texts.get(node.ref_doc_id, ""), node.start_char_idx, node.text)
            if section:
                node.metadata["section"] = section  # for the sources list only: the text
                for keys in ("excluded_embed_metadata_keys", "excluded_llm_metadata_keys"):
                    setattr(node, keys, sorted({*getattr(node, keys), "section"}))
        return nodes

    def _commit(self, batch: list[tuple[str, FileRecord, list[TextNode], bool]],
                manifest: Manifest, report: IngestReport) -> int:
        from llama_index_d2llm.upsert import assign_stable_ids

        nodes = [n for _, _, file_nodes, _ in batch for n in file_nodes]
        # The ids the store writes them under (from file and text), so that the manifest
        # names the points: the index hands the store copies of these nodes.
        assign_stable_ids(nodes)
        vectors = self.embed.get_text_embedding_batch(
            [n.get_content(metadata_mode="embed") for n in nodes])
        for node, vector in zip(nodes, vectors, strict=True):
            node.embedding = vector
        self.index.insert_nodes(nodes)  # embedded already: insert_nodes does not re-embed
        # An unchanged passage of a changed file keeps its point (the same id).
        written = {n.node_id for n in nodes}
        stale = [i for relative, _, _, _ in batch if relative in manifest.files
                 for i in manifest.files[relative].node_ids if i not in written]
        self._delete(stale)
        for relative, record, file_nodes, was_known in batch:
            record.node_ids = [n.node_id for n in file_nodes]
            manifest.files[relative] = record
            (report.changed if was_known else report.added).append(relative)
        manifest.save(self.manifest_path)
        return len(nodes)

    def _delete(self, node_ids: list[str]) -> None:
        if node_ids and self.exists():
            self.store.delete_nodes(node_ids=node_ids)
