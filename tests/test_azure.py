"""Azure OpenAI: deployment URLs, api-version, the api-key header."""

import json

from tests.upstream import Stream, chat_chunks


def azure(url, **fields):
    return {"name": "azure", "type": "azure_openai", "base_url": url, "api_key_env": "AZ_KEY",
            "api_version": "2024-10-21", "models": ["gpt-4o-mini"], "aliases": {"fast": "prod-4o"},
            **fields}


def test_chat_goes_to_the_deployment_url_with_the_api_key_header(make_app, upstream, monkeypatch):
    monkeypatch.setenv("AZ_KEY", "azure-secret")
    app = make_app([azure(upstream.url)])
    response = app.test_client().post("/v1/chat/completions", json={
        "model": "fast", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": "Bearer client"})
    assert response.status_code == 200
    request = upstream.requests[0]
    assert request.path == "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    assert request.headers["api-key"] == "azure-secret"
    assert "Authorization" not in request.headers


def test_embeddings_and_streams_use_the_deployment_too(make_app, upstream):
    app = make_app([azure(upstream.url)])
    client = app.test_client()
    assert client.post("/v1/embeddings", json={"model": "gpt-4o-mini", "input": "x"}).status_code == 200
    upstream.script(Stream(chat_chunks("gpt-4o-mini", ["hey"])))
    body = client.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]}).data
    assert body.endswith(b"data: [DONE]\n\n")
    assert [r.path.split("?")[0] for r in upstream.requests] == [
        "/openai/deployments/gpt-4o-mini/embeddings",
        "/openai/deployments/gpt-4o-mini/chat/completions"]
    assert json.loads(upstream.requests[1].body)["stream"] is True
