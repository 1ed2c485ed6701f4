"""Configuration of a D2LLM student, as a dataclass that round-trips to JSON (like peft's)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_index_d2llm.student.errors import CheckpointError
from llama_index_d2llm.student.fusion import check_fusion
from llama_index_d2llm.student.pooling import check_base_pooling
from llama_index_d2llm.student.settings import from_known_keys
from llama_index_d2llm.student.tasks import TASKS  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

#: Version of the on-disk layout; a directory written with another version is refused.
FORMAT_VERSION = 1
CONFIG_NAME = "d2llm_config.json"
HEADS_NAME = "heads.safetensors"
ADAPTER_DIR = "adapter"
MERGED_BACKBONE_DIR = "backbone"


@dataclass
class LoraSettings:
    """LoRA on the backbone (the released D2LLM code: r=8, alpha=8, dropout 0.05).

    ``layers``: indices of the transformer blocks that get LoRA (``None``: all of them).
    Tuning only the top blocks lets the CPU trainer cache the frozen lower ones.
    """

    r: int = 8
    alpha: int = 8
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    layers: list[int] | None = None

    @property
    def first_tuned_layer(self) -> int:
        """The lowest block LoRA touches (0 when it touches all)."""
        return min(self.layers) if self.layers else 0


@dataclass
class D2LLMConfig:
    """Everything needed to rebuild a student except its weights.

    ``backbone`` is a Hugging Face id or a local directory (relative paths are resolved
    against the student directory), or ``None`` for the offline default Gemma 3 270M.
    ``backbone_layers`` keeps only that many of its first transformer layers (``None``: all).
    """

    backbone: str | None = None
    backbone_layers: int | None = None
    hidden_size: int = 0
    pma_heads: int = 32
    #: The backbone's own pooling the student starts from, ``base_pool + gate * PMA``
    #: ("mean", "cls"; ``pooling.py``); ``None``: PMA alone (the paper; students before it).
    base_pooling: str | None = None
    pma_ffn_size: int | None = None
    iem_hidden_size: int = 512
    iem_cosine_skip: bool = True
    max_query_length: int = 64
    max_passage_length: int = 256
    query_instruction: str = "Query: "
    passage_instruction: str = "Passage: "
    normalize: bool = True
    #: How each first stage ("dense", "hybrid") is rescored: weights of BM25 and the IEM beside
    #: the cosine, chosen on dev by the distiller (student/fusion.py); ``None`` keeps the first
    #: stage's order, a stage missing here gets ``fusion.default_fusion``.
    fusion: dict[str, Any] = field(default_factory=dict)
    lora: LoraSettings | None = field(default_factory=LoraSettings)
    trust_remote_code: bool = False
    fingerprint: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if not (self.lora is None or isinstance(self.lora, LoraSettings)):
            raise ValueError(f"lora must be null or an object of LoRA settings, got {self.lora!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be an object, got {self.extra!r}")
        if self.backbone_layers is not None and self.backbone_layers < 1:
            raise ValueError("backbone_layers must be a positive number of layers or None")
        if self.max_query_length < 1 or self.max_passage_length < 1:
            raise ValueError("max_query_length and max_passage_length must be positive")
        check_base_pooling(self.base_pooling)
        self.fusion = check_fusion(self.fusion)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_NAME) -> D2LLMConfig:
        """The config in ``data``, read from ``source`` (named in the errors)."""
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: student written with format version {version!r}, this "
                f"llama-index-d2llm reads version {FORMAT_VERSION}: install the matching package "
                "version or re-export the student with `d2llm-rag distill`"
            )
        data = dict(data)
        # written before the IEM had its cosine skip: the head is the paper's bare MLP
        data.setdefault("iem_cosine_skip", False)
        if "iem_weights" in data:  # rank-blend weights of students distilled before the fusion
            data.pop("iem_weights")
            logger.warning("this student records rank-blend weights of an older version; it "
                           "is rescored with the default fusion (student/fusion.py) until "
                           "distilled again")
        try:
            return from_known_keys(cls, data, lambda unknown, _: CheckpointError(
                f"unknown fields in {source}: {unknown}"))
        except (TypeError, ValueError) as exc:  # a value of the wrong type or out of range
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{source} holds an invalid setting ({exc}): it was edited "
                                  "or is corrupt; restore the student directory or distill "
                                  "it again") from exc

    @classmethod
    def from_json_file(cls, path: str | Path) -> D2LLMConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not readable JSON ({exc}); the student "
                                  "directory is corrupt: save or distill it again") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} does not hold a JSON object")
        return cls.from_dict(data, source=str(path))
