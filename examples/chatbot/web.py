"""Web chat over your documents, served on 127.0.0.1 only.

    python -m examples.chatbot.web --docs DIR --student DIR [--port 8000]

A Starlette app served by uvicorn: one page, and JSON endpoints. ``POST /api/chat`` answers as
server-sent events (``mode``: who writes the answer, extractive or which LLM; then
``sources``, then ``token`` events as the answer is written, then ``done``, or ``error``);
``POST /api/reset`` forgets a conversation; ``GET /api/info`` describes the index. HTTP framing
(Content-Length, keep-alive, chunked streaming) is uvicorn's; this module adds what a chat
over private documents needs: only loopback Host names (a DNS-rebinding guard), JSON bodies of
at most 64 KiB read within a time limit, else a 4xx JSON error and the connection closed. Each
browser tab is its own conversation (a random id the page sends along). One question is
answered at a time: the models are not made for concurrent use, and on a CPU they would only
slow each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from examples.chatbot.answer import mode_help
from examples.chatbot.cli import add_chatbot_arguments, options_from_args, run_safely
from examples.chatbot.core import Chatbot, ChatbotError, Conversation, Reply, build_chatbot

try:
    import anyio
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - the examples extra is not installed
    raise ImportError(f"the web chat needs {exc.name}: pip install -e '.[examples]' (or "
                      "'.[dev]') from the repository root") from exc

HOST = "127.0.0.1"  # never another interface: the chatbot reads private documents
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
MAX_CONVERSATIONS = 32
MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_S = 30
NO_STORE = {"Cache-Control": "no-store"}

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class ChatService:
    """Conversations by id (least recently used dropped beyond a bound), one answer at a time."""

    def __init__(self, chatbot: Chatbot, max_conversations: int = MAX_CONVERSATIONS):
        self.chatbot = chatbot
        self.max_conversations = max_conversations
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._table_lock = threading.Lock()
        self.answer_lock = asyncio.Lock()

    def conversation(self, conversation_id: str) -> Conversation:
        with self._table_lock:
            if conversation_id in self._conversations:
                self._conversations.move_to_end(conversation_id)
                return self._conversations[conversation_id]
            conversation = self.chatbot.new_conversation()
            self._conversations[conversation_id] = conversation
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
            return conversation

    def reset(self, conversation_id: str) -> None:
        with self._table_lock:
            self._conversations.pop(conversation_id, None)

    def info(self) -> dict[str, Any]:
        documents = self.chatbot.documents
        return {"collection": documents.location.describe(),
                "student": documents.embed.student.name, "chunks": documents.count(),
                "top_k": self.chatbot.similarity_top_k, "top_n": self.chatbot.top_n,
                "mode": self.chatbot.mode_label, "mode_help": mode_help(self.chatbot)}

    async def answer(self, conversation_id: str, message: str) -> AsyncIterator[ServerSentEvent]:
        """The reply as events, one answer at a time. A client that goes away (the stream is
        cancelled) stops its answer: the lock is released only once the models are free."""
        async with self.answer_lock:
            run = AnswerRun(self.conversation(conversation_id), message)
            try:
                async for name, data in run.events():
                    yield _event(name, data)
            finally:
                with anyio.CancelScope(shield=True):  # a cancelled stream still waits here
                    await run.stop()


class AnswerRun:
    """One answer, computed in a worker thread and read as ``(event, data)`` pairs.

    Every call into the reply (asking, reading each token, closing) happens in that one
    thread, so ``stop`` can end it at any point: it interrupts the LLM, the thread closes
    the reply at its next token, and ``stop`` returns once the thread is done.
    """

    _END = ("", None)

    def __init__(self, conversation: Conversation, message: str):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._stopping = threading.Event()
        self._reply: Reply | None = None
        self._done = asyncio.ensure_future(asyncio.to_thread(self._run, conversation, message))

    def _emit(self, name: str, data: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (name, data))

    def _run(self, conversation: Conversation, message: str) -> None:
        try:
            self._reply = reply = conversation.ask(message)
            try:
                if self._stopping.is_set():  # gone while the passages were retrieved
                    return
                self._emit("mode", reply.mode)
                self._emit("sources", [asdict(s) for s in reply.sources])
                for token in reply:
                    if self._stopping.is_set():
                        return
                    self._emit("token", token)
                self._emit("done", {"answer": reply.text})
            finally:
                reply.close()
        except ChatbotError as exc:
            self._emit("error", str(exc))
        except Exception as exc:  # the page shows it; the server stays up
            self._emit("error", f"{type(exc).__name__}: {exc}")
        finally:
            self._emit(*self._END)

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        while (item := await self._queue.get()) != self._END:
            yield item

    async def stop(self) -> None:
        """End the answer where it is and wait for its thread (at once when it is done)."""
        self._stopping.set()
        if self._reply is not None:
            self._reply.interrupt()
        await asyncio.shield(self._done)


def _event(name: str, data: Any) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(data), event=name, sep="\n")


# ---------------------------------------------------------------------------- requests
def refuse(status: int, error: str) -> JSONResponse:
    """A JSON error, then close: an unread body must not be parsed as the next request."""
    return JSONResponse({"error": error}, status, headers={**NO_STORE, "Connection": "close"})


def loopback_only(app: ASGIApp, port: Callable[[], int]) -> ASGIApp:
    """Refuse other Host names (DNS rebinding): only this machine's loopback names."""

    async def guarded(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1").strip().lower()
            allowed = {f"127.0.0.1:{port()}", f"localhost:{port()}", "127.0.0.1", "localhost"}
            if host not in allowed:
                await refuse(403, "unknown host")(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


async def read_json(request: Request) -> dict[str, Any] | JSONResponse:
    """The body as a JSON object, or the 4xx response that says what is wrong with it."""
    if "application/json" not in request.headers.get("content-type", ""):
        return refuse(415, "send the request as application/json")
    if request.headers.get("transfer-encoding"):
        return refuse(411, "send the body with a Content-Length, not chunked")
    # uvicorn has refused a Content-Length that is not a byte count with a 400 already.
    if int(request.headers.get("content-length", "0")) > MAX_BODY_BYTES:
        return refuse(413, f"message too long (at most {MAX_BODY_BYTES} bytes)")
    try:
        body = await asyncio.wait_for(request.body(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        return refuse(408, f"the body did not arrive within {BODY_TIMEOUT_S} s: send as many "
                      "bytes as Content-Length says")
    except ClientDisconnect:
        return refuse(400, "the body is shorter than its Content-Length")
    try:
        data = json.loads(body or b"{}")
    except ValueError:  # not JSON, or not UTF-8
        data = None
    if not isinstance(data, dict):
        return refuse(400, "the body must be a JSON object")
    return data


async def conversation_request(request: Request) -> tuple[str, dict[str, Any]] | JSONResponse:
    data = await read_json(request)
    if isinstance(data, Response):
        return data
    conversation_id = str(data.get("conversation") or "")
    if not conversation_id or len(conversation_id) > 100:
        return refuse(400, "send a conversation id (any short string)")
    return conversation_id, data


# ---------------------------------------------------------------------------- app
def make_app(service: ChatService, port: Callable[[], int]) -> ASGIApp:
    """The chat's ASGI app around ``service``; ``port()`` is the served port (Host check)."""

    async def page(request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html; charset=utf-8", headers=NO_STORE)

    async def info(request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(service.info), headers=NO_STORE)

    async def chat(request: Request) -> Response:
        parsed = await conversation_request(request)
        if isinstance(parsed, Response):
            return parsed
        conversation_id, data = parsed
        return EventSourceResponse(service.answer(conversation_id, str(data.get("message") or "")),
                                   headers=NO_STORE, sep="\n")

    async def reset(request: Request) -> Response:
        parsed = await conversation_request(request)
        if isinstance(parsed, Response):
            return parsed
        service.reset(parsed[0])
        return JSONResponse({"ok": True}, headers=NO_STORE)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": f"no page {request.url.path}"}, exc.status_code)

    app = Starlette(routes=[
        Route("/", page), Route("/index.html", page), Route("/api/info", info),
        Route("/api/chat", chat, methods=["POST"]), Route("/api/reset", reset, methods=["POST"]),
    ], exception_handlers={HTTPException: not_found})
    return loopback_only(app, port)


class ChatServer:
    """uvicorn serving the chat app on 127.0.0.1; ``port=0`` picks a free port (tests)."""

    def __init__(self, chatbot: Chatbot, port: int = 8000):
        import uvicorn

        self.service = ChatService(chatbot)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((HOST, port))
        except OSError as exc:
            self.socket.close()
            raise ChatbotError(f"cannot serve on {HOST}:{port} ({exc.strerror or exc}): pass "
                               "another --port") from None
        # h11 named, so that HTTP parsing does not change with the optional httptools package.
        config = uvicorn.Config(make_app(self.service, lambda: self.port), http="h11",
                                log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.socket.getsockname()[:2]
        return host, int(port)

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.socket])

    def serve_in_thread(self) -> threading.Thread:
        self.server.config.install_signal_handlers = False  # signals belong to the main thread
        self._thread = threading.Thread(target=self.serve_forever, name="chat-http", daemon=True)
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            self._thread.join(0.01)
        return self._thread

    def close(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.socket.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.chatbot.web",
                                     description=__doc__.split("\n\n")[0])
    add_chatbot_arguments(parser)
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        chatbot, report = build_chatbot(options_from_args(args))
        with chatbot:
            print(f"{chatbot.documents.location.describe()}: {report.summary()}")
            for relative, why in report.skipped:
                print(f"  skipped {relative}: {why}")
            server = ChatServer(chatbot, args.port)
            print(f"chat at {server.url}  (Ctrl-C to stop)", flush=True)
            try:
                server.serve_forever()
            finally:
                server.socket.close()
        return 0

    return run_safely(run)


if __name__ == "__main__":
    sys.exit(main())
