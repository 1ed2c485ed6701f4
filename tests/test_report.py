"""benchmarks/report.py on small fixture results: the plots are written, the page carries the
fixtures' numbers, and a result file not there yet is listed as not measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report():
    """benchmarks/ is not a package: load the script from its path (registered in
    sys.modules first, where its dataclass looks its own module up)."""
    spec = importlib.util.spec_from_file_location("benchmark_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def kfold(ndcg: dict[str, float], variant: str = "fusion") -> dict:
    """A scifact_kfold.py result: per-row nDCG@10 means (std 0.02), 2 folds of 5 claims."""
    rows = {key: {"ndcg@10": {"mean": value, "std": 0.02, "folds": [value, value]}}
            for key, value in ndcg.items()}
    return {"commands": [f"python benchmarks/scifact_kfold.py --variant '{variant}=...'"],
            "results": {variant: {"folds": 2, **rows}},
            "per_student": {f"{variant}-fold{i}": {"queries": 5} for i in range(2)}}


ROWS = {"qdrant_bm25": 0.61, "dense": 0.62, "dense_rescored": 0.63, "hybrid": 0.64,
        "hybrid_iem_alone": 0.65, "hybrid_rescored": 0.66}


def stages(**medians: float) -> dict:
    return {name: {"median_ms": ms, "p90_ms": 2 * ms} for name, ms in medians.items()}


def write_results(folder: Path, teacher: bool = True) -> None:
    files = {
        "scifact-kfold-fusion-cpu.json": kfold(ROWS),
        "scifact-kfold-minilm-cpu.json": kfold({**ROWS, "dense": 0.71}, "minilm"),
        "retriever-latency-cpu.json": {
            "command": "python benchmarks/retriever_latency.py --queries 50",
            "bm25": stages(retrieve=12.4),
            "dense": stages(encode_query=100, qdrant_search=20, build_nodes=10, retrieve=150),
            "hybrid": stages(encode_query=100, qdrant_search=200, build_nodes=10,
                             retrieve=400)},
        "distill-time-cpu.json": {"runs": [
            {"recipe": "judgements only (--teacher none)", "command": "d2llm-rag distill A",
             "seconds": 600.0, "stages": {"load_s": 30.0, "mining_s": 30.0, "teacher_s": 0.0,
                                          "token_states_s": 300.0, "training_s": 240.0}},
            {"recipe": "teacher imitation", "command": "d2llm-rag distill B",
             "seconds": 1200.0, "stages": {"load_s": 30.0, "teacher_s": 600.0,
                                           "training_s": 570.0}}]},
    }
    if teacher:
        files["teacher-rerank-cpu.json"] = {
            "command": "python benchmarks/teacher_rerank.py --claims 100", "claims": 100,
            "depth": 20, "bm25": {"ndcg@10": 0.5561},
            "runs": [{"max_length": length, "ndcg@10": ndcg, "ndcg@10_std_err": 0.01,
                      "seconds_per_pair": ms / 20000, "pairs_per_s": 20000 / ms,
                      "ms_per_query": ms}
                     for length, ndcg, ms in ((128, 0.7123, 2400.4), (256, 0.7456, 4811.6))]}
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data))


def test_report_plots_and_tables(report, tmp_path: Path) -> None:
    results, output = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    write_results(results)
    written = report.main(["--results", str(results), "--output", str(output)])

    assert {p.name for p in written} == {"quality-vs-cost.png", "distill-time.png", "report.md"}
    for name in ("quality-vs-cost.png", "distill-time.png"):
        data = (output / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    page = (output / "report.md").read_text()
    assert "![quality-vs-cost.png](quality-vs-cost.png)" in page
    # The teacher's nDCG and cost, and the BM25 of its own claims beside them.
    assert "| teacher, max_length 256 | 0.746 | 0.010 | 4,812 | 100 |" in page
    assert "| BM25 order of the teacher's top-20 | 0.556 | — | — | 100 |" in page
    # Costs from retriever-latency: BM25's retrieve; first stages summed; rescored retrieve.
    assert "| Qdrant BM25 | 0.610 | 0.020 | 12 | 10 (2 folds) |" in page
    assert "| hybrid RRF | 0.640 | 0.020 | 310 |" in page
    assert "| hybrid rescored | 0.660 | 0.020 | 400 |" in page
    # MiniLM has no latency file: in the table without a cost, and listed as not measured.
    assert "| MiniLM dense | 0.710 | 0.020 | — |" in page
    not_measured = page.split("## Not measured")[1]
    assert "`retriever-latency-minilm-cpu.json`" in not_measured
    assert "`scifact-kfold-easy0-cpu.json`" in not_measured
    # Distillation stages (minutes), with each run's command; the recorded commands listed.
    assert "| teacher imitation | 20.0 | 0.5 | — | 10.0 | — | 9.5 | `d2llm-rag distill B` |" \
        in page
    assert "`python benchmarks/retriever_latency.py --queries 50`" in page


def test_report_without_the_later_benchmarks(report, tmp_path: Path) -> None:
    """No teacher file and no distill file yet: no teacher points, no distill plot, both
    listed under "Not measured"."""
    results, output = tmp_path / "results", tmp_path / "out"
    results.mkdir()
    write_results(results, teacher=False)
    (results / "distill-time-cpu.json").unlink()
    written = report.main(["--results", str(results), "--output", str(output)])

    assert [p.name for p in written] == ["quality-vs-cost.png", "report.md"]
    assert not (output / "distill-time.png").exists()
    page = (output / "report.md").read_text()
    assert "teacher max_length" not in page and "distill-time.png" not in page
    not_measured = page.split("## Not measured")[1]
    assert "`teacher-rerank-cpu.json`" in not_measured
    assert "`distill-time-cpu.json`" in not_measured
