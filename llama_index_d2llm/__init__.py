"""D2LLM for LlamaIndex and Qdrant.

Heavy imports (torch, transformers, llama-index) happen on first use of a name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "D2LLMStudent": "llama_index_d2llm.student",
    "D2LLMConfig": "llama_index_d2llm.student",
    "LoraSettings": "llama_index_d2llm.student",
    "CheckpointError": "llama_index_d2llm.student",
    "StudentMismatchError": "llama_index_d2llm.student",
    "DeviceError": "llama_index_d2llm.student",
    "D2LLMEmbedding": "llama_index_d2llm.embedding",
    "D2LLMRerank": "llama_index_d2llm.postprocessor",
    "D2LLMRetriever": "llama_index_d2llm.retriever",
    "D2LLMVectorStore": "llama_index_d2llm.store",
    "BM25Encoder": "llama_index_d2llm.sparse",
}

__all__ = [
    "BM25Encoder",
    "CheckpointError",
    "D2LLMConfig",
    "D2LLMEmbedding",
    "D2LLMRerank",
    "D2LLMRetriever",
    "D2LLMStudent",
    "D2LLMVectorStore",
    "DeviceError",
    "LoraSettings",
    "StudentMismatchError",
]

if TYPE_CHECKING:  # pragma: no cover
    from llama_index_d2llm.embedding import D2LLMEmbedding
    from llama_index_d2llm.postprocessor import D2LLMRerank
    from llama_index_d2llm.retriever import D2LLMRetriever
    from llama_index_d2llm.sparse import BM25Encoder
    from llama_index_d2llm.store import D2LLMVectorStore
    from llama_index_d2llm.student import (
        CheckpointError,
        D2LLMConfig,
        D2LLMStudent,
        DeviceError,
        LoraSettings,
        StudentMismatchError,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llama_index_d2llm' has no attribute {name!r}")
