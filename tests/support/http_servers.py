"""Local HTTP servers for tests: a configurable route server (JWKS, identity providers)
and an upstream that echoes back what it received.

Both listen on 127.0.0.1 with a port chosen by the kernel and serve from daemon
threads, so a server that a test does not close cannot keep the interpreter alive.
"""

from __future__ import annotations

import http.server
import json
import threading
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import urlsplit

# Socket timeout of one connection in seconds. Idle keep-alive connections from Envoy
# or urllib end after it, so their handler threads stop by themselves.
CONNECTION_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Route:
    status: int
    body: bytes
    content_type: str
    delay_s: float


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 with Content-Length lets Envoy and urllib reuse connections.
    protocol_version = "HTTP/1.1"
    timeout = CONNECTION_TIMEOUT_S
    server: _Server

    # BaseHTTPRequestHandler dispatches each method to do_<METHOD>.
    def do_GET(self) -> None:
        self.server.owner._handle(self)

    def do_HEAD(self) -> None:
        self.server.owner._handle(self)

    def do_POST(self) -> None:
        self.server.owner._handle(self)

    def do_PUT(self) -> None:
        self.server.owner._handle(self)

    def do_PATCH(self) -> None:
        self.server.owner._handle(self)

    def do_DELETE(self) -> None:
        self.server.owner._handle(self)

    def do_OPTIONS(self) -> None:
        self.server.owner._handle(self)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines would flood pytest's captured output, and `hits()` counts them.
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: LocalHttpServer


class LocalHttpServer:
    """HTTP server on 127.0.0.1 whose routes a test sets while it runs.

    A route is matched on the request path without its query string. Unknown paths
    get 404. The server starts in the constructor and stops in `close()` or at the end
    of a `with` block.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {}
        self._hits: dict[str, int] = {}
        # Set by close() so that handlers sleeping in a delayed route return at once.
        self._closing = threading.Event()

        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"{type(self).__name__}-{self.port}",
            daemon=True,
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def set_route(
        self,
        path: str,
        *,
        status: int = 200,
        body: bytes | dict[str, Any] | list[Any] | str = b"",
        content_type: str = "application/json",
        delay_s: float = 0.0,
    ) -> None:
        """Add or replace the response for `path`.

        A dict or list body is JSON-encoded and a str body is UTF-8 encoded. With
        `delay_s`, the handler waits that many seconds before it responds, or less if
        the server closes first.
        """
        if isinstance(body, (dict, list)):
            encoded = json.dumps(body).encode("utf-8")
        elif isinstance(body, str):
            encoded = body.encode("utf-8")
        else:
            encoded = body
        with self._lock:
            self._routes[path] = Route(status, encoded, content_type, delay_s)

    def remove_route(self, path: str) -> None:
        with self._lock:
            self._routes.pop(path, None)

    def hits(self, path: str) -> int:
        """Return how many requests arrived for `path` (any method, any query string)."""
        with self._lock:
            return self._hits.get(path, 0)

    def total_hits(self) -> int:
        """Return how many requests arrived for any path, including unknown ones."""
        with self._lock:
            return sum(self._hits.values())

    def reset_hits(self) -> None:
        with self._lock:
            self._hits.clear()

    def _count_hit(self, path: str) -> None:
        with self._lock:
            self._hits[path] = self._hits.get(path, 0) + 1

    def _handle(self, request: _Handler) -> None:
        path = urlsplit(request.path).path
        request.read_body()
        self._count_hit(path)

        with self._lock:
            route = self._routes.get(path)
        if route is None:
            request.send_body(404, b"not found\n", "text/plain")
            return

        if route.delay_s > 0 and self._closing.wait(route.delay_s):
            # The server is closing, so the client gets no response.
            request.close_connection = True
            return
        request.send_body(route.status, route.body, route.content_type)

    def close(self) -> None:
        """Stop accepting requests without waiting for handlers still running."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EchoUpstream(LocalHttpServer):
    """Upstream that responds to every request with 200 and a JSON description of it.

    The body is `{"method", "path", "headers", "body"}`. `path` is the raw request
    target including the query string. `headers` maps lower-cased names to values,
    and repeated headers are joined with ", ".
    """

    def _handle(self, request: _Handler) -> None:
        body = request.read_body()
        self._count_hit(urlsplit(request.path).path)

        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value

        echo = {
            "method": request.command,
            "path": request.path,
            "headers": headers,
            "body": body.decode("utf-8", errors="replace"),
        }
        request.send_body(200, json.dumps(echo).encode("utf-8"), "application/json")
