"""The offline world of `alpaca demo`: a local intranet (pages to fetch), a local search
index over them, and a local Slack webhook that records what was posted.

Everything listens on 127.0.0.1 only and lives for the demo process; the toolkit reads
its configuration from the environment exactly as it would in production.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from ..toolkit.extract import extract_readable
from ..toolkit.search import LocalIndex


@dataclass
class DemoWorld:
    base_url: str
    posts: list[dict[str, Any]] = field(default_factory=list)


def _pages() -> dict[str, str]:
    folder = resources.files("alpaca_engine.examples_builtin").joinpath("intranet")
    return {p.name: p.read_text() for p in folder.iterdir() if p.name.endswith(".html")}


@contextmanager
def demo_world(workdir: Path | None = None) -> Iterator[DemoWorld]:
    pages = _pages()
    posts: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            body = pages.get(name)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write((body or "not found").encode())

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            posts.append(json.loads(self.rfile.read(length) or b"{}"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with tempfile.TemporaryDirectory(prefix="alpaca-demo-") as tmp:
        root = Path(workdir or tmp)
        index = LocalIndex(str(root / "search.db"))
        for name, html in sorted(pages.items()):
            readable = extract_readable(html)
            index.add(name, readable.title or name, readable.text,
                      url=f"{base}/intranet/{name}")
        saved = {k: os.environ.get(k) for k in _ENV}
        os.environ.update({
            "ALPACA_SEARCH_INDEX": str(root / "search.db"),
            "ALPACA_FETCH_ALLOW_PRIVATE": "1",
            "ALPACA_SLACK_WEBHOOK_URL": f"{base}/services/T000/B000/demo-secret-token",
            "ALPACA_IDEMPOTENCY_DB": str(root / "idempotency.db"),
        })
        for key in ("ALPACA_SEARCH_PROVIDER", "ALPACA_SEARCH_URL"):
            os.environ.pop(key, None)
        try:
            yield DemoWorld(base_url=base, posts=posts)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            server.shutdown()
            server.server_close()


_ENV = ("ALPACA_SEARCH_INDEX", "ALPACA_FETCH_ALLOW_PRIVATE", "ALPACA_SLACK_WEBHOOK_URL",
        "ALPACA_IDEMPOTENCY_DB", "ALPACA_SEARCH_PROVIDER", "ALPACA_SEARCH_URL")
