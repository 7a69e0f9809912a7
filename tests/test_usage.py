"""Every token of a request counted: streams from every kind of provider (the upstream's usage
whether or not the client asked for it, an estimate where the upstream gave none), Anthropic's
cache counts, answers assembled from cached streams, and condensation's summary call."""

from __future__ import annotations

import json

import openai
import pytest

from app.cache.condense import Condenser
from tests.anthropic_upstream import message, reply, sse, stream_events
from tests.conftest import FakeClock, live_server, provider
from tests.upstream import FakeUpstream, Reply, Stream, chat_chunks, chat_completion

MESSAGES = [{"role": "user", "content": "hi"}]
STREAM = {"model": "gpt-test", "stream": True, "messages": MESSAGES}
USAGE = {"prompt_tokens": 41, "completion_tokens": 3, "total_tokens": 44}


def usage_chunk(model, usage):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [], "usage": usage}


def openai_with_usage(usage=USAGE):
    """A fake OpenAI that adds the usage chunk when asked ``include_usage``, as OpenAI does."""
    def answer(recorded):
        body = recorded.json()
        chunks = chat_chunks(body["model"], ["Hello", " from", " upstream"])
        if (body.get("stream_options") or {}).get("include_usage") is True:
            chunks = chunks[:-1] + [usage_chunk(body["model"], usage), b"[DONE]"]
        return Stream(chunks)
    return answer


def post(app, body, *, raw=None, path="/v1/chat/completions"):
    """POST and read the whole answer; closing it ends the request (settled, logged)."""
    data = raw if raw is not None else json.dumps(body).encode()
    response = app.test_client().post(path, data=data, content_type="application/json")
    response.get_data()
    response.close()
    return response


def chunks_of(response) -> list[dict]:
    return [json.loads(e[len(b"data: "):]) for e in response.get_data().split(b"\n\n")
            if e.startswith(b"data: {")]


def text_of(chunks) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.fixture
def logged(capsys):
    """The access log's entries since the test began."""
    capsys.readouterr()
    return lambda: [json.loads(line) for line in capsys.readouterr().out.splitlines()
                    if line.startswith("{")]


# -- OpenAI-type upstreams --------------------------------------------------------------------

@pytest.mark.parametrize("options", [None, {"include_usage": False}, {"include_usage": True}],
                         ids=["not-asked", "asked-false", "asked"])
def test_a_stream_is_charged_the_upstreams_usage_and_the_client_sees_only_what_it_asked(
        make_app, upstream, logged, options):
    upstream.default = openai_with_usage()
    app = make_app([provider(upstream.url)])
    body = {**STREAM, **({"stream_options": options} if options is not None else {})}
    response = post(app, body)
    sent = upstream.requests[0].json()
    assert sent.pop("stream_options") == {"include_usage": True}  # the upstream is always asked
    assert sent == {k: v for k, v in body.items() if k != "stream_options"}
    chunks = chunks_of(response)
    asked = options == {"include_usage": True}
    assert [c["usage"] for c in chunks if "usage" in c] == ([USAGE] if asked else [])
    assert text_of(chunks) == "Hello from upstream"
    assert response.get_data().endswith(b"data: [DONE]\n\n")
    (entry,) = logged()
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (41, 3)
    assert "usage_estimated" not in entry


def test_the_clients_bytes_go_upstream_as_they_came_with_include_usage_added_if_missing(
        make_app, upstream):
    upstream.default = openai_with_usage()
    app = make_app([provider(upstream.url)])
    asked = b'{"model": "gpt-test",  "stream": true, "stream_options": {"include_usage": true},' \
            b' "messages": [{"role": "user", "content": "hi"}]}'
    not_asked = b'{"model":"gpt-test","stream":true,"messages":[{"content":"hi","role":"user"}]}\n'
    post(app, None, raw=asked)
    post(app, None, raw=not_asked)
    assert upstream.requests[0].body == asked
    assert upstream.requests[1].body == \
        not_asked.rstrip()[:-1] + b',"stream_options":{"include_usage":true}}'


def test_stream_usage_off_sends_the_clients_bytes_and_charges_an_estimate(
        make_app, upstream, logged):
    """For an upstream that refuses ``stream_options``: nothing added, the usage estimated."""
    app = make_app([provider(upstream.url, stream_usage=False)])
    raw = b'{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    post(app, None, raw=raw)
    assert upstream.requests[0].body == raw
    (entry,) = logged()
    assert entry["usage_estimated"] is True and entry["prompt_tokens"] == 5


def test_a_legacy_completion_stream_asks_for_usage_too(make_app, upstream, logged):
    def answer(recorded):
        body = recorded.json()
        assert body["stream_options"] == {"include_usage": True}
        return Stream([{"id": "cmpl-1", "object": "text_completion", "created": 1,
                        "model": "gpt-test", "choices": [{"index": 0, "text": "Hi",
                                                          "logprobs": None,
                                                          "finish_reason": "stop"}]},
                       {"id": "cmpl-1", "object": "text_completion", "created": 1,
                        "model": "gpt-test", "choices": [], "usage": USAGE}, b"[DONE]"])
    upstream.default = answer
    app = make_app([provider(upstream.url)])
    response = post(app, {"model": "gpt-test", "prompt": "Say hi", "stream": True},
                    path="/v1/completions")
    assert all("usage" not in c for c in chunks_of(response))
    (entry,) = logged()
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (41, 3)


def test_a_stream_without_usage_from_the_upstream_is_estimated_and_the_log_says_so(
        make_app, upstream, logged):
    """The fake upstream's default ignores include_usage, as some compatible servers do."""
    app = make_app([provider(upstream.url)])
    messages = [{"role": "user", "content": "x" * 400}]
    for options in ({}, {"stream_options": {"include_usage": True}}):
        response = post(app, {**STREAM, "messages": messages, **options})
        assert all("usage" not in c for c in chunks_of(response))  # none came, none made up
    for entry in logged():
        assert entry["usage_estimated"] is True
        # The prompt as condensation counts it (4 a message, 4 characters a token); the
        # answer's 19 characters ("Hello from upstream") four a token.
        assert entry["prompt_tokens"] == Condenser.estimate_tokens(messages) == 104
        assert entry["completion_tokens"] == 5


def test_a_stream_cut_before_its_usage_is_charged_an_estimate_of_what_was_relayed(
        make_app, upstream, logged):
    upstream.script(Stream(chat_chunks("gpt-test", ["x" * 40, "y" * 40, "z"]), cut_after=2))
    app = make_app([provider(upstream.url)], http_client={"retry_attempts": 0})
    response = post(app, STREAM)
    assert b'"error"' in response.get_data()
    (entry,) = logged()
    assert entry["usage_estimated"] is True
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (5, 20)


def test_a_whole_answer_without_usage_is_estimated(make_app, upstream, logged):
    answer = chat_completion("gpt-test", "Hello from upstream")
    del answer["usage"]
    upstream.script(Reply(body=answer))
    response = post(make_app([provider(upstream.url)]), {"model": "gpt-test",
                                                        "messages": MESSAGES})
    assert "usage" not in response.get_json()  # the client gets the answer as it came
    (entry,) = logged()
    assert entry["usage_estimated"] is True
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (5, 5)


# -- Anthropic ---------------------------------------------------------------------------------

CACHED = {"cache_read_input_tokens": 100, "cache_creation_input_tokens": 20}
CACHED_USAGE = {"prompt_tokens": 130, "completion_tokens": 7, "total_tokens": 137,
                "prompt_tokens_details": {"cached_tokens": 100},
                "cache_creation_input_tokens": 20}


def anthropic_stream(msg):
    """Anthropic's events for ``msg``, its cache counts in ``message_start`` as Anthropic
    sends them (the fake's own helper leaves them out)."""
    events = stream_events(msg)
    start = json.loads(events[0].split(b"data: ", 1)[1])
    start["message"]["usage"].update(CACHED)
    return [sse(start)] + events[1:]


@pytest.fixture
def claude(make_app):
    with FakeUpstream() as fake:
        app = make_app([{"name": "claude", "type": "anthropic", "base_url": fake.url,
                         "models": ["claude-test"]}])
        yield app, fake


@pytest.mark.parametrize("asked", [False, True], ids=["not-asked", "asked"])
def test_an_anthropic_stream_is_charged_with_its_cache_counts(claude, logged, asked):
    app, fake = claude
    fake.script(Stream(anthropic_stream(message("Hello from Claude", input_tokens=10,
                                                output_tokens=7))))
    options = {"stream_options": {"include_usage": True}} if asked else {}
    response = post(app, {**STREAM, "model": "claude-test", **options})
    chunks = chunks_of(response)
    assert text_of(chunks) == "Hello from Claude"
    assert [c["usage"] for c in chunks if "usage" in c] == ([CACHED_USAGE] if asked else [])
    (entry,) = logged()
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (130, 7)
    assert "usage_estimated" not in entry


def test_a_whole_anthropic_answer_maps_the_cache_counts_the_same_way(claude):
    app, fake = claude
    fake.script(reply(message("Hello", input_tokens=10, output_tokens=7, **CACHED)))
    response = post(app, {"model": "claude-test", "messages": MESSAGES})
    assert response.get_json()["usage"] == CACHED_USAGE


def test_an_anthropic_stream_cut_after_it_began_keeps_the_input_counts_it_had(claude, logged):
    app, fake = claude
    events = anthropic_stream(message("Hello from Claude", input_tokens=10, output_tokens=7))
    fake.script(Stream(events[:5], cut_after=5))  # message_start, ping, block start, 2 deltas
    post(app, {**STREAM, "model": "claude-test"})
    (entry,) = logged()
    assert entry["usage_estimated"] is True
    # The input as message_start counted it; the output estimated from "Hello from " relayed.
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (130, 3)


# -- the mock provider ----------------------------------------------------------------------------

def test_the_mock_provider_streams_the_usage_of_its_whole_answer(make_app, logged):
    app = make_app([{"name": "mock", "type": "mock", "models": ["mock-model"]}])
    body = {"model": "mock-model", "messages": MESSAGES}
    whole = post(app, body).get_json()["usage"]
    silent = chunks_of(post(app, {**body, "stream": True}))
    told = chunks_of(post(app, {**body, "stream": True,
                                "stream_options": {"include_usage": True}}))
    assert all("usage" not in c for c in silent)
    assert told[-1]["choices"] == [] and told[-1]["usage"] == whole
    for entry in logged():
        assert (entry["prompt_tokens"], entry["completion_tokens"]) == (
            whole["prompt_tokens"], whole["completion_tokens"])
        assert "usage_estimated" not in entry


# -- the limits see them -----------------------------------------------------------------------

@pytest.mark.parametrize("upstream_usage", [True, False], ids=["upstream-usage", "estimated"])
def test_a_small_tokens_per_minute_key_is_refused_once_streams_used_it_up(
        make_app, upstream, upstream_usage):
    """Each stream uses about 60 tokens (the upstream's count, or the proxy's estimate of a
    240-character prompt): a 100 tokens/min key is refused by its third stream at the latest.
    No time passes (a fake clock), so nothing refills."""
    if upstream_usage:
        upstream.default = openai_with_usage(
            {"prompt_tokens": 57, "completion_tokens": 3, "total_tokens": 60})
    app = make_app([provider(upstream.url)], clock=FakeClock(), auth={"tokens_per_minute": 100})
    body = {**STREAM, "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 220}]}
    statuses = [post(app, body).status_code for _ in range(3)]
    assert statuses[0] == 200 and 429 in statuses, statuses
    refused = post(app, body)
    assert refused.status_code == 429
    assert refused.get_json()["error"]["code"] == "rate_limit_exceeded"


# -- a cached stream, answered whole -------------------------------------------------------------

def test_an_answer_assembled_from_a_cached_stream_carries_its_usage(make_app, upstream):
    """Through the official openai package: the stream (no usage asked) is stored, and the
    whole answer served from it has the usage a fresh answer would have."""
    upstream.default = openai_with_usage()
    app = make_app([provider(upstream.url)], cache={"enabled": True})
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        chunks = list(client.chat.completions.create(model="gpt-test", messages=MESSAGES,
                                                     stream=True))
        raw = client.chat.completions.with_raw_response.create(model="gpt-test",
                                                               messages=MESSAGES)
        answer = raw.parse()
    assert all(c.usage is None for c in chunks)
    assert raw.headers["X-Cache"] == "HIT" and upstream.calls == 1
    assert answer.choices[0].message.content == "Hello from upstream"
    assert answer.usage.model_dump(exclude_none=True) == USAGE


# -- condensation's summary ----------------------------------------------------------------------

def turns(n):
    """n alternating user/assistant messages of about 100 estimated tokens each."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 400}
            for i in range(n)]


SUMMARY_USAGE = {"prompt_tokens": 1400, "completion_tokens": 100, "total_tokens": 1500}


@pytest.fixture
def condensing(make_app, upstream):
    """Condensation on, the summary asked of "summarizer"; a key of 1,000 tokens a minute."""
    def answer(recorded):
        body = recorded.json()
        if body["model"] == "summarizer":
            return Reply(body={**chat_completion("summarizer", "They talked."),
                               "usage": SUMMARY_USAGE})
        return Reply(body=chat_completion(body["model"], "Hello from upstream"))
    upstream.default = answer
    clock = FakeClock()
    app = make_app([provider(upstream.url, models=["gpt-test", "summarizer"])], clock=clock,
                   condense={"threshold_tokens": 500, "keep_last": 2, "step": 2,
                             "summary_model": "summarizer"},
                   auth={"tokens_per_minute": 1000}, http_client={"retry_attempts": 0})
    return app, clock


def chat(app, messages):
    return post(app, {"model": "gpt-test", "messages": messages, "max_tokens": 5})


def test_the_summary_call_is_charged_to_the_request_that_needed_it(condensing, upstream):
    app, _ = condensing
    first = chat(app, [{"role": "system", "content": "Be terse."}] + turns(8))
    assert first.status_code == 200 and first.headers["X-Proxy-Condensed"] == "summary"
    # 1,500 tokens of summary and 8 of answer: the key's 1,000 are spent.
    assert chat(app, MESSAGES).status_code == 429
    assert [r.json()["model"] for r in upstream.requests] == ["summarizer", "gpt-test"]


def test_a_summary_from_the_summary_cache_costs_nothing(condensing, upstream):
    app, clock = condensing
    messages = [{"role": "system", "content": "Be terse."}] + turns(8)
    assert chat(app, messages).status_code == 200
    clock.advance(120)  # the 1,508 tokens refilled: the bucket is full again
    # One message more: the summarized part is the same (step 2), its summary cached.
    again = chat(app, messages + [{"role": "user", "content": "and then?"}])
    assert again.status_code == 200 and again.headers["X-Proxy-Condensed"] == "summary"
    assert chat(app, MESSAGES).status_code == 200  # only the answers' 8 tokens were charged
    assert [r.json()["model"] for r in upstream.requests] == [
        "summarizer", "gpt-test", "gpt-test", "gpt-test"]
