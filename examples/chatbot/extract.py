"""Extractive answers: the units of the retrieved passages that best answer a question.

A passage is split into quotable units (sentences, list items, code blocks), each under its
section heading (``split_passage``); ``ExtractiveAnswerer`` ranks them with the same D2LLM
student that ranked the passages and quotes the best, as written, grouped by section with
their file. Nothing is invented; what it cannot do is rephrase.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from examples.chatbot.chat import Source
    from llama_index_d2llm import D2LLMEmbedding

SCORERS = ("fusion", "iem", "cosine", "lexical", "order")
DEFAULT_SCORER = "fusion"
#: BM25's weight in the ``fusion`` scorer: z(cosine) + LEXICAL_WEIGHT * z(BM25).
LEXICAL_WEIGHT = 1.0
DEFAULT_SENTENCES = 3
#: A unit is quoted only when its score is within this many standard deviations (of the
#: scores over all units) of the best unit's: a weak second or third unit is noise, not an
#: answer. ``benchmarks/chatbot_followups.py --extractive`` chose it among 0.5 to 3: the
#: tightest floor that still quoted an answering unit for as many turns as no floor did.
DEFAULT_MARGIN = 1.25


@dataclass(frozen=True)
class Candidate:
    """One quotable unit of a passage: a sentence, a list item or a code block."""

    text: str  # as written (code keeps its lines)
    heading: str  # the section it sits under in its passage ("" when the passage has none)
    source: str  # the file
    passage: int  # rank of its passage among the sources (0 = best)
    position: int  # order inside the passage

    @property
    def embed_text(self) -> str:
        """What the student embeds: the sentence with its section ("csv.writer: ...")."""
        return f"{self.heading}: {self.text}" if self.heading else self.text


_HEADING = re.compile(r"^#{1,6}\s+(.*\S)\s*$")
_ITEM = re.compile(r"^\s*(?:[*\-+•]|\d+[.)])\s+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(`A-Z0-9])")


_CODE_LINE = re.compile(r"[=(){}\[\]]|^\s*(?:>>>|\.\.\.|def |class |import |from |for |with |"
                        r"if |return )")


def _is_code(lines: list[str]) -> bool:
    """Mostly indented lines that look like code, or an assignment from a call.

    Docstrings indent their bullet lists and notes too: those stay prose.
    """
    if re.match(r"^[\w.\[\]]+\s*=\s*[\w.]+\(", lines[0].strip()):
        return True
    indented = sum(1 for line in lines if line.startswith(("    ", "\t", ">>>")))
    code = sum(1 for line in lines if _CODE_LINE.search(line) and not _ITEM.match(line))
    return indented * 2 >= len(lines) and code * 2 >= len(lines)


def split_passage(text: str, source: str = "", passage: int = 0, min_chars: int = 24,
                  max_code_lines: int = 8) -> list[Candidate]:
    """A passage's quotable units, in order: headings name them, they are not units."""
    units: list[Candidate] = []
    heading = ""

    def add(piece: str) -> None:
        if len(" ".join(piece.split())) >= min_chars:
            units.append(Candidate(piece, heading, source, passage, len(units)))

    block: list[str] = []

    def close_block() -> None:
        if not block:
            return
        if _is_code(block):
            add(textwrap.dedent("\n".join(block[:max_code_lines])).strip())
        else:
            items: list[list[str]] = []
            for line in block:
                if _ITEM.match(line) or not items:
                    items.append([])
                items[-1].append(line.strip())
            for item in items:
                for sentence in _SENTENCE.split(" ".join(item)):
                    add(sentence.strip())
        block.clear()

    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            close_block()
            heading = match.group(1)
        elif not line.strip():
            close_block()
        else:
            block.append(line.rstrip())
    close_block()
    return units


#: Question words that say nothing of the subject (the units' IDF weighs the rest).
_QUESTION_WORDS = frozenset({
    "a", "an", "and", "are", "can", "do", "does", "how", "i", "in", "is", "it", "its", "me",
    "my", "of", "on", "one", "or", "the", "them", "this", "to", "what", "when", "where",
    "which", "who", "why", "with", "you", "your"})


def _words(text: str) -> list[str]:
    """Lower-case words, identifiers split at dots and underscores ("csv.writer" -> csv, writer)."""
    return re.findall(r"[a-z0-9]+", text.casefold())


def _stem(word: str) -> str:
    """A prefix that a word's forms share: write -> writ, parse -> pars, format -> forma."""
    if word.endswith("e") and len(word) > 4:
        word = word[:-1]
    return word[:max(5, len(word) - 2)] if len(word) > 5 else word


def units_bm25(query: str, texts: Sequence[str], k1: float = 1.2, b: float = 0.75) -> list[float]:
    """BM25 of each text for the query, the texts taken as the collection.

    The IDF is counted over these texts: within one answer's units, a word every unit shares
    (the module's name) tells nothing, and the follow-up's own words ("write") tell most. A
    query word matches the unit words it begins (its first five letters and all but its last
    two, less a final e, ``_stem``): "write" matches writer, writerow and writing, "format"
    formatted and formatter, which a stemmer does not give for the API names that
    documentation is made of.
    """
    units = [_words(text) for text in texts]
    if not units:
        return []
    stems = {_stem(w) for w in _words(query) if w not in _QUESTION_WORDS}
    average = sum(map(len, units)) / len(units) or 1.0
    counts = [{s: sum(1 for w in words if w.startswith(s)) for s in stems} for words in units]
    scores = [0.0] * len(units)
    for stem in stems:
        df = sum(1 for c in counts if c[stem])
        if not df:
            continue
        idf = math.log((len(units) - df + 0.5) / (df + 0.5) + 1)
        for i, (words, c) in enumerate(zip(units, counts, strict=True)):
            tf = c[stem]
            scores[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(words) / average))
    return scores


def standardised(scores: Sequence[float]) -> list[float]:
    """Scores in standard deviations from their mean (all 0 when they do not vary), as the
    retriever's fusion standardises its terms (``student/fusion.py: standardize``)."""
    import torch

    from llama_index_d2llm.student.fusion import standardize

    return standardize(torch.tensor(list(scores), dtype=torch.float64)).tolist()


def quote_key(text: str) -> str:
    """The words of a unit, case-folded: equal keys quote the same thing."""
    return " ".join(re.findall(r"\w+", text.casefold()))


def word_runs(key: str, size: int = 5) -> set[str]:
    """The runs of ``size`` consecutive words of a quote key (the whole key when shorter)."""
    words = key.split()
    return {" ".join(words[i:i + size]) for i in range(max(1, len(words) - size + 1))}


def repeats(key: str, seen: Sequence[str], seen_runs: set[str]) -> bool:
    """True when a unit would show again what is shown: the same words, words contained in
    a chosen unit (or containing one), or half its 5-word runs already shown (two units cut
    differently from the same table or list, as overlapping chunks give)."""
    if not key or any(key in other or other in key for other in seen):
        return True
    runs = word_runs(key)
    return 2 * len(runs & seen_runs) >= len(runs)


class ExtractiveAnswerer:
    """The sentences of the sources that best answer a query, ranked by the student.

    Every unit of the retrieved passages is embedded as a passage by the student (with its
    section heading); ``fusion`` (the default) scores them as the retriever rescores
    passages, ``z(cosine) + LEXICAL_WEIGHT * z(BM25)`` standardised over the units, with the
    BM25 of ``units_bm25``; ``iem`` scores them with the IEM (the student's own relevance
    judge), ``cosine`` with the cosine of the vectors, ``lexical`` with BM25 alone, ``order``
    takes them in passage order (the baseline); ``benchmarks/chatbot_followups.py
    --extractive`` measures each. The best ``sentences`` that repeat nothing already chosen
    (``repeats``) are shown grouped by section, in the order they are written, leaving out
    those more than ``margin`` standard deviations below the best (``None``: no floor).
    """

    def __init__(self, embed: D2LLMEmbedding, sentences: int = DEFAULT_SENTENCES,
                 scorer: str = DEFAULT_SCORER, with_heading: bool = True,
                 lexical_weight: float = LEXICAL_WEIGHT,
                 margin: float | None = DEFAULT_MARGIN):
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0 (or None for no floor), got {margin}")
        self.embed = embed
        self.sentences = sentences
        self.scorer = scorer
        self.with_heading = with_heading
        self.lexical_weight = lexical_weight
        self.margin = margin

    def candidates(self, sources: Sequence[Source]) -> list[Candidate]:
        return [unit for rank, source in enumerate(sources)
                for unit in split_passage(source.text, source.source, rank)]

    def scores(self, query: str, units: Sequence[Candidate]) -> list[float]:
        """Higher is better; one per unit."""
        if not units:
            return []
        if self.scorer == "order":
            return [-float(i) for i in range(len(units))]
        texts = [u.embed_text if self.with_heading else u.text for u in units]
        if self.scorer == "lexical":
            return units_bm25(query, texts)
        import torch

        from llama_index_d2llm.student.fusion import standardize

        values = self._student_scores(query, texts)
        if self.scorer == "fusion":
            lexical = torch.tensor(units_bm25(query, texts), dtype=torch.float64)
            values = standardize(values) + self.lexical_weight * standardize(lexical)
        return [float(v) for v in values]

    def _student_scores(self, query: str, texts: list[str]) -> torch.Tensor:
        import torch

        student = self.embed.student
        vectors = student.encode(texts, "passage")
        query_vector = torch.as_tensor([self.embed.get_query_embedding(query)])
        if self.scorer == "iem":
            return student.score(query_vector[0], vectors).double()
        return torch.nn.functional.cosine_similarity(query_vector, vectors).double()

    def scored(self, query: str, sources: Sequence[Source]) -> list[tuple[Candidate, float]]:
        """All units with their scores standardised over the units, best first, duplicates
        dropped."""
        units = self.candidates(sources)
        scores = self.scores(query, units)
        standard = standardised(scores)
        order = sorted(range(len(units)), key=lambda i: (-scores[i], i))
        kept: list[tuple[Candidate, float]] = []
        seen: list[str] = []
        seen_runs: set[str] = set()
        for i in order:
            key = quote_key(units[i].text)
            if repeats(key, seen, seen_runs):
                continue
            seen.append(key)
            seen_runs |= word_runs(key)
            kept.append((units[i], standard[i]))
        return kept

    def rank(self, query: str, sources: Sequence[Source]) -> list[Candidate]:
        """All units, best first, duplicates dropped."""
        return [unit for unit, _ in self.scored(query, sources)]

    def choose(self, scored: Sequence[tuple[Candidate, float]],
               already_quoted: Collection[str] = ()) -> list[Candidate]:
        """What to quote from ``scored``: the best ``sentences`` units not quoted before, down
        to ``margin`` below the first of them (passage order has no scores: no floor)."""
        fresh = [(u, z) for u, z in scored if quote_key(u.text) not in already_quoted]
        if not fresh:
            return []
        floor = (-math.inf if self.margin is None or self.scorer == "order"
                 else fresh[0][1] - self.margin)
        return [u for u, z in fresh[: self.sentences] if z >= floor]

    def answer(self, query: str, sources: Sequence[Source]) -> list[str]:
        """The answer as paragraphs: a section's chosen units, then its file and heading."""
        return self.quote(query, sources)[0]

    def quote(self, query: str, sources: Sequence[Source],
              already_quoted: Collection[str] = ()) -> tuple[list[str], list[str]]:
        """The answer's paragraphs and the keys of the units they quote.

        Units whose key is in ``already_quoted`` (the keys earlier answers of the conversation
        quoted) are left out: a follow-up retrieves with the earlier question in its query,
        so the units that answered it rank high again, and quoting them twice tells the
        reader nothing new.
        """
        scored = self.scored(query, sources)
        chosen = self.choose(scored, already_quoted)
        if not chosen:
            if scored:
                return ["The retrieved passages hold nothing beyond what was quoted above; "
                        "see the sources below."], []
            return ["The retrieved passages hold no sentence to quote; see the sources "
                    "below."], []
        groups: dict[tuple[int, str], list[Candidate]] = {}
        for unit in chosen:  # best first: the first group is the best section
            groups.setdefault((unit.passage, unit.heading), []).append(unit)
        paragraphs = []
        shown: set[str] = set()
        for (_, heading), units in groups.items():
            units.sort(key=lambda u: u.position)
            body = "\n".join(_unshown_lines("\n".join(u.text for u in units), shown))
            where = f"{units[0].source} · {heading}" if heading else units[0].source
            paragraphs.append(f"{body}\n  [{where}]")
        return paragraphs, [quote_key(u.text) for u in chosen]


def _unshown_lines(text: str, shown: set[str], min_chars: int = 12) -> list[str]:
    """The lines of ``text`` not shown already (``shown`` is updated): two quoted units can
    share a line (two signatures ending in the same ``[optional keyword args])``), and an
    answer never shows the same line twice. Short lines (a bracket, a blank) may repeat."""
    kept = []
    for line in text.splitlines():
        key = " ".join(line.split()).casefold()
        if len(key) >= min_chars:
            if key in shown:
                continue
            shown.add(key)
        kept.append(line)
    return kept
