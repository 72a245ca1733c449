"""A bounded HTTP server on 127.0.0.1 for download tests: fixed routes, request log, stops with its context."""

from __future__ import annotations

import contextlib
import http.server
import threading


class LoopbackServer:
    """Serves `routes`: path -> (status, body, announced Content-Length or None, extra headers or None)."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.requests: list[tuple[str, str | None]] = []  # (path, Authorization header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hold a server thread forever

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Authorization")))
                status, body, length, headers = (*server.routes.get(self.path, (404, b"not found")), None, None)[:4]
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)  # HTTP/1.0: the connection closes after this, short or not

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)


@contextlib.contextmanager
def serve(routes: dict):
    srv = LoopbackServer(routes)
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=10)
