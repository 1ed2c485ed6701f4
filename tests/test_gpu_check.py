"""The GPU check's helpers (benchmarks/gpu_check), on the CPU: the data subset it carries
keeps what the distillation needs, and its summary's share of the bf16 peak is right."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.distill_fixtures import write_beir

CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", CHECK / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_subset_keeps_its_queries_positives_and_size(tmp_path):
    src = write_beir(tmp_path / "src")
    summary = load("make_data").main([str(src), str(tmp_path / "out"), "--queries", "5",
                                      "--corpus", "9"])
    out = tmp_path / "out"
    corpus = {json.loads(line)["_id"] for line in (out / "corpus.jsonl").open()}
    queries = {json.loads(line)["_id"] for line in (out / "queries.jsonl").open()}
    rows = [line.split("\t") for line in (out / "qrels" / "train.tsv").read_text().splitlines()]
    assert rows[0] == ["query-id", "corpus-id", "score"]
    assert summary == {"queries": 5, "qrels": 5, "corpus": 9}
    assert len(queries) == 5 and {q for q, _, _ in rows[1:]} == queries
    assert {d for _, d, _ in rows[1:]} <= corpus and len(corpus) == 9
    whole = load("make_data").main([str(src), str(tmp_path / "all")])
    assert whole == {"queries": 12, "qrels": 12, "corpus": 24}


def test_the_share_of_the_bf16_peak(monkeypatch):
    collect = load("collect")
    monkeypatch.setattr(collect, "PEAK_TFLOPS", 800.0)
    # 100M weights at 1M tokens/s: 2e8 * 1e6 = 200 TFLOP/s forward, a quarter of 800
    assert collect.rate(100_000_000, 1_000_000) == {
        "tokens_per_s": 1_000_000, "tflop_per_s": 200.0, "share_of_bf16_peak": 0.25}
    assert collect.rate(100_000_000, 1_000_000, 6)["share_of_bf16_peak"] == pytest.approx(0.75)
    assert collect.rate(None, 5.0) == {"tokens_per_s": 5.0}
