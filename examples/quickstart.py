"""The main job, end to end and offline: distil, index into Qdrant, ask.

    python examples/quickstart.py

1. distils a D2LLM student on the sample corpus (Python standard-library docs): the offline
   Gemma 3 270M writes and judges queries, the student starts from all-MiniLM-L6-v2 and keeps
   its starting weights unless distillation beats them on held-out generated queries
   (``d2llm-rag distill``, small settings: a few minutes on a 2-core CPU);
2. indexes the corpus into the embedded Qdrant (Qdrant Edge, a folder) with ``D2LLMEmbedding``;
3. asks a few questions: for each, plain vector search next to this package (vector + keyword
   search, its top-k reordered as the student recorded: cosine, BM25 score, IEM), then an
   answer: with the offline base model, the sentences of the best passages quoted
   (extractive); with an instruction-tuned ``--llm``, generated.

Everything lands under ``--workdir`` (default ``runs/quickstart``); a second run reuses the
student and the index. ``--quick`` is the smoke-test size (the test suite runs it with tiny
models); ``--retrain`` distils again.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.chatbot.answer import ANSWER_MODES  # noqa: E402
from examples.chatbot.cli import run_safely  # noqa: E402
from examples.chatbot.core import (  # noqa: E402
    Chatbot,
    ChatbotError,
    ChatbotOptions,
    Source,
    build_chatbot,
)

HERE = Path(__file__).resolve().parent
SAMPLE_CORPUS = HERE / "sample_corpus" / "python_stdlib"
QUESTIONS = (
    "How do I parse a CSV file?",
    "How can I run a shell command and capture its output?",
    "How do I find all matches of a regular expression in a string?",
)
# d2llm-rag distill settings. "default": a few minutes on a 2-core CPU with Gemma 3 270M; a
# quarter of the generated queries (of passages never trained on) is the dev split the floor
# compares the distilled student with the untrained encoder on, so the quickstart never keeps a
# student that ranks below its starting point. "quick": the smoke-test size.
DISTILL_PRESETS = {
    "default": ["--max-generated-passages", "64", "--num-negatives", "3",
                "--num-easy-negatives", "1", "--batch-size", "8", "--epochs", "20",
                "--lr", "1e-3", "--dev-fraction", "0.25", "--max-steps", "200"],
    # the tiny models of the smoke test write random queries: keep them all
    "quick": ["--max-generated-passages", "12", "--num-negatives", "3",
              "--num-easy-negatives", "1", "--batch-size", "4", "--max-steps", "3",
              "--dev-fraction", "0", "--round-trip-depth", "0"],
}


def distill_command(args: argparse.Namespace, student_dir: Path) -> list[str]:
    """The ``d2llm-rag distill`` arguments this run uses (printed, so it can be rerun)."""
    command = ["distill", "--corpus", str(args.corpus), "--output", str(student_dir),
               *DISTILL_PRESETS["quick" if args.quick else "default"]]
    if args.teacher:
        command += ["--teacher", args.teacher]
    if args.backbone:
        command += ["--student", args.backbone]
    return command + shlex.split(args.distill_args or "")


def ensure_student(args: argparse.Namespace) -> tuple[Path, bool]:
    """Reuse the student in the work dir, or distil one (step 1); True when distilled."""
    student_dir = (args.workdir / "student").resolve()
    if (student_dir / "d2llm_config.json").exists() and not args.retrain:
        print(f"[1/3] reusing the student in {student_dir} (--retrain distils again)")
        return student_dir, False
    from llama_index_d2llm.trainer.cli import main as d2llm_rag

    command = distill_command(args, student_dir)
    if not args.retrain and student_dir.with_name(student_dir.name + ".work").exists():
        command.append("--resume")  # an interrupted earlier run: continue its training
    print("[1/3] distilling a student:  d2llm-rag " + shlex.join(command), flush=True)
    start = time.perf_counter()
    status = d2llm_rag(command)
    if status != 0:
        raise ChatbotError(f"distillation failed (exit status {status}, message above)")
    print(f"      done in {time.perf_counter() - start:.0f} s")
    return student_dir, True


def compare_rankings(chatbot: Chatbot, question: str, width: int = 38) -> str:
    """Plain vector search's top-n next to this package's, each of this package's passages
    with where plain vector search had put it."""
    candidates = chatbot.first_stage(question, chatbot.similarity_top_k)
    plain_rank = {s.node_id: s.rank for s in candidates}
    ours = chatbot.search(question)

    def cell(source: Source | None, detail: str = "") -> str:
        if source is None:
            return " " * width
        room = width - len(detail) - 1 if detail else width
        name = textwrap.shorten(f"{source.label}: {source.snippet(60)}", room, placeholder="…")
        return f"{name} {detail}".ljust(width) if detail else name.ljust(width)

    def moved(source: Source) -> str:
        was = plain_rank.get(source.node_id)
        if was is None:
            return f"(new: not in its top {len(candidates)})"
        return "(same)" if was == source.rank else f"(was #{was})"

    lines = [f"  this package: {chatbot.ranking_words}",
             f"  {'#':>2}  {'plain vector search':<{width}}  this package"]
    for i in range(chatbot.top_n):
        plain = candidates[i] if i < len(candidates) else None
        mine = ours[i] if i < len(ours) else None
        row = f"  {i + 1:>2}  {cell(plain)}  {cell(mine, moved(mine) if mine else '')}"
        lines.append(row.rstrip())
    return "\n".join(lines)


def ask_all(chatbot: Chatbot, questions: list[str], out=sys.stdout) -> list[str]:
    """Step 3: for each question, the two rankings and a streamed answer; returns answers."""
    answers = []
    for question in questions:
        print(f"\nQ: {question}", file=out)
        print(compare_rankings(chatbot, question), file=out)
        reply = chatbot.new_conversation().ask(question)
        out.write("A: ")
        for token in reply:
            out.write(token)
            out.flush()
        out.write("\n")
        answers.append(reply.text)
    return answers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test size: tiny distillation, one question, short answer")
    parser.add_argument("--workdir", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--corpus", type=Path, default=SAMPLE_CORPUS,
                        help="folder of documents (default: the sample corpus)")
    parser.add_argument("--teacher", default=None,
                        help="teacher LLM (default: the offline Gemma 3 270M)")
    parser.add_argument("--backbone", default=None,
                        help=("student encoder (default: all-MiniLM-L6-v2, offline; 'gemma' "
                              "for the paper's LLM student, Gemma 3 270M)"))
    parser.add_argument("--distill-args", default="",
                        help='more d2llm-rag distill options, e.g. "--pma-heads 4"')
    parser.add_argument("--retrain", action="store_true", help="distil again even if a student "
                        "exists in the work dir")
    parser.add_argument("--llm", default="hf", help="answering LLM (see the chatbot's --llm)")
    parser.add_argument("--answer", choices=ANSWER_MODES, default="auto",
                        help="extractive, generate, or auto (see the chatbot's --answer)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--question", action="append", dest="questions",
                        help="ask this instead of the built-in questions (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        student_dir, distilled = ensure_student(args)
        print(f"[2/3] indexing {args.corpus} into the embedded Qdrant in {args.workdir}",
              flush=True)
        options = ChatbotOptions(
            docs=args.corpus, student=student_dir, llm=args.llm, answer=args.answer,
            state_dir=args.workdir,
            collection="quickstart", similarity_top_k=args.top_k, top_n=args.top_n,
            rebuild=distilled,  # the quickstart's own index: a new student re-embeds it
            max_new_tokens=args.max_new_tokens or (48 if args.quick else 96))
        chatbot, report = build_chatbot(options)
        with chatbot:
            print(f"      {report.summary()}")
            questions = args.questions or list(QUESTIONS[:1] if args.quick else QUESTIONS)
            print(f"[3/3] asking {len(questions)} question(s) (answers: {chatbot.mode_label})")
            ask_all(chatbot, questions)
        print("\nNext: chat with your own documents: python -m examples.chatbot terminal "
              f"--docs DIR --student {student_dir}")
        return 0

    return run_safely(run)


if __name__ == "__main__":
    sys.exit(main())
