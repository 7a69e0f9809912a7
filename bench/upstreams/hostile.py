"""A hostile OpenAI-compatible upstream: answers by the model asked.

``python -m bench.upstreams.hostile PORT LIFETIME``:

- ``bomb``: a 300 KB gzip body that inflates to 300 MB;
- ``giant``: a 300 MB plain body;
- ``boundless``: a stream of 100 MB with no event boundary;
- ``drip``: a whole answer dripping one byte every 0.5 s;
- ``endless``: a stream of events every 10 ms that never ends.
"""

import itertools
import json
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.upstreams import ready

MB = 1024 * 1024


def bomb(inflated_mb: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(bytes(MB)) for _ in range(inflated_mb)]
    return b"".join(parts) + packer.flush()


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the proxy hanging up mid-answer is what every case expects


class Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    bomb = b""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        case = body.get("model", "")
        try:
            if case == "bomb":
                self._send({"Content-Encoding": "gzip"}, [self.bomb], len(self.bomb))
            elif case == "giant":
                self._send({}, itertools.repeat(b"x" * MB, 300), 300 * MB)
            elif case == "boundless":
                self._send({"Content-Type": "text/event-stream"},
                           itertools.repeat(b"data: " + b"x" * (MB - 6), 100), None)
            elif case == "drip":
                self._send({}, (b"{" for _ in range(600)), 600, delay=0.5)
            elif case == "endless":
                event = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
                self._send({"Content-Type": "text/event-stream"}, itertools.repeat(event),
                           None, delay=0.01)
        except OSError:
            self.close_connection = True  # the proxy hung up: what each case expects

    def _send(self, headers, pieces, length, delay=0.0):
        self.send_response(200)
        headers = {"Content-Type": "application/json", **headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header(*(("Content-Length", str(length)) if length is not None
                           else ("Transfer-Encoding", "chunked")))
        self.end_headers()
        for piece in pieces:
            if delay:
                time.sleep(delay)
            self.wfile.write(piece if length is not None else b"%x\r\n%s\r\n" % (len(piece), piece))
        if length is None:
            self.wfile.write(b"0\r\n\r\n")


def main(port: int, lifetime: float) -> None:
    Hostile.bomb = bomb(300)
    server = HostileServer(("127.0.0.1", port), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ready()
    time.sleep(lifetime)


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
