"""Turn a follow-up into a query that retrieves on its own, without asking an LLM.

"And how do I write one?" retrieves nothing useful alone: its subject (CSV files) is in the
question before it. ``CondensePlusContextChatEngine`` asks the LLM to rewrite the follow-up
into a standalone question; the offline base model cannot (it answered "Write a single line
of Python code with the same format as above. Question", and retrieval found argparse and
json). ``condense_with_history`` needs no model: the conversation's last two user turns, then the
follow-up, as one query. The student embeds the whole text, so the earlier turn carries the
subject and the follow-up says what is asked about it (measured in
``benchmarks/chatbot_followups.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole

CONDENSE_MODES = ("auto", "history", "llm")
# User turns kept before the follow-up: 2 finds the file of the last turn in the top 3 for
# 19 of 27 conversations, 1 for 17, the follow-up alone for 7 (chatbot_followups.py).
DEFAULT_TURNS = 2


def recent_user_turns(history: Sequence[ChatMessage], turns: int = DEFAULT_TURNS) -> list[str]:
    """The text of the last ``turns`` user messages, oldest first."""
    said = [(m.content or "").strip() for m in history if m.role == MessageRole.USER]
    said = [text for text in said if text]
    return said[-turns:] if turns > 0 else []


def condense_with_history(history: Sequence[ChatMessage], message: str,
                          turns: int = DEFAULT_TURNS) -> str:
    """The follow-up preceded by the last ``turns`` user turns (the message alone at first)."""
    message = message.strip()
    earlier = [text for text in recent_user_turns(history, turns) if text != message]
    return " ".join([*earlier, message])


Condenser = Callable[[Sequence[ChatMessage], str], str]


def history_condenser(turns: int = DEFAULT_TURNS) -> Condenser:
    """``condense(history, message) -> query`` without a model, for the chat engines."""

    def condense(history: Sequence[ChatMessage], message: str) -> str:
        return condense_with_history(history, message, turns)

    return condense


def llm_condenser(llm: Any) -> Condenser:
    """The LLM rewrites the follow-up, with LlamaIndex's own prompt (``--condense llm``)."""
    from llama_index.core.base.llms.generic_utils import messages_to_history_str
    from llama_index.core.chat_engine.condense_plus_context import (
        DEFAULT_CONDENSE_PROMPT_TEMPLATE,
    )

    def condense(history: Sequence[ChatMessage], message: str) -> str:
        if not history:
            return message
        prompt = DEFAULT_CONDENSE_PROMPT_TEMPLATE.format(
            chat_history=messages_to_history_str(history), question=message)
        return str(llm.complete(prompt)).strip() or message

    return condense
