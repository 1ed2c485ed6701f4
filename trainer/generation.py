"""Text generation with the teacher's LM: how ``queries.generate_queries`` writes queries for
passages that have none (one line of new text is one query).

Prompts arrive as token ids (the teacher encodes and cuts them); they are left-padded so that
every prompt ends at the last column, and generation stops at the first newline after some
text. Sampling is seeded without disturbing the caller's random state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def generate_continuations(model: Any, tokenizer: Any, prompts: Sequence[list[int]],
                           max_new_tokens: int, *, device: torch.device,
                           do_sample: bool = False, temperature: float = 0.8,
                           top_p: float = 0.95, seed: int | None = None,
                           stop_at_newline: bool = True) -> list[str]:
    """The new text after each prompt (token ids), one batch, greedy unless sampling."""
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):  # left padding: every prompt ends at the last column
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    stopping = StoppingCriteriaList([NewlineStop(tokenizer, width)] if stop_at_newline else [])
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0
                    ) if do_sample else dict(do_sample=False, temperature=None, top_p=None,
                                             top_k=None)
    with seeded(seed, device), torch.inference_mode():
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens, pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id, stopping_criteria=stopping, **sampling,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in output.cpu()]


class NewlineStop(StoppingCriteria):
    """Stops a row once its new text has a newline after some non-space text."""

    def __init__(self, tokenizer: Any, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = [
            "\n" in self.tokenizer.decode(row[self.prompt_width:], skip_special_tokens=True
                                          ).lstrip()
            for row in input_ids.cpu()
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch for sampling without disturbing the caller's random state."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
