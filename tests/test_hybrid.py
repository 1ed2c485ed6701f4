"""Hybrid search: BM25 sparse vectors with Qdrant's IDF, fused with the dense search by RRF in
one Qdrant call, then IEM rescoring; and the student checked and recorded at ingestion."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch

from llama_index_d2llm import (
    BM25Encoder,
    D2LLMEmbedding,
    D2LLMRerank,
    D2LLMRetriever,
    D2LLMStudent,
    D2LLMVectorStore,
    StudentMismatchError,
)
from llama_index_d2llm.qdrant import (
    MissingVectorError,
    UnsupportedVectorStoreError,
    describe_collection,
    lexical_scores,
    search_with_vectors,
    sparse_query,
)
from llama_index_d2llm.sparse import RRF_K
from llama_index_d2llm.student.fusion import FusionWeights, fuse
from tests.plugin_helpers import (
    CORPUS,
    TEXTS,
    build_index,
    count_encodes,
    documents,
    embedded_texts,
    hybrid_store,
    other_student,
    qdrant_store,
)

LEXICAL_QUERY = "city history"


@pytest.fixture(scope="module")
def embed(tiny_student_dir, device):
    return D2LLMEmbedding(model_name=tiny_student_dir, dtype="float32", device=str(device))


@pytest.fixture(scope="module")
def indexed(embed):
    return build_index(embed, hybrid_store(embed))


def dense_ranking(embed, query: str) -> list[str]:
    """Passage texts by the student's cosine, best first (no Qdrant)."""
    student = embed.student
    cosines = student.encode(embedded_texts()) @ student.encode([query], kind="query")[0]
    return [TEXTS[i] for i in cosines.argsort(descending=True).tolist()]


def bm25_scores(query: str, texts: list[str]) -> dict[str, float]:
    """BM25 by hand: the encoder's document weights times ln((N - df + 0.5) / (df + 0.5) + 1)."""
    encoder = BM25Encoder()
    doc_indices, doc_values = encoder.encode_documents(texts)
    terms = set(encoder.encode_queries([query])[0][0])
    df = {t: sum(t in doc for doc in doc_indices) for t in terms}
    n = len(texts)
    scores = {}
    for text, indices, values in zip(texts, doc_indices, doc_values, strict=True):
        score = sum(math.log((n - df[t] + 0.5) / (df[t] + 0.5) + 1) * v
                    for t, v in zip(indices, values, strict=True) if t in terms)
        if score > 0:
            scores[text] = score
    return scores


def rrf(*rankings: list[str], k: int = 60) -> dict[str, float]:
    """Reciprocal rank fusion as ranx computes it: sum of 1 / (k + rank), rank from 1."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, text in enumerate(ranking, start=1):
            fused[text] = fused.get(text, 0.0) + 1.0 / (k + rank)
    return fused


def test_hybrid_equals_a_hand_computed_rrf_of_dense_and_bm25(embed, indexed):
    index, store = indexed
    assert describe_collection(store).sparse_name == "text-sparse-new"
    texts = embedded_texts()  # the sparse vectors are made from what the embed model saw
    sparse = bm25_scores(LEXICAL_QUERY, texts)
    assert len(sparse) >= 2
    by_embedded = dict(zip(texts, TEXTS, strict=True))
    sparse_ranking = [by_embedded[t] for t in sorted(sparse, key=sparse.get, reverse=True)]
    expected = rrf(dense_ranking(embed, LEXICAL_QUERY), sparse_ranking)
    hits = D2LLMRetriever(index=index, similarity_top_k=len(TEXTS),
                          top_n=len(TEXTS)).retrieve(LEXICAL_QUERY)
    fused = {h.node.get_content(): h.node.metadata["retrieval_score"] for h in hits}
    assert fused == pytest.approx(expected, abs=1e-6)
    assert RRF_K == 61  # Qdrant's 1 / (k + position from 0) is ranx's 1 / (60 + rank)


def test_a_lexical_only_match_is_found_by_hybrid_but_not_by_dense(embed):
    rare = "zqxj"
    # the passage the dense side ranks last for the rare word (which one that is depends on
    # the device's arithmetic with a random student: on CUDA it was not TEXTS[5])
    last = TEXTS.index(dense_ranking(embed, rare)[-1])
    texts = [f"{t} {rare}" if i == last else t for i, t in enumerate(TEXTS)]
    with_rare = texts[last]
    from llama_index.core import Document, StorageContext, VectorStoreIndex

    index = VectorStoreIndex.from_documents(
        [Document(text=t) for t in texts], embed_model=embed,
        storage_context=StorageContext.from_defaults(vector_store=hybrid_store(embed)))
    dense = D2LLMRetriever(index=index, similarity_top_k=2, top_n=2, hybrid=False).retrieve(rare)
    hybrid = D2LLMRetriever(index=index, similarity_top_k=2, top_n=2).retrieve(rare)
    assert with_rare not in [h.node.get_content() for h in dense]
    assert with_rare in [h.node.get_content() for h in hybrid]


def test_idf_follows_deletions(embed):
    _, store = build_index(embed, hybrid_store(embed))
    query = sparse_query(store, "city")

    def city_hits() -> dict[str, tuple[float, str]]:
        points = store.client.query_points("docs", query=query, using=store.sparse_vector_name,
                                           with_payload=True).points
        nodes = store.parse_to_query_result(points).nodes
        return {n.get_content(): (p.score, n.ref_doc_id) for n, p in zip(nodes, points,
                                                                      strict=True)}

    before = city_hits()
    by_hand = bm25_scores("city", embedded_texts())
    by_text = dict(zip(embedded_texts(), TEXTS, strict=True))
    assert {t: s for t, (s, _) in before.items()} == pytest.approx(
        {by_text[t]: s for t, s in by_hand.items()}, rel=1e-5)
    river = "the river city and its history"
    store.delete(before[river][1])
    after = city_hits()
    survivor = "water energy and the climate of the city"
    assert list(after) == [survivor]
    n = len(TEXTS)
    idf_before = math.log((n - 2 + 0.5) / (2 + 0.5) + 1)
    idf_after = math.log((n - 1 - 1 + 0.5) / (1 + 0.5) + 1)
    assert after[survivor][0] / before[survivor][0] == pytest.approx(idf_after / idf_before,
                                                                     rel=1e-4)


def test_filters_hold_in_both_searches(embed, indexed):
    from llama_index.core.vector_stores import MetadataFilter, MetadataFilters

    index, _ = indexed
    topics = dict(CORPUS)
    unfiltered = D2LLMRetriever(index=index, similarity_top_k=3, top_n=3).retrieve(LEXICAL_QUERY)
    assert {topics[h.node.get_content()] for h in unfiltered} & {"culture"}
    science = MetadataFilters(filters=[MetadataFilter(key="topic", value="science")])
    hits = D2LLMRetriever(index=index, similarity_top_k=3, top_n=3,
                          filters=science).retrieve(LEXICAL_QUERY)
    assert hits and {topics[h.node.get_content()] for h in hits} == {"science"}
    # the sparse search alone, filtered: "city" of a science passage still counts
    store = index.vector_store
    query = embed.get_query_embedding(LEXICAL_QUERY)
    filtered = search_with_vectors(store, query, 8, filters=science,
                                   sparse_query=sparse_query(store, LEXICAL_QUERY))
    assert "water energy and the climate of the city" in [h.node.get_content() for h in filtered]
    assert {topics[h.node.get_content()] for h in filtered} == {"science"}


def test_no_hybrid_fusion_returns_the_fused_order(embed, indexed, monkeypatch):
    index, store = indexed
    candidates = D2LLMRetriever(index=index, similarity_top_k=8, top_n=8).retrieve(LEXICAL_QUERY)
    fused_order = sorted(candidates, key=lambda h: -h.node.metadata["retrieval_score"])
    monkeypatch.setattr(embed.student.config, "fusion",
                        {"dense": FusionWeights(iem=1000.0), "hybrid": None})
    hits = D2LLMRetriever(index=index, similarity_top_k=8, top_n=8).retrieve(LEXICAL_QUERY)
    # fused (RRF) scores tie where two passages swap ranks between the searches, and which
    # of a tie comes first follows the device's arithmetic: compare the fused scores in order
    fused = {h.node.node_id: h.node.metadata["retrieval_score"] for h in candidates}
    best_first = [fused[h.node.node_id] for h in fused_order]
    assert [fused[h.node.node_id] for h in hits] == pytest.approx(best_first, abs=1e-9)
    assert {h.node.node_id for h in hits} == set(fused)
    # the rerank infers "hybrid" from the store, or is told
    rerank = D2LLMRerank(top_n=8, vector_store=store, embed_model=embed)
    ranked = rerank.postprocess_nodes(candidates, query_str=LEXICAL_QUERY)
    assert [fused[h.node.node_id] for h in ranked] == pytest.approx(best_first, abs=1e-9)
    as_dense = D2LLMRerank(top_n=8, vector_store=store, embed_model=embed, first_stage="dense")
    iem = as_dense.postprocess_nodes(candidates, query_str=LEXICAL_QUERY)
    logits = embed.student.score(torch.tensor(embed.get_query_embedding(LEXICAL_QUERY)),
                                 embed.student.encode([h.node.get_content(
                                     metadata_mode="embed") for h in iem]))
    assert [h.score for h in iem] == sorted([h.score for h in iem], reverse=True)
    assert logits.tolist() == sorted(logits.tolist(), reverse=True)  # the IEM's order


def test_hybrid_candidates_are_rescored_with_qdrants_bm25_scores(embed, indexed, monkeypatch):
    """Cosine and BM25 fused as the student records it; the BM25 scores are Qdrant's own (a
    second, filtered sparse query), equal to BM25 computed by hand over the collection."""
    index, store = indexed
    monkeypatch.setattr(embed.student.config, "fusion",
                        {"hybrid": FusionWeights(lexical=0.5, iem=0.25)})
    hits = D2LLMRetriever(index=index, similarity_top_k=8, top_n=8).retrieve(LEXICAL_QUERY)
    node_ids = [h.node.node_id for h in hits]
    scores = lexical_scores(store, sparse_query(store, LEXICAL_QUERY), node_ids)
    by_embedded = dict(zip(embedded_texts(), TEXTS, strict=True))
    by_hand = {by_embedded[t]: v for t, v in bm25_scores(LEXICAL_QUERY,
                                                         embedded_texts()).items()}
    assert scores == pytest.approx([by_hand.get(h.node.get_content(), 0.0) for h in hits],
                                   rel=1e-4)
    query = torch.tensor(embed.get_query_embedding(LEXICAL_QUERY))
    vectors = embed.student.encode([h.node.get_content(metadata_mode="embed") for h in hits])
    expected = fuse(torch.nn.functional.cosine_similarity(vectors, query[None], dim=-1),
                    embed.student.score(query, vectors), FusionWeights(0.5, 0.25),
                    torch.tensor(scores))
    assert [h.score for h in hits] == pytest.approx(expected.tolist(), abs=1e-3)
    # the rerank on the hybrid store asks Qdrant for the same scores and agrees
    rerank = D2LLMRerank(top_n=8, vector_store=store, embed_model=embed)
    reranked = rerank.postprocess_nodes(list(reversed(hits)), query_str=LEXICAL_QUERY)
    assert {h.node.node_id for h in reranked} == set(node_ids)


def test_rerank_reads_the_named_dense_vectors_of_a_hybrid_store(embed, indexed, monkeypatch):
    index, store = indexed
    assert describe_collection(store).vector_name == "text-dense"
    nodes = index.as_retriever(similarity_top_k=8).retrieve(LEXICAL_QUERY)
    counts = count_encodes(monkeypatch, embed.student)
    ranked = D2LLMRerank(top_n=3, vector_store=store, embed_model=embed).postprocess_nodes(
        nodes, query_str=LEXICAL_QUERY)
    assert counts == {"query": 1} and len(ranked) == 3


def test_one_query_encoding_and_one_qdrant_call_plus_the_bm25_scores(embed, indexed, monkeypatch):
    index, store = indexed
    retriever = D2LLMRetriever(index=index, similarity_top_k=8, top_n=3)
    retriever.retrieve(LEXICAL_QUERY)  # the student check happens once, here
    calls = []
    original = store.client.query_points
    monkeypatch.setattr(store.client, "query_points",
                        lambda *a, **k: calls.append(k) or original(*a, **k))
    counts = count_encodes(monkeypatch, embed.student)
    retriever.retrieve(LEXICAL_QUERY)
    # the fused search, then the candidates' BM25 scores for the fusion (student/fusion.py)
    assert counts == {"query": 1} and len(calls) == 2
    assert [p.using for p in calls[0]["prefetch"]] == ["text-dense", "text-sparse-new"]
    assert calls[0]["with_vectors"] == ["text-dense"]
    assert calls[1]["using"] == "text-sparse-new" and not calls[1]["with_vectors"]
    # a student whose hybrid fusion does not weigh BM25 needs the first call only
    monkeypatch.setattr(embed.student.config, "fusion", {"hybrid": FusionWeights(iem=0.5)})
    calls.clear()
    retriever.retrieve(LEXICAL_QUERY)
    assert len(calls) == 1


def test_a_dense_only_collection_keeps_working(embed):
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    index, _ = build_index(embed, qdrant_store(client))  # built before hybrid existed
    dense = D2LLMRetriever(index=index, similarity_top_k=8, top_n=3).retrieve(LEXICAL_QUERY)
    store = hybrid_store(embed, client)  # hybrid=None follows the collection: dense only
    assert not store.enable_hybrid and describe_collection(store).sparse_name is None
    build_index(embed, store)  # more documents, same layout
    again = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=8,
                           top_n=3).retrieve(LEXICAL_QUERY)
    assert len(again) == 3 and len(dense) == 3
    with pytest.raises(Exception, match="dense vectors only.*hybrid=False"):
        hybrid_store(embed, client, hybrid=True)
    with pytest.raises(UnsupportedVectorStoreError, match="no sparse vector.*D2LLMVectorStore"):
        D2LLMRetriever(index=index, similarity_top_k=8, top_n=3, hybrid=True).retrieve("x")


def test_a_new_collection_compares_by_dot_product_and_ranks_as_cosine(embed):
    """The student's vectors are unit length, so dot product is their cosine, without the
    embedded Qdrant re-normalising every stored vector on each query."""
    from qdrant_client import models

    dot_index, dot_store = build_index(embed, hybrid_store(embed, hybrid=False))
    info = describe_collection(dot_store)
    assert info.distance == models.Distance.DOT.value and info.dimension == embed.dimension
    cosine_index, cosine_store = build_index(embed, qdrant_store())  # QdrantVectorStore's own
    assert describe_collection(cosine_store).distance == models.Distance.COSINE.value
    for query in (LEXICAL_QUERY, "a question about rivers"):
        by_dot, by_cosine = (
            D2LLMRetriever(index=index, similarity_top_k=len(TEXTS), top_n=len(TEXTS),
                           hybrid=False).retrieve(query)
            for index in (dot_index, cosine_index))
        assert [h.node.get_content() for h in by_dot] == [h.node.get_content() for h in by_cosine]
        assert ([h.node.metadata["retrieval_score"] for h in by_dot]
                == pytest.approx([h.node.metadata["retrieval_score"] for h in by_cosine],
                                 abs=1e-5))
        assert [h.score for h in by_dot] == pytest.approx([h.score for h in by_cosine],
                                                          abs=1e-5)


def test_a_non_normalising_student_gets_a_collection_that_keeps_its_vectors(tiny_backbone):
    """Cosine would normalise them (and is refused for such a student); dot product keeps
    them as the IEM saw them."""
    from llama_index.core.schema import MetadataMode

    raw = D2LLMEmbedding.from_student(D2LLMStudent.from_backbone(
        tiny_backbone, pma_heads=4, iem_hidden_size=16, dtype="float32", seed=5,
        normalize=False))
    index, store = build_index(raw, hybrid_store(raw))
    hits = D2LLMRetriever(index=index, similarity_top_k=len(TEXTS),
                          top_n=len(TEXTS)).retrieve(LEXICAL_QUERY)
    assert len(hits) == len(TEXTS)
    stored = store.client.retrieve("docs", [hits[0].node.node_id], with_vectors=True)[0]
    encoded = raw.student.encode([hits[0].node.get_content(MetadataMode.EMBED)])[0]
    assert stored.vector["text-dense"] == pytest.approx(encoded.tolist(), abs=1e-5)
    assert float(encoded.norm()) != pytest.approx(1.0, abs=1e-3)


def test_a_hit_without_a_dense_vector_is_named(embed):
    """A point written with its BM25 vector only is found by the sparse search, but the IEM
    has no stored vector to score it with: the error names the point and the vector."""
    from qdrant_client import models

    index, store = build_index(embed, hybrid_store(embed))
    indices, values = store.bm25.encode_documents(["city history, city history"])
    stray = "9f1c2d3e-0000-4000-8000-000000000001"
    store.client.upsert("docs", [models.PointStruct(
        id=stray, payload={"text": "city history, city history"},
        vector={"text-sparse-new": models.SparseVector(indices=indices[0], values=values[0])})])
    retriever = D2LLMRetriever(index=index, similarity_top_k=len(TEXTS) + 1, top_n=3)
    with pytest.raises(MissingVectorError, match=f"{stray}.*without a dense vector named "
                                                 "'text-dense'"):
        retriever.retrieve(LEXICAL_QUERY)


def test_first_ingestion_records_the_student(embed, tiny_backbone):
    _, store = build_index(embed, hybrid_store(embed))
    record = describe_collection(store).record
    assert record["fingerprint"] == embed.fingerprint  # no rescoring needed for that


def test_another_student_is_refused_at_ingestion_naming_both(embed, tiny_backbone):
    from qdrant_client import QdrantClient

    client = QdrantClient(":memory:")
    build_index(embed, hybrid_store(embed, client))
    count = client.count("docs").count
    other = D2LLMEmbedding.from_student(other_student(tiny_backbone, seed=3))
    with pytest.raises(StudentMismatchError) as error:
        build_index(other, hybrid_store(other, client))
    message = str(error.value)
    assert embed.fingerprint in message and other.fingerprint in message
    assert "another collection" in message
    # the store's student is A, the index embeds with B: the vectors give it away
    with pytest.raises(StudentMismatchError, match="not embedded by the store's student"):
        build_index(other, hybrid_store(embed, client))
    assert client.count("docs").count == count  # nothing was written


def test_async_ingestion_and_retrieval_equal_sync(embed, tiny_backbone):
    from llama_index.core.ingestion import IngestionPipeline
    from qdrant_client import AsyncQdrantClient, QdrantClient

    nodes = IngestionPipeline(transformations=[embed]).run(documents=documents())
    sync_store = hybrid_store(embed, QdrantClient(":memory:"))
    sync_store.add(nodes)
    expected = D2LLMRetriever(vector_store=sync_store, embed_model=embed, similarity_top_k=8,
                              top_n=4).retrieve(LEXICAL_QUERY)
    aclient = AsyncQdrantClient(":memory:")
    async_store = D2LLMVectorStore("docs", embed, aclient=aclient)
    other = D2LLMEmbedding.from_student(other_student(tiny_backbone, seed=4))

    async def run():
        await async_store.async_add(nodes)
        info = await aclient.get_collection("docs")
        hits = await D2LLMRetriever(vector_store=async_store, embed_model=embed,
                                    similarity_top_k=8, top_n=4).aretrieve(LEXICAL_QUERY)
        refused = None
        try:
            await D2LLMVectorStore("docs", other, aclient=aclient).async_add(nodes)
        except StudentMismatchError as exc:
            refused = str(exc)
        return info, hits, refused

    info, hits, refused = asyncio.run(run())
    assert info.config.metadata["d2llm_student"]["fingerprint"] == embed.fingerprint
    assert "text-sparse-new" in info.config.params.sparse_vectors
    assert info.config.params.vectors["text-dense"].distance == "Dot"  # async creation too
    assert [h.node.node_id for h in hits] == [h.node.node_id for h in expected]
    assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)
    assert refused is not None and other.fingerprint in refused


def test_on_disk_hybrid_collection_reopens(embed, tmp_path):
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(tmp_path / "qdrant"))
    index, _ = build_index(embed, hybrid_store(embed, client))
    first = D2LLMRetriever(index=index, similarity_top_k=8, top_n=3).retrieve(LEXICAL_QUERY)
    client.close()
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        store = hybrid_store(embed, client)
        assert store.enable_hybrid
        again = D2LLMRetriever(vector_store=store, embed_model=embed, similarity_top_k=8,
                               top_n=3).retrieve(LEXICAL_QUERY)
        assert [h.node.node_id for h in again] == [h.node.node_id for h in first]
    finally:
        client.close()


# ---------------------------------------------------------------------------- d2llm-rag eval
@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    from tests.distill_fixtures import write_beir

    return write_beir(tmp_path_factory.mktemp("beir"), split="test")


def test_eval_hybrid_is_qdrants_rrf_of_its_dense_and_bm25_runs(beir, embed):
    from llama_index_d2llm.trainer.evaluation import fuse_runs, load_beir, qdrant_runs

    data = load_beir(beir, "test")
    student = embed.student
    ids = sorted(data.queries)
    runs = qdrant_runs(student.encode([data.queries[q] for q in ids], kind="query"),
                       student.encode([p.text for p in data.corpus]), [p.id for p in data.corpus],
                       ids, top_k=10, passage_texts=[p.text for p in data.corpus],
                       query_texts=[data.queries[q] for q in ids])
    fused = fuse_runs([runs["dense"], runs["sparse"]])  # ranx's RRF, k=60
    for query in ids:
        top = dict(sorted(fused[query].items(), key=lambda kv: -kv[1])[:10])
        assert runs["hybrid"][query] == pytest.approx(top, abs=1e-6)
    sparse_only = qdrant_runs(None, None, [p.id for p in data.corpus], ids, top_k=10,
                              passage_texts=[p.text for p in data.corpus],
                              query_texts=[data.queries[q] for q in ids])
    assert sparse_only == {"sparse": runs["sparse"]}


def test_eval_cli_first_stage_qdrant_hybrid(beir, tiny_student_dir, capsys):
    from llama_index_d2llm.trainer import cli

    common = [tiny_student_dir, "--data", str(beir), "--split", "test", "--top-k", "10",
              "--rerank-k", "5", "--dtype", "float32", "--no-progress"]
    assert cli.main(["eval", *common, "--first-stage", "qdrant", "--hybrid"]) == 0
    printed = json.loads(capsys.readouterr().out)["student"]
    assert printed["hybrid_method"] == "qdrant"
    assert printed["sparse"]["ndcg@10"] > 0.8  # the fixture's queries share words with positives
    for section in ("hybrid", "hybrid_reranked"):
        assert 0 <= printed[section]["ndcg@10"] <= 1
    assert cli.main(["eval", *common, "--hybrid-bm25"]) == 0  # the old flag: exact + rank_bm25
    printed = json.loads(capsys.readouterr().out)["student"]
    assert printed["hybrid_method"] == "ranx rrf" and "sparse" not in printed
