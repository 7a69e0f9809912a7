"""The benchmark still runs: ``python -m bench run --smoke`` (nginx, the real proxy, wrk; one
1 s run) exits 0 and writes its report where --output says, never over bench/results.

Skipped without nginx, wrk or taskset, except in CI (CI=true), where that fails: .ci/run
installs them with bench/setup.sh.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _tools_or_skip():
    missing = [t for t in ("nginx", "wrk", "taskset")
               if not (shutil.which(t) or shutil.which(t, path="/usr/sbin:/sbin"))]
    if missing:
        message = f"the benchmark needs {', '.join(missing)} (bash bench/setup.sh)"
        if IN_CI:
            pytest.fail(message + ": CI must provide it")
        pytest.skip(message)


def test_the_bench_smoke_run_measures_and_writes_its_report(tmp_path):
    _tools_or_skip()
    results = REPO / "bench" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    output = tmp_path / "out" / "smoke"
    done = subprocess.run([sys.executable, "-m", "bench", "run", "--smoke", "--no-setup",
                           "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    report = json.loads(output.with_suffix(".json").read_text())
    [row] = report["rows"]
    assert (row["scenario"], row["connections"]) == ("passthrough", 1)
    assert row["requests"] > 0 and row["errors"] == 0
    assert report["command"].startswith("python -m bench run --smoke")
    text = output.with_suffix(".md").read_text()
    assert "| passthrough" in text and text in done.stdout
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before


def test_the_front_ends_pass_through_scenarios_run(tmp_path):
    """nginx's /v1/messages and /v1/responses answer the proxy's pass-through, and the report
    compares each front end with the chat pass-through of the same run."""
    _tools_or_skip()
    output = tmp_path / "front-ends"
    done = subprocess.run([sys.executable, "-m", "bench", "run", "--smoke", "--no-setup",
                           "--scenarios", "passthrough,messages-passthrough,responses-passthrough",
                           "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    report = json.loads(output.with_suffix(".json").read_text())
    assert [(r["scenario"], r["connections"]) for r in report["rows"]] == [
        ("passthrough", 1), ("messages-passthrough", 1), ("responses-passthrough", 1)]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in report["rows"])
    assert report["summary"]["messages_vs_chat_p50_ms_c1"] is not None
    text = output.with_suffix(".md").read_text()
    assert "| messages-passthrough | 1 |" in text and "| responses-passthrough | 1 |" in text


def test_the_floors_serve_the_load_and_the_targets_table_names_every_target(tmp_path):
    """``bench targets --smoke``: the naive, tuned and ping floors (bench/floors) start, answer
    wrk at c1 without errors, and the table lists issue 20's targets, unmeasured ones said so."""
    _tools_or_skip()
    output = tmp_path / "targets"
    done = subprocess.run([sys.executable, "-m", "bench", "targets", "--smoke", "--no-setup",
                           "--output", str(output)], cwd=REPO, capture_output=True, text=True,
                          timeout=90)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    report = json.loads(output.with_suffix(".json").read_text())
    assert [(r["subject"], r["connections"]) for r in report["rows"]] == [
        ("naive", 1), ("tuned", 1), ("ping", 1)]
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in report["rows"])
    numbers = {t["target"].split(".")[0] for t in report["targets"]}
    assert numbers == {str(n) for n in range(1, 10)}
    assert any("not measured" in t["measured"] for t in report["targets"])
    assert "| naive | 1 |" in output.with_suffix(".md").read_text()


def test_compare_measures_each_variant_in_turn_with_its_ratio_to_the_first(tmp_path):
    """``bench compare``: this checkout's production cache hit, once with an environment
    variable added, and the ping floor, one round each, the ratios to the first."""
    _tools_or_skip()
    output = tmp_path / "compare"
    done = subprocess.run([sys.executable, "-m", "bench", "compare", "--quick", "--no-setup",
                           "--path", "cachehit", "--connections", "1", "--variant", "current",
                           "--variant", "no-metrics=?METRICS_ENABLED=false", "--variant",
                           "ping", "--output", str(output)], cwd=REPO, capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    report = json.loads(output.with_suffix(".json").read_text())
    assert [(r["variant"], r["connections"]) for r in report["rows"]] == [
        ("current", 1), ("no-metrics", 1), ("ping", 1)]
    assert all(r["rps"] > 0 and r["errors"] == 0 for r in report["rows"])
    assert [m["variant"] for m in report["medians"]] == ["current", "no-metrics", "ping"]
    assert report["medians"][0]["ratio"] == 1.0 and report["medians"][2]["ratio"] > 0
    assert report["settings"]["variants"][1]["env"] == {"METRICS_ENABLED": "false"}
    assert "| ping | 1 |" in output.with_suffix(".md").read_text()


def test_the_litellm_config_the_targets_start_it_with_is_in_the_repository():
    """Target 4 starts LiteLLM with bench/litellm/proxy.yaml: a fresh clone must have it (a
    file named config.yaml would be left out by .gitignore) and it must serve the bench's model
    from the upstream the bench gives."""
    import yaml

    from bench import targets
    config = yaml.safe_load(pathlib.Path(targets.LITELLM_CONFIG).read_text())
    [model] = config["model_list"]
    assert model["model_name"] == "bench-model"
    assert model["litellm_params"]["api_base"] == "os.environ/BENCH_UPSTREAM"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", targets.LITELLM_CONFIG],
                             cwd=REPO, capture_output=True, text=True)
    assert tracked.returncode == 0, "bench/litellm/proxy.yaml is not tracked by git"


def test_every_command_has_help():
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for command in ("run", "streaming", "reliability", "soak", "scaleout", "hotpath",
                    "hostile", "console", "targets", "compare"):
        assert command in done.stdout
