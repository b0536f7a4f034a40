"""Server protocol tests against the FakeEngine: endpoints, SSE framing, errors, limits, auth."""

from __future__ import annotations

import json

import httpx
import pytest
from fake_engine import FakeEngine

from mlxkv.config import ServerConfig
from server.app import create_app

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def client(engine=None, **config):
    engine = engine or FakeEngine()
    app = create_app(engine, ServerConfig(**config))
    return engine, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n")
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: ")
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.mark.anyio
async def test_models_health_metrics_cache_stats():
    engine, c = client()
    async with c:
        assert (await c.get("/v1/models")).json()["data"][0]["id"] == "fake-model"
        assert (await c.get("/health")).json()["status"] == "ok"
        metrics = (await c.get("/metrics")).text
        assert "mlxkv_time_to_first_token_seconds_bucket" in metrics
        assert "mlxkv_cache_blocks_free 10" in metrics
        assert (await c.get("/v1/cache/stats")).json()["blocks_total"] == 10
        engine.healthy = False
        assert (await c.get("/health")).status_code == 503


@pytest.mark.anyio
async def test_chat_non_stream_and_usage():
    engine, c = client()
    async with c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "n": 2, "extra_field": 1})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert [ch["index"] for ch in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"]["content"].count("t") == 3
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert not engine.active


@pytest.mark.anyio
async def test_chat_stream_framing_with_usage():
    _, c = client()
    async with c:
        r = await c.post("/v1/chat/completions",
                         json={**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert all(contents) and len(contents) == 3
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 3


@pytest.mark.anyio
async def test_completions_with_logprobs_stream_and_not():
    _, c = client()
    req = {"model": "fake-model", "prompt": "abc", "max_tokens": 2, "logprobs": 1}
    async with c:
        body = (await c.post("/v1/completions", json=req)).json()
        streamed = sse_events((await c.post("/v1/completions", json={**req, "stream": True})).text)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 2 and lp["token_logprobs"] == [-0.5, -0.5]
    assert lp["text_offset"][1] == len(lp["tokens"][0])
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == body["choices"][0]["text"]


BAD = [
    ({**CHAT, "model": "other"}, 404),
    ({**CHAT, "messages": []}, 400),
    ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ({**CHAT, "max_tokens": -1}, 400),
    ({**CHAT, "max_tokens": 10**9}, 400),
    ({**CHAT, "temperature": "hot"}, 400),
    ({**CHAT, "top_p": 0}, 400),
    ({**CHAT, "n": 1000}, 400),
    ({**CHAT, "stop": ["a"] * 100}, 400),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 400}]}, 400),
    ({**CHAT, "logprobs": True, "top_logprobs": 50}, 400),
    ({"messages": CHAT["messages"]}, 400),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("body", "status"), BAD)
async def test_bad_requests_get_openai_errors(body, status):
    engine, c = client()
    async with c:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == status
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert "Traceback" not in r.text
        assert (await c.get("/health")).status_code == 200
    assert not engine.active


@pytest.mark.anyio
@pytest.mark.parametrize("raw", [b"{bad json", b"\xff\xfe\x00", b"[1, 2]", b"null", b""])
async def test_malformed_bodies(raw):
    _, c = client()
    async with c:
        r = await c.post("/v1/chat/completions", content=raw,
                         headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.anyio
async def test_body_limit_api_key_and_overload():
    _, c = client(max_body_bytes=1000, api_key="s3cret")
    async with c:
        assert (await c.get("/v1/models")).status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert (await c.get("/v1/models", headers=auth)).status_code == 200
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer x"})).status_code == 401
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        assert (await c.post("/v1/chat/completions", json=big, headers=auth)).status_code == 413
        assert (await c.get("/health")).status_code == 200  # health needs no key
    _, c = client(FakeEngine(max_active=0))
    async with c:
        r = await c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429 and r.headers["retry-after"] == "2"


@pytest.mark.anyio
async def test_failure_in_one_request_is_reported_and_engine_lives():
    engine = FakeEngine()
    engine.fail_on = {1}
    _, c = client(engine)
    async with c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert '"generation_failed"' in r.text and r.text.endswith("data: [DONE]\n\n")
        r = await c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
        engine.fail_on = set()
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 200
    assert not engine.active


def test_non_loopback_bind_needs_explicit_flag():
    from mlxkv.errors import MlxkvError
    from server.serve import check_bind

    check_bind("127.0.0.1", False, None)
    check_bind("::1", False, None)
    with pytest.raises(MlxkvError):
        check_bind("0.0.0.0", False, None)
    check_bind("0.0.0.0", True, "key")
