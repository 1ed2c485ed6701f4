"""Cached hidden states of a frozen backbone: the CPU path of distillation.

On two CPU cores one LoRA training step of Gemma 3 270M over 16 x 128 tokens takes seconds,
so an epoch over a few thousand (query, passage) lists takes hours. With the backbone frozen,
its token states are a fixed function of each text: they are computed once per distinct text
under ``inference_mode`` and stored, and only PMA and the IEM are trained on them, in
milliseconds per step.

With a ``depth``, the cache holds the residual stream entering block ``depth`` instead: the
blocks below are frozen and cached, the blocks from ``depth`` up carry LoRA and run (forward
and backward) on the cached states at each step. Tuning the top 2 of 13 blocks costs 0.12x
of full LoRA per step (benchmarks/bench_training.py) and still adapts the backbone, not only
the pooling.

States are stored per text (real tokens only, no padding) in safetensors shards, bf16 when
computed in bf16, else fp16 where the values fit (fp32 otherwise), keyed by a hash of the
backbone's weights, the text kind, its instruction and length limit, and the text: a
changed backbone or setting is a miss, never a stale hit. With a depth, only the weights
below it are hashed: LoRA above it (trained or merged) does not change the cached states, so
evaluation reuses what training computed.
Shards are written to a temporary name and renamed, every few hundred texts, so an
interrupted run keeps what it computed. Reads go through memory-mapped ``safe_open`` handles:
the OS page cache keeps hot states in RAM without copying the whole cache onto the heap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.student.body import decoder_layers, layer_slice
from llama_index_d2llm.student.files import atomic_write_bytes
from llama_index_d2llm.student.modes import eval_mode

logger = logging.getLogger(__name__)

FORMAT = "d2llm-token-states-v1"
_FP16_LIMIT = 6.0e4


def backbone_identity(student: D2LLMStudent, depth: int | None = None) -> str:
    """A hash of the weights that make the states (all, or those below ``depth``), the dtype
    and the student's text settings."""
    digest = hashlib.sha256()
    body = student.body if depth is None else layer_slice(student.body, 0, depth, False)
    if depth is not None:
        digest.update(f"depth={depth}".encode())
    for name, tensor in sorted(body.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                      .numpy().tobytes())
    digest.update(repr((str(student.backbone_dtype), student.config.hidden_size)).encode())
    return digest.hexdigest()[:24]


class TokenStateCache:
    """Backbone token states per (text, kind), computed once, stored in safetensors shards."""

    def __init__(self, student: D2LLMStudent, directory: str | os.PathLike, *,
                 depth: int | None = None, batch_size: int = 16, shard_texts: int = 256,
                 show_progress: bool = True):
        self.student = student
        self.depth = depth
        self._lower = self._upper = None
        if depth is not None:  # the whole body's states need no knowledge of its blocks
            blocks = len(decoder_layers(student.body))
            if not 0 < depth < blocks:
                raise ValueError(f"token-state depth {depth} must be between 1 and {blocks - 1} "
                                 f"(the backbone has {blocks} blocks)")
            self._lower = layer_slice(student.body, 0, depth, False)
            self._upper = layer_slice(student.body, depth, blocks, True)
        self.identity = backbone_identity(student, depth)
        self.directory = Path(directory) / self.identity
        self.batch_size = batch_size
        self.shard_texts = shard_texts
        self.show_progress = show_progress
        self._handles: dict[str, Any] = {}
        self._index: dict[str, str] = {}
        self._scan()

    # ------------------------------------------------------------------ keys and index
    def key(self, text: str, kind: str) -> str:
        config = self.student.config
        instruction = config.query_instruction if kind == "query" else config.passage_instruction
        payload = "\x1f".join([FORMAT, self.identity, kind, instruction,
                               str(self.student.max_length(kind)), text])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]

    def _scan(self) -> None:
        from safetensors import safe_open

        if not self.directory.is_dir():
            return
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            if shard.name in self._handles:
                continue
            try:
                handle = safe_open(str(shard), framework="pt")
                if (handle.metadata() or {}).get("format") != FORMAT:
                    raise ValueError("unknown format")
            except Exception as exc:  # a damaged shard costs a recomputation, not the run
                logger.warning("ignoring unreadable token-state shard %s (%s)", shard, exc)
                continue
            self._handles[shard.name] = handle
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                self._index[key] = shard.name

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, item: tuple[str, str]) -> bool:
        text, kind = item
        return self.key(text, kind) in self._index

    # ------------------------------------------------------------------ computing
    def ensure(self, texts: Iterable[str], kind: str) -> int:
        """Compute and store the states of the texts not cached yet; returns how many."""
        self._scan()  # shards another process (or an earlier run) wrote since
        missing = list(dict.fromkeys(t for t in texts if self.key(t, kind) not in self._index))
        if not missing:
            return 0
        student = self.student
        order = sorted(missing, key=len, reverse=True)
        progress = None
        if self.show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(order), desc=f"caching backbone states ({kind}s)",
                            unit="text")
        pending: dict[str, torch.Tensor] = {}
        try:
            with eval_mode(student.backbone), torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start:start + self.batch_size]
                    batch = student.tokenize(chunk, kind)
                    if self._lower is None:
                        states = student.token_states(batch["input_ids"],
                                                      batch["attention_mask"])
                    else:
                        states = self._lower(**batch).last_hidden_state
                    mask = batch["attention_mask"].bool()
                    for row, text in enumerate(chunk):
                        pending[self.key(text, kind)] = _compact(states[row][mask[row]])
                    if len(pending) >= self.shard_texts:
                        self._write(pending)
                        pending = {}
                    if progress is not None:
                        progress.update(len(chunk))
            if pending:
                self._write(pending)
        finally:
            if progress is not None:
                progress.close()
        return len(missing)

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors import safe_open
        from safetensors.torch import save

        name = f"shard-{uuid.uuid4().hex}.safetensors"
        atomic_write_bytes(self.directory / name, save(tensors, metadata={"format": FORMAT}))
        handle = safe_open(str(self.directory / name), framework="pt")
        self._handles[name] = handle
        for key in tensors:
            self._index[key] = name

    # ------------------------------------------------------------------ reading
    def vectors(self, texts: Sequence[str], kind: str) -> torch.Tensor:
        """The student's vectors for cached texts: PMA over the cached states, or, with a
        depth, over the tuned top blocks run on them (with gradients when enabled)."""
        states, mask = self.batch(texts, kind)
        if self._upper is not None:
            states = self._upper(inputs_embeds=states.to(self.student.backbone_dtype),
                                 attention_mask=mask).last_hidden_state
        return self.student.pool(states, mask)

    def states(self, text: str, kind: str) -> torch.Tensor:
        """``(tokens, hidden)`` float32 states of one cached text."""
        key = self.key(text, kind)
        if key not in self._index:
            raise KeyError(f"no cached states for this {kind} text; call ensure() first: "
                           f"{text[:60]!r}")
        return self._handles[self._index[key]].get_tensor(key).float()

    def batch(self, texts: Sequence[str], kind: str,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(B, T, hidden)`` states and their ``(B, T)`` attention mask."""
        rows = [self.states(text, kind) for text in texts]
        longest = max(row.shape[0] for row in rows)
        hidden = rows[0].shape[1]
        states = torch.zeros(len(rows), longest, hidden)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, row in enumerate(rows):
            states[i, :row.shape[0]] = row
            mask[i, :row.shape[0]] = 1
        device = device or self.student.device
        return states.to(device), mask.to(device)


def _compact(states: torch.Tensor) -> torch.Tensor:
    """bf16 states stay bf16 (lossless); others fp16 when every value fits (half the disk and
    page cache), else fp32."""
    if states.dtype == torch.bfloat16:
        return states.detach().cpu().contiguous()
    states = states.detach().float().cpu().contiguous()
    if states.numel() and states.abs().max().item() < _FP16_LIMIT:
        return states.half()
    return states
