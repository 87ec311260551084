"""A fault-injecting HTTP proxy for S3 tests: a real server on 127.0.0.1 in front of the moto server.

Clients point `endpoint_url` at the proxy. Each request is forwarded to moto, counted, and — at a set rate, from a
seeded random stream — answered with a fault instead:

  slowdown     503 SlowDown (S3's throttling answer), nothing forwarded
  unavailable  503 ServiceUnavailable, nothing forwarded
  internal     500 InternalError, nothing forwarded
  denied       403 AccessDenied, nothing forwarded (a permanent error: only by rule, never drawn at random)
  reset        the connection is reset (TCP RST) before anything is forwarded
  lost         the request is forwarded (moto applies it), then the connection is reset: the answer is lost
  truncate     the answer's headers and half its body are sent, then the connection is reset (bodies only)

Rules target one kind of request (method + path regex): a fault, or a hook called with the request before or
after it is forwarded (the kill tests stop a process at an exact point of its storage traffic this way).
"""

from __future__ import annotations

import http.client
import io
import random
import re
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "unavailable", "internal", "reset", "lost", "truncate")
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "unavailable": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}


@dataclass(frozen=True)
class Request:
    """One request as the proxy saw it: method, path (with query string), and body size."""

    method: str
    path: str
    size: int


@dataclass
class Rule:
    """Act on requests whose method is `method` ("*": any) and whose path matches `pattern`, at most `times` times.

    action: a fault name (FAULTS or "denied"), or "hook": call `hook(request)` before forwarding ("before") or after the
    upstream answered but before the client gets it ("after"); the request then goes on normally, unless the
    hook returns a fault name (e.g. "reset" after killing the client)."""

    method: str
    pattern: str
    action: str
    times: int = 1
    hook: Callable[[Request], str | None] | None = None
    when: str = "before"
    hits: int = 0


@dataclass
class _State:
    rate: float = 0.0
    kinds: tuple[str, ...] = FAULTS
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    rules: list[Rule] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    injected: Counter = field(default_factory=Counter)
    strip_conditions: bool = False  # drop If-Match / If-None-Match: a store that ignores conditional writes
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultProxy:
    """The proxy; `url` is its endpoint. Thread-safe; `close()` stops it."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state, "upstream": (parts.hostname, parts.port)})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.thread.start()

    def faults(self, rate: float, seed: int = 0, kinds: tuple[str, ...] = FAULTS) -> None:
        """Inject a fault into a fraction `rate` of requests, drawn from `kinds` with a stream seeded by `seed`."""
        unknown = set(kinds) - set(FAULTS)
        if unknown or not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1) and kinds in {FAULTS}; got {rate}, {sorted(unknown)}")
        with self.state.lock:
            self.state.rate, self.state.kinds, self.state.rng = rate, tuple(kinds), random.Random(seed)

    def rule(self, method: str, pattern: str, action: str, times: int = 1,
             hook: Callable[[Request], str | None] | None = None, when: str = "before") -> Rule:
        """Add a targeted rule (see Rule); returns it, so a test can read `hits`."""
        rule = Rule(method, pattern, action, times, hook, when)
        with self.state.lock:
            self.state.rules.append(rule)
        return rule

    def ignore_conditions(self, on: bool = True) -> None:
        """Forward conditional PUTs without their If-Match / If-None-Match headers, as an S3-compatible store
        that does not implement conditional writes does (it applies them as plain PUTs)."""
        with self.state.lock:
            self.state.strip_conditions = on

    def reset(self) -> None:
        """No faults, no rules, counters at zero, conditions forwarded."""
        with self.state.lock:
            self.state.rate, self.state.rules, self.state.strip_conditions = 0.0, [], False
            self.state.requests.clear()
            self.state.injected.clear()

    @property
    def requests(self) -> list[Request]:
        """Every request received (faulted ones included), in arrival order."""
        with self.state.lock:
            return list(self.state.requests)

    @property
    def injected(self) -> Counter:
        """Faults injected so far, by kind."""
        with self.state.lock:
            return Counter(self.state.injected)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use it
    state: _State
    upstream: tuple[str, int]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass

    def _handle(self) -> None:
        body = self._read_body()
        request = Request(self.command, self.path, len(body))
        rule, fault = self._decide(request)
        if fault in _ERRORS:
            return self._error(*_ERRORS[fault])
        if fault == "reset":
            return self._reset()
        if rule is not None and rule.action == "hook" and rule.when == "before":
            after = rule.hook(request)
            if after:
                return self._reset() if after in ("reset", "lost") else self._error(*_ERRORS[after])
        status, reason, headers, answer = self._forward(body)
        if rule is not None and rule.action == "hook" and rule.when == "after":
            fault = rule.hook(request) or None
        if fault in ("lost", "reset"):
            return self._reset()
        if fault == "truncate" and len(answer) > 1:
            return self._send(status, reason, headers, answer, truncate=True)
        self._send(status, reason, headers, answer)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _decide(self, request: Request) -> tuple[Rule | None, str | None]:
        """(the matching rule, the fault to inject now or None)."""
        state = self.state
        with state.lock:
            state.requests.append(request)
            for rule in state.rules:
                if (rule.hits < rule.times and rule.method in ("*", request.method)
                        and re.search(rule.pattern, request.path)):
                    rule.hits += 1
                    fault = None if rule.action == "hook" else rule.action
                    if fault:
                        state.injected[fault] += 1
                    return rule, fault
            if state.rate and state.rng.random() < state.rate:
                fault = state.rng.choice(state.kinds)
                if fault == "truncate" and request.method != "GET":
                    fault = "lost"  # only an answer with a body can be cut short
                state.injected[fault] += 1
                return None, fault
        return None, None

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request to moto (one connection per request: moto's server is cheap to reach)."""
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            dropped = _HOP_BY_HOP | ({"if-match", "if-none-match"} if self.state.strip_conditions else set())
            headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                         headers=headers)
            response = conn.getresponse()
            answer = response.read()
            return response.status, response.reason, response.getheaders(), answer
        finally:
            conn.close()

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes,
              truncate: bool = False) -> None:
        self.send_response(status, reason)
        for key, value in headers:
            if key.lower() not in _HOP_BY_HOP and not (key.lower() == "content-length" and self.command != "HEAD"):
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body[:len(body) // 2] if truncate else body)
        self.wfile.flush()
        if truncate:
            self._reset()

    def _error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{self.path}</Resource><RequestId>fault-proxy</RequestId></Error>").encode()
        self._send(status, code, [("Content-Type", "application/xml")], body)

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (linger 0), as a dropped connection or a dead peer does."""
        self.close_connection = True
        sock = self.connection
        try:
            self.wfile.flush()
        except OSError:
            pass
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.wfile.close()
        sock.close()
        self.wfile = io.BytesIO()  # the server flushes it after the handler returns


def moto_with_bucket() -> tuple[object, str, str]:
    """(a started moto S3 server on 127.0.0.1, its endpoint URL, a fresh bucket on it): for scripts such as the
    benchmarks; tests use conftest's fixtures. Stop the server with `.stop()`."""
    import contextlib
    import sys
    import uuid

    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    with contextlib.redirect_stdout(sys.stderr):  # moto announces itself on stdout: keep a script's JSON clean
        server.start()
    host, port = server.get_host_and_port()
    endpoint, bucket = f"http://{host}:{port}", f"bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint).mkdir(bucket)
    return server, endpoint, bucket
