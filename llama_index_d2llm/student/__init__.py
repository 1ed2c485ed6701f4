"""The D2LLM student model: backbone, PMA pooling, IEM head, save/load."""

from llama_index_d2llm.student.config import D2LLMConfig, LoraSettings
from llama_index_d2llm.student.errors import (
    CheckpointError,
    D2LLMError,
    DeviceError,
    RemoteCodeError,
    StudentMismatchError,
    UnsafeDirectoryError,
)
from llama_index_d2llm.student.iem import InteractionEmulation
from llama_index_d2llm.student.model import D2LLMStudent
from llama_index_d2llm.student.pma import PMAPooling

__all__ = [
    "CheckpointError",
    "D2LLMConfig",
    "D2LLMError",
    "D2LLMStudent",
    "DeviceError",
    "InteractionEmulation",
    "LoraSettings",
    "PMAPooling",
    "RemoteCodeError",
    "StudentMismatchError",
    "UnsafeDirectoryError",
]
