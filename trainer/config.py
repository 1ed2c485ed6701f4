"""Configuration of a distillation run, as a dataclass that round-trips to JSON (like peft's).

The effective configuration (defaults filled in, the automatic choices resolved) is saved
beside the distilled student as ``distill_config.json``, so that a student says how it was
made, and a run can be repeated with ``DistillConfig.from_json_file``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llama_index_d2llm.student.errors import D2LLMError
from llama_index_d2llm.trainer.losses import LossWeights

DISTILL_CONFIG_NAME = "distill_config.json"
TEACHER_MODES = ("auto", "yesno", "query-likelihood")


#: ``--teacher none``: train on the relevance judgements alone (no teacher LLM is loaded).
NO_TEACHER = "none"


class ConfigError(D2LLMError, ValueError):
    """A distillation setting is invalid; the message names the option and a valid value."""


@dataclass
class DistillConfig:
    """Every setting of ``distill``: data, teacher, student, training, losses.

    Paths may be relative to the working directory. ``None`` for ``teacher`` or ``student``
    means the offline default Gemma 3 270M. ``frozen_backbone=None`` picks automatically:
    frozen (cached token states, heads only) on CPU, LoRA on a GPU.
    """

    output: str = "d2llm-student"
    # data
    corpus: str | None = None
    queries: str | None = None
    qrels: str | None = None
    pairs: str | None = None
    work_dir: str | None = None
    exclude: list[str] | None = None
    dev_fraction: float = 0.1
    queries_per_passage: int = 1
    max_generated_passages: int | None = None
    num_negatives: int = 8
    num_easy_negatives: int = 4
    pair_min_score: float = 0.8
    student_negatives: int | None = None
    student_negatives_depth: int = 50
    student_negatives_from: str = "dense"
    # teacher
    teacher: str | None = None
    teacher_mode: str = "auto"
    teacher_batch_size: int = 8
    teacher_max_length: int = 512
    # student
    student: str | None = None
    backbone_layers: int | None = None
    frozen_backbone: bool | None = None
    tune_top_layers: int = 0
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = True
    pma_heads: int = 32
    iem_hidden_size: int = 512
    iem_cosine_skip: bool = True
    max_query_length: int = 64
    max_passage_length: int = 256
    device: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    # training
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    epochs: int = 5
    max_steps: int | None = None
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 2023
    checkpoint_every: int = 200
    eval_every: int | None = None
    patience: int = 3
    resume: bool = False
    encode_batch_size: int = 16
    show_progress: bool = True
    losses: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if isinstance(self.losses, dict):
            self.losses = LossWeights.from_dict(self.losses)
        positive = ["batch_size", "grad_accum", "epochs", "checkpoint_every", "lora_r",
                    "pma_heads", "iem_hidden_size", "max_query_length", "max_passage_length",
                    "teacher_batch_size", "teacher_max_length", "queries_per_passage",
                    "num_negatives", "encode_batch_size", "patience"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_every", "max_generated_passages", "backbone_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{_flag(name)} must be a positive integer or unset, "
                                  f"got {value!r}")
        if self.tune_top_layers < 0:
            raise ConfigError(f"--tune-top-layers must be >= 0, got {self.tune_top_layers}")
        if self.student_negatives is not None and self.student_negatives < 0:
            raise ConfigError(f"--student-negatives must be >= 0 (0: none), got "
                              f"{self.student_negatives}")
        if self.student_negatives_from not in ("dense", "hybrid"):
            raise ConfigError("--student-negatives-from must be 'dense' or 'hybrid', got "
                              f"{self.student_negatives_from!r}")
        if self.student_negatives and self.student_negatives_depth < self.student_negatives:
            raise ConfigError(f"--student-negatives-depth ({self.student_negatives_depth}) must "
                              f"be at least --student-negatives ({self.student_negatives}): "
                              "they are drawn from that many nearest passages")
        if self.num_easy_negatives < 0:
            raise ConfigError(f"--num-easy-negatives must be >= 0, got {self.num_easy_negatives}")
        if not 0 <= self.dev_fraction < 1:
            raise ConfigError(f"--dev-fraction must be in [0, 1), got {self.dev_fraction}: "
                              "use 0 for no dev split, 0.1 to hold out a tenth")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.teacher_mode not in TEACHER_MODES:
            raise ConfigError(f"--teacher-mode must be one of {TEACHER_MODES}, got "
                              f"{self.teacher_mode!r}")
        if self.corpus is None and self.pairs is None:
            raise ConfigError("nothing to distil from: pass --corpus (documents or a BEIR "
                              "corpus.jsonl) and/or --pairs (symmetric sentence pairs)")
        if (self.queries is None) != (self.qrels is None):
            raise ConfigError("--queries and --qrels go together: the judgements say which "
                              "passages answer each query (or pass neither to generate queries)")
        if self.teacher == NO_TEACHER and self.corpus is not None and self.queries is None:
            raise ConfigError("--teacher none trains on judgements alone, and there are none: "
                              "pass --queries and --qrels, or name a teacher to write queries")
        if self.queries is not None and self.corpus is None:
            raise ConfigError("--queries needs --corpus: the passages the queries are judged on")

    @property
    def lora_enabled(self) -> bool:
        """LoRA is trained unless the backbone is frozen (resolve ``frozen_backbone`` first)."""
        return not self.frozen_backbone

    @property
    def work_path(self) -> Path:
        """Caches of the run (queries, negatives, teacher scores, token states, checkpoints)."""
        if self.work_dir:
            return Path(self.work_dir).expanduser()
        output = Path(self.output).expanduser()
        return output.with_name(output.name + ".work")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename)."""
        path = Path(path)
        temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        temp.write_text(self.to_json())
        os.replace(temp, path)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown distillation settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> DistillConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the distillation config {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{str(path)!r} does not hold a JSON object")
        return cls.from_dict(data)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
