"""Inference benchmark: encoding throughput and one query's latency, D2LLM vs cross-encoder.

Run (CPU, default Gemma 3 270M student, real SciFact passages when ../shared/data is there):

    python benchmarks/bench_inference.py --output benchmarks/results/inference-cpu.json

It prints and saves:
- passages/s of `D2LLMStudent.encode` next to the raw backbone forward on the very same
  token batches (the ratio is our overhead: tokenisation, PMA, normalisation, copies);
- the latency of one query through `D2LLMRetriever` (query encoding + Qdrant search with
  vectors + IEM over the top 100) next to scoring the same 100 passages with the LLM as a
  cross-encoder teacher (the ratio is D2LLM's reason to exist).
Every figure is the median of several runs in this one process. Speed does not depend on
the weights' values, so an untrained student of the real shape is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import clock  # noqa: E402

SHARED_SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def load_passages(count: int, seed: int = 0, data: Path = SHARED_SCIFACT
                  ) -> tuple[list[str], list[str]]:
    """SciFact passages and claims when available, else synthetic text of similar length."""
    rng = random.Random(seed)
    if (data / "corpus.jsonl").exists():
        corpus = [json.loads(line) for line in (data / "corpus.jsonl").open()]
        queries = [json.loads(line)["text"] for line in (data / "queries.jsonl").open()]
        rng.shuffle(corpus)
        texts = [f"{d['title']}\n{d['text']}".strip() for d in corpus[:count]]
        return texts, queries
    words = ["protein", "cell", "gene", "cancer", "expression", "patients", "study", "risk"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(80, 260)))
             for _ in range(count)]
    return texts, [" ".join(rng.choice(words) for _ in range(12)) for _ in range(20)]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return times


def bench_encoding(student, passages: list[str], batch_size: int | None, repeats: int) -> dict:
    from llama_index_d2llm.student.batching import length_batches

    # The raw forward runs on the batches encode() would build: same buckets, same truncation
    # (batch_size None: sized from the free memory on CUDA, as encode() sizes them).
    buckets = length_batches([len(p) for p in passages],
                             batch_size or student._auto_batch_size("passage"))
    batches = [student.tokenize([passages[i] for i in index], "passage") for index in buckets]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def raw_forward():
        with torch.inference_mode():
            for batch in batches:
                student.backbone(**batch)

    def encode():
        student.encode(passages, kind="passage", batch_size=batch_size)

    raw_forward()  # warm-up (allocator, kernels)
    encode_times, raw_times = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        encode_times += timed(encode, 1)
        raw_times += timed(raw_forward, 1)
    encode_s, raw_s = statistics.median(encode_times), statistics.median(raw_times)
    return {
        "passages": len(passages), "batch_size": batch_size or "auto",
        "batch_sizes": sorted({len(index) for index in buckets}), "real_tokens": tokens,
        "encode_median_s": encode_s, "raw_forward_median_s": raw_s,
        "encode_passages_per_s": len(passages) / encode_s,
        "raw_forward_passages_per_s": len(passages) / raw_s,
        "encode_tokens_per_s": tokens / encode_s,
        "overhead_ratio": encode_s / raw_s,
        "runs_encode_s": encode_times, "runs_raw_s": raw_times,
    }


def bench_query(student, passages: list[str], queries: list[str], top_k: int,
                corpus_size: int, repeats: int, teacher_name: str | None,
                teacher_repeats: int) -> dict:
    from llama_index.core.schema import TextNode
    from llama_index.vector_stores.qdrant import QdrantVectorStore

    from llama_index_d2llm import D2LLMEmbedding, D2LLMRetriever
    from llama_index_d2llm.edge import EdgeClient
    from llama_index_d2llm.qdrant import record_student

    embed = D2LLMEmbedding.from_student(student)
    vectors = student.encode(passages, kind="passage")
    # Pad the collection to a realistic size with random unit vectors (search cost depends
    # on the collection size, not on the vectors' meaning).
    extra = torch.nn.functional.normalize(torch.randn(max(0, corpus_size - len(passages)),
                                                      student.dimension), dim=-1)
    all_vectors = torch.cat([vectors, extra])
    texts = passages + [f"filler {i}" for i in range(len(extra))]
    nodes = [TextNode(text=t, embedding=v.tolist())
             for t, v in zip(texts, all_vectors, strict=True)]
    with tempfile.TemporaryDirectory() as qdrant_path:
        client = EdgeClient.open(qdrant_path)  # the embedded store
        store = QdrantVectorStore(client=client, collection_name="bench")
        store.add(nodes)
        record_student(store, student)  # the filler vectors would fail the sampling check
        retriever = D2LLMRetriever(vector_store=store, embed_model=embed,
                                   similarity_top_k=top_k, top_n=10)
        retriever.retrieve(queries[0])  # warm-up, records the student with the collection
        query_times = []
        for i in range(repeats):
            query_times += timed(lambda i=i: retriever.retrieve(queries[(i + 1) % len(queries)]),
                                 1)
        hits = retriever.retrieve(queries[1])
        client.close()
    result = {
        "collection_size": len(texts), "top_k": top_k,
        "d2llm_query_median_s": statistics.median(query_times), "runs_d2llm_s": query_times,
        "returned": len(hits),
    }
    if teacher_name != "none":
        from llama_index_d2llm.trainer.teacher import Teacher

        teacher = Teacher.from_pretrained(teacher_name, cache_dir=None)
        candidates = passages[:top_k]
        cross_times = []
        for i in range(teacher_repeats):
            query = queries[(i + 2) % len(queries)]
            cross_times += timed(lambda q=query: teacher.score([q] * len(candidates), candidates),
                                 1)
        result.update({
            "teacher_mode": teacher.mode,
            "cross_encoder_median_s": statistics.median(cross_times),
            "runs_cross_encoder_s": cross_times,
            "speedup_vs_cross_encoder": statistics.median(cross_times)
            / result["d2llm_query_median_s"],
        })
    return result


def load_student(path: str | None, dtype: str = "auto"):
    """A saved student, or an untrained one on the offline Gemma 3 270M (the real shape)."""
    from llama_index_d2llm import D2LLMStudent

    if path:
        return D2LLMStudent.from_pretrained(path, dtype=dtype)
    student = D2LLMStudent.from_backbone(None, dtype=dtype, seed=0)
    student.merge_lora()  # what from_pretrained does for inference
    return student


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default=None,
                        help="saved student directory; default: an untrained student on the "
                             "offline Gemma 3 270M (same shape, same speed)")
    parser.add_argument("--teacher", default=None,
                        help="teacher for the cross-encoder baseline (default: offline Gemma "
                             "3 270M); 'none' skips it")
    parser.add_argument("--passages", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="texts per batch; default: encode()'s (16 on a CPU, from the free "
                        "memory on CUDA)")
    parser.add_argument("--data", type=Path, default=SHARED_SCIFACT,
                        help="a BEIR folder (corpus.jsonl, queries.jsonl)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--query-repeats", type=int, default=7)
    parser.add_argument("--teacher-repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--corpus-size", type=int, default=5183)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    start = clock()
    student = load_student(args.student, args.dtype)
    load_s = clock() - start
    passages, queries = load_passages(max(args.passages, args.top_k), data=args.data)
    report = {
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                    "torch": torch.__version__, "device": str(student.device),
                    "dtype": str(student.backbone_dtype)},
        "student": student.name, "load_s": load_s,
        "non_embedding_params": sum(
            p.numel() for p in student.body.parameters()
            if p is not student.body.get_input_embeddings().weight),
        "max_passage_length": student.config.max_passage_length,
        "encoding": bench_encoding(student, passages[:args.passages], args.batch_size,
                                   args.repeats),
        "query": bench_query(student, passages[:args.top_k], queries, args.top_k,
                             args.corpus_size, args.query_repeats, args.teacher,
                             args.teacher_repeats),
    }
    enc, query = report["encoding"], report["query"]
    print(f"encode: {enc['encode_passages_per_s']:.1f} passages/s "
          f"({enc['encode_tokens_per_s']:.0f} tokens/s); raw backbone forward on the same "
          f"batches: {enc['raw_forward_passages_per_s']:.1f} passages/s; "
          f"overhead x{enc['overhead_ratio']:.3f}")
    print(f"one query (encode + Qdrant top {query['top_k']} of {query['collection_size']} + "
          f"IEM): {query['d2llm_query_median_s'] * 1000:.1f} ms")
    if "cross_encoder_median_s" in query:
        print(f"cross-encoder ({query['teacher_mode']}) on the same {query['top_k']} passages: "
              f"{query['cross_encoder_median_s']:.2f} s; D2LLM is "
              f"{query['speedup_vs_cross_encoder']:.0f}x faster")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
