"""Training examples: each query with [positive, hard negatives], easy negatives and the
teacher's judgement of every pair; and the collate function that batches them.

A ``RankingItem`` is a query (or the first sentence of a symmetric pair) with its relevant
passages and mined hard negatives: what both training (after teacher scoring) and the dev
evaluation (which needs no teacher) start from. A ``TrainingExample`` is one (query, positive)
pair with everything the losses need. Easy negatives are drawn from the passages the *other*
queries use (their positives and hard negatives), as the released code's in-batch negatives
are: unrelated to this query, and already embedded (or cached) for training anyway.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llama_index_d2llm.trainer.corpus import Passage
from llama_index_d2llm.trainer.losses import cosine_matrix
from llama_index_d2llm.trainer.pairs import SymmetricPair
from llama_index_d2llm.trainer.queries import Query, dev_ids

if TYPE_CHECKING:  # pragma: no cover
    from llama_index_d2llm.trainer.teacher import Teacher

logger = logging.getLogger(__name__)


@dataclass
class RankingItem:
    """A query with the passages that answer it and BM25 look-alikes that do not."""

    id: str
    text: str
    task: str
    positive_ids: list[str]
    hard_negative_ids: list[str]


@dataclass
class TrainingExample:
    """One (query, positive) pair with its hard and easy negatives and the teacher's view.

    ``candidate_ids`` is [positive, hard negatives]; the teacher tensors follow that order.
    ``relevant_ids`` are all the query's positives: another example's positive among them is
    not a negative for this query (masked in the in-batch losses). ``mined_ids`` are negatives
    the trainer mines with the student itself during training (no teacher score).
    """

    query_id: str
    query: str
    task: str
    candidate_ids: list[str]
    relevant_ids: frozenset[str]
    easy_ids: list[str]
    teacher_logits: torch.Tensor
    teacher_probs: torch.Tensor
    easy_probs: torch.Tensor
    teacher_cosines: torch.Tensor | None = None
    mined_ids: list[str] = field(default_factory=list)


@dataclass
class TrainingBatch:
    """Collated examples: texts to embed, teacher targets stacked, the in-batch mask."""

    queries: list[str]
    tasks: list[str]
    candidate_texts: list[list[str]]
    easy_texts: list[list[str]]
    teacher_logits: torch.Tensor
    teacher_probs: torch.Tensor
    easy_probs: torch.Tensor
    false_negatives: torch.Tensor
    teacher_cosines: torch.Tensor | None = None
    query_ids: list[str] = field(default_factory=list)
    mined_texts: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.queries)

    def to(self, device: torch.device | str, **kwargs: Any) -> TrainingBatch:
        """Move the tensors (Accelerate calls this to place a batch)."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, **kwargs)

        return TrainingBatch(self.queries, self.tasks, self.candidate_texts, self.easy_texts,
                             move(self.teacher_logits), move(self.teacher_probs),
                             move(self.easy_probs), move(self.false_negatives),
                             move(self.teacher_cosines), self.query_ids, self.mined_texts)


class Collator:
    """Turns a list of examples into a ``TrainingBatch`` (passage ids resolved to texts)."""

    def __init__(self, texts: dict[str, str]):
        self.texts = texts

    def __call__(self, examples: Sequence[TrainingExample]) -> TrainingBatch:
        sizes = {len(example.candidate_ids) for example in examples}
        easy_sizes = {len(example.easy_ids) for example in examples}
        mined_sizes = {len(example.mined_ids) for example in examples}
        if len(sizes) != 1 or len(easy_sizes) != 1 or len(mined_sizes) != 1:
            raise ValueError("examples of one batch need equally many hard, easy and mined "
                             "negatives")
        positives = [example.candidate_ids[0] for example in examples]
        false_negatives = torch.tensor(
            [[j != i and positives[j] in example.relevant_ids for j in range(len(examples))]
             for i, example in enumerate(examples)], dtype=torch.bool)
        with_cosines = all(example.teacher_cosines is not None for example in examples)
        return TrainingBatch(
            queries=[example.query for example in examples],
            tasks=[example.task for example in examples],
            candidate_texts=[[self.texts[pid] for pid in example.candidate_ids]
                             for example in examples],
            easy_texts=[[self.texts[pid] for pid in example.easy_ids] for example in examples],
            teacher_logits=torch.stack([example.teacher_logits for example in examples]),
            teacher_probs=torch.stack([example.teacher_probs for example in examples]),
            easy_probs=torch.stack([example.easy_probs for example in examples]),
            false_negatives=false_negatives,
            teacher_cosines=(torch.stack([example.teacher_cosines for example in examples])
                             if with_cosines else None),
            query_ids=[example.query_id for example in examples],
            mined_texts=[[self.texts[pid] for pid in example.mined_ids] for example in examples],
        )


# ---------------------------------------------------------------------------- ranking items
def items_from_queries(queries: Sequence[Query], negatives: dict[str, list[str]],
                       passage_ids: Sequence[str], *, num_negatives: int, seed: int,
                       task: str = "asymmetric") -> list[RankingItem]:
    """Items with exactly ``num_negatives`` hard negatives each.

    BM25 may find fewer than asked for a query (a short query over a small corpus); the list
    is then filled with random non-positive passages, so that every example has the same shape.
    """
    items = []
    filled = 0
    crowded = []
    known = set(passage_ids)
    for query in queries:
        positives = list(dict.fromkeys(query.positives))
        if len(known - set(positives)) < num_negatives:
            crowded.append(query.id)  # e.g. a generated query shared by most passages
            continue
        hard = [pid for pid in negatives.get(query.id, []) if pid not in positives]
        hard = list(dict.fromkeys(hard))[:num_negatives]
        if len(hard) < num_negatives:
            filled += 1
            hard += _random_fill(passage_ids, set(positives) | set(hard),
                                 num_negatives - len(hard), f"{seed}:{query.id}:fill")
        items.append(RankingItem(query.id, query.text, task, positives, hard))
    if filled:
        logger.info("%d queries had fewer than %d BM25 negatives; filled with random passages",
                    filled, num_negatives)
    if crowded:
        logger.warning("dropped %d queries with too few non-positive passages for %d negatives "
                       "(e.g. %s)", len(crowded), num_negatives, crowded[0])
        if not items:
            raise ValueError(
                f"no query has {num_negatives} passages that are not its positives: lower "
                "--num-negatives or add documents (generated queries may have collapsed into "
                "one; check the teacher)"
            )
    return items


def _random_fill(pool: Sequence[str], exclude: set[str], count: int, seed: str) -> list[str]:
    rng = random.Random(seed)
    available = len(pool) - len(exclude & set(pool))
    if available < count:
        raise ValueError(f"only {available} passages are left to draw {count} negatives from: "
                         "add passages or lower --num-negatives")
    chosen: list[str] = []
    taken = set(exclude)
    while len(chosen) < count:
        for pid in rng.sample(list(pool), min(len(pool), 2 * count + len(exclude))):
            if pid not in taken:
                chosen.append(pid)
                taken.add(pid)
                if len(chosen) == count:
                    break
    return chosen


def sentence_id(text: str) -> str:
    """A stable passage id for a sentence of a symmetric pair."""
    return "sentence:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def pair_items(pairs: Sequence[SymmetricPair], *, num_negatives: int, min_score: float,
               seed: int, cache_dir: Any = None, show_progress: bool = True
               ) -> tuple[list[Passage], list[RankingItem]]:
    """Symmetric items from sentence pairs: (the sentences as passages, one item per sentence a).

    A pair whose score is unknown or at least ``min_score`` makes ``text_b`` a positive of
    ``text_a``. A pair scored below it (an NLI contradiction or neutral, a dissimilar STS pair)
    makes ``text_b`` a labelled hard negative of ``text_a``, used first; BM25 over all the
    sentences fills the rest.
    """
    from llama_index_d2llm.trainer.mining import mine_hard_negatives

    sentences: dict[str, str] = {}
    positives: dict[str, list[str]] = {}
    labelled: dict[str, list[tuple[float, str]]] = {}
    for pair in pairs:
        a, b = sentence_id(pair.text_a), sentence_id(pair.text_b)
        sentences.setdefault(a, pair.text_a)
        sentences.setdefault(b, pair.text_b)
        if a == b:
            continue
        if pair.score is None or pair.score >= min_score:
            positives.setdefault(a, [])
            if b not in positives[a]:
                positives[a].append(b)
        else:
            labelled.setdefault(a, []).append((pair.score, b))
    if not positives:
        raise ValueError(
            f"no sentence pair has a score of at least --pair-min-score={min_score}: nothing "
            "to learn similarity from; lower --pair-min-score or pass positive pairs"
        )
    passages = [Passage(pid, text) for pid, text in sentences.items()]
    # the query sentence itself is in the pool: exclude it from its own negatives
    queries = [Query(a, sentences[a], [*pos, a]) for a, pos in positives.items()]
    mined = mine_hard_negatives(queries, passages, num_negatives=num_negatives,
                                cache_dir=cache_dir, show_progress=show_progress)
    items = []
    for query in queries:
        own = [pid for _, pid in sorted(labelled.get(query.id, []))
               if pid not in positives[query.id]]
        negatives = {query.id: list(dict.fromkeys(own + mined.get(query.id, [])))}
        query_positives = positives[query.id]
        items += items_from_queries([Query(query.id, query.text, query_positives)], negatives,
                                    [p.id for p in passages if p.id != query.id],
                                    num_negatives=num_negatives, seed=seed, task="symmetric")
    return passages, items


def split_items(items: Sequence[RankingItem], dev_fraction: float, seed: int
                ) -> tuple[list[RankingItem], list[RankingItem]]:
    """(train, dev) by item id, deterministic in the ids and the seed (input order kept)."""
    dev = dev_ids([item.id for item in items], dev_fraction, seed)
    return [i for i in items if i.id not in dev], [i for i in items if i.id in dev]


def sample_easy_negatives(items: Sequence[RankingItem], count: int, seed: int
                          ) -> dict[str, list[str]]:
    """item id -> ``count`` passages used by other items of the same task, none of its own.

    Drawn per item from a generator seeded by the item id, so the draw does not depend on the
    order of the items.
    """
    if count == 0:
        return {item.id: [] for item in items}
    pools: dict[str, list[str]] = {}
    for item in items:
        pool = pools.setdefault(item.task, [])
        pool.extend(item.positive_ids + item.hard_negative_ids)
    pools = {task: sorted(set(pool)) for task, pool in pools.items()}
    easy = {}
    for item in items:
        own = set(item.positive_ids) | set(item.hard_negative_ids)
        pool = pools[item.task]
        if len(pool) - len(own & set(pool)) < count:
            raise ValueError(
                f"only {len(pool)} distinct passages are used by the {item.task} training "
                f"queries, too few for {count} easy negatives besides each query's own: lower "
                "--num-easy-negatives (0 disables the hard-vs-easy loss) or add queries"
            )
        easy[item.id] = _random_fill(pool, own, count, f"{seed}:{item.id}:easy")
    return easy


# ---------------------------------------------------------------------------- teacher scores
#: Logit of a judged pair when no teacher scores it (sigmoid(4) = 0.98).
LABEL_LOGIT = 4.0

def build_examples(items: Sequence[RankingItem], texts: dict[str, str],
                   teacher: Teacher | None, *, num_easy_negatives: int, seed: int,
                   with_features: bool = True, show_progress: bool = True,
                   teacher_scores_easy_negatives: bool = False
                   ) -> list[TrainingExample]:
    """Score every (query, candidate) pair with the teacher and assemble the examples.

    One example per (query, positive). The teacher scores each distinct pair once (and caches
    it on disk); only the cosine matrix of its features over each example's list is kept,
    which is all feature imitation needs. With no teacher (``--teacher none``) the judgements
    label the pairs: probability 1 for a positive, 0 otherwise (logit +-``LABEL_LOGIT``).

    Easy negatives (passages of other queries) are labelled irrelevant, as the judgements
    would label them, unless ``teacher_scores_easy_negatives`` (the paper's recipe): they only
    feed the hard-vs-easy rank loss, weighted 0.01, and scoring them was a fifth of the
    teacher's pairs on a CPU.
    """
    easy = sample_easy_negatives(items, num_easy_negatives, seed)
    score_easy = teacher is not None and teacher_scores_easy_negatives
    wanted: dict[str, dict[tuple[str, str], int]] = {}
    for item in items:
        pairs = wanted.setdefault(item.task, {})
        scored = item.positive_ids + item.hard_negative_ids + (easy[item.id] if score_easy else [])
        for pid in scored:
            pairs.setdefault((item.id, pid), len(pairs))
    scores: dict[tuple[str, str], tuple[float, float, torch.Tensor]] = {}
    irrelevant = (-LABEL_LOGIT, 0.0, None)
    item_texts = {item.id: item.text for item in items}
    for task, pairs in wanted.items():
        keys = list(pairs)
        if teacher is None:
            positives = {(item.id, pid) for item in items for pid in item.positive_ids}
            for key in keys:
                label = 1.0 if key in positives else 0.0
                scores[key] = ((2 * label - 1) * LABEL_LOGIT, label, None)
            continue
        result = teacher.score([item_texts[q] for q, _ in keys], [texts[p] for _, p in keys],
                               task=task, show_progress=show_progress)
        features = result.features if with_features else None
        for row, key in enumerate(keys):
            scores[key] = (float(result.logits[row]), float(result.probs[row]),
                           None if features is None else features[row])
    examples = []
    for item in items:
        for positive in item.positive_ids:
            candidates = [positive, *item.hard_negative_ids]
            rows = [scores[(item.id, pid)] for pid in candidates]
            easy_rows = [scores[(item.id, pid)] if score_easy else irrelevant
                         for pid in easy[item.id]]
            cosines = None
            if with_features and all(row[2] is not None for row in rows):
                cosines = cosine_matrix(torch.stack([row[2].float() for row in rows]))
            examples.append(TrainingExample(
                query_id=item.id, query=item.text, task=item.task, candidate_ids=candidates,
                relevant_ids=frozenset(item.positive_ids), easy_ids=list(easy[item.id]),
                teacher_logits=torch.tensor([row[0] for row in rows]),
                teacher_probs=torch.tensor([row[1] for row in rows]),
                easy_probs=torch.tensor([row[1] for row in easy_rows]),
                teacher_cosines=cosines,
            ))
    return examples
