"""The chatbot's one error type: a problem the user can fix, said in one line."""

from __future__ import annotations

from llama_index_d2llm.student.errors import D2LLMError


class ChatbotError(D2LLMError):
    """A problem the user can fix; front ends print its message as one line, no traceback."""
