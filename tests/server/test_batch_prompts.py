"""Batched /v1/completions prompts and message validation, against the FakeEngine."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngine
from test_protocol import CHAT, client, sse_events


@pytest.mark.anyio
@pytest.mark.parametrize("role", ["user", "system", "tool"])
async def test_message_without_content_is_400_naming_the_field(role):
    _, c = client()
    body = {**CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": role}]}
    async with c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages.1.content" and "content" in err["message"]


@pytest.mark.anyio
async def test_assistant_with_tool_calls_may_omit_content():
    _, c = client()
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    async with c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "messages": msgs})
    assert r.status_code == 200


async def _single(c, prompt, n=1):
    r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": prompt,
                                              "max_tokens": 3, "n": n})
    return [ch["text"] for ch in r.json()["choices"]]


@pytest.mark.anyio
@pytest.mark.parametrize("prompts", [["abc", "hello", "z"], [[5, 6, 7], [9], [11, 12]]])
async def test_batched_prompts_each_get_their_own_choices(prompts):
    engine, c = client()
    async with c:
        alone = [await _single(c, p, n=2) for p in prompts]
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": prompts,
                                                  "max_tokens": 3, "n": 2})
        body = r.json()
        streamed = sse_events((await c.post("/v1/completions", json={
            "model": "fake-model", "prompt": prompts, "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}})).text)
    assert r.status_code == 200
    assert [ch["index"] for ch in body["choices"]] == list(range(2 * len(prompts)))
    assert [ch["text"] for ch in body["choices"]] == [t for texts in alone for t in texts]
    num_prompt = sum(len(p) if isinstance(p, list) else len(p) for p in prompts)
    assert body["usage"]["prompt_tokens"] == num_prompt
    assert body["usage"]["completion_tokens"] == 3 * 2 * len(prompts)
    texts: dict[int, str] = {}
    for e in streamed[:-2]:
        for ch in e["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert [texts[i] for i in sorted(texts)] == [ch["text"] for ch in body["choices"]]
    assert streamed[-2]["usage"] == body["usage"]
    assert not engine.active


@pytest.mark.anyio
async def test_one_refused_prompt_refuses_the_batch_and_leaks_nothing():
    engine = FakeEngine()
    _, c = client(engine)
    async with c:
        r = await c.post("/v1/completions", json={"model": "fake-model",
                                                  "prompt": [[5, 6], []], "max_tokens": 3})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": [],
                                                  "max_tokens": 3})
        assert r.status_code == 400
    assert not engine.active


@pytest.mark.anyio
async def test_engine_refusing_one_prompt_aborts_the_others():
    engine = FakeEngine(max_active=1)
    _, c = client(engine)
    async with c:
        r = await c.post("/v1/completions", json={"model": "fake-model",
                                                  "prompt": ["abc", "def"], "max_tokens": 3})
    assert r.status_code == 429
    assert not engine.active and len(engine.aborted) == 1
