"""The web chat: its HTTP API, and the page in a real headless Chromium (Playwright).

The browser test drives Debian's /usr/bin/chromium (never a downloaded browser). It is skipped
only where Chromium is absent and ``CI`` is unset: CI installs Chromium, so there a missing
browser fails loudly.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from examples.chatbot.core import ChatbotOptions, build_chatbot
from examples.chatbot.web import HOST, ChatServer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample_corpus" / "python_stdlib"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _serve(tmp_path: Path, student: str, llm, answer: str = "auto") -> ChatServer:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("csv.md", "re.md"):
        shutil.copy(SAMPLE / name, docs / name)
    options = ChatbotOptions(docs=docs, student=Path(student), state_dir=tmp_path / "state",
                             similarity_top_k=10, top_n=3, show_progress=False, answer=answer)
    chatbot, _ = build_chatbot(options, llm=llm)
    server = ChatServer(chatbot, port=0)
    server.serve_in_thread()
    return server


@pytest.fixture()
def tiny_server(tmp_path, tiny_student_dir, tiny_backbone):
    from examples.chatbot.llm import TransformersLLM

    server = _serve(tmp_path, tiny_student_dir, TransformersLLM(tiny_backbone, max_new_tokens=5))
    yield server
    server.close()
    server.service.chatbot.documents.client.close()


def _request(server: ChatServer, method: str, path: str, body=None, headers=None):
    connection = http.client.HTTPConnection(HOST, server.port, timeout=60)
    data = None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if body is not None else {}
    sent.update(headers or {})
    connection.request(method, path, body=data, headers=sent)
    response = connection.getresponse()
    payload = response.read().decode()
    connection.close()
    return response, payload


def _events(stream: str) -> list[tuple[str, object]]:
    events = []
    for block in stream.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_chat_api_streams_sources_tokens_and_keeps_the_conversation(tiny_server):
    assert tiny_server.address[0] == "127.0.0.1"
    response, page = _request(tiny_server, "GET", "/")
    assert response.status == 200 and 'id="question"' in page

    response, stream = _request(tiny_server, "POST", "/api/chat",
                                {"conversation": "tab-1", "message": "How do I parse a CSV?"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = _events(stream)
    # The tiny LLM is a base model (no chat template): the answer is quoted, and says so.
    assert events[0] == ("mode", "Quoted from your documents (offline model)")
    assert events[1][0] == "sources" and len(events[1][1]) == 3
    assert {"rank", "source", "score", "retrieval_score", "text"} <= set(events[1][1][0])
    assert events[-1][0] == "done"
    tokens = "".join(data for name, data in events if name == "token")
    assert events[-1][1]["answer"] == tokens

    _request(tiny_server, "POST", "/api/chat", {"conversation": "tab-1", "message": "more?"})
    conversation = tiny_server.service.conversation("tab-1")
    assert [m.content for m in conversation.history][::2] == ["How do I parse a CSV?", "more?"]

    response, _ = _request(tiny_server, "POST", "/api/reset", {"conversation": "tab-1"})
    assert response.status == 200
    assert tiny_server.service.conversation("tab-1").history == []

    _, stream = _request(tiny_server, "POST", "/api/chat", {"conversation": "t", "message": " "})
    assert _events(stream) == [("error", "the question is empty: type a question")]
    response, info = _request(tiny_server, "GET", "/api/info")
    assert json.loads(info)["chunks"] > 0 and json.loads(info)["top_n"] == 3
    assert json.loads(info)["mode"] == "Quoted from your documents (offline model)"


def test_chat_api_refuses_foreign_hosts_and_non_json(tiny_server):
    response, _ = _request(tiny_server, "GET", "/", headers={"Host": "attacker.example:80"})
    assert response.status == 403  # DNS rebinding: only loopback names are served
    connection = http.client.HTTPConnection(HOST, tiny_server.port, timeout=30)
    connection.request("POST", "/api/chat", body="message=hi",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert connection.getresponse().status == 415  # no cross-site form posts
    connection.close()
    response, _ = _request(tiny_server, "POST", "/api/chat", {"message": "no conversation id"})
    assert response.status == 400


def _raw(server: ChatServer, head: str, body: bytes = b"", half_close: bool = False
         ) -> tuple[int, dict, bytes]:
    """Send bytes as they are; the status, the JSON body (None when not JSON), and what
    followed it. Status 0: the server closed the connection without answering."""
    import socket

    with socket.create_connection((HOST, server.port), timeout=60) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):  # the server closes the connection after an error
            received += chunk
    if not received:
        return 0, None, b""
    status_line, _, rest = received.partition(b"\r\n")
    headers, _, payload = rest.partition(b"\r\n\r\n")
    declared = re.search(rb"Content-Length: (\d+)", headers, re.IGNORECASE)
    length = int(declared.group(1)) if declared else len(payload)  # else: until the close
    content_type = re.search(rb"Content-Type: ([^\r]+)", headers, re.IGNORECASE).group(1)
    data = json.loads(payload[:length]) if b"json" in content_type else None
    return int(status_line.split()[1]), data, payload[length:]


POST = "POST /api/chat HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"


# says None: uvicorn's HTTP parser refuses the framing itself (a plain-text 400).
@pytest.mark.parametrize(("head", "body", "status", "says"), [
    (POST + "Content-Length: abc\n", b'{"conversation": "t"}', 400, None),
    (POST + "Content-Length: -5\n", b'{"conversation": "t"}', 400, None),
    (POST + "Content-Length: 1e3\n", b'{"conversation": "t"}', 400, None),
    (POST + "Transfer-Encoding: chunked\n", b"2\r\n{}\r\n0\r\n\r\n", 411, "Content-Length"),
    (POST + "Content-Length: 70000\n", b"{}", 413, "too long"),
    (POST + "Content-Length: 2\n", b"\xff\xfe", 400, "JSON object"),
    (POST + "Content-Length: 5\n", b"[1,2]", 400, "JSON object"),
    (POST + "Content-Length: 2\n", b"{}", 400, "conversation id"),
])
def test_malformed_requests_get_a_json_4xx(tiny_server, head, body, status, says):
    """Issue 10: `Content-Length: abc` printed a traceback and dropped the connection."""
    got, data, after = _raw(tiny_server, head, body)
    assert got == status and (data is None if says is None else says in data["error"])
    assert after == b""  # closed: an unread body is never parsed as the next request
    response, _ = _request(tiny_server, "GET", "/api/info")
    assert response.status == 200  # the server is still up


def test_a_body_shorter_than_its_length_is_refused(tiny_server):
    """The client gave up mid-body: nothing is answered or parsed, and the server stays up."""
    head = POST + "Content-Length: 100\n"
    got, _, _ = _raw(tiny_server, head, b'{"conversation":', half_close=True)
    assert got in (0, 400)  # closed unanswered (uvicorn), or refused
    response, _ = _request(tiny_server, "GET", "/api/info")
    assert response.status == 200


def _leave_after_tokens(server: ChatServer, count: int, conversation: str) -> int:
    """Ask, read ``count`` token events, then close the connection as a closed tab does."""
    import socket

    connection = http.client.HTTPConnection(HOST, server.port, timeout=60)
    body = json.dumps({"conversation": conversation, "message": "How do I parse a CSV?"})
    connection.request("POST", "/api/chat", body=body.encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    tokens = 0
    while tokens < count and (line := response.fp.readline()):
        tokens += line.strip() == b"event: token"
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    return tokens


#: Twelve words and no sentence end, over and over: no repetition guard cuts it.
ENDLESS_LINE = " cat sat on mat dog runs in park water energy climate city"


def test_a_client_that_leaves_mid_answer_stops_its_generation(tmp_path, tiny_student_dir):
    """Issue 22.1: a tab closed mid-answer left LlamaIndex's writer thread generating for
    nobody (here up to 100,000 tokens) while it held the LLM, and later questions got
    sources but never a token. Now the generation stops and the next question is answered."""
    import threading

    from examples.chatbot.llm import TransformersLLM
    from tests.tiny_models import build_looping_lm

    endless = build_looping_lm(tmp_path / "endless-lm", ENDLESS_LINE)

    def generating() -> bool:
        return any(thread.name == "llm-generate" for thread in threading.enumerate())

    llm = TransformersLLM(endless, max_new_tokens=100_000, context_window=200_000,
                          repetition_penalty=1.0, repetition_guard=False)
    server = _serve(tmp_path, tiny_student_dir, llm, answer="generate")
    try:
        assert _leave_after_tokens(server, 3, "tab-1") == 3
        deadline = time.monotonic() + 20
        while generating() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not generating(), "the abandoned generation is still running"
        llm.max_new_tokens = 12
        response, stream = _request(server, "POST", "/api/chat",
                                    {"conversation": "tab-2", "message": "And a regex?"})
        events = _events(stream)
        assert events[0] == ("mode", "Written by endless-lm from your documents")
        assert events[-1][0] == "done"
        words = events[-1][1]["answer"].split()
        assert len(words) >= 10 and set(words) <= set(ENDLESS_LINE.split())
        assert [m.role.value for m in server.service.conversation("tab-1").history] == [
            "user", "assistant"]  # what the first tab was shown is remembered

        # Stopping the server (Ctrl-C) mid-answer ends the answer with it, at once.
        llm.max_new_tokens = 100_000
        reader = threading.Thread(target=_request, daemon=True, args=(
            server, "POST", "/api/chat", {"conversation": "tab-3", "message": "More?"}))
        reader.start()
        while not generating() and reader.is_alive():
            time.sleep(0.05)
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 8 and not server._thread.is_alive()
        reader.join(10)
        assert not reader.is_alive() and not generating()
    finally:
        server.close()
        server.service.chatbot.documents.client.close()


def _sync_playwright():
    """Playwright's entry point, or a skip off CI when the browser or package is missing."""
    in_ci = bool(os.environ.get("CI"))
    if not CHROMIUM.exists() and not in_ci:
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: .ci/run installs it (apt chromium)"
    if not in_ci:
        pytest.importorskip("playwright", reason="pip install playwright (the dev extra)")
    from playwright.sync_api import sync_playwright

    return sync_playwright


def test_page_in_headless_chromium(tmp_path, tiny_student_dir):
    """Type a question, see the streamed answer and its sources; follow up; reset."""
    from llama_index.core.llms import MockLLM

    sync_playwright = _sync_playwright()
    server = _serve(tmp_path, tiny_student_dir, MockLLM(max_tokens=6))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM),
                                                 args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(server.url)
                page.fill("#question", "How do I parse a CSV file?")
                page.click("#send")
                answer = page.locator(".turn.bot[data-done='1']").first
                answer.wait_for(timeout=30_000)
                assert answer.locator(".answer").inner_text().strip() == " ".join(["text"] * 6)
                assert (answer.locator(".mode").inner_text()
                        == "Written by MockLLM from your documents")
                # filled from /api/info, which may answer after a fast reply on a busy CPU
                page.wait_for_function("document.getElementById('mode').textContent !== ''",
                                       timeout=30_000)
                assert page.inner_text("#mode") == "answers: Written by MockLLM from your documents"
                page.locator(".turn.bot .source").first.wait_for(timeout=10_000)
                sources = answer.locator(".source")
                assert sources.count() == 3
                first = sources.first.inner_text()
                assert first.split()[0] in ("csv.md", "re.md")
                # the details behind the bar are in its tooltip, in words
                tooltip = sources.first.locator(".bar").get_attribute("title")
                assert tooltip.startswith("Ranked 1 of 3 by this package (match score ")
                assert "Plain vector search alone would have ranked it #" in tooltip
                assert page.locator(".turn.user").inner_text() == "How do I parse a CSV file?"

                page.fill("#question", "And how do I write one?")
                page.press("#question", "Enter")
                page.locator(".turn.bot[data-done='1']").nth(1).wait_for(timeout=30_000)
                assert page.locator(".turn.user").count() == 2
                assert "passages" in page.inner_text("#info")
                # what chat_screenshots.py shows: no internal score names on the page
                from examples.chatbot.chat import INTERNAL_TERMS

                assert not INTERNAL_TERMS.search(page.inner_text("body"))

                page.click("#reset")
                page.wait_for_function("document.querySelectorAll('.turn').length === 1")
                assert page.inner_text("#log").strip() == "New conversation."
            finally:
                browser.close()
    finally:
        server.close()
        server.service.chatbot.documents.client.close()
