"""Starting the real server: `python wsgi.py` and `waitress-serve --call app:create_app`."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                                   env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env})
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
