"""Command-line plumbing shared by the front ends: common flags and one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from examples.chatbot.answer import ANSWER_MODES
from examples.chatbot.condense import CONDENSE_MODES
from examples.chatbot.core import (
    DEFAULT_COLLECTION,
    DEFAULT_STATE_DIR,
    ChatbotError,
    ChatbotOptions,
)
from examples.chatbot.llm import LLM_SPEC_HELP

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_chatbot_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every front end takes: documents, student, store, LLM, retrieval."""
    parser.add_argument("--docs", type=Path, required=True,
                        help="folder of your documents (.txt, .md, .pdf, .docx, ...)")
    parser.add_argument("--student", type=Path, required=True,
                        help="a distilled student (the --output of `d2llm-rag distill`)")
    parser.add_argument("--llm", default="hf", help=f"the answering LLM: {LLM_SPEC_HELP}")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="longest answer, in tokens")
    parser.add_argument("--answer", choices=ANSWER_MODES, default="auto",
                        help="extractive: quote the sentences of the sources that best match the "
                        "question; generate: the LLM writes the answer; auto (default): "
                        "extractive with a base model such as the offline default, else "
                        "generate")
    parser.add_argument("--condense", choices=CONDENSE_MODES, default="auto",
                        help="how a follow-up becomes a search query: history (the last user "
                        "turn joined with it, no model), llm (the LLM rewrites it), auto "
                        "(default): history with a base model, else llm")
    store = parser.add_argument_group("Qdrant")
    store.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                       help="where the embedded Qdrant and the ingestion manifests live")
    store.add_argument("--qdrant-path", type=Path, default=None,
                       help="folder of the embedded Qdrant (default: STATE_DIR/qdrant)")
    store.add_argument("--qdrant-url", default=None,
                       help="a Qdrant server instead, e.g. http://127.0.0.1:6333")
    store.add_argument("--qdrant-api-key", default=None, help="API key of the Qdrant server")
    store.add_argument("--collection", default=DEFAULT_COLLECTION)
    store.add_argument("--rebuild", action="store_true",
                       help="drop the collection and embed every document again")
    search = parser.add_argument_group("retrieval")
    search.add_argument("--top-k", type=int, default=50,
                        help="first-stage candidates from Qdrant's cosine search")
    search.add_argument("--top-n", type=int, default=4,
                        help="passages kept after the rescoring (the LLM's context)")
    parser.add_argument("--device", default=None, help="torch device (default: CUDA if any)")


def options_from_args(args: argparse.Namespace) -> ChatbotOptions:
    for name in ("top_k", "top_n", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ChatbotError(f"--{name.replace('_', '-')} must be at least 1")
    return ChatbotOptions(
        docs=args.docs, student=args.student, llm=args.llm, qdrant_path=args.qdrant_path,
        qdrant_url=args.qdrant_url, qdrant_api_key=args.qdrant_api_key,
        collection=args.collection, state_dir=args.state_dir, similarity_top_k=args.top_k,
        top_n=args.top_n, max_new_tokens=args.max_new_tokens, rebuild=args.rebuild,
        device=args.device, answer=args.answer, condense=args.condense)


def run_safely(main: Callable[[], int | None]) -> int:
    """Run a front end; the errors a user can fix become one line on stderr, no traceback."""
    from llama_index_d2llm.student.errors import D2LLMError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        return main() or 0
    except KeyboardInterrupt:
        print("\ninterrupted; what was indexed so far is kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ChatbotError, D2LLMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def quiet_libraries() -> None:
    """Keep the chat readable: no weight-loading bars or load reports from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("llama_index.core.chat_engine").setLevel(logging.WARNING)
