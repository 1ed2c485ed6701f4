"""The optimizer, its learning-rate schedule and the accelerator of a distillation."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from llama_index_d2llm.trainer.config import DistillConfig


def make_optimizer(trainable: Iterable[tuple[str, nn.Parameter]], *, lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and scalars (the released recipe)."""
    decay, no_decay = [], []
    for name, param in trainable:
        (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def make_accelerator(config: DistillConfig) -> Any:
    """One code path for CPU, one GPU and ``accelerate launch`` on several."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = config.device is not None and str(config.device).startswith("cpu")
    reset_accelerate_state_for(cpu)
    # a batch of only asymmetric examples leaves the symmetric IEM branch without gradient
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)


def reset_accelerate_state_for(cpu: bool) -> bool:
    """Forget Accelerate's process-wide state when this run wants another device than the
    last one in this process (a notebook or a test session that trains on CUDA, then on the
    CPU): Accelerate refuses the change ("AcceleratorState has already been initialized"), or,
    from the CPU to CUDA, silently keeps the CPU. Launched multi-process runs are left alone.
    Returns whether the state was reset."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if not PartialState._shared_state:
        return False
    state = PartialState()
    if state.num_processes > 1:
        return False
    wanted = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    if state.device.type == wanted:
        return False
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return True


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def warmup_schedule(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the full learning rate, then constant (the released schedule)."""
    return lambda step: min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps else 1.0
