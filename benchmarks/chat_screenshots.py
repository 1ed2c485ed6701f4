"""Screenshot the web chat after a question and a follow-up, in headless Chromium.

    python benchmarks/chat_screenshots.py --out benchmarks/results/chat-after.png

Starts ``python -m examples.chatbot web`` from ``--checkout`` (this repository by default;
a ``git worktree`` of an older commit shows the chat as it was), types each ``--ask`` into
the page as a user would, waits for each answer to finish, and writes a full-page PNG and
the answers' text (``.txt`` beside it); it exits with an error when the page shows the name of
a ranking internal (``examples.chatbot.chat.INTERNAL_TERMS``: "first stage", "IEM", ...).
Needs Debian's ``chromium`` and the ``playwright`` package (``pip install playwright``; its
own browser download is not needed); neither is a dependency of the package.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `examples` importable
    sys.path.insert(0, str(REPO))
from examples.chatbot.chat import INTERNAL_TERMS  # noqa: E402

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkout", type=Path, default=REPO)
    parser.add_argument("--docs", type=Path,
                        default=REPO / "examples" / "sample_corpus" / "python_stdlib")
    parser.add_argument("--student", type=Path, default=REPO / "runs" / "quickstart" / "student")
    parser.add_argument("--state-dir", type=Path, default=REPO / "runs" / "quickstart")
    parser.add_argument("--collection", default="quickstart")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--ask", action="append", default=None,
                        help="a question (repeatable; default: the CSV question and follow-up)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("chat_args", nargs="*", help="more options for the chat, after --")
    args = parser.parse_args(argv)
    questions = args.ask or ["How do I parse a CSV file?", "And how do I write one?"]

    from playwright.sync_api import sync_playwright

    command = [sys.executable, "-m", "examples.chatbot", "web", "--docs", str(args.docs),
               "--student", str(args.student), "--state-dir", str(args.state_dir),
               "--collection", args.collection, "--port", str(args.port), *args.chat_args]
    print(f"$ cd {args.checkout} && {' '.join(command)}", flush=True)
    # The checkout's package, not the one installed from this repository, answers.
    env = {**os.environ, "PYTHONPATH": str(args.checkout.resolve())}
    server = subprocess.Popen(command, cwd=args.checkout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    transcript = []
    try:
        for line in server.stdout:
            print("server:", line.rstrip(), flush=True)
            if "chat at" in line:
                break
        else:
            raise SystemExit("the chat stopped before serving its page")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium,
                                                 args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(f"http://127.0.0.1:{args.port}/")
            for i, question in enumerate(questions):
                start = time.perf_counter()
                page.fill("#question", question)
                page.click("#send")
                page.locator(".turn.bot[data-done='1']").nth(i).wait_for(timeout=900_000)
                page.wait_for_timeout(500)
                answer = page.locator(".turn.bot").nth(i).inner_text()
                transcript.append(f"Q: {question}\n({time.perf_counter() - start:.0f} s)\n"
                                  f"{answer}\n")
                print(transcript[-1], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            shown = INTERNAL_TERMS.findall(page.inner_text("body"))
            browser.close()
        args.out.with_suffix(".txt").write_text("\n".join(transcript))
        if shown:
            raise SystemExit(f"the page shows internal score names: {sorted(set(shown))}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
