"""The teacher's prompts as token ids: one pair's prompt cut to the length limit (the passage
gives way, never the instruction), and a batch of them padded into tensors on the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llama_index_d2llm.trainer.prompts import PairTemplate
from llama_index_d2llm.trainer.teacher_config import TeacherError


@dataclass
class EncodedPair:
    """One prompt's token ids and where its query lies (query likelihood scores
    ``ids[query_start:query_end]``)."""

    ids: list[int]
    query_start: int
    query_end: int
    truncated: bool


def encode_pair(template: PairTemplate, query: str, passage: str, *,
                encode_text: Callable[[str], list[int]], bos: list[int],
                max_length: int) -> EncodedPair:
    """Token ids of one prompt. Too long: the passage is cut, never the instruction."""
    parts = template.parts()
    pieces: list[list[int]] = []
    for part in parts:
        if part.kind == "text":
            pieces.append(encode_text(part.text))
        else:
            content = query if part.kind == "query" else passage
            pieces.append(encode_text(part.text + content))
    kinds = [part.kind for part in parts]
    excess = len(bos) + sum(map(len, pieces)) - max_length
    truncated = excess > 0
    if excess > 0:
        index = kinds.index("passage")
        cut = min(excess, len(pieces[index]))
        pieces[index] = pieces[index][:len(pieces[index]) - cut]
        excess -= cut
    if excess > 0:  # a query longer than the whole budget: keep its beginning
        index = kinds.index("query")
        keep = len(pieces[index]) - excess
        if keep < 1:
            fixed = len(bos) + sum(len(piece) for kind, piece
                                   in zip(kinds, pieces, strict=True) if kind == "text")
            raise TeacherError(
                f"max_length={max_length} cannot hold the teacher's prompt ({fixed} "
                "tokens without query and passage): raise max_length"
            )
        pieces[index] = pieces[index][:keep]
    ids = list(bos)
    start = end = 0
    for kind, piece in zip(kinds, pieces, strict=True):
        if kind == "query":
            start, end = len(ids), len(ids) + len(piece)
        ids.extend(piece)
    return EncodedPair(ids, start, end, truncated)


def pad_batch(batch: Sequence[EncodedPair], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, lengths) of a batch, right-padded (real tokens keep their
    positions), built on the host in one go and moved to ``device`` once."""
    rows = [torch.tensor(item.ids, dtype=torch.long) for item in batch]
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
    lengths = torch.tensor([len(item.ids) for item in batch], dtype=torch.long)
    mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
    move = dict(device=device, non_blocking=True)
    return input_ids.to(**move), mask.to(**move), lengths.to(**move)


def query_spans(batch: Sequence[EncodedPair], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(query_start, query_end) of each prompt as tensors on ``device``; a prompt without
    query tokens after some prompt text is an error (nothing to score)."""
    for item in batch:
        if item.query_start < 1 or item.query_end <= item.query_start:
            raise TeacherError("query likelihood needs query tokens after a prompt: check "
                               "the template and that the query is not empty")
    spans = torch.tensor([[item.query_start, item.query_end] for item in batch],
                         dtype=torch.long).to(device, non_blocking=True)
    return spans[:, 0], spans[:, 1]
