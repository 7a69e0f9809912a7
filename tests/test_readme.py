"""The README a newcomer follows: every command in it that can run here runs and works, every
YAML snippet loads, every link reaches a file, and docs/configuration.md names every setting."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import typing
import urllib.request
from pathlib import Path

import pytest
import yaml

import settings as settings_module
from settings import build_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Placeholders a reader replaces: a command holding one is not run as it is.
PLACEHOLDER = re.compile(r"<[^>]+>|sk-\.\.\.|=\.\.\.")
# Commands this machine cannot run (no container engine, no cluster): their files must exist.
NEEDS_ELSEWHERE = {"docker": ["Dockerfile", "docker-compose.yml"],
                   "kubectl": ["deploy/kubernetes/kustomization.yaml"]}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.M | re.S)


def commands() -> list[str]:
    """Each shell command of the README, continuation lines joined, comments dropped."""
    found = []
    for block in blocks("sh"):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                found.append(command)
    return found


def test_the_readme_stays_short_enough_to_read_in_ten_minutes():
    assert len(README.splitlines()) <= 250


def test_the_readme_gives_one_command_to_run_and_one_to_test():
    assert "make run" in commands() and "make test" in commands()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_command_that_cannot_run_here_names_files_that_exist():
    for command in commands():
        tool = command.split()[0]
        for path in NEEDS_ELSEWHERE.get(tool, []):
            assert (ROOT / path).exists(), f"{command}: {path} is missing"
        if tool == "kubectl":
            target = shlex.split(command)[-1]
            assert (ROOT / target / "kustomization.yaml").exists(), command


def test_every_yaml_snippet_is_a_configuration_the_proxy_loads():
    snippets = blocks("yaml")
    assert snippets
    for snippet in snippets:
        data = yaml.safe_load(snippet)
        build_settings(data, environ={"OPENAI_API_KEY": "sk-test-0123456789"})


def test_every_link_reaches_a_file():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def setting_names(cls, prefix="") -> list[str]:
    names = []
    for field in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[field.name]
        if dataclasses.is_dataclass(kind):
            names += setting_names(kind, f"{field.name}.")
        elif field.name not in ("providers", "version", "config_path"):  # filled in by the loader
            names.append(prefix + field.name)
    return names


def test_docs_configuration_names_every_setting():
    text = (ROOT / "docs" / "configuration.md").read_text()
    names = setting_names(settings_module.Settings)
    names += [f"providers[].{f.name}" for f in dataclasses.fields(settings_module.ProviderSettings)]
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"docs/configuration.md does not name {missing}"


@contextlib.contextmanager
def fresh_proxy(tmp_path_factory):
    """What `make run` serves on a fresh clone (no config file, no provider keys), on a free
    port; yields the base URL and the port."""
    # No config.yaml here; the default database, data/llm-proxy.db, is made here too (the
    # DATABASE_* variables of this shell are dropped below with the rest of ENV_VARS).
    cwd = tmp_path_factory.mktemp("fresh")
    with socket_port() as port:
        pass
    env = {k: v for k, v in os.environ.items() if k not in settings_module.ENV_VARS
           and not k.endswith("_API_KEY") and k != "PROXY_CONFIG"}
    env.update(PORT=str(port), PYTHONUNBUFFERED="1")
    # The README's admin walkthrough serves with an admin key: the same one.
    env["ADMIN_API_KEY"] = re.search(r"ADMIN_API_KEY=(\S+) make run", README).group(1)
    log = open(cwd / "proxy.log", "wb")
    process = subprocess.Popen([sys.executable, str(ROOT / "wsgi.py")], cwd=cwd, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/health/live", timeout=1).read()
                break
            except OSError:
                assert process.poll() is None, (cwd / "proxy.log").read_text()
                time.sleep(0.1)
        yield url, port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with fresh_proxy(tmp_path_factory) as found:
        yield found


@pytest.fixture
def served_alone(tmp_path_factory):
    """A fresh proxy of its own: once the walkthrough has made a key, keys are checked, and
    the README's other snippets (any key until keys are configured) would be refused."""
    with fresh_proxy(tmp_path_factory) as found:
        yield found


class socket_port:
    """A free loopback port."""

    def __enter__(self):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        return self.port

    def __exit__(self, *exc):
        return False


def runnable(command: str) -> bool:
    """A command that runs on its own (the walkthrough's, which share shell variables, run as
    one script below)."""
    return (command.startswith("curl ") or ".venv/bin/python -m app.auth" in command) \
        and not PLACEHOLDER.search(command) and "$" not in command


def test_every_curl_in_the_readme_answers_from_a_fresh_proxy(served):
    url, port = served
    ran = 0
    for command in filter(runnable, commands()):
        command = command.replace("localhost:8000", f"127.0.0.1:{port}")
        command = command.replace(".venv/bin/python", shlex.quote(sys.executable))
        done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, timeout=30)
        assert done.returncode == 0, (command, done.stderr)
        assert done.stdout.strip(), command
        assert b'"error"' not in done.stdout, (command, done.stdout)
        ran += 1
    assert ran >= 4


def test_the_keys_and_budget_walkthrough_runs_against_a_fresh_proxy(served_alone):
    """The README's admin walkthrough, pasted into one shell at once: a key made with one call,
    used until its budget is spent, its spend and its requests read back (the admin reads have
    the rows just queued written first)."""
    url, port = served_alone
    (block,) = [b for b in blocks("sh") if "/admin/keys" in b]
    lines = [line for line in block.replace("localhost:8000", f"127.0.0.1:{port}").splitlines()
             if line.strip()]
    script = "set -euo pipefail\n" + "\n".join(lines)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count('"object":"chat.completion"') == 2, out
    assert '"code":"budget_exceeded"' in out and "resets at" in out, out
    assert '"key_id":"team-b","requests":2' in out, out  # the spend (refusals spend nothing)
    assert out.count('"request_id"') == 3 and '"status":429' in out, out  # the request log


def test_every_python_snippet_in_the_readme_runs_against_a_fresh_proxy(served):
    url, port = served
    snippets = blocks("python")
    assert snippets
    for snippet in snippets:
        code = snippet.replace("http://127.0.0.1:8000", url)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
        assert "mock provider" in done.stdout.decode(), done.stdout
