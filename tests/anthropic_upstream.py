"""A fake Anthropic upstream's answers, built from the anthropic package's own types.

``anthropic_answer`` is a FakeUpstream default that answers every ``POST /v1/messages`` like
the Messages API would; ``message`` and ``stream_events`` build the JSON body and the SSE
events of a given answer, so tests can script text, tool calls and stop reasons.
"""

from __future__ import annotations

import json

import anthropic.types as t

from tests.upstream import Reply, Stream


def message(*blocks, stop_reason="end_turn", stop_sequence=None, input_tokens=10,
            output_tokens=5, model="claude-test", id="msg_01test", **usage) -> t.Message:
    """An Anthropic Message; blocks are strings (text) or (id, name, input) tool uses."""
    content = [t.TextBlock(type="text", text=b) if isinstance(b, str)
               else t.ToolUseBlock(type="tool_use", id=b[0], name=b[1], input=b[2])
               for b in blocks]
    return t.Message(id=id, type="message", role="assistant", model=model, content=content,
                     stop_reason=stop_reason, stop_sequence=stop_sequence,
                     usage=t.Usage(input_tokens=input_tokens, output_tokens=output_tokens,
                                   **usage))


def reply(msg: t.Message) -> Reply:
    return Reply(body=msg.model_dump(mode="json"))


def error_reply(status: int, kind: str, text: str) -> Reply:
    """An Anthropic error answer, e.g. (400, "invalid_request_error", "...")."""
    body = t.ErrorResponse(type="error", error={"type": kind, "message": text},
                           request_id="req_test")
    return Reply(status=status, body=body.model_dump(mode="json"))


def stream_events(msg: t.Message, pieces: int = 3) -> list[bytes]:
    """The SSE events Anthropic sends for ``msg``: text and tool input in ``pieces`` deltas."""
    start = msg.model_copy(update={
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": t.Usage(input_tokens=msg.usage.input_tokens, output_tokens=1)})
    events = [t.RawMessageStartEvent(type="message_start", message=start), "ping"]
    for index, block in enumerate(msg.content):
        if block.type == "text":
            first = t.TextBlock(type="text", text="")
            deltas = [t.TextDelta(type="text_delta", text=p) for p in _split(block.text, pieces)]
        else:
            first = block.model_copy(update={"input": {}})
            deltas = [t.InputJSONDelta(type="input_json_delta", partial_json=p)
                      for p in _split(json.dumps(block.input), pieces)]
        events.append(t.RawContentBlockStartEvent(type="content_block_start", index=index,
                                                  content_block=first))
        events += [t.RawContentBlockDeltaEvent(type="content_block_delta", index=index, delta=d)
                   for d in deltas]
        events.append(t.RawContentBlockStopEvent(type="content_block_stop", index=index))
    events.append(t.RawMessageDeltaEvent(
        type="message_delta",
        delta={"stop_reason": msg.stop_reason, "stop_sequence": msg.stop_sequence},
        usage=t.MessageDeltaUsage(output_tokens=msg.usage.output_tokens)))
    events.append(t.RawMessageStopEvent(type="message_stop"))
    return [sse(e) for e in events]


def sse(event) -> bytes:
    """One event in Anthropic's wire form; "ping" for a keep-alive."""
    if event == "ping":
        return b'event: ping\ndata: {"type": "ping"}'
    payload = event if isinstance(event, dict) else event.model_dump(mode="json")
    return f"event: {payload['type']}\ndata: {json.dumps(payload)}".encode()


def error_event(kind: str, text: str) -> bytes:
    return sse({"type": "error", "error": {"type": kind, "message": text}})


COUNTED_TOKENS = 42  # what the fake's count_tokens answers, whatever it is asked


def anthropic_answer(recorded):
    """The default behaviour: "Hello from Claude", whole or streamed, for any model asked; and
    ``{"input_tokens": COUNTED_TOKENS}`` from ``POST /v1/messages/count_tokens``."""
    if recorded.path.endswith("/v1/messages/count_tokens"):
        return Reply(body={"input_tokens": COUNTED_TOKENS})
    if not recorded.path.endswith("/v1/messages"):
        return error_reply(404, "not_found_error", f"no route {recorded.path}")
    body = recorded.json()
    msg = message("Hello from Claude", model=body.get("model", "unknown"))
    return Stream(stream_events(msg)) if body.get("stream") else reply(msg)


def _split(text: str, pieces: int) -> list[str]:
    size = max(1, -(-len(text) // pieces))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]
