"""Where the teacher's time goes: ``Teacher.score`` against a raw forward of the same model.

    python benchmarks/bench_teacher.py --data ../shared/data/scifact --pairs 64

On ``--pairs`` real (claim, passage) pairs of a BEIR data set (half judged positives, half
random passages), for each ``--max-lengths`` value, all on the same batches (the teacher's
own: sorted by length, ``--batch-size`` at a time, right-padded):
  * ``score``: ``Teacher.score`` without a cache (tokenization, body, query-likelihood head);
  * ``body``: the raw forward of the transformer body on those padded batches (the least
    any scorer of these prompts must run);
  * ``causal_lm``: the model's own forward with logits over the whole vocabulary at every
    position (what a naive scorer runs);
  * ``head``: the query-likelihood head alone on the body's states (target logits and the
    log-softmax normaliser over the vocabulary at the query positions);
  * ``encode``: tokenization and prompt building alone;
and, for the body only, other batch shapes (batch 1: no padding at all) and dtypes.
Tokens/s count real (unpadded) prompt tokens. Medians of ``--repeats`` runs after a one-batch
warm-up, variants interleaved so that a busy machine slows them alike. JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import clock  # noqa: E402


def load_pairs(data: Path, count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``count`` (claim, passage) pairs: judged positives and random passages, alternating."""
    from llama_index_d2llm.trainer.corpus import load_beir_corpus

    passages = {p.id: p.text for p in load_beir_corpus(data / "corpus.jsonl")}
    queries = {}
    with (data / "queries.jsonl").open() as f:
        for line in f:
            record = json.loads(line)
            queries[record["_id"]] = record["text"]
    judged = []
    for split in sorted((data / "qrels").glob("*.tsv")):
        for line in split.read_text().splitlines()[1:]:
            query, doc, score = line.split("\t")
            if int(score) > 0 and query in queries and doc in passages:
                judged.append((query, doc))
    rng = random.Random(seed)
    ids = sorted(passages)
    out_q, out_p = [], []
    for query, doc in judged[:(count + 1) // 2]:
        out_q.append(queries[query])
        out_p.append(passages[doc])
        if len(out_q) < count:
            out_q.append(queries[query])
            out_p.append(passages[rng.choice(ids)])
    return out_q, out_p


def padded_batches(teacher, queries, passages):
    """The teacher's own batches: the encoded prompts in length buckets, sized as the teacher
    sizes them (its batch size, or from the free memory), right-padded on its device (on
    CUDA they stayed on the host: a device mismatch)."""
    from llama_index_d2llm.student.batching import length_batches
    from llama_index_d2llm.trainer.teacher_tokens import pad_batch

    template = teacher.templates["asymmetric"]
    encoded = [teacher._encode(template, q, p) for q, p in zip(queries, passages, strict=True)]
    pad = teacher.tokenizer.pad_token_id or 0
    batches = []
    for index in length_batches([len(e.ids) for e in encoded], teacher._batch_size_for):
        items = [encoded[i] for i in index]
        ids, mask, _ = pad_batch(items, pad, teacher.device)
        batches.append((items, ids, mask))
    return encoded, batches


def non_embedding_params(model) -> int:
    """Weights a token passes through in the body (not the embedding table, nor the tied LM
    head that scoring reads only a few rows of)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each variant, the variants in turn each round (warm up first)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(model, tokenizer, args, max_length: int, queries, passages) -> dict:
    from llama_index_d2llm.trainer.teacher import Teacher

    teacher = Teacher(model, tokenizer, name="bench", max_length=max_length,
                      batch_size=args.batch_size)
    encoded, batches = padded_batches(teacher, queries, passages)
    real = sum(len(item.ids) for item in encoded)
    padded = sum(ids.numel() for _, ids, _ in batches)
    query_tokens = sum(item.query_end - item.query_start for item in encoded)
    template = teacher.templates["asymmetric"]
    instruction = len(teacher._bos) + sum(len(teacher._encode_text(part.text))
                                          for part in template.parts() if part.kind == "text")

    def body(batch_list=batches):
        with torch.inference_mode():
            for _, ids, mask in batch_list:
                teacher.body(input_ids=ids, attention_mask=mask)

    def causal_lm():
        with torch.inference_mode():
            for _, ids, mask in batches:
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    states = []
    with torch.inference_mode():
        for items, ids, mask in batches:
            states.append((items, teacher.body(input_ids=ids, attention_mask=mask)
                           .last_hidden_state))

    def head():
        from llama_index_d2llm.trainer.teacher_tokens import query_spans

        with torch.inference_mode():
            for (items, ids, _), (_, hidden) in zip(batches, states, strict=True):
                teacher.head.query_likelihood(hidden, ids, *query_spans(items, teacher.device))

    def encode():
        [teacher._encode(template, q, p) for q, p in zip(queries, passages, strict=True)]

    def score():
        teacher.score(queries, passages)

    # warm-up on one batch: allocator, thread pool and kernels, without a whole extra pass
    body(batches[:1])
    first = len(batches[0][0])
    teacher.score(queries[:first], passages[:first])
    variants = {"score": score, "body": body, "causal_lm": causal_lm, "head": head,
                "encode": encode}
    main = interleaved({k: v for k, v in variants.items() if k not in args.skip}, args.repeats)
    # other batch shapes of the body, same prompts: batch 1 has no padding at all
    shapes = {}
    for size in args.shape_batch_sizes:
        teacher.batch_size = size
        _, other = padded_batches(teacher, queries, passages)
        shapes[f"batch_{size}"] = (other, sum(ids.numel() for _, ids, _ in other))
    teacher.batch_size = args.batch_size
    shape_times = interleaved({name: (lambda b=b: body(b)) for name, (b, _) in shapes.items()},
                              max(1, args.repeats - 1))
    result = {
        "max_length": max_length, "pairs": len(encoded), "real_tokens": real,
        "padded_tokens": padded, "padding_share": round(1 - real / padded, 4),
        "mean_prompt_tokens": round(real / len(encoded), 1),
        "instruction_tokens_per_prompt": instruction,
        "query_tokens_per_prompt": round(query_tokens / len(encoded), 1),
        "truncated_prompts": sum(item.truncated for item in encoded),
        "seconds": {k: round(v, 3) for k, v in main.items()},
        "tokens_per_s": {k: round(real / main[k], 1)
                         for k in ("score", "body", "causal_lm") if k in main},
        "score_vs_body": round(main["body"] / main["score"], 3),
        "score_vs_causal_lm": (round(main["causal_lm"] / main["score"], 3)
                               if "causal_lm" in main else None),
        "share_of_score": {k: round(main[k] / main["score"], 3)
                           for k in ("body", "head", "encode") if k in main},
        "body_batch_shapes": {name: {"seconds": round(shape_times[name], 3),
                                     "padded_tokens": shapes[name][1],
                                     "tokens_per_s": round(real / shape_times[name], 1)}
                              for name in shapes},
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"))
    parser.add_argument("--teacher", default=None, help="default: the offline Gemma 3 270M")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch-size", type=int, default=None,
                        help="pairs per batch; default: the teacher's (from the free memory on "
                        "CUDA, 8 on a CPU)")
    parser.add_argument("--shape-batch-sizes", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16"],
                        help="other dtypes for the body forward (max length of the first run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["causal_lm", "head", "encode"],
                        help="variants not to time (score and body always run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from llama_index_d2llm.student import backbone as bb

    device = bb.resolve_device(args.device)
    dtype = bb.resolve_dtype(args.dtype, device)
    path = bb.resolve_backbone(args.teacher)
    tokenizer = bb.load_tokenizer(path)
    model = bb.load_pretrained(AutoModelForCausalLM, path, dtype=dtype).to(device).eval()
    queries, passages = load_pairs(args.data, args.pairs)
    runs = [measure(model, tokenizer, args, length, queries, passages)
            for length in args.max_lengths]
    params = non_embedding_params(model)
    for run in runs:  # 2 FLOPs per weight per token (attention's own FLOPs left out: a floor)
        run["tflop_per_s"] = {k: round(2 * params * v / 1e12, 3)
                              for k, v in run["tokens_per_s"].items()}
    dtypes = {}
    for name in args.dtypes:
        other = bb.resolve_dtype(name, device)
        if other == dtype:
            continue
        model.to(other)
        from llama_index_d2llm.trainer.teacher import Teacher

        teacher = Teacher(model, tokenizer, name="bench", max_length=args.max_lengths[0],
                          batch_size=args.batch_size)
        _, batches = padded_batches(teacher, queries, passages)

        def body(teacher=teacher, batches=batches):
            with torch.inference_mode():
                for _, ids, mask in batches:
                    teacher.body(input_ids=ids, attention_mask=mask)
        body(batches=batches[:1])  # warm-up
        seconds = interleaved({"body": body}, max(1, args.repeats - 1))["body"]
        dtypes[str(other)] = {"max_length": args.max_lengths[0], "body_seconds": round(seconds, 3),
                              "tokens_per_s": round(runs[0]["real_tokens"] / seconds, 1)}
        model.to(dtype)
    result = {
        "teacher": args.teacher or bb.DEFAULT_BACKBONE_NAME, "device": str(device),
        "dtype": str(dtype), "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(), "cpu_has_fast_bf16": bb.cpu_has_fast_bf16(),
        "platform": platform.platform(), "python": sys.version.split()[0],
        "torch": torch.__version__, "batch_size": args.batch_size, "repeats": args.repeats,
        "non_embedding_params": params, "runs": runs, "body_other_dtypes": dtypes,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
