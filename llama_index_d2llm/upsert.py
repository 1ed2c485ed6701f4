"""Re-running an ingestion replaces its points instead of adding copies.

Why: LlamaIndex gives every node a random id, and ``SimpleDirectoryReader`` every document
one, so the README's snippet run three times stored 21 points for 7 documents and returned
three copies of one passage. A ``D2LLMVectorStore`` therefore writes each node under an id
derived from where it comes from (its file, else its document id) and its text, so writing it
again overwrites it (a node without a document keeps the id it was given); and before
writing a file's nodes it deletes that file's points from an earlier ingestion (another
document id), so an edited file leaves no stale passages. Nodes of the same ingestion keep
each other (they share the document id), also across batches.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from llama_index.core.schema import BaseNode, MetadataMode, NodeRelationship, RelatedNodeInfo

#: Payload key of the node's source (its file path, else its document id).
SOURCE_KEY = "d2llm_source"
_NAMESPACE = uuid.UUID("6f1c2b9e-3f57-4a43-9d5e-2d0a1b7c9e11")
_FILE_KEYS = ("file_path", "file_name")


def source_of(node: BaseNode) -> str:
    """Where a node comes from: its file when a reader recorded one, else its document, else
    itself (a node written without a document keeps the id it was given)."""
    for key in _FILE_KEYS:
        value = node.metadata.get(key)
        if isinstance(value, str) and value:
            return f"file:{value}"
    return f"doc:{node.ref_doc_id}" if node.ref_doc_id else f"node:{node.node_id}"


def assign_stable_ids(nodes: Sequence[BaseNode]) -> None:
    """Give the nodes of a document ids from (source, text, occurrence), and point their
    links to them. A node without a document (written as the user built it, with the id the
    user gave it) keeps its id."""
    seen: Counter[tuple[str, str]] = Counter()
    renamed: dict[str, str] = {}
    for node in nodes:
        if not node.ref_doc_id:
            continue
        text = node.get_content(metadata_mode=MetadataMode.NONE)
        key = (source_of(node), text)
        seen[key] += 1
        new_id = str(uuid.uuid5(_NAMESPACE, f"{key[0]}\0{text}\0{seen[key]}"))
        renamed[node.node_id] = new_id
        node.id_ = new_id
    for node in nodes:
        for kind, related in list(node.relationships.items()):
            if kind == NodeRelationship.SOURCE:
                continue
            node.relationships[kind] = _renamed(related, renamed)


def _renamed(related: Any, renamed: dict[str, str]) -> Any:
    if isinstance(related, list):
        return [_renamed(r, renamed) for r in related]
    if isinstance(related, RelatedNodeInfo) and related.node_id in renamed:
        return related.model_copy(update={"node_id": renamed[related.node_id]})
    return related


def stale_filter(nodes: Sequence[BaseNode]) -> Any | None:
    """Points of these nodes' files written by an earlier ingestion (another document id),
    as a ``models.Filter``; ``None`` when the nodes name no file."""
    from qdrant_client import models

    pairs = {(source_of(n), n.ref_doc_id) for n in nodes if source_of(n).startswith("file:")}
    if not pairs:
        return None
    should = [models.Filter(
        must=[models.FieldCondition(key=SOURCE_KEY, match=models.MatchValue(value=source))],
        must_not=[models.FieldCondition(key="doc_id", match=models.MatchValue(value=doc))]
        if doc else None) for source, doc in sorted(pairs, key=str)]
    return models.Filter(should=should)
