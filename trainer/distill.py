"""The distillation pipeline: corpus -> queries -> hard negatives -> teacher scores -> training
-> a saved student.

Every stage caches its result under the work directory (generated queries, negatives, teacher
scores, frozen-backbone token states, training checkpoints), so a second run, or one resumed
after an interruption, redoes nothing already done. Inputs are checked before the first long
stage: a bad path or an unusable data set fails in seconds, not after an hour of scoring.
The teacher is unloaded before the student is built, so both never share memory.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student import D2LLMStudent, LoraSettings
from llama_index_d2llm.student.backbone import (
    DEFAULT_BACKBONE_LAYERS,
    DEFAULT_BACKBONE_NAME,
    load_tokenizer,
    resolve_backbone,
    resolve_device,
)
from llama_index_d2llm.student.body import check_max_lengths
from llama_index_d2llm.student.files import (
    apply_default_modes,
    staged_directory,
)
from llama_index_d2llm.student.storage import check_student_target
from llama_index_d2llm.trainer.checkpoints import STUDENT_DIR, latest_checkpoint
from llama_index_d2llm.trainer.config import (
    DISTILL_CONFIG_NAME,
    NO_TEACHER,
    ConfigError,
    DistillConfig,
)
from llama_index_d2llm.trainer.corpus import CorpusError, Passage, load_corpus
from llama_index_d2llm.trainer.dataset import (
    RankingItem,
    TrainingExample,
    build_examples,
    items_from_queries,
    pair_items,
    split_items,
)
from llama_index_d2llm.trainer.pairs import SymmetricPair, load_pairs
from llama_index_d2llm.trainer.paths import (
    DISTILLED_FILES,
    SUMMARY_NAME,
    check_model_paths,
    check_run_paths,
    claim_work_dir,
    hold_work_dir,
)
from llama_index_d2llm.trainer.queries import (
    Query,
    generate_queries,
    load_queries,
    split_queries,
)
from llama_index_d2llm.trainer.training import (
    DistillationTrainer,
    StepCallback,
    TrainingResult,
    make_accelerator,
)

logger = logging.getLogger(__name__)

# judged queries mine this many negatives with the student each epoch (from the nearest 50):
# chosen on SciFact dev, where it raised the first stage's nDCG@10 (README, benchmarks/scifact.py)
DEFAULT_STUDENT_NEGATIVES = 16
CPU_TEACHER_MAX_LENGTH, GPU_TEACHER_MAX_LENGTH = 128, 512


def default_teacher_max_length(device: torch.device) -> int:
    """The teacher's prompt limit: 128 tokens on a CPU, where the teacher's scoring is most of
    a distillation and the offline teacher ranks SciFact as well at 128 as at 512 (0.765 and
    0.770 nDCG@10 on BM25's top 10, +-0.018; 6.8 and 2.6 pairs/s:
    ``benchmarks/teacher_rerank.py``); 512 on a GPU, where the length costs little."""
    return CPU_TEACHER_MAX_LENGTH if device.type == "cpu" else GPU_TEACHER_MAX_LENGTH


def resolve_config(config: DistillConfig) -> DistillConfig:
    """A copy with the automatic choices made: frozen backbone and short teacher prompts on
    CPU, LoRA and long ones on a GPU; the measured best depth of the offline default backbone;
    student-mined negatives for judged queries."""
    config = copy.deepcopy(config)
    if config.backbone_layers is None and config.student is None:
        config.backbone_layers = DEFAULT_BACKBONE_LAYERS
    if config.student_negatives is None:
        # generated queries have one positive each, and the passages nearest to it are often
        # other chunks of its document: relevant but unjudged, so not safe to mine
        config.student_negatives = (DEFAULT_STUDENT_NEGATIVES if config.queries is not None
                                    else 0)
    if config.teacher == NO_TEACHER:
        imitation = ("contrastive_imitation", "rank_imitation", "pairwise_rank",
                     "feature_imitation")
        if any(getattr(config.losses, name) for name in imitation):
            logger.info("--teacher none: the imitation losses are off; the judgements label "
                        "every pair")
        for name in imitation:
            setattr(config.losses, name, 0.0)
    device = resolve_device(config.device)
    if config.teacher_max_length is None:
        config.teacher_max_length = default_teacher_max_length(device)
    if config.frozen_backbone is None:
        config.frozen_backbone = device.type == "cpu"
        logger.info("%s backbone on %s (pass --frozen-backbone/--no-frozen-backbone to choose)",
                    "frozen" if config.frozen_backbone else "LoRA-tuned", device.type)
    return config


@dataclass
class PreparedData:
    """Everything training needs, built by the data stages (all cached in the work dir)."""

    examples: list[TrainingExample]
    train_items: list[RankingItem]
    dev_items: list[RankingItem]
    texts: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)


def prepare_data(config: DistillConfig, *, teacher: Any = None,
                 device: torch.device | None = None) -> PreparedData:
    """Corpus -> queries -> hard negatives -> teacher-scored examples (``config`` resolved).

    The teacher is loaded here unless given, and unloaded before returning.
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
            timings["generate_queries_s"] = time.perf_counter() - start
        start = time.perf_counter()
        train_items, dev_items, passages = _ranking_items(config, passages, queries, pairs, show)
        timings["mining_s"] = time.perf_counter() - start
        texts = {p.id: p.text for p in passages}
        start = time.perf_counter()
        easy = config.num_easy_negatives if config.losses.needs_easy_negatives else 0
        examples = build_examples(train_items, texts, teacher, num_easy_negatives=easy,
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
    return PreparedData(examples, train_items, dev_items, texts, timings)


def distill(config: DistillConfig, *, teacher: Any = None,
            step_callback: StepCallback | None = None) -> Path:
    """Run the whole pipeline and return the directory of the distilled student.

    ``teacher``: an already loaded teacher (anything with ``score`` and ``generate`` like
    ``trainer.teacher.Teacher``) instead of loading ``config.teacher``. ``step_callback`` is
    called with ``(step, logs)`` after every optimizer step. The work directory is locked
    for the run: a second run on it is refused (``paths.hold_work_dir``).
    """
    with hold_work_dir(config):
        return _distill(config, teacher=teacher, step_callback=step_callback)


def _distill(config: DistillConfig, *, teacher: Any,
             step_callback: StepCallback | None) -> Path:
    config = resolve_config(config)
    output, _ = check_run_paths(config)
    check_model_paths(config)
    check_student_lengths(config)
    accelerator = make_accelerator(config)
    if not accelerator.is_local_main_process:
        config.show_progress = False
    # the main process scores and caches first; the others then read its caches
    with accelerator.main_process_first():
        data = prepare_data(config, teacher=teacher, device=accelerator.device)

    checkpoint = latest_checkpoint(config) if config.resume else None
    if config.resume and checkpoint is None:
        logger.warning("--resume: no checkpoint under %s, starting from the beginning",
                       config.work_path)
    student = _build_student(config, accelerator.device, checkpoint)
    token_cache = None
    if config.frozen_backbone:
        from llama_index_d2llm.trainer.token_states import TokenStateCache

        lora = student.config.lora
        token_cache = TokenStateCache(student, config.work_path / "token_states",
                                      depth=lora.first_tuned_layer if lora else None,
                                      batch_size=config.encode_batch_size,
                                      show_progress=config.show_progress)
    trainer = DistillationTrainer(student, config, data.examples, data.texts,
                                  dev_items=data.dev_items, token_cache=token_cache,
                                  accelerator=accelerator, step_callback=step_callback)
    start = time.perf_counter()
    result = trainer.train(resume_from=checkpoint)
    data.timings.update(trainer.timings)  # caching the backbone's states, apart from training
    data.timings["training_s"] = (time.perf_counter() - start
                                  - trainer.timings.get("token_states_s", 0.0))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_distilled(student, config, result, output, timings=data.timings,
                       data={"train_examples": len(data.examples),
                             "train_queries": len(data.train_items),
                             "dev_queries": len(data.dev_items), "texts": len(data.texts)})
    accelerator.wait_for_everyone()
    return output


# ---------------------------------------------------------------------------- stages
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


def _build_student(config: DistillConfig, device: torch.device,
                   checkpoint: Path | None) -> D2LLMStudent:
    if checkpoint is not None:
        student = D2LLMStudent.from_pretrained(checkpoint / STUDENT_DIR, device=device,
                                               dtype=config.dtype, trainable=True,
                                               trust_remote_code=config.trust_remote_code)
    else:
        lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha,
                            dropout=config.lora_dropout)
        if config.frozen_backbone:
            lora = _top_layers_lora(config, lora)
        student = D2LLMStudent.from_backbone(
            config.student, backbone_layers=config.backbone_layers, lora=lora,
            pma_heads=config.pma_heads, iem_hidden_size=config.iem_hidden_size,
            iem_cosine_skip=config.iem_cosine_skip, max_query_length=config.max_query_length,
            max_passage_length=config.max_passage_length, device=device, dtype=config.dtype,
            trust_remote_code=config.trust_remote_code, seed=config.seed,
        )
    if not config.frozen_backbone and config.gradient_checkpointing:
        student.backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    return student


def _top_layers_lora(config: DistillConfig, lora: LoraSettings) -> LoraSettings | None:
    """Frozen mode: no LoRA, or LoRA on the top ``tune_top_layers`` blocks only."""
    if not config.tune_top_layers:
        return None
    blocks = _block_count(config)
    if config.tune_top_layers >= blocks:
        raise ConfigError(f"--tune-top-layers {config.tune_top_layers} leaves nothing frozen to "
                          f"cache: the student has {blocks} blocks; tune fewer, or use "
                          "--no-frozen-backbone for LoRA on all of them")
    lora.layers = list(range(blocks - config.tune_top_layers, blocks))
    return lora


def _backbone_config(config: DistillConfig) -> Any:
    """The student backbone's Hugging Face config (no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_backbone(config.student),
                                      trust_remote_code=config.trust_remote_code)


def _block_count(config: DistillConfig) -> int:
    """Transformer blocks the student keeps (read from the backbone's config, no weights)."""
    backbone = _backbone_config(config)
    backbone = getattr(backbone, "text_config", None) or backbone
    return config.backbone_layers or int(backbone.num_hidden_layers)


def check_student_lengths(config: DistillConfig) -> None:
    """Student text limits past the backbone's positions (an encoder's 512) fail before the
    teacher runs, not when the student is built after it."""
    tokenizer = load_tokenizer(resolve_backbone(config.student), config.trust_remote_code)
    try:
        check_max_lengths(_backbone_config(config), tokenizer,
                          config.student or DEFAULT_BACKBONE_NAME,
                          query=config.max_query_length, passage=config.max_passage_length)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def save_distilled(student: D2LLMStudent, config: DistillConfig, result: TrainingResult,
                   output: Path, *, timings: dict[str, float] | None = None,
                   data: dict[str, Any] | None = None) -> Path:
    """The student + ``distill_config.json`` + ``training_summary.json``, swapped in whole."""
    with staged_directory(output) as staging:
        written = student.save_pretrained(staging)
        config.to_json_file(written / DISTILL_CONFIG_NAME)
        summary = {"training": result.__dict__, "timings": timings or {}, "data": data or {},
                   "fingerprint": student.config.fingerprint}
        (written / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, default=str) + "\n")
        apply_default_modes(written)
        check_student_target(output, DISTILLED_FILES)  # again: files may have appeared since
    logger.info("distilled student written to %s", output)
    return output
