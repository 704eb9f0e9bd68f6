"""A counting HTTP proxy in front of moto's S3 server: what clients actually asked S3 for.

Requests by method and the body bytes of GET responses by path, seen on the server side, so the requests of
DataLoader worker processes count too (client-side counters would have to be gathered from every
process). Used by the loader's fetch tests and `bench/loader.py --s3`.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many loader threads connect at once (the default 5 resets them)
    daemon_threads = True


class CountingProxy:
    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.requests: Counter = Counter()
        self.get_bytes: Counter = Counter()  # path (without the query) -> GET response body bytes
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items()})
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.requests[self.command] += 1
                    if self.command == "GET":
                        proxy.get_bytes[self.path.split("?", 1)[0]] += len(data)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def handle(self):
                try:
                    super().handle()
                except ConnectionResetError:  # a client closing its keep-alive connection: not an event
                    pass

            def log_message(self, *args):  # quiet
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.get_bytes.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
