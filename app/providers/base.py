"""What every provider adapter offers the gateway, and the shared upstream error mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import orjson

from app.errors import UpstreamError
from app.cache.replay import replay_events

ENDPOINTS = ("chat", "completions", "embeddings")
KEY_REFUSED = frozenset((401, 403))
MAX_LISTED_MODELS = 10000  # a model list past this is cut: a real one holds a few hundred
MAX_MODEL_ID = 256  # characters; a longer id is no model name


@dataclass
class Call:
    """One request as the gateway hands it to an adapter: the client's body, already validated."""
    endpoint: str  # chat, completions, embeddings
    body: dict
    raw: bytes | None = None  # the client's bytes, forwarded as they are where possible
    stream: bool = False


@dataclass
class Reply:
    """A whole answer in the OpenAI shape."""
    body: bytes
    status: int = 200
    headers: dict = field(default_factory=dict)
    usage: dict | None = None  # the upstream's token counts, OpenAI-shaped
    provider: str = ""  # the provider that answered (set by the gateway)


class ProviderAdapter:
    """Translates OpenAI-shaped calls to one provider's wire protocol and back.

    ``send`` returns a whole Reply; ``stream`` returns an iterator of OpenAI SSE events
    (``b"data: ...\\n\\n"``, the last one ``data: [DONE]``). Both raise UpstreamError for a
    failure another provider may not have, and UpstreamClientError for the client's fault.
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
        """An iterator of OpenAI SSE events; it fails before its first event if it fails early."""
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
    options = call.body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    try:
        events = list(replay_events(call.endpoint, orjson.dumps(answer),
                                    include_usage=include_usage))
    except (ValueError, TypeError, AttributeError):
        raise UpstreamError(f"provider {provider} sent an answer that cannot be replayed as a "
                            "stream", provider=provider, kind="protocol") from None
    return (event for event in events)  # a generator: the gateway closes what it relays
