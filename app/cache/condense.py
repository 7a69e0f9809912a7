"""Condensation of over-long chats: older turns summarized into one system message, or dropped.

The caller asks `needed(body)` (or learns from the upstream that the context is too long, see
`is_context_too_long`), then calls `condense(body, summarize)` and sets `X-Proxy-Condensed`
from the mode it returns. Wiring into the request path lives elsewhere.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace

import orjson

from app.cache import cache_scope
from app.errors import ProxyError, SummaryFailed

# The token estimate (see `Condenser.estimate_tokens`).
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4      # role and separators; OpenAI documents ~3-4 per message
NON_TEXT_PART_TOKENS = 85        # an image/audio/file part; OpenAI's low-detail image cost

SUMMARY_PREFIX = "Summary of the earlier conversation: "
TOOL_TEXT_LIMIT = 2000           # characters of one tool argument/result kept in the transcript

_SYSTEM_ROLES = ("system", "developer")
_TOOL_ROLES = ("tool", "function")
_CONTEXT_PHRASES = ("context_length_exceeded", "maximum context length", "prompt is too long",
                    "context length", "too many tokens")

SUMMARY_INSTRUCTION = (
    "You condense conversations so they can continue within a limited context window. "
    "Below is the transcript of the earlier part of a conversation between a user and an AI "
    "assistant, including any tool calls and their results. Write a faithful, concise summary "
    "of it in at most {max_tokens} tokens. Keep every fact, decision, name, number, file, "
    "code identifier and tool result that later turns may rely on, the user's instructions "
    "and preferences, and any open questions or unfinished tasks. Do not invent anything, do "
    "not answer or continue the conversation, and do not address the user. Write in the "
    "language of the conversation. Output only the summary."
)


class Condenser:
    """Shrinks a chat body that is over `threshold_tokens` (estimated), keeping its head and tail.

    Split: the leading system/developer messages are the head and always kept; of the rest,
    the last `keep_last` messages are the tail and kept; everything between is "older". The
    tail is never opened inside a tool-call turn: if it would start with tool results, it
    extends back to the assistant message holding the `tool_calls`.

    With `step` > 1 the older set grows `step` messages at a time (the tail holds between
    `keep_last` and `keep_last + step - 1` messages), so consecutive turns of a conversation
    share one older set and reuse its cached summary; with the default `step=1` the older set
    changes every turn (see `condense`).

    Summaries live in `summary_cache` (a `ByteCache`) under `summary_key(older)`. With a
    `coalescer` (`app.cache.Coalescer`), identical concurrent misses call `summarize` once and
    the others wait up to `coalesce_timeout` seconds for it; without one, both call it.

    Thread-safe: configuration is read-only after construction; the counters have a lock.
    """

    def __init__(self, summary_cache, *, threshold_tokens=12000, keep_last=6,
                 summary_max_tokens=512, fallback="truncate", target_tokens=None, step=1,
                 coalescer=None, coalesce_timeout=60.0):
        if threshold_tokens < 1 or summary_max_tokens < 1:
            raise ValueError("threshold_tokens and summary_max_tokens must be at least 1")
        if keep_last < 1 or step < 1:
            raise ValueError("keep_last and step must be at least 1")
        if fallback not in ("truncate", "none"):
            raise ValueError("fallback must be 'truncate' or 'none'")
        if target_tokens is not None and target_tokens < 1:
            raise ValueError("target_tokens must be at least 1")
        self.cache = summary_cache
        self.threshold_tokens = int(threshold_tokens)
        self.keep_last = int(keep_last)
        self.summary_max_tokens = int(summary_max_tokens)
        self.fallback = fallback
        self.target_tokens = int(target_tokens or threshold_tokens * 0.75)
        self.step = int(step)
        self.coalescer = coalescer
        self.coalesce_timeout = float(coalesce_timeout)
        self._lock = threading.Lock()
        self._counts = {"summaries_made": 0, "summary_cache_hits": 0, "summaries_shared": 0,
                        "truncations": 0, "failures": 0}

    # -- sizing ----------------------------------------------------------------------------

    @staticmethod
    def estimate_tokens(messages) -> int:
        """Estimated prompt tokens of `messages`.

        Per message: MESSAGE_OVERHEAD_TOKENS (4), plus ceil(chars / 4) over its text (string
        content, the `text` of list-of-parts content, and the name + arguments of its tool or
        function calls), plus NON_TEXT_PART_TOKENS (85) per non-text content part (image,
        audio, file). Real tokenizers give ~3-4.5 characters per token on English and code, so
        this errs towards over-counting, which condenses a little early rather than too late.
        """
        total = 0
        for message in messages or ():
            if not isinstance(message, dict):
                continue
            chars, parts = _text_size(message)
            total += (MESSAGE_OVERHEAD_TOKENS + -(-chars // CHARS_PER_TOKEN)
                      + parts * NON_TEXT_PART_TOKENS)
        return total

    def needed(self, body: dict) -> bool:
        """Whether the chat body's messages are estimated over `threshold_tokens`."""
        messages = body.get("messages")
        return isinstance(messages, list) and self.estimate_tokens(messages) > self.threshold_tokens

    # -- condensing ------------------------------------------------------------------------

    def condense(self, body: dict, summarize, *, force=False,
                 tenant=None) -> tuple[dict, str | None]:
        """(new body, "summary" | "truncate" | None): the body with its older messages condensed.

        `summarize(messages) -> str` receives `summary_request(older)` (ready to send to the
        summarizing model with `max_tokens=summary_max_tokens`) and returns the summary text;
        it raises a `ProxyError` on failure. Then, with `fallback="truncate"` the oldest
        non-system messages are dropped instead ("truncate"); with "none" the error is re-raised.
        Other exceptions are bugs and propagate. `force=True` condenses even under the
        threshold (the upstream said the context is too long).

        Returns (body, None), the very same object, when under the threshold without `force`
        or when nothing is older than the kept tail. Otherwise the input is not mutated: the
        result is a shallow copy with a new `messages` list whose message dicts are shared.

        Caching: the summary is stored under the hash of the older messages, so it is reused
        whenever a request arrives with exactly the same older set: a retry, a regenerated
        answer, a forced re-condense after the upstream refused, or another branch of the same
        history. With `step=1` the next turn of a growing conversation has two more messages
        (the reply and the new question), so its older set is two messages longer and it is a
        miss; with `step` > 1 the older set only moves every `step` messages, and the turns in
        between hit. The hash covers `tenant`'s id too unless the summary cache's scope is
        "shared" (`cache.scope`): one API key never gets a summary of another's conversation.
        """
        messages = body.get("messages")
        if not isinstance(messages, list) or not (force or self.needed(body)):
            return body, None
        head, older, tail = self.split(messages)
        if not older:
            return body, None
        try:
            summary = self._summary(older, summarize, cache_scope(self.cache.scope, tenant))
        except ProxyError:
            self._count("failures")
            if self.fallback == "none":
                raise
            return self._truncated(body, head, messages[len(head):]), "truncate"
        summary_message = {"role": "system", "content": SUMMARY_PREFIX + summary}
        return {**body, "messages": [*head, summary_message, *tail]}, "summary"

    def split(self, messages: list) -> tuple[list, list, list]:
        """(head, older, tail): leading system messages, the messages to condense, the kept tail."""
        n_head = 0
        while n_head < len(messages) and _role(messages[n_head]) in _SYSTEM_ROLES:
            n_head += 1
        rest = messages[n_head:]
        cut = max(0, len(rest) - self.keep_last)
        cut -= cut % self.step
        while 0 < cut < len(rest) and _role(rest[cut]) in _TOOL_ROLES:
            cut -= 1  # back to the assistant message that made the calls
        return messages[:n_head], rest[:cut], rest[cut:]

    def summary_request(self, messages) -> list[dict]:
        """The messages for the summarizing model: an instruction and the older turns as text."""
        names = {}
        lines = []
        for message in messages:
            if isinstance(message, dict):
                lines.append(_render(message, names))
        return [
            {"role": "system",
             "content": SUMMARY_INSTRUCTION.format(max_tokens=self.summary_max_tokens)},
            {"role": "user", "content": "Transcript:\n\n" + "\n\n".join(lines)},
        ]

    @staticmethod
    def summary_key(older: list, scope: str = "") -> str:
        """Hex sha256 of the older messages serialized with sorted keys, and of ``scope``
        (the API key's tenant id the summary is kept for; "" when every key shares it)."""
        digest = hashlib.sha256(b"scope:" + scope.encode() + b"\n" if scope else b"")
        digest.update(orjson.dumps(older, option=orjson.OPT_SORT_KEYS))
        return digest.hexdigest()

    @staticmethod
    def is_context_too_long(status: int, body: bytes) -> bool:
        """Whether an upstream 400/413 answer says the prompt exceeds the model's context.

        Recognises OpenAI's `context_length_exceeded` code and "maximum context length"
        message, Anthropic's "prompt is too long", and generic "context length" / "too many
        tokens" wording, anywhere in the (JSON or plain) body, case-insensitively.
        """
        if status not in (400, 413) or not body:
            return False
        text = body if isinstance(body, str) else bytes(body).decode("utf-8", "replace")
        text = text.lower()
        return any(phrase in text for phrase in _CONTEXT_PHRASES)

    def stats(self) -> dict:
        """Counters: each condensed request is one of summaries_made, summary_cache_hits,
        summaries_shared (a concurrent identical request's summary) or truncations; failures
        counts summarizer errors (each followed by a truncation, or re-raised)."""
        with self._lock:
            return dict(self._counts)

    # -- internals -------------------------------------------------------------------------

    def _summary(self, older: list, summarize, scope: str) -> str:
        key = self.summary_key(older, scope)
        entry = self.cache.get(key)
        if entry is not None:
            self._count("summary_cache_hits")
            return entry.value.decode("utf-8")

        def compute() -> bytes:
            text = summarize(self.summary_request(older))
            if not isinstance(text, str) or not text.strip():
                raise SummaryFailed("The summarizing model returned an empty summary.")
            value = text.strip().encode("utf-8")
            self.cache.set(key, value)  # a summary too big for the cache is still used
            self._count("summaries_made")
            return value

        if self.coalescer is None:
            return compute().decode("utf-8")
        value, shared = self.coalescer.run(key, compute, self.coalesce_timeout)
        if shared:
            self._count("summaries_shared")
        return value.decode("utf-8")

    def _truncated(self, body: dict, head: list, rest: list) -> dict:
        """The body minus its oldest tool-call groups, down to `target_tokens` or the last group."""
        groups = _groups(rest)
        tokens = self.estimate_tokens(head) + sum(self.estimate_tokens(g) for g in groups)
        first = 0
        while tokens > self.target_tokens and first < len(groups) - 1:
            tokens -= self.estimate_tokens(groups[first])
            first += 1
        self._count("truncations")
        return {**body, "messages": [*head, *(m for g in groups[first:] for m in g)]}

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


def _role(message) -> str | None:
    return message.get("role") if isinstance(message, dict) else None


def _groups(messages: list) -> list[list]:
    """Messages in droppable units: an assistant message with its tool results is one unit."""
    groups: list[list] = []
    for message in messages:
        if groups and _role(message) in _TOOL_ROLES and _role(groups[-1][0]) == "assistant":
            groups[-1].append(message)
        else:
            groups.append([message])
    return groups


def _text_size(message: dict) -> tuple[int, int]:
    """(characters of text, number of non-text parts) in one message."""
    chars, parts = 0, 0
    content = message.get("content")
    if isinstance(content, str):
        chars += len(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                chars += len(part["text"])
            elif isinstance(part, str):
                chars += len(part)
            else:
                parts += 1
    for call in _calls(message):
        chars += len(call[0]) + len(call[1])
    return chars, parts


def _calls(message: dict) -> list[tuple[str, str, str | None]]:
    """(name, arguments, id) of the tool calls (or legacy function_call) an assistant made."""
    calls = []
    raw = list(message.get("tool_calls") or ())
    if isinstance(message.get("function_call"), dict):
        raw.append({"function": message["function_call"]})
    for call in raw:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            arguments = function.get("arguments")
            if not isinstance(arguments, str):
                arguments = orjson.dumps(arguments).decode() if arguments is not None else ""
            calls.append((str(function.get("name") or ""), arguments, call.get("id")))
    return calls


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    pieces = []
    for part in content:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        elif isinstance(part, str):
            pieces.append(part)
        else:
            pieces.append(f"[{part.get('type', 'part') if isinstance(part, dict) else 'part'}]")
    return "\n".join(pieces)


def _clip(text: str) -> str:
    if len(text) <= TOOL_TEXT_LIMIT:
        return text
    return text[:TOOL_TEXT_LIMIT] + f" ... [{len(text) - TOOL_TEXT_LIMIT} characters omitted]"


def _render(message: dict, names: dict) -> str:
    """One transcript entry: `role: text`, tool calls as `name(args)`, results with their tool.

    `names` maps tool-call ids to function names, filled as calls are seen, so a result can
    say which call it answers.
    """
    role = str(message.get("role") or "unknown")
    label = f"{role} ({message['name']})" if message.get("name") and role != "tool" else role
    text = _content_text(message.get("content"))
    if role in _TOOL_ROLES:
        tool = names.get(message.get("tool_call_id")) or message.get("name") or "tool"
        return f"tool result ({tool}): {_clip(text)}"
    lines = [f"{label}: {text}"] if text else []
    for name, arguments, call_id in _calls(message):
        if call_id:
            names[call_id] = name
        lines.append(f"{label} called {name}({_clip(arguments)})")
    return "\n".join(lines) or f"{label}: (empty)"


class Condensation:
    """Condensation, a step of the pipeline (app/pipeline): a chat over the threshold is
    condensed before it is sent (``prepared``), and one refused by the upstream as too long is
    condensed by force to be sent once more (``retried``). The summary is asked of
    ``summary_model`` (or the request's own model) through the gateway, so it gets the same
    routing, fallback and breakers as any call.
    """

    def __init__(self, condenser: Condenser, gateway, *, summary_model: str = "", enabled=True):
        self.condenser = condenser
        self.gateway = gateway
        self.summary_model = summary_model
        self.enabled = enabled

    @classmethod
    def from_settings(cls, settings, summary_cache, gateway, *, coalescer=None):
        """Condensation as the ``condense`` settings section describes it."""
        condenser = Condenser(summary_cache, threshold_tokens=settings.threshold_tokens,
                              keep_last=settings.keep_last, step=settings.step,
                              summary_max_tokens=settings.summary_max_tokens,
                              fallback=settings.fallback, coalescer=coalescer)
        return cls(condenser, gateway, summary_model=settings.summary_model,
                   enabled=settings.enabled)

    def prepared(self, call, request, attempts):
        """(the call as it goes upstream, how it was condensed: "" when it was not, the summary
        calls made for it): condensed when it is a chat over the threshold. The summary's
        upstream attempts count in ``attempts``; its (model, usage) is in the list returned,
        for the request's tenant to be charged (empty when nothing was summarized, or the
        summary came from the summary cache or from an identical request's call)."""
        if not self.enabled or call.endpoint != "chat" or not self.condenser.needed(call.body):
            return call, "", []
        return self._condensed(call, request, attempts, force=False)

    def retried(self, call, request, attempts, error):
        """(the call condensed by force, how, the summary calls made for it, as ``prepared``)
        when the upstream refused it as too long; else the upstream's error stands (it is
        raised)."""
        if (not self.enabled or call.endpoint != "chat"
                or not self.condenser.is_context_too_long(error.status, error.body())):
            raise error
        condensed, mode, spent = self._condensed(call, request, attempts, force=True)
        if condensed is call:
            raise error  # nothing older to condense (so no summary made): the error stands
        return condensed, mode, spent

    def _condensed(self, call, request, attempts, *, force):
        spent = []  # (model, usage) of the summary calls this request made
        summarize = self._summarizer(call, request, attempts, spent)
        body, mode = self.condenser.condense(call.body, summarize, force=force,
                                             tenant=request.tenant)
        if mode is None:
            return call, "", spent
        return replace(call, body=body, raw=None), mode, spent

    def _summarizer(self, call, request, attempts, spent):
        """The summarize function for one request; each summary call it makes notes its
        (model, usage) in ``spent``. Called only on a summary cache miss, and by one of
        identical concurrent requests (the coalescer's leader), so a summary is charged once."""
        def summarize(messages):
            body = {"model": self.summary_model or call.body["model"], "messages": messages,
                    "max_tokens": self.condenser.summary_max_tokens}
            summary_call = replace(call, body=body, raw=None, stream=False)
            reply = self.gateway.complete(summary_call, request, attempts)
            if reply.usage:  # noted before the answer is read: an answer without text cost too
                spent.append((body["model"], reply.usage))
            try:
                return orjson.loads(reply.body)["choices"][0]["message"]["content"]
            except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
                raise SummaryFailed("the summarizing model's answer had no text",
                                    kind="protocol") from None
        return summarize
