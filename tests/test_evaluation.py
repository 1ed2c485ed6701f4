"""Evaluation: ranx metrics on hand-made runs with known answers, BEIR loading, search, STS."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llama_index_d2llm import D2LLMStudent
from llama_index_d2llm.trainer.evaluation import (
    EvaluationError,
    bm25_run,
    evaluate_pairs,
    evaluate_run,
    evaluate_student,
    exact_search,
    load_beir,
    qdrant_search,
    read_qrels,
    read_run,
    spearman,
)
from llama_index_d2llm.trainer.pairs import SymmetricPair
from tests.distill_fixtures import write_beir

# ranx compiles its metrics with numba on first use: every test here takes seconds.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def beir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir"), split="test")


def test_known_ndcg_mrr_recall_of_a_hand_made_run():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d5": 1}}
    run = {"q1": {"d3": 0.9, "d1": 0.5},   # relevant at rank 2
           "q2": {"d2": 1.0},               # relevant at rank 1
           "q4": {"d1": 1.0}}               # not judged: ignored; q3 missing: scores 0
    result = evaluate_run(qrels, run, per_query=True)
    assert result["per_query"]["ndcg@10"] == pytest.approx({"q1": 1 / math.log2(3), "q2": 1.0,
                                                            "q3": 0.0})
    assert result["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 3)
    assert result["mrr@10"] == pytest.approx((0.5 + 1) / 3)
    assert result["recall@100"] == pytest.approx(2 / 3)


def test_graded_relevance_uses_linear_gains():
    qrels = {"q": {"a": 2, "b": 1}}
    run = {"q": {"b": 2.0, "a": 1.0}}   # the less relevant document first
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    ideal = 2 / math.log2(2) + 1 / math.log2(3)
    assert evaluate_run(qrels, run, ["ndcg@10"])["ndcg@10"] == pytest.approx(dcg / ideal)


def test_run_files_and_qrels_files(tmp_path):
    trec = tmp_path / "run.trec"
    trec.write_text("q1 Q0 d1 1 2.5 bm25\nq1 Q0 d2 2 1.0 bm25\n")
    assert read_run(trec) == {"q1": {"d1": 2.5, "d2": 1.0}}
    as_json = tmp_path / "run.json"
    as_json.write_text('{"q1": {"d1": 2.5}}')
    assert read_run(as_json) == {"q1": {"d1": 2.5}}
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n")
    assert read_qrels(qrels) == {"q1": {"d1": 1, "d2": 0}}
    with pytest.raises(EvaluationError, match="no query with a relevant document"):
        evaluate_run({"q1": {"d2": 0}}, {"q1": {"d2": 1.0}})


def test_load_beir_names_the_missing_split(beir):
    data = load_beir(beir, "test")
    assert len(data.corpus) == 24 and len(data.queries) == 12
    with pytest.raises(EvaluationError, match=r"qrels present: \['test'\]"):
        load_beir(beir, "dev")


def test_exact_and_qdrant_search_agree_and_find_the_planted_answer():
    generator = torch.Generator().manual_seed(0)
    passages = torch.nn.functional.normalize(torch.randn(30, 8, generator=generator), dim=-1)
    ids = [f"d{i}" for i in range(30)]
    queries = passages[[3, 17]] + 0.01 * torch.randn(2, 8, generator=generator)
    exact = exact_search(queries, passages, ids, ["a", "b"], top_k=5)
    assert [next(iter(exact[q])) for q in ("a", "b")] == ["d3", "d17"]
    assert evaluate_run({"a": {"d3": 1}, "b": {"d17": 1}}, exact)["ndcg@10"] == 1.0
    qdrant = qdrant_search(queries, passages, ids, ["a", "b"], top_k=5)
    for query in ("a", "b"):
        assert list(qdrant[query]) == list(exact[query])
        assert list(qdrant[query].values()) == pytest.approx(list(exact[query].values()),
                                                             abs=1e-5)


def test_bm25_baseline_on_the_fixture(beir):
    data = load_beir(beir, "test")
    assert evaluate_run(data.qrels, bm25_run(data, 10))["ndcg@10"] > 0.8


@pytest.fixture(scope="module")
def student(tiny_backbone):
    return D2LLMStudent.from_backbone(tiny_backbone, lora=None, pma_heads=4, iem_hidden_size=16,
                                      dtype="float32", seed=0)


def test_evaluate_student_first_stage_and_rerank(beir, student, tmp_path):
    runs_file = tmp_path / "runs.json"
    result = evaluate_student(student, beir, split="test", top_k=10, rerank_k=4,
                              show_progress=False, runs_output=runs_file)
    assert result["queries"] == 12 and result["corpus"] == 24
    runs = json.loads(runs_file.read_text())
    assert all(len(docs) == 4 for docs in runs["reranked"].values())
    for query, docs in runs["reranked"].items():  # the IEM reorders the first stage's top 4
        first = sorted(runs["first_stage"][query], key=runs["first_stage"][query].get)[-4:]
        assert set(docs) == set(first)
    assert evaluate_run(load_beir(beir, "test").qrels, runs["reranked"]) == result["reranked"]
    through_qdrant = evaluate_student(student, beir, split="test", top_k=10, rerank_k=0,
                                      first_stage="qdrant", show_progress=False)
    assert through_qdrant["first_stage"] == pytest.approx(result["first_stage"])
    assert "reranked" not in through_qdrant


def test_evaluate_student_through_the_token_cache_matches(beir, student, tmp_path):
    from llama_index_d2llm.trainer.token_states import TokenStateCache

    cache = TokenStateCache(student, tmp_path / "states", show_progress=False)
    plain = evaluate_student(student, beir, top_k=10, rerank_k=5, show_progress=False)
    cached = evaluate_student(student, beir, top_k=10, rerank_k=5, show_progress=False,
                              token_cache=cache)
    assert cached["first_stage"] == pytest.approx(plain["first_stage"], abs=0.02)
    assert len(cache) == 24 + 12


def test_sts_spearman(student):
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    pairs = [SymmetricPair("the cat sat on the mat", "a cat on a mat", 1.0),
             SymmetricPair("a dog runs in the park", "quantum physics", 0.0),
             SymmetricPair("water in the river", "the river water", 0.9),
             SymmetricPair("music", "a gene of cancer", 0.1)]
    result = evaluate_pairs(student, pairs)
    assert result["pairs"] == 4
    assert -1 <= result["iem_spearman"] <= 1 and -1 <= result["cosine_spearman"] <= 1
    with pytest.raises(EvaluationError, match="at least two"):
        evaluate_pairs(student, [SymmetricPair("a", "b", None)])


def test_fusing_with_a_run_that_found_nothing_keeps_the_other_ranking():
    """A dev query whose words no passage has gets no BM25 hit: its run is empty, and ranx's
    fusion crashed the distillation with "max() arg is an empty sequence"."""
    from llama_index_d2llm.trainer.runs import fuse_runs

    dense = {"q": {"a": 0.9, "b": 0.7, "c": 0.8}}
    assert fuse_runs([dense, {"q": {}}]) == {"q": {"a": 1 / 61, "c": 1 / 62, "b": 1 / 63}}
    assert fuse_runs([{}, {"q": {}}]) == {}
    # a query with hits in one run only is fused over that run (ranx refused mixed query sets)
    mixed = fuse_runs([{"q": {"a": 1.0}, "r": {"x": 2.0, "y": 1.0}}, {"q": {"a": 5.0}, "r": {}}])
    assert mixed["r"] == {"x": 1 / 61, "y": 1 / 62}
    assert mixed["q"]["a"] == pytest.approx(2 / 61)
    both = fuse_runs([dense, {"q": {"b": 3.0}}])
    assert max(both["q"], key=both["q"].get) == "b"  # ranx's fusion, as before
