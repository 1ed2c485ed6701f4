"""The GPU check's results in one JSON, with each stage's tokens/s and its share of the
chip's bf16 rate: ``python collect.py WORK_DIR OUT_DIR``.

FLOPs are 2 per non-embedding weight per token for a forward (attention's own FLOPs left
out, so the shares are floors) and 6 for a training step's forward and backward through every
weight (an upper bound where LoRA or a frozen backbone skips weight gradients). The bf16 rate
is ``PEAK_TFLOPS`` (default 790: an 8192^3 bf16 matrix product measured on this workplace's
H200 and H100 machines, KINDS.md).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "790"))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"missing": f"{path.name}: {type(exc).__name__}"}


def rate(params: int | None, tokens_per_s: float | None, flops_per_weight: int = 2) -> dict:
    """Achieved TFLOP/s and its share of the bf16 peak."""
    if not params or not tokens_per_s:
        return {"tokens_per_s": tokens_per_s}
    tflops = flops_per_weight * params * tokens_per_s / 1e12
    return {"tokens_per_s": round(tokens_per_s, 1), "tflop_per_s": round(tflops, 3),
            "share_of_bf16_peak": round(tflops / PEAK_TFLOPS, 4)}


def steps(work: Path) -> list[dict]:
    path = work / "steps.txt"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) >= 4:
            rows.append({"step": parts[0], "rc": parts[1], "seconds": int(parts[2]),
                         "timeout_s": int(parts[3])})
    return rows


def tests(out: Path) -> dict | None:
    path = out / "tests.txt"
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    summary = [line for line in text.splitlines()
               if re.search(r"\d+ (passed|failed|error)", line) and " in " in line]
    return {"summary": summary[-1].strip("= ") if summary else None,
            "failed": sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)))}


def teacher(data: dict) -> dict:
    params = data.get("non_embedding_params")
    runs = []
    for run in data.get("runs", []):
        per_s = run.get("tokens_per_s", {})
        runs.append({"max_length": run["max_length"], "pairs": run["pairs"],
                     "seconds": run["seconds"], "padding_share": run.get("padding_share"),
                     "score": rate(params, per_s.get("score")),
                     "body": rate(params, per_s.get("body")),
                     "body_batch_shapes": run.get("body_batch_shapes")})
    return {"device": data.get("device"), "dtype": data.get("dtype"),
            "attn": data.get("attn_implementation"), "non_embedding_params": params,
            "runs": runs}


def inference(data: dict) -> dict:
    enc, query = data.get("encoding", {}), data.get("query", {})
    return {"device": data.get("machine", {}).get("device"),
            "dtype": data.get("machine", {}).get("dtype"),
            "encode": rate(data.get("non_embedding_params"), enc.get("encode_tokens_per_s")),
            "encode_passages_per_s": enc.get("encode_passages_per_s"),
            "encode_batch_sizes": enc.get("batch_sizes"),
            "overhead_vs_raw_forward": enc.get("overhead_ratio"),
            "retrieve_median_ms": (1000 * query["d2llm_query_median_s"]
                                   if "d2llm_query_median_s" in query else None),
            "teacher_100_passages_s": query.get("cross_encoder_median_s"),
            "retrieve_cheaper_than_teacher_x": query.get("speedup_vs_cross_encoder")}


def training(data: dict) -> dict:
    params, texts, tokens = (data.get("non_embedding_params"), data.get("texts"),
                             data.get("tokens"))
    modes = {}
    for name, mode in data.get("modes", {}).items():
        per_s = texts * tokens / mode["seconds"] if texts and tokens else None
        # "frozen" trains the heads on cached states: the backbone's weights do no work
        modes[name] = {"seconds": round(mode["seconds"], 4),
                       **rate(None if name == "frozen" else params, per_s,
                              2 if name == "cache_forward" else 6)}
    return {"device": data.get("device"), "dtype": data.get("dtype"),
            "blocks": data.get("blocks"), "texts": texts, "tokens": tokens, "modes": modes}


def distill(work: Path, out: Path) -> dict:
    student = work / "student"
    summary = read_json(student / "training_summary.json")
    result = {"finished": (student / "training_summary.json").exists(),
              "stage_seconds": summary.get("timings"),
              "total_seconds": (round(sum(summary["timings"].values()), 1)
                                if isinstance(summary.get("timings"), dict) else None),
              "config": {k: v for k, v in read_json(student / "distill_config.json").items()
                         if k in ("device", "dtype", "frozen_backbone", "teacher_max_length",
                                  "teacher_batch_size", "batch_size", "epochs", "student")}}
    log = out / "distill.log"
    if log.exists():
        lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        result["last_lines"] = [line[:300] for line in lines if line.strip()][-12:]
    return result


def main(work: Path, out: Path) -> dict:
    result: dict = {"peak_bf16_tflops": PEAK_TFLOPS, "steps": steps(work),
                    "env": read_json(work / "env.json"), "models": read_json(work / "models.json"),
                    "tests": tests(out)}
    for name, summarise in (("bench_teacher", teacher), ("bench_inference", inference),
                            ("bench_training", training), ("bench_training_minilm", training)):
        path = out / f"{name}.json"
        result[name] = summarise(read_json(path)) if path.exists() else "not written"
    result["distill"] = distill(work, out)
    text = json.dumps(result, indent=1, default=str)
    (out / "results.json").write_text(text + "\n")
    print(text[:6000])
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
