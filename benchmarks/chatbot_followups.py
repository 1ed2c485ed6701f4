"""Follow-up retrieval and extractive answers of the chatbot, on the sample corpus.

Run after ``python examples/quickstart.py`` (its student, and its Qdrant index, reused):

    python benchmarks/chatbot_followups.py --output benchmarks/results/chatbot-followups.json

The conversations are in ``chatbot_followups.jsonl``: 20 question / follow-up pairs ("How do
I parse a CSV file?" / "And how do I write one?"), 4 three-turn chains and 3 topic switches
(the second question stands alone, on another module), each turn with the file that answers
it and strings that mark the sections answering it. Two measurements:

1. **Retrieval of the last turn** (the follow-up): how often the file that answers it is in
   the chatbot's top 3 (and top 1) sources, for each way of turning the follow-up into a
   query: ``alone`` (the follow-up as typed), ``history-N`` (the last N user turns joined
   with it, ``condense.condense_with_history``), and ``llm``: as the chatbot did before
   (LlamaIndex's ``CondensePlusContextChatEngine``: the offline base model answers each
   earlier turn, with the generation settings of that time, then rewrites the follow-up).
2. **Extractive answers** (``--extractive``): for every turn, over the passages the chatbot
   retrieves for it, whether the best quoted unit (and the best 3) comes from a section that
   answers it, for each scorer of ``answer.ExtractiveAnswerer`` (cosine + BM25 fusion, at
   its default BM25 weight and at 0.25, 0.5 and 2; IEM; cosine; BM25; passage order), with
   the section heading in the embedded text (and without, ``--ablate-heading``), and for
   follow-ups ranked against the condensed query or the follow-up alone. As in the chat, a
   follow-up's ranking leaves out the units each scorer quoted for the earlier turns. Then
   the quoting floor (``fusion-margin-M``: a unit is quoted only within M standard deviations
   of the best): how many of the quoted units answer (precision) and how many are quoted.

The ``llm`` condition generates with the 270M model on the CPU: about a minute a
conversation on 2 cores. ``--conditions`` chooses.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `examples` importable
    sys.path.insert(0, str(REPO))

from examples.chatbot.answer import ExtractiveAnswerer  # noqa: E402
from examples.chatbot.condense import condense_with_history  # noqa: E402
from examples.chatbot.core import Chatbot, ChatbotOptions, open_index  # noqa: E402
from examples.chatbot.extract import SCORERS  # noqa: E402

HERE = Path(__file__).resolve().parent
CONVERSATIONS = HERE / "chatbot_followups.jsonl"
SAMPLE = REPO / "examples" / "sample_corpus" / "python_stdlib"
CONDITIONS = ("alone", "history-1", "history-2", "llm")
FUSION_WEIGHTS = (0.25, 0.5, 2.0)
#: The fusion scorer's quoting floor (``ExtractiveAnswerer(margin=)``); "fusion" has none.
MARGINS = (0.5, 1.0, 1.25, 1.5, 2.0, 3.0)


def load_conversations(path: Path = CONVERSATIONS) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        assert len(row["turns"]) == len(row["files"]) == len(row["answers"]) >= 2, row["id"]
    return rows


def user_history(turns: list[str]) -> list[Any]:
    from llama_index.core.base.llms.types import ChatMessage

    return [ChatMessage(role="user", content=t) for t in turns]


_HISTORIES: dict[tuple[str, ...], list[Any]] = {}  # conversations that start alike


def llm_condensed(chatbot: Chatbot, llm: Any, turns: list[str]) -> str:
    """The last turn's query as the chatbot built it before: base model answers, then rewrites."""
    from llama_index.core.chat_engine import CondensePlusContextChatEngine
    from llama_index.core.memory import ChatMemoryBuffer

    memory = ChatMemoryBuffer.from_defaults(token_limit=max(256, llm.metadata.context_window // 2))
    engine = CondensePlusContextChatEngine.from_defaults(
        retriever=chatbot.retriever(), llm=llm, memory=memory,
        context_prompt=chatbot.context_prompt)
    for i, turn in enumerate(turns[:-1]):  # streamed as the chat did: its max_new_tokens
        known = _HISTORIES.get(tuple(turns[:i + 1]))
        if known is not None:
            memory.set(list(known))
            continue
        response = engine.stream_chat(turn)
        for _ in response.response_gen:
            pass
        # the answer is in the memory once the writer thread (older llama-index) has finished
        writer = getattr(response, "write_response_to_history_thread", None)
        if writer is not None:
            writer.join()
        _HISTORIES[tuple(turns[:i + 1])] = memory.get_all()
    return engine._condense_question(memory.get(input=turns[-1]), turns[-1])


def retrieval(chatbot: Chatbot, rows: list[dict[str, Any]], conditions: list[str],
              llm: Any, top: int) -> dict[str, Any]:
    results: dict[str, Any] = {"per_conversation": [], "summary": {}}
    for row in rows:
        turns, target = row["turns"], row["files"][-1]
        entry = {"id": row["id"], "kind": row["kind"], "file": target, "conditions": {}}
        for condition in conditions:
            start = time.perf_counter()
            if condition == "alone":
                query = turns[-1]
            elif condition.startswith("history-"):
                query = condense_with_history(user_history(turns[:-1]), turns[-1],
                                              int(condition.split("-")[1]))
            else:
                query = llm_condensed(chatbot, llm, turns)
            files = [s.source for s in chatbot.search(query)][:top]
            entry["conditions"][condition] = {
                "query": query, "sources": files, "hit@1": files[:1] == [target],
                f"hit@{top}": target in files, "seconds": round(time.perf_counter() - start, 1)}
            print(f"  {row['id']:<18} {condition:<10} {'ok ' if target in files else 'MISS'} "
                  f"{files}  <- {query[:90]!r}", flush=True)
        results["per_conversation"].append(entry)
    for condition in conditions:
        for kind in ("all", "follow-up", "chain", "switch"):
            chosen = [e["conditions"][condition] for e in results["per_conversation"]
                      if kind == "all" or e["kind"] == kind]
            if chosen:
                results["summary"].setdefault(condition, {})[kind] = {
                    "n": len(chosen),
                    f"hit@{top}": sum(c[f"hit@{top}"] for c in chosen) / len(chosen),
                    "hit@1": sum(c["hit@1"] for c in chosen) / len(chosen)}
    return results


def answers_question(unit: Any, markers: list[str]) -> bool:
    text = f"{unit.heading}: {unit.text}"
    return any(marker in text for marker in markers)


def _memoise_encode(student: Any) -> None:
    encode, cache = student.encode, {}

    def memoised(texts: Any, kind: str = "passage", **kwargs: Any) -> Any:
        key = (tuple(texts), kind)
        if key not in cache:
            cache[key] = encode(texts, kind, **kwargs)
        return cache[key]

    student.encode = memoised


def extractive(chatbot: Chatbot, rows: list[dict[str, Any]], turns_back: int,
               ablate_heading: bool = False) -> dict[str, Any]:
    """Per scorer: hit@1 / hit@3 of answering units among the units it quotes (up to 3), the
    share of its quoted units that answer (precision), and how many it quotes."""
    embed = chatbot.documents.embed
    _memoise_encode(embed.student)  # the variants embed the same units: once is enough
    # The scorers compared by their ranking: each quotes its best 3, without a floor.
    variants = {f"{scorer}{'' if heading else '-no-heading'}":
                ExtractiveAnswerer(embed, scorer=scorer, with_heading=heading, margin=None)
                for scorer in SCORERS for heading in (True, False)
                if heading or (ablate_heading and scorer != "order")}
    for weight in FUSION_WEIGHTS:  # the fusion's BM25 weight, around the default
        variants[f"fusion-{weight:g}"] = ExtractiveAnswerer(embed, scorer="fusion",
                                                           lexical_weight=weight, margin=None)
    for margin in MARGINS:  # the floor: how far below the best unit a unit is still quoted
        variants[f"fusion-margin-{margin:g}"] = ExtractiveAnswerer(embed, scorer="fusion",
                                                                 margin=margin)
    cases, seen = [], set()
    for row in rows:
        for i, turn in enumerate(row["turns"]):
            condensed = condense_with_history(user_history(row["turns"][:i]), turn, turns_back)
            if condensed in seen:
                continue
            seen.add(condensed)
            cases.append({"query": condensed, "turn": turn, "follow_up": i > 0,
                          "markers": row["answers"][i], "id": f"{row['id']}#{i}",
                          "earlier": [condense_with_history(user_history(row["turns"][:j]),
                                                            row["turns"][j], turns_back)
                                      for j in range(i)]})
    quoted_cache: dict[tuple[str, str], list[str]] = {}
    searched: dict[str, Any] = {}

    def search(query: str) -> Any:
        """The chatbot's sources for a query, retrieved once (every scorer ranks the same)."""
        if query not in searched:
            searched[query] = chatbot.search(query)
        return searched[query]

    def quoted_before(name: str, answerer: ExtractiveAnswerer, earlier: list[str]) -> set[str]:
        """What the chat quoted for the earlier turns: a follow-up does not quote it again."""
        keys: set[str] = set()
        for query in earlier:
            if (name, query) not in quoted_cache:
                quoted_cache[name, query] = answerer.quote(query, search(query),
                                                           keys)[1]
            keys.update(quoted_cache[name, query])
        return keys

    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    detail = []
    for case in cases:
        sources = search(case["query"])
        units = variants["order"].candidates(sources)
        if not any(answers_question(u, case["markers"]) for u in units):
            counts["_"]["no answering unit in the sources"] += 1
            continue
        queries = {"": case["query"]}
        if case["follow_up"]:
            queries["|follow-up alone"] = case["turn"]
        best, marks = {}, []
        for name, answerer in variants.items():
            for suffix, query in queries.items():
                if name == "order" and suffix:
                    continue  # passage order does not read the query
                quoted = quoted_before(name, answerer, case["earlier"])
                chosen = answerer.choose(answerer.scored(query, sources), quoted)
                hits = [answers_question(u, case["markers"]) for u in chosen] or [False]
                marks.append(f"{name}{suffix.replace('|follow-up alone', '/alone')} "
                             f"{int(hits[0])}{int(any(hits))}")
                for group in ("all", "follow-ups" if case["follow_up"] else "first turns"):
                    key = f"{name}{suffix}|{group}"
                    counts[key]["n"] += 1
                    counts[key]["hit@1"] += hits[0]
                    counts[key]["hit@3"] += any(hits)
                    counts[key]["precision"] += sum(hits) / len(chosen) if chosen else 0.0
                    counts[key]["quoted"] += len(chosen)
                best[name + suffix] = chosen[0].text[:100] if chosen else ""
        detail.append({"id": case["id"], "query": case["query"], "top_unit": best})
        print(f"  {case['id']:<20} hit@1,hit@3: {'  '.join(marks)}  iem's best: "
              f"{best['iem'][:60]!r}", flush=True)
    summary = {key: {"n": c["n"], "hit@1": c["hit@1"] / c["n"], "hit@3": c["hit@3"] / c["n"],
                     "precision": c["precision"] / c["n"], "quoted": c["quoted"] / c["n"]}
               for key, c in counts.items() if key != "_"}
    return {"cases": len(cases), "skipped": dict(counts["_"]), "summary": summary,
            "per_case": detail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, default=REPO / "runs/quickstart/student")
    parser.add_argument("--corpus", type=Path, default=SAMPLE)
    parser.add_argument("--state-dir", type=Path, default=REPO / "runs/quickstart",
                        help="reuse the quickstart's embedded Qdrant (not while it runs)")
    parser.add_argument("--collection", default="quickstart")
    parser.add_argument("--conditions", default=",".join(CONDITIONS),
                        help=f"comma-separated, of {', '.join(CONDITIONS)}")
    parser.add_argument("--top", type=int, default=3, help="sources that count as retrieved")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="answer length of the llm condition (the chat's default)")
    parser.add_argument("--extractive", action="store_true",
                        help="also measure the extractive answer's sentence ranking")
    parser.add_argument("--ablate-heading", action="store_true",
                        help="with --extractive: also rank sentences embedded without their "
                        "section heading (twice the encoding time)")
    parser.add_argument("--only", default="", help="comma-separated conversation ids")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    conditions = [c for c in args.conditions.split(",") if c]
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        parser.error(f"unknown --conditions {sorted(unknown)}: use {', '.join(CONDITIONS)}")
    rows = load_conversations()
    if args.only:
        rows = [r for r in rows if r["id"] in args.only.split(",")]
    options = ChatbotOptions(docs=args.corpus, student=args.student, state_dir=args.state_dir,
                             collection=args.collection, similarity_top_k=args.top_k,
                             top_n=max(args.top, 4), show_progress=False)
    index, report = open_index(options)
    try:
        print(f"{index.location.describe()}: {report.summary()}", flush=True)
        llm = None
        if "llm" in conditions:
            from examples.chatbot.llm import TransformersLLM

            # As the chat generated before issue 13: no repetition guard, no n-gram ban.
            llm = TransformersLLM(None, max_new_tokens=args.max_new_tokens,
                                  repetition_guard=False, no_repeat_ngram_size=0)
        chatbot = Chatbot(index, llm, similarity_top_k=args.top_k, top_n=max(args.top, 4),
                          answer="extractive", condense="history")
        start = time.perf_counter()
        results = {"conversations": len(rows), "student": str(args.student), "top": args.top,
                   "top_k": args.top_k, "max_new_tokens": args.max_new_tokens,
                   "machine": platform.platform(),
                   "retrieval": retrieval(chatbot, rows, conditions, llm, args.top)}
        print(json.dumps(results["retrieval"]["summary"], indent=1), flush=True)
        save(results, args.output)  # the retrieval figures now, the longer part after
        if args.extractive:
            results["extractive"] = extractive(chatbot, rows, 1, args.ablate_heading)
            print(json.dumps(results["extractive"]["summary"], indent=1))
        results["seconds"] = round(time.perf_counter() - start, 1)
        save(results, args.output)
    finally:
        index.client.close()
    return 0


def save(results: dict[str, Any], output: Path | None) -> None:
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
