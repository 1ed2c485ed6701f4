"""The distillation pipeline: corpus -> queries -> hard negatives -> teacher scores -> training
-> a saved student.

Every stage caches its result under the work directory (generated queries, negatives, teacher
scores, frozen-backbone token states, training checkpoints), so a second run, or one resumed
after an interruption, redoes nothing already done. Inputs are checked before the first long
stage: a bad path or an unusable data set fails in seconds, not after an hour of scoring.
The student is built first: untrained, it is the starting encoder that judges generated
queries and the teacher (``preparation.py``), and the floor training must beat. The teacher
is unloaded before training.
"""

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student import D2LLMStudent, LoraSettings
from llama_index_d2llm.student.backbone import (
    DEFAULT_BACKBONE_LAYERS,
    DEFAULT_BACKBONE_NAME,
    is_default_llm,
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
from llama_index_d2llm.trainer.paths import (
    DISTILLED_FILES,
    SUMMARY_NAME,
    check_model_paths,
    check_run_paths,
    hold_work_dir,
)
from llama_index_d2llm.trainer.preparation import (  # noqa: F401 - re-exported
    PreparedData,
    StartingEncoder,
    imitation_off,
    load_inputs,
    prepare_data,
)
from llama_index_d2llm.trainer.training import (
    DistillationTrainer,
    StepCallback,
    TrainingResult,
    make_accelerator,
)

logger = logging.getLogger(__name__)

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
    if config.backbone_layers is None and is_default_llm(config.student):
        config.backbone_layers = DEFAULT_BACKBONE_LAYERS
    if config.student_negatives is None:
        # generated queries have one positive each, and the passages nearest to it are often
        # other chunks of its document: relevant but unjudged, so not safe to mine
        config.student_negatives = (DEFAULT_STUDENT_NEGATIVES if config.queries is not None
                                    else 0)
    if config.teacher == NO_TEACHER and imitation_off(config):
        logger.info("--teacher none: the imitation losses are off; the judgements label every "
                    "pair")
    device = resolve_device(config.device)
    if config.teacher_max_length is None:
        config.teacher_max_length = default_teacher_max_length(device)
    if config.frozen_backbone is None:
        config.frozen_backbone = device.type == "cpu"
        logger.info("%s backbone on %s (pass --frozen-backbone/--no-frozen-backbone to choose)",
                    "frozen" if config.frozen_backbone else "LoRA-tuned", device.type)
    return config


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
    checkpoint = latest_checkpoint(config) if config.resume else None
    if config.resume and checkpoint is None:
        logger.warning("--resume: no checkpoint under %s, starting from the beginning",
                       config.work_path)
    # built first: before training, the untrained student is the starting encoder that the
    # round trip judges generated queries with (a resumed run reads that stage's cache)
    student = _build_student(config, accelerator.device, checkpoint)
    token_cache = None
    if config.frozen_backbone:
        from llama_index_d2llm.trainer.token_states import TokenStateCache

        lora = student.config.lora
        token_cache = TokenStateCache(student, config.work_path / "token_states",
                                      depth=lora.first_tuned_layer if lora else None,
                                      batch_size=config.encode_batch_size,
                                      show_progress=config.show_progress)
    starting = StartingEncoder.of(student, token_cache, config.encode_batch_size)
    # the main process scores and caches first; the others then read its caches
    with accelerator.main_process_first():
        data = prepare_data(config, teacher=teacher, device=accelerator.device,
                            starting_encoder=starting)
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
            base_pooling=None if config.base_pooling == "none" else config.base_pooling,
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
