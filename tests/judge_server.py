"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for judge tests, started in a thread."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# A question holding one of these words gets this broken answer.
FAULTS = {
    "GARBAGE": (200, "text/html", "<html>gateway says hi</html>"),
    "BADJSON": (200, "application/json", '{"choices": ['),
    "HTTP500": (500, "application/json", json.dumps({"error": {"message": "overloaded"}})),
    "DENY": (401, "application/json", json.dumps({"error": {"message": "bad key"}})),
}


class LengthJudgeServer:
    """A chat-completions server on 127.0.0.1 that judges by length, and misbehaves on request.

    The answer text steers it: SLOW sleeps past the client's timeout, GARBAGE sends HTML, BADJSON sends broken JSON,
    NOPARSE replies in words without a rating, HTTP500 fails, DENY answers 401.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.auth_headers: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append(body)
                    owner.auth_headers.append(self.headers.get("Authorization", ""))
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    self._answer(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (timeout tests)
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

            def _answer(self, body: dict[str, Any]) -> None:
                if self.path != "/v1/chat/completions":
                    return self._send(404, "application/json", json.dumps({"error": {"message": "no route"}}))
                question = body["messages"][-1]["content"]
                time.sleep(owner.delay)
                if "SLOW" in question:
                    time.sleep(1.5)
                for word, (status, content_type, text) in FAULTS.items():
                    if word in question:
                        return self._send(status, content_type, text)
                reply = "I like it." if "NOPARSE" in question else self._verdict(question)
                completion = {
                    "id": "cmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
                    ],
                }
                self._send(200, "application/json", json.dumps(completion))

            @staticmethod
            def _verdict(question: str) -> str:
                if "[Answer A]" in question:
                    a = re.search(r"\[Answer A\]\n(.*)\n\[End of answer A\]", question, re.S).group(1)
                    b = re.search(r"\[Answer B\]\n(.*)\n\[End of answer B\]", question, re.S).group(1)
                    return "[[A]] longer" if len(a) > len(b) else "[[B]] longer" if len(b) > len(a) else "[[C]]"
                answer = re.search(r"\[Answer\]\n(.*)\n\[End of answer\]", question, re.S).group(1)
                return f"[[{min(10, max(1, len(answer)))}]] by length"

            def _send(self, status: int, content_type: str, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def __enter__(self) -> LengthJudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    """A port nothing listens on (bound, then released): connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
