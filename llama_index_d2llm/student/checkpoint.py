"""Reading and writing a student directory: ``d2llm_config.json``, ``heads.safetensors`` and
the LoRA ``adapter/`` (or a merged ``backbone/``). Nothing is pickled.

Loading checks everything before a weight is used: the format version, the fingerprint over
the weights and the settings that shape the vectors (an edited file is refused), the adapter's
config, the backbone's width, and that remote code is turned on by the caller, never by the
directory. Writing goes to a temporary directory renamed into place, so an interrupted save
never leaves half a student.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from llama_index_d2llm.student.backbone import (
    load_body,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from llama_index_d2llm.student.body import truncate_layers
from llama_index_d2llm.student.config import (
    ADAPTER_DIR,
    CONFIG_NAME,
    HEADS_NAME,
    MERGED_BACKBONE_DIR,
    D2LLMConfig,
)
from llama_index_d2llm.student.errors import CheckpointError
from llama_index_d2llm.student.files import apply_default_modes, staged_directory
from llama_index_d2llm.student.lora import is_peft
from llama_index_d2llm.student.storage import (
    ADAPTER_CONFIG_NAME,
    STUDENT_FILES,
    check_adapter_config,
    check_fingerprint,
    check_student_target,
    compute_fingerprint,
    load_safetensors,
    student_backbone,
)

if TYPE_CHECKING:  # pragma: no cover
    from llama_index_d2llm.student.model import D2LLMStudent


def hidden_size(body: nn.Module) -> int:
    """The width of a Hugging Face body's states (multimodal configs keep it in text_config)."""
    config = body.config
    text_config = getattr(config, "text_config", None) or config
    return int(text_config.hidden_size)


def load_student(cls: type[D2LLMStudent], directory: str | os.PathLike, *,
                 device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = "auto", trainable: bool = False,
                 trust_remote_code: bool | None = None) -> D2LLMStudent:
    """``D2LLMStudent.from_pretrained``: see its docstring."""
    directory = Path(directory).expanduser()
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(
            f"no student directory at {str(directory)!r}: pass the --output directory of "
            "`d2llm-rag distill` (or train one: d2llm-rag distill --corpus DOCS --output DIR)"
        )
    if not config_path.exists():
        raise CheckpointError(
            f"{str(directory)!r} has no {CONFIG_NAME}, so it is not a D2LLM student (or its "
            "save was interrupted): distill or save it again"
        )
    config = D2LLMConfig.from_json_file(config_path)
    heads = load_safetensors(directory / HEADS_NAME)
    adapter_dir = directory / ADAPTER_DIR
    adapter = None
    if config.lora is not None:
        adapter = load_safetensors(adapter_dir / "adapter_model.safetensors")
    fingerprint = compute_fingerprint(config, heads, adapter)
    check_fingerprint(config, fingerprint, directory)
    path = student_backbone(config, directory)
    if config.trust_remote_code and trust_remote_code is not True:
        raise CheckpointError(
            f"the student in {str(directory)!r} asks to run Python code shipped with its "
            f"backbone {path!r} (trust_remote_code in {CONFIG_NAME}), which a student "
            "directory cannot turn on by itself: if you trust that code, load it with "
            "trust_remote_code=True (d2llm-rag: --trust-remote-code); otherwise do not "
            "use this student"
        )
    remote = bool(trust_remote_code)
    if adapter is not None:
        check_adapter_config(adapter_dir, config)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(path, remote)
    try:
        body = truncate_layers(load_body(path, dtype, remote), config.backbone_layers)
    except ValueError as exc:
        raise CheckpointError(f"{exc}: the student was distilled from another backbone "
                              f"than {path!r}") from exc
    if hidden_size(body) != config.hidden_size:
        raise CheckpointError(
            f"backbone {path!r} has hidden size {hidden_size(body)}, the student was trained "
            f"on one of {config.hidden_size}: point `backbone` in {CONFIG_NAME} at the model "
            "it was distilled from"
        )
    if adapter is not None:
        from peft import PeftModel

        try:
            body = PeftModel.from_pretrained(body, str(adapter_dir), is_trainable=trainable)
        except Exception as exc:  # peft and torch raise many kinds; the cause is chained
            raise CheckpointError(
                f"the LoRA adapter in {str(adapter_dir)!r} does not fit the backbone "
                f"{path!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): "
                f"{ADAPTER_CONFIG_NAME} was edited or belongs to another student; restore "
                "the directory or distill the student again"
            ) from exc
        if not trainable:
            body = body.merge_and_unload()
    student = cls(config, body, tokenizer, device, dtype)
    missing, unexpected = student.heads_module().load_state_dict(heads, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{HEADS_NAME} in {str(directory)!r} does not fit this student (missing "
            f"{missing}, unexpected {unexpected}): it was written by another version"
        )
    student._loaded_fingerprint = None if trainable else fingerprint
    student.train(trainable)
    return student


def save_student(student: D2LLMStudent, directory: str | os.PathLike,
                 merged: bool = False) -> Path:
    """``D2LLMStudent.save_pretrained``: see its docstring."""
    from safetensors.torch import save_file

    if student._loaded_fingerprint is not None and student.config.lora is not None \
            and not merged:
        raise CheckpointError(
            "this student's LoRA was merged into the backbone at load time, so the adapter "
            "cannot be saved on its own: load it with trainable=True, or save with merged=True"
        )
    directory = Path(directory).expanduser().resolve()
    check_student_target(directory, STUDENT_FILES)
    with staged_directory(directory) as work:
        config = copy.deepcopy(student.config)
        heads = {k: v.detach().float().cpu().contiguous()
                 for k, v in student.heads_module().state_dict().items()}
        save_file(heads, str(work / HEADS_NAME), metadata={"format": "pt"})
        if merged:
            body = student.backbone
            if is_peft(body):
                body = copy.deepcopy(body).merge_and_unload()
            body.save_pretrained(work / MERGED_BACKBONE_DIR, safe_serialization=True)
            student.tokenizer.save_pretrained(work / MERGED_BACKBONE_DIR)
            config.backbone = MERGED_BACKBONE_DIR
            config.lora = None
            adapter = None
        elif is_peft(student.backbone):
            student.backbone.save_pretrained(work / ADAPTER_DIR, safe_serialization=True)
            adapter = load_safetensors(work / ADAPTER_DIR / "adapter_model.safetensors")
        else:
            config.lora = None
            adapter = None
        config.fingerprint = compute_fingerprint(config, load_safetensors(work / HEADS_NAME),
                                                 adapter)
        config.to_json_file(work / CONFIG_NAME)
        apply_default_modes(work)
        check_student_target(directory, STUDENT_FILES)  # again: it may have changed since
    if not merged:
        student.config.fingerprint = config.fingerprint
    return directory
