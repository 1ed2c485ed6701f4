"""How a teacher reads relevance out of its LM and batches its work, as one config object.

A dataclass that round-trips to JSON (like peft's configs), so the settings a teacher was
built with travel together and are checked in one place; ``Teacher`` takes it whole, or
its fields as keyword arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from llama_index_d2llm.student.errors import D2LLMError
from llama_index_d2llm.student.settings import from_known_keys
from llama_index_d2llm.trainer.prompts import DEFAULT_PROMPT_ORDER

MODES = ("yesno", "query-likelihood")
# Query likelihood -> probability: s_T = sigmoid((ll - center) / scale), ll the mean log
# probability per query token. A fixed map, not a per-query softmax: score() is pairwise, so a
# pair's s_T must not depend on which other passages share the call (and it stays cacheable).
# The trainer may still renormalise z_T over one query's list. The center sits between the
# median ll of positives and of negatives of Gemma 3 270M on SciFact dev claims x BM25 top 10,
# so that a typical positive gets s_T ~0.7 and a typical negative ~0.25.
DEFAULT_QL_CENTER = -3.8
DEFAULT_QL_SCALE = 0.5


class TeacherError(D2LLMError, ValueError):
    """The teacher cannot score as asked; the message says what to change."""


@dataclass
class TeacherConfig:
    """Every setting of a ``Teacher`` but the model itself.

    ``mode``: "auto" (yes/no for a tokenizer with a chat template, else query likelihood),
    "yesno" or "query-likelihood". ``templates``: {task: template} replacing the built-in
    prompts. ``yes_token``/``no_token``: the answers yes/no scoring reads (both or neither;
    default: the first single-token pair that fits the tokenizer). ``ql_center``/``ql_scale``:
    the map from query likelihood to a probability. ``use_chat_template`` (None: for yes/no
    with a chat model) wraps the prompt in the tokenizer's chat template. ``batch_size``:
    pairs per forward pass; None (the default) sizes each batch from the free GPU memory and
    the prompts' length.
    """

    mode: str = "auto"
    max_length: int = 512
    batch_size: int | None = None  # None: from the device's free memory (8 on a CPU)
    prompt_order: str = DEFAULT_PROMPT_ORDER
    use_chat_template: bool | None = None
    templates: dict[str, str] | None = None
    yes_token: str | None = None
    no_token: str | None = None
    ql_center: float = DEFAULT_QL_CENTER
    ql_scale: float = DEFAULT_QL_SCALE

    def __post_init__(self) -> None:
        if self.mode not in ("auto", *MODES):
            raise TeacherError(f"mode must be 'auto', 'yesno' or 'query-likelihood', got "
                               f"{self.mode!r}")
        if self.max_length < 16 or (self.batch_size is not None and self.batch_size < 1):
            raise TeacherError(f"max_length={self.max_length} and batch_size={self.batch_size} "
                               "are too small: use e.g. max_length=512, batch_size=8")
        if self.ql_scale <= 0:
            raise TeacherError(f"ql_scale must be positive, got {self.ql_scale}")

    def updated(self, **settings: Any) -> TeacherConfig:
        """A copy with ``settings`` changed; an unknown name is a ``TeacherError``."""
        return self.from_dict({**self.to_dict(), **settings})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherConfig:
        return from_known_keys(cls, data, _unknown)


def _unknown(unknown: list[str], known: list[str]) -> TeacherError:
    return TeacherError(f"unknown teacher settings {unknown}; known: {known}")
