"""A local JSON API for the `http` connector's tests: real paginated data, real faults.

`Api` serves `records` (dicts with at least "id" and "updated_at", kept sorted by
(updated_at, id)) in every pagination style the connector speaks:

    /page?page=N&per_page=K          {"data": [...], "total": T}
    /offset?offset=O&limit=K         {"items": [...], "has_more": bool}
    /cursor?cursor=C&limit=K         {"data": [...], "meta": {"next_cursor": C' | null}}
    /next?after=ID&limit=K           {"results": [...], "next": "/next?after=..." | null}
    /link?page=N&per_page=K          [...] with a `Link: <...>; rel="next"` header
    /self                            {"data": [...], "next": "/self"} (a next link to itself)
    /post  (POST, JSON body)         {"data": [...]} filtered by body["kind"]
    /echo400                         400, and a text body that echoes the request as an
                                     upstream's error page might: the request line, the
                                     auth headers as sent, then them and the decoded
                                     query as JSON

Every list endpoint honours `updated_since` (records with updated_at >= it).
`faults` is a queue: each request first pops one entry and misbehaves as told:
"500", ("429", retry_after), ("slow", seconds), "malformed", "truncated", "404".
`auth` makes every request need ("bearer", token), ("basic", user, password),
("header", name, value) or ("query", name, value); otherwise 401.
Every request is logged in `requests` (method, path, query, headers, time).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float
    body: Any = None


@dataclass
class Api:
    records: list[dict[str, Any]] = field(default_factory=list)
    faults: deque[Any] = field(default_factory=deque)
    auth: tuple[str, ...] | None = None
    delay: float = 0.0  # seconds added to every response (to make long syncs)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                api.handle(self, None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                api.handle(self, json.loads(self.rfile.read(length) or b"null"))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set_records(self, records: list[dict[str, Any]]) -> None:
        with self.lock:
            self.records = sorted(records, key=lambda r: (r["updated_at"], r["id"]))

    def upsert(self, record: dict[str, Any]) -> None:
        with self.lock:
            kept = [r for r in self.records if r["id"] != record["id"]]
            self.records = sorted([*kept, record], key=lambda r: (r["updated_at"], r["id"]))

    def remove(self, record_id: Any) -> None:
        with self.lock:
            self.records = [r for r in self.records if r["id"] != record_id]

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    # -- serving ---------------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, body: Any) -> None:
        parts = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            self.requests.append(Request(h.command, parts.path, query, dict(h.headers), time.time(), body))
            fault = self.faults.popleft() if self.faults else None
            records = self.records  # replaced whole on every change, never mutated
        if self.delay:
            time.sleep(self.delay)
        if parts.path == "/echo400":
            return self.echo400(h, query)
        if not self.authorized(h, query):
            return self.send(h, 401, {"error": "unauthorized"})
        if fault is not None and self.misbehave(h, fault):
            return
        since = query.get("updated_since")
        if since is not None:
            records = [r for r in records if str(r["updated_at"]) >= since]
        route = {
            "/page": self.page,
            "/offset": self.offset,
            "/cursor": self.cursor,
            "/next": self.next_link,
            "/link": self.link,
            "/self": self.self_link,
            "/post": self.post,
        }.get(parts.path)
        if route is None:
            return self.send(h, 404, {"error": "not found"})
        route(h, query, records, body)

    def authorized(self, h: BaseHTTPRequestHandler, query: dict[str, str]) -> bool:
        if self.auth is None:
            return True
        kind = self.auth[0]
        if kind == "bearer":
            return h.headers.get("Authorization") == f"Bearer {self.auth[1]}"
        if kind == "basic":
            token = base64.b64encode(f"{self.auth[1]}:{self.auth[2]}".encode()).decode()
            return h.headers.get("Authorization") == f"Basic {token}"
        if kind == "header":
            return h.headers.get(self.auth[1]) == self.auth[2]
        if kind == "query":
            return query.get(self.auth[1]) == self.auth[2]
        raise ValueError(kind)

    def misbehave(self, h: BaseHTTPRequestHandler, fault: Any) -> bool:
        """Act out one fault; True when the response was sent (or deliberately broken)."""
        name, *args = fault if isinstance(fault, tuple) else (fault,)
        if name == "500":
            self.send(h, 500, {"error": "internal"})
        elif name == "503":
            self.send(h, 503, {"error": "unavailable"})
        elif name == "404":
            self.send(h, 404, {"error": "gone"})
        elif name == "429":
            self.send(h, 429, {"error": "slow down"}, {"Retry-After": str(args[0])})
        elif name == "slow":
            time.sleep(args[0])
            return False  # then answers normally, too late
        elif name == "malformed":
            self.raw(h, 200, b'{"data": [{"id": 1,')
        elif name == "truncated":
            payload = b'{"data": [' + b'{"id": 1}, ' * 50
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload) + 500))
            h.end_headers()
            h.wfile.write(payload)
            h.wfile.flush()
            h.close_connection = True
        elif name == "huge":
            self.raw(h, 200, b'{"data": [' + b'{"id": 1},' * 200_000 + b'{"id": 2}]}')
        else:
            raise ValueError(name)
        return True

    def send(
        self, h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        self.raw(h, status, json.dumps(body).encode(), headers)

    def raw(
        self, h: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict[str, str] | None = None
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)

    def echo400(self, h: BaseHTTPRequestHandler, query: dict[str, str]) -> None:
        sent = {
            k: v for k, v in h.headers.items() if k.lower() == "authorization" or k.lower().startswith("x-")
        }
        lines = [h.requestline, *(f"{k}: {v}" for k, v in sent.items())]
        lines.append(json.dumps({"error": "bad request", "headers": sent, "query": query}))
        payload = "\n".join(lines).encode()
        h.send_response(400)
        h.send_header("Content-Type", "text/plain; charset=utf-8")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    # -- pagination styles -------------------------------------------------------------------

    def page(self, h: BaseHTTPRequestHandler, q: dict[str, str], records: list[Any], _: Any) -> None:
        number, size = int(q.get("page", 1)), int(q.get("per_page", 10))
        chunk = records[(number - 1) * size : number * size]
        self.send(h, 200, {"data": chunk, "total": len(records), "page": number})

    def offset(self, h: BaseHTTPRequestHandler, q: dict[str, str], records: list[Any], _: Any) -> None:
        start, size = int(q.get("offset", 0)), int(q.get("limit", 10))
        chunk = records[start : start + size]
        self.send(h, 200, {"items": chunk, "has_more": start + size < len(records)})

    def cursor(self, h: BaseHTTPRequestHandler, q: dict[str, str], records: list[Any], _: Any) -> None:
        start, size = int(q.get("cursor") or 0), int(q.get("limit", 10))
        chunk = records[start : start + size]
        nxt = str(start + size) if start + size < len(records) else None
        self.send(h, 200, {"data": chunk, "meta": {"next_cursor": nxt}})

    def next_link(self, h: BaseHTTPRequestHandler, q: dict[str, str], records: list[Any], _: Any) -> None:
        after, size = int(q.get("after", -1)), int(q.get("limit", 10))
        rest = [r for r in sorted(records, key=lambda r: r["id"]) if r["id"] > after]
        chunk = rest[:size]
        nxt = f"/next?after={chunk[-1]['id']}&limit={size}" if len(rest) > size else None
        if nxt and "updated_since" in q:
            nxt += f"&updated_since={q['updated_since']}"
        self.send(h, 200, {"results": chunk, "next": nxt})

    def link(self, h: BaseHTTPRequestHandler, q: dict[str, str], records: list[Any], _: Any) -> None:
        number, size = int(q.get("page", 1)), int(q.get("per_page", 10))
        chunk = records[(number - 1) * size : number * size]
        headers = {}
        if number * size < len(records):
            headers["Link"] = (
                f'<{self.url}/link?page=1&per_page={size}>; rel="first", '
                f'<{self.url}/link?page={number + 1}&per_page={size}>; rel="next"'
            )
        self.send(h, 200, chunk, headers)

    def self_link(self, h: BaseHTTPRequestHandler, q: dict[str, str], records: list[Any], _: Any) -> None:
        self.send(h, 200, {"data": records[:5], "next": "/self"})

    def post(self, h: BaseHTTPRequestHandler, q: dict[str, str], records: list[Any], body: Any) -> None:
        kind = (body or {}).get("kind")
        self.send(h, 200, {"data": [r for r in records if kind is None or r.get("kind") == kind]})


def make_records(n: int, start: int = 1, day: str = "2026-01-01") -> list[dict[str, Any]]:
    """`n` records with ids from `start`; updated_at spread over one day, several sharing a second."""
    out = []
    for i in range(start, start + n):
        second = (i // 3) % 86400
        stamp = f"{day}T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z"
        out.append(
            {"id": i, "name": f"name {i}", "score": i * 1.5, "updated_at": stamp, "tags": ["a", str(i % 7)]}
        )
    return out


def serve_forever(n: int, delay: float = 0.0) -> None:
    """`python -m httpapi N [DELAY]` (for crash tests and benchmarks): serve N records, print the URL."""
    api = Api(delay=delay)
    api.set_records(make_records(n))
    print(api.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    import sys

    serve_forever(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
