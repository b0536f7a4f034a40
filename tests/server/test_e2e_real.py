"""End to end: the official openai client against a real uvicorn + AsyncEngine on SmolLM2."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest
from live_server import live_server

from mlxkv.config import CacheConfig, EngineConfig
from server.app import create_app

openai = pytest.importorskip("openai")

SYSTEM = "You are a terse assistant. Answer in at most one short sentence. " * 4


@pytest.fixture(scope="module")
def served(smollm2_dir):
    from mlxkv.async_engine import AsyncEngine
    from mlxkv.engine import LLMEngine
    from mlxkv.models.loader import load_model

    loaded = load_model(str(smollm2_dir), progress=False)
    engine = AsyncEngine(LLMEngine.from_config(EngineConfig(cache=CacheConfig(num_blocks=512)),
                                               loaded=loaded))
    with live_server(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        yield client, url, engine, loaded
    engine.shutdown()


def reference(loaded, messages, max_tokens):
    """mlx-lm's greedy answer for the same chat-template prompt."""
    from mlx_lm import stream_generate

    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    tokens = [r.token for r in stream_generate(loaded.model, loaded.tokenizer, ids,
                                               max_tokens=max_tokens)]
    eos = loaded.tokenizer.eos_token_ids
    tokens = [t for t in tokens if t not in eos]
    return loaded.tokenizer.decode(tokens)


def chat(client, content, **kw):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, **kw)


def test_chat_stream_and_non_stream_match_mlx_lm(served):
    client, _, _, loaded = served
    resp = chat(client, "What is the capital of France?")
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What is the capital of France?"}]
    assert resp.choices[0].message.content == reference(loaded, messages, 12)
    stream = chat(client, "What is the capital of France?", stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == resp.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_usage_reports_cached_tokens_for_repeated_system_prompt(served):
    client = served[0]
    chat(client, "Name a color.")
    again = chat(client, "Name a fruit.")
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert again.usage.total_tokens == again.usage.prompt_tokens + again.usage.completion_tokens


def test_n2_seed_reproducible_and_stop_strings(served):
    client = served[0]
    a = chat(client, "Tell me a story.", n=2, temperature=1.0, seed=42)
    b = chat(client, "Tell me a story.", n=2, temperature=1.0, seed=42)
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    full = chat(client, "List three animals.", max_tokens=20).choices[0].message.content
    assert "," in full
    stopped = chat(client, "List three animals.", stop=[","], max_tokens=20)
    assert stopped.choices[0].message.content == full[: full.index(",")]
    assert stopped.choices[0].finish_reason == "stop"


def test_disconnect_frees_blocks(served):
    _, url, _, _ = served
    with httpx.Client(base_url=url) as c:
        body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 200,
                "messages": [{"role": "user", "content": "Write a long poem about the sea."}]}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stats = c.get("/v1/cache/stats").json()
            if stats["blocks_used"] == 0 and stats["num_requests"] == 0:
                break
            time.sleep(0.1)
        assert stats["blocks_used"] == 0 and stats["num_requests"] == 0, stats
        assert c.get("/health").status_code == 200


def test_concurrent_clients_get_independent_correct_results(served):
    client, _, _, loaded = served
    questions = ["What is 2+2?", "Name a planet.", "What color is the sky?", "Say hello."]
    with cf.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: chat(client, q).choices[0].message.content, questions))
    for q, got in zip(questions, answers, strict=True):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        assert got == reference(loaded, messages, 12)


def test_json_object_and_schema_on_smollm2(served):
    client = served[0]
    resp = chat(client, "Describe a cat as a JSON object.", max_tokens=80,
                response_format={"type": "json_object"})
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    resp = chat(client, "The largest city in France, as JSON.", max_tokens=60, n=2,
                temperature=0.8, response_format={"type": "json_schema", "json_schema": {
                    "name": "city", "schema": schema, "strict": True}})
    for choice in resp.choices:
        value = json.loads(choice.message.content)
        assert set(value) == {"city", "population"} and isinstance(value["population"], int)
