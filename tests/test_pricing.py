"""Every answer priced: the price table, each answer's cost from its usage (cached input, cache
writes, the summary, streams), the header, the access log, the metrics; prompt-caching fields
reaching the upstream untouched."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pydantic
import pytest
import requests
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from prometheus_client.parser import text_string_to_metric_families

from app.pricing import DEFAULT_PRICES, PRICES_AS_OF, Price, PriceTable
from settings import SettingsError, build_settings, load_settings
from tests.anthropic_upstream import anthropic_answer, message, reply, sse, stream_events
from tests.conftest import live_server, provider
from tests.test_anthropic import checked_body
from tests.upstream import FakeUpstream, Reply, Stream, chat_chunks, chat_completion

KEY = "team-a-key-0123456789"
AUTH = {"env_keys": f"team-a:{KEY},team-b:team-b-key-0123456789"}
BEARER = {"Authorization": f"Bearer {KEY}"}
M = 1_000_000


@pytest.fixture
def make_app(make_app):
    """Apps that never ask their upstreams for models: a scripted reply is for the test's call."""
    return lambda providers, **sections: make_app(
        providers, routing={"model_refresh_interval": 0}, **sections)


def answer(model="gpt-4o", **usage):
    """An OpenAI answer with this usage."""
    body = chat_completion(model, "Hello")
    body["usage"] = usage
    return Reply(body=body)


def chat(model="gpt-4o", **fields):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


def post(app, body, headers=BEARER, path="/v1/chat/completions"):
    response = app.test_client().post(path, json=body, headers=headers)
    response.get_data()
    response.close()  # as a server does after the last byte: the access log and metrics run
    return response


def samples(app) -> dict:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def cost_metric(app, key_id="team-a", model="gpt-4o", provider="up"):
    return samples(app).get(("llm_proxy_cost_usd_total", (
        ("key_id", key_id), ("model", model), ("provider", provider))), 0.0)


@pytest.fixture
def access_lines(capsys):
    capsys.readouterr()
    return lambda: [json.loads(line) for line in capsys.readouterr().out.splitlines()
                    if line.startswith("{")]


@pytest.fixture
def app(make_app, upstream):
    return make_app([provider(upstream.url, models=[
        "gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "mystery-1"])], auth=AUTH)


# --- what an answer costs ------------------------------------------------------------------

def test_an_answer_costs_its_tokens_at_the_table_with_the_header_the_log_and_the_metric(
        app, upstream, access_lines):
    upstream.script(answer(prompt_tokens=1000, completion_tokens=500, total_tokens=1500))
    response = post(app, chat("gpt-4o"))
    expected = (1000 * 2.50 + 500 * 10.00) / M  # gpt-4o: $2.50 in, $10 out per million
    assert response.status_code == 200
    assert response.headers["X-Proxy-Cost-USD"] == f"{expected:.8f}" == "0.00750000"
    (line,) = access_lines()
    assert line["cost_usd"] == pytest.approx(expected) and line["key_id"] == "team-a"
    assert cost_metric(app) == pytest.approx(expected)
    costs = app.test_client().get("/metrics?format=json").json["costs"]
    assert costs["by_key"] == {"team-a": pytest.approx(expected)}
    assert costs["prices_as_of"] == PRICES_AS_OF and costs["unpriced_answers"] == 0


def test_cached_input_tokens_are_priced_at_the_cached_rate(app, upstream):
    upstream.script(answer(prompt_tokens=1000, completion_tokens=100, total_tokens=1100,
                           prompt_tokens_details={"cached_tokens": 800}))
    response = post(app, chat("gpt-4o"))
    expected = (200 * 2.50 + 800 * 1.25 + 100 * 10.00) / M
    assert float(response.headers["X-Proxy-Cost-USD"]) == pytest.approx(expected, abs=1e-8)


def test_cache_writes_are_priced_at_the_write_rate(app, upstream):
    """An OpenAI-compatible gateway in front of Claude reports Anthropic's cache writes as
    ``cache_creation_input_tokens`` beside the OpenAI counts."""
    upstream.script(answer("claude-sonnet-4-5", prompt_tokens=1000, completion_tokens=100,
                           total_tokens=1100, prompt_tokens_details={"cached_tokens": 300},
                           cache_creation_input_tokens=600))
    response = post(app, chat("claude-sonnet-4-5"))
    # Sonnet 4.5: $3 in, $15 out, cache read $0.30, cache write $3.75 per million.
    expected = (100 * 3.00 + 300 * 0.30 + 600 * 3.75 + 100 * 15.00) / M
    assert float(response.headers["X-Proxy-Cost-USD"]) == pytest.approx(expected, abs=1e-8)


def test_a_stream_is_priced_after_its_last_byte_in_the_log_and_the_metrics(
        app, upstream, access_lines):
    events = chat_chunks("gpt-4o-mini", ["Hello", " there"], done=False)
    events += [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o-mini", "choices": [],
                "usage": {"prompt_tokens": 2000, "completion_tokens": 1000,
                          "total_tokens": 3000}}, b"[DONE]"]
    upstream.script(Stream(events))
    response = post(app, chat("gpt-4o-mini", stream=True,
                              stream_options={"include_usage": True}))
    expected = (2000 * 0.15 + 1000 * 0.60) / M
    assert response.status_code == 200 and b"Hello" in response.get_data()
    assert "X-Proxy-Cost-USD" not in response.headers  # sent before the usage was known
    (line,) = access_lines()
    assert line["cost_usd"] == pytest.approx(expected)
    assert cost_metric(app, model="gpt-4o-mini") == pytest.approx(expected)


def test_a_stream_served_by_waitress_is_priced_once_its_last_byte_is_sent(app, upstream):
    events = chat_chunks("gpt-4o", ["Hi"], done=False)
    events += [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o", "choices": [],
                "usage": {"prompt_tokens": 400, "completion_tokens": 100,
                          "total_tokens": 500}}, b"[DONE]"]
    upstream.script(Stream(events))
    with live_server(app) as url:
        with requests.post(url + "/v1/chat/completions", headers=BEARER, stream=True, timeout=5,
                           json=chat(stream=True, stream_options={"include_usage": True})) as r:
            body = r.content
            assert "X-Proxy-Cost-USD" not in r.headers
        assert b"data: [DONE]" in body
        expected = (400 * 2.50 + 100 * 10.00) / M
        deadline = time.monotonic() + 5  # the server logs after the last byte: a bounded wait
        while cost_metric(app) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert cost_metric(app) == pytest.approx(expected)


def test_the_summary_call_is_priced_at_its_own_model(make_app, upstream, access_lines):
    app = make_app([provider(upstream.url, models=["gpt-4o", "gpt-4o-mini"])], auth=AUTH,
                   condense={"threshold_tokens": 500, "keep_last": 2, "step": 2,
                             "summary_model": "gpt-4o-mini"},
                   http_client={"retry_attempts": 0})
    upstream.script(answer("gpt-4o-mini", prompt_tokens=4000, completion_tokens=200,
                           total_tokens=4200),
                    answer("gpt-4o", prompt_tokens=600, completion_tokens=100,
                           total_tokens=700))
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 400}
             for i in range(8)]
    response = post(app, {"model": "gpt-4o", "messages": turns})
    assert response.headers["X-Proxy-Condensed"] == "summary"
    summary = (4000 * 0.15 + 200 * 0.60) / M
    main = (600 * 2.50 + 100 * 10.00) / M
    assert float(response.headers["X-Proxy-Cost-USD"]) == pytest.approx(summary + main,
                                                                         abs=1e-8)
    (line,) = access_lines()
    assert line["cost_usd"] == pytest.approx(summary + main)


def test_an_answer_from_the_cache_costs_nothing(make_app, upstream):
    app = make_app([provider(upstream.url, models=["gpt-4o"])], auth=AUTH,
                   cache={"enabled": True})
    upstream.script(answer(prompt_tokens=1000, completion_tokens=500, total_tokens=1500))
    first, second = post(app, chat()), post(app, chat())
    assert second.headers["X-Cache"] == "HIT" and upstream.calls == 1
    assert first.headers["X-Proxy-Cost-USD"] == "0.00750000"
    assert second.headers["X-Proxy-Cost-USD"] == "0.00000000"
    assert cost_metric(app) == pytest.approx(0.0075)


def test_the_cost_metric_is_per_key(app, upstream):
    upstream.script(answer(prompt_tokens=1000, completion_tokens=0, total_tokens=1000),
                    answer(prompt_tokens=3000, completion_tokens=0, total_tokens=3000))
    post(app, chat())
    post(app, chat(), headers={"Authorization": "Bearer team-b-key-0123456789"})
    assert cost_metric(app, "team-a") == pytest.approx(0.0025)
    assert cost_metric(app, "team-b") == pytest.approx(0.0075)


def test_an_unknown_model_costs_nothing_and_is_counted_unpriced(app, upstream, access_lines):
    upstream.script(answer("mystery-1", prompt_tokens=1000, completion_tokens=500,
                           total_tokens=1500))
    response = post(app, chat("mystery-1"))
    assert response.headers["X-Proxy-Cost-USD"] == "0.00000000"
    found = samples(app)
    assert found[("llm_proxy_unpriced_answers_total", (("model", "mystery-1"),))] == 1
    assert not [k for k in found if k[0] == "llm_proxy_cost_usd_total"]
    assert app.test_client().get("/metrics?format=json").json["costs"]["unpriced_answers"] == 1
    (line,) = access_lines()
    assert line["cost_usd"] == 0


def test_a_failed_answer_with_no_usage_costs_nothing_and_is_not_unpriced(app, upstream):
    upstream.script(Reply(400, {"error": {"message": "bad", "type": "invalid_request_error"}}))
    response = post(app, chat("mystery-1"))
    assert response.status_code == 400 and response.headers["X-Proxy-Cost-USD"] == "0.00000000"
    assert ("llm_proxy_unpriced_answers_total", (("model", "mystery-1"),)) not in samples(app)


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": "many", "completion_tokens": None},
    {"prompt_tokens": -5, "completion_tokens": True, "prompt_tokens_details": "x"},
    {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 10 ** 9},
     "cache_creation_input_tokens": 10 ** 9},
])
def test_odd_usage_from_an_upstream_never_breaks_an_answer(app, upstream, usage):
    upstream.script(answer(**usage))
    response = post(app, chat())
    assert response.status_code == 200
    # at most every prompt token at the input price: counts are clamped to the prompt
    assert 0 <= float(response.headers["X-Proxy-Cost-USD"]) <= 10 * 2.50 / M


# --- the table: overrides, patterns, aliases ------------------------------------------------

def test_config_entries_override_the_defaults_and_patterns_price_families(make_app, upstream):
    app = make_app([provider(upstream.url, models=["gpt-*", "local-*"])], auth=AUTH, pricing={
        "models": [{"model": "gpt-4o", "input": 1, "output": 2},
                   {"model": "local-*", "input": 0.5, "output": 0.5, "cached_input": 0}]})
    upstream.script(answer(prompt_tokens=M, completion_tokens=M, total_tokens=2 * M),
                    answer(prompt_tokens=M, completion_tokens=0, total_tokens=M,
                           prompt_tokens_details={"cached_tokens": M // 2}),
                    answer(prompt_tokens=M, completion_tokens=0, total_tokens=M))
    assert post(app, chat("gpt-4o")).headers["X-Proxy-Cost-USD"] == "3.00000000"
    assert post(app, chat("local-llama")).headers["X-Proxy-Cost-USD"] == "0.25000000"
    # the rest of the default table stays
    assert post(app, chat("gpt-4o-mini")).headers["X-Proxy-Cost-USD"] == "0.15000000"


def test_the_default_table_can_be_turned_off(make_app, upstream):
    app = make_app([provider(upstream.url, models=["gpt-4o"])], pricing={"defaults": False})
    upstream.script(answer(prompt_tokens=1000, completion_tokens=500, total_tokens=1500))
    assert post(app, chat(), headers={}).headers["X-Proxy-Cost-USD"] == "0.00000000"
    found = samples(app)
    assert found[("llm_proxy_unpriced_answers_total", (("model", "gpt-4o"),))] == 1


def test_an_alias_is_priced_by_the_model_the_provider_serves(make_app, upstream):
    app = make_app([provider(upstream.url, models=[], aliases={
        "fast": "gpt-4o-mini", "house": "internal-7b"})], auth=AUTH, pricing={
        "models": [{"model": "house", "input": 1, "output": 1}]})
    upstream.script(answer("gpt-4o-mini", prompt_tokens=M, completion_tokens=0,
                           total_tokens=M),
                    answer("internal-7b", prompt_tokens=M, completion_tokens=0,
                           total_tokens=M))
    assert post(app, chat("fast")).headers["X-Proxy-Cost-USD"] == "0.15000000"
    # the served name has no price: the name asked has one
    assert post(app, chat("house")).headers["X-Proxy-Cost-USD"] == "1.00000000"


def test_embeddings_are_priced_at_the_input_rate(make_app, upstream):
    app = make_app([provider(upstream.url, models=["text-embedding-3-small"])], auth=AUTH)
    upstream.script(Reply(body={"object": "list", "model": "text-embedding-3-small", "data": [],
                                "usage": {"prompt_tokens": M, "total_tokens": M}}))
    response = post(app, {"model": "text-embedding-3-small", "input": "hi"},
                    path="/v1/embeddings")
    assert response.headers["X-Proxy-Cost-USD"] == "0.02000000"


@pytest.mark.parametrize("model,expected", [
    ("gpt-4o", (2.50, 10.00, 1.25)),
    ("gpt-4o-2024-08-06", (2.50, 10.00, 1.25)),
    ("gpt-4o-2024-05-13", (5.00, 15.00, None)),  # the first snapshot kept its own price
    ("gpt-4o-mini-2024-07-18", (0.15, 0.60, 0.075)),
    ("gpt-4.1-nano", (0.10, 0.40, 0.025)),
    ("o4-mini-2025-04-16", (1.10, 4.40, 0.275)),
    ("gpt-5-mini", (0.25, 2.00, 0.025)),
    ("claude-sonnet-4-5-20250929", (3.00, 15.00, 0.30)),
    ("claude-sonnet-4-20250514", (3.00, 15.00, 0.30)),
    ("claude-opus-4-1-20250805", (15.00, 75.00, 1.50)),
    ("claude-opus-4-5", (5.00, 25.00, 0.50)),
    ("claude-3-5-haiku-latest", (0.80, 4.00, 0.08)),
    ("claude-3-haiku-20240307", (0.25, 1.25, 0.03)),
])
def test_the_default_table_prices_names_and_their_snapshots(model, expected):
    price = PriceTable().price(model)
    assert (price.input, price.output, price.cached_input) == expected


@pytest.mark.parametrize("model", ["gpt-4o-audio-preview", "claude-opus-5", "gpt-6", "o5"])
def test_a_new_model_does_not_inherit_an_old_ones_price(model):
    assert PriceTable().price(model) is None


def test_every_default_price_is_sane():
    names = [name for names, _ in DEFAULT_PRICES for name in names]
    assert len(names) == len(set(names))
    for _, price in DEFAULT_PRICES:
        assert price.input >= 0 and price.output >= 0
        assert price.cached_input is None or price.cached_input <= price.input
        assert price.cache_write is None or price.cache_write >= price.input


def test_the_docs_show_the_default_table_and_its_date():
    """docs/configuration.md's table is the code's, row by row; a blank is the input price."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert f"taken in **{PRICES_AS_OF}**" in text
    table = text.split("| model (and its `-20*` snapshots) |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                rows[name] = tuple(float(c) if c else None for c in cells[1:])
    for names, price in DEFAULT_PRICES:
        for name in (n for n in names if not n.endswith("-20*")):
            assert rows.get(name) == (price.input, price.cached_input, price.cache_write,
                                      price.output), name


def test_a_price_costs_cached_written_and_plain_input_separately():
    price = Price(input=2.0, output=8.0, cached_input=0.5, cache_write=2.5)
    usage = {"prompt_tokens": 1000, "completion_tokens": 10,
             "prompt_tokens_details": {"cached_tokens": 400}, "cache_creation_input_tokens": 100}
    assert price.cost(usage) == pytest.approx((500 * 2.0 + 400 * 0.5 + 100 * 2.5 + 10 * 8) / M)


# --- settings -------------------------------------------------------------------------------

def settings_with(pricing):
    return build_settings({"providers": [{"name": "m", "type": "mock", "models": ["m"]}],
                           "pricing": pricing})


@pytest.mark.parametrize("entry,path,reason", [
    ({"model": "x", "input": -1, "output": 1}, "pricing.models[0].input", "0 or more"),
    ({"model": "x", "input": 1, "output": "2"}, "pricing.models[0].output", "got '2'"),
    ({"model": "x", "input": True, "output": 1}, "pricing.models[0].input", "got True"),
    ({"model": "x", "input": 1, "output": float("inf")}, "pricing.models[0].output", "number"),
    ({"model": "x", "input": 1}, "pricing.models[0].output", "required"),
    ({"model": "x", "input": 1, "output": 1, "cache_read": 1}, "pricing.models[0].cache_read",
     "unknown field"),
    ({"model": " ", "input": 1, "output": 1}, "pricing.models[0].model", "model name"),
    ({"input": 1, "output": 1}, "pricing.models[0].model", "model name"),
    ("gpt-4o: 1", "pricing.models[0]", "expected a mapping"),
    ({"model": "x", "input": 1, "output": 1, "cached_input": -0.5},
     "pricing.models[0].cached_input", "0 or more"),
])
def test_a_bad_price_entry_stops_start_up_naming_it(entry, path, reason):
    with pytest.raises(SettingsError) as e:
        settings_with({"models": [entry]})
    assert e.value.path == path and reason in e.value.reason


def test_a_model_priced_twice_is_refused():
    with pytest.raises(SettingsError, match=r"pricing.models\[1\].model: 'x' is priced twice"):
        settings_with({"models": [{"model": "x", "input": 1, "output": 1},
                                  {"model": "x ", "input": 2, "output": 2}]})


def test_the_default_table_is_turned_off_by_its_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_settings({}).pricing.defaults is True
    assert load_settings({"PRICING_DEFAULTS": "false"}).pricing.defaults is False


# --- prompt caching reaches the upstream untouched -----------------------------------------

def test_openai_prompt_cache_key_reaches_the_upstream_untouched(make_app, upstream):
    app = make_app([provider(upstream.url, models=["gpt-4o"], aliases={"fast": "gpt-4o"})])
    body = chat("gpt-4o", prompt_cache_key="team-a-agent-v3", prompt_cache_retention="24h")
    raw = json.dumps(body).encode()
    response = app.test_client().post("/v1/chat/completions", data=raw,
                                      content_type="application/json")
    assert response.status_code == 200 and upstream.requests[-1].body == raw
    app.test_client().post("/v1/chat/completions", json={**body, "model": "fast"})
    sent = upstream.requests[-1].json()
    assert sent["prompt_cache_key"] == "team-a-agent-v3" and sent["model"] == "gpt-4o"
    assert sent["prompt_cache_retention"] == "24h"


EPHEMERAL = {"type": "ephemeral"}
ONE_HOUR = {"type": "ephemeral", "ttl": "1h"}


@pytest.fixture
def claude(make_app):
    with FakeUpstream(default=anthropic_answer) as fake:
        app = make_app([{"name": "claude", "type": "anthropic", "base_url": fake.url,
                         "models": ["claude-*"]}], auth=AUTH)
        yield app, fake
    schema = pydantic.TypeAdapter(MessageCreateParamsNonStreaming)
    for recorded in fake.requests:
        if not recorded.json().get("stream"):
            checked_body(recorded, {False: schema})  # what we sent is a valid Messages call


def test_anthropic_cache_control_reaches_the_upstream_on_system_messages_and_tools(claude):
    app, fake = claude
    body = {"model": "claude-sonnet-4-5", "messages": [
        {"role": "system", "content": [
            {"type": "text", "text": "You are a librarian.", "cache_control": EPHEMERAL},
            {"type": "text", "text": "Today is Monday."}]},
        {"role": "user", "content": [
            {"type": "text", "text": "The whole book...", "cache_control": ONE_HOUR}]},
        {"role": "assistant", "content": "Read it."},
        {"role": "user", "content": "Summarize chapter 1.", "cache_control": EPHEMERAL}],
        "tools": [{"type": "function", "cache_control": EPHEMERAL, "function": {
            "name": "lookup", "parameters": {"type": "object", "properties": {}}}}]}
    response = post(app, body)
    assert response.status_code == 200
    sent = fake.requests[-1].json()
    assert sent["system"] == [
        {"type": "text", "text": "You are a librarian.", "cache_control": EPHEMERAL},
        {"type": "text", "text": "Today is Monday."}]
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "The whole book...", "cache_control": ONE_HOUR}]
    assert sent["messages"][1]["content"] == "Read it."
    assert sent["messages"][2]["content"] == [
        {"type": "text", "text": "Summarize chapter 1.", "cache_control": EPHEMERAL}]
    assert sent["tools"][0]["cache_control"] == EPHEMERAL


def test_without_cache_control_the_anthropic_call_is_as_before(claude):
    app, fake = claude
    post(app, {"model": "claude-sonnet-4-5", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text",
                                                                       "text": "B"}]},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    sent = fake.requests[-1].json()
    assert sent["system"] == "A\nB" and sent["messages"][0]["content"] == "hi"


def test_anthropic_cached_and_written_tokens_are_priced_at_their_rates(claude):
    app, fake = claude
    fake.script(reply(message("Hi", model="claude-sonnet-4-5", input_tokens=100,
                              output_tokens=50, cache_read_input_tokens=2000,
                              cache_creation_input_tokens=1000)))
    response = post(app, chat("claude-sonnet-4-5"))
    expected = (100 * 3.00 + 2000 * 0.30 + 1000 * 3.75 + 50 * 15.00) / M
    assert float(response.headers["X-Proxy-Cost-USD"]) == pytest.approx(expected, abs=1e-8)


def test_an_anthropic_stream_is_priced_with_its_cache_reads(claude, access_lines):
    app, fake = claude
    msg = message("Hello there", model="claude-haiku-4-5", input_tokens=100, output_tokens=40)
    events = stream_events(msg)
    start = json.loads(events[0].split(b"data: ", 1)[1])
    start["message"]["usage"].update(cache_read_input_tokens=5000)
    fake.script(Stream([sse(start), *events[1:]]))
    post(app, chat("claude-haiku-4-5", stream=True, stream_options={"include_usage": True}))
    (line,) = access_lines()
    expected = (100 * 1.00 + 5000 * 0.10 + 40 * 5.00) / M
    assert line["cost_usd"] == pytest.approx(expected)
