"""Dev figure for runs without a corpus search to measure (symmetric sentence pairs only).

Each dev item's own candidate list (its positives and BM25's hard negatives) is ranked by the
IEM and by cosine. Cheap (no teacher, no corpus search); when there are asymmetric dev queries
the whole-corpus ranking (``dev_ranking.py``) is measured instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.student.modes import eval_mode
from llama_index_d2llm.trainer.dataset import RankingItem
from llama_index_d2llm.trainer.encoding import TextEncoder, encode_distinct
from llama_index_d2llm.trainer.evaluation import evaluate_run

#: The figure early stopping watches here: the mean of the vectors' and the IEM's nDCG@10.
CANDIDATE_LIST_METRIC = "dev_mean_ndcg@10"


def dev_metrics(student: D2LLMStudent, encoder: TextEncoder, items: Sequence[RankingItem],
                texts: dict[str, str], chunk: int = 64) -> dict[str, float]:
    """nDCG@10 of each dev query's [positives + hard negatives], ranked by IEM and by cosine.

    Close to what reranking does: the hard negatives are BM25's best wrong answers.
    """
    with eval_mode(student), torch.no_grad():
        queries = encode_distinct(encoder, [item.text for item in items], "query", chunk)
        ids = list(dict.fromkeys(pid for item in items
                                 for pid in item.positive_ids + item.hard_negative_ids))
        vectors = encode_distinct(encoder, [texts[pid] for pid in ids], "passage", chunk)
        row = {pid: i for i, pid in enumerate(ids)}
        iem_run, cosine_run = {}, {}
        for index, item in enumerate(items):
            candidates = list(dict.fromkeys(item.positive_ids + item.hard_negative_ids))
            passage_vectors = vectors[[row[pid] for pid in candidates]]
            iem = student.iem(queries[index], passage_vectors, item.task)
            cosine = nn.functional.cosine_similarity(queries[index][None], passage_vectors)
            iem_run[item.id] = dict(zip(candidates, iem.float().tolist(), strict=True))
            cosine_run[item.id] = dict(zip(candidates, cosine.float().tolist(), strict=True))
    qrels = {item.id: dict.fromkeys(item.positive_ids, 1) for item in items}
    iem = evaluate_run(qrels, iem_run, ["ndcg@10"])["ndcg@10"]
    vector = evaluate_run(qrels, cosine_run, ["ndcg@10"])["ndcg@10"]
    return {"dev_iem_ndcg@10": iem, "dev_vector_ndcg@10": vector,
            "dev_mean_ndcg@10": (iem + vector) / 2}
