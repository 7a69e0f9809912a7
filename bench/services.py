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
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{locations}
    }}
}}
"""


def missing_tools() -> list[str]:
    """The external programs the benchmark needs that are not installed."""
    return [tool for tool in ("nginx", "wrk", "taskset") if not which(tool)]


def which(tool):
    """The program's path; nginx lives in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


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
        f.write(NGINX_CONF.format(tmp=tmp, port=port, locations=locations))
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
    """``python wsgi.py`` (from ``source``) pinned to the proxy core, with a generated config."""
    port = free_port()
    config_path = os.path.join(tmp, f"proxy-{name}.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump({**(config or {}), "providers": providers}, f, sort_keys=False)
    from settings import ENV_VARS  # the proxy's own env names: none may leak in from the shell
    proxy_env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proxy_env.update({"PROXY_CONFIG": config_path, "HOST": "127.0.0.1", "PORT": str(port),
                      "THREADS": str(threads), "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    proxy_env.update(env or {})
    log_path = os.path.join(tmp, f"proxy-{name}.log")
    process = procs.start(["taskset", "-c", PROXY_CORE, sys.executable, "wsgi.py"],
                          log_path=log_path, env=proxy_env, cwd=source)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/v1/models", log_path)
    return Proxy(process, url)


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


def request(url, body=None, timeout=5.0) -> tuple[int, bytes]:
    """One GET (or POST of ``body`` as JSON); raises on a non-2xx status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
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


def write_wrk_script(tmp: str, name: str, body: dict, *, statuses=False) -> str:
    path = os.path.join(tmp, f"wrk-{name}{'-statuses' if statuses else ''}.lua")
    with open(path, "w") as f:
        template = WRK_STATUS_SCRIPT if statuses else WRK_SCRIPT
        f.write(template.format(body=json.dumps(body, separators=(",", ":"))))
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

CUSTOM_NGINX_CONF = """\
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
        location = /ready {{ access_log off; return 200 'ready'; }}
        location = /v1/chat/completions {{
            access_log {tmp}/access.log status_only;
{chat}
        }}
    }}
}}
"""


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
        f.write(CUSTOM_NGINX_CONF.format(tmp=home, port=port, chat=chat, http_extra=http_extra))
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
