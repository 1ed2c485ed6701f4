"""The data stages of a distillation: corpus -> queries (judged, or generated and judged by
the round trip) -> BM25 hard negatives -> the teacher checked against the starting encoder ->
teacher-scored training examples. Each stage caches its result in the work directory.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.student.backbone import load_tokenizer, resolve_backbone, resolve_device
from llama_index_d2llm.student.modes import eval_mode
from llama_index_d2llm.trainer.config import NO_TEACHER, DistillConfig
from llama_index_d2llm.trainer.corpus import CorpusError, Passage, load_corpus
from llama_index_d2llm.trainer.dataset import (
    RankingItem,
    TrainingExample,
    build_examples,
    items_from_queries,
    pair_items,
    split_items,
)
from llama_index_d2llm.trainer.encoding import TextEncoder, encode_distinct
from llama_index_d2llm.trainer.pairs import SymmetricPair, load_pairs
from llama_index_d2llm.trainer.paths import claim_work_dir
from llama_index_d2llm.trainer.queries import (
    Query,
    generate_queries,
    is_generated_id,
    load_queries,
    split_queries,
)

logger = logging.getLogger(__name__)

IMITATION_LOSSES = ("contrastive_imitation", "rank_imitation", "pairwise_rank",
                    "feature_imitation")


def imitation_off(config: DistillConfig) -> bool:
    """Turn the teacher-imitation losses off; whether any was on."""
    was_on = any(getattr(config.losses, name) for name in IMITATION_LOSSES)
    for name in IMITATION_LOSSES:
        setattr(config.losses, name, 0.0)
    return was_on


@dataclass
class PreparedData:
    """Everything training needs, built by the data stages (all cached in the work dir)."""

    examples: list[TrainingExample]
    train_items: list[RankingItem]
    dev_items: list[RankingItem]
    texts: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    #: the teacher against the starting encoder on dev (``teacher_check.py``), when measured
    teacher_check: dict[str, Any] | None = None


def prepare_data(config: DistillConfig, *, teacher: Any = None,
                 device: torch.device | None = None,
                 starting_encoder: StartingEncoder | None = None) -> PreparedData:
    """Corpus -> queries -> hard negatives -> teacher-scored examples (``config`` resolved).

    The teacher is loaded here unless given, and unloaded before returning.
    ``starting_encoder``: the untrained student's encoder and fingerprint, with which the
    round trip judges generated queries (``round_trip.py``; BM25 alone without it).
    """
    show = config.show_progress
    timings: dict[str, float] = {}
    start = time.perf_counter()
    passages, queries, pairs = load_inputs(config)  # before the work directory: a bad input
    timings["load_s"] = time.perf_counter() - start  # must not leave an empty one behind
    work = claim_work_dir(config)
    owns_teacher = teacher is None
    if teacher is None and config.teacher != NO_TEACHER:
        teacher = _load_teacher(config, device or resolve_device(config.device))
    try:
        if passages and queries is None:
            start = time.perf_counter()
            queries = generate_queries(passages, teacher, per_passage=config.queries_per_passage,
                                       cache_dir=work / "queries",
                                       max_passages=config.max_generated_passages,
                                       seed=config.seed, show_progress=show)
            if config.heading_queries:
                from llama_index_d2llm.trainer.headings import heading_queries

                queries = queries + heading_queries(passages)
            if config.round_trip_depth:
                queries = _round_trip(config, queries, passages, starting_encoder, work)
            timings["generate_queries_s"] = time.perf_counter() - start
        start = time.perf_counter()
        train_items, dev_items, passages = _ranking_items(config, passages, queries, pairs, show)
        timings["mining_s"] = time.perf_counter() - start
        texts = {p.id: p.text for p in passages}
        start = time.perf_counter()
        check = None
        if teacher is not None:
            check = _check_teacher(config, teacher, starting_encoder, dev_items, texts)
            if config.teacher_imitation == "off" or (check is not None
                                                     and not check.knows_more):
                imitation_off(config)
                teacher_labels = None  # it wrote the queries; the positives label the pairs
            else:
                teacher_labels = teacher
        else:
            teacher_labels = None
        easy = config.num_easy_negatives if config.losses.needs_easy_negatives else 0
        examples = build_examples(train_items, texts, teacher_labels, num_easy_negatives=easy,
                                  seed=config.seed,
                                  with_features=config.losses.needs_teacher_features,
                                  show_progress=show,
                                  teacher_scores_easy_negatives=config.teacher_scores_easy_negatives)
        timings["teacher_s"] = time.perf_counter() - start
    finally:
        if owns_teacher:
            del teacher
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return PreparedData(examples, train_items, dev_items, texts, timings,
                        None if check is None else {**asdict(check),
                                                    "knows_more": check.knows_more})


def _check_teacher(config: DistillConfig, teacher: Any, starting: StartingEncoder | None,
                   dev_items: list[RankingItem], texts: dict[str, str]) -> Any:
    """``--teacher-imitation auto``: the teacher against the starting encoder on dev."""
    if config.teacher_imitation != "auto":
        return None
    if starting is None or not dev_items:
        logger.info("teacher imitation stays on: no %s to measure the teacher against",
                    "dev queries" if starting else "starting encoder")
        return None
    from llama_index_d2llm.trainer.teacher_check import check_teacher

    check = check_teacher(teacher, starting.encoder, dev_items, texts,
                          show_progress=config.show_progress)
    if check is None:
        return None
    generated = all(is_generated_id(item.id) for item in dev_items)
    caveat = (" (the teacher wrote these dev queries from their passages, which favours it)"
              if generated else "")
    if check.knows_more:
        logger.info("the teacher ranks dev candidates above the starting encoder: imitating "
                    "it. %s%s", check.describe(), caveat)
    else:
        logger.warning("the teacher does not rank dev candidates above the starting encoder, "
                       "so the imitation losses are off and the positives label the pairs "
                       "(--teacher-imitation on keeps them): %s%s", check.describe(), caveat)
    return check

def load_inputs(config: DistillConfig
                ) -> tuple[list[Passage], list[Query] | None, list[SymmetricPair]]:
    """Read and check every input file (fast) before any model is loaded."""
    passages: list[Passage] = []
    queries = None
    if config.corpus is not None:
        tokenizer = load_tokenizer(resolve_backbone(config.student), config.trust_remote_code)
        # room for the passage instruction and special tokens inside max_passage_length
        reserved = len(tokenizer("Passage: ", add_special_tokens=True)["input_ids"]) + 1
        passages = load_corpus(config.corpus,
                               max_tokens=max(16, config.max_passage_length - reserved),
                               tokenizer=tokenizer, exclude=config.exclude,
                               show_progress=config.show_progress)
        if len(passages) < config.num_negatives + 1:
            raise CorpusError(
                f"the corpus has {len(passages)} passages, too few to mine "
                f"{config.num_negatives} hard negatives per query (at least "
                f"{config.num_negatives + 1} are needed): add documents or lower "
                f"--num-negatives to at most {max(len(passages) - 1, 0)}"
            )
        if config.queries is not None:
            queries = load_queries(config.queries, config.qrels, {p.id for p in passages})
    pairs = load_pairs(config.pairs) if config.pairs is not None else []
    return passages, queries, pairs


@dataclass
class StartingEncoder:
    """The untrained student's encoder (what distillation starts from) and its identity."""

    encoder: TextEncoder
    fingerprint: str

    @classmethod
    def of(cls, student: D2LLMStudent, token_cache: Any, chunk: int) -> StartingEncoder | None:
        """The student's encoder while it is untrained and starts from its backbone's
        pooling; ``None`` otherwise (a random PMA, or a resumed, trained student)."""
        from llama_index_d2llm.trainer.encoding import backbone_encoder, cached_encoder

        if student.config.base_pooling is None or float(student.pma.gate.detach()) != 0.0:
            return None
        encoder = cached_encoder(token_cache) if token_cache is not None \
            else backbone_encoder(student)

        def encode(texts: Any, kind: str) -> torch.Tensor:
            """All of ``texts`` (states cached first, in one pass), ``chunk`` at a time."""
            if token_cache is not None:
                token_cache.ensure(texts, kind)
            with eval_mode(student), torch.no_grad():
                return encode_distinct(encoder, texts, kind, chunk).float().cpu()

        return cls(encode, f"{student.config.backbone}|{student.config.base_pooling}|"
                           f"{student.config.backbone_layers}|{student.config.query_instruction}|"
                           f"{student.config.passage_instruction}|"
                           f"{student.config.max_query_length}|"
                           f"{student.config.max_passage_length}")


def _round_trip(config: DistillConfig, queries: list[Query], passages: list[Passage],
                starting: StartingEncoder | None, work: Path) -> list[Query]:
    from llama_index_d2llm.trainer.round_trip import keep_round_trips

    if starting is None:
        logger.info("round trip by BM25 alone: the student does not start from its "
                    "backbone's pooling")
    return keep_round_trips(queries, passages, starting.encoder if starting else None,
                            depth=config.round_trip_depth, cache_dir=work / "queries",
                            encoder_key=starting.fingerprint if starting else "bm25")


def _load_teacher(config: DistillConfig, device: torch.device) -> Any:
    from llama_index_d2llm.trainer.teacher import Teacher, TeacherConfig

    settings = TeacherConfig(mode=config.teacher_mode, max_length=config.teacher_max_length,
                             batch_size=config.teacher_batch_size)
    return Teacher.from_pretrained(config.teacher, config=settings, device=device,
                                   dtype=config.dtype, cache_dir=config.work_path / "teacher",
                                   trust_remote_code=config.trust_remote_code)


def _ranking_items(config: DistillConfig, passages: list[Passage], queries: list[Query] | None,
                   pairs: list[SymmetricPair], show: bool
                   ) -> tuple[list[RankingItem], list[RankingItem], list[Passage]]:
    """Train and dev items of both tasks, and every passage they refer to."""
    from llama_index_d2llm.trainer.mining import mine_hard_negatives

    train: list[RankingItem] = []
    dev: list[RankingItem] = []
    if queries:
        negatives = mine_hard_negatives(queries, passages, num_negatives=config.num_negatives,
                                        cache_dir=config.work_path / "negatives",
                                        show_progress=show)
        train_queries, dev_queries = split_queries(queries, config.dev_fraction, config.seed)
        ids = [p.id for p in passages]
        train += items_from_queries(train_queries, negatives, ids,
                                    num_negatives=config.num_negatives, seed=config.seed)
        dev += items_from_queries(dev_queries, negatives, ids,
                                  num_negatives=config.num_negatives, seed=config.seed)
    if pairs:
        sentences, items = pair_items(pairs, num_negatives=config.num_negatives,
                                      min_score=config.pair_min_score, seed=config.seed,
                                      cache_dir=config.work_path / "negatives",
                                      show_progress=show)
        pair_train, pair_dev = split_items(items, config.dev_fraction, config.seed)
        train += pair_train
        dev += pair_dev
        passages = passages + sentences
    return train, dev, passages
