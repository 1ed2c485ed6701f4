"""Which rescoring of the hybrid candidates holds out best? The probe behind student/fusion.py.

    python benchmarks/probes/fusion_probe.py --work runs/kfold --variant labels

For each k-fold student that ``scifact_kfold.py`` left under ``--work`` (frozen backbone: its
vectors are PMA over the cached token states, no backbone run), every claim is searched over
the whole corpus: dense top 100, BM25 top 100 (the product's BM25, as Qdrant scores it), RRF
of both cut to 100 (the hybrid first stage). Those candidates are then reordered by:

- ``rrf``: their own order; ``dense``, ``bm25``, ``iem``: one evidence alone;
- ``z:cos+B*bm25[+G*iem]``: evidences standardised over the candidate list and summed
  (``student/fusion.py``); ``minmax:``, ``raw:`` the same with min-max or no normalisation;
- ``zero-bm25:``: as ``z:``, with BM25 known only for BM25's own top 100 (0 elsewhere), what a
  retriever gets without a second sparse query;
- ``dense:cos+G*iem``: the dense top 100 rescored.

nDCG@10 per group of claims (``test``: the held-out fold; ``dev``: the distiller's dev split;
``train``: what the student trained on), mean and standard deviation over the folds, written
to ``--output``. No choice is made here: every row is an oracle curve.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

DEPTH = 100
RRF_K = 60


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(path.read_text().splitlines()):
        parts = line.strip().split("\t")
        if number == 0 and not parts[-1].isdigit():
            continue
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return qrels


def zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-9)


def minmax(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(-1, keepdim=True).values, x.max(-1, keepdim=True).values
    return (x - low) / (high - low + 1e-9)


def ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    out = torch.empty_like(order)
    out.scatter_(-1, order, torch.arange(1, x.shape[-1] + 1).expand_as(order))
    return out.float()


def vectors(work: Path, variant: str, fold: int, passages: list, queries: list) -> dict:
    """The fold's student's query and passage vectors and IEM weights (cached under
    WORK/probe as safetensors: no pickle)."""
    from safetensors.torch import load_file, save_file

    from llama_index_d2llm.student import D2LLMStudent
    from llama_index_d2llm.trainer.encoding import encode_distinct
    from llama_index_d2llm.trainer.token_states import TokenStateCache

    target = work / "probe" / f"{variant}-fold{fold}.safetensors"
    if target.exists():
        return _unpack(load_file(target))
    student = D2LLMStudent.from_pretrained(work / "students" / f"{variant}-fold{fold}",
                                           dtype="bfloat16")
    student.eval()
    cache = TokenStateCache(student, work / "distill" / "token_states", show_progress=False)
    with torch.no_grad():
        texts = [q.text for q in queries]
        cache.ensure(texts, "query")
        cache.ensure([p.text for p in passages], "passage")
        found = {"q": encode_distinct(cache.vectors, texts, "query", 64).float(),
                 "p": encode_distinct(cache.vectors, [p.text for p in passages], "passage",
                                      64).float(),
                 "iem": student.iem.state_dict(), "iem_hidden": student.config.iem_hidden_size}
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({"q": found["q"].contiguous(), "p": found["p"].contiguous(),
               "iem_hidden": torch.tensor(found["iem_hidden"]),
               **{f"iem.{k}": v.float().contiguous() for k, v in found["iem"].items()}},
              str(target))
    return found


def _unpack(tensors: dict[str, torch.Tensor]) -> dict:
    return {"q": tensors["q"], "p": tensors["p"], "iem_hidden": int(tensors["iem_hidden"]),
            "iem": {k[len("iem."):]: v for k, v in tensors.items() if k.startswith("iem.")}}


def fold_rows(c: torch.Tensor, b: torch.Tensor, q: torch.Tensor, p: torch.Tensor, iem,
              score) -> dict[str, float]:
    """Every reordering of one group of queries: ``c`` cosines and ``b`` BM25 scores over the
    corpus, ``score(candidates, scores)`` its nDCG@10."""
    count = c.shape[0]
    positions = torch.arange(1, DEPTH + 1).float()
    dense_top = c.topk(DEPTH, dim=1).indices
    bm_top = b.topk(DEPTH, dim=1).indices
    matched = (b.gather(1, bm_top) > 0).float()
    fused = torch.zeros_like(c)
    fused.scatter_add_(1, dense_top, (1 / (RRF_K + positions)).expand(count, -1).contiguous())
    fused.scatter_add_(1, bm_top, matched / (RRF_K + positions))
    cand = fused.topk(DEPTH, dim=1).indices  # the hybrid first stage, in fused order
    cos, bm = c.gather(1, cand), b.gather(1, cand)
    with torch.no_grad():
        logits = iem(q, p[cand]).float()
        dense_logits = iem(q, p[dense_top]).float()
    known = torch.zeros_like(b, dtype=torch.bool).scatter_(1, bm_top, matched.bool())
    bm_zero = torch.where(known.gather(1, cand), bm, torch.zeros_like(bm))
    rows = {"rrf": score(cand, -positions.expand(count, -1)), "dense": score(cand, cos),
            "bm25": score(cand, bm), "iem": score(cand, logits)}
    for beta in (0.25, 0.5, 0.75, 1.0, 1.5):
        rows[f"z:cos+{beta}*bm25"] = score(cand, zscore(cos) + beta * zscore(bm))
        rows[f"zero-bm25:cos+{beta}*bm25"] = score(cand, zscore(cos) + beta * zscore(bm_zero))
        rows[f"minmax:cos+{beta}*bm25"] = score(cand, minmax(cos) + beta * minmax(bm))
    for lam in (0.005, 0.01, 0.02, 0.04):
        rows[f"raw:cos+{lam}*bm25"] = score(cand, cos + lam * bm)
    for gamma in (0.1, 0.25, 0.5, 1.0):
        rows[f"z:cos+0.5*bm25+{gamma}*iem"] = score(
            cand, zscore(cos) + 0.5 * zscore(bm) + gamma * zscore(logits))
        rows[f"rrf+{gamma}*iem-rank"] = score(
            cand, 1 / (RRF_K + positions) + gamma / (RRF_K + ranks(logits)))
    for gamma in (0.0, 0.1, 0.25, 0.5, 1.0):
        rows[f"dense:cos+{gamma}*iem"] = score(
            dense_top, zscore(c.gather(1, dense_top)) + gamma * zscore(dense_logits))
    return rows


def main() -> None:
    from llama_index_d2llm.student.iem import InteractionEmulation
    from llama_index_d2llm.trainer.corpus import load_beir_corpus
    from llama_index_d2llm.trainer.dev_ranking import SparseBM25
    from llama_index_d2llm.trainer.evaluation import evaluate_run
    from llama_index_d2llm.trainer.queries import load_queries, split_queries

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("runs/kfold"))
    parser.add_argument("--variant", default="labels")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/scifact"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/fusion-probe-kfold.json"))
    args = parser.parse_args()
    passages = load_beir_corpus(args.data / "corpus.jsonl")
    pids = [p.id for p in passages]
    fold0 = args.work / "folds" / "fold0"
    every = read_qrels(fold0 / "qrels/train.tsv") | read_qrels(fold0 / "qrels/test.tsv")
    claims = [json.loads(line) for line in (fold0 / "queries.jsonl").read_text().splitlines()]
    queries = [q for q in load_queries_all(claims)]
    position = {q.id: i for i, q in enumerate(queries)}
    index = SparseBM25([p.text for p in passages])
    bm25 = torch.from_numpy(np.stack([index.scores(q.text) for q in queries])).float()
    table: dict[str, dict[str, list[float]]] = {}
    for fold in range(args.folds):
        found = vectors(args.work, args.variant, fold, passages, queries)
        q = torch.nn.functional.normalize(found["q"], dim=-1)
        p = torch.nn.functional.normalize(found["p"], dim=-1)
        iem = InteractionEmulation(q.shape[1], found["iem_hidden"], True)
        iem.load_state_dict(found["iem"])
        iem.eval()
        fold_dir = args.work / "folds" / f"fold{fold}"
        test = read_qrels(fold_dir / "qrels/test.tsv")
        train = load_queries(fold_dir / "queries.jsonl", fold_dir / "qrels/train.tsv", set(pids))
        _, dev = split_queries(train, 0.1, 2023)
        dev_ids = {x.id for x in dev}
        groups = {"test": sorted(test), "dev": sorted(dev_ids),
                  "train": sorted({x.id for x in train} - dev_ids)}
        for group, ids in groups.items():
            rows = torch.tensor([position[i] for i in ids])

            def score(cand: torch.Tensor, values: torch.Tensor, ids=ids) -> float:
                run = {i: {pids[j]: float(v) for j, v in zip(cand[n].tolist(),
                                                             values[n].tolist(), strict=True)}
                       for n, i in enumerate(ids)}
                return evaluate_run({i: every[i] for i in ids}, run, ["ndcg@10"])["ndcg@10"]

            for key, value in fold_rows((q[rows] @ p.T), bm25[rows], q[rows], p, iem,
                                        score).items():
                table.setdefault(group, {}).setdefault(key, []).append(value)
        print(f"fold {fold}: test rrf {table['test']['rrf'][-1]:.4f}, "
              f"z:cos+0.5*bm25 {table['test']['z:cos+0.5*bm25'][-1]:.4f}", flush=True)
    summary = {group: {key: {"mean": statistics.fmean(v), "std": statistics.stdev(v),
                             "folds": v} for key, v in rows.items()}
               for group, rows in table.items()}
    args.output.write_text(json.dumps({"command": "python benchmarks/probes/fusion_probe.py --work "
                                       f"{args.work} --variant {args.variant}",
                                       "ndcg@10": summary}, indent=1))
    for key, value in summary["test"].items():
        print(f"{key:32s} {value['mean']:.4f} +- {value['std']:.4f}  "
              + " ".join(f"{v:.3f}" for v in value["folds"]))


def load_queries_all(claims: list[dict]) -> list:
    from llama_index_d2llm.trainer.queries import Query

    return [Query(str(c["_id"]), c["text"]) for c in claims]


if __name__ == "__main__":
    main()
