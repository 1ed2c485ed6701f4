"""The backbone's own pooling (mean or first token), and reading which one a model was trained
with.

A retrieval-pretrained encoder (all-MiniLM-L6-v2, bge, e5) already ranks well with the pooling
it was trained with; a PMA initialised at random does not. So the student's pooled vector is

    v = base_pool(H) + g * PMA(H)          g a learned scalar, 0 at initialisation

(``PMAPooling(base_pooling=...)``): before any training the student's vectors are exactly the
encoder's own (after the same L2 normalisation), and distillation moves away from that known
point only as far as the losses ask. ``None`` gives the paper's PMA alone.

sentence-transformers model folders say how they pool (``modules.json`` and the Pooling
module's ``config.json``); ``declared_pooling`` reads that, without importing the library.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Poolings a student can start from: the mean of the token states (padding left out), or
#: the first token's state (BERT's [CLS], as bge pools).
BASE_POOLINGS = ("mean", "cls")


def check_base_pooling(mode: str | None) -> str | None:
    if mode is not None and mode not in BASE_POOLINGS:
        raise ValueError(f"base_pooling must be one of {BASE_POOLINGS} or None (PMA alone), "
                         f"got {mode!r}")
    return mode


def base_pool(token_states: torch.Tensor, attention_mask: torch.Tensor, mode: str
              ) -> torch.Tensor:
    """``(batch, tokens, hidden)`` -> ``(batch, hidden)`` by ``mode`` (``BASE_POOLINGS``)."""
    if mode == "cls":
        return token_states[:, 0]
    if mode == "mean":
        mask = attention_mask.to(token_states.dtype).unsqueeze(-1)
        return (token_states * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    raise ValueError(f"unknown pooling {mode!r}: one of {BASE_POOLINGS}")


def declared_pooling(model_dir: str | Path) -> str | None:
    """The pooling a sentence-transformers folder declares (``"mean"``/``"cls"``), else None.

    A folder without ``modules.json`` (a plain Hugging Face model, a causal LM) declares
    nothing; a Pooling module set to anything but plain mean or CLS (max, mean-sqrt-len,
    last token) is not one a student can start from, so it declares nothing either.
    """
    folder = Path(model_dir)
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    for module in modules if isinstance(modules, list) else []:
        if not str(module.get("type", "")).endswith("Pooling"):
            continue
        try:
            settings = json.loads((folder / str(module.get("path", "")) / "config.json")
                                  .read_text())
        except (OSError, ValueError):
            return None
        modes = {name for name, on in settings.items()
                 if name.startswith("pooling_mode_") and on is True}
        if modes == {"pooling_mode_mean_tokens"}:
            return "mean"
        if modes == {"pooling_mode_cls_token"}:
            return "cls"
        logger.info("%s pools with %s, which a student cannot start from: PMA alone", folder,
                    sorted(modes))
        return None
    return None


def declared_prompts(model_dir: str | Path) -> tuple[str, str]:
    """(query prompt, passage prompt) a sentence-transformers folder declares in
    ``config_sentence_transformers.json`` (``prompts``), ``("", "")`` when it declares none:
    such a model was trained on the bare texts."""
    try:
        settings = json.loads((Path(model_dir) / "config_sentence_transformers.json")
                              .read_text())
    except (OSError, ValueError):
        return "", ""
    prompts = settings.get("prompts") if isinstance(settings, dict) else None
    if not isinstance(prompts, dict):
        return "", ""
    passage = next((prompts[k] for k in ("passage", "document", "corpus") if k in prompts), "")
    return str(prompts.get("query", "")), str(passage)
