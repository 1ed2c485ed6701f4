"""LoRA on the student's backbone (peft), on all its blocks or only the top ones."""

from __future__ import annotations

from torch import nn

from llama_index_d2llm.student.body import decoder_layers
from llama_index_d2llm.student.config import LoraSettings


def is_peft(module: nn.Module) -> bool:
    return hasattr(module, "peft_config")


def wrap_lora(body: nn.Module, lora: LoraSettings) -> nn.Module:
    """``body`` with a trainable peft LoRA adapter on the blocks ``lora`` names."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    if lora.layers is not None:
        # the linears of the chosen blocks, by full name (peft's layers_to_transform does not
        # find the blocks of a bare body, whose names have no prefix before "layers.")
        wanted = None if targets == "all-linear" else set(
            [targets] if isinstance(targets, str) else targets)
        blocks = decoder_layers(body)
        prefix = {id(block): name for name, block in body.named_modules()}
        targets = [f"{prefix[id(blocks[i])]}.{name}" for i in lora.layers
                   for name, module in blocks[i].named_modules()
                   if isinstance(module, nn.Linear)
                   and (wanted is None or name.rsplit(".", 1)[-1] in wanted)]
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=targets, bias="none")
    return get_peft_model(body, peft_config)
