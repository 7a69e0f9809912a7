"""/v1/responses through the official openai package, for every provider type behind the proxy:
an upstream that speaks Responses (passed through), an OpenAI-compatible one that speaks only
Chat Completions, an Anthropic one (both translated), and the mock; Codex's own request bodies
(tests/fixtures/codex_turn.json) replayed; failures, keys, limits and cost."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests

from app.errors import UpstreamError
from app.protocols.responses import ResponsesFrontEnd
from app.providers.base import Call, ProviderStream, UsageMeter
from app.sse import DONE, KEEPALIVE
from settings import SettingsError, build_settings
from tests.anthropic_upstream import anthropic_answer, message, reply, stream_events
from tests.conftest import FakeClock, live_server, provider
from tests.upstream import (FakeUpstream, Reply, Stream, chat_chunks, chat_completion,
                            response_events, response_object, responses_answer)

MODEL = "gpt-4o"  # a model the price table knows
CODEX_MODEL = "gpt-5.5"  # the model of the Codex turns in the fixture
KEY_VAR = "LLM_PROXY_TEST_RESPONSES_KEY"
PROVIDER_KEY = "sk-provider-responses-0123456789"
KEY, OTHER_KEY = "team-a-key-0123456789", "team-b-key-0123456789"
AUTH = {"api_keys_required": True, "env_keys": f"team-a:{KEY},team-b:{OTHER_KEY}"}
CODEX = json.loads((Path(__file__).parent / "fixtures" / "codex_turn.json").read_text())
EXPECTED = {"mock": "This is the mock provider answering: Say hello",
            "chat": "Hello from upstream", "anthropic": "Hello from Claude",
            "native": "Hello from Responses"}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
GRAMMAR = 'start: "*** Begin Patch" LF /(.|\\n)+/ "*** End Patch"'
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files.",
               "format": {"type": "grammar", "syntax": "lark", "definition": GRAMMAR}}
PATCH = "*** Begin Patch\n*** Add File: a.txt\n+hi\n*** End Patch\n"


def providers(kind: str, url: str, **fields) -> list:
    """The provider entry of each kind, pointed at the fake upstream at ``url``."""
    if kind == "mock":
        return [{"name": "mock", "type": "mock", "models": [MODEL], **fields}]
    if kind == "anthropic":
        return [{"name": "claude", "type": "anthropic", "base_url": url, "api_key_env": KEY_VAR,
                 "models": [MODEL, CODEX_MODEL], **fields}]
    native = {"responses": True} if kind == "native" else {}
    return [provider(url, kind, models=[MODEL, CODEX_MODEL], api_key_env=KEY_VAR, **native,
                     **fields)]


@dataclass
class Proxy:
    kind: str
    url: str
    upstream: FakeUpstream
    app: object

    def client(self, key=KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv(KEY_VAR, PROVIDER_KEY)


@pytest.fixture
def running(make_app):
    """``running(kind, **sections)``: a live proxy in front of a fake upstream of that kind."""
    with contextlib.ExitStack() as stack:
        def start(kind, *, fields=None, **sections):
            default = anthropic_answer if kind == "anthropic" else responses_answer
            upstream = stack.enter_context(FakeUpstream(default=default))
            app = make_app(providers(kind, upstream.url, **(fields or {})),
                           **{"auth": AUTH, **sections})
            return Proxy(kind, stack.enter_context(live_server(app)), upstream, app)
        yield start


@pytest.fixture(params=["mock", "chat", "anthropic", "native"])
def backend(request, running):
    return running(request.param)


# -- every provider type ------------------------------------------------------------------------

def test_create_answers_a_response_whatever_the_provider(backend):
    response = backend.client().responses.create(model=MODEL, input="Say hello")
    assert (response.object, response.status, response.model) == ("response", "completed", MODEL)
    assert response.output_text == EXPECTED[backend.kind]
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_a_streamed_create_is_the_whole_event_sequence(backend):
    client = backend.client()
    events = list(client.responses.create(model=MODEL, input="Say hello", stream=True))
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    for kind in ("response.output_item.added", "response.content_part.added",
                 "response.output_text.done", "response.content_part.done",
                 "response.output_item.done"):
        assert types.count(kind) == 1, kind
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == EXPECTED[backend.kind]
    completed = events[-1].response
    assert completed.id == events[0].response.id and completed.output_text == text
    assert completed.usage.total_tokens > 0
    # The SDK's own stream helper checks every index and identity as it accumulates.
    with client.responses.stream(model=MODEL, input="Say hello") as stream:
        assert stream.get_final_response().output_text == text


def test_the_client_key_never_reaches_the_upstream(backend):
    client = backend.client()
    client.responses.create(model=MODEL, input="Say hello")
    list(client.responses.create(model=MODEL, input="Say hello", stream=True))
    for recorded in backend.upstream.requests:
        assert KEY not in json.dumps(recorded.headers)
        assert PROVIDER_KEY in json.dumps(recorded.headers)


# -- tools: a function call and a custom tool, there and back ------------------------------------

def weather_call(kind: str, streamed: bool):
    """The upstream's answer of each kind: a call of get_weather for Paris, id call_1."""
    arguments = '{"city": "Paris"}'
    if kind == "anthropic":
        msg = message(("call_1", "get_weather", {"city": "Paris"}), stop_reason="tool_use",
                      model=MODEL)
        return Stream(stream_events(msg)) if streamed else reply(msg)
    if kind == "native":
        return Reply(body=response_object(MODEL, "", output=[{
            "id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1",
            "name": "get_weather", "arguments": arguments}]))
    return chat_tool_call("call_1", "get_weather", arguments, streamed)


def chat_tool_call(call_id, name, arguments, streamed):
    """A chat answer calling one tool (streamed: its arguments in three pieces)."""
    if not streamed:
        body = chat_completion(MODEL, None)
        body["choices"][0].update(finish_reason="tool_calls", message={
            "role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": arguments}}]})
        return Reply(body=body)
    third = len(arguments) // 3
    pieces = [arguments[:third], arguments[third:2 * third], arguments[2 * third:]]
    deltas = [{"index": 0, "id": call_id, "type": "function",
               "function": {"name": name, "arguments": ""}}]
    deltas += [{"index": 0, "function": {"arguments": piece}} for piece in pieces]
    chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
               "choices": [{"index": 0, "delta": {"tool_calls": [delta]},
                            "finish_reason": None}]} for delta in deltas]
    chunks.append({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    return Stream(chunks + [b"[DONE]"])


def created(client, streamed, **params):
    """The whole Response, asked whole or streamed (through the SDK's stream helper)."""
    if not streamed:
        return client.responses.create(model=MODEL, **params)
    with client.responses.stream(model=MODEL, **params) as stream:
        return stream.get_final_response()


@pytest.mark.parametrize("kind,streamed", [("chat", False), ("chat", True), ("anthropic", False),
                                           ("anthropic", True), ("native", False)])
def test_a_function_call_round_trip(running, kind, streamed):
    proxy = running(kind)
    proxy.upstream.script(weather_call(kind, streamed))
    client = proxy.client()
    question = {"role": "user", "content": "Weather in Paris?"}
    first = created(client, streamed, input=[question], tools=[WEATHER])
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert (call.call_id, call.name, json.loads(call.arguments)) == (
        "call_1", "get_weather", {"city": "Paris"})

    result = {"type": "function_call_output", "call_id": "call_1", "output": "18 C, sunny"}
    second = created(client, streamed, tools=[WEATHER],
                     input=[question, call.model_dump(exclude_none=True), result])
    assert second.output_text == EXPECTED[kind]
    sent = proxy.upstream.requests[1].json()
    if kind == "native":  # passed through: the items as the client sent them
        assert sent["input"][-1] == result and sent["input"][-2]["call_id"] == "call_1"
    elif kind == "chat":
        assert sent["messages"][-2:] == [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
        assert sent["tools"] == [{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": WEATHER["parameters"]}}]
    else:
        use, result_block = sent["messages"][-2]["content"][0], sent["messages"][-1]["content"][0]
        assert (use["type"], use["id"], use["input"]) == ("tool_use", "call_1", {"city": "Paris"})
        assert (result_block["type"], result_block["tool_use_id"]) == ("tool_result", "call_1")


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_a_custom_tool_round_trip(running, streamed):
    """apply_patch as Codex offers it (a grammar): a function taking one string for the chat
    provider, whose call comes back as a custom_tool_call holding that string."""
    proxy = running("chat")
    proxy.upstream.script(chat_tool_call("call_p", "apply_patch", json.dumps({"input": PATCH}),
                                         streamed))
    client = proxy.client()
    question = {"role": "user", "content": "Add a.txt"}
    if streamed:
        events = list(client.responses.create(model=MODEL, input=[question],
                                              tools=[APPLY_PATCH], stream=True))
        (done,) = [e for e in events if e.type == "response.custom_tool_call_input.done"]
        assert done.input == PATCH
        output = events[-1].response.output
    else:
        output = client.responses.create(model=MODEL, input=[question],
                                         tools=[APPLY_PATCH]).output
    (call,) = output
    assert (call.type, call.name, call.input, call.call_id) == (
        "custom_tool_call", "apply_patch", PATCH, "call_p")
    (tool,) = proxy.upstream.requests[0].json()["tools"]
    assert tool["function"]["parameters"] == {
        "type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"],
        "additionalProperties": False}
    assert "Edit files." in tool["function"]["description"]
    assert GRAMMAR in tool["function"]["description"]

    output_item = {"type": "custom_tool_call_output", "call_id": "call_p", "output": "Done"}
    answer = client.responses.create(model=MODEL, tools=[APPLY_PATCH], input=[
        question, call.model_dump(exclude_none=True), output_item])
    assert answer.output_text == "Hello from upstream"
    assert proxy.upstream.requests[1].json()["messages"][-2:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_p", "type": "function",
             "function": {"name": "apply_patch", "arguments": json.dumps({"input": PATCH},
                                                                         separators=(",", ":"))}}]},
        {"role": "tool", "tool_call_id": "call_p", "content": "Done"}]


# -- Codex's own requests -----------------------------------------------------------------------

@pytest.mark.parametrize("turn", ["first_turn", "follow_up"])
def test_codex_turns_are_translated_for_a_chat_provider(running, turn):
    """Codex's bodies as it sends them: developer messages become system ones, reasoning is
    dropped, the calls pair with their outputs, and the hosted tools it offers are left out
    and reported in X-Proxy-Dropped-Tools."""
    proxy = running("chat")
    with requests.post(proxy.url + "/v1/responses", json=CODEX[turn], stream=True, timeout=10,
                       headers={"Authorization": f"Bearer {KEY}"}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if
                  line.startswith(b"data: ")]
    assert response.status_code == 200
    assert response.headers["X-Proxy-Dropped-Tools"] == (
        "namespace:multi_agent_v1, tool_search, web_search")
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["usage"]["total_tokens"] > 0  # estimated: the fake sent none
    sent = proxy.upstream.requests[0].json()
    roles = [m["role"] for m in sent["messages"]]
    assert roles[:4] == ["system", "system", "user", "user"]
    names = [t["function"]["name"] for t in sent["tools"]]
    assert "apply_patch" in names and "exec_command" in names and len(names) == 8
    assert (sent["reasoning_effort"], sent["tool_choice"], sent["parallel_tool_calls"]) == (
        "medium", "auto", True)
    for dropped in ("store", "include", "prompt_cache_key", "client_metadata", "text"):
        assert dropped not in sent
    if turn == "follow_up":
        assert roles[4:] == ["assistant", "tool", "assistant", "tool"]
        assert sent["messages"][4]["content"] == "Let me create the files."
        assert [c["id"] for c in sent["messages"][4]["tool_calls"]] == ["call_A"]
        assert sent["messages"][7]["tool_call_id"] == "call_B"


def test_a_codex_turn_passes_through_byte_for_byte(running):
    proxy = running("native")
    raw = json.dumps(CODEX["follow_up"]).encode()
    with requests.post(proxy.url + "/v1/responses", data=raw, stream=True, timeout=10,
                       headers={"Authorization": f"Bearer {KEY}", "OpenAI-Beta": "x=1",
                                "Content-Type": "application/json"}) as response:
        body = response.content
    assert response.status_code == 200 and "X-Proxy-Dropped-Tools" not in response.headers
    assert body == b"".join(e + b"\n\n" for e in response_events(
        response_object(CODEX_MODEL, "Hello from Responses"), ["Hello", " from", " Responses"]))
    (recorded,) = proxy.upstream.requests
    assert (recorded.path, recorded.body) == ("/v1/responses", raw)
    assert recorded.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert recorded.headers["OpenAI-Beta"] == "x=1"


def test_an_alias_renames_the_model_of_a_passed_through_body(running):
    proxy = running("native", fields={"aliases": {"codex": MODEL}})
    answer = proxy.client().responses.create(model="codex", input="Say hello", store=False)
    assert answer.output_text == "Hello from Responses"
    assert proxy.upstream.requests[0].json() == {"model": MODEL, "input": "Say hello",
                                                 "store": False}


def test_azure_is_asked_on_its_v1_responses_route(make_app):
    with FakeUpstream(default=responses_answer) as upstream:
        app = make_app([{"name": "azure", "type": "azure_openai", "base_url": upstream.url,
                         "api_key_env": KEY_VAR, "models": [MODEL]}])
        response = app.test_client().post("/v1/responses", json={"model": MODEL, "input": "x"})
    assert response.status_code == 200 and response.get_json()["id"] == "resp_up1"
    (recorded,) = upstream.requests
    assert recorded.path == "/openai/v1/responses"
    assert recorded.headers["api-key"] == PROVIDER_KEY


# -- what a chat provider cannot serve ------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("previous_response_id", "resp_1"), ("store", True),
                                         ("background", True)])
def test_state_on_a_provider_without_it_is_a_400_that_says_so(running, field, value):
    proxy = running("chat")
    with pytest.raises(openai.BadRequestError) as raised:
        proxy.client().responses.create(model=MODEL, input="hi", **{field: value})
    error = raised.value.body
    assert (error["code"], error["param"]) == ("unsupported_parameter", field)
    assert "keeps responses" in error["message"] and "'store': false" in error["message"]
    assert proxy.upstream.calls == 0


def test_state_passes_through_to_a_provider_that_keeps_it(running):
    proxy = running("native")
    proxy.client().responses.create(model=MODEL, input="hi", previous_response_id="resp_0")
    assert proxy.upstream.requests[0].json()["previous_response_id"] == "resp_0"


@pytest.mark.parametrize("body,param", [
    ({"input": "hi"}, "model"),
    ({"model": MODEL, "input": 3}, "input"),
    ({"model": MODEL, "input": ["hi"]}, "input[0]"),
    ({"model": MODEL, "input": "hi", "tools": "all"}, "tools"),
    ({"model": MODEL, "input": "hi", "max_output_tokens": True}, "max_output_tokens"),
    ({"model": MODEL, "input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ({"model": MODEL, "input": [{"type": "function_call_output", "output": "x"}]},
     "input[0].call_id"),
    ({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_file",
                                                              "file_id": "f"}]}]},
     "input[0].content[0]"),
])
def test_a_malformed_body_is_a_400_in_openais_shape(running, body, param):
    proxy = running("chat")
    response = requests.post(proxy.url + "/v1/responses", json=body, timeout=10,
                             headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert proxy.upstream.calls == 0


def test_an_unknown_model_is_a_404_and_an_upstream_429_a_429(running):
    proxy = running("chat", http_client={"retry_attempts": 0})
    client = proxy.client()
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.create(model="nope", input="hi")
    assert raised.value.body["code"] == "model_not_found"
    proxy.upstream.script(Reply(status=429, headers={"Retry-After": "7"},
                                body={"error": {"message": "slow down"}}))
    with pytest.raises(openai.RateLimitError) as raised:
        client.responses.create(model=MODEL, input="hi")
    assert raised.value.body["type"] == "rate_limit_error"
    assert raised.value.response.headers["Retry-After"] == "7"


def test_a_passed_through_upstream_refusal_keeps_its_own_message(running):
    proxy = running("native")
    proxy.upstream.script(Reply(status=400, body={"error": {
        "message": "Unknown parameter: 'bogus'.", "type": "invalid_request_error",
        "param": "bogus", "code": "unknown_parameter"}}))
    with pytest.raises(openai.BadRequestError) as raised:
        proxy.client().responses.create(model=MODEL, input="hi", extra_body={"bogus": 1})
    assert (raised.value.body["code"], raised.value.body["param"]) == ("unknown_parameter",
                                                                       "bogus")


# -- failures after the stream began ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["chat", "native"])
def test_a_stream_broken_mid_way_ends_in_response_failed(running, kind):
    proxy = running(kind)
    if kind == "native":
        events = response_events(response_object(MODEL, "Hello from Responses"),
                                 ["Hello", " from", " Responses"])
        proxy.upstream.script(Stream(events, cut_after=5))
    else:
        proxy.upstream.script(Stream(chat_chunks(MODEL, ["Hello", " from", " up"]), cut_after=2))
    events = list(proxy.client().responses.create(model=MODEL, input="hi", stream=True))
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.id == events[0].response.id and failed.response.status == "failed"
    assert failed.response.error.code == "server_error"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.completed" not in [e.type for e in events]


# -- stored responses: retrieve and cancel ---------------------------------------------------------

def test_a_kept_response_is_retrieved_and_cancelled_at_its_provider_by_its_key_only(running):
    proxy = running("native")
    client = proxy.client()
    made = client.responses.create(model=MODEL, input="hi")
    assert client.responses.retrieve(made.id).output_text == "Hello from Responses"
    assert client.responses.cancel(made.id).status == "cancelled"
    assert [(r.method, r.path) for r in proxy.upstream.requests[1:]] == [
        ("GET", f"/v1/responses/{made.id}"), ("POST", f"/v1/responses/{made.id}/cancel")]
    assert all(KEY not in json.dumps(r.headers) for r in proxy.upstream.requests)
    for key, response_id in ((OTHER_KEY, made.id), (KEY, "resp_unknown")):
        with pytest.raises(openai.NotFoundError) as raised:
            proxy.client(key).responses.retrieve(response_id)
        assert raised.value.body["code"] == "not_found"
    assert proxy.upstream.calls == 3


def test_a_response_not_kept_upstream_is_not_found(running):
    """store: false upstream, or a translated response: nothing to retrieve."""
    for kind, store in (("native", False), ("chat", None)):
        proxy = running(kind)
        client = proxy.client()
        made = client.responses.create(model=MODEL, input="hi",
                                       **({"store": store} if store is not None else {}))
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(made.id)
        assert proxy.upstream.calls == 1


# -- limits and cost --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["chat", "native"])
def test_a_response_is_priced_at_its_usage(running, kind):
    proxy = running(kind)
    raw = proxy.client().responses.with_raw_response.create(model=MODEL, input="hi")
    usage = raw.parse().usage
    cached = usage.input_tokens_details.cached_tokens
    expected = ((usage.input_tokens - cached) * 2.50 + cached * 1.25
                + usage.output_tokens * 10.00) / 1e6
    assert usage.total_tokens == (11 if kind == "native" else 8)
    assert float(raw.headers["X-Proxy-Cost-USD"]) == pytest.approx(expected, abs=1e-8)
    assert raw.headers["X-Proxy-Provider"] == kind


def test_a_tokens_per_minute_key_is_charged_its_streamed_responses(make_app):
    """Each stream uses 8 (chat) or 11 (native) tokens, the upstream's count: a key of twice
    that a minute is refused by its fourth at the latest. No time passes (a fake clock)."""
    for kind, tokens in (("chat", 8), ("native", 11)):
        with FakeUpstream(default=responses_answer) as upstream:
            app = make_app(providers(kind, upstream.url), clock=FakeClock(),
                           auth={**AUTH, "tokens_per_minute": 2 * tokens,
                                 "reserve_completion_tokens": 1})
            statuses = []
            for _ in range(4):
                response = app.test_client().post(
                    "/v1/responses", json={"model": MODEL, "input": "hi", "stream": True},
                    headers={"Authorization": f"Bearer {KEY}"})
                response.get_data()
                response.close()
                statuses.append(response.status_code)
        assert statuses[0] == 200 and 429 in statuses, (kind, statuses)


def test_a_responses_prompt_is_reserved_at_admission(make_app):
    """A key with tokens left for a small call, not for a 1,000-token input: the long one is
    refused before any upstream call (its input counted at four characters a token)."""
    with FakeUpstream(default=responses_answer) as upstream:
        app = make_app(providers("native", upstream.url), clock=FakeClock(),
                       auth={**AUTH, "tokens_per_minute": 1000, "reserve_completion_tokens": 1})
        client, headers = app.test_client(), {"Authorization": f"Bearer {KEY}"}
        small = client.post("/v1/responses", json={"model": MODEL, "input": "hi"},
                            headers=headers)
        long = client.post("/v1/responses", json={"model": MODEL, "input": "x" * 4000},
                           headers=headers)
    assert (small.status_code, long.status_code) == (200, 429)
    assert long.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert upstream.calls == 1


# -- the translation's details -----------------------------------------------------------------------

def test_request_fields_are_mapped_to_their_chat_equivalents(running):
    proxy = running("chat")
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    proxy.client().responses.create(
        model=MODEL, instructions="Be brief.", max_output_tokens=50, temperature=0.5, top_p=0.9,
        reasoning={"effort": "low"}, user="u1", parallel_tool_calls=False,
        tool_choice={"type": "function", "name": "get_weather"},
        tools=[WEATHER, {"type": "web_search"}],
        text={"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
        input=[{"role": "developer", "content": "Use metric units."},
               {"role": "user", "content": [
                   {"type": "input_text", "text": "What is this?"},
                   {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
               {"type": "reasoning", "id": "rs_1", "summary": []}])
    sent = proxy.upstream.requests[0].json()
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Use metric units."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                "detail": "auto"}}]}]
    assert {k: sent[k] for k in ("max_completion_tokens", "temperature", "top_p",
                                 "reasoning_effort", "user", "parallel_tool_calls",
                                 "tool_choice")} == {
        "max_completion_tokens": 50, "temperature": 0.5, "top_p": 0.9, "reasoning_effort": "low",
        "user": "u1", "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "out", "schema": schema, "strict": True}}


def test_an_image_a_tool_returned_follows_the_tool_results(running):
    proxy = running("chat")
    call = {"type": "function_call", "call_id": "c1", "name": "view_image", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": [
        {"type": "input_image", "image_url": "https://example.com/a.png"}]}
    proxy.client().responses.create(model=MODEL, input=[
        {"role": "user", "content": "Look"}, call, output])
    assert proxy.upstream.requests[0].json()["messages"][2:] == [
        {"role": "tool", "tool_call_id": "c1",
         "content": "(the tool returned an image; it follows)"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/a.png", "detail": "auto"}}]}]


def test_an_answer_cut_at_its_token_limit_is_incomplete(running):
    proxy = running("chat")
    body = chat_completion(MODEL, "Hello")
    body["choices"][0]["finish_reason"] = "length"
    chunks = chat_chunks(MODEL, ["Hel", "lo"])
    chunks[-2]["choices"][0]["finish_reason"] = "length"
    proxy.upstream.script(Reply(body=body), Stream(chunks))
    client = proxy.client()
    whole = client.responses.create(model=MODEL, input="hi", max_output_tokens=16)
    assert (whole.status, whole.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    last = list(client.responses.create(model=MODEL, input="hi", stream=True))[-1]
    assert (last.type, last.response.status) == ("response.incomplete", "incomplete")
    assert last.response.output_text == "Hello"


def test_a_translated_stream_adds_little_per_event():
    """The translation of a long chat stream costs well under 0.2 ms an event."""
    call = Call("responses", {"model": MODEL, "input": "hi", "stream": True}, None, True)
    pieces = [json.dumps(c).encode() for c in chat_chunks(MODEL, ["word "] * 2000, done=False)]

    def chat_stream():
        meter = UsageMeter()
        meter.report({"prompt_tokens": 5, "completion_tokens": 2000, "total_tokens": 2005})
        events = (b"data: " + p + b"\n\n" for p in pieces)
        return ProviderStream(call, (e for e in [*events, DONE]), meter)

    front = ResponsesFrontEnd()
    started = time.perf_counter()
    out = [e for e in front.stream_from_chat(call, chat_stream()) if e is not KEEPALIVE]
    per_event = (time.perf_counter() - started) / len(pieces)
    assert b"response.completed" in out[-1]
    assert per_event < 0.0002, f"{per_event * 1e6:.1f} us an event"


def test_a_chat_stream_carrying_an_error_fails_with_the_response_so_far():
    call = Call("responses", {"model": MODEL, "input": "hi", "stream": True}, None, True)
    chunks = [b"data: " + json.dumps(chat_chunks(MODEL, ["Hi"])[0]).encode() + b"\n\n",
              b'data: {"error": {"message": "overloaded"}}\n\n']
    front = ResponsesFrontEnd()
    events = front.stream_from_chat(call, ProviderStream(call, (c for c in chunks), UsageMeter()))
    first = next(events)
    with pytest.raises(UpstreamError) as raised:
        next(events)
    failed = json.loads(front.error_event(raised.value).split(b"data: ", 1)[1])
    created = json.loads(first.split(b"\n\n")[0].split(b"data: ", 1)[1])
    assert failed["type"] == "response.failed"
    assert failed["response"]["id"] == created["response"]["id"]
    assert failed["sequence_number"] == first.count(b"event: ")
    assert failed["response"]["output"][0]["content"] == []  # the message item as it was


# -- the provider setting ---------------------------------------------------------------------------

@pytest.mark.parametrize("entry,native", [
    ({"type": "openai", "base_url": "https://api.openai.com/v1"}, True),
    ({"type": "openai", "base_url": "http://127.0.0.1:8000/v1"}, False),
    ({"type": "openai", "base_url": "http://127.0.0.1:8000/v1", "responses": True}, True),
    ({"type": "openai", "base_url": "https://api.openai.com/v1", "responses": False}, False),
    ({"type": "azure_openai", "base_url": "https://r.openai.azure.com"}, True),
    ({"type": "anthropic", "base_url": "https://api.anthropic.com"}, False),
])
def test_the_responses_setting_and_its_defaults(entry, native):
    settings = build_settings({"providers": [{"name": "p", "models": ["m"], **entry}]}, {})
    assert settings.providers[0].speaks_responses is native


@pytest.mark.parametrize("entry", [{"type": "openai", "base_url": "http://x", "responses": "yes"},
                                   {"type": "anthropic", "base_url": "http://x",
                                    "responses": True}])
def test_a_wrong_responses_setting_is_refused(entry):
    with pytest.raises(SettingsError) as raised:
        build_settings({"providers": [{"name": "p", "models": ["m"], **entry}]}, {})
    assert raised.value.path == "providers[0].responses"
