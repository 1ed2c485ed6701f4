"""Checkpoints of a training run: written atomically, read back only by a matching run.

A checkpoint holds no pickle: the student is written with ``save_pretrained`` (safetensors +
JSON), the optimizer's tensors and the RNG states go to ``optimizer.safetensors``, the weights
of the best dev evaluation to ``best.safetensors``, and everything else (the ``TrainerState``,
the optimizer's hyper-parameters, the scheduler, the settings) to ``trainer_state.json``. Each
is assembled in a temporary directory and renamed into ``checkpoints/step-NNNNNNNN``, so a
crash or Ctrl-C leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from llama_index_d2llm.student import D2LLMStudent
from llama_index_d2llm.student.errors import CheckpointError
from llama_index_d2llm.student.files import staged_directory
from llama_index_d2llm.trainer.config import ConfigError, DistillConfig

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
BEST_NAME = "best.safetensors"
STUDENT_DIR = "student"
STATE_FORMAT = "d2llm-trainer-state-v1"
KEEP_CHECKPOINTS = 2
# What runs did before a setting existed, where that differs from its default: until the
# switch came, the teacher scored the easy negatives; every generated query was kept; PMA
# pooled alone.
BEFORE_THEIR_SETTING = {"teacher_scores_easy_negatives": True, "round_trip_depth": 0,
                        "base_pooling": "none", "teacher_imitation": "on"}
# Settings a checkpoint must share with the run that resumes it: they shape the trajectory.
RESUME_KEYS = (
    "corpus", "queries", "qrels", "pairs", "dev_fraction", "queries_per_passage",
    "max_generated_passages", "round_trip_depth", "heading_queries", "base_pooling",
    "num_negatives",
    "num_easy_negatives",
    "teacher_scores_easy_negatives", "pair_min_score", "teacher", "teacher_imitation",
    "teacher_mode", "student", "backbone_layers", "iem_cosine_skip", "frozen_backbone",
    "tune_top_layers", "student_negatives", "student_negatives_depth", "student_negatives_from",
    "lora_r", "lora_alpha",
    "lora_dropout",
    "pma_heads", "iem_hidden_size", "max_query_length", "max_passage_length", "batch_size",
    "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "seed", "losses",
)


@dataclass
class TrainerState:
    """Where a run is: what a checkpoint must restore for the run to go on exactly.

    The data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so ``epoch`` and
    ``batch`` (batches of it already used) place the run in its data.
    """

    step: int = 0
    epoch: int = 0
    batch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    #: The dev figure of the untrained student (step 0): the starting encoder, the floor;
    #: and each dev query's share of it, which a state must beat beyond noise (``floor.py``).
    start_metric: float | None = None
    start_per_query: dict[str, float] | None = None
    #: The kept state's paired gain over the start: [mean, standard error, dev queries].
    best_gain: list[float] | None = None
    #: Dev evaluations in a row without a new best (early stopping's patience counter).
    bad_evals: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    warmup_steps: int = 0
    #: ``--student-negatives`` of the epoch ``mined_epoch``: query id -> passage ids.
    mined: dict[str, list[str]] | None = None
    mined_epoch: int | None = None
    mining_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        """The state's fields of ``data`` (a checkpoint's JSON holds more); a field a
        checkpoint does not have (it predates the field) keeps its default."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


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
    # a setting added after the checkpoint was written had its default then, except where
    # the behaviour it names was another one then
    defaults = {f.name: f.default for f in fields(DistillConfig)} | BEFORE_THEIR_SETTING
    changed = [key for key in RESUME_KEYS
               if saved.get(key, defaults.get(key)) != current.get(key)]
    if changed:
        details = ", ".join(f"{k}: {saved.get(k, defaults.get(k))!r} -> {current.get(k)!r}"
                            for k in changed[:4])
        raise ConfigError(
            f"cannot resume from {str(path)!r}: it was trained with other settings ({details}). "
            "Restore those settings, or run without --resume to start over"
        )
    return state


def save_checkpoint(root: Path, state: TrainerState, *, student: D2LLMStudent,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainable: list[str],
                    rng: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None,
                    num_processes: int, config: DistillConfig) -> Path:
    """Write ``root/step-NNNNNNNN`` atomically and keep the last ``KEEP_CHECKPOINTS``."""
    from safetensors.torch import save_file

    target = root / f"step-{state.step:08d}"
    with staged_directory(target, ".checkpoint-") as work:
        student.save_pretrained(work / STUDENT_DIR)
        tensors, scalars = {}, {}
        optimizer_state = optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{index}.{key}"] = value
        for key, value in rng.items():
            tensors[f"rng.{key}"] = value
        save_file(tensors, str(work / OPTIMIZER_NAME), metadata={"format": STATE_FORMAT})
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()},
                      str(work / BEST_NAME), metadata={"format": STATE_FORMAT})
        payload = {
            "format": STATE_FORMAT, **state.to_dict(),
            "param_groups": [{k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in group.items()}
                             for group in optimizer_state["param_groups"]],
            "optimizer_scalars": scalars,
            "scheduler": {k: v for k, v in scheduler.state_dict().items()
                          if k != "lr_lambdas"},
            "trainable": trainable,
            "num_processes": num_processes,
            "config": config.to_dict(),
        }
        (work / STATE_NAME).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    for old in list_checkpoints(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return target


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` restores beside the optimizer (which it fills in place)."""

    state: TrainerState
    rng: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None


def load_checkpoint(path: Path, config: DistillConfig, optimizer: torch.optim.Optimizer,
                    trainable: list[str]) -> LoadedCheckpoint:
    """Check ``path`` matches this run, restore the optimizer and the RNG from it (the student
    itself was loaded from ``path/student``)."""
    from safetensors.torch import load_file

    saved = read_checkpoint_state(path, config)
    if saved.get("trainable") != trainable:
        raise CheckpointError(f"checkpoint {str(path)!r} trains other weights than this "
                              "run (LoRA vs frozen backbone?): run without --resume")
    tensors = load_file(str(path / OPTIMIZER_NAME))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for key, value in saved.get("optimizer_scalars", {}).items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    groups = []
    for group in saved["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    rng = {key[len("rng."):]: value for key, value in tensors.items()
           if key.startswith("rng.")}
    set_rng_state(rng)
    best = path / BEST_NAME
    return LoadedCheckpoint(TrainerState.from_dict(saved), rng,
                            load_file(str(best)) if best.exists() else None)


def rng_state() -> dict[str, torch.Tensor]:
    """Torch's RNG states (CPU, and each initialised GPU's), to save with a checkpoint."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{index}"] = value
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
