"""A student directory on disk: what it holds, the fingerprint naming its weights, and the
checks that a directory read or written is one.

A directory holds ``d2llm_config.json``, ``heads.safetensors`` and, for a LoRA student, the
peft ``adapter/`` (or the merged ``backbone/``). The fingerprint hashes the weights and the
settings that shape the vectors, so a store can tell which student wrote its vectors, and
an edited or corrupt directory is refused on load instead of giving other vectors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from llama_index_d2llm.student.backbone import DEFAULT_BACKBONE_NAME, resolve_backbone
from llama_index_d2llm.student.config import (
    ADAPTER_DIR,
    CONFIG_NAME,
    HEADS_NAME,
    MERGED_BACKBONE_DIR,
    D2LLMConfig,
)
from llama_index_d2llm.student.errors import CheckpointError, UnsafeDirectoryError
from llama_index_d2llm.student.files import refuse_foreign

#: What a student directory holds; anything else in one is a user's, and never dropped.
STUDENT_FILES = (CONFIG_NAME, HEADS_NAME, ADAPTER_DIR, MERGED_BACKBONE_DIR)
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: ``extra`` key of configs whose fingerprint also covers the settings that shape the vectors
#: (lengths, PMA heads, LoRA): absent from students saved before, whose fingerprints stay valid.
FINGERPRINT_VERSION_KEY = "fingerprint_version"


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> hashlib._Hash:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest


def compute_fingerprint(config: D2LLMConfig, heads: dict[str, torch.Tensor],
                        adapter: dict[str, torch.Tensor] | None) -> str:
    """A short hash naming exactly these weights (backbone reference, heads, LoRA adapter)."""
    digest = _tensor_digest(heads)
    if adapter:
        digest.update(_tensor_digest(adapter).digest())
    identity = [config.backbone or DEFAULT_BACKBONE_NAME, config.hidden_size,
                config.query_instruction, config.passage_instruction, config.normalize]
    if config.backbone_layers is not None:  # absent from older fingerprints: keep them valid
        identity.append(("backbone_layers", config.backbone_layers))
    if config.base_pooling is not None:  # the same
        identity.append(("base_pooling", config.base_pooling))
    if config.extra.get(FINGERPRINT_VERSION_KEY, 1) >= 2:
        lora = config.lora
        identity.append(("settings", config.max_query_length, config.max_passage_length,
                         config.pma_heads, config.pma_ffn_size, config.iem_hidden_size,
                         config.iem_cosine_skip,
                         None if lora is None else (lora.r, lora.alpha, lora.target_modules,
                                                    lora.layers)))
    digest.update(repr(identity).encode())
    return digest.hexdigest()[:16]


def check_fingerprint(config: D2LLMConfig, computed: str, directory: Path) -> None:
    """The weights and settings in ``directory`` are the ones its config's fingerprint names.

    Every student this package saves records its fingerprint, so a config without one (the
    key removed, or null) was edited: it is refused like a mismatch, never trusted.
    """
    fix = "the files are corrupt or were edited; restore them or distill the student again"
    if config.fingerprint is None:
        raise CheckpointError(
            f"{CONFIG_NAME} in {str(directory)!r} records no fingerprint, so its weights and "
            f"settings cannot be checked (every student saved by llama-index-d2llm has one): "
            f"{fix}"
        )
    if computed != config.fingerprint:
        raise CheckpointError(
            f"the weights or settings in {str(directory)!r} do not match the fingerprint "
            f"recorded in {CONFIG_NAME} ({computed} != {config.fingerprint}): {fix}"
        )


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise CheckpointError(
            f"{str(path)!r} is missing: the student directory is incomplete; copy it whole or "
            "distill it again"
        )
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({exc}): the student directory "
            "is corrupt; restore it or distill it again"
        ) from exc


def check_student_target(directory: Path, known: Sequence[str]) -> None:
    """``directory`` may be written: new, empty, or a student holding only ``known`` entries.

    Saving replaces the directory whole, so anything else in it (a user's folder, notes kept
    beside a student) would be deleted: refuse instead, saying what is there.
    """
    if not directory.exists():
        return
    if not directory.is_dir():
        raise UnsafeDirectoryError(f"{str(directory)!r} is a file, not a directory: save the "
                                   "student to a new directory")
    if any(directory.iterdir()) and not (directory / CONFIG_NAME).exists():
        raise UnsafeDirectoryError(
            f"{str(directory)!r} exists and is not a D2LLM student (no {CONFIG_NAME}); it would "
            "be replaced, deleting what is in it: choose a new directory"
        )
    refuse_foreign(directory, known, "the student directory",
                   "move them elsewhere or choose another directory")


def student_backbone(config: D2LLMConfig, directory: Path) -> str:
    """The backbone a saved student refers to; a missing local folder is named as such."""
    try:
        return resolve_backbone(config.backbone, base_dir=directory)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{exc}; it is the `backbone` of {str(directory / CONFIG_NAME)!r}:"
                              " point it at the model the student was distilled from") from exc


def check_adapter_config(adapter_dir: Path, config: D2LLMConfig) -> None:
    """The adapter's settings (not covered by the tensors' hash) agree with the student's."""
    path = adapter_dir / ADAPTER_CONFIG_NAME
    fix = "restore the student directory whole, or distill the student again"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(path)!r} is missing, so the LoRA adapter cannot be "
                              f"applied: {fix}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not readable JSON ({exc}): {fix}") from exc
    if not isinstance(settings, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a JSON object: {fix}")
    lora = config.lora
    expected = {"peft_type": "LORA", "r": lora.r, "lora_alpha": lora.alpha}
    wrong = {key: settings.get(key) for key, value in expected.items()
             if settings.get(key) != value}
    if wrong:
        raise CheckpointError(
            f"{str(path)!r} says {wrong}, but the student was saved with "
            f"{ {key: expected[key] for key in wrong} } ({CONFIG_NAME}): the adapter settings "
            f"were edited and would change the vectors; {fix}"
        )
