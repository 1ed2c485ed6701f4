"""The teacher's prompts: yes/no judgement (the paper's Figure 1), query likelihood, and the
few-shot prompt that makes a base LLM write queries for passages.

Templates are plain strings with exactly one ``{query}`` and one ``{passage}`` slot; every other
character (braces included) is literal. They are split into parts so that the teacher can
tokenize each part on its own and cut the passage, never the instruction, to fit a length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llama_index_d2llm.student.tasks import Task

SLOTS = ("query", "passage")

# Figure 1 of the paper, English versions.
SYMMETRIC_INSTRUCTION = (
    "#Q and #P will each describe an event or problem, they may not be related. Based solely on "
    "these descriptions and your understanding of the world, judge whether #P is absolutely "
    "correct about the event in #Q, or whether #Q is absolutely correct about the event or "
    "problem in #P, please answer yes or no."
)
ASYMMETRIC_INSTRUCTION = (
    "#Q will describe a query, #P will describe a passage, they may not be related. Based solely "
    "on these descriptions and your understanding of the world, judge whether #P can correctly "
    "answer the question asked in #Q. Please answer yes or no."
)
INSTRUCTIONS: dict[str, str] = {"symmetric": SYMMETRIC_INSTRUCTION,
                                "asymmetric": ASYMMETRIC_INSTRUCTION}

# Figure 1 puts the texts first and the instruction last; the released Chinese templates put
# the instruction first. Both are offered: which one a model follows better is measured.
PROMPT_ORDERS = ("query-passage-prompt", "prompt-query-passage")
DEFAULT_PROMPT_ORDER = "query-passage-prompt"

# Query likelihood: mean log P(query | passage). The query must come last (its tokens are the
# ones scored); a plain "Passage: ... Query: ..." frame suits base models, which continue text
# rather than follow instructions.
QUERY_LIKELIHOOD_TEMPLATES: dict[str, str] = {
    "asymmetric": "Passage: {passage}\nA question or claim this passage addresses: {query}",
    "symmetric": "Sentence: {passage}\nA sentence that means the same: {query}",
}

# Few-shot examples for query generation (written for this package, not taken from any data
# set). Base models copy the pattern of examples far better than they follow instructions.
GENERATION_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("The mitochondrion is the organelle in which cellular respiration takes place. It oxidises "
     "pyruvate and fatty acids and produces most of the cell's ATP through oxidative "
     "phosphorylation.",
     "Which organelle produces most of the ATP in a cell?"),
    ("The Treaty of Westphalia, signed in 1648 in Osnabrueck and Muenster, ended the Thirty "
     "Years' War and established the principle that each state is sovereign over its territory.",
     "Which treaty ended the Thirty Years' War?"),
    ("To reset the router, hold the recessed button on the back for ten seconds until the "
     "status light blinks orange. All settings, including the Wi-Fi password, return to the "
     "factory defaults.",
     "how do I reset my router to factory settings"),
)
GENERATION_PASSAGE_PREFIX = "Passage: "
GENERATION_QUERY_PREFIX = "\nQuestion:"


@dataclass(frozen=True)
class Part:
    """One piece of a template: literal ``text``, or a ``query``/``passage`` slot.

    For a slot, ``text`` is the whitespace that preceded it in the template: tokenizers such as
    Gemma's give " word" one token but "word" after a separately tokenized space another, so
    the space travels with the slot's content to tokenize the way the joined string would.
    """

    kind: str
    text: str = ""


@dataclass(frozen=True)
class PairTemplate:
    """A prompt with one ``{query}`` and one ``{passage}`` slot."""

    text: str

    def __post_init__(self) -> None:
        for slot in SLOTS:
            count = self.text.count("{" + slot + "}")
            if count != 1:
                raise ValueError(
                    f"a prompt template needs exactly one {{{slot}}} slot, this one has {count}: "
                    f"{self.text!r}; write {{query}} and {{passage}} once each"
                )

    def parts(self) -> list[Part]:
        parts: list[Part] = []
        for piece in re.split(r"(\{query\}|\{passage\})", self.text):
            if piece in ("{query}", "{passage}"):
                literal = parts.pop().text if parts and parts[-1].kind == "text" else ""
                stripped = literal.rstrip(" ")
                if stripped:
                    parts.append(Part("text", stripped))
                parts.append(Part(piece[1:-1], literal[len(stripped):]))
            elif piece:
                parts.append(Part("text", piece))
        return parts

    def render(self, query: str, passage: str) -> str:
        return "".join(part.text if part.kind == "text" else part.text + (
            query if part.kind == "query" else passage) for part in self.parts())

    @property
    def query_is_last(self) -> bool:
        return self.parts()[-1].kind == "query"


def yesno_template(task: Task, order: str = DEFAULT_PROMPT_ORDER) -> str:
    """The paper's yes/no prompt for ``task``, texts and instruction in the given order."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"task must be 'asymmetric' or 'symmetric', got {task!r}")
    instruction = INSTRUCTIONS[task]
    if order == "query-passage-prompt":
        return "#Q: {query}\n#P: {passage}\n" + instruction + "\nAnswer:"
    if order == "prompt-query-passage":
        return instruction + "\n#Q: {query}\n#P: {passage}\nAnswer:"
    raise ValueError(f"prompt_order must be one of {PROMPT_ORDERS}, got {order!r}")


def query_likelihood_template(task: Task) -> str:
    if task not in QUERY_LIKELIHOOD_TEMPLATES:
        raise ValueError(f"task must be 'asymmetric' or 'symmetric', got {task!r}")
    return QUERY_LIKELIHOOD_TEMPLATES[task]


def generation_prefix(examples: tuple[tuple[str, str], ...] = GENERATION_EXAMPLES) -> str:
    """The few-shot examples that precede the passage a query is generated for."""
    return "".join(f"{GENERATION_PASSAGE_PREFIX}{passage}{GENERATION_QUERY_PREFIX} {query}\n\n"
                   for passage, query in examples)
