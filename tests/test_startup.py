"""Starting the real server: `python wsgi.py` and `waitress-serve --call app:create_app`."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from tests.databases import sqlite_environ
from tests.processes import free_port, stop

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(url, process, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.stdout.read())
        try:
            return requests.get(url + "/v1/models", timeout=1)
        except requests.ConnectionError:
            time.sleep(0.1)
    raise AssertionError("the server did not start")


@pytest.fixture
def start(tmp_path):
    processes = []

    def start(*argv, **env):
        process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True,
                                   env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT),
                                        **sqlite_environ(tmp_path), **env})
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def test_python_wsgi_serves_the_mock_with_no_config_and_says_so(start):
    port = free_port()
    process = start(sys.executable, str(ROOT / "wsgi.py"), PORT=str(port))
    url = f"http://127.0.0.1:{port}"
    assert wait_ready(url, process).status_code == 200
    answer = requests.post(url + "/v1/chat/completions", data=b'{"model": "mock-model", '
                           b'"messages": [{"role": "user", "content": "hi"}]}', timeout=5)
    assert answer.json()["choices"][0]["message"]["content"].startswith("This is the mock")
    process.terminate()
    first_line = process.communicate(timeout=10)[0].splitlines()[0]
    assert "serving the built-in mock provider" in first_line


def test_waitress_serve_call_works(start):
    port = free_port()
    waitress = Path(sys.executable).parent / "waitress-serve"
    process = start(str(waitress), f"--listen=127.0.0.1:{port}", "--call", "app:create_app")
    assert wait_ready(f"http://127.0.0.1:{port}", process).status_code == 200


def held_port():
    """A loopback port something else already listens on (a plain socket, as any server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def finished(process, seconds=20):
    """The process's exit status, stdout and stderr once it exits (killed after ``seconds``)."""
    try:
        out, err = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=10)
    return process.returncode, out, err


@pytest.fixture
def run(tmp_path):
    """Start ``python wsgi.py`` (or any argv) in ``tmp_path`` with only the given environment,
    stdout and stderr apart; every process is stopped at the end."""
    processes = []

    def run(*argv, **env):
        process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT),
                                        "HOST": "127.0.0.1", **sqlite_environ(tmp_path), **env})
        processes.append(process)
        return process

    yield run
    for process in processes:
        stop(process)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_port_is_one_line_on_stderr_and_exit_status_2(run, workers):
    with held_port() as taken:
        port = taken.getsockname()[1]
        status, out, err = finished(run(sys.executable, str(ROOT / "wsgi.py"), PORT=str(port),
                                        WORKERS=workers))
    assert status == 2, out + err
    assert err == f"llm-proxy: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert "Traceback" not in out and "listening on" not in out


def test_a_second_supervisor_refuses_the_port_of_a_live_one_instead_of_sharing_it(run,
                                                                                  tmp_path):
    """Workers bind with SO_REUSEPORT, which would let a second WORKERS=2 proxy on the same
    port take half the connections, silently; it must refuse like any taken port."""
    port = free_port()
    first = run(sys.executable, str(ROOT / "wsgi.py"), PORT=str(port), WORKERS="2")
    url = f"http://127.0.0.1:{port}"
    assert wait_ready(url, first).status_code == 200
    status, out, err = finished(run(sys.executable, str(ROOT / "wsgi.py"), PORT=str(port),
                                    WORKERS="2"))
    assert status == 2, out + err
    assert err == f"llm-proxy: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert first.poll() is None and requests.get(url + "/health/live", timeout=2).ok


def test_python_wsgi_logs_the_address_it_really_listens_on(run):
    port = free_port()
    process = run(sys.executable, str(ROOT / "wsgi.py"), HOST="localhost", PORT=str(port))
    wait_ready(f"http://127.0.0.1:{port}", process)
    process.terminate()
    status, out, err = finished(process)
    banner, *rest = out.splitlines()
    assert "localhost" not in banner and ":8000" not in banner
    assert any(line.endswith(f"listening on 127.0.0.1:{port}") for line in rest), out


def test_waitress_serve_banner_does_not_claim_an_address_it_does_not_serve(run):
    """waitress-serve listens where its own flags say (0.0.0.0:8080 by default), not on HOST
    and PORT: the banner must not claim the settings' 127.0.0.1:8000."""
    port = free_port()
    waitress = Path(sys.executable).parent / "waitress-serve"
    process = run(str(waitress), f"--listen=127.0.0.1:{port}", "--call", "app:create_app")
    wait_ready(f"http://127.0.0.1:{port}", process)
    process.terminate()
    status, out, err = finished(process)
    (banner,) = [line for line in out.splitlines() if "llm-proxy 1." in line]
    assert "127.0.0.1:8000" not in banner and " on " not in banner.split("providers:")[0]
    assert f"Serving on http://127.0.0.1:{port}" in out + err  # waitress says where it is


IMPORTS = """
import sys
from app import create_app
app = create_app()
client = app.test_client()
answer = client.post("/v1/chat/completions", headers={"Authorization": "Bearer " + KEY},
                     json={"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]})
assert answer.status_code == 200, answer.get_data()
assert client.get("/console/sign-in").status_code == 200
app.extensions["llm_proxy"].close()
print(sorted({m.split(".")[0] for m in sys.modules} & {"redis", "opentelemetry"}))
"""


@pytest.mark.parametrize("redis_url,loaded", [("", "[]"), ("redis://127.0.0.1:6379/0",
                                                           "['opentelemetry', 'redis']")])
def test_redis_py_is_imported_only_when_redis_url_is_set(tmp_path, redis_url, loaded):
    """redis-py 7 imports its asyncio client and OpenTelemetry's metrics (8.6 MB of RSS, about
    0.1 s): a production proxy without REDIS_URL (keys, the database, the console, breakers)
    serves without it; with REDIS_URL set, it is there to share state."""
    key = "sk-startup-0123456789abcdef0123"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **sqlite_environ(tmp_path),
           "ENVIRONMENT": "production", "PROXY_API_KEYS": f"t:{key}",
           "ADMIN_API_KEY": "admin-startup-0123456789abcdef0123", "REDIS_URL": redis_url}
    done = subprocess.run([sys.executable, "-c", f"KEY = {key!r}\n" + IMPORTS], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == loaded
