"""A real HTTP server between the S3 client and moto that fails chosen requests on purpose.

Nothing of boto is mocked: the client talks HTTP to this proxy, which either forwards a request
to moto's server and relays the answer, or fails it the way a network or S3 does:

- ``"503"`` / ``"500"``: an S3 error response (``ServiceUnavailable`` / ``InternalError``);
- ``"drop"``: the connection closes without any response;
- ``"cut"``: the real response starts, and the connection closes halfway through its body.

``proxy.fail(rule, times, action)`` arms a failure for requests matching ``rule(request)``;
``proxy.seen`` lists every request received, so tests count exactly how often a request was
tried.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_ERRORS = {"500": "InternalError", "503": "ServiceUnavailable"}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "expect"}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str  # without the query
    query: dict[str, list[str]]
    headers: dict[str, str]

    def key(self, bucket: str) -> str:
        return self.path.removeprefix(f"/{bucket}/")


@dataclass
class _Failure:
    rule: Callable[[Seen], bool]
    times: int
    action: str


@dataclass
class FailingS3Proxy:
    upstream: str  # moto's endpoint, http://127.0.0.1:PORT
    seen: list[Seen] = field(default_factory=list)
    _failures: list[_Failure] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, rule: Callable[[Seen], bool], times: int, action: str = "503") -> None:
        with self._lock:
            self._failures.append(_Failure(rule, times, action))

    def count(self, rule: Callable[[Seen], bool]) -> int:
        with self._lock:
            return sum(1 for s in self.seen if rule(s))

    def reset(self) -> None:
        with self._lock:
            self.seen.clear()
            self._failures.clear()

    def _action_for(self, request: Seen) -> str | None:
        with self._lock:
            self.seen.append(request)
            for failure in self._failures:
                if failure.times > 0 and failure.rule(request):
                    failure.times -= 1
                    return failure.action
        return None

    def start(self) -> FailingS3Proxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def _handle(self) -> None:
                body = self._read_body()
                parts = urlsplit(self.path)
                request = Seen(
                    self.command,
                    parts.path,
                    parse_qs(parts.query, keep_blank_values=True),
                    {k.lower(): v for k, v in self.headers.items()},
                )
                action = proxy._action_for(request)
                if action == "drop":
                    self.close_connection = True
                    return
                if action in _ERRORS:
                    self._send_error(int(action), _ERRORS[action])
                    return
                self._forward(body, cut=action == "cut")

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return data
                        data += chunk
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send_error(self, status: int, code: str) -> None:
                payload = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>injected by the test proxy</Message></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes, *, cut: bool) -> None:
                target = urlsplit(proxy.upstream)
                connection = http.client.HTTPConnection(target.netloc, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    self.send_response(response.status)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_BY_HOP:
                            self.send_header(name, value)
                    if self.command == "HEAD":
                        length = response.getheader("Content-Length")
                        self.send_header("Content-Length", length or "0")
                        self.end_headers()
                        return
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if cut:
                        self.wfile.write(payload[: len(payload) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(payload)
                finally:
                    connection.close()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
