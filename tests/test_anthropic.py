"""The Anthropic provider: OpenAI calls become valid Messages API calls, and answers come back
in the OpenAI shape, whole and streamed, with Anthropic's failures mapped to the proxy's."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pydantic
import pytest
from anthropic.types.message_create_params import (MessageCreateParamsNonStreaming,
                                                   MessageCreateParamsStreaming)

from tests.anthropic_upstream import (anthropic_answer, error_event, error_reply, message, reply,
                                      stream_events)
from tests.conftest import live_server
from tests.upstream import FakeUpstream, Reply, Stream

SAMPLING = ("temperature", "top_p", "top_k")
KEY_VAR = "LLM_PROXY_TEST_ANTHROPIC_KEY"
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJ"
       "RU5ErkJggg==")  # a 1x1 PNG
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def claude(url, name="claude", **fields):
    return {"name": name, "type": "anthropic", "base_url": url, "api_key_env": KEY_VAR,
            "models": ["claude-test"], **fields}


@pytest.fixture(scope="session")
def schemas():
    return {False: pydantic.TypeAdapter(MessageCreateParamsNonStreaming),
            True: pydantic.TypeAdapter(MessageCreateParamsStreaming)}


@pytest.fixture
def fake(schemas):
    """A fake Anthropic; every request it received is checked against the SDK's types."""
    yield from _checked_fake(schemas)


@pytest.fixture
def fake_b(schemas):
    """A second fake Anthropic, for fallback."""
    yield from _checked_fake(schemas)


def _checked_fake(schemas):
    with FakeUpstream(default=anthropic_answer) as upstream:
        yield upstream
    for recorded in upstream.requests:
        checked_body(recorded, schemas)


@pytest.fixture
def client(make_app, fake):
    return make_app([claude(fake.url)]).test_client()


@pytest.fixture
def sent(fake, schemas):
    """The body of the fake's ``i``-th request, checked against the anthropic package's types."""
    return lambda i=-1: checked_body(fake.requests[i], schemas)


def checked_body(recorded, schemas) -> dict:
    data = recorded.json()
    assert recorded.headers["anthropic-version"] == "2023-06-01"
    # The installed SDK (2.x) types API version 2026-10-21, which dropped the sampling
    # parameters; the version we send still takes them, so the tests check them instead.
    checked = {k: v for k, v in data.items() if k not in SAMPLING}
    validated = _materialise(schemas[data.get("stream") is True].validate_python(checked))
    # pydantic drops unknown keys and validates iterables lazily: comparing the fully
    # materialised result with the input proves every key known and every value valid.
    assert validated == checked
    return data


def _materialise(value):
    if isinstance(value, (Iterator, list, tuple)):
        return [_materialise(v) for v in value]
    if isinstance(value, dict):
        return {k: _materialise(v) for k, v in value.items()}
    return value


def chat(client, *messages, **fields):
    return client.post("/v1/chat/completions", json={
        "model": "claude-test", "messages": list(messages) or [user("hi")], **fields})


def user(content):
    return {"role": "user", "content": content}


def events(response) -> list:
    """The SSE payloads of a streamed response, [DONE] as the string."""
    text = response.get_data(as_text=True)
    payloads = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def deltas(chunks) -> list:
    return [c["choices"][0]["delta"] for c in chunks if isinstance(c, dict) and c.get("choices")]


# --- requests ------------------------------------------------------------------------------

def test_a_chat_call_becomes_a_messages_call_with_the_anthropic_headers(make_app, fake, sent,
                                                                        monkeypatch):
    monkeypatch.setenv(KEY_VAR, "sk-ant-test")
    client = make_app([claude(fake.url)]).test_client()
    response = client.post("/v1/chat/completions", headers={"X-Request-ID": "req-42"}, json={
        "model": "claude-test", "messages": [user("hi")]})
    assert response.status_code == 200
    recorded = fake.requests[0]
    assert (recorded.method, recorded.path) == ("POST", "/v1/messages")
    assert recorded.headers["x-api-key"] == "sk-ant-test"
    assert recorded.headers["anthropic-version"] == "2023-06-01"
    assert recorded.headers["content-type"] == "application/json"
    assert recorded.headers["X-Request-ID"] == "req-42"
    assert "Authorization" not in recorded.headers
    assert sent() == {"model": "claude-test", "max_tokens": 4096, "messages": [user("hi")]}


def test_no_key_header_without_a_key_and_extra_headers_are_sent(make_app, fake, monkeypatch):
    monkeypatch.delenv(KEY_VAR, raising=False)
    app = make_app([claude(fake.url, headers={"anthropic-beta": "test-beta"})])
    chat(app.test_client())
    assert "x-api-key" not in {k.lower() for k in fake.requests[0].headers}
    assert fake.requests[0].headers["anthropic-beta"] == "test-beta"


def test_system_and_developer_messages_become_the_system_parameter(client, sent):
    chat(client, {"role": "system", "content": "Be brief."},
         {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
         user("hi"))
    body = sent()
    assert body["system"] == "Be brief.\n\nAnswer in French."
    assert body["messages"] == [user("hi")]


def test_multi_turn_keeps_order_and_merges_consecutive_same_role_turns(client, sent):
    chat(client, user("one"), user([{"type": "text", "text": "two"}]),
         {"role": "assistant", "content": "three"}, {"role": "assistant", "content": "four"},
         user("five"))
    assert sent()["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"},
                                     {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "three"},
                                          {"type": "text", "text": "four"}]},
        user("five")]


def test_images_become_base64_or_url_sources(client, sent):
    chat(client, user([
        {"type": "text", "text": "Compare these"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
    ]))
    assert sent()["messages"][0]["content"] == [
        {"type": "text", "text": "Compare these"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


def test_an_image_that_is_neither_a_data_nor_a_web_url_is_refused_before_any_call(client, fake):
    response = chat(client, user([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]))
    assert response.status_code == 400
    assert response.json["error"]["param"] == "messages[0].content[0].image_url"
    assert fake.calls == 0


@pytest.mark.parametrize("choice, parallel, expected", [
    (None, None, {"type": "auto"}),
    ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", None, {"type": "any"}),
    ("none", False, {"type": "none"}),
    ({"type": "function", "function": {"name": "get_weather"}}, None,
     {"type": "tool", "name": "get_weather"}),
])
def test_tools_and_tool_choice_are_translated(client, sent, choice, parallel, expected):
    fields = {"tools": [WEATHER_TOOL]}
    if choice is not None:
        fields["tool_choice"] = choice
    if parallel is not None:
        fields["parallel_tool_calls"] = parallel
    chat(client, **fields)
    body = sent()
    assert body["tools"] == [{"name": "get_weather", "description": "The weather in a city",
                              "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    assert body["tool_choice"] == expected


def test_a_tool_use_answer_becomes_tool_calls(client, fake):
    fake.script(reply(message("Let me check.", ("toolu_1", "get_weather", {"city": "Paris"}),
                              stop_reason="tool_use")))
    answer = chat(client, tools=[WEATHER_TOOL]).json
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["tool_calls"] == [{"id": "toolu_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Paris"}'}}]


def test_tool_calls_and_tool_results_round_trip(client, sent):
    chat(client, user("Weather in Paris and Rome?"),
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "toolu_1", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "toolu_2", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
         {"role": "tool", "tool_call_id": "toolu_1", "content": "18C, sunny"},
         {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "22C"}]},
         user("Which is warmer?"), tools=[WEATHER_TOOL])
    assert sent()["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather",
             "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2",
             "content": [{"type": "text", "text": "22C"}]},
            {"type": "text", "text": "Which is warmer?"}]}]


@pytest.mark.parametrize("stop, expected", [("END", ["END"]), (["a", "b"], ["a", "b"])])
def test_stop_becomes_stop_sequences(client, sent, stop, expected):
    chat(client, stop=stop)
    assert sent()["stop_sequences"] == expected


def test_sampling_parameters_and_user_are_translated_and_openai_only_ones_dropped(client, sent):
    chat(client, temperature=1.5, user="user-7", max_completion_tokens=64, n=1, top_k=40,
         presence_penalty=0.5, frequency_penalty=0.1, seed=3, logit_bias={"1": 2},
         logprobs=False, response_format={"type": "text"}, stream_options={"include_usage": True})
    assert sent() == {"model": "claude-test", "max_tokens": 64, "messages": [user("hi")],
                      "temperature": 1, "top_k": 40, "metadata": {"user_id": "user-7"}}


def test_top_p_is_sent_alone_but_not_beside_temperature(client, sent):
    chat(client, top_p=0.9)
    chat(client, temperature=0.2, top_p=0.9)
    assert (sent(0).get("temperature"), sent(0)["top_p"]) == (None, 0.9)
    assert (sent(1)["temperature"], sent(1).get("top_p")) == (0.2, None)


def test_max_tokens_defaults_to_the_provider_setting(make_app, fake, sent):
    client = make_app([claude(fake.url, max_tokens_default=777)]).test_client()
    chat(client)
    chat(client, max_tokens=12)
    assert sent(0)["max_tokens"] == 777
    assert sent(1)["max_tokens"] == 12


@pytest.mark.parametrize("stream", [False, True])
def test_more_than_one_choice_is_refused(client, fake, stream):
    response = chat(client, n=2, stream=stream)
    assert response.status_code == 400
    assert response.json["error"]["param"] == "n"
    assert fake.calls == 0


# --- answers -------------------------------------------------------------------------------

def test_an_answer_carries_id_model_created_and_usage(client, fake):
    fake.script(reply(message("Bonjour", input_tokens=11, output_tokens=3, id="msg_abc")))
    answer = chat(client).json
    assert answer["id"] == "msg_abc"
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "claude-test"
    assert isinstance(answer["created"], int) and answer["created"] > 0
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Bonjour",
                                               "refusal": None}
    assert answer["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


def test_text_blocks_are_joined_and_cached_input_counts_as_prompt(client, fake):
    fake.script(reply(message("Hello, ", "world", input_tokens=5, output_tokens=2,
                              cache_read_input_tokens=100, cache_creation_input_tokens=0)))
    answer = chat(client).json
    assert answer["choices"][0]["message"]["content"] == "Hello, world"
    assert answer["usage"] == {"prompt_tokens": 105, "completion_tokens": 2, "total_tokens": 107,
                               "prompt_tokens_details": {"cached_tokens": 100}}


@pytest.mark.parametrize("stop_reason, finish_reason", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("tool_use", "tool_calls"), ("refusal", "content_filter")])
def test_each_stop_reason_maps_to_a_finish_reason(client, fake, stop_reason, finish_reason):
    fake.script(reply(message("x", stop_reason=stop_reason)))
    assert chat(client).json["choices"][0]["finish_reason"] == finish_reason


def test_a_legacy_completion_is_one_user_message_answered_as_text(client, fake, sent):
    answer = client.post("/v1/completions", json={
        "model": "claude-test", "prompt": "Say hello", "max_tokens": 20, "echo": False}).json
    assert sent() == {"model": "claude-test", "max_tokens": 20, "messages": [user("Say hello")]}
    assert answer["object"] == "text_completion"
    assert answer["choices"] == [{"index": 0, "text": "Hello from Claude", "logprobs": None,
                                  "finish_reason": "stop"}]


def test_a_streamed_legacy_completion_arrives_as_text_chunks(client, sent):
    chunks = events(client.post("/v1/completions", json={
        "model": "claude-test", "prompt": "Say hello", "stream": True}))
    assert sent()["stream"] is True
    assert chunks[-1] == "[DONE]"
    assert {c["object"] for c in chunks[:-1]} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Hello from Claude"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


# --- streams -------------------------------------------------------------------------------

def test_a_streamed_answer_arrives_as_openai_chunks(client, sent):
    response = chat(client, stream=True)
    assert response.mimetype == "text/event-stream"
    assert sent()["stream"] is True
    chunks = events(response)
    assert chunks[-1] == "[DONE]"
    assert {(c["id"], c["object"], c["model"]) for c in chunks[:-1]} == {
        ("msg_01test", "chat.completion.chunk", "claude-test")}
    assert deltas(chunks) == [{"role": "assistant", "content": ""}, {"content": "Hello "},
                              {"content": "from C"}, {"content": "laude"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 4 + ["stop"]


def test_streamed_tool_calls_arrive_as_argument_deltas(client, fake):
    fake.script(Stream(stream_events(message(
        "Checking.", ("toolu_1", "get_weather", {"city": "Paris"}),
        ("toolu_2", "get_weather", {"city": "Rome"}), stop_reason="tool_use"), pieces=2)))
    chunks = events(chat(client, stream=True, tools=[WEATHER_TOOL]))
    calls = [d["tool_calls"][0] for d in deltas(chunks) if "tool_calls" in d]
    assert calls[0] == {"index": 0, "id": "toolu_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert calls[3]["id"] == "toolu_2" and calls[3]["index"] == 1
    for index in (0, 1):
        arguments = "".join(c["function"]["arguments"] for c in calls if c["index"] == index)
        assert json.loads(arguments) == {"city": ["Paris", "Rome"][index]}
    assert len([c for c in calls if c["index"] == 0]) == 3  # the start and two argument pieces
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_include_usage_adds_a_last_chunk_without_choices(client, fake):
    fake.script(Stream(stream_events(message("Hi", input_tokens=9, output_tokens=4))))
    chunks = events(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"] == []
    assert chunks[-2]["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    assert all("usage" not in c for c in chunks[:-2])


def test_no_usage_chunk_unless_asked(client):
    chunks = events(chat(client, stream=True))
    assert all(c == "[DONE]" or c["choices"] for c in chunks)


def test_an_error_event_mid_stream_ends_the_stream_with_an_error(client, fake):
    started = stream_events(message("Hello there"))[:4]  # start, ping, block start, one delta
    fake.script(Stream(started + [error_event("overloaded_error", "Overloaded")]))
    chunks = events(chat(client, stream=True))
    assert deltas(chunks)[:2] == [{"role": "assistant", "content": ""}, {"content": "Hell"}]
    assert "[DONE]" not in chunks
    assert "overloaded_error: Overloaded" in chunks[-1]["error"]["message"]


def test_a_stream_that_ends_before_message_stop_ends_with_an_error(client, fake):
    fake.script(Stream(stream_events(message("Hello there"))[:-1]))
    chunks = events(chat(client, stream=True))
    assert chunks[-1]["error"]["code"] == "upstream_error"
    assert "[DONE]" not in chunks


def test_an_error_before_any_content_falls_back_to_the_next_provider(make_app, fake, fake_b):
    fake.script(Stream(stream_events(message("x"))[:2] + [error_event("overloaded_error", "busy")]))
    client = make_app([claude(fake.url), claude(fake_b.url, name="claude-b", priority=200)]
                      ).test_client()
    response = chat(client, stream=True)
    assert response.headers["X-Proxy-Provider"] == "claude-b"
    assert "".join(d.get("content", "") for d in deltas(events(response))) == "Hello from Claude"
    assert (fake.calls, fake_b.calls) == (1, 1)


# --- failures ------------------------------------------------------------------------------

def test_a_400_from_anthropic_reaches_the_client_as_an_openai_400(client, fake):
    fake.script(error_reply(400, "invalid_request_error", "messages: text content blocks must "
                                                          "be non-empty"))
    response = chat(client)
    assert response.status_code == 400
    assert response.json == {"error": {
        "message": "messages: text content blocks must be non-empty",
        "type": "invalid_request_error", "param": None, "code": None}}
    assert fake.calls == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_529_overloaded_falls_back_to_the_second_provider(make_app, fake, fake_b, stream):
    fake.script(error_reply(529, "overloaded_error", "Overloaded"))
    client = make_app([claude(fake.url), claude(fake_b.url, name="claude-b", priority=200)]
                      ).test_client()
    response = chat(client, stream=stream)
    assert response.status_code == 200
    assert response.headers["X-Proxy-Provider"] == "claude-b"
    assert (fake.calls, fake_b.calls) == (1, 1)
    text = (response.json["choices"][0]["message"]["content"] if not stream else
            "".join(d.get("content", "") for d in deltas(events(response))))
    assert text == "Hello from Claude"


def test_a_200_that_is_not_a_message_is_a_provider_failure(client, fake):
    fake.script(Reply(body={"type": "message", "unexpected": True}))
    assert chat(client).status_code == 502


# --- the official openai package -----------------------------------------------------------

def test_the_openai_sdk_gets_whole_and_streamed_answers_from_claude(make_app, fake, sent):
    fake.script(reply(message("Sunny.", ("toolu_9", "get_weather", {"city": "Oslo"}),
                              stop_reason="tool_use", input_tokens=20, output_tokens=7)))
    with live_server(make_app([claude(fake.url)])) as url:
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        answer = sdk.chat.completions.create(
            model="claude-test", tools=[WEATHER_TOOL],
            messages=[{"role": "system", "content": "Be brief."}, user("Weather in Oslo?")])
        stream = sdk.chat.completions.create(
            model="claude-test", messages=[user("hi")], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
    assert sent(0)["system"] == "Be brief."
    assert answer.choices[0].finish_reason == "tool_calls"
    call = answer.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "toolu_9", "get_weather", {"city": "Oslo"})
    assert answer.usage.total_tokens == 27
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Hello from Claude"
    assert chunks[-1].usage.completion_tokens == 5
