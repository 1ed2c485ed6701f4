"""The training loop: Accelerate (CPU, one GPU, or several via ``accelerate launch``), AdamW,
gradient accumulation, clipping, linear warm-up, dev evaluation with early stopping, atomic
checkpoints and exact resumption.

What is trained: PMA and the IEM always, plus the backbone's LoRA adapter unless the backbone
is frozen (then its token states come from a ``TokenStateCache`` and a step costs
milliseconds on a CPU).

The data order of epoch ``e`` is a permutation seeded by ``(seed, e)`` and the RNG state is
saved at each optimizer step, so a run resumed from a checkpoint (``checkpoints.py``) takes
exactly the steps the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.student.errors import CheckpointError
from llama_index_d2llm.trainer.checkpoints import (
    CHECKPOINTS_DIR,
    STUDENT_DIR,
    TrainerState,
    checkpoint_root,
    clear_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_state,
    rng_state,
    save_checkpoint,
)
from llama_index_d2llm.trainer.config import DistillConfig
from llama_index_d2llm.trainer.dataset import Collator, RankingItem, TrainingExample
from llama_index_d2llm.trainer.dev_candidates import CANDIDATE_LIST_METRIC, dev_metrics
from llama_index_d2llm.trainer.dev_ranking import (
    DEV_METRIC,
    DEV_PER_QUERY,
    DevRanking,
    format_report,
    fusion_from,
)
from llama_index_d2llm.trainer.encoding import (
    TextEncoder,
    backbone_encoder,
    cached_encoder,
    encode_distinct,
)
from llama_index_d2llm.trainer.floor import FloorCheck, compare_to_start
from llama_index_d2llm.trainer.floor import report as report_floor
from llama_index_d2llm.trainer.losses import D2LLMDistillationLoss
from llama_index_d2llm.trainer.mining import StudentNegativeMiner
from llama_index_d2llm.trainer.objective import DistillationModel, evaluate_objective
from llama_index_d2llm.trainer.optimization import (
    inner_optimizer,
    make_accelerator,
    make_optimizer,
    warmup_schedule,
)
from llama_index_d2llm.trainer.token_states import TokenStateCache

__all__ = [  # the names moved out of this module stay importable from it
    "CANDIDATE_LIST_METRIC", "CHECKPOINTS_DIR", "STUDENT_DIR", "DistillationModel",
    "DistillationTrainer", "StepCallback", "TextEncoder", "TrainerState", "TrainingResult",
    "backbone_encoder", "cached_encoder", "checkpoint_root", "clear_checkpoints", "dev_metrics",
    "encode_distinct", "evaluate_objective", "latest_checkpoint", "list_checkpoints",
    "make_accelerator", "read_checkpoint_state",
]

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]


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
    #: The dev figure of the untrained student (the starting encoder), and whether it was
    #: kept because no distilled state ranked above it (the floor).
    start_metric: float | None = None
    kept_start: bool = False


@dataclass
class _Run:
    """One call of ``train``: the prepared objects and counters its steps share."""

    model: Any
    optimizer: Any
    scheduler: Any
    state: TrainerState
    total_steps: int
    batches_per_epoch: int
    resumed_from_step: int | None = None
    #: The trainable weights of the best dev evaluation so far.
    best_state: dict[str, torch.Tensor] | None = None
    progress: Any = None
    #: The step of the last checkpoint written (or resumed from); -1 before any.
    saved_step: int = -1
    #: Inside an optimizer update: an interrupt now must not write a checkpoint.
    updating: bool = False
    stopped_early: bool = False
    running: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state.step >= self.total_steps


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
        self.timings: dict[str, float] = {}  # seconds of the stages inside train()
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
        self.miner = StudentNegativeMiner(
            student, self.encoder, self.examples, texts, count=config.student_negatives,
            depth=config.student_negatives_depth, source=config.student_negatives_from,
            seed=config.seed, chunk=config.encode_batch_size)
        self.root = checkpoint_root(config)
        self._rng_snapshot = rng_state()

    # ------------------------------------------------------------------ setup
    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self._trainable(), lr=self.config.lr,
                              weight_decay=self.config.weight_decay)

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
        start = time.perf_counter()
        with self.accelerator.main_process_first():
            self.token_cache.ensure(queries, "query")
            self.token_cache.ensure(sorted(self.texts[pid] for pid in passages), "passage")
        self.timings["token_states_s"] = time.perf_counter() - start

    def _start(self, resume_from: Path | None) -> _Run:
        """Prepare model, optimizer and scheduler; restore them from ``resume_from`` if given."""
        config, accelerator = self.config, self.accelerator
        self.prepare_token_cache()
        model, optimizer = accelerator.prepare(self.model, self._optimizer())
        batches_per_epoch = len(self._loader(0))
        steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        state = TrainerState(warmup_steps=int(total_steps * config.warmup_ratio))
        run = _Run(model, optimizer, None, state, total_steps, batches_per_epoch)
        if resume_from is not None:
            loaded = load_checkpoint(resume_from, config, inner_optimizer(optimizer),
                                     [name for name, _ in self._trainable()])
            self._rng_snapshot = loaded.rng
            state = run.state = loaded.state
            run.best_state = loaded.best
            run.resumed_from_step = run.saved_step = state.step
            logger.info("resuming from %s (step %d)", resume_from, state.step)
        else:
            if accelerator.is_main_process:
                clear_checkpoints(self.root)  # a fresh run: stale ones must not be resumed
            self._evaluate_start(run)
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(
            inner_optimizer(optimizer), warmup_schedule(state.warmup_steps), last_epoch=-1)
        with warnings.catch_warnings():  # replaying the steps done, not training out of order
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for _ in range(state.step):
                run.scheduler.step()
        if config.show_progress and accelerator.is_local_main_process:
            from tqdm.auto import tqdm

            run.progress = tqdm(total=total_steps, initial=min(state.step, total_steps),
                                desc="distilling", unit="step")
        return run

    # ------------------------------------------------------------------ train
    def train(self, resume_from: Path | None = None) -> TrainingResult:
        run = self._start(resume_from)
        state = run.state
        try:
            while state.epoch < self.config.epochs and not run.done:
                self.miner.prepare_epoch(state, self.accelerator)
                self._train_epoch(run)
                if run.stopped_early:
                    logger.info("early stopping at step %d: %s did not improve for %d "
                                "evaluations (best %.4f at step %d)", state.step,
                                self.stopping_metric, self.config.patience, state.best_metric,
                                state.best_step)
                    break
        except KeyboardInterrupt:
            # the state after the last complete optimizer step is consistent: keep it
            if not run.updating and state.step != run.saved_step and state.step > 0:
                self._save_checkpoint(run)
                logger.warning("interrupted: checkpoint of step %d written; continue with "
                               "--resume", state.step)
            raise
        finally:
            if run.progress is not None:
                run.progress.close()
        return self._finish(run)

    def _train_epoch(self, run: _Run) -> None:
        """The rest of the current epoch, or until the run is done or stops early."""
        state = run.state
        loader = self._loader(state.epoch)
        skip = state.batch
        if skip:
            loader = self.accelerator.skip_first_batches(loader, skip)
        run.model.train()
        started = time.perf_counter()
        for index, batch in enumerate(loader, start=skip):
            if not self._accumulate(run, index, batch):
                continue
            self._optimizer_step(run, index)
            run.step_seconds.append(time.perf_counter() - started)
            logs = {"lr": run.scheduler.get_last_lr()[0], **run.running}
            run.running = {}
            if run.progress is not None:
                run.progress.update(1)
                run.progress.set_postfix(loss=f"{logs['loss']:.4f}")
            end_of_epoch = state.batch >= run.batches_per_epoch
            evaluate = self.dev_items and (
                end_of_epoch or run.done
                or (self.config.eval_every and state.step % self.config.eval_every == 0))
            if end_of_epoch:
                state.epoch += 1
                state.batch = 0
            if evaluate:
                self._evaluate(run, logs)
            if (state.step % self.config.checkpoint_every == 0 or run.stopped_early
                    or run.done):
                self._save_checkpoint(run)
            if self.step_callback is not None:
                self.step_callback(state.step, logs)
            if run.stopped_early or run.done:
                break
            started = time.perf_counter()

    def _accumulate(self, run: _Run, index: int, batch: Any) -> bool:
        """Forward and backward ``batch``; whether it ends a gradient-accumulation group."""
        accum = self.config.grad_accum
        group_start = index - index % accum
        group_size = min(accum, run.batches_per_epoch - group_start)
        sync = index + 1 == group_start + group_size
        with self.accelerator.no_sync(run.model) if not sync else nullcontext():
            out = run.model(batch)
            self.accelerator.backward(out["loss"] / group_size)
        for name, value in out.items():
            run.running[name] = run.running.get(name, 0.0) + float(value.detach()) / group_size
        return sync

    def _optimizer_step(self, run: _Run, index: int) -> None:
        """Clip, update, and advance the counters to after batch ``index``."""
        run.updating = True
        if self.config.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_([p for _, p in self._trainable()],
                                             self.config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.state.step += 1
        run.state.batch = index + 1
        self._rng_snapshot = rng_state()
        run.updating = False

    def _evaluate(self, run: _Run, logs: dict[str, float]) -> None:
        """Dev metrics into ``logs`` and the history; keep the best weights; early stopping."""
        state = run.state
        metrics = self._dev_metrics()
        per_query = metrics.pop(DEV_PER_QUERY, None)
        logs.update(metrics)
        score = metrics[self.stopping_metric]
        check = compare_to_start(state.start_per_query, per_query)
        if state.best_metric is None or (score > state.best_metric
                                         and (check is None or check.clears)):
            state.best_metric, state.best_step, state.bad_evals = score, state.step, 0
            state.best_gain = None if check is None else [check.gain, check.standard_error,
                                                          check.queries]
            run.best_state = self._trainable_state()
        else:
            state.bad_evals += 1
        state.history.append({"step": state.step, **logs})
        if run.progress is not None:
            run.progress.set_postfix(loss=f"{logs['loss']:.4f}", dev=f"{score:.4f}")
        if state.bad_evals >= self.config.patience:
            run.stopped_early = True

    def _evaluate_start(self, run: _Run) -> None:
        """The floor (``floor.py``): the untrained student (the starting encoder, when it
        starts from its backbone's pooling) is evaluated like every later state and is the
        first best, so training keeps a state only when it ranks above it on dev."""
        if not self.dev_items:
            return
        state = run.state
        metrics = self._dev_metrics()
        state.start_per_query = metrics.pop(DEV_PER_QUERY, None)
        state.start_metric = state.best_metric = metrics[self.stopping_metric]
        state.best_step = 0
        run.best_state = self._trainable_state()
        state.history.append({"step": 0, **metrics})
        logger.info("dev %s of the starting point (untrained student): %.4f",
                    self.stopping_metric, state.start_metric)

    def _finish(self, run: _Run) -> TrainingResult:
        """Restore the best dev weights, record the IEM weights, sum the run up."""
        state = run.state
        if run.best_state is not None and state.best_step != state.step:
            logger.info("restoring the best dev weights (step %d, %s %.4f)", state.best_step,
                        self.stopping_metric, state.best_metric)
            self._load_trainable_state(run.best_state)
        self.student.eval()
        kept_start = state.best_step == 0 and state.step > 0
        self._report_floor(state, kept_start)
        dev = self._record_fusion(state)
        completed = state.epoch + state.batch / max(run.batches_per_epoch, 1)
        seconds = run.step_seconds
        return TrainingResult(
            steps=state.step, epochs=round(completed, 4), stopped_early=run.stopped_early,
            best_step=state.best_step, best_metric=state.best_metric,
            seconds_per_step=(sum(seconds) / len(seconds)) if seconds else None,
            resumed_from_step=run.resumed_from_step, examples=len(self.examples),
            history=state.history, mining_seconds=round(state.mining_seconds, 3), dev=dev,
            start_metric=state.start_metric, kept_start=kept_start,
        )

    def _report_floor(self, state: TrainerState, kept_start: bool) -> None:
        best_trained = max((entry[self.stopping_metric] for entry in state.history
                            if entry["step"] > 0 and self.stopping_metric in entry),
                           default=None)
        check = FloorCheck(*state.best_gain) if state.best_gain else None
        report_floor(self.stopping_metric, state.start_metric, state.best_metric, kept_start,
                     check, best_trained)

    def _record_fusion(self, state: TrainerState) -> dict[str, float]:
        """Record in the student how each first stage's candidates are rescored
        (``student/fusion.py``), from the whole-corpus dev ranking of the kept weights: the
        evaluation that chose them, else a new one."""
        if self.dev_ranking is None:
            logger.warning("no dev queries to weigh the rescoring on: the student rescores "
                           "with the default fusion (cosine, and BM25 for hybrid search; no "
                           "IEM); hold some queries out (--dev-fraction) to let the distiller "
                           "measure what the IEM adds")
            return {}
        kept = [entry for entry in state.history
                if entry["step"] == state.best_step and DEV_METRIC in entry]
        metrics = ({k: v for k, v in kept[-1].items() if k.startswith(("dev_", "fusion_"))}
                   if kept else self._dev_metrics())
        metrics.pop(DEV_PER_QUERY, None)
        self.student.config.fusion = fusion_from(metrics)
        logger.info("%s", format_report(metrics))
        return metrics

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

    def _save_checkpoint(self, run: _Run) -> None:
        """Every process waits; the main one writes (``checkpoints.save_checkpoint``)."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        run.saved_step = run.state.step
        if not accelerator.is_main_process:
            return
        save_checkpoint(
            self.root, run.state, student=accelerator.unwrap_model(self.model).student,
            optimizer=inner_optimizer(run.optimizer), scheduler=run.scheduler,
            trainable=[name for name, _ in self._trainable()], rng=self._rng_snapshot,
            best=run.best_state, num_processes=accelerator.num_processes, config=self.config)

