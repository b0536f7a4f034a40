"""Reliability against the FakeEngine: schema fuzzing, random client disconnects, no leaks."""

from __future__ import annotations

import random
import time

import httpx
import pytest
import schemathesis
from fake_engine import FakeEngine
from hypothesis import HealthCheck, settings
from live_server import live_server

from mlxkv.config import ServerConfig
from server.app import create_app

ENGINE = FakeEngine()
APP = create_app(ENGINE, ServerConfig(max_tokens_limit=64))
SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", APP)


@SCHEMA.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_fuzz_never_5xx(case):
    response = case.call()
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_fuzz_left_engine_clean():
    assert ENGINE.is_healthy() and not ENGINE.active


def test_random_disconnects_abort_and_leak_nothing():
    engine = FakeEngine(delay=0.0005)
    rng = random.Random(1234)
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 12, "stream": True}
    completed = 0
    with live_server(create_app(engine, ServerConfig())) as url, httpx.Client(base_url=url) as c:
        for _ in range(500):
            cut = rng.randrange(0, 16)
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = 0
                for line in r.iter_lines():
                    if line:
                        lines += 1
                    if lines > cut:
                        break
                else:
                    completed += 1
        deadline = time.monotonic() + 10
        while engine.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.active, f"{len(engine.active)} requests leaked"
        # a client that read every token but left before [DONE] finished in the engine
        assert len(engine.aborted) + completed <= 500 and len(engine.aborted) > 300
        assert c.get("/health").status_code == 200
        ok = c.post("/v1/chat/completions", json={**body, "stream": False})
        assert ok.status_code == 200


@pytest.mark.parametrize("size", [1, 10_000])
def test_huge_and_odd_strings(size):
    engine = FakeEngine()
    app = create_app(engine, ServerConfig())
    from starlette.testclient import TestClient

    with TestClient(app) as tc:
        text = "\U0001F600\x00\u202e" * size
        r = tc.post("/v1/completions",
                    json={"model": "fake-model", "prompt": text, "max_tokens": 2})
        assert r.status_code in (200, 400)
        assert "Traceback" not in r.text
    assert not engine.active
