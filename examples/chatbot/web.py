"""Web chat over your documents, served on 127.0.0.1 only.

    python -m examples.chatbot.web --docs DIR --student DIR [--port 8000]

Standard library only (``http.server``): one page, and two JSON endpoints. ``POST /api/chat``
answers as server-sent events (``mode``: who writes the answer, extractive or which LLM; then
``sources``, then ``token`` events as the answer is written, then ``done``, or ``error``);
``POST /api/reset`` forgets a conversation. A request that is not a JSON object of at most
64 KiB with a valid ``Content-Length`` gets a 4xx JSON error and the connection is closed.
Each browser tab is its own conversation (a random id the page sends along). One question is
answered at a time: the models are not made for concurrent use, and on a CPU they would only
slow each other.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import OrderedDict
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from examples.chatbot.answer import mode_help
from examples.chatbot.cli import add_chatbot_arguments, options_from_args, run_safely
from examples.chatbot.core import Chatbot, ChatbotError, Conversation, build_chatbot

HOST = "127.0.0.1"  # never another interface: the chatbot reads private documents
PAGE = Path(__file__).resolve().parent / "static" / "index.html"
MAX_CONVERSATIONS = 32
MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT_S = 30


class ChatService:
    """Conversations by id (least recently used dropped beyond a bound), one answer at a time."""

    def __init__(self, chatbot: Chatbot, max_conversations: int = MAX_CONVERSATIONS):
        self.chatbot = chatbot
        self.max_conversations = max_conversations
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()
        self._table_lock = threading.Lock()
        self.answer_lock = threading.Lock()

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


def make_handler(service: ChatService, port_holder: dict[str, int]) -> type:
    """A request handler class bound to ``service``."""

    class ChatHandler(BaseHTTPRequestHandler):
        server_version = "D2LLMChat/0.1"
        protocol_version = "HTTP/1.1"
        timeout = BODY_TIMEOUT_S  # a body shorter than its Content-Length must not hang a thread

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass  # quiet: the terminal shows the server's own messages only

        # -------------------------------------------------------------- helpers
        def _host_allowed(self) -> bool:
            """Refuse other Host names (DNS rebinding): only this machine's loopback names."""
            host = (self.headers.get("Host") or "").strip().lower()
            port = port_holder["port"]
            return host in {f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1", "localhost"}

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _refuse(self, status: int, error: str) -> None:
            """A JSON error, then close: an unread body must not be parsed as a request."""
            self.close_connection = True
            self._json(status, {"error": error})

        def _read_json(self) -> dict[str, Any] | None:
            if "application/json" not in (self.headers.get("Content-Type") or ""):
                self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                             "send the request as application/json")
                return None
            if self.headers.get("Transfer-Encoding"):
                self._refuse(HTTPStatus.LENGTH_REQUIRED,
                             "send the body with a Content-Length, not chunked")
                return None
            declared = (self.headers.get("Content-Length") or "0").strip()
            if not (declared.isascii() and declared.isdigit()):  # "abc", "-5", "1e3", "²"
                self._refuse(HTTPStatus.BAD_REQUEST, f"Content-Length {declared[:40]!r} is not "
                             "a byte count: send the length of the body in bytes")
                return None
            length = int(declared)
            if length > MAX_BODY_BYTES:
                self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"message too long (at most {MAX_BODY_BYTES} bytes)")
                return None
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                self._refuse(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within "
                             f"{BODY_TIMEOUT_S} s: send as many bytes as Content-Length says")
                return None
            if len(body) < length:
                self._refuse(HTTPStatus.BAD_REQUEST, "the body is shorter than its "
                             "Content-Length")
                return None
            try:
                data = json.loads(body or b"{}")
            except ValueError:  # not JSON, or not UTF-8
                data = None
            if not isinstance(data, dict):
                self._refuse(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
                return None
            return data

        def _event(self, name: str, data: Any) -> None:
            chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()

        # -------------------------------------------------------------- routes
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if not self._host_allowed():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "unknown host"})
            if self.path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            if self.path == "/api/info":
                return self._json(HTTPStatus.OK, service.info())
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            if not self._host_allowed():
                return self._json(HTTPStatus.FORBIDDEN, {"error": "unknown host"})
            data = self._read_json()
            if data is None:
                return None
            conversation_id = str(data.get("conversation") or "")
            if not conversation_id or len(conversation_id) > 100:
                return self._json(HTTPStatus.BAD_REQUEST,
                                  {"error": "send a conversation id (any short string)"})
            if self.path == "/api/reset":
                service.reset(conversation_id)
                return self._json(HTTPStatus.OK, {"ok": True})
            if self.path == "/api/chat":
                return self._chat(conversation_id, str(data.get("message") or ""))
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})

        def _chat(self, conversation_id: str, message: str) -> None:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                with service.answer_lock:
                    try:
                        reply = service.conversation(conversation_id).ask(message)
                        self._event("mode", reply.mode)
                        self._event("sources", [asdict(s) for s in reply.sources])
                        for token in reply:
                            self._event("token", token)
                        self._event("done", {"answer": reply.text})
                    except ChatbotError as exc:
                        self._event("error", str(exc))
                    except (BrokenPipeError, ConnectionResetError):
                        raise
                    except Exception as exc:  # the page shows it; the server stays up
                        self._event("error", f"{type(exc).__name__}: {exc}")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the tab was closed mid-answer

    return ChatHandler


class ChatServer:
    """The HTTP server around a ``ChatService``; ``port=0`` picks a free port (tests)."""

    def __init__(self, chatbot: Chatbot, port: int = 8000):
        self.service = ChatService(chatbot)
        holder = {"port": port}
        try:
            self.httpd = ThreadingHTTPServer((HOST, port), make_handler(self.service, holder))
        except OSError as exc:
            raise ChatbotError(f"cannot serve on {HOST}:{port} ({exc.strerror or exc}): pass "
                               "another --port") from None
        self.httpd.daemon_threads = True
        holder["port"] = self.port

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.httpd.serve_forever, name="chat-http", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


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
        try:
            print(f"{chatbot.documents.location.describe()}: {report.summary()}")
            for relative, why in report.skipped:
                print(f"  skipped {relative}: {why}")
            server = ChatServer(chatbot, args.port)
            print(f"chat at {server.url}  (Ctrl-C to stop)", flush=True)
            try:
                server.httpd.serve_forever()
            finally:
                server.httpd.server_close()
        finally:
            chatbot.documents.client.close()
        return 0

    return run_safely(run)


if __name__ == "__main__":
    sys.exit(main())
