"""The processes a benchmark run starts: nginx as the upstream, the proxy, and wrk as the load.

Every long-lived process is started in its own process group and registered with a
``ProcessSet``, which ends the whole group on exit, error or Ctrl-C. Nothing outside the run's
temporary directory is written.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
PROXY_CORE, LOAD_CORE = "0", "1"  # the proxy alone on core 0; nginx and wrk share core 1

# A fixed OpenAI chat.completion body, served by nginx for every chat request.
CHAT_COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
    "model": "bench-model", "choices": [{
        "index": 0, "message": {"role": "assistant", "content": "Hello from the bench upstream."},
        "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}},
    separators=(",", ":"))

# path -> (content type, body): add a route here for a new upstream behaviour (e.g. SSE).
UPSTREAM_ROUTES = {"/v1/chat/completions": ("application/json", CHAT_COMPLETION)}

NGINX_CONF = """\
worker_processes 1;
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format status_only '$status';
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
{http_extra}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{locations}
    }}
}}
"""


def missing_tools() -> list[str]:
    """The external programs the benchmark needs that are not installed."""
    return [tool for tool in ("nginx", "wrk", "taskset") if not which(tool)]


def check_paths(parser, args) -> None:
    """The options every benchmark shares: ``--source`` (made absolute; it must hold wsgi.py)
    and, where the script has one, ``--output`` (a plain file name in bench/results)."""
    output = getattr(args, "output", None)
    if output is not None and not output.replace("-", "").replace("_", "").isalnum():
        parser.error("--output takes a plain file name (letters, digits, - and _)")
    args.source = os.path.abspath(args.source)
    if not os.path.exists(os.path.join(args.source, "wsgi.py")):
        parser.error(f"--source {args.source}: no wsgi.py there")


def interrupt_on_signals() -> None:
    """Ctrl-C (even in a background job) and ``kill`` raise KeyboardInterrupt in the main
    thread, so the cleanup in ``finally`` runs."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def which(tool):
    """The program's path; nginx lives in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def write_result(path, text):
    """Write a results file whole or not at all (a rename over the old one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_results(name: str, text: str, data) -> None:
    """``bench/results/<name>.md`` (the report) and ``<name>.json`` (its raw data)."""
    write_result(os.path.join(RESULTS, name + ".md"), text)
    write_result(os.path.join(RESULTS, name + ".json"), json.dumps(data, indent=2) + "\n")


def sse_data(response, limit: int = 100_000):
    """(time.perf_counter(), line) for each ``data:`` line of an SSE response, reading it to its
    end so the connection can be reused; bounded by ``limit`` lines."""
    for _ in range(limit):
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            yield time.perf_counter(), line
    response.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessSet:
    """Started processes, each in its own group; ``close`` ends every group, gently then hard."""

    def __init__(self):
        self.processes: list[subprocess.Popen] = []

    def start(self, argv, *, log_path, env=None, cwd=None) -> subprocess.Popen:
        log = open(log_path, "wb")
        try:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       cwd=cwd, start_new_session=True,
                                       preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.processes.append(process)
        return process

    def stop(self, process, timeout=5.0):
        if process.poll() is None:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(timeout)
        if process in self.processes:
            self.processes.remove(process)

    def close(self):
        for process in reversed(list(self.processes)):
            self.stop(process)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _die_with_parent():
    """In the child: Linux kills it if the benchmark itself is killed (even by SIGKILL)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(process, sig):
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def start_nginx(procs: ProcessSet, tmp: str) -> str:
    """nginx on a free loopback port, pinned to the load core; returns its base URL."""
    port = free_port()
    locations = "\n".join(
        f"        location = {path} {{ default_type {ctype}; return 200 '{body}'; }}"
        for path, (ctype, body) in UPSTREAM_ROUTES.items())
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(tmp=tmp, port=port, locations=locations, http_extra=""))
    process = procs.start(["taskset", "-c", LOAD_CORE, which("nginx"), "-p", tmp, "-c", conf,
                           "-e", os.path.join(tmp, "nginx-error.log")],
                          log_path=os.path.join(tmp, "nginx.out"))
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/v1/chat/completions", os.path.join(tmp, "nginx-error.log"),
               post=True)
    return url


@dataclass
class Proxy:
    process: subprocess.Popen
    url: str


def start_proxy(procs: ProcessSet, tmp: str, name: str, providers: list[dict], *, threads: int,
                env: dict | None = None, config: dict | None = None, source: str = REPO) -> Proxy:
    """``python wsgi.py`` (from ``source``) pinned to the proxy core, with a generated config,
    ``threads`` waitress threads and warnings-only logging (``env`` may override both)."""
    return start_proxy_env(procs, tmp, name, {**(config or {}), "providers": providers},
                           env={"THREADS": str(threads), "LOG_LEVEL": "WARNING", **(env or {})},
                           source=source)


def wait_ready(process, url, log_path, *, post=False, timeout=20.0):
    """Poll ``url`` until it answers 200; fail with the process log's tail if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            request(url, {} if post else None, timeout=1.0)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.05)
    tail = ""
    if os.path.exists(log_path):
        with open(log_path, errors="replace") as f:
            tail = "".join(f.readlines()[-10:])
    raise RuntimeError(f"{url} did not become ready (exit code {process.poll()}):\n{tail}")


def request(url, body=None, timeout=5.0, headers=None) -> tuple[int, bytes]:
    """One GET (or POST of ``body`` as JSON); raises on a non-2xx status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, response.read()


WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
done = function(s, latency, requests)
  io.write(string.format(
    "BENCH_JSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"bytes\\":%d,\\"connect\\":%d," ..
    "\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d," ..
    "\\"p90_us\\":%d,\\"p99_us\\":%d,\\"mean_us\\":%.1f,\\"max_us\\":%d}}\\n",
    s.requests, s.duration, s.bytes, s.errors.connect, s.errors.read, s.errors.write,
    s.errors.status, s.errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
"""


# Counts answers by status, with one body of each failing status. Only for diagnosis: a Lua
# response() callback slows wrk down, so measured runs do without it.
WRK_STATUS_SCRIPT = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {{}}; examples = {{}} end
function response(status, headers, body)
  local k = tostring(status)
  statuses[k] = (statuses[k] or 0) + 1
  if status >= 300 and examples[k] == nil then examples[k] = string.sub(body, 1, 300) end
end
done = function(s, latency, requests)
  for _, t in ipairs(threads) do
    local examples = t:get("examples")
    for k, n in pairs(t:get("statuses")) do
      local example = string.gsub(examples[k] or "", "\\n", " ")
      io.write("BENCH_STATUS " .. k .. " " .. n .. " " .. example .. "\\n")
    end
  end
end
"""


def write_wrk_script(tmp: str, name: str, body: dict, *, statuses=False, headers=None) -> str:
    path = os.path.join(tmp, f"wrk-{name}{'-statuses' if statuses else ''}.lua")
    with open(path, "w") as f:
        template = WRK_STATUS_SCRIPT if statuses else WRK_SCRIPT
        f.write(template.format(body=json.dumps(body, separators=(",", ":"))))
        for key, value in (headers or {}).items():
            f.write(f'wrk.headers["{key}"] = "{value}"\n')
    return path


def run_wrk(url: str, script: str, *, connections: int, seconds: float) -> dict:
    """One bounded wrk run (one thread, pinned to the load core); returns its raw numbers, or
    {status: {count, example}} for a statuses script."""
    argv = ["taskset", "-c", LOAD_CORE, which("wrk"), "-t1", f"-c{connections}",
            f"-d{max(1, round(seconds))}s", "--timeout", "5s", "--latency", "-s", script, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    statuses = {}
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
        if line.startswith("BENCH_STATUS "):
            _, status, count, *example = line.split(" ", 3)
            statuses[status] = {"count": int(count), "example": " ".join(example)}
    if statuses:
        return statuses
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}): "
                       f"{(done.stderr or done.stdout).strip()[-500:]}")


# -- helpers for bench/reliability.py: upstreams that fail on purpose, and counting calls ----

# The chat location of ``start_nginx_custom``: ``{chat}`` inside, every call's status logged.
CUSTOM_LOCATIONS = """\
        location = /ready {{ access_log off; return 200 'ready'; }}
        location = /v1/chat/completions {{
            access_log {tmp}/access.log status_only;
{chat}
        }}"""


def start_nginx_custom(procs: ProcessSet, tmp: str, name: str, *, chat: str,
                       http_extra: str = "") -> tuple[str, str]:
    """An nginx of its own (own dir under ``tmp``, pinned to the load core) whose
    ``/v1/chat/completions`` location body is ``chat``; every call to it is logged as one line
    (its status) in the returned access log. Returns (base URL, access log path)."""
    home = os.path.join(tmp, name)
    os.makedirs(home, exist_ok=True)
    port = free_port()
    conf = os.path.join(home, "nginx.conf")
    with open(conf, "w") as f:
        locations = CUSTOM_LOCATIONS.format(tmp=home, chat=chat)
        f.write(NGINX_CONF.format(tmp=home, port=port, locations=locations,
                                  http_extra=http_extra))
    process = procs.start(["taskset", "-c", LOAD_CORE, which("nginx"), "-p", home, "-c", conf,
                           "-e", os.path.join(home, "nginx-error.log")],
                          log_path=os.path.join(home, "nginx.out"))
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/ready", os.path.join(home, "nginx-error.log"))
    return url, os.path.join(home, "access.log")


def status_counts(access_log: str) -> dict[str, int]:
    """{status: calls} from a ``status_only`` access log (empty when nothing was logged)."""
    counts: dict[str, int] = {}
    if os.path.exists(access_log):
        with open(access_log) as f:
            for line in f:
                status = line.strip()
                if status:
                    counts[status] = counts.get(status, 0) + 1
    return counts


# A listener that accepts every connection, reads what comes and never answers: a provider that
# hangs. It counts requests (one "R" line each in its log), keeps at most MAX open sockets
# (closing the oldest), and exits by itself after LIFETIME seconds.
HANG_LISTENER = r"""
import selectors, socket, sys, time
port, lifetime, limit = int(sys.argv[1]), float(sys.argv[2]), 2000
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(1024)
srv.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(srv, selectors.EVENT_READ)
conns = []
deadline = time.monotonic() + lifetime
print("READY", flush=True)
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
            if len(conns) > limit:
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
"""


def start_hang_listener(procs: ProcessSet, tmp: str, name: str, lifetime: float) -> tuple[str, str]:
    """A provider that accepts and never answers, pinned to the load core, gone after
    ``lifetime`` s at the latest. Returns (base URL, log path whose "R" lines count calls)."""
    port = free_port()
    log_path = os.path.join(tmp, f"{name}.log")
    process = procs.start(["taskset", "-c", LOAD_CORE, sys.executable, "-c", HANG_LISTENER,
                           str(port), str(lifetime)], log_path=log_path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.05)
    else:
        raise RuntimeError(f"hang listener on port {port} did not start")
    return f"http://127.0.0.1:{port}", log_path


def hang_calls(log_path: str) -> int:
    """Requests the hang listener has received so far."""
    with open(log_path) as f:
        return sum(1 for line in f if line.strip() == "R")


# -- helpers for bench/streaming.py and bench/soak.py ---------------------------------------

# A streaming OpenAI-compatible upstream (asyncio, one process, keep-alive HTTP/1.1). POST
# /v1/chat/completions answers the fixed CHAT_COMPLETION unless the body has "stream": true;
# then N `chat.completion.chunk` events, DELAY ms apart, chunked transfer encoding, and
# `data: [DONE]`. N and DELAY come from the model name `sse-<N>-<DELAY>` (the proxy passes the
# model through untouched; default 5 chunks, no delay). With no delay every event is still its
# own HTTP chunk, all written at once (what the proxy must relay is then only its own cost).
# GET /ready answers 200. It exits by itself after LIFETIME seconds.
SSE_UPSTREAM = r"""
import asyncio, json, sys, time
port, lifetime = int(sys.argv[1]), float(sys.argv[2])
COMPLETION = sys.argv[3].encode()

def event(i, n, model):
    delta = {"role": "assistant", "content": f"tok{i} "} if i == 0 else {"content": f"tok{i} "}
    body = json.dumps({"id": "chatcmpl-sse", "object": "chat.completion.chunk",
                       "created": 1700000000, "model": model, "choices": [{
                           "index": 0, "delta": delta, "logprobs": None,
                           "finish_reason": "stop" if i == n - 1 else None}]},
                      separators=(",", ":")).encode()
    return frame(b"data: " + body + b"\n\n")

def frame(data):
    return b"%x\r\n%s\r\n" % (len(data), data)

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
TAIL = frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"

def plain(status, ctype, body):
    return (b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status, ctype, len(body))) + body

def shape(model):
    parts = model.split("-")
    try:
        return max(1, int(parts[1])), max(0.0, float(parts[2]) / 1000)
    except (IndexError, ValueError):
        return 5, 0.0

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
            body = await reader.readexactly(length) if length else b""
            if path == b"/ready":
                writer.write(plain(200, b"text/plain", b"ready"))
            elif method == b"POST" and path == b"/v1/chat/completions":
                try:
                    req = json.loads(body or b"{}")
                except ValueError:
                    req = {}
                if req.get("stream"):
                    model = str(req.get("model", ""))
                    n, delay = shape(model)
                    if delay <= 0:
                        writer.write(HEAD + b"".join(event(i, n, model) for i in range(n)) + TAIL)
                    else:
                        writer.write(HEAD + event(0, n, model))
                        await writer.drain()
                        start = time.monotonic()
                        for i in range(1, n):
                            await asyncio.sleep(max(0.0, start + i * delay - time.monotonic()))
                            writer.write(event(i, n, model))
                            await writer.drain()
                        writer.write(TAIL)
                else:
                    writer.write(plain(200, b"application/json", COMPLETION))
            else:
                writer.write(plain(404, b"application/json", b'{"error":{"message":"no"}}'))
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    print("READY", flush=True)
    async with server:
        await asyncio.sleep(lifetime)

asyncio.run(main())
"""


def start_sse_upstream(procs: ProcessSet, tmp: str, name: str = "sse-upstream", *,
                       lifetime: float = 3600.0) -> str:
    """The asyncio SSE upstream (``SSE_UPSTREAM``) pinned to the load core; its base URL."""
    port = free_port()
    log_path = os.path.join(tmp, f"{name}.log")
    process = procs.start(["taskset", "-c", LOAD_CORE, sys.executable, "-c", SSE_UPSTREAM,
                           str(port), str(lifetime), CHAT_COMPLETION], log_path=log_path)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/ready", log_path)
    return url


def start_proxy_env(procs: ProcessSet, tmp: str, name: str, config: dict, *, env: dict,
                    source: str = REPO, ready_path: str = "/health/live") -> Proxy:
    """``python wsgi.py`` pinned to the proxy core with ``config`` as its YAML and exactly the
    proxy settings in ``env`` (plus PROXY_CONFIG, PORT): unlike ``start_proxy`` it sets neither
    THREADS nor LOG_LEVEL, so a profile (e.g. ENVIRONMENT=production) keeps its own values.
    Readiness is polled on ``ready_path`` (no API key needed there)."""
    port = free_port()
    config_path = os.path.join(tmp, f"proxy-{name}.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    from settings import ENV_VARS
    proxy_env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proxy_env.update({"PROXY_CONFIG": config_path, "HOST": "127.0.0.1", "PORT": str(port),
                      "PYTHONUNBUFFERED": "1"})
    proxy_env.update(env)
    log_path = os.path.join(tmp, f"proxy-{name}.log")
    process = procs.start(["taskset", "-c", PROXY_CORE, sys.executable, "wsgi.py"],
                          log_path=log_path, env=proxy_env, cwd=source)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + ready_path, log_path)
    return Proxy(process, url)


def proc_counts(pid: int) -> dict:
    """RSS (MB), threads and open fds of a process, from /proc (cheap: no psutil object)."""
    rss_kb = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {"rss_mb": round(rss_kb / 1024, 2), "threads": threads,
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}
