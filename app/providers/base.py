"""What every provider adapter offers the gateway, and the shared upstream error mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import orjson

from app.errors import UpstreamError
from app.cache.condense import Condenser
from app.cache.replay import replay_events

ENDPOINTS = ("chat", "completions", "embeddings")
KEY_REFUSED = frozenset((401, 403))
MAX_LISTED_MODELS = 10000  # a model list past this is cut: a real one holds a few hundred
MAX_MODEL_ID = 256  # characters; a longer id is no model name
TEXT_FIELDS = ("content", "refusal", "reasoning_content")  # a message's or delta's answer text


@dataclass
class Call:
    """One request as the gateway hands it to an adapter: the client's body, already validated."""
    endpoint: str  # chat, completions, embeddings; messages, responses (app/protocols)
    body: dict
    raw: bytes | None = None  # the client's bytes, forwarded as they are where possible
    stream: bool = False
    # the client's protocol headers a native provider gets as sent (anthropic-version, ...)
    headers: dict = field(default_factory=dict)


@dataclass
class Reply:
    """A whole answer in the OpenAI shape."""
    body: bytes
    status: int = 200
    headers: dict = field(default_factory=dict)
    usage: dict | None = None  # the upstream's token counts, OpenAI-shaped
    provider: str = ""  # the provider that answered (set by the gateway)
    usage_estimated: bool = False  # the upstream sent no usage: ``usage`` is the proxy's estimate


class ProviderAdapter:
    """Translates OpenAI-shaped calls to one provider's wire protocol and back.

    ``send`` returns a whole Reply; ``stream`` returns a ``ProviderStream`` of OpenAI SSE events
    (``b"data: ...\\n\\n"``, the last one ``data: [DONE]``) with the answer's usage beside
    them. Both raise UpstreamError for a failure another provider may not have, and
    UpstreamClientError for the client's fault.
    """

    endpoints = ENDPOINTS
    lists_models = False  # whether ``list_models`` can ask the upstream

    def __init__(self, settings, http=None):
        self.settings = settings
        self.name = settings.name
        self.http = http

    def send(self, call: Call, model: str, request, attempts, *, retry: bool = True) -> Reply:
        """The whole answer; ``model`` is the provider's own name for the requested model.
        ``request`` gives the id and deadline; each upstream attempt counts in ``attempts``;
        ``retry``: whether a refused attempt may be made again here."""
        raise NotImplementedError

    def stream(self, call: Call, model: str, request, attempts, *, retry: bool = True):
        """A ``ProviderStream``: OpenAI SSE events, and the answer's usage beside them (a usage
        chunk only when the client asked ``include_usage``); it fails before its first event
        if it fails early."""
        raise NotImplementedError

    @property
    def missing_key(self) -> str:
        """The variable meant to hold this provider's key when it is unset; "" otherwise (a key
        is set, or the provider needs none: no ``api_key_env``, as for a local vLLM)."""
        s = self.settings
        return s.api_key_env if s.api_key_env and not s.api_key else ""

    def list_models(self, timeout: float) -> dict[str, int] | None:
        """The upstream's own models (id -> created, 0 when unknown), asked of it now; None when
        this provider cannot tell. UpstreamError when asking failed."""
        return None

    def close(self):
        if self.http is not None:
            self.http.close()

    def _get_model_list(self, url: str, headers: dict, timeout: float) -> dict:
        """One page of the upstream's model list, as JSON; UpstreamError for any other answer."""
        status, body = self.http.get(url, headers, timeout=timeout)
        if not 200 <= status < 300:
            raise UpstreamError(f"provider {self.name} answered HTTP {status}"
                                f"{self.key_hint(status)}", provider=self.name,
                                upstream_status=status, kind="status")
        answer = parse_json(body, self.name)
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
            raise UpstreamError(f"provider {self.name} sent a model list without a data list",
                                provider=self.name, kind="protocol")
        return answer

    def key_hint(self, status: int) -> str:
        """What to add to a refusal of our key when the variable meant to hold it is unset."""
        missing = self.missing_key
        if not missing or status not in KEY_REFUSED:
            return ""
        return f" (its key variable {missing} is unset)"


def listed_models(page: dict) -> dict[str, int]:
    """id -> created (epoch seconds, 0 when unknown) of a model list page: OpenAI's
    ``{"data": [{"id", "created"}]}`` or Anthropic's ``{"data": [{"id", "created_at"}]}``."""
    found = {}
    for item in page["data"][:MAX_LISTED_MODELS]:
        model = item.get("id") if isinstance(item, dict) else None
        if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_ID:
            found[model] = _created(item)
    return found


def _created(item: dict) -> int:
    created = item.get("created")
    if isinstance(created, int) and not isinstance(created, bool) and created >= 0:
        return created
    try:
        return max(0, int(datetime.fromisoformat(item["created_at"]).timestamp()))
    except (KeyError, TypeError, ValueError, OverflowError):
        return 0


def parse_json(body: bytes, provider: str):
    """Upstream JSON, or UpstreamError when the provider sent something else."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"provider {provider} sent an answer that is not JSON",
                            provider=provider, kind="protocol") from None


def replayed(call, answer, provider: str):
    """The SSE events of a whole chat or completion answer; UpstreamError when it is none."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise UpstreamError(f"provider {provider} sent JSON that is not an answer where a stream "
                            "was asked", provider=provider, kind="protocol")
    try:
        events = list(replay_events(call.endpoint, orjson.dumps(answer),
                                    include_usage=asked_usage(call)))
    except (ValueError, TypeError, AttributeError):
        raise UpstreamError(f"provider {provider} sent an answer that cannot be replayed as a "
                            "stream", provider=provider, kind="protocol") from None
    meter = UsageMeter()
    usage = answer.get("usage")
    if isinstance(usage, dict) and usage:
        meter.report(usage)
    else:
        meter.relayed = completion_chars(choices)
    return ProviderStream(call, (event for event in events), meter)


# --- the tokens an answer used -------------------------------------------------------------

def asked_usage(call) -> bool:
    """Whether the client asked for a stream's usage chunk (``stream_options.include_usage``)."""
    options = call.body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def estimate_tokens(text: str) -> int:
    """About four characters a token: the usual rule of thumb for English text."""
    return tokens_of_chars(len(text))


def tokens_of_chars(chars: int) -> int:
    """``estimate_tokens`` of a text known by its length (a stream's, counted as it went)."""
    return max(1, (chars + 3) // 4)


def estimated_prompt_tokens(call) -> int:
    """A call's prompt tokens, estimated: a chat's messages as condensation counts them
    (``Condenser.estimate_tokens``), a completion's prompt four characters a token (token ids
    count one each)."""
    if call.endpoint == "chat":
        return Condenser.estimate_tokens(call.body.get("messages"))
    prompt = call.body.get("prompt", call.body.get("input"))
    total = 0
    for part in (prompt if isinstance(prompt, list) and not _token_ids(prompt) else [prompt]):
        if isinstance(part, str):
            total += estimate_tokens(part)
        elif _token_ids(part):
            total += len(part)
    return total


def estimated_usage(call, completion_chars: int, known: dict | None = None) -> dict:
    """OpenAI-shaped usage for an answer whose upstream gave no final count: the counts it did
    give (``known``, e.g. Anthropic's at the start of a stream), the rest estimated from the
    prompt and the ``completion_chars`` characters of text answered."""
    known = known or {}
    prompt = _count(known.get("prompt_tokens")) or estimated_prompt_tokens(call)
    completion = max(_count(known.get("completion_tokens")),
                     tokens_of_chars(completion_chars) if completion_chars else 0)
    return {**known, "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_chars(choices) -> int:
    """The characters of text in an answer's or a chunk's choices (content, text, refusal,
    reasoning, tool call arguments), whatever their shape (anything else counts 0): what an
    estimate of the completion tokens counts. Plain loops: it runs on every streamed chunk."""
    chars = 0
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")
        chars += len(text) if isinstance(text, str) else 0
        part = choice.get("message") or choice.get("delta")
        if not isinstance(part, dict):
            continue
        for key in TEXT_FIELDS:
            text = part.get(key)
            chars += len(text) if isinstance(text, str) else 0
        calls = part.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            text = function.get("arguments") if isinstance(function, dict) else None
            chars += len(text) if isinstance(text, str) else 0
    return chars


def with_total(usage: dict) -> dict:
    """``usage`` with its ``total_tokens``, which some compatible servers leave out (the rate
    limits charge the total)."""
    if _count(usage.get("total_tokens")):
        return usage
    total = _count(usage.get("prompt_tokens")) + _count(usage.get("completion_tokens"))
    return {**usage, "total_tokens": total} if total else usage


def _count(value) -> int:
    """A token count as the upstream sent it, or 0 when it is none."""
    return value if type(value) is int and value > 0 else 0


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int for v in value)


class UsageMeter:
    """What one stream learnt of its answer's tokens as its events went by: the upstream's
    usage (OpenAI-shaped), whether that was its final count, and the characters of text
    relayed, for an estimate when the final count never came. Written by the adapter's event
    generator, read by its ``ProviderStream``."""

    __slots__ = ("usage", "final", "relayed")

    def __init__(self):
        self.usage: dict | None = None
        self.final = False
        self.relayed = 0

    def report(self, usage: dict, *, final: bool = True) -> None:
        """The upstream's counts; ``final=False`` for counts that may still grow (Anthropic's
        at the start of a stream)."""
        self.usage, self.final = with_total(usage), final

    def text(self, *texts) -> None:
        """Text relayed to the client (anything else is skipped)."""
        for text in texts:
            if isinstance(text, str):
                self.relayed += len(text)


class ProviderStream:
    """An adapter's stream: the OpenAI SSE events for the client, and beside them the answer's
    token counts, which the gateway's relay reads once the stream ended.

    The counts travel beside the events, not in them: a client that did not ask for the usage
    chunk never sees one, yet its tokens are charged. When the upstream gave no final count (it
    ignored ``include_usage``, or the stream broke off first), ``usage`` is estimated from the
    prompt and the text relayed, and ``usage_estimated`` says so.
    """

    def __init__(self, call, events, meter: UsageMeter):
        self._call = call
        self._events = events
        self._meter = meter

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._events)

    def close(self):
        self._events.close()

    @property
    def usage_estimated(self) -> bool:
        return not self._meter.final

    @property
    def usage(self) -> dict:
        meter = self._meter
        if meter.final:
            return meter.usage
        return estimated_usage(self._call, meter.relayed, meter.usage)
