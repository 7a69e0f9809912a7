"""The processes a benchmark starts (nginx and the other upstreams, the proxy, wrk) and the
requests it sends itself.

Every long-lived process is started in its own process group and registered with a
``ProcessSet``, which ends the whole group on exit, error or Ctrl-C (and Linux kills it with the
benchmark, by ``PR_SET_PDEATHSIG``). Nothing outside the run's temporary directory is written,
but the results: every proxy keeps its database (keys, spend, the request log: SQLite by
default) in a folder of its own there, or in a PostgreSQL database made for it and dropped
after (``postgres_database``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import yaml

from bench.upstreams import ANTHROPIC_MESSAGE, CHAT_COMPLETION, RESPONSE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
RESULTS = os.path.join(BENCH, "results")
# The proxy alone on the first core; nginx, the other upstreams and the load share the second.
_CORES = sorted(os.sched_getaffinity(0))
PROXY_CORE, LOAD_CORE = str(_CORES[0]), str(_CORES[1 if len(_CORES) > 1 else 0])
PATH = "/v1/chat/completions"
CHAT_BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "hello"}]}
# The PostgreSQL server a run makes its databases on (trust auth on loopback, as the tests').
POSTGRES_SERVER = os.environ.get("BENCH_POSTGRES_URL",
                                 "postgresql://postgres@127.0.0.1:5432/postgres")


def chat_body(model: str, prompt: str = "hello", stream: bool = False) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def which(tool):
    """The program's path; nginx lives in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def missing_tools(tools) -> list[str]:
    """Those of ``tools`` (nginx, wrk, taskset) that are not installed."""
    return [tool for tool in tools if not which(tool)]


def interrupt_on_signals() -> None:
    """Ctrl-C (even in a background job) and ``kill`` raise KeyboardInterrupt in the main
    thread, so the cleanup in ``finally`` runs."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def output_path(value: str) -> str:
    """``--output``: a plain name is a file name in bench/results; anything with a / a path."""
    return os.path.abspath(value if os.sep in value else os.path.join(RESULTS, value))


def write_result(path, text):
    """Write a results file whole or not at all (a rename over the old one)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_results(prefix: str, text: str, data) -> None:
    """``<prefix>.md`` (the report) and ``<prefix>.json`` (its raw data)."""
    write_result(prefix + ".md", text)
    write_result(prefix + ".json", json.dumps(data, indent=2) + "\n")


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

    def pids(self) -> set[int]:
        """This process and every one started: what "other processes' CPU" leaves out."""
        return {os.getpid()} | {p.pid for p in self.processes}

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


NGINX_CONF = """\
worker_processes 1;
master_process off;
daemon off;
pid {home}/nginx.pid;
error_log {home}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format status_only '$status';
    access_log off;
    client_body_temp_path {home}/nginx-body;
    proxy_temp_path {home}/nginx-proxy;
    fastcgi_temp_path {home}/nginx-fastcgi;
    uwsgi_temp_path {home}/nginx-uwsgi;
    scgi_temp_path {home}/nginx-scgi;
    keepalive_timeout 120s;
    keepalive_requests 10000000;
{http_extra}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /ready {{ return 200 'ready'; }}
        location = /v1/chat/completions {{
            default_type application/json;
{log}            {chat}
        }}
        location = /v1/messages {{
            default_type application/json;
            return 200 '{message}';
        }}
        location = /v1/responses {{
            default_type application/json;
            return 200 '{response}';
        }}
    }}
}}
"""
HEALTHY_CHAT = f"return 200 '{CHAT_COMPLETION}';"


def start_nginx(procs: ProcessSet, tmp: str, name: str = "nginx", *, chat: str = HEALTHY_CHAT,
                http_extra: str = "", calls_log: str | None = None) -> str:
    """nginx (one worker, its own dir under ``tmp``) on a free loopback port, pinned to the load
    core; ``chat`` is the body of its ``/v1/chat/completions`` location (by default a fixed
    chat.completion; JSON is the default type). With ``calls_log`` every call there is logged as one line, its status.
    ``/v1/messages`` and ``/v1/responses`` answer the same text as a fixed Anthropic Message and
    a fixed Response (the front ends' pass-through). Returns its base URL."""
    home = os.path.join(tmp, name)
    os.makedirs(home, exist_ok=True)
    port = free_port()
    log = f"            access_log {calls_log} status_only;\n" if calls_log else ""
    conf = os.path.join(home, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(home=home, port=port, chat=chat, http_extra=http_extra,
                                  log=log, message=ANTHROPIC_MESSAGE, response=RESPONSE))
    error_log = os.path.join(home, "nginx-error.log")
    process = procs.start(["taskset", "-c", LOAD_CORE, which("nginx"), "-p", home, "-c", conf,
                           "-e", error_log], log_path=os.path.join(home, "nginx.out"))
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/ready", error_log)
    return url


def start_upstream(procs: ProcessSet, tmp: str, module: str, *, lifetime: float) -> tuple[str, str]:
    """``python -m bench.upstreams.<module> PORT LIFETIME`` pinned to the load core, once it
    accepts connections. Returns (base URL, the path of its output)."""
    port = free_port()
    log_path = os.path.join(tmp, f"{module}.log")
    process = procs.start(["taskset", "-c", LOAD_CORE, sys.executable, "-m",
                           f"bench.upstreams.{module}", str(port), str(lifetime)],
                          log_path=log_path, cwd=REPO)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return f"http://127.0.0.1:{port}", log_path
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"bench.upstreams.{module} on port {port} did not start "
                       f"(exit code {process.poll()}):\n{tail(log_path)}")


@dataclass
class Proxy:
    process: subprocess.Popen
    url: str
    log: str


def start_proxy(procs: ProcessSet, tmp: str, name: str, providers: list[dict], *, threads: int,
                env: dict | None = None, config: dict | None = None, source: str = REPO) -> Proxy:
    """``start_proxy_env`` with ``threads`` waitress threads and warnings-only logging (``env``
    may override both) and ``providers`` added to ``config``."""
    return start_proxy_env(procs, tmp, name, {**(config or {}), "providers": providers},
                           env={"THREADS": str(threads), "LOG_LEVEL": "WARNING", **(env or {})},
                           source=source)


def start_proxy_env(procs: ProcessSet, tmp: str, name: str, config: dict, *, env: dict,
                    source: str = REPO, cores: str = PROXY_CORE) -> Proxy:
    """``python wsgi.py`` (from ``source``) pinned to ``cores`` with ``config`` as its YAML and
    exactly the proxy settings in ``env`` (plus PROXY_CONFIG, HOST, PORT): the proxy's own
    variables in this shell are not passed on, so a profile (ENVIRONMENT=production) keeps its
    own values. Its SQLite database is a new file under ``tmp`` (``env`` may say otherwise:
    DATABASE_URL, DATABASE_ENABLED), never ``data/`` in the checkout, and fresh at each start so
    no run's rows weigh on the next. Ready once ``/health/live`` answers."""
    port = free_port()
    config_path = os.path.join(tmp, f"proxy-{name}.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    from settings import ENV_VARS
    # Nor OpenTelemetry's (OTEL_*): a scenario traces only when it says so.
    proxy_env = {k: v for k, v in os.environ.items()
                 if k not in ENV_VARS and not k.startswith("OTEL_")}
    database_dir = tempfile.mkdtemp(prefix=f"db-{name}-", dir=tmp)
    proxy_env.update({"PROXY_CONFIG": config_path, "HOST": "127.0.0.1", "PORT": str(port),
                      "PYTHONUNBUFFERED": "1",
                      "DATABASE_PATH": os.path.join(database_dir, "llm-proxy.db")})
    proxy_env.update(env)
    log_path = os.path.join(tmp, f"proxy-{name}.log")
    process = procs.start(["taskset", "-c", cores, sys.executable, "wsgi.py"],
                          log_path=log_path, env=proxy_env, cwd=source)
    url = f"http://127.0.0.1:{port}"
    wait_ready(process, url + "/health/live", log_path)
    return Proxy(process, url, log_path)


@contextlib.contextmanager
def postgres_database(server_url: str = POSTGRES_SERVER):
    """A new empty database on the PostgreSQL server for the block; yields its URL (a proxy's
    DATABASE_URL). Dropped afterwards, ending the sessions a proxy may still hold in it."""
    import psycopg  # the app's driver; only runs with PostgreSQL need it
    from psycopg import sql

    name = f"llmproxy_bench_{uuid.uuid4().hex[:16]}"
    # CREATE and DROP DATABASE cannot run inside a transaction.
    with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))


def create_key(url: str, admin_key: str, body: dict) -> str:
    """``POST /admin/keys`` with ``body`` (id, budget, ...): the new key's secret."""
    _, answer = request(url + "/admin/keys", body, headers={
        "Authorization": f"Bearer {admin_key}", "X-Audit-Actor": "bench"})
    return json.loads(answer)["key"]


def store_counts(url: str, admin_key: str) -> dict:
    """What the proxy's database holds, by its admin API: the requests and cost its spend
    table adds up (one per request log row written), and its writer's counts from
    ``/health`` (rows written, dropped, still queued)."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    _, spend = request(url + "/admin/spend?group_by=key", headers=admin)
    total = json.loads(spend)["total"]
    try:
        _, health = request(url + "/health", headers=admin)
    except urllib.error.HTTPError as e:  # 503: unhealthy, its body still says why
        health = e.read()
    writer = json.loads(health)["checks"].get("database", {})
    return {"spend_requests": total["requests"], "cost_usd": total["cost_usd"],
            "written": writer.get("written"), "dropped": writer.get("dropped"),
            "queued": writer.get("queued"), "backend": writer.get("backend")}


def collector_counts(url: str) -> dict:
    """What the discarding OTLP receiver (bench/upstreams/otlp.py) took so far: its exports
    (POST /v1/traces) and their bytes."""
    _, body = request(url + "/stats")
    return json.loads(body)


def tail(path, lines=10) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def wait_ready(process, url, log_path, *, timeout=20.0):
    """Poll ``url`` until it answers 200; fail with the process log's tail if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            request(url, timeout=1.0)
            return
        except (OSError, urllib.error.URLError):
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready (exit code {process.poll()}):\n"
                       f"{tail(log_path)}")


def request(url, body=None, timeout=5.0, headers=None) -> tuple[int, bytes]:
    """One GET (or POST of ``body`` as JSON); raises on a non-2xx status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.status, response.read()


def check_answer(url, body=None, headers=None, timeout=5.0,
                 expect=("object", "chat.completion")) -> None:
    """One request before the load: ``url`` must answer 200 with a chat completion (or, by
    ``expect`` (field, value), an Anthropic Message or a Response)."""
    status, data = request(url, body or CHAT_BODY, timeout=timeout, headers=headers)
    field, value = expect
    if json.loads(data).get(field) != value:
        raise RuntimeError(f"{url} answered {status} without a {value}: {data[:200]!r}")


def write_wrk_script(tmp: str, name: str, body: dict, *, headers=None, count=False) -> str:
    """A wrk script POSTing ``body`` with ``headers``: ``bench/wrk/summary.lua`` prints the
    figures as JSON; with ``count``, ``bench/wrk/count.lua`` also counts every answer by status
    and provider (a response() hook, which slows wrk down)."""
    lines = ['wrk.method = "POST"', f"wrk.body = [[{json.dumps(body, separators=(',', ':'))}]]",
             *(f'wrk.headers["{k}"] = "{v}"' for k, v in
               {"Content-Type": "application/json", **(headers or {})}.items())]
    for part in ("count.lua", "summary.lua") if count else ("summary.lua",):
        with open(os.path.join(BENCH, "wrk", part)) as f:
            lines.append(f.read())
    path = os.path.join(tmp, f"wrk-{name}{'-count' if count else ''}.lua")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def run_wrk(url: str, script: str, *, connections: int, seconds: float,
            timeout: str = "5s") -> dict:
    """One bounded wrk run (one thread, pinned to the load core): its figures, plus
    ``statuses``, ``answered_by`` and ``overloaded`` when the script counts answers."""
    argv = ["taskset", "-c", LOAD_CORE, which("wrk"), "-t1", f"-c{connections}",
            f"-d{max(1, round(seconds))}s", "--timeout", timeout, "--latency", "-s", script, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    raw, statuses, providers, overloaded = None, {}, {}, 0
    for line in done.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "BENCH_JSON":
            raw = json.loads(rest)
        elif kind == "BENCH_STATUS":
            status, count, *example = rest.split(" ", 2)
            statuses[status] = {"count": int(count), "example": " ".join(example)}
        elif kind == "BENCH_PROVIDER":
            name, count = rest.rsplit(" ", 1)
            providers[name] = providers.get(name, 0) + int(count)
        elif kind == "BENCH_OVERLOADED":
            overloaded += int(rest)
    if raw is None:
        raise RuntimeError(f"wrk gave no result (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")
    if statuses:
        raw.update(statuses=statuses, answered_by=providers, overloaded=overloaded)
    return raw


def wrk_errors(raw: dict) -> int:
    """Socket errors (connect, read, write, timeout) and, wrk's count, statuses >= 400."""
    return sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))


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


def proxy_log_facts(path) -> dict:
    """What the proxy's log says besides access-log JSON: waitress "Task queue depth" warnings,
    circuit breaker transitions, and the other lines (the first 20 kept)."""
    queue, transitions, other, first = 0, [], 0, []
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    continue
                other += 1
                if len(first) < 20:
                    first.append(line.rstrip()[:300])
                if "Task queue depth" in line:
                    queue += 1
                if "circuit breaker" in line and "->" in line:
                    transitions.append(line.split("circuit breaker", 1)[1].strip())
    return {"queue_depth_warnings": queue, "breaker_transitions": transitions,
            "other_lines": other, "first_other_lines": first}
