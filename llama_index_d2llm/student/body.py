"""The structure of a Hugging Face transformer body: its stack of blocks (keep the first N,
run a slice of them on cached states), the positions it has, and its key/value cache flag.

Decoders (Gemma, Llama, Qwen, GPT-2) and encoders (BERT, e5, bge, MPNet, DistilBERT) keep
their blocks under different names; everything here finds them by the known paths, so the
student and the trainer work on either.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

#: Where Hugging Face bodies keep their stack of transformer blocks: decoders (Llama, Gemma,
#: Qwen: ``layers``; GPT-2, Falcon: ``h``) and encoders (BERT, RoBERTa/XLM-R as in e5 and
#: bge, MPNet: ``encoder.layer``; DistilBERT: ``transformer.layer``).
_BLOCK_PATHS = ("layers", "h", "decoder.layers", "language_model.layers", "model.layers",
                "encoder.layer", "encoder.layers", "transformer.layer")
#: Block stacks whose positions are not added to ``inputs_embeds`` outside an ``embeddings``
#: module (rotary positions inside the blocks, or an encoder's embeddings module, which a
#: layer slice replaces): a slice of their blocks can run on cached hidden states.
_SLICEABLE_PATHS = ("layers", "encoder.layer", "encoder.layers", "transformer.layer")
_FINAL_NORMS = ("norm", "final_norm", "final_layer_norm")


def _blocks_path(body: torch.nn.Module) -> str:
    for path in _BLOCK_PATHS:
        module: Any = body
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, torch.nn.ModuleList):
            return path
    raise ValueError(f"cannot find the transformer blocks of {type(body).__name__} (looked at "
                     f"{', '.join(_BLOCK_PATHS)}): keeping or tuning only some blocks needs them; "
                     "use all blocks (no --backbone-layers) and no --tune-top-layers")


def decoder_layers(body: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a Hugging Face body, decoder or encoder."""
    module: Any = body
    for part in _blocks_path(body).split("."):
        module = getattr(module, part)
    return module


@functools.lru_cache(maxsize=32)
def _takes_use_cache(body_type: type) -> bool:
    import inspect

    return "use_cache" in inspect.signature(body_type.forward).parameters


def no_cache_kwargs(body: torch.nn.Module) -> dict[str, bool]:
    """``use_cache=False`` for bodies that take it (decoders, BERT), nothing for those that do
    not (DistilBERT, MPNet): encoding never generates, so a key/value cache is waste."""
    return {"use_cache": False} if _takes_use_cache(type(body)) else {}


def max_positions(model_config: Any, tokenizer: Any = None) -> int | None:
    """The longest input the body can take, in tokens (``None``: no known limit).

    Encoders with learned absolute positions (BERT: 512) fail with an index error past their
    table; decoders with rotary positions only degrade, but their trained context is still the
    limit. The tokenizer's ``model_max_length`` counts too: RoBERTa's table has 514 rows for
    512 tokens.
    """
    config = getattr(model_config, "text_config", None) or model_config
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 1_000_000:  # unset: a huge sentinel
        limits.append(limit)
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


def check_max_lengths(model_config: Any, tokenizer: Any, name: str, **limits: int) -> None:
    """Refuse text limits the body has no positions for (BERT's 512), naming the maximum."""
    most = max_positions(model_config, tokenizer)
    for kind, limit in limits.items():
        if most is not None and limit > most:
            raise ValueError(f"max_{kind}_length={limit} tokens, but the backbone {name} takes at "
                             f"most {most} positions: pass --max-{kind}-length {most} or less")


def truncate_layers(body: torch.nn.Module, keep: int | None) -> torch.nn.Module:
    """Keep the first ``keep`` transformer blocks and drop the rest, in place.

    A decoder's last layers are shaped for next-token prediction; an intermediate layer can
    be the better embedding and costs proportionally less to run (``benchmarks/probes/
    layer_probe.py`` measures which). The body's final norm still applies to the output.
    """
    if keep is None:
        return body
    layers = decoder_layers(body)
    if not 1 <= keep <= len(layers):
        raise ValueError(f"backbone_layers={keep}, but the backbone has {len(layers)} "
                         f"transformer layers: pick 1 to {len(layers)}, or None for all")
    if keep == len(layers):
        return body
    del layers[keep:]
    config = getattr(body.config, "text_config", None) or body.config
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:keep]
    return body


def layer_slice(body: torch.nn.Module, start: int, stop: int,
                final_norm: bool) -> torch.nn.Module:
    """A view of ``body`` that runs only blocks ``start:stop``, sharing their weights.

    Call it with ``inputs_embeds`` = the hidden states entering block ``start``: the view
    makes its own masks (causal for a decoder, bidirectional for an encoder) and positions,
    exactly as the whole body would; an encoder's ``embeddings`` module (positions, token
    types, a norm) is bypassed above block 0, as the states already went through it. With
    ``final_norm=False`` it returns the raw residual stream (what the next block takes).
    This is how the CPU trainer caches a frozen lower part once and trains only the top
    blocks (LoRA) on the cached states. A pooler head is dropped: only token states count.
    """
    import copy

    path = _blocks_path(body)
    layers = decoder_layers(body)
    if not 0 <= start < stop <= len(layers):
        raise ValueError(f"cannot slice blocks {start}:{stop} of {len(layers)}")
    if path not in _SLICEABLE_PATHS:
        raise ValueError(f"layer slices of {type(body).__name__} are not supported (its "
                         "positions are added outside the blocks), so its lower blocks cannot "
                         "be cached: use --tune-top-layers 0 or --no-frozen-backbone")
    parts = path.split(".")
    view = _module_view(body)
    parent = view
    for part in parts[:-1]:  # own copies down to the blocks' parent: the body is untouched
        child = _module_view(getattr(parent, part))
        setattr(parent, part, child)
        parent = child
    setattr(parent, parts[-1], torch.nn.ModuleList(list(layers[start:stop])))
    if not final_norm:
        for name in _FINAL_NORMS:
            if isinstance(getattr(body, name, None), torch.nn.Module):
                setattr(view, name, torch.nn.Identity())
    if start > 0 and isinstance(getattr(body, "embeddings", None), torch.nn.Module):
        view.embeddings = _PassThroughEmbeddings()
    if isinstance(getattr(body, "pooler", None), torch.nn.Module):
        view.pooler = None
    config = copy.deepcopy(getattr(body.config, "text_config", None) or body.config)
    config.num_hidden_layers = stop - start
    config.use_cache = False  # a key/value cache would be indexed by the blocks' own numbers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[start:stop]
    view.config = config
    return view


def _module_view(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy with its own module table: replacing a child leaves ``module`` as is."""
    import copy

    view = copy.copy(module)
    view._modules = dict(module._modules)
    return view


class _PassThroughEmbeddings(torch.nn.Module):
    """Stands in for an encoder's embeddings module: the given states already are embedded."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        for name in ("inputs_embeds", "input_embeds"):
            if kwargs.get(name) is not None:
                return kwargs[name]
        for arg in args:  # DistilBERT passes them positionally
            if isinstance(arg, torch.Tensor) and arg.is_floating_point():
                return arg
        raise ValueError("a layer slice above block 0 takes hidden states as inputs_embeds")
