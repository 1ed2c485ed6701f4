"""Terminal chat over your documents (D2LLM retrieval from Qdrant, a streamed answer).

    python -m examples.chatbot.terminal --docs DIR --student DIR

Type a question; the answer streams (quoted from the passages with the offline base model,
generated with an instruction-tuned ``--llm``; each answer says which); the passages it comes
from follow, best match first, each labelled by its file and section, with a bar for how well
it matched and where plain vector search alone would have ranked it. Follow-up questions are
condensed with the conversation. Commands: /reset, /sources, /quit.
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import TextIO

from examples.chatbot.answer import mode_help
from examples.chatbot.cli import add_chatbot_arguments, options_from_args, run_safely
from examples.chatbot.core import Chatbot, ChatbotError, Source, build_chatbot

HELP = "commands: /reset (new conversation), /sources (show or hide sources), /quit"


def score_bar(score: float, scores: list[float], width: int = 10) -> str:
    """How strongly a passage matched, as a bar: the best of the list full, the weakest a
    quarter (as the web page draws it)."""
    top, low = max(scores), min(scores)
    share = 0.25 + 0.75 * (score - low) / (top - low) if top > low else 1.0
    filled = max(1, round(share * width))
    return "█" * filled + "░" * (width - filled)


def format_sources(sources: list[Source], width: int = 100) -> str:
    """One line per passage, best match first: its rank, file and section, a bar for how well
    it matched, where plain vector search alone ranked it; then a snippet."""
    if not sources:
        return "  (no passage of your documents matched)"
    scores = [s.score for s in sources]
    lines = ["  where this answer comes from, best match first:"]
    for s in sources:
        note = f"  ({s.rank_note()})" if s.rank_note() else ""
        lines.append(f"  [{s.rank}] {score_bar(s.score, scores)}  {s.label}{note}")
        lines.append(f"      {s.snippet(width - 6)}")
    return "\n".join(lines)


def chat_loop(chatbot: Chatbot, stdin: TextIO | None = None, stdout: TextIO | None = None,
              show_sources: bool = True, prompt: str = "you> ") -> int:
    """Read questions until /quit or end of input; return how many were answered."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if isinstance(stdin, io.TextIOWrapper) and stdin.errors == "strict":
        stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 must not end the chat
    conversation = chatbot.new_conversation()
    answered = 0
    print(HELP, file=stdout)
    while True:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D)
            stdout.write("\n")
            return answered
        question = _without_surrogates(line).strip()
        if not question:
            continue
        if "\ufffd" in question:
            print("(your input held bytes that are not UTF-8; they were replaced with U+FFFD: "
                  "set the terminal's encoding to UTF-8)", file=stdout)
        if question in ("/quit", "/exit"):
            return answered
        if question == "/reset":
            conversation.reset()
            print("(new conversation)", file=stdout)
            continue
        if question == "/sources":
            show_sources = not show_sources
            print(f"(sources {'shown' if show_sources else 'hidden'})", file=stdout)
            continue
        try:
            reply = conversation.ask(question)
        except ChatbotError as exc:
            print(f"error: {exc}", file=stdout)
            continue
        except KeyboardInterrupt:  # while searching: back to the prompt, not out of the chat
            print("[stopped]", file=stdout)
            continue
        stdout.write(f"bot> [{reply.mode}]\n" if reply.mode else "bot> ")
        try:
            for token in reply:
                stdout.write(token)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [stopped]")
        finally:
            reply.close()  # a stopped answer frees the LLM
        stdout.write("\n")
        if show_sources:
            print("sources (ranked by D2LLM):", file=stdout)
            print(format_sources(reply.sources), file=stdout)
        answered += 1


def _without_surrogates(line: str) -> str:
    """``line`` with the bytes a ``surrogateescape`` stdin kept undecoded (the POSIX locale's
    default, so a pipe's) replaced by U+FFFD: the student refuses lone surrogates."""
    try:
        return line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return line.encode("utf-8", "replace").decode("utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.chatbot.terminal",
                                     description=__doc__.split("\n\n")[0])
    add_chatbot_arguments(parser)
    parser.add_argument("--no-sources", action="store_true", help="do not print the sources")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        chatbot, report = build_chatbot(options_from_args(args))
        with chatbot:
            print(f"{chatbot.documents.location.describe()}: {report.summary()}")
            for relative, why in report.skipped:
                print(f"  skipped {relative}: {why}")
            print(f"student: {chatbot.documents.embed.student.name}")
            print(f"answers: {chatbot.mode_label}: {mode_help(chatbot)}")
            chat_loop(chatbot, show_sources=not args.no_sources)
        return 0

    return run_safely(run)


if __name__ == "__main__":
    sys.exit(main())
