"""Condenser: summarizing or truncating over-long chats, with summaries in a real ByteCache on a
fake clock and a fake summarizing model that records what it was asked."""

from __future__ import annotations

import copy
import hashlib
import threading
import time

import orjson
import pytest

from app.cache import ByteCache, Coalescer
from app.cache.condense import SUMMARY_PREFIX, TOOL_TEXT_LIMIT, Condenser, SummaryFailed
from app.errors import ProxyError, UpstreamError
from tests.conftest import FakeClock


class FakeSummarizer:
    """Stands in for the configured model: records each request, answers or raises."""

    def __init__(self, answer="the user asked about Paris; the assistant answered", error=None):
        self.answer = answer
        self.error = error
        self.calls: list[list[dict]] = []
        self._lock = threading.Lock()

    def __call__(self, messages):
        with self._lock:
            self.calls.append(messages)
        if self.error is not None:
            raise self.error
        return self.answer


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def cache(clock):
    return ByteCache("summary", 100, 3600, 1_000_000, clock=clock)


def msg(role, n, size=200):
    """A message of `size` characters: 4 + size/4 estimated tokens (54 at the default size)."""
    text = f"{role} message {n} "
    return {"role": role, "content": (text * (size // len(text) + 1))[:size]}


def chat(turns, system=True):
    """A body with a system prompt and `turns` user/assistant pairs."""
    messages = [{"role": "system", "content": "You are terse."}] if system else []
    for i in range(turns):
        messages += [msg("user", i), msg("assistant", i)]
    return {"model": "gpt-4o", "messages": messages}


def make(cache, **kwargs):
    kwargs.setdefault("threshold_tokens", 300)
    kwargs.setdefault("keep_last", 4)
    return Condenser(cache, **kwargs)


# -- estimate and threshold -------------------------------------------------------------------

def test_estimate_is_four_per_message_plus_a_token_per_four_characters_rounded_up():
    condenser = Condenser(ByteCache("s", 10, 10, 10_000))
    assert condenser.estimate_tokens([]) == 0
    assert condenser.estimate_tokens([{"role": "user", "content": "abcd"}]) == 5
    assert condenser.estimate_tokens([{"role": "user", "content": "abcde"}]) == 6
    assert condenser.estimate_tokens([{"role": "assistant", "content": None}]) == 4


def test_estimate_counts_text_parts_tool_calls_and_a_flat_cost_per_image():
    condenser = Condenser(ByteCache("s", 10, 10, 10_000))
    parts = {"role": "user", "content": [
        {"type": "text", "text": "a" * 40},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}}]}
    assert condenser.estimate_tokens([parts]) == 4 + 10 + 85
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    assert condenser.estimate_tokens([call]) == 4 + -(-(11 + 16) // 4)


def test_needed_only_when_the_estimate_is_over_the_threshold(cache):
    condenser = make(cache, threshold_tokens=300)
    assert not condenser.needed(chat(2))          # 5 + 4 * 54 = 221
    assert condenser.needed(chat(3))              # 5 + 6 * 54 = 329
    assert not condenser.needed({"model": "m", "prompt": "no messages"})


# -- summarizing ------------------------------------------------------------------------------

def test_under_threshold_the_body_is_returned_as_is_and_the_model_is_not_called(cache):
    condenser, summarize = make(cache), FakeSummarizer()
    body = chat(2)
    assert condenser.condense(body, summarize) == (body, None)
    assert condenser.condense(body, summarize)[0] is body
    assert summarize.calls == []


def test_over_threshold_older_messages_become_one_summary_after_the_system_prompt(cache):
    condenser, summarize = make(cache, keep_last=4), FakeSummarizer("they talked")
    body = chat(5)  # system + 10 messages: 6 older, 4 kept
    new, mode = condenser.condense(body, summarize)
    assert mode == "summary"
    assert new["model"] == "gpt-4o"
    assert new["messages"][0] == body["messages"][0]
    assert new["messages"][1] == {"role": "system", "content": SUMMARY_PREFIX + "they talked"}
    assert new["messages"][2:] == body["messages"][-4:]
    assert len(summarize.calls) == 1
    instruction, transcript = summarize.calls[0]
    assert instruction["role"] == "system" and "512 tokens" in instruction["content"]
    assert transcript["role"] == "user"
    assert "user: user message 0" in transcript["content"]
    assert "assistant: assistant message 2" in transcript["content"]
    assert "message 3" not in transcript["content"]  # the kept tail is not summarized


def test_leading_system_and_developer_messages_are_all_kept_in_order(cache):
    condenser, summarize = make(cache), FakeSummarizer("s")
    body = chat(5, system=False)
    body["messages"][:0] = [{"role": "system", "content": "a"},
                            {"role": "developer", "content": "b"}]
    new, _ = condenser.condense(body, summarize)
    assert [m["role"] for m in new["messages"][:3]] == ["system", "developer", "system"]
    assert new["messages"][2]["content"] == SUMMARY_PREFIX + "s"


def test_without_a_system_prompt_the_summary_comes_first(cache):
    condenser = make(cache)
    new, mode = condenser.condense(chat(5, system=False), FakeSummarizer("s"))
    assert mode == "summary"
    assert new["messages"][0] == {"role": "system", "content": SUMMARY_PREFIX + "s"}
    assert len(new["messages"]) == 5


def test_nothing_older_than_the_kept_tail_leaves_the_body_alone(cache):
    """A chat that is long because of two huge messages has nothing to summarize."""
    condenser, summarize = make(cache, keep_last=4), FakeSummarizer()
    body = {"messages": [{"role": "system", "content": "s"}, msg("user", 0, 5000),
                         msg("assistant", 0, 5000)]}
    assert condenser.condense(body, summarize) == (body, None)
    assert condenser.condense(body, summarize, force=True) == (body, None)
    assert summarize.calls == []


def test_force_condenses_a_chat_under_the_threshold(cache):
    """The upstream said the context is too long although our estimate was under."""
    condenser, summarize = make(cache, threshold_tokens=100_000, keep_last=2), FakeSummarizer()
    new, mode = condenser.condense(chat(2), summarize, force=True)
    assert mode == "summary"
    assert len(new["messages"]) == 1 + 1 + 2
    assert len(summarize.calls) == 1


def test_the_input_body_is_not_mutated_by_summary_or_truncation(cache):
    body = chat(6)
    before = copy.deepcopy(body)
    make(cache).condense(body, FakeSummarizer())
    make(cache, fallback="truncate").condense(
        body, FakeSummarizer(error=UpstreamError("down")), force=True)
    assert body == before


def test_an_empty_summary_counts_as_a_failure_and_falls_back(cache):
    condenser = make(cache)
    new, mode = condenser.condense(chat(5), FakeSummarizer("   "))
    assert mode == "truncate"
    assert condenser.stats()["failures"] == 1
    assert len(cache) == 0  # nothing useless was cached


# -- caching across turns ---------------------------------------------------------------------

def test_the_same_older_messages_reuse_the_cached_summary_without_calling_the_model(cache):
    """A retry, a regenerated answer, or a forced re-condense sends the same older set."""
    condenser, summarize = make(cache), FakeSummarizer("cached summary")
    first, _ = condenser.condense(chat(5), summarize)
    again, mode = condenser.condense(chat(5), summarize)
    assert mode == "summary" and again == first
    assert len(summarize.calls) == 1
    assert condenser.stats()["summary_cache_hits"] == 1


def test_the_cache_key_is_the_sha256_of_the_older_messages_with_sorted_keys(cache):
    condenser = make(cache, keep_last=4)
    body = chat(5)
    condenser.condense(body, FakeSummarizer("s"))
    older = body["messages"][1:7]
    key = hashlib.sha256(orjson.dumps(older, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert Condenser.summary_key(older) == key
    assert cache.get(key).value == b"s"
    reordered = copy.deepcopy(body)
    reordered["messages"] = [dict(reversed(list(m.items()))) for m in body["messages"]]
    summarize = FakeSummarizer()
    condenser.condense(reordered, summarize)
    assert summarize.calls == []  # key order inside a message does not change the key


def test_next_turn_with_step_1_is_a_miss_because_the_older_set_grew(cache):
    """With the default step=1 the tail is exactly the last keep_last messages, so the reply
    and the next question push two more messages into the older set: a new hash, a new summary.
    The earlier summary is not reused (it is not a prefix lookup)."""
    condenser, summarize = make(cache, keep_last=4), FakeSummarizer()
    body = chat(5)
    condenser.condense(body, summarize)
    body["messages"] += [msg("user", 5), msg("assistant", 5)]
    condenser.condense(body, summarize)
    assert len(summarize.calls) == 2


def test_next_turns_with_a_step_reuse_the_summary_until_the_older_set_moves(cache):
    """With step=4 the older set grows 4 messages at a time (the tail keeps 4 to 7 messages),
    so the turn after a summary, which adds two messages, has the same older set and hits; the
    turn after that moves the boundary and pays for one new summary."""
    condenser, summarize = make(cache, keep_last=4, step=4), FakeSummarizer()
    body = chat(4)                      # 8 non-system: older 4, tail 4
    new, _ = condenser.condense(body, summarize)
    assert len(new["messages"]) == 1 + 1 + 4
    body["messages"] += [msg("user", 4), msg("assistant", 4)]   # 10: older 4, tail 6
    new, mode = condenser.condense(body, summarize)
    assert mode == "summary" and len(new["messages"]) == 1 + 1 + 6
    assert len(summarize.calls) == 1
    body["messages"] += [msg("user", 5), msg("assistant", 5)]   # 12: older 8, tail 4
    condenser.condense(body, summarize)
    assert len(summarize.calls) == 2
    assert condenser.stats()["summary_cache_hits"] == 1


def test_an_expired_summary_is_made_again(cache, clock):
    condenser, summarize = make(cache), FakeSummarizer()
    condenser.condense(chat(5), summarize)
    clock.advance(3601)
    condenser.condense(chat(5), summarize)
    assert len(summarize.calls) == 2


def test_concurrent_identical_requests_share_one_summary_with_a_coalescer(cache):
    entered, release = threading.Event(), threading.Event()
    calls = []

    def slow_summarize(messages):
        calls.append(messages)
        entered.set()
        assert release.wait(5)
        return "shared"

    coalescer = Coalescer()
    condenser = make(cache, coalescer=coalescer, coalesce_timeout=5)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        condenser.condense(chat(5), slow_summarize))) for _ in range(2)]
    threads[0].start()
    assert entered.wait(5)
    threads[1].start()
    deadline = time.monotonic() + 5
    while coalescer.stats()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.001)  # until the second request is parked on the first one's flight
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(calls) == 1
    assert [mode for _, mode in results] == ["summary", "summary"]
    assert results[0][0] == results[1][0]
    stats = condenser.stats()
    assert (stats["summaries_made"], stats["summaries_shared"]) == (1, 1)


# -- tool-call turns --------------------------------------------------------------------------

def tool_chat():
    """system, 3 plain turns, then an assistant tool call with two results and a final answer."""
    messages = chat(3)["messages"] + [
        msg("user", 3),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "c2", "type": "function",
             "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C, cloudy " * 20},
        {"role": "tool", "tool_call_id": "c2", "content": "14:05"},
        {"role": "assistant", "content": "It is 18C and 14:05 in Paris."},
    ]
    return {"model": "gpt-4o", "messages": messages}


def test_the_kept_tail_never_starts_inside_a_tool_call_turn(cache):
    """keep_last=3 would start the tail at the second tool result; it extends back to the call."""
    condenser, summarize = make(cache, keep_last=3), FakeSummarizer("s")
    body = tool_chat()
    new, mode = condenser.condense(body, summarize)
    assert mode == "summary"
    tail = new["messages"][2:]
    assert tail[0]["role"] == "assistant" and len(tail[0]["tool_calls"]) == 2
    assert [m["role"] for m in tail] == ["assistant", "tool", "tool", "assistant"]
    transcript = summarize.calls[0][1]["content"]
    assert "get_weather" not in transcript and "user: user message 3" in transcript


def test_tool_calls_and_results_are_rendered_compactly_in_the_transcript(cache):
    condenser = make(cache)
    older = tool_chat()["messages"][7:11] + [
        {"role": "tool", "tool_call_id": "c9", "content": "x" * (TOOL_TEXT_LIMIT + 50)}]
    transcript = condenser.summary_request(older)[1]["content"]
    assert "user: user message 3" in transcript
    assert 'assistant called get_weather({"city":"Paris"})' in transcript
    assert 'assistant called get_time({"tz":"CET"})' in transcript
    assert "tool result (get_weather): 18C, cloudy" in transcript
    assert "tool result (get_time): 14:05" in transcript
    assert "tool result (tool): " + "x" * TOOL_TEXT_LIMIT + " ... [50 characters omitted]" \
        in transcript


def test_truncation_drops_a_tool_call_turn_whole(cache):
    """Truncation removes the call with its results, never a call without its results."""
    condenser = make(cache, keep_last=1, target_tokens=60)
    body = tool_chat()
    new, mode = condenser.condense(body, FakeSummarizer(error=UpstreamError("down")), force=True)
    assert mode == "truncate"
    roles = [m["role"] for m in new["messages"]]
    assert roles == ["system", "assistant"]
    assert new["messages"][-1] == body["messages"][-1]
    condenser = make(cache, keep_last=1, target_tokens=150)
    new, _ = condenser.condense(body, FakeSummarizer(error=UpstreamError("down")), force=True)
    assert [m["role"] for m in new["messages"]] == ["system", "assistant", "tool", "tool",
                                                    "assistant"]


# -- failure ----------------------------------------------------------------------------------

def test_a_failing_summarizer_falls_back_to_truncating_under_the_target(cache):
    condenser = make(cache, threshold_tokens=300, keep_last=4)  # target 225
    body = chat(8)
    new, mode = condenser.condense(body, FakeSummarizer(error=UpstreamError("summary model down")))
    assert mode == "truncate"
    assert condenser.estimate_tokens(new["messages"]) <= 225
    assert new["messages"][0] == body["messages"][0]
    assert new["messages"][1:] == body["messages"][-4:]  # oldest dropped, newest kept
    assert len(cache) == 0


def test_truncation_stops_at_the_last_message_even_if_still_over_the_target(cache):
    condenser = make(cache, threshold_tokens=300, keep_last=1)
    body = {"messages": [{"role": "system", "content": "s"}, msg("user", 0),
                         msg("assistant", 0), msg("user", 1, 5000)]}
    new, mode = condenser.condense(body, FakeSummarizer(error=UpstreamError("down")))
    assert mode == "truncate"
    assert new["messages"] == [body["messages"][0], body["messages"][-1]]


def test_fallback_none_reraises_the_summarizer_error(cache):
    condenser = make(cache, fallback="none")
    error = UpstreamError("summary model down", provider="openai")
    with pytest.raises(UpstreamError) as raised:
        condenser.condense(chat(5), FakeSummarizer(error=error))
    assert raised.value is error
    assert condenser.stats()["failures"] == 1
    with pytest.raises(SummaryFailed):
        condenser.condense(chat(5), FakeSummarizer(""))
    assert isinstance(SummaryFailed("x"), ProxyError)


def test_errors_that_are_not_proxy_errors_propagate_as_bugs(cache):
    condenser = make(cache)
    with pytest.raises(KeyError):
        condenser.condense(chat(5), FakeSummarizer(error=KeyError("bug")))
    assert condenser.stats()["truncations"] == 0


# -- upstream answers -------------------------------------------------------------------------

OPENAI_TOO_LONG = orjson.dumps({"error": {
    "message": "This model's maximum context length is 8192 tokens. However, your messages "
               "resulted in 9013 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
ANTHROPIC_TOO_LONG = orjson.dumps({"type": "error", "error": {
    "type": "invalid_request_error",
    "message": "prompt is too long: 208310 tokens > 200000 maximum"}})


def test_context_too_long_is_recognised_in_openai_and_anthropic_error_bodies():
    assert Condenser.is_context_too_long(400, OPENAI_TOO_LONG)
    assert Condenser.is_context_too_long(400, ANTHROPIC_TOO_LONG)
    assert Condenser.is_context_too_long(413, b'{"error": {"message": "Too many tokens in input"}}')
    assert Condenser.is_context_too_long(400, b"input exceeds the model's context length")


def test_other_errors_are_not_context_too_long():
    assert not Condenser.is_context_too_long(400, orjson.dumps({"error": {
        "message": "max_tokens is too large: 9000. This model supports at most 4096 completion "
                   "tokens.", "type": "invalid_request_error", "code": "invalid_value"}}))
    assert not Condenser.is_context_too_long(
        429, b'{"error": {"message": "too many tokens per min"}}')
    assert not Condenser.is_context_too_long(500, OPENAI_TOO_LONG)
    assert not Condenser.is_context_too_long(400, b"")


# -- bookkeeping ------------------------------------------------------------------------------

def test_stats_add_up_over_a_mix_of_outcomes(cache):
    """Every condensed request is exactly one of made / cache hit / shared / truncated."""
    condenser = make(cache)
    ok, down = FakeSummarizer(), FakeSummarizer(error=UpstreamError("down"))
    modes = [condenser.condense(chat(2), ok)[1],                # under threshold
             condenser.condense(chat(5), ok)[1],                # made
             condenser.condense(chat(5), ok)[1],                # cache hit
             condenser.condense(chat(6), down)[1],              # failure, truncated
             condenser.condense(chat(6), ok)[1]]                # made
    assert modes == [None, "summary", "summary", "truncate", "summary"]
    stats = condenser.stats()
    assert stats == {"summaries_made": 2, "summary_cache_hits": 1, "summaries_shared": 0,
                     "truncations": 1, "failures": 1}
    condensed = sum(mode is not None for mode in modes)
    assert condensed == (stats["summaries_made"] + stats["summary_cache_hits"]
                         + stats["summaries_shared"] + stats["truncations"])
    assert len(ok.calls) == stats["summaries_made"]


@pytest.mark.parametrize("kwargs", [{"keep_last": 0}, {"threshold_tokens": 0}, {"step": 0},
                                    {"fallback": "drop"}, {"target_tokens": 0},
                                    {"summary_max_tokens": 0}])
def test_invalid_settings_are_refused(cache, kwargs):
    with pytest.raises(ValueError):
        Condenser(cache, **kwargs)
