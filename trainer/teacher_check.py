"""Before imitating the teacher: does it rank the dev candidates better than the starting
encoder does?

Imitation only pays where the teacher knows more than the student already does. A
retrieval-pretrained student (all-MiniLM-L6-v2) can rank a query's candidates (its positives
and BM25's look-alikes) as well as a 270M base LLM's query likelihood; imitating a teacher that
ranks worse pulls the student down. So both rank the same dev candidate lists, and with
``--teacher-imitation auto`` the imitation losses stay on only when the teacher's nDCG@10 is
above the starting encoder's beyond noise (the same rule as the fusion weights,
``dev_ranking.choose_weight``); otherwise the teacher scores nothing more and the pairs are
labelled by their positives, as with ``--teacher none``.

One caveat the log states: generated dev queries were written by the teacher from their
passages, so its query likelihood favours those passages; on generated queries the check
errs towards the teacher.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llama_index_d2llm.trainer.dataset import RankingItem
from llama_index_d2llm.trainer.dev_ranking import GAIN_Z
from llama_index_d2llm.trainer.encoding import TextEncoder
from llama_index_d2llm.trainer.runs import evaluate_run

logger = logging.getLogger(__name__)

IMITATION_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class TeacherCheck:
    """nDCG@10 of the teacher and of the starting encoder on the same dev candidate lists."""

    teacher: float
    encoder: float
    gain: float
    standard_error: float
    queries: int

    @property
    def knows_more(self) -> bool:
        return self.gain > GAIN_Z * self.standard_error

    def describe(self) -> str:
        return (f"teacher {self.teacher:.4f} vs starting encoder {self.encoder:.4f} nDCG@10 on "
                f"{self.queries} dev queries' candidates (gain {self.gain:+.4f} +- "
                f"{self.standard_error:.4f})")


def check_teacher(teacher: Any, encoder: TextEncoder, items: Sequence[RankingItem],
                  texts: dict[str, str], show_progress: bool = False) -> TeacherCheck | None:
    """Both rankings of every asymmetric dev item's [positives, hard negatives]; ``None``
    without such items (or with fewer than two)."""
    items = [i for i in items if i.task == "asymmetric" and i.positive_ids
             and i.hard_negative_ids]
    if len(items) < 2:
        return None
    pairs = [(item, pid) for item in items for pid in item.positive_ids + item.hard_negative_ids]
    result = teacher.score([item.text for item, _ in pairs], [texts[pid] for _, pid in pairs],
                           task="asymmetric", show_progress=show_progress)
    with torch.no_grad():
        queries = torch.nn.functional.normalize(
            encoder([item.text for item in items], "query").float().cpu(), dim=-1)
        passages = torch.nn.functional.normalize(
            encoder([texts[pid] for _, pid in pairs], "passage").float().cpu(), dim=-1)
    row_of = {item.id: row for row, item in enumerate(items)}
    teacher_run: dict[str, dict[str, float]] = {}
    encoder_run: dict[str, dict[str, float]] = {}
    for number, (item, pid) in enumerate(pairs):
        teacher_run.setdefault(item.id, {})[pid] = float(result.logits[number])
        cosine = float(passages[number] @ queries[row_of[item.id]])
        encoder_run.setdefault(item.id, {})[pid] = cosine
    qrels = {item.id: dict.fromkeys(item.positive_ids, 1) for item in items}
    per_teacher = evaluate_run(qrels, teacher_run, ["ndcg@10"], per_query=True)["per_query"]
    per_encoder = evaluate_run(qrels, encoder_run, ["ndcg@10"], per_query=True)["per_query"]
    diffs = [per_teacher["ndcg@10"][q] - per_encoder["ndcg@10"][q] for q in qrels]
    return TeacherCheck(
        teacher=statistics.fmean(per_teacher["ndcg@10"].values()),
        encoder=statistics.fmean(per_encoder["ndcg@10"].values()),
        gain=statistics.fmean(diffs),
        standard_error=statistics.stdev(diffs) / len(diffs) ** 0.5, queries=len(diffs))
