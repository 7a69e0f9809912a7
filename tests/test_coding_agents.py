"""The real coding agents through a live proxy, configured as the README says: Claude Code
(``claude -p``) and Codex (``codex exec``), at the versions tests/agents/package-lock.json pins,
each against the mock, an Anthropic-protocol upstream and an OpenAI-protocol upstream on
loopback (Codex also against one that speaks Responses itself), saying hi and going once round
a tool loop: the upstream calls a tool that reads a file, the CLI runs it, and the result must
come back to the upstream before the final answer.

Nothing leaves the machine: each CLI runs with a temporary HOME, its telemetry, update and
plugin features off, and HTTP(S)_PROXY pointing at a loopback sink that refuses and records
any request for anywhere but the proxy, so an attempt fails fast and fails the test. Every run
is bounded by a timeout that kills the CLI's whole process group.

The CLIs come from ``make test`` (npm ci in tests/agents). Without them the tests skip,
except in CI (CI=true), where that fails: .ci/run installs node and npm.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import tomllib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app import create_app
from settings import load_settings
from tests.anthropic_upstream import anthropic_answer, message, reply, stream_events
from tests.conftest import live_server, provider
from tests.upstream import (FakeUpstream, Reply, Stream, chat_chunks, chat_completion,
                            chat_tool_call_chunks, function_call_events, openai_answer,
                            response_events, response_object, responses_answer)

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ROOT / "tests" / "agents"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
README = (ROOT / "README.md").read_text()
README_URL = "http://127.0.0.1:8000"  # where the README's snippets expect the proxy
README_KEY = "any-key-until-you-configure-keys"  # the README's key while keys are off

CLIENT_KEY = "sk-proxy-agents-client-0123456789"  # what the CLIs present to the proxy
AUTH = {"api_keys": [{"id": "agents", "sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest()}],
        "api_keys_required": True}
KEY_VAR = "LLM_PROXY_TEST_AGENTS_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-proxy-agents-upstream-0123456789"  # the proxy's own key for its provider
NOTE = "pelican-4c1d-8e2f"  # what the file the tool reads says; nothing else says it
CALL_ID = "call_agents_1"
RUN_TIMEOUT = 120  # seconds one CLI run may take (about 2 s here)

# Claude Code: no telemetry, error reports, updates, marketplace plugins or other side traffic.
CLAUDE_QUIET = {"DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
                "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL": "1"}
# Codex: config.toml lines added to the README's. Its plugins feature is what fetches from
# github.com and chatgpt.com at start; --strict-config refuses any key that is not Codex's.
CODEX_QUIET_TOP = "check_for_update_on_startup = false\n"
CODEX_QUIET_TABLES = ("\n[features]\nplugins = false\n\n[analytics]\nenabled = false\n\n"
                      "[feedback]\nenabled = false\n")


def installed(name: str) -> Path:
    """The CLI ``name`` from tests/agents/node_modules; skips (fails in CI) when absent."""
    path = AGENTS / "node_modules" / ".bin" / name
    if not path.exists():
        why = (f"{name} is not installed in tests/agents: `make test` installs it with npm ci"
               if shutil.which("npm") else f"{name} needs node and npm, which are missing")
        if IN_CI:
            pytest.fail(why + ": CI must provide it")
        pytest.skip(why)
    return path


@pytest.fixture
def claude_cli() -> Path:
    return installed("claude")


@pytest.fixture
def codex_cli() -> Path:
    return installed("codex")


# --- what the README says to set -----------------------------------------------------------------

def readme_section() -> str:
    start = README.index("## Use it with Claude Code")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", readme_section(), re.M | re.S)


def readme_exports() -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S+)", "".join(readme_blocks("sh")), re.M))


def readme_command(program: str) -> list[str]:
    """The README's command line for ``program``, split as the shell would."""
    for line in "".join(readme_blocks("sh")).splitlines():
        if line.startswith(program + " "):
            return shlex.split(line)
    raise AssertionError(f"the README shows no `{program}` command")


def readme_codex_config(url: str) -> tuple[str, dict]:
    """The README's config.toml with the proxy at ``url``, and its parsed form."""
    [text] = readme_blocks("toml")
    text = text.replace(README_URL, url)
    return text, tomllib.loads(text)


# --- a sink for anything that is not the proxy ---------------------------------------------------

class Sink:
    """An HTTP proxy on loopback that refuses every request (403, connection closed) and
    records where it was going: the CLIs' HTTP(S)_PROXY, so nothing they try reaches the
    internet and every try is seen."""

    def __init__(self):
        self.seen: list[str] = []
        sink = self

        class Refuse(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def refuse(self):
                sink.seen.append(f"{self.command} {self.path}")
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

            do_CONNECT = do_GET = do_POST = do_HEAD = do_PUT = do_PATCH = do_DELETE = refuse

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink():
    with Sink() as s:
        yield s
    assert s.seen == [], f"a CLI tried to reach beyond the proxy: {s.seen}"


# --- the upstream: a model that calls the tool once, then answers --------------------------------

@dataclass
class Tool:
    """The call the upstream makes on the first turn: ``name`` with ``arguments``."""
    name: str
    arguments: dict


def tool_results(kind: str, body: dict) -> list[tuple[str, str]]:
    """(call id, result as JSON text) of each tool result in a request of protocol ``kind``."""
    found = []
    if kind == "anthropic":
        for msg in body.get("messages", []):
            if isinstance(msg.get("content"), list):
                found += [(b.get("tool_use_id"), json.dumps(b.get("content")))
                          for b in msg["content"] if b.get("type") == "tool_result"]
    elif kind == "openai":
        found = [(m.get("tool_call_id"), json.dumps(m.get("content")))
                 for m in body.get("messages", []) if m.get("role") == "tool"]
    else:
        found = [(i.get("call_id"), json.dumps(i.get("output")))
                 for i in body.get("input", []) if isinstance(i, dict)
                 and i.get("type") == "function_call_output"]
    return found


def final_text(kind: str, body: dict) -> str:
    results = [text for call, text in tool_results(kind, body) if call == CALL_ID]
    if not results:
        return f"Hello from the {kind} upstream"
    return f"The note says {NOTE}" if NOTE in results[0] else "The tool result lacks the note"


def offers(kind: str, body: dict, name: str) -> bool:
    names = [t.get("name") or t.get("function", {}).get("name") for t in body.get("tools", [])]
    return name in names


class Model:
    """A fake upstream's default behaviour per protocol: "Hello from the KIND upstream", or,
    once ``tool`` is set and the request offers it, a call of it until its result comes
    back, then a text that quotes the note if the result held it. The agents stream every
    turn; a whole answer (never asked) is the text."""

    DEFAULTS = {"anthropic": anthropic_answer, "openai": openai_answer,
                "responses": responses_answer}

    def __init__(self, kind: str):
        self.kind, self.tool = kind, None

    def __call__(self, recorded):
        path = recorded.path.split("?")[0]
        if recorded.method != "POST" or not path.endswith(("/messages", "/chat/completions",
                                                          "/responses")):
            return self.DEFAULTS[self.kind](recorded)
        body = recorded.json()
        model, streamed = body.get("model", "unknown"), body.get("stream")
        call = (self.tool is not None and offers(self.kind, body, self.tool.name)
                and not tool_results(self.kind, body))
        arguments = json.dumps(self.tool.arguments) if call else ""
        text = final_text(self.kind, body)
        if self.kind == "anthropic":
            msg = (message((CALL_ID, self.tool.name, self.tool.arguments), model=model,
                           stop_reason="tool_use") if call else message(text, model=model))
            return Stream(stream_events(msg)) if streamed else reply(msg)
        if self.kind == "openai":
            if not streamed:
                return Reply(body=chat_completion(model, text))
            return Stream(chat_tool_call_chunks(model, CALL_ID, self.tool.name, arguments)
                          if call else chat_chunks(model, [text]))
        if not streamed:
            return Reply(body=response_object(model, text))
        if call:
            return Stream(function_call_events(model, CALL_ID, self.tool.name, arguments))
        return Stream(response_events(response_object(model, text), [text]))


# --- the proxy in front of each backend ----------------------------------------------------------

@dataclass
class Proxy:
    url: str
    kind: str  # mock, anthropic, openai (chat only) or responses (an upstream speaking it)
    upstream: FakeUpstream | None
    model: Model | None
    keys: bool  # whether the proxy requires a client key (all but the fresh mock)

    def posts(self) -> list:
        return [r for r in self.upstream.requests if r.method == "POST"]


@pytest.fixture
def proxy(request, make_app, tmp_path, monkeypatch):
    """A live proxy on loopback: the mock as a fresh `make run` serves it (no config, no keys),
    or one provider of the kind in ``request.param`` at a fake upstream, keys required."""
    kind = request.param
    if kind == "mock":
        monkeypatch.chdir(tmp_path)  # no config.yaml here
        app = create_app(load_settings({"DATABASE_ENABLED": "false"}))
        try:
            with live_server(app) as url:
                yield Proxy(url, kind, None, None, keys=False)
        finally:
            app.extensions["llm_proxy"].close()
        return
    monkeypatch.setenv(KEY_VAR, UPSTREAM_KEY)
    model = Model(kind)
    with FakeUpstream(default=model) as upstream:
        if kind == "anthropic":
            entry = {"name": "claude", "type": "anthropic", "base_url": upstream.url,
                     "api_key_env": KEY_VAR, "models": ["*"]}
        else:
            entry = provider(upstream.url, models=["*"], api_key_env=KEY_VAR,
                             responses=kind == "responses")
        app = make_app([entry], auth=AUTH, http_client={"timeout": 30.0})
        with live_server(app) as url:
            yield Proxy(url, kind, upstream, model, keys=True)


UPSTREAM_PATHS = {"anthropic": "/v1/messages", "openai": "/v1/chat/completions",
                  "responses": "/v1/responses"}


def assert_the_upstream_was_asked_with_the_proxys_key(proxy: Proxy):
    """Every call on the upstream's own protocol's path, with the proxy's key, never the
    client's (in no header, no body)."""
    assert {r.path for r in proxy.posts()} == {UPSTREAM_PATHS[proxy.kind]}
    for seen in proxy.upstream.requests:
        assert CLIENT_KEY not in json.dumps(seen.headers) + seen.body.decode(errors="replace")
        if proxy.kind == "anthropic":
            assert seen.headers.get("x-api-key") == UPSTREAM_KEY
        else:
            assert seen.headers.get("Authorization") == f"Bearer {UPSTREAM_KEY}"


# --- running a CLI -------------------------------------------------------------------------------

@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float

    def __str__(self):
        return (f"exit {self.code} after {self.seconds:.1f} s\n--- stdout\n{self.out[-3000:]}"
                f"\n--- stderr\n{self.err[-3000:]}")


def run(command: list, env: dict, cwd: Path) -> Run:
    """Run a CLI in a session of its own, stdin closed; past RUN_TIMEOUT its whole process
    group is killed and the test fails with what it printed."""
    out, err = cwd.parent / f"{cwd.name}.out", cwd.parent / f"{cwd.name}.err"
    started = time.monotonic()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen([str(c) for c in command], env=env, cwd=cwd,
                                   stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:  # what it left running (or all of it, timed out)
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)
    done = Run(code if code is not None else -1, out.read_text(errors="replace"),
               err.read_text(errors="replace"), time.monotonic() - started)
    print(f"$ {shlex.join(str(c) for c in command)}\n{done}")  # shown by pytest -rP
    if code is None:
        pytest.fail(f"{command[0]} did not finish in {RUN_TIMEOUT} s: {done}")
    return done


def base_env(home: Path, sink: Sink) -> dict:
    """A clean environment: nothing of the runner's (no provider keys), a temporary HOME,
    every proxy variable at the sink but the proxy under test itself."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "LANG": "C.UTF-8", "TERM": "dumb", "NO_COLOR": "1",
           "XDG_CONFIG_HOME": str(home / ".config"), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_DATA_HOME": str(home / ".local" / "share"),
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = sink.url
    return env


@pytest.fixture
def workdir(tmp_path) -> Path:
    """The directory the CLI works in, holding the note its tool reads; HOME is beside it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "note.txt").write_text(NOTE + "\n")
    (tmp_path / "home").mkdir()
    return work


def claude(cli: Path, proxy: Proxy, sink: Sink, workdir: Path, prompt: str | None = None,
           *options, key_variable="ANTHROPIC_API_KEY"):
    """Claude Code with the README's variables (the proxy's port, and its key where keys are
    on) and its command, with ``prompt`` instead of its prompt if given, then ``options``."""
    exported = readme_exports()
    env = {**base_env(workdir.parent / "home", sink), **CLAUDE_QUIET}
    env["ANTHROPIC_BASE_URL"] = exported["ANTHROPIC_BASE_URL"].replace(README_URL, proxy.url)
    env[key_variable] = CLIENT_KEY if proxy.keys else exported["ANTHROPIC_API_KEY"]
    command = readme_command("claude")
    if prompt is not None:
        command[-1] = prompt
    return run([cli, *command[1:], *options], env, workdir)


def codex(cli: Path, proxy: Proxy, sink: Sink, workdir: Path, prompt: str | None = None):
    """Codex with the README's config.toml (the proxy's port) in a temporary CODEX_HOME,
    plus the lines that keep it local; `--skip-git-repo-check`: the workdir is no git
    repository."""
    text, config = readme_codex_config(proxy.url)
    codex_home = workdir.parent / "codex-home"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(CODEX_QUIET_TOP + text + CODEX_QUIET_TABLES)
    key_variable = config["model_providers"][config["model_provider"]]["env_key"]
    env = {**base_env(workdir.parent / "home", sink), "CODEX_HOME": str(codex_home),
           key_variable: CLIENT_KEY if proxy.keys else readme_exports()[key_variable]}
    command = readme_command("codex")
    assert command[1] == "exec", command
    if prompt is not None:
        command[-1] = prompt
    return run([cli, "exec", "--strict-config", "--skip-git-repo-check",
                *command[2:]], env, workdir)


# --- the README's commands, as written -----------------------------------------------------------

def test_the_readme_gives_each_agent_what_it_needs():
    exported = readme_exports()
    assert exported["ANTHROPIC_BASE_URL"] == README_URL  # without /v1: Claude Code adds it
    assert exported["ANTHROPIC_API_KEY"] == README_KEY
    assert "ANTHROPIC_AUTH_TOKEN" in readme_section()
    assert readme_command("claude") == ["claude", "-p", "say hi"]
    assert readme_command("codex") == ["codex", "exec", "say hi"]
    _, config = readme_codex_config(README_URL)
    chosen = config["model_providers"][config["model_provider"]]
    assert chosen["base_url"] == README_URL + "/v1" and chosen["wire_api"] == "responses"
    assert exported[chosen["env_key"]] == README_KEY
    assert "anthropic.Anthropic(base_url=\"http://127.0.0.1:8000\"" in readme_section()


# --- Claude Code ---------------------------------------------------------------------------------

@pytest.mark.parametrize("proxy", ["mock", "anthropic", "openai"], indirect=True)
def test_claude_code_says_hi(claude_cli, proxy, sink, workdir):
    done = claude(claude_cli, proxy, sink, workdir)
    assert done.code == 0, done
    if proxy.kind == "mock":
        assert "This is the mock provider answering" in done.out, done
        assert done.out.rstrip().endswith("say hi"), done  # the mock quotes the prompt
        return
    assert done.out.strip() == f"Hello from the {proxy.kind} upstream", done
    assert_the_upstream_was_asked_with_the_proxys_key(proxy)


@pytest.mark.parametrize("proxy", ["anthropic", "openai"], indirect=True)
def test_claude_code_reads_a_file_through_its_tool_and_answers(claude_cli, proxy, sink,
                                                              workdir):
    proxy.model.tool = Tool("Read", {"file_path": str(workdir / "note.txt")})
    done = claude(claude_cli, proxy, sink, workdir, "What does note.txt say?", "--max-turns",
                  "3")
    assert done.code == 0, done
    assert done.out.strip() == f"The note says {NOTE}", done
    first, *_, last = [r.json() for r in proxy.posts()]
    assert not tool_results(proxy.kind, first)
    [(call, result)] = tool_results(proxy.kind, last)
    assert call == CALL_ID and NOTE in result
    assert_the_upstream_was_asked_with_the_proxys_key(proxy)


@pytest.mark.parametrize("proxy", ["anthropic"], indirect=True)
def test_claude_code_may_send_its_key_as_a_bearer_token(claude_cli, proxy, sink, workdir):
    done = claude(claude_cli, proxy, sink, workdir, key_variable="ANTHROPIC_AUTH_TOKEN")
    assert done.code == 0, done
    assert done.out.strip() == "Hello from the anthropic upstream", done
    assert_the_upstream_was_asked_with_the_proxys_key(proxy)


# --- Codex ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("proxy", ["mock", "anthropic", "openai", "responses"], indirect=True)
def test_codex_says_hi(codex_cli, proxy, sink, workdir):
    done = codex(codex_cli, proxy, sink, workdir)
    assert done.code == 0, done
    if proxy.kind == "mock":
        assert done.out.strip() == "This is the mock provider answering: say hi", done
        return
    assert done.out.strip() == f"Hello from the {proxy.kind} upstream", done
    assert_the_upstream_was_asked_with_the_proxys_key(proxy)


@pytest.mark.parametrize("proxy", ["anthropic", "openai", "responses"], indirect=True)
def test_codex_runs_a_command_through_its_tool_and_answers(codex_cli, proxy, sink, workdir):
    proxy.model.tool = Tool("exec_command", {"cmd": "cat note.txt"})
    done = codex(codex_cli, proxy, sink, workdir, "What does note.txt say?")
    assert done.code == 0, done
    assert done.out.strip() == f"The note says {NOTE}", done
    first, *_, last = [r.json() for r in proxy.posts()]
    assert not tool_results(proxy.kind, first)
    [(call, result)] = tool_results(proxy.kind, last)
    assert call == CALL_ID and NOTE in result
    assert_the_upstream_was_asked_with_the_proxys_key(proxy)
