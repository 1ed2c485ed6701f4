"""The teacher's LM head read only where a score needs it: two rows for yes/no, the query
tokens' rows and the log-softmax normaliser for query likelihood. All on the model's device,
vectorised over the batch (no per-pair Python, one copy to the host per batch)."""

from __future__ import annotations

import torch

#: Positions x vocabulary per log-softmax chunk (128 MiB fp32).
_VOCAB_CHUNK_ELEMENTS = 1 << 25
#: Vocabulary rows per slice of the log-softmax normaliser on a CPU: a slice of logits that
#: stays in cache, combined by logaddexp, instead of all 262k of a position at once.
_CPU_VOCAB_SLICE = 4096


class LMHead:
    """The output projection of a causal LM (weight, bias, Gemma's final-logit softcap)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 softcap: float | None):
        self.weight = weight
        self.bias = bias
        self.softcap = softcap

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, states: torch.Tensor, rows: torch.Tensor | slice | None = None
               ) -> torch.Tensor:
        """Logits of ``states`` for the vocabulary ``rows`` only (all when None)."""
        weight = self.weight if rows is None else self.weight[rows]
        logits = states @ weight.T
        if self.bias is not None:
            logits = logits + (self.bias if rows is None else self.bias[rows])
        return self._cap(logits)

    def log_normaliser(self, states: torch.Tensor) -> torch.Tensor:
        """The log-softmax normaliser (logsumexp of the logits over the vocabulary) at each of
        ``states``: a third of the query likelihood's time with a 262k vocabulary.

        Positions go in chunks that bound the memory. On a CPU each chunk's vocabulary goes in
        slices whose logits stay in cache, combined by logaddexp (the same value): writing and
        re-reading all 262k float logits of a position cost more than computing them.
        """
        vocab = self.weight.shape[0]
        rows = _CPU_VOCAB_SLICE if self.weight.device.type == "cpu" else vocab
        chunk = max(1, _VOCAB_CHUNK_ELEMENTS // min(rows, vocab))
        normalisers = []
        for start in range(0, states.shape[0], chunk):
            part = states[start:start + chunk]
            total = None
            for first in range(0, vocab, rows):
                slice_lse = torch.logsumexp(self.logits(part, slice(first, first + rows)), dim=-1)
                total = slice_lse if total is None else torch.logaddexp(total, slice_lse)
            normalisers.append(total)
        return torch.cat(normalisers)

    def yesno(self, hidden: torch.Tensor, lengths: torch.Tensor, yes_id: int, no_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(yes - no logits, last states) of right-padded ``hidden`` (B, W, H), on the CPU."""
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        rows = torch.tensor([yes_id, no_id], device=hidden.device)
        pair = self.logits(last, rows)
        return (pair[:, 0] - pair[:, 1]).float().cpu(), last.float().cpu()

    def query_likelihood(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                         starts: torch.Tensor, ends: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean log P(query tokens | prompt), mean query state) per row of right-padded
        ``hidden`` (B, W, H), where row b's query is ``input_ids[b, starts[b]:ends[b]]``."""
        width = hidden.shape[1]
        pos = torch.arange(width, device=hidden.device)[None, :]
        in_query = (pos >= starts[:, None]) & (pos < ends[:, None])
        counts = in_query.sum(1)
        features = (hidden.float() * in_query[..., None]).sum(1) / counts[:, None]
        # the state at p-1 predicts token p: states at [start-1, end-1), targets one further
        predicts = (pos >= starts[:, None] - 1) & (pos < ends[:, None] - 1)
        states = hidden[predicts]
        targets = input_ids[:, 1:][predicts[:, :-1]]
        owners = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(counts)
        # logit of the right token, from its own row of the head: (M,)
        target_logits = (states * self.weight[targets]).sum(-1)
        if self.bias is not None:
            target_logits = target_logits + self.bias[targets]
        token_logprobs = self._cap(target_logits) - self.log_normaliser(states)
        totals = torch.zeros(hidden.shape[0], device=hidden.device).index_add_(
            0, owners, token_logprobs)
        return (totals / counts.float()).cpu(), features.cpu()
