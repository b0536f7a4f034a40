"""The `speculative` request field reaches the engine; usage.speculative sums the forks."""

from __future__ import annotations

import json

import httpx
import pytest
from fake_engine import FakeEngine

from mlxkv.config import ServerConfig
from server.app import create_app

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


class SpecFakeEngine(FakeEngine):
    """Per delta i of a speculating request: 2 (i + 1) drafts verified, i + 1 accepted."""

    async def generate(self, request_id, prompt_token_ids, params):
        async for out in super().generate(request_id, prompt_token_ids, params):
            if params.speculative:
                out.num_draft_tokens = 2 * out.num_generated_tokens
                out.num_accepted_tokens = out.num_generated_tokens
            yield out


def client():
    app = create_app(SpecFakeEngine(), ServerConfig())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.mark.anyio
async def test_usage_extension_non_streamed_and_streamed():
    want = {"draft_tokens": 12, "accepted_tokens": 6, "acceptance_rate": 0.5}  # 2 forks
    async with client() as c:
        body = (await c.post("/v1/chat/completions",
                             json={**CHAT, "n": 2, "speculative": True})).json()
        assert body["usage"]["speculative"] == want
        r = await c.post("/v1/chat/completions", json={
            **CHAT, "n": 2, "speculative": True, "stream": True,
            "stream_options": {"include_usage": True}})
        chunks = [json.loads(b[len("data: "):]) for b in r.text.strip().split("\n\n")[:-1]]
        assert chunks[-1]["usage"]["speculative"] == want
        plain = (await c.post("/v1/chat/completions", json=CHAT)).json()
        assert "speculative" not in plain["usage"]
        bad = await c.post("/v1/chat/completions", json={**CHAT, "speculative": "maybe"})
        assert bad.status_code == 400
