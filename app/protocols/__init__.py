"""The client protocols the proxy speaks besides OpenAI's Chat Completions: its front ends.

A front end's view (app/api/) parses its protocol's body into a ``Call`` whose ``endpoint``
names the protocol (``messages``: Anthropic Messages; ``responses``: OpenAI Responses), and the
pipeline serves it like any call: admit, cache, route, fallback. Per candidate provider, the
gateway asks ``send``/``stream`` here: a provider that speaks the protocol natively
(``ProviderAdapter.endpoints`` lists it) gets the call as it is, pass-through; any provider
that speaks Chat Completions gets it translated by the protocol's ``FrontEnd``: ``to_chat``
before, ``reply_from_chat`` / ``stream_from_chat`` after. Usage stays OpenAI-shaped on the
``Reply`` and the ``ProviderStream`` whatever the protocol, so limits and cost need no change.
"""

from __future__ import annotations

from app.errors import ProxyError, sse_error_event


class FrontEnd:
    """One client protocol: its translation to and from Chat Completions, and how a failure
    after its stream began is written."""

    endpoint = ""  # the Call.endpoint of this protocol

    def to_chat(self, call):
        """The ``chat`` Call that asks a Chat Completions provider the same; InvalidRequest for
        what cannot be translated."""
        raise NotImplementedError

    def reply_from_chat(self, call, reply):
        """A Chat Completions ``Reply`` to ``call`` written in this protocol (usage kept)."""
        raise NotImplementedError

    def stream_from_chat(self, call, stream):
        """A Chat Completions ``ProviderStream`` to ``call`` as this protocol's SSE events (a
        ``ProviderStream`` too: the usage travels beside the events)."""
        raise NotImplementedError

    def error_event(self, error: ProxyError) -> bytes:
        """The SSE event that ends a stream of this protocol which failed after it began."""
        raise NotImplementedError


class TranslatedStream:
    """A chat ``ProviderStream`` rewritten in a front end's protocol: ``events`` (a generator
    over ``chat_stream``) for the client, and beside them the chat stream's usage
    (OpenAI-shaped, the upstream's or its estimate), as the gateway reads it."""

    def __init__(self, events, chat_stream):
        self._events = events
        self._chat = chat_stream

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._events)

    def close(self):
        self._events.close()
        self._chat.close()  # an unstarted generator skips its finally

    @property
    def usage(self):
        return self._chat.usage

    @property
    def usage_estimated(self) -> bool:
        return self._chat.usage_estimated


FRONT_ENDS: dict[str, FrontEnd] = {}


def register(front_end: FrontEnd) -> FrontEnd:
    FRONT_ENDS[front_end.endpoint] = front_end
    return front_end


def serves(adapter, endpoint: str) -> bool:
    """Whether ``adapter`` can answer ``endpoint``: natively, or translated from Chat."""
    return endpoint in adapter.endpoints or (endpoint in FRONT_ENDS and "chat" in adapter.endpoints)


def send(adapter, call, model, request, attempts, *, retry=True):
    """``adapter``'s whole answer to ``call``, in ``call``'s protocol."""
    if call.endpoint in adapter.endpoints:
        return adapter.send(call, model, request, attempts, retry=retry)
    front = FRONT_ENDS[call.endpoint]
    reply = adapter.send(front.to_chat(call), model, request, attempts, retry=retry)
    return front.reply_from_chat(call, reply)


def stream(adapter, call, model, request, attempts, *, retry=True):
    """``adapter``'s stream for ``call``, in ``call``'s protocol."""
    if call.endpoint in adapter.endpoints:
        return adapter.stream(call, model, request, attempts, retry=retry)
    front = FRONT_ENDS[call.endpoint]
    return front.stream_from_chat(call, adapter.stream(front.to_chat(call), model, request,
                                                       attempts, retry=retry))


def error_event(endpoint: str, error: ProxyError) -> bytes:
    """The SSE event that ends a failed stream of ``endpoint``'s protocol."""
    front = FRONT_ENDS.get(endpoint)
    return front.error_event(error) if front is not None else sse_error_event(error)


from app.protocols.messages import MessagesFrontEnd  # noqa: E402  (Anthropic Messages)

register(MessagesFrontEnd())


from app.protocols.responses import ResponsesFrontEnd  # noqa: E402  (OpenAI Responses)

register(ResponsesFrontEnd())
