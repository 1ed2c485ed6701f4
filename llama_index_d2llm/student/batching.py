"""Batch sizes from the device's free memory and the sequence length, and length buckets.

A fixed batch of 8 or 16 left a GPU about 98% idle (issue 25: the teacher ran at 2-3% of an
H200's bf16 rate): on CUDA a batch is sized from ``torch.cuda.mem_get_info`` and the longest
sequence in it, up to a token budget; on the CPU, where a larger batch buys nothing, the
fixed sizes stay, so CPU results and timings do not change. Sequences are sorted by length
(longest first, so that an out-of-memory error comes at once) and batched so that they pad
little; callers put results back in input order by the indices each batch carries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: Share of the free memory one batch's activations may take (the rest: the allocator's
#: fragmentation, the LM head's logit chunks, other work on the card).
MEMORY_FRACTION = 0.4
#: Most tokens in one batch on CUDA: past this a larger batch adds no speed on an H100/H200
#: for models of a few hundred million parameters, only latency per batch.
MAX_BATCH_TOKENS = 131_072
#: Most sequences in one batch on CUDA.
MAX_BATCH_SIZE = 512


def activation_bytes_per_token(hidden_size: int, intermediate_size: int | None = None,
                               dtype_bytes: int = 2) -> int:
    """A bound on the live activation bytes per token of one transformer block in inference
    (residual, q/k/v/o, the MLP's expansion, their temporaries), with a 2x margin."""
    intermediate = intermediate_size or 4 * hidden_size
    return 2 * dtype_bytes * (8 * hidden_size + 3 * intermediate)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device, None elsewhere (the CPU's batches are fixed)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def auto_batch_size(device: torch.device | str, seq_len: int, *, bytes_per_token: int,
                    cpu_size: int, free_bytes: int | None = None,
                    max_size: int = MAX_BATCH_SIZE, max_tokens: int = MAX_BATCH_TOKENS) -> int:
    """Sequences of ``seq_len`` tokens per batch: ``cpu_size`` on the CPU; on CUDA as many as
    a share of the free memory holds, within ``max_size`` sequences and ``max_tokens`` tokens,
    and at least one."""
    device = torch.device(device)
    if free_bytes is None:
        free_bytes = free_memory(device)
    if free_bytes is None:
        return cpu_size
    seq_len = max(1, seq_len)
    by_memory = int(free_bytes * MEMORY_FRACTION) // (bytes_per_token * seq_len)
    return max(1, min(max_size, max_tokens // seq_len, by_memory))


def length_batches(lengths: Sequence[int], size_for: int | Callable[[int], int]) -> list[list[int]]:
    """Indices of ``lengths`` in batches, longest first; ``size_for`` is a fixed batch size
    or a function of a batch's longest length (its padded width) giving its size."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        size = size_for if isinstance(size_for, int) else size_for(lengths[order[start]])
        size = max(1, int(size))
        batches.append(order[start:start + size])
        start += size
    return batches


def in_input_order(batches: Sequence[Sequence[int]], results: Sequence[torch.Tensor]
                   ) -> torch.Tensor:
    """The rows of per-batch ``results`` put back in input order (batch i holds the inputs
    at ``batches[i]``)."""
    if not results:
        return torch.empty(0)
    index = torch.tensor([i for batch in batches for i in batch], dtype=torch.long)
    rows = torch.cat(list(results))
    out = torch.empty_like(rows)
    out[index.to(rows.device)] = rows
    return out
