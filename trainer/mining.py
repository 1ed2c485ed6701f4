"""Stage 3: hard negatives mined with BM25 (as in the released D2LLM code), and during
training with the student's own vectors (``mine_with_vectors``).

A hard negative is a passage that BM25 ranks near the top for a query but that is not one of
its positives: lexically close, so the student must learn more than word overlap. Scores are
exactly ``rank_bm25.BM25Okapi``'s, computed from posting lists (one numpy add per query term)
instead of its per-document Python loop, which took minutes for a few thousand queries.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llama_index_d2llm.student.files import atomic_write_json
from llama_index_d2llm.trainer.cache import content_key, read_json
from llama_index_d2llm.trainer.corpus import CorpusError, Passage
from llama_index_d2llm.trainer.queries import Query

if TYPE_CHECKING:
    from llama_index_d2llm.student import D2LLMStudent
    from llama_index_d2llm.trainer.checkpoints import TrainerState
    from llama_index_d2llm.trainer.dataset import TrainingExample
    from llama_index_d2llm.trainer.encoding import TextEncoder

logger = logging.getLogger(__name__)

MINING_VERSION = "bm25okapi-words-v1"
_WORD = re.compile(r"\w+")


def bm25_tokenize(text: str) -> list[str]:
    """Lowercase word tokens: simple, language-agnostic enough, and stable across versions."""
    return _WORD.findall(text.lower())


class BM25Index:
    """BM25Okapi (k1=1.5, b=0.75, rank_bm25's defaults) over passages."""

    def __init__(self, passages: Sequence[Passage], k1: float = 1.5, b: float = 0.75):
        from rank_bm25 import BM25Okapi

        if not passages:
            raise CorpusError("cannot build a BM25 index over no passages: load a corpus first")
        self.ids = [passage.id for passage in passages]
        tokens = [bm25_tokenize(passage.text) for passage in passages]
        if not any(tokens):
            raise CorpusError("no passage has a word in it, BM25 has nothing to index: check "
                              "the corpus text")
        bm25 = BM25Okapi(tokens, k1=k1, b=b)
        lengths = np.asarray(bm25.doc_len, dtype=np.float64)
        norm = k1 * (1 - b + b * lengths / bm25.avgdl)
        postings: dict[str, tuple[list[int], list[float]]] = {}
        for doc, freqs in enumerate(bm25.doc_freqs):
            for term, count in freqs.items():
                docs, weights = postings.setdefault(term, ([], []))
                docs.append(doc)
                weights.append(count * (k1 + 1) / (count + norm[doc]))
        # term -> (documents containing it, idf * saturated tf): a query adds one row per term
        self._postings = {term: (np.asarray(docs, dtype=np.int64),
                                 bm25.idf.get(term, 0.0) * np.asarray(weights))
                          for term, (docs, weights) in postings.items()}

    def __len__(self) -> int:
        return len(self.ids)

    def scores(self, text: str) -> np.ndarray:
        """BM25 score of every passage for ``text`` (same as ``BM25Okapi.get_scores``)."""
        scores = np.zeros(len(self.ids))
        for term in bm25_tokenize(text):
            posting = self._postings.get(term)
            if posting is not None:
                scores[posting[0]] += posting[1]
        return scores

    def search(self, text: str, top_k: int) -> list[tuple[str, float]]:
        """(passage id, score) of the ``top_k`` best passages, best first, ties by corpus order."""
        scores = self.scores(text)
        top_k = min(top_k, len(scores))
        if top_k <= 0:
            return []
        if top_k < len(scores):
            candidates = np.argpartition(-scores, top_k - 1)[:top_k]
            threshold = scores[candidates].min()
            candidates = np.flatnonzero(scores >= threshold)  # all ties, for a stable order
        else:
            candidates = np.arange(len(scores))
        order = candidates[np.lexsort((candidates, -scores[candidates]))][:top_k]
        return [(self.ids[i], float(scores[i])) for i in order]


def mine_hard_negatives(queries: list[Query], passages: list[Passage], *, num_negatives: int = 8,
                        depth: int | None = None, cache_dir: Path | None = None,
                        index: BM25Index | None = None, show_progress: bool = True
                        ) -> dict[str, list[str]]:
    """query id -> up to ``num_negatives`` hard-negative passage ids, best BM25 first.

    For each query the top ``depth`` passages (default: ``num_negatives`` + its number of
    positives, so that removing the positives still leaves ``num_negatives``) minus its
    positives. A positive is never returned. Cached under ``cache_dir`` by corpus, queries and
    settings.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be at least 1, got {num_negatives}")
    if len(passages) < num_negatives + 1:
        raise CorpusError(
            f"the corpus has {len(passages)} passages, too few to mine {num_negatives} hard "
            f"negatives per query (at least {num_negatives + 1} are needed): add documents or "
            f"lower num_negatives to at most {max(len(passages) - 1, 0)}"
        )
    if depth is not None and depth < num_negatives:
        raise ValueError(f"depth={depth} is smaller than num_negatives={num_negatives}: raise it")
    cache_file = None
    if cache_dir is not None:
        key = content_key(
            MINING_VERSION, num_negatives, depth,
            [(p.id, p.text) for p in passages], [(q.id, q.text, q.positives) for q in queries],
        )
        cache_file = Path(cache_dir) / "hard-negatives" / f"{key[:24]}.json"
        cached = read_json(cache_file)
        if isinstance(cached, dict) and set(cached) == {q.id for q in queries}:
            return cached
    index = index if index is not None else BM25Index(passages)
    iterator = queries
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(queries, desc="mining BM25 negatives", unit="query")
    negatives: dict[str, list[str]] = {}
    short = 0
    for query in iterator:
        positives = set(query.positives)
        top = index.search(query.text, depth or num_negatives + len(positives))
        negatives[query.id] = [pid for pid, _ in top if pid not in positives][:num_negatives]
        short += len(negatives[query.id]) < num_negatives
    if short:
        logger.warning("%d queries got fewer than %d negatives (depth %s too small)", short,
                       num_negatives, depth)
    if cache_file is not None:
        atomic_write_json(cache_file, negatives)
    return negatives


def _fused_order(*rankings: Sequence[str], constant: int = 60) -> list[str]:
    """Ids of several rankings ordered by reciprocal rank fusion (ties: first seen first)."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, pid in enumerate(ranking, start=1):
            scores[pid] = scores.get(pid, 0.0) + 1.0 / (constant + rank)
    return sorted(scores, key=lambda pid: -scores[pid])


def mine_with_vectors(query_vectors: torch.Tensor, passage_vectors: torch.Tensor,
                      passage_ids: Sequence[str], exclude: Sequence[set[str]], *, count: int,
                      depth: int, seed: str,
                      lexical: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
    """Per query, ``count`` passages drawn from its ``depth`` nearest by cosine, none excluded.

    With ``lexical`` (per query, passage ids in BM25's order), "nearest" is the hybrid order
    instead: cosine and BM25 ranks fused by reciprocal rank (``1/(60 + rank)`` summed), the
    candidates a hybrid retriever hands the IEM.

    The student's own first-stage mistakes (as in ANCE): what a vector search will return and
    the IEM must reorder, unlike BM25's look-alikes. Drawn at random from the top ``depth``
    rather than taking the very top, where unjudged relevant passages (false negatives)
    gather. ``exclude[i]`` holds query ``i``'s positives (and any passages it already uses);
    when fewer than ``count`` remain in the top ``depth``, the next ranks fill in. The draw is
    seeded by ``seed`` and the query's position, so it is reproducible.
    """
    if count < 1 or depth < count:
        raise ValueError(f"need 1 <= count <= depth, got count={count}, depth={depth}")
    if len(query_vectors) != len(exclude):
        raise ValueError(f"{len(query_vectors)} query vectors but {len(exclude)} exclude sets")
    passages = torch.nn.functional.normalize(passage_vectors.float(), dim=-1)
    queries = torch.nn.functional.normalize(query_vectors.float(), dim=-1)
    scores = queries @ passages.T
    known = set(passage_ids)
    mined: list[list[str]] = []
    for row, banned in enumerate(exclude):
        banned = banned & known
        if len(known) - len(banned) < count:
            raise CorpusError(f"only {len(known) - len(banned)} passages are not already used "
                              f"by a query, too few to mine {count} negatives from: lower "
                              "--student-negatives or add documents")
        # at most len(banned) of the nearest are excluded: this many always leave `depth`
        nearest = scores[row].topk(min(len(passage_ids), depth + len(banned))).indices.tolist()
        ranked = [passage_ids[i] for i in nearest]
        if lexical is not None:
            ranked = _fused_order(ranked, lexical[row])
        pool = [pid for pid in ranked if pid not in banned][:depth]
        rng = random.Random(f"{seed}:{row}")
        mined.append(rng.sample(pool, count))
    return mined


@dataclass
class StudentNegativeMiner:
    """``--student-negatives``: each epoch from the second on, negatives from the student.

    The student (as trained so far) embeds the whole corpus and each training query draws its
    negatives from its own nearest passages (``mine_with_vectors``), never its positives nor
    the passages it is already scored against. With ``source="hybrid"`` the nearest are taken
    in the hybrid order (cosine fused with the product's BM25).
    """

    student: D2LLMStudent
    encoder: TextEncoder
    examples: Sequence[TrainingExample]
    texts: dict[str, str]
    #: negatives per query (``None`` or 0: none), drawn from the ``depth`` nearest
    count: int | None
    depth: int
    #: "dense" (cosine order) or "hybrid" (cosine fused with BM25)
    source: str
    seed: int
    #: texts encoded per forward
    chunk: int
    _lexical: tuple[list[str], list[list[str]]] | None = field(default=None, init=False,
                                                              repr=False)

    def prepare_epoch(self, state: TrainerState, accelerator: Any) -> None:
        """Give every example this epoch's negatives (none in the first epoch).

        They are kept in ``state`` (so in the checkpoint): a resumed epoch uses the same ones.
        The main process mines, the others receive its result.
        """
        if not self.count or state.epoch < 1:
            return
        if state.mined_epoch != state.epoch or state.mined is None:
            started = time.perf_counter()
            mined = self.mine(state.epoch) if accelerator.is_main_process else None
            if accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                mined = broadcast_object_list([mined], from_process=0)[0]
            seconds = time.perf_counter() - started
            state.mined, state.mined_epoch = mined, state.epoch
            state.mining_seconds += seconds
            logger.info("epoch %d: mined %d negatives per query with the student (%.1f s)",
                        state.epoch, self.count, seconds)
        for example in self.examples:
            example.mined_ids = list(state.mined[example.query_id])

    def mine(self, epoch: int) -> dict[str, list[str]]:
        """query id -> ``count`` negatives, drawn with a seed of (run seed, ``epoch``)."""
        from llama_index_d2llm.student.modes import eval_mode
        from llama_index_d2llm.trainer.encoding import encode_distinct

        by_query: dict[str, tuple[str, set[str]]] = {}
        for example in self.examples:
            banned = by_query.setdefault(example.query_id, (example.query, set()))[1]
            banned |= set(example.relevant_ids) | set(example.candidate_ids)
        query_ids = sorted(by_query)
        passage_ids = sorted(self.texts)
        with eval_mode(self.student), torch.no_grad():
            queries = encode_distinct(self.encoder, [by_query[q][0] for q in query_ids],
                                      "query", self.chunk)
            passages = encode_distinct(self.encoder, [self.texts[p] for p in passage_ids],
                                       "passage", self.chunk)
        lexical = None
        if self.source == "hybrid":
            lexical = self._lexical_rankings(query_ids, [by_query[q][0] for q in query_ids],
                                             passage_ids)
        mined = mine_with_vectors(queries, passages, passage_ids,
                                  [by_query[q][1] for q in query_ids], count=self.count,
                                  depth=self.depth, seed=f"{self.seed}:{epoch}", lexical=lexical)
        return dict(zip(query_ids, mined, strict=True))

    def _lexical_rankings(self, query_ids: list[str], texts: list[str],
                          passage_ids: list[str]) -> list[list[str]]:
        """The product's BM25 ranking of the corpus for each training query (once per run)."""
        from llama_index_d2llm.trainer.dev_ranking import SparseBM25

        cached = self._lexical
        if cached is None or cached[0] != query_ids:
            index = SparseBM25([self.texts[pid] for pid in passage_ids])
            depth = 2 * self.depth
            ranked = [[passage_ids[i] for i, _ in index.search(text, depth)] for text in texts]
            self._lexical = cached = (query_ids, ranked)
        return cached[1]
