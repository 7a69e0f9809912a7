"""The Anthropic Messages front end: the anthropic SDK and Claude Code's own requests through a
live proxy, to an Anthropic upstream (passed through as it is), an OpenAI-type upstream and the
mock (translated to Chat Completions and back), with Anthropic's errors and events."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import anthropic
import pytest
import requests
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from app import create_app
from settings import load_settings
from tests.anthropic_upstream import (COUNTED_TOKENS, anthropic_answer, error_event, error_reply,
                                      message, reply, stream_events)
from tests.conftest import FakeClock, live_server, provider
from tests.upstream import FakeUpstream, Reply, Stream, chat_chunks, chat_completion

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "claude_code_turn.json").read_text())
KEY_VAR = "LLM_PROXY_TEST_ANTHROPIC_KEY"
UPSTREAM_KEY = "sk-ant-upstream-0123456789"  # the proxy's key for its Anthropic provider
OPENAI_KEY_VAR = "LLM_PROXY_TEST_OPENAI_KEY"
OPENAI_KEY = "sk-openai-upstream-0123456789"
CLIENT_KEY = "sk-proxy-client-0123456789abcdef"  # what clients present to the proxy
AUTH = {"api_keys": [{"id": "team-a", "sha256": hashlib.sha256(CLIENT_KEY.encode()).hexdigest()}]}
MODEL = "claude-test"
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
HI = [{"role": "user", "content": "hi"}]
BACKENDS = ("anthropic", "openai", "mock")


@pytest.fixture(autouse=True)
def upstream_keys(monkeypatch):
    monkeypatch.setenv(KEY_VAR, UPSTREAM_KEY)
    monkeypatch.setenv(OPENAI_KEY_VAR, OPENAI_KEY)


@pytest.fixture
def claude():
    """A fake Anthropic upstream."""
    with FakeUpstream(default=anthropic_answer) as fake:
        yield fake


def claude_provider(url, name="claude", **fields):
    return {"name": name, "type": "anthropic", "base_url": url, "api_key_env": KEY_VAR,
            "models": [MODEL], **fields}


def openai_provider(url, models=(MODEL,), **fields):
    return provider(url, models=models, api_key_env=OPENAI_KEY_VAR, **fields)


MOCK = {"name": "mock", "type": "mock", "models": ["mock-model", "*"]}


@pytest.fixture
def backend(request, make_app, claude, upstream):
    """(app, the fake upstream or None) for the provider type in ``request.param``."""
    kind = request.param
    sections = {"auth": AUTH}
    if kind == "anthropic":
        return make_app([claude_provider(claude.url)], **sections), claude
    if kind == "openai":
        return make_app([openai_provider(upstream.url)], **sections), upstream
    return make_app([MOCK], **sections), None


def sdk(url, **options) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=CLIENT_KEY, max_retries=0, timeout=10,
                               **options)


def events_of(raw: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of each SSE event; keep-alive comments skipped."""
    found = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            fields = dict(line.split(": ", 1) for line in lines)
            found.append((fields["event"], json.loads(fields["data"])))
    return found


def posts(fake) -> list:
    """The calls a fake upstream got, without the model discovery's GETs."""
    return [r for r in fake.requests if r.method == "POST"]


def tool_call_answer(model, arguments='{"city": "Paris"}', text=None):
    answer = chat_completion(model, text)
    answer["choices"][0]["message"]["tool_calls"] = [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": arguments}}]
    answer["choices"][0]["finish_reason"] = "tool_calls"
    return answer


# --- the anthropic SDK, for each provider type -------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_the_sdk_creates_a_message(backend):
    app, _ = backend
    with live_server(app) as url:
        answer = sdk(url).messages.create(model=MODEL, max_tokens=64, messages=HI)
    assert answer.type == "message" and answer.role == "assistant"
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].type == "text" and answer.content[0].text
    assert answer.usage.input_tokens > 0 and answer.usage.output_tokens > 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_the_sdk_streams_a_message(backend):
    app, _ = backend
    with live_server(app) as url:
        with sdk(url).messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_the_sdk_counts_tokens_at_anthropic_or_estimates_them(backend):
    app, fake = backend
    with live_server(app) as url:
        counted = sdk(url).messages.count_tokens(model=MODEL, messages=[
            {"role": "user", "content": "a question of about forty characters..."}])
    if fake is not None and fake.default is anthropic_answer:
        assert counted.input_tokens == COUNTED_TOKENS
        assert fake.requests[-1].path == "/v1/messages/count_tokens"
    else:
        assert counted.input_tokens == 10  # four characters a token


@pytest.mark.parametrize("backend", ("anthropic", "openai"), indirect=True)
def test_a_tool_round_trip_through_the_sdk(backend):
    app, fake = backend
    if fake.default is anthropic_answer:
        fake.script(reply(message(("toolu_1", "get_weather", {"city": "Paris"}),
                                  stop_reason="tool_use")))
    else:
        fake.script(Reply(body=tool_call_answer(MODEL)))
    with live_server(app) as url:
        client = sdk(url)
        first = client.messages.create(model=MODEL, max_tokens=64, messages=HI, tools=[WEATHER])
        assert first.stop_reason == "tool_use"
        (use,) = [b for b in first.content if b.type == "tool_use"]
        assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
        second = client.messages.create(model=MODEL, max_tokens=64, tools=[WEATHER], messages=[
            *HI, {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                          "content": "18 degrees"}]}])
    assert second.stop_reason == "end_turn" and second.content[0].text
    sent = fake.requests[-1].json()
    if fake.default is anthropic_answer:  # as the SDK sent it
        assert sent["messages"][-1]["content"][0]["tool_use_id"] == use.id
    else:
        assert sent["messages"][-2]["tool_calls"][0]["function"] == {
            "name": "get_weather", "arguments": '{"city":"Paris"}'}
        assert sent["messages"][-1] == {"role": "tool", "tool_call_id": use.id,
                                        "content": "18 degrees"}


def test_a_fresh_proxy_serves_claude_codes_model_names_from_the_mock(tmp_path, monkeypatch):
    """No config, no provider key: the mock answers any model name, so Claude Code's default
    model works on a fresh ``make run``."""
    monkeypatch.chdir(tmp_path)
    app = create_app(load_settings({"DATABASE_ENABLED": "false"}))
    try:
        with live_server(app) as url:
            client = sdk(url)
            answer = client.messages.create(model="claude-opus-4-8", max_tokens=64, messages=HI)
            with client.messages.stream(model="claude-haiku-4-5", max_tokens=64,
                                        messages=HI) as stream:
                streamed = stream.get_final_message()
    finally:
        app.extensions["llm_proxy"].close()
    assert answer.content[0].text == "This is the mock provider answering: hi"
    assert answer.model == "claude-opus-4-8"
    assert streamed.content[0].text == answer.content[0].text


# --- Claude Code's own requests replayed -------------------------------------------------------

def replay(url, turn, key=CLIENT_KEY, **changes):
    headers = {**FIXTURE["headers"], "x-api-key": key}
    return requests.post(url + FIXTURE["path"], json={**FIXTURE[turn], **changes},
                         headers=headers, timeout=10)


def test_claude_codes_turn_reaches_anthropic_byte_for_byte_with_its_headers_and_our_key(
        make_app, claude):
    app = make_app([claude_provider(claude.url, models=["claude-*"])], auth=AUTH)
    raw = json.dumps(FIXTURE["first_turn"], indent=2).encode()  # spacing no re-encoding keeps
    headers = {**FIXTURE["headers"], "x-api-key": CLIENT_KEY, "content-type": "application/json"}
    with live_server(app) as url:
        answer = requests.post(url + FIXTURE["path"], data=raw, headers=headers, timeout=10)
    assert answer.status_code == 200
    assert [name for name, _ in events_of(answer.content)][-1] == "message_stop"
    (seen,) = posts(claude)  # besides the model discovery's GET of the pattern's models
    assert seen.path == "/v1/messages" and seen.body == raw
    assert seen.headers["anthropic-beta"] == FIXTURE["headers"]["anthropic-beta"]
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["x-api-key"] == UPSTREAM_KEY
    assert CLIENT_KEY not in json.dumps(seen.headers) and "Authorization" not in seen.headers
    assert "x-app" not in {k.lower() for k in seen.headers}  # nothing else of the client's


def test_an_alias_re_encodes_the_body_with_the_providers_model_name(make_app, claude):
    app = make_app([claude_provider(claude.url, models=[], aliases={"fast": "claude-haiku-4-5"})])
    with live_server(app) as url:
        answer = sdk(url).messages.create(model="fast", max_tokens=64, messages=HI)
    assert answer.content[0].text == "Hello from Claude"
    assert claude.requests[0].json() == {"model": "claude-haiku-4-5", "max_tokens": 64,
                                         "messages": HI}


def test_claude_codes_turn_is_one_chat_call_with_what_chat_can_take(make_app, upstream):
    app = make_app([openai_provider(upstream.url, models=["claude-*"])], auth=AUTH)
    turn = FIXTURE["first_turn"]
    with live_server(app) as url:
        answer = replay(url, "first_turn")
    names = [name for name, _ in events_of(answer.content)]
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith(
        "text/event-stream")
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                     "content_block_stop", "message_delta", "message_stop"]
    (seen,) = posts(upstream)
    chat = seen.json()
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert CLIENT_KEY not in json.dumps(seen.headers) and "anthropic-beta" not in seen.headers
    system = "\n\n".join(block["text"] for block in turn["system"])
    assert chat["messages"] == [
        {"role": "system", "content": system},
        {"role": "user", "content": "\n".join(b["text"] for b in turn["messages"][0]["content"])},
        turn["messages"][1]]  # the system message mid-conversation, as it is
    assert len(chat["tools"]) == 12 and all(t["type"] == "function" for t in chat["tools"])
    read = next(t["function"] for t in chat["tools"] if t["function"]["name"] == "Read")
    assert "$schema" not in read["parameters"] and read["parameters"]["required"] == ["file_path"]
    assert "defer_loading" not in json.dumps(chat["tools"])
    for dropped in ("thinking", "context_management", "output_config", "metadata", "system"):
        assert dropped not in chat
    assert chat["reasoning_effort"] == "high" and chat["user"] == turn["metadata"]["user_id"]
    assert chat["max_tokens"] == turn["max_tokens"] and chat["stream"] is True


def test_a_tool_loop_turn_becomes_tool_calls_and_tool_messages(make_app, upstream):
    app = make_app([openai_provider(upstream.url, models=["claude-*"])], auth=AUTH)
    with live_server(app) as url:
        answer = replay(url, "tool_turn", stream=False)
    assert answer.status_code == 200 and answer.json()["content"][0]["type"] == "text"
    chat = posts(upstream)[0].json()["messages"]
    assert [m["role"] for m in chat] == ["system", "user", "system", "assistant", "tool",
                                         "assistant", "tool"]
    assert chat[3] == {"role": "assistant", "content": "I'll read the file.", "tool_calls": [
        {"id": "toolu_01A", "type": "function",
         "function": {"name": "Read", "arguments": '{"file_path":"/tmp/notes.txt"}'}}]}
    assert chat[4] == {"role": "tool", "tool_call_id": "toolu_01A",
                       "content": "Error: <tool_use_error>File does not exist.</tool_use_error>"}
    assert chat[5]["content"] is None and chat[5]["tool_calls"][0]["function"]["name"] == "Bash"
    assert chat[6] == {"role": "tool", "tool_call_id": "toolu_01B", "content": "3 /tmp/notes.txt"}


def test_claude_codes_turns_are_answered_by_the_mock(make_app):
    app = make_app([MOCK], auth=AUTH)
    with live_server(app) as url:
        first = replay(url, "first_turn")
        tools = replay(url, "tool_turn")
    for answer in (first, tools):
        events = events_of(answer.content)
        assert answer.status_code == 200 and events[-1][0] == "message_stop"
        assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert "3 /tmp/notes.txt" in "".join(
        data["delta"].get("text", "") for name, data in events_of(tools.content)
        if name == "content_block_delta")


# --- the pass-through to Anthropic -------------------------------------------------------------

def test_a_native_stream_is_relayed_event_by_event_unchanged(make_app, claude):
    upstream_events = stream_events(message("Hello there", ("toolu_1", "get_weather",
                                                            {"city": "Paris"}),
                                            stop_reason="tool_use"))
    claude.script(Stream(upstream_events))
    app = make_app([claude_provider(claude.url)])
    with live_server(app) as url:
        answer = requests.post(url + "/v1/messages", json={
            "model": MODEL, "max_tokens": 64, "messages": HI, "stream": True}, timeout=10)
    assert answer.content == b"".join(event + b"\n\n" for event in upstream_events)


def test_a_whole_message_where_a_stream_was_asked_arrives_as_events(make_app, claude):
    claude.script(reply(message("Hello", ("toolu_1", "get_weather", {"city": "Paris"}),
                                stop_reason="tool_use")))
    app = make_app([claude_provider(claude.url)])
    with live_server(app) as url:
        with sdk(url).messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
            final = stream.get_final_message()
    assert final.content[0].text == "Hello" and final.content[1].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 5


def test_an_upstream_refusal_is_relayed_in_anthropics_envelope(make_app, claude):
    claude.script(error_reply(400, "invalid_request_error", "max_tokens: 999999 > 64000"))
    app = make_app([claude_provider(claude.url)])
    with live_server(app) as url:
        with pytest.raises(anthropic.BadRequestError) as caught:
            sdk(url).messages.create(model=MODEL, max_tokens=999999, messages=HI)
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"] == {"type": "invalid_request_error",
                                          "message": "max_tokens: 999999 > 64000"}


def test_an_error_event_mid_stream_ends_the_stream_with_anthropics_error_event(make_app,
                                                                              claude):
    started = stream_events(message("Hello there"))[:4]  # start, ping, block start, a delta
    claude.script(Stream(started + [error_event("overloaded_error", "Overloaded")]))
    app = make_app([claude_provider(claude.url)])
    with live_server(app) as url:
        answer = requests.post(url + "/v1/messages", json={
            "model": MODEL, "max_tokens": 64, "messages": HI, "stream": True}, timeout=10)
        claude.script(Stream(started + [error_event("overloaded_error", "Overloaded")]))
        with sdk(url).messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
            with pytest.raises(anthropic.APIStatusError) as caught:
                stream.get_final_message()
    events = events_of(answer.content)
    assert [name for name, _ in events][:3] == ["message_start", "ping", "content_block_start"]
    name, data = events[-1]
    assert name == "error" and data["type"] == "error"
    assert data["error"]["type"] == "overloaded_error"
    assert "Overloaded" in data["error"]["message"]
    assert caught.value.body["error"]["type"] == "overloaded_error"


def test_an_error_right_after_message_start_falls_back_to_the_next_provider(make_app, claude):
    with FakeUpstream(default=anthropic_answer) as second:
        start = stream_events(message("never"))[:2]
        claude.script(Stream(start + [error_event("overloaded_error", "Overloaded")]))
        app = make_app([claude_provider(claude.url, priority=1),
                        claude_provider(second.url, name="claude-b", priority=2)])
        with live_server(app) as url:
            answer = requests.post(url + "/v1/messages", json={
                "model": MODEL, "max_tokens": 64, "messages": HI, "stream": True}, timeout=10)
    events = events_of(answer.content)
    assert answer.headers["X-Proxy-Provider"] == "claude-b"
    assert [name for name, _ in events].count("message_start") == 1
    assert "".join(data["delta"].get("text", "") for name, data in events
                   if name == "content_block_delta") == "Hello from Claude"


def test_a_stream_charges_its_usage_to_a_token_limited_key(make_app, claude):
    counts = message("Hello", input_tokens=1000, output_tokens=500)
    claude.script(Stream(stream_events(counts)))
    auth = {"api_keys": [{**AUTH["api_keys"][0], "tokens_per_minute": 10000}]}
    app = make_app([claude_provider(claude.url)], clock=FakeClock(), auth=auth)
    with live_server(app) as url:
        with sdk(url).messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
            stream.get_final_message()
        after = requests.post(url + "/v1/messages/count_tokens", json={
            "model": MODEL, "messages": HI}, headers={"x-api-key": CLIENT_KEY}, timeout=10)
    assert after.headers["X-RateLimit-Remaining-Tokens"] == "8500"  # 10,000 less 1,500


def test_a_whole_answer_carries_its_cost(make_app, claude):
    claude.script(reply(message("Hello", model="claude-sonnet-4-5", input_tokens=1000,
                                output_tokens=100, cache_read_input_tokens=800)))
    app = make_app([claude_provider(claude.url, models=["claude-sonnet-4-5"])])
    with live_server(app) as url:
        answer = requests.post(url + "/v1/messages", json={
            "model": "claude-sonnet-4-5", "max_tokens": 64, "messages": HI}, timeout=10)
    # Sonnet 4.5: $3 in, $15 out, $0.30 a cache read, per million tokens
    expected = (1000 * 3.00 + 800 * 0.30 + 100 * 15.00) / 1e6
    assert float(answer.headers["X-Proxy-Cost-USD"]) == pytest.approx(expected, abs=1e-8)


# --- translated to Chat Completions ------------------------------------------------------------

def test_streamed_tool_calls_arrive_as_input_json_deltas(make_app, upstream):
    base = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1, "model": MODEL}

    def chunk(delta, finish=None):
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    upstream.script(Stream([
        chunk({"role": "assistant", "content": "Let me look."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                               "function": {"name": "get_weather",
                                            "arguments": '{"city": "Oslo"}'}}]}),
        chunk({}, "tool_calls"),
        {**base, "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 20,
                                          "total_tokens": 50,
                                          "prompt_tokens_details": {"cached_tokens": 10}}},
        b"[DONE]"]))
    app = make_app([openai_provider(upstream.url)])
    with live_server(app) as url:
        with sdk(url).messages.stream(model=MODEL, max_tokens=64, messages=HI,
                                      tools=[WEATHER]) as stream:
            final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == "Let me look."
    assert [(b.id, b.input) for b in final.content[1:]] == [("call_1", {"city": "Paris"}),
                                                           ("call_2", {"city": "Oslo"})]
    assert final.stop_reason == "tool_use" and final.id == "msg_7"
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens,
            final.usage.output_tokens) == (20, 10, 20)


@pytest.mark.parametrize("finish, stop", [("stop", "end_turn"), ("length", "max_tokens"),
                                          ("content_filter", "refusal")])
def test_finish_reasons_become_stop_reasons(make_app, upstream, finish, stop):
    answer = chat_completion(MODEL, "Hello")
    answer["choices"][0]["finish_reason"] = finish
    upstream.script(Reply(body=answer))
    app = make_app([openai_provider(upstream.url)])
    with live_server(app) as url:
        message_ = sdk(url).messages.create(model=MODEL, max_tokens=64, messages=HI)
    assert message_.stop_reason == stop and message_.stop_sequence is None


def test_a_stop_sequence_the_upstream_names_is_the_stop_reason(make_app, upstream):
    answer = chat_completion(MODEL, "Hello")
    answer["choices"][0]["stop_reason"] = "END"  # vLLM says which stop string matched
    upstream.script(Reply(body=answer))
    app = make_app([openai_provider(upstream.url)])
    with live_server(app) as url:
        message_ = sdk(url).messages.create(model=MODEL, max_tokens=64, messages=HI,
                                            stop_sequences=["END"])
    assert (message_.stop_reason, message_.stop_sequence) == ("stop_sequence", "END")
    assert upstream.requests[0].json()["stop"] == ["END"]


def test_request_parameters_are_translated_and_what_chat_lacks_is_dropped(make_app, upstream):
    app = make_app([openai_provider(upstream.url)])
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
    with live_server(app) as url:
        sdk(url).messages.create(
            model=MODEL, max_tokens=64, extra_body={"temperature": 0.5, "top_k": 5},
            system="Be brief.",
            tools=[WEATHER, {"type": "web_search_20250305", "name": "web_search"}],
            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": png}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
                {"type": "text", "text": "What is this?"}]}])
    chat = upstream.requests[0].json()
    assert chat["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
        {"type": "text", "text": "What is this?"}]}]
    assert [t["function"]["name"] for t in chat["tools"]] == ["get_weather"]  # server tool out
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False and chat["temperature"] == 0.5
    assert "top_k" not in chat


def test_a_chat_stream_that_breaks_ends_with_anthropics_error_event(make_app, upstream):
    upstream.script(Stream(chat_chunks(MODEL, ["Hello", " there", " again"]), cut_after=2))
    app = make_app([openai_provider(upstream.url)])
    with live_server(app) as url:
        answer = requests.post(url + "/v1/messages", json={
            "model": MODEL, "max_tokens": 64, "messages": HI, "stream": True}, timeout=10)
    events = events_of(answer.content)
    assert events[0][0] == "message_start"
    name, data = events[-1]
    assert name == "error" and data == {"type": "error", "error": {
        "type": "api_error", "message": data["error"]["message"]}}
    assert "broke off" in data["error"]["message"]


def test_broken_tool_arguments_are_a_provider_failure_not_a_broken_message(make_app, upstream):
    upstream.script(Reply(body=tool_call_answer(MODEL, arguments='{"city": ')))
    app = make_app([openai_provider(upstream.url)])
    with live_server(app) as url:
        answer = requests.post(url + "/v1/messages", json={
            "model": MODEL, "max_tokens": 64, "messages": HI}, timeout=10)
    assert answer.status_code == 502 and answer.json()["error"]["type"] == "api_error"


# --- errors in Anthropic's envelope ------------------------------------------------------------

def envelope(answer, status, kind):
    """The Anthropic error in an answer (of requests or of the test client)."""
    body = json.loads(answer.get_data() if hasattr(answer, "get_data") else answer.content)
    assert answer.status_code == status, body
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def test_a_malformed_body_is_a_400_in_anthropics_envelope(make_app):
    app = make_app([MOCK])
    client = app.test_client()
    missing = client.post("/v1/messages", json={"model": MODEL, "messages": HI})
    assert envelope(missing, 400, "invalid_request_error")["error"]["message"] == \
        "max_tokens: Field required"
    bad_role = client.post("/v1/messages", json={"model": MODEL, "max_tokens": 5,
                                                 "messages": [{"role": "robot", "content": "x"}]})
    envelope(bad_role, 400, "invalid_request_error")
    not_json = client.post("/v1/messages", data=b"{oops")
    assert envelope(not_json, 400, "invalid_request_error")["request_id"] == \
        not_json.headers["X-Request-ID"]


def test_a_bad_key_is_a_401_in_anthropics_envelope_from_the_server_and_the_app(make_app):
    app = make_app([MOCK], auth=AUTH)
    body = {"model": MODEL, "max_tokens": 5, "messages": HI}
    with live_server(app) as url:  # refused at the header stage, before the body is read
        refused = requests.post(url + "/v1/messages", json=body,
                                headers={"x-api-key": "sk-wrong"}, timeout=10)
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=url, api_key="sk-wrong", max_retries=0).messages.create(
                **body)
    envelope(refused, 401, "authentication_error")
    bodiless = app.test_client().post("/v1/messages", headers={"x-api-key": "sk-wrong"})
    envelope(bodiless, 401, "authentication_error")


def test_a_body_over_the_limit_is_a_413_in_anthropics_envelope(make_app):
    app = make_app([MOCK], server={"max_request_body_mb": 0.01})
    with live_server(app) as url:
        refused = requests.post(url + "/v1/messages", json={
            "model": MODEL, "max_tokens": 5,
            "messages": [{"role": "user", "content": "x" * 20000}]}, timeout=10)
    envelope(refused, 413, "request_too_large")


def test_an_unknown_model_is_a_404_and_a_forbidden_one_a_403(make_app, claude):
    auth = {"api_keys": [{**AUTH["api_keys"][0], "models": ["claude-test"]}]}
    app = make_app([claude_provider(claude.url, models=["claude-*"])], auth=auth)
    with live_server(app) as url:
        with pytest.raises(anthropic.PermissionDeniedError) as forbidden:
            sdk(url).messages.create(model="claude-other", max_tokens=5, messages=HI)
    assert forbidden.value.body["error"]["type"] == "permission_error"
    app = make_app([claude_provider(claude.url)])
    with live_server(app) as url:
        with pytest.raises(anthropic.NotFoundError) as unknown:
            sdk(url).messages.create(model="gpt-nothing", max_tokens=5, messages=HI)
        with pytest.raises(anthropic.NotFoundError):
            sdk(url).messages.count_tokens(model="gpt-nothing", messages=HI)
    assert unknown.value.body["error"]["type"] == "not_found_error"
    assert posts(claude) == []


def test_a_key_over_its_rate_limit_gets_a_429_in_anthropics_envelope(make_app):
    auth = {"api_keys": [{**AUTH["api_keys"][0], "requests_per_minute": 1}]}
    app = make_app([MOCK], clock=FakeClock(), auth=auth)
    with live_server(app) as url:
        sdk(url).messages.create(model=MODEL, max_tokens=5, messages=HI)
        with pytest.raises(anthropic.RateLimitError) as caught:
            sdk(url).messages.create(model=MODEL, max_tokens=5, messages=HI)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert caught.value.response.headers["Retry-After"]


def test_no_provider_available_is_a_529_overloaded(make_app):
    app = make_app([{"name": "on", "type": "mock", "models": ["mock-model"]},
                    {"name": "off", "type": "mock", "models": ["claude-off"], "enabled": False}])
    answer = app.test_client().post("/v1/messages", json={
        "model": "claude-off", "max_tokens": 5, "messages": HI})
    envelope(answer, 529, "overloaded_error")
    assert answer.headers["Retry-After"]


def test_the_proxy_at_its_limit_answers_529_overloaded(make_app, claude):
    gate = threading.Event()
    events = stream_events(message("Hello there"))
    # the first write holds the events up to the first content, which the proxy sends on: the
    # stream has begun, and is held open till the gate opens
    claude.script(Stream([b"\n\n".join(events[:3]), *events[3:]], gate=gate))
    app = make_app([claude_provider(claude.url)], routing={"max_in_flight": 1})
    body = {"model": MODEL, "max_tokens": 5, "messages": HI}
    with live_server(app) as url:
        held = requests.post(url + "/v1/messages", json={**body, "stream": True}, stream=True,
                             timeout=10)
        try:
            with pytest.raises(anthropic.APIStatusError) as caught:
                sdk(url).messages.create(**body)
        finally:
            gate.set()
            held.content
            held.close()
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"


# --- the rest of the surface -------------------------------------------------------------------

def test_head_root_answers_200_even_where_keys_are_required(make_app):
    app = make_app([MOCK], auth={**AUTH, "api_keys_required": True})
    with live_server(app) as url:
        assert requests.head(url + "/", timeout=10).status_code == 200
        assert requests.get(url + "/v1/models", timeout=10).status_code == 401


def test_the_model_list_is_anthropics_for_an_anthropic_client(make_app, claude):
    app = make_app([claude_provider(claude.url, models=["claude-test", "claude-b"])])
    with live_server(app) as url:
        listed = list(sdk(url).models.list())
        plain = requests.get(url + "/v1/models", timeout=10).json()
    assert [(m.type, m.id, m.display_name) for m in listed] == [
        ("model", "claude-b", "claude-b"), ("model", "claude-test", "claude-test")]
    assert listed[0].created_at.year == 1970  # unknown: the epoch
    assert plain["object"] == "list" and plain["data"][0]["object"] == "model"


def test_a_whole_answer_is_cached_in_anthropics_shape(make_app, claude):
    app = make_app([claude_provider(claude.url)], cache={"enabled": True})
    body = {"model": MODEL, "max_tokens": 5, "messages": HI}
    with live_server(app) as url:
        first = requests.post(url + "/v1/messages", json=body, timeout=10)
        second = requests.post(url + "/v1/messages", json=body, timeout=10)
    assert second.headers["X-Cache"] == "HIT" and second.json() == first.json()
    assert claude.calls == 1


def test_other_methods_and_paths_under_messages_answer_in_anthropics_envelope(make_app):
    client = make_app([MOCK]).test_client()
    wrong = client.get("/v1/messages")
    envelope(wrong, 405, "invalid_request_error")
    assert wrong.headers["Allow"] == "POST"
    envelope(client.post("/v1/messages/batches", json={}), 404, "not_found_error")


# --- hostile bodies ----------------------------------------------------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    max_size=12)
_values = st.recursive(_scalars, lambda children: st.lists(children, max_size=3) | st.dictionaries(
    st.sampled_from(["type", "text", "source", "data", "url", "media_type", "content", "id",
                     "name", "input", "tool_use_id", "is_error", "x"]), children, max_size=4),
    max_leaves=12)
_text = st.text(max_size=8)
_source = st.fixed_dictionaries({"type": st.sampled_from(["base64", "url", "text", "file"])},
                                optional={"media_type": _text, "data": _values, "url": _values})
_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(_text, _values)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "document"]), "source": _source}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": _text, "name": _text,
                           "input": _values}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": _text},
                          optional={"content": st.one_of(_text, st.lists(_values, max_size=2)),
                                    "is_error": _values}),
    st.fixed_dictionaries({"type": st.sampled_from(["thinking", "web_search_tool_result",
                                                    "mystery"])}),
    _values)
_blocks = st.lists(_block, max_size=3)
_mostly = lambda good, bad: st.one_of(good, good, good, bad)  # noqa: E731
_messages_bodies = st.fixed_dictionaries({
    "model": _mostly(st.just("m"), st.sampled_from(["", 5])),
    "max_tokens": _mostly(st.just(5), st.sampled_from([0, "5", None])),
    "messages": st.lists(st.fixed_dictionaries({
        "role": _mostly(st.sampled_from(["user", "assistant", "system"]), st.just("x")),
        "content": _mostly(st.one_of(_text, _blocks), _values)}), min_size=1, max_size=3)},
    optional={
    "system": st.one_of(_text, _blocks),
    "tools": st.lists(st.one_of(st.fixed_dictionaries(
        {"name": _text}, optional={"input_schema": _values, "type": _values,
                                   "description": _values}), _values), max_size=2),
    "tool_choice": st.one_of(st.fixed_dictionaries(
        {"type": st.sampled_from(["auto", "any", "tool", "none", "x"])},
        optional={"name": _values, "disable_parallel_tool_use": _values}), _values),
    "stop_sequences": st.one_of(st.lists(_text, max_size=2), _values),
    "stream": st.booleans(), "metadata": _values, "output_config": _values,
    "temperature": _values})


@pytest.fixture(scope="module")
def fuzz_app():
    from tests.conftest import settings_of
    app = create_app(settings_of({"providers": [MOCK]}))
    yield app
    app.extensions["llm_proxy"].close()


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@hsettings(max_examples=300, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(_messages_bodies.map(lambda v: json.dumps(v).encode()),
                      _values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=100)))
def test_arbitrary_bodies_never_cause_a_500_or_an_error_outside_the_envelope(fuzz_app, path,
                                                                            body):
    response = fuzz_app.test_client().post(path, data=body)
    data = response.get_data()
    response.close()
    assert response.status_code < 500, data
    if response.status_code >= 400:
        answer = json.loads(data)
        assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}
    elif response.mimetype == "text/event-stream":
        assert events_of(data)[-1][0] == "message_stop"


def test_a_listed_model_with_an_impossible_date_is_listed_at_the_epoch(make_app, claude):
    """An upstream's model list is its own: a ``created`` past any date is no 500."""
    claude.default = lambda recorded: (
        Reply(body={"data": [{"id": "claude-x", "created": 10 ** 17}], "has_more": False})
        if recorded.path.startswith("/v1/models") else anthropic_answer(recorded))
    app = make_app([claude_provider(claude.url, models=["claude-*"])])
    assert app.extensions["llm_proxy"].discovery.wait_for_round(1, timeout=5)
    listed = app.test_client().get("/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert listed.status_code == 200
    assert listed.get_json()["data"] == [{"type": "model", "id": "claude-x",
                                          "display_name": "claude-x",
                                          "created_at": "1970-01-01T00:00:00Z"}]


def test_events_without_an_event_line_get_one(make_app, claude):
    """The anthropic SDK skips an event without its ``event:`` line: an upstream that sends
    only ``data:`` lines has the event's type written in."""
    data_only = [event.split(b"\n", 1)[1].removeprefix(b"data: ")
                 for event in stream_events(message("Hello there"))]
    claude.script(Stream(data_only))
    app = make_app([claude_provider(claude.url)])
    with live_server(app) as url:
        with sdk(url).messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
            final = stream.get_final_message()
    assert final.content[0].text == "Hello there" and final.stop_reason == "end_turn"
