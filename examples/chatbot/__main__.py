"""``python -m examples.chatbot {ingest,terminal,web} --docs DIR --student DIR [...]``.

``ingest`` only brings the Qdrant collection in step with the folder (no LLM is loaded);
``terminal`` and ``web`` do the same, then chat.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from examples.chatbot import terminal
from examples.chatbot.cli import add_chatbot_arguments, options_from_args, run_safely
from examples.chatbot.core import open_index

COMMANDS = ("ingest", "terminal", "web")


def _web() -> ModuleType:
    """The web front end, imported only when asked for: it needs the examples extra."""
    from examples.chatbot import web

    return web


def build_ingest_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.chatbot ingest",
                                     description="Index a folder into Qdrant with D2LLM.")
    add_chatbot_arguments(parser)
    return parser


def parser_for(command: str) -> argparse.ArgumentParser:
    """The argument parser of a subcommand (the tests check the READMEs against them)."""
    if command == "ingest":
        return build_ingest_parser()
    return terminal.build_parser() if command == "terminal" else _web().build_parser()


def ingest(argv: list[str]) -> int:
    args = build_ingest_parser().parse_args(argv)

    def run() -> int:
        index, report = open_index(options_from_args(args))
        with index:
            print(f"{index.location.describe()}: {report.summary()}")
            for relative, why in report.skipped:
                print(f"  skipped {relative}: {why}")
        return 0

    return run_safely(run)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m examples.chatbot {{{','.join(COMMANDS)}}} --docs DIR "
              "--student DIR [options]  (add --help after a command for its options)",
              file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "ingest":
        return ingest(rest)
    return terminal.main(rest) if command == "terminal" else _web().main(rest)


if __name__ == "__main__":
    sys.exit(main())
