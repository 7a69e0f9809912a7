"""A provider that hangs: accepts every connection, reads what comes, never answers.

``python -m bench.upstreams.hang PORT LIFETIME``. One ``R`` line on stdout per request
received (the benchmark counts them); at most 2,000 sockets kept open (the oldest closed).
"""

import selectors
import sys
import time

from bench.upstreams import listener, ready

LIMIT = 2000


def main(port: int, lifetime: float) -> None:
    srv = listener(port)
    srv.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    conns = []
    deadline = time.monotonic() + lifetime
    ready()
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            if key.fileobj is srv:
                try:
                    conn, _ = srv.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                conns.append(conn)
                if len(conns) > LIMIT:
                    old = conns.pop(0)
                    sel.unregister(old)
                    old.close()
                continue
            conn = key.fileobj
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if data:
                n = data.count(b"POST ")
                if n:
                    sys.stdout.write("R\n" * n)
                    sys.stdout.flush()
            else:
                sel.unregister(conn)
                conns.remove(conn)
                conn.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
