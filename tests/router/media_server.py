"""A real local HTTP server for image-URL tests (a thread; 127.0.0.1, a free port).

/img.png            a PNG, with Content-Length
/stream?bytes=N     N bytes, no Content-Length (read until the connection closes)
/huge               a Content-Length of 1 GiB (the body never comes)
/redirect?to=URL    302 to URL
/loop               302 to itself
/slow               answers after 3 s
anything else       404
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def png(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


IMAGE = png(64, 48)


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.paths.append(url.path)  # type: ignore[attr-defined]
        if url.path == "/img.png":
            self._send(200, IMAGE, {"Content-Type": "image/png", "Content-Length": str(len(IMAGE))})
        elif url.path == "/stream":
            self._send(200, b"\0" * int(query["bytes"]), {"Content-Type": "image/png"})
        elif url.path == "/huge":
            self._send(200, b"", {"Content-Length": str(1 << 30)})
        elif url.path == "/redirect":
            self._send(302, b"", {"Location": query["to"], "Content-Length": "0"})
        elif url.path == "/loop":
            self._send(302, b"", {"Location": "/loop", "Content-Length": "0"})
        elif url.path == "/slow":
            time.sleep(3)
            self._send(200, IMAGE, {"Content-Length": str(len(IMAGE))})
        else:
            self._send(404, b"missing", {"Content-Length": "7"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)


@contextlib.contextmanager
def media_server() -> Iterator[ThreadingHTTPServer]:
    """Yields the server; `server.server_port` is its port, `server.paths` the paths it served."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.paths = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
