"""The official openai package, pointed at a live proxy, gets what OpenAI itself would give."""

import openai
import pytest

from tests.conftest import live_server, provider


@pytest.fixture
def client(make_app, upstream):
    app = make_app([provider(upstream.url, models=["gpt-test", "text-embedding-test"],
                             aliases={"fast": "gpt-test"})])
    with live_server(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="client-key", max_retries=0)


def test_chat_completion_through_the_sdk(client, upstream):
    answer = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello from upstream"
    assert answer.usage.total_tokens == 8
    assert upstream.requests[0].path == "/v1/chat/completions"
    assert upstream.requests[0].json()["messages"] == [{"role": "user", "content": "hi"}]


def test_streamed_chat_arrives_chunk_by_chunk(client):
    stream = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == ["Hello", " from", " upstream"]


def test_alias_is_sent_upstream_as_the_providers_model_name(client, upstream):
    answer = client.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "Hello from upstream"
    assert upstream.requests[0].json()["model"] == "gpt-test"


def test_legacy_completion(client):
    answer = client.completions.create(model="gpt-test", prompt="Say hello")
    assert answer.choices[0].text == "Hello there"


def test_streamed_legacy_completion(client):
    texts = [c.choices[0].text for c in client.completions.create(
        model="gpt-test", prompt="Say hello", stream=True)]
    assert "".join(texts) == "Hello there"


def test_embeddings(client):
    answer = client.embeddings.create(model="text-embedding-test", input=["a", "b"])
    assert [d.embedding for d in answer.data] == [[0.1, 0.2, 0.3]] * 2


def test_models_lists_names_and_aliases(client):
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["fast", "gpt-test", "text-embedding-test"]


def test_unknown_model_is_a_404_naming_what_exists(client, upstream):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert raised.value.body["code"] == "model_not_found"
    assert "gpt-test" in raised.value.body["message"]
    assert upstream.calls == 0


def test_the_client_key_is_not_forwarded_upstream(client, upstream):
    client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "x"}])
    assert "client-key" not in str(upstream.requests[0].headers)


def test_one_model_is_retrieved_through_the_sdk(client):
    model = client.models.retrieve("fast")
    assert (model.id, model.object, model.owned_by) == ("fast", "model", "up")
    assert isinstance(model.created, int)
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("nope")
    assert raised.value.body["code"] == "model_not_found"
