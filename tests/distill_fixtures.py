"""A tiny BEIR data set and a fake teacher for the trainer's tests (no network, no model)."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch

TOPICS = [
    ("cat", "mat"), ("dog", "park"), ("protein", "cell"), ("gene", "cancer"),
    ("water", "river"), ("energy", "sun"), ("climate", "city"), ("history", "music"),
    ("computer", "network"), ("model", "data"), ("quantum", "physics"), ("chemistry", "moon"),
]
FILLER = ["the", "a", "on", "in", "of", "and"]


def write_beir(directory: Path, split: str = "train") -> Path:
    """24 passages (two per topic) and 12 queries whose positive is the first of their topic."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = [], [], []
    for t, (a, b) in enumerate(TOPICS):
        other = TOPICS[(t + 1) % len(TOPICS)]
        corpus.append({"_id": f"d{t}a", "title": "", "text": f"the {a} and the {b} of the {a}"})
        corpus.append({"_id": f"d{t}b", "title": "",
                       "text": f"a {a} in the {other[0]} on the {other[1]}"})
        queries.append({"_id": f"q{t}", "text": f"{a} {b}"})
        qrels.append((f"q{t}", f"d{t}a", 1))
    with (directory / "corpus.jsonl").open("w") as f:
        f.writelines(json.dumps(record) + "\n" for record in corpus)
    with (directory / "queries.jsonl").open("w") as f:
        f.writelines(json.dumps(record) + "\n" for record in queries)
    (directory / "qrels").mkdir(exist_ok=True)
    with (directory / "qrels" / f"{split}.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{s}\n" for q, d, s in qrels)
    return directory


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower())) - set(FILLER)


class OverlapTeacher:
    """Judges relevance by shared content words: deterministic, and a signal a student can learn.

    ``z_T`` = 3 * (Jaccard overlap) - 1, ``s_T`` = sigmoid(z_T), features = hashed bag of words
    of the concatenated pair.
    """

    mode = "overlap"
    fingerprint = "overlap-teacher"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, queries, passages, task="asymmetric", show_progress=False):
        from types import SimpleNamespace

        self.calls += 1
        logits, features = [], []
        for query, passage in zip(queries, passages, strict=True):
            q, p = _words(query), _words(passage)
            logits.append(3.0 * len(q & p) / max(len(q | p), 1) - 1.0)
            vector = torch.zeros(16)
            for word in q | p:
                vector[zlib.crc32(word.encode()) % 16] += 1.0
            features.append(vector)
        logits = torch.tensor(logits)
        return SimpleNamespace(logits=logits, probs=torch.sigmoid(logits),
                               features=torch.stack(features))

    batch_size = 8
    max_length = 512

    def truncate(self, text: str, max_tokens: int) -> str:
        return text

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompts, max_new_tokens=32, **kwargs):
        """A "query" of the first two content words of the prompt's last passage."""
        queries = []
        for prompt in prompts:
            passage = prompt.rsplit("Passage: ", 1)[-1].split("\nQuestion:", 1)[0]
            words = [w for w in re.findall(r"\w+", passage.lower()) if w not in FILLER]
            queries.append(" " + " ".join(words[:2]) + "\n")
        return queries
