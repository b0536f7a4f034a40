"""Structured outputs: llguidance masks inside the continuous batch, and over HTTP.

The engine runs a random tiny llama with SmolLM2's vocabulary and tokenizer (fast, and a
random model is the hardest case: only the mask keeps its output valid). The full 24-schema
sweep on SmolLM2 is benchmarks/bench_structured.py.
"""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from fake_engine import FakeEngine
from live_server import live_server
from test_protocol import CHAT, client

from mlxkv.config import CacheConfig, EngineConfig, SchedulerConfig
from mlxkv.errors import InvalidRequestError
from mlxkv.llm import LLM
from mlxkv.request import Request
from mlxkv.sampling import SamplingParams
from mlxkv.structured import StructuredOutputs, check_json_schema

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["a", "b"]}},
    "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
            "required": ["kind"], "additionalProperties": False}},
    "required": ["name", "age", "pet"], "additionalProperties": False}
SCHEMAS = [
    PERSON,
    {"type": "array", "minItems": 1, "maxItems": 3,
     "items": {"type": "number", "minimum": -1, "maximum": 1}},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": ["integer",
                                                                              "null"]}},
     "required": ["ok"], "additionalProperties": False},
    {"$defs": {"p": {"type": "object", "properties": {"x": {"enum": [1, 2]}},
                     "required": ["x"], "additionalProperties": False}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}, "required": ["a"],
     "additionalProperties": False},
]


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    from mlxkv.models.tiny import make_tiny_model

    return make_tiny_model("llama", vocab_size=49152), smol_tokenizer


def _llm(tiny) -> LLM:
    config = EngineConfig(cache=CacheConfig(num_blocks=256, block_size=4),
                          scheduler=SchedulerConfig(max_num_seqs=32))
    return LLM(config, loaded=tiny)


def _prompt(tok, text: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True))


@pytest.mark.parametrize("schema", [
    '{"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}',
    '{"type": "strnig"}',
    '{"type": "object"',
])
def test_uncompilable_schema_is_invalid_request_naming_the_problem(schema):
    with pytest.raises(InvalidRequestError) as exc:
        check_json_schema(schema)
    assert exc.value.param == "response_format"
    assert "schema" in str(exc.value)


@pytest.mark.anyio
async def test_bad_response_format_is_400():
    bad = [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}},
           {"type": "json_schema", "json_schema": {"name": "x"}},
           {"type": "xml"}]
    engine, c = client(FakeEngine())
    async with c:
        for fmt in bad:
            r = await c.post("/v1/chat/completions", json={**CHAT, "response_format": fmt})
            assert r.status_code == 400, fmt
            assert r.json()["error"]["param"] == "response_format"
    assert not engine.active


def test_mask_touches_only_constrained_rows(tiny):
    tok = tiny[1]
    outputs = StructuredOutputs(tok)
    free = Request("free", [1, 2], SamplingParams())
    bound = Request("bound", [1, 2], SamplingParams(json_schema=json.dumps(PERSON)))
    logits = mx.random.normal((2, 49152))
    masked = np.array(outputs.apply(logits, [free, bound]))
    assert np.array_equal(masked[0], np.array(logits[0]))
    allowed = np.isfinite(masked[1])
    # first token of {"name": ... must open the object
    assert 0 < allowed.sum() < 100
    assert all(tok.decode([int(t)]).lstrip().startswith("{") for t in np.flatnonzero(allowed))
    assert outputs.apply(logits, [free]) is logits


def test_batch_of_constrained_and_free_rows_all_valid(tiny):
    llm = _llm(tiny)
    tok = tiny[1]
    engine = llm.engine
    free_alone = llm.generate([_prompt(tok, "free text")],
                              SamplingParams(max_tokens=12, temperature=0))[0]["token_ids"]
    jobs = {}
    for i, schema in enumerate(SCHEMAS):
        for mode, temp in (("greedy", 0.0), ("sampled", 1.0)):
            rid = f"{mode}{i}"
            jobs[rid] = schema
            engine.add_request(rid, _prompt(tok, f"JSON {i}"), SamplingParams(
                max_tokens=80, temperature=temp, seed=i, n=2, json_schema=json.dumps(schema)))
    engine.add_request("free", _prompt(tok, "free text"),
                       SamplingParams(max_tokens=12, temperature=0))
    texts: dict[tuple[str, int], str] = {}
    ids: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            key = (out.request_id, out.index)
            texts[key] = texts.get(key, "") + out.new_text
            ids.setdefault(out.request_id, []).extend(out.new_token_ids if out.index == 0
                                                      else [])
            assert out.error is None, out.error
    for (rid, _index), text in texts.items():
        if rid != "free":
            jsonschema.validate(json.loads(text), jobs[rid])
    assert len(texts) == 2 * 2 * len(SCHEMAS) + 1
    assert ids["free"] == free_alone  # constrained neighbours do not change a free row
    assert engine.structured.num_live == 0


def test_prefix_hit_stop_string_and_streamed_deltas(tiny):
    llm = _llm(tiny)
    tok = tiny[1]
    prompt = _prompt(tok, "the same prompt twice " * 4)
    params = SamplingParams(max_tokens=80, temperature=0, json_schema=json.dumps(PERSON))
    first = llm.generate([prompt], params)[0]
    second = llm.generate([prompt], params)[0]
    assert second["num_cached_tokens"] > 0 and second["text"] == first["text"]
    jsonschema.validate(json.loads(first["text"]), PERSON)
    stopped = llm.generate([prompt], SamplingParams(
        max_tokens=80, temperature=0, json_schema=json.dumps(PERSON), stop=('"age"',)))[0]
    assert stopped["finish_reason"] == "stop"
    assert first["text"].startswith(stopped["text"]) and '"age"' not in stopped["text"]
    streamed = "".join(o.new_text for o in llm.stream(prompt, params))
    assert streamed == first["text"]


@pytest.fixture(scope="module")
def served(tiny):
    from mlxkv.async_engine import AsyncEngine
    from mlxkv.engine import LLMEngine

    engine = AsyncEngine(LLMEngine.from_config(
        EngineConfig(cache=CacheConfig(num_blocks=256, block_size=4)), loaded=tiny))
    engine.model_name = "tiny"
    from server.app import create_app

    openai = pytest.importorskip("openai")
    with live_server(create_app(engine)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    engine.shutdown()


def test_openai_parse_with_a_pydantic_model(served):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=120)
        pets: list[Pet] = Field(max_length=2)

    for temperature in (0.0, 1.0):
        completion = served.beta.chat.completions.parse(
            model="tiny", messages=[{"role": "user", "content": "A person, please."}],
            response_format=Person, max_tokens=120, temperature=temperature, seed=3, n=2)
        for choice in completion.choices:
            assert isinstance(choice.message.parsed, Person), choice.message.content
            assert choice.finish_reason == "stop"


def test_json_object_streamed_over_http(served):
    stream = served.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "JSON please"}], stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                 "strict": True}},
        max_tokens=120, temperature=1.0, seed=5)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(("tool_choice", "stream"), [(NAMED, True), ("required", False)])
def test_forced_tool_choice_makes_a_random_model_call_validly(served, tool_choice, stream):
    resp = served.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=120, temperature=1.0,
        seed=11, stream=stream)
    calls: dict[int, dict] = {}
    if stream:
        finish = None
        for chunk in resp:
            if not chunk.choices:
                continue
            finish = chunk.choices[0].finish_reason or finish
            for tc in chunk.choices[0].delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": None, "arguments": ""})
                entry["name"] = entry["name"] or tc.function.name
                entry["arguments"] += tc.function.arguments or ""
    else:
        finish = resp.choices[0].finish_reason
        calls = {i: {"name": tc.function.name, "arguments": tc.function.arguments}
                 for i, tc in enumerate(resp.choices[0].message.tool_calls)}
    assert calls and finish == "tool_calls"
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for call in calls.values():
        schema = tools[call["name"]]["function"]["parameters"]
        jsonschema.validate(json.loads(call["arguments"]), schema)
    if tool_choice == NAMED:
        assert [c["name"] for c in calls.values()] == ["get_weather"]
