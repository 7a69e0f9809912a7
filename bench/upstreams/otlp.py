"""A discarding OTLP/HTTP trace receiver (asyncio, one process, keep-alive HTTP/1.1).

``python -m bench.upstreams.otlp PORT LIFETIME``. ``POST /v1/traces`` reads the export and
throws it away (200, an empty ExportTraceServiceResponse: an empty body is one), so a traced
proxy's cost is measured without a collector's; ``GET /stats`` answers
``{"exports": n, "bytes": b}``, what it took so far (the benchmark checks that traces came).
"""

import asyncio
import json
import sys

from bench.upstreams import listener, ready

OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n")
COUNTS = {"exports": 0, "bytes": 0}


def plain(status, ctype, body):
    return (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, ctype, len(body))) + body


async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path = lines[0].split(b" ")[:2]
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
            if method == b"POST" and path == b"/v1/traces":
                COUNTS["exports"] += 1
                COUNTS["bytes"] += length
                writer.write(OK)
            elif path in (b"/stats", b"/ready"):
                writer.write(plain(200, b"application/json", json.dumps(COUNTS).encode()))
            else:
                writer.write(plain(404, b"text/plain", b"no"))
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port, lifetime):
    server = await asyncio.start_server(handle, sock=listener(port, 1024))
    ready()
    async with server:
        await asyncio.sleep(lifetime)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
