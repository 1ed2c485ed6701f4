"""Random-weight model folders of the real shapes, for timing on the GPU machine (no weights
travel: speed does not depend on their values).

    python build_models.py JSON_OUT NAME=SHAPE_DIR:OUT_DIR:{causal|encoder}[:complete] ...

Each SHAPE_DIR holds config.json and tokenizer files (``*.xz`` are decompressed), never
weights. The model is built from the config in bf16 (on the GPU when there is one: seconds
instead of a minute) and saved with ``save_pretrained`` beside the tokenizer, so that the
project loads it like the real model. ``complete`` writes the marker of a finished offline
default-model folder. ``D2LLM_SHRINK_LAYERS=N`` keeps N layers (the CPU smoke run only).
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch


def copy_shape(src: Path, dst: Path) -> None:
    """The shape folder's files into ``dst``, ``.xz`` ones decompressed."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(src)
        target = dst / (rel.with_suffix("") if path.suffix == ".xz" else rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".xz":
            with lzma.open(path) as f_in, open(target, "wb") as f_out:
                shutil.copyfileobj(f_in, f_out)
        else:
            shutil.copy2(path, target)


def build(src: Path, dst: Path, kind: str) -> dict:
    """One random-weight model of ``src``'s config, saved in ``dst``; what was built."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    copy_shape(src, dst)
    config = AutoConfig.from_pretrained(str(dst))
    shrink = os.environ.get("D2LLM_SHRINK_LAYERS")
    if shrink:
        config.num_hidden_layers = int(shrink)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:int(shrink)]
    cls = AutoModelForCausalLM if kind == "causal" else AutoModel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(dst), safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tokenizer = AutoTokenizer.from_pretrained(str(dst))
    probe = tokenizer("Passage: a protein in the cell")["input_ids"]
    return {"dir": str(dst), "kind": kind, "class": cls.__name__,
            "model_type": config.model_type, "params": params,
            "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "vocab": len(tokenizer), "probe_tokens": len(probe),
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str]) -> int:
    report, built, failed = Path(argv[0]), {}, False
    for spec in argv[1:]:
        name, rest = spec.split("=", 1)
        src, dst, kind, *flags = rest.split(":")
        if kind not in ("causal", "encoder"):
            raise SystemExit(f"kind must be causal or encoder, got {kind!r}")
        try:
            built[name] = build(Path(src), Path(dst), kind)
            if "complete" in flags:
                (Path(dst) / ".complete").write_text("ok\n")
        except Exception as exc:  # report it, build the others
            traceback.print_exc()
            built[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            failed = True
        print(name, json.dumps(built[name]), flush=True)
    report.write_text(json.dumps(built, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
