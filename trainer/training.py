"""The training loop: Accelerate (CPU, one GPU, or several via ``accelerate launch``), AdamW,
gradient accumulation, clipping, linear warm-up, dev evaluation with early stopping, atomic
checkpoints and exact resumption.

What is trained: PMA and the IEM always, plus the backbone's LoRA adapter unless the backbone
is frozen (then its token states come from a ``TokenStateCache`` and a step costs
milliseconds on a CPU).

Checkpoints hold no pickle: the student is written with ``save_pretrained`` (safetensors +
JSON), the optimizer's tensors and the RNG states go to ``optimizer.safetensors``, everything
else (step, data position, scheduler, best dev score) to ``trainer_state.json``. Each is
assembled in a temporary directory and renamed into ``checkpoints/step-NNNNNNNN``, so a crash
or Ctrl-C leaves the previous checkpoint intact. The data order of epoch ``e`` is a
permutation seeded by ``(seed, e)`` and the RNG state is saved at each optimizer step, so a
resumed run takes exactly the steps the uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.student.errors import CheckpointError
from llama_index_d2llm.trainer.config import ConfigError, DistillConfig
from llama_index_d2llm.trainer.dataset import Collator, RankingItem, TrainingBatch, TrainingExample
from llama_index_d2llm.trainer.dev_ranking import (
    DEV_METRIC,
    DevRanking,
    SparseBM25,
    format_report,
    fusion_from,
)
from llama_index_d2llm.trainer.evaluation import evaluate_run
from llama_index_d2llm.trainer.losses import D2LLMDistillationLoss
from llama_index_d2llm.trainer.token_states import TokenStateCache

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
BEST_NAME = "best.safetensors"
STUDENT_DIR = "student"
STATE_FORMAT = "d2llm-trainer-state-v1"
# Without a corpus search to measure (symmetric pairs only): both halves of the candidate-list
# figure, the vectors' and the IEM's. With one: the whole-corpus figure (dev_ranking.py).
CANDIDATE_LIST_METRIC = "dev_mean_ndcg@10"
KEEP_CHECKPOINTS = 2
MINING_STATE_KEYS = ("mined", "mined_epoch", "mining_seconds")
# Settings a checkpoint must share with the run that resumes it: they shape the trajectory.
RESUME_KEYS = (
    "corpus", "queries", "qrels", "pairs", "dev_fraction", "queries_per_passage",
    "max_generated_passages", "num_negatives", "num_easy_negatives", "pair_min_score", "teacher",
    "teacher_mode", "student", "backbone_layers", "iem_cosine_skip", "frozen_backbone",
    "tune_top_layers", "student_negatives", "student_negatives_depth", "student_negatives_from",
    "lora_r", "lora_alpha",
    "lora_dropout",
    "pma_heads", "iem_hidden_size", "max_query_length", "max_passage_length", "batch_size",
    "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "seed", "losses",
)

StepCallback = Callable[[int, dict[str, float]], None]
TextEncoder = Callable[[Sequence[str], str], torch.Tensor]


# ---------------------------------------------------------------------------- text -> vectors
def backbone_encoder(student: D2LLMStudent) -> TextEncoder:
    """Vectors through the (LoRA-tuned) backbone, with gradients when enabled."""
    return lambda texts, kind: student.embed(student.tokenize(list(texts), kind))


def cached_encoder(cache: TokenStateCache) -> TextEncoder:
    """Vectors from cached frozen-backbone states: PMA (and the tuned top blocks) run."""
    return cache.vectors


def encode_distinct(encoder: TextEncoder, texts: Sequence[str], kind: str,
                    chunk: int) -> torch.Tensor:
    """Vectors for ``texts`` (in order), each distinct text encoded once, ``chunk`` at a time."""
    distinct = list(dict.fromkeys(texts))
    vectors = torch.cat([encoder(distinct[i:i + chunk], kind)
                         for i in range(0, len(distinct), chunk)])
    position = {text: i for i, text in enumerate(distinct)}
    return vectors[torch.tensor([position[t] for t in texts], device=vectors.device)]


class DistillationModel(nn.Module):
    """Student + objective in one module, so that DDP sees one forward per batch."""

    def __init__(self, student: D2LLMStudent, loss: D2LLMDistillationLoss, encoder: TextEncoder,
                 chunk: int = 64):
        super().__init__()
        self.student = student
        self.loss = loss
        self.encoder = encoder
        self.chunk = chunk

    def forward(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        size, listed = len(batch), len(batch.candidate_texts[0])
        easy = len(batch.easy_texts[0]) if batch.easy_texts else 0
        queries = encode_distinct(self.encoder, batch.queries, "query", self.chunk)
        mined = len(batch.mined_texts[0]) if batch.mined_texts else 0
        passages = [t for row in batch.candidate_texts for t in row]
        passages += [t for row in batch.easy_texts for t in row]
        passages += [t for row in batch.mined_texts for t in row]
        vectors = encode_distinct(self.encoder, passages, "passage", self.chunk)
        candidates = vectors[:size * listed].view(size, listed, -1)
        end = size * (listed + easy)
        easy_vectors = vectors[size * listed:end].view(size, easy, -1) if easy else None
        mined_vectors = vectors[end:].view(size, mined, -1) if mined else None
        return self.loss(
            self.student.iem, queries, candidates, batch.tasks, batch.teacher_logits,
            batch.teacher_probs, teacher_cosines=batch.teacher_cosines,
            easy_vectors=easy_vectors, easy_probs=batch.easy_probs if easy else None,
            false_negatives=batch.false_negatives, mined_vectors=mined_vectors,
        )


# ---------------------------------------------------------------------------- dev evaluation
def dev_metrics(student: D2LLMStudent, encoder: TextEncoder, items: Sequence[RankingItem],
                texts: dict[str, str], chunk: int = 64) -> dict[str, float]:
    """nDCG@10 of each dev query's [positives + hard negatives], ranked by IEM and by cosine.

    Cheap (no teacher, no corpus search) and close to what reranking does: the hard negatives
    are BM25's best wrong answers.
    """
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
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
    finally:
        student.train(was_training)
    qrels = {item.id: dict.fromkeys(item.positive_ids, 1) for item in items}
    iem = evaluate_run(qrels, iem_run, ["ndcg@10"])["ndcg@10"]
    vector = evaluate_run(qrels, cosine_run, ["ndcg@10"])["ndcg@10"]
    return {"dev_iem_ndcg@10": iem, "dev_vector_ndcg@10": vector,
            "dev_mean_ndcg@10": (iem + vector) / 2}


def evaluate_objective(student: D2LLMStudent, examples: Sequence[TrainingExample],
                       texts: dict[str, str], losses: Any, *, encoder: TextEncoder | None = None,
                       batch_size: int = 16) -> dict[str, float]:
    """Each loss term averaged over ``examples`` in fixed consecutive batches (no gradient).

    A fixed, deterministic measure of the objective (unlike the running training loss, which
    mixes batches and weights of different steps): used to check that training lowers it.
    """
    encoder = encoder or backbone_encoder(student)
    model = DistillationModel(student, D2LLMDistillationLoss(losses), encoder)
    collate = Collator(texts)
    totals: dict[str, float] = {}
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                for name, value in model(collate(chunk).to(student.device)).items():
                    totals[name] = totals.get(name, 0.0) + float(value) * len(chunk)
    finally:
        student.train(was_training)
    return {name: value / len(examples) for name, value in totals.items()}


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_root(config: DistillConfig) -> Path:
    return config.work_path / CHECKPOINTS_DIR


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (renamed into place with their state), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def clear_checkpoints(root: Path) -> None:
    """Delete the checkpoints a run wrote under ``root`` (and its half-written ones); nothing
    else there: the folder may be shared with files that are not the trainer's."""
    if not root.is_dir():
        return
    for path in [*list_checkpoints(root), *root.glob(".checkpoint-*")]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(config: DistillConfig) -> Path | None:
    checkpoints = list_checkpoints(checkpoint_root(config))
    return checkpoints[-1] if checkpoints else None


def read_checkpoint_state(path: Path, config: DistillConfig) -> dict[str, Any]:
    """The checkpoint's state, after checking it was written by a run with the same settings."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({exc}): delete it to "
                              "resume from the one before, or run without --resume") from exc
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} was written by another version "
                              f"({state.get('format')!r}): run without --resume to start over")
    saved, current = state.get("config", {}), config.to_dict()
    # a setting added after the checkpoint was written had its default then
    defaults = {f.name: f.default for f in dataclass_fields(DistillConfig)}
    changed = [key for key in RESUME_KEYS
               if saved.get(key, defaults.get(key)) != current.get(key)]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"cannot resume from {str(path)!r}: it was trained with other settings ({details}). "
            "Restore those settings, or run without --resume to start over"
        )
    return state


# ---------------------------------------------------------------------------- the loop
@dataclass
class TrainingResult:
    """What a training run did (also written beside the student as training_summary.json)."""

    steps: int
    epochs: float
    stopped_early: bool
    best_step: int | None
    best_metric: float | None
    seconds_per_step: float | None
    resumed_from_step: int | None
    examples: int
    history: list[dict[str, float]] = field(default_factory=list)
    mining_seconds: float = 0.0
    #: The whole-corpus dev figures of the kept weights (and the IEM weights they chose).
    dev: dict[str, float] = field(default_factory=dict)


class DistillationTrainer:
    """Trains a student on teacher-scored examples; see the module docstring for guarantees."""

    def __init__(self, student: D2LLMStudent, config: DistillConfig,
                 examples: Sequence[TrainingExample], texts: dict[str, str], *,
                 dev_items: Sequence[RankingItem] = (), token_cache: TokenStateCache | None = None,
                 accelerator: Any = None, step_callback: StepCallback | None = None):
        if not examples:
            raise ValueError("no training examples: every query was held out for dev or has no "
                             "positive; lower --dev-fraction or add queries")
        self.student = student
        self.config = config
        self.examples = list(examples)
        self.texts = texts
        self.dev_items = list(dev_items)
        self.dev_ranking = DevRanking.build(self.dev_items, texts, config.seed)
        self.stopping_metric = DEV_METRIC if self.dev_ranking else CANDIDATE_LIST_METRIC
        self.token_cache = token_cache
        self.step_callback = step_callback
        self.accelerator = accelerator or make_accelerator(config)
        if token_cache is not None:
            if token_cache.depth is None:  # else peft keeps only the top blocks' LoRA trainable
                student.backbone.requires_grad_(False)
            self.encoder = cached_encoder(token_cache)
        else:
            self.encoder = backbone_encoder(student)
        self.collator = Collator(texts)
        self.model = DistillationModel(student, D2LLMDistillationLoss(config.losses),
                                       self.encoder, config.encode_batch_size)
        self.root = checkpoint_root(config)
        self._rng_snapshot = _rng_state()
        self._lexical: tuple[list[str], list[list[str]]] | None = None

    # ------------------------------------------------------------------ setup
    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW; no weight decay on biases and normalisation weights (released recipe)."""
        decay, no_decay = [], []
        for name, param in self._trainable():
            (no_decay if param.dim() < 2 or "norm" in name.lower() else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.config.lr)

    def _loader(self, epoch: int) -> Any:
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        loader = torch.utils.data.DataLoader(self.examples, batch_size=self.config.batch_size,
                                             sampler=order, collate_fn=self.collator)
        return self.accelerator.prepare_data_loader(loader)

    def prepare_token_cache(self) -> None:
        """Cache the backbone states of every training and dev text (main process first)."""
        if self.token_cache is None:
            return
        queries = [e.query for e in self.examples] + [i.text for i in self.dev_items]
        passages = {pid for e in self.examples for pid in (*e.candidate_ids, *e.easy_ids)}
        passages |= {pid for i in self.dev_items for pid in i.positive_ids + i.hard_negative_ids}
        if self.config.student_negatives:
            passages |= set(self.texts)  # the student searches the whole corpus for them
        if self.dev_ranking is not None:
            passages |= set(self.dev_ranking.passage_ids)
        with self.accelerator.main_process_first():
            self.token_cache.ensure(queries, "query")
            self.token_cache.ensure(sorted(self.texts[pid] for pid in passages), "passage")

    # ------------------------------------------------------------------ train
    def train(self, resume_from: Path | None = None) -> TrainingResult:
        config, accelerator = self.config, self.accelerator
        self.prepare_token_cache()
        optimizer = self._optimizer()
        model, optimizer = accelerator.prepare(self.model, optimizer)
        batches_per_epoch = len(self._loader(0))
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        warmup_steps = int(total_steps * config.warmup_ratio)
        state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "best_metric": None,
                                 "best_step": None, "bad_evals": 0, "history": [],
                                 "warmup_steps": warmup_steps, "resumed_from_step": None,
                                 "mined": None, "mined_epoch": None, "mining_seconds": 0.0}
        best_state: dict[str, torch.Tensor] | None = None
        if resume_from is not None:
            saved = read_checkpoint_state(resume_from, config)
            best_state = self._load_checkpoint(resume_from, saved, optimizer)
            state.update({k: saved[k] for k in ("step", "epoch", "batch", "best_metric",
                                                "best_step", "bad_evals", "history",
                                                "warmup_steps")})
            state.update({k: saved.get(k, state[k]) for k in MINING_STATE_KEYS})
            state["resumed_from_step"] = saved["step"]
            logger.info("resuming from %s (step %d)", resume_from, saved["step"])
        elif accelerator.is_main_process:
            clear_checkpoints(self.root)  # a fresh run: stale ones must not be resumed later
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            _inner(optimizer), _warmup(state["warmup_steps"]), last_epoch=-1)
        for _ in range(state["step"]):
            scheduler.step()
        progress = None
        if config.show_progress and accelerator.is_local_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=total_steps, initial=min(state["step"], total_steps),
                            desc="distilling", unit="step")
        step_seconds: list[float] = []
        running: dict[str, float] = {}
        stopped_early = False
        saved_step = state["step"] if resume_from is not None else -1
        updating = False
        try:
            while state["epoch"] < config.epochs and not self._done(state, total_steps):
                self._student_negatives(state)
                loader = self._loader(state["epoch"])
                skip = state["batch"]
                if skip:
                    loader = accelerator.skip_first_batches(loader, skip)
                model.train()
                started = time.perf_counter()
                for index, batch in enumerate(loader, start=skip):
                    group_start = index - index % config.grad_accum
                    group_size = min(config.grad_accum, batches_per_epoch - group_start)
                    sync = index + 1 == group_start + group_size
                    context = (accelerator.no_sync(model) if not sync
                               else _nullcontext())
                    with context:
                        out = model(batch)
                        accelerator.backward(out["loss"] / group_size)
                    for name, value in out.items():
                        running[name] = running.get(name, 0.0) + float(value.detach()) / group_size
                    if not sync:
                        continue
                    updating = True
                    if config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_([p for _, p in self._trainable()],
                                                    config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    state["batch"] = index + 1
                    self._rng_snapshot = _rng_state()
                    updating = False
                    step_seconds.append(time.perf_counter() - started)
                    logs = {"lr": scheduler.get_last_lr()[0], **running}
                    running = {}
                    if progress is not None:
                        progress.update(1)
                        progress.set_postfix(loss=f"{logs['loss']:.4f}")
                    end_of_epoch = state["batch"] >= batches_per_epoch
                    evaluate = self.dev_items and (
                        end_of_epoch or self._done(state, total_steps)
                        or (config.eval_every and state["step"] % config.eval_every == 0))
                    if end_of_epoch:
                        state["epoch"] += 1
                        state["batch"] = 0
                    if evaluate:
                        metrics = self._dev_metrics()
                        logs.update(metrics)
                        score = metrics[self.stopping_metric]
                        if state["best_metric"] is None or score > state["best_metric"]:
                            state.update(best_metric=score, best_step=state["step"], bad_evals=0)
                            best_state = self._trainable_state()
                        else:
                            state["bad_evals"] += 1
                        state["history"].append({"step": state["step"], **logs})
                        if progress is not None:
                            progress.set_postfix(loss=f"{logs['loss']:.4f}",
                                                 dev=f"{score:.4f}")
                        if state["bad_evals"] >= config.patience:
                            stopped_early = True
                    if (state["step"] % config.checkpoint_every == 0 or stopped_early
                            or self._done(state, total_steps)):
                        self._save_checkpoint(state, optimizer, scheduler, best_state)
                        saved_step = state["step"]
                    if self.step_callback is not None:
                        self.step_callback(state["step"], logs)
                    if stopped_early or self._done(state, total_steps):
                        break
                    started = time.perf_counter()
                if stopped_early:
                    logger.info("early stopping at step %d: %s did not improve for %d "
                                "evaluations (best %.4f at step %d)", state["step"],
                                self.stopping_metric, config.patience, state["best_metric"],
                                state["best_step"])
                    break
        except KeyboardInterrupt:
            # the state after the last complete optimizer step is consistent: keep it
            if not updating and state["step"] != saved_step and state["step"] > 0:
                self._save_checkpoint(state, optimizer, scheduler, best_state)
                logger.warning("interrupted: checkpoint of step %d written; continue with "
                               "--resume", state["step"])
            raise
        finally:
            if progress is not None:
                progress.close()
        if best_state is not None and state["best_step"] != state["step"]:
            logger.info("restoring the best dev weights (step %d, %s %.4f)", state["best_step"],
                        self.stopping_metric, state["best_metric"])
            self._load_trainable_state(best_state)
        self.student.eval()
        dev = self._record_fusion(state)
        completed = state["epoch"] + state["batch"] / max(batches_per_epoch, 1)
        return TrainingResult(
            steps=state["step"], epochs=round(completed, 4), stopped_early=stopped_early,
            best_step=state["best_step"], best_metric=state["best_metric"],
            seconds_per_step=(sum(step_seconds) / len(step_seconds)) if step_seconds else None,
            resumed_from_step=state["resumed_from_step"], examples=len(self.examples),
            history=state["history"], mining_seconds=round(state["mining_seconds"], 3),
            dev=dev,
        )

    def _record_fusion(self, state: dict[str, Any]) -> dict[str, float]:
        """Record in the student how each first stage's candidates are rescored
        (``student/fusion.py``), from the whole-corpus dev ranking of the kept weights: the
        evaluation that chose them, else a new one."""
        if self.dev_ranking is None:
            logger.warning("no dev queries to weigh the rescoring on: the student rescores "
                           "with the default fusion (cosine, and BM25 for hybrid search; no "
                           "IEM); hold some queries out (--dev-fraction) to let the distiller "
                           "measure what the IEM adds")
            return {}
        kept = [entry for entry in state["history"]
                if entry["step"] == state["best_step"] and DEV_METRIC in entry]
        metrics = ({k: v for k, v in kept[-1].items() if k.startswith(("dev_", "fusion_"))}
                   if kept else self._dev_metrics())
        self.student.config.fusion = fusion_from(metrics)
        logger.info("%s", format_report(metrics))
        return metrics

    def _student_negatives(self, state: dict[str, Any]) -> None:
        """Give every example this epoch's ``--student-negatives`` (none in the first epoch).

        From the second epoch on, the student (as trained so far) embeds the whole corpus and
        each training query draws its negatives from its own nearest passages. They are kept
        in the checkpoint, so a resumed epoch uses the same ones.
        """
        count = self.config.student_negatives
        if not count or state["epoch"] < 1:
            return
        if state["mined_epoch"] != state["epoch"] or state["mined"] is None:
            started = time.perf_counter()
            mined = self._mine(state["epoch"]) if self.accelerator.is_main_process else None
            if self.accelerator.num_processes > 1:
                from accelerate.utils import broadcast_object_list

                mined = broadcast_object_list([mined], from_process=0)[0]
            seconds = time.perf_counter() - started
            state.update(mined=mined, mined_epoch=state["epoch"])
            state["mining_seconds"] += seconds
            logger.info("epoch %d: mined %d negatives per query with the student (%.1f s)",
                        state["epoch"], count, seconds)
        for example in self.examples:
            example.mined_ids = list(state["mined"][example.query_id])

    def _mine(self, epoch: int) -> dict[str, list[str]]:
        from llama_index_d2llm.trainer.mining import mine_with_vectors

        chunk = self.config.encode_batch_size
        by_query: dict[str, tuple[str, set[str]]] = {}
        for example in self.examples:
            banned = by_query.setdefault(example.query_id, (example.query, set()))[1]
            banned |= set(example.relevant_ids) | set(example.candidate_ids)
        query_ids = sorted(by_query)
        passage_ids = sorted(self.texts)
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                queries = encode_distinct(self.encoder, [by_query[q][0] for q in query_ids],
                                          "query", chunk)
                passages = encode_distinct(self.encoder, [self.texts[p] for p in passage_ids],
                                           "passage", chunk)
        finally:
            self.student.train(was_training)
        lexical = None
        if self.config.student_negatives_from == "hybrid":
            lexical = self._lexical_rankings(query_ids, [by_query[q][0] for q in query_ids],
                                             passage_ids)
        mined = mine_with_vectors(queries, passages, passage_ids,
                                  [by_query[q][1] for q in query_ids],
                                  count=self.config.student_negatives,
                                  depth=self.config.student_negatives_depth,
                                  seed=f"{self.config.seed}:{epoch}", lexical=lexical)
        return dict(zip(query_ids, mined, strict=True))

    def _lexical_rankings(self, query_ids: list[str], texts: list[str],
                          passage_ids: list[str]) -> list[list[str]]:
        """The product's BM25 ranking of the corpus for each training query (once per run)."""
        cached = self._lexical
        if cached is None or cached[0] != query_ids:
            index = SparseBM25([self.texts[pid] for pid in passage_ids])
            depth = 2 * self.config.student_negatives_depth
            ranked = [[passage_ids[i] for i, _ in index.search(text, depth)] for text in texts]
            self._lexical = cached = (query_ids, ranked)
        return cached[1]

    def _dev_metrics(self) -> dict[str, float]:
        """Dev metrics, the main process's for all: every process must stop at the same step."""
        if self.dev_ranking is not None:
            metrics = self.dev_ranking.evaluate(self.student, self.encoder,
                                                self.config.encode_batch_size)
        else:
            metrics = dev_metrics(self.student, self.encoder, self.dev_items, self.texts,
                                  self.config.encode_batch_size)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            metrics = broadcast_object_list([metrics], from_process=0)[0]
        return metrics

    def _done(self, state: dict[str, Any], total_steps: int) -> bool:
        return state["step"] >= total_steps

    # ------------------------------------------------------------------ state
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: param.detach().cpu().clone() for name, param in self._trainable()}

    def _load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self._trainable())
        if set(tensors) != set(params):
            raise CheckpointError("the checkpoint's trainable weights do not match this model: "
                                  "it was written by another configuration; run without "
                                  "--resume")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def _save_checkpoint(self, state: dict[str, Any], optimizer: Any, scheduler: Any,
                         best_state: dict[str, torch.Tensor] | None) -> None:
        from safetensors.torch import save_file

        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return
        target = self.root / f"step-{state['step']:08d}"
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=self.root))
        try:
            accelerator.unwrap_model(self.model).student.save_pretrained(work / STUDENT_DIR)
            tensors, scalars = {}, {}
            optimizer_state = _inner(optimizer).state_dict()
            for index, values in optimizer_state["state"].items():
                for key, value in values.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
                    else:
                        scalars[f"{index}.{key}"] = value
            for key, value in self._rng_snapshot.items():
                tensors[f"rng.{key}"] = value
            save_file(tensors, str(work / OPTIMIZER_NAME), metadata={"format": STATE_FORMAT})
            if best_state is not None:
                save_file({k: v.contiguous() for k, v in best_state.items()},
                          str(work / BEST_NAME), metadata={"format": STATE_FORMAT})
            payload = {
                "format": STATE_FORMAT, **{k: state[k] for k in (
                    "step", "epoch", "batch", "best_metric", "best_step", "bad_evals",
                    "history", "warmup_steps")},
                **{k: state[k] for k in MINING_STATE_KEYS},
                "param_groups": [{k: (list(v) if isinstance(v, tuple) else v)
                                  for k, v in group.items()}
                                 for group in optimizer_state["param_groups"]],
                "optimizer_scalars": scalars,
                "scheduler": {k: v for k, v in scheduler.state_dict().items()
                              if k != "lr_lambdas"},
                "trainable": [name for name, _ in self._trainable()],
                "num_processes": accelerator.num_processes,
                "config": self.config.to_dict(),
            }
            (work / STATE_NAME).write_text(json.dumps(payload, indent=1, default=str) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for old in list_checkpoints(self.root)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, path: Path, state: dict[str, Any],
                         optimizer: Any) -> dict[str, torch.Tensor] | None:
        """Restore optimizer and RNG (the student itself was loaded from ``path/student``)."""
        from safetensors.torch import load_file

        names = [name for name, _ in self._trainable()]
        if state.get("trainable") != names:
            raise CheckpointError(f"checkpoint {str(path)!r} trains other weights than this "
                                  "run (LoRA vs frozen backbone?): run without --resume")
        tensors = load_file(str(path / OPTIMIZER_NAME))
        per_param: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("state."):
                _, index, name = key.split(".", 2)
                per_param.setdefault(int(index), {})[name] = value
        for key, value in state.get("optimizer_scalars", {}).items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        groups = []
        for group in state["param_groups"]:
            group = dict(group)
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
            groups.append(group)
        _inner(optimizer).load_state_dict({"state": per_param, "param_groups": groups})
        rng = {key[len("rng."):]: value for key, value in tensors.items()
               if key.startswith("rng.")}
        _set_rng_state(rng)
        self._rng_snapshot = rng
        best = path / BEST_NAME
        return load_file(str(best)) if best.exists() else None


# ---------------------------------------------------------------------------- helpers
def make_accelerator(config: DistillConfig) -> Any:
    """One code path for CPU, one GPU and ``accelerate launch`` on several."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = config.device is not None and str(config.device).startswith("cpu")
    # a batch of only asymmetric examples leaves the symmetric IEM branch without gradient
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the full learning rate, then constant (the released schedule)."""
    return lambda step: min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps else 1.0


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{index}"] = value
    return states


def _set_rng_state(states: dict[str, torch.Tensor]) -> None:
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
