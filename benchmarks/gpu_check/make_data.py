"""A SciFact subset that travels with the GPU check (``../shared`` does not travel).

    python make_data.py SRC_DIR OUT_DIR [--queries N] [--corpus N] [--seed S]

Keeps N train queries that have judged passages (all 809 of SciFact by default: the check
distils on the whole training set), their qrels, and a corpus of their positives filled up
with random other passages to ``--corpus`` (all 5,183 by default: retrieval latency depends on
the collection's size). Lines are copied as they are, so the subset reads like the original.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--queries", type=int, default=None, help="default: all judged ones")
    parser.add_argument("--corpus", type=int, default=None, help="default: the whole corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    qrels = (args.src / "qrels" / "train.tsv").read_text().splitlines()
    header, rows = qrels[0], [line.split("\t") for line in qrels[1:] if line.strip()]
    judged = sorted({q for q, _, score in rows if int(score) > 0})
    rng = random.Random(args.seed)
    keep = set(judged if args.queries is None else rng.sample(judged, min(args.queries,
                                                                           len(judged))))
    rows = [r for r in rows if r[0] in keep]
    positives = {d for _, d, _ in rows}
    corpus = {json.loads(line)["_id"]: line for line in
              (args.src / "corpus.jsonl").read_text().splitlines() if line.strip()}
    others = sorted(set(corpus) - positives)
    room = len(corpus) if args.corpus is None else max(args.corpus, len(positives))
    chosen = positives | set(rng.sample(others, max(0, min(len(others), room - len(positives)))))
    (args.out / "qrels").mkdir(parents=True, exist_ok=True)
    (args.out / "qrels" / "train.tsv").write_text(
        "\n".join([header, *("\t".join(r) for r in rows)]) + "\n")
    (args.out / "corpus.jsonl").write_text(
        "".join(corpus[i] + "\n" for i in corpus if i in chosen))
    queries = [line for line in (args.src / "queries.jsonl").read_text().splitlines()
               if line.strip() and json.loads(line)["_id"] in keep]
    (args.out / "queries.jsonl").write_text("".join(q + "\n" for q in queries))
    summary = {"queries": len(queries), "qrels": len(rows), "corpus": len(chosen)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
