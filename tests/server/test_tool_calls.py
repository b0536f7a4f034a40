"""Tool calls: every mlx-lm tool parser driven by scripted FakeEngine output, through the
openai client (streamed and not); tool_choice none/auto/required/named; tool results."""

from __future__ import annotations

import importlib
import json

import pytest
from fake_engine import FakeEngine
from live_server import live_server
from test_protocol import CHAT, client

from mlxkv.config import ServerConfig
from server.app import create_app

openai = pytest.importorskip("openai")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}}]
ARGS = {"city": "Paris", "days": 2}

# One call to get_weather(city="Paris", days=2) in each family's own format (markers included).
SAMPLES = {
    "json_tools": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                  '"days": 2}}\n</tool_call>',
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
                   "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
    "glm47": "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
             "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>",
    "function_gemma": "<start_function_call>call:get_weather{city:<escape>Paris<escape>,"
                      "days:2}<end_function_call>",
    "gemma4": '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>',
    "kimi_k2": "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
               '<|tool_call_argument_begin|>{"city": "Paris", "days": 2}<|tool_call_end|>'
               "<|tool_calls_section_end|>",
    "longcat": "<longcat_tool_call>get_weather\n<longcat_arg_key>city</longcat_arg_key>\n"
               "<longcat_arg_value>Paris</longcat_arg_value>\n<longcat_arg_key>days"
               "</longcat_arg_key>\n<longcat_arg_value>2</longcat_arg_value>\n"
               "</longcat_tool_call>",
    "minimax_m2": '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">'
                  'Paris</parameter>\n<parameter name="days">2</parameter>\n</invoke>\n'
                  "</minimax:tool_call>",
    "minicpm5": '<function name="get_weather"><param name="city">Paris</param>'
                '<param name="days">2</param></function>',
    "muse_spark": '<atem:function_calls><atem:invoke name="get_weather"><atem:parameter '
                  'name="city">Paris</atem:parameter><atem:parameter name="days">2'
                  "</atem:parameter></atem:invoke></atem:function_calls>",
    "laguna": "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
              "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>",
    "mistral": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}',
    "pythonic": '<|tool_call_start|>[get_weather(city="Paris", days=2)]<|tool_call_end|>',
    "kimi_k3": '<|open|>tools<|sep|><|open|>call tool="get_weather" index="1"<|sep|>'
               '<|open|>argument key="city" type="string"<|sep|>Paris<|close|>argument<|sep|>'
               '<|open|>argument key="days" type="integer"<|sep|>2<|close|>argument<|sep|>'
               "<|close|>call<|sep|><|close|>tools<|sep|>",
}


def chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def use_family(engine: FakeEngine, family: str, text: str) -> FakeEngine:
    """Give the engine's tokenizer `family`'s markers and parser, and script `text`."""
    parser = importlib.import_module(f"mlx_lm.tool_parsers.{family}")
    tok = engine.tokenizer
    tok.tool_call_start, tok.tool_call_end = parser.tool_call_start, parser.tool_call_end
    tok.tool_parser = parser.parse_tool_call
    engine.script = chunks(text, 3)  # markers split across deltas
    return engine


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine()
    with live_server(create_app(engine, ServerConfig())) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), engine


def test_every_mlx_lm_parser_is_driven():
    import mlx_lm.tool_parsers as pkg

    shipped = {p.stem for p in importlib.resources.files(pkg).iterdir()
               if p.name.endswith(".py") and p.stem != "__init__"}
    assert shipped == set(SAMPLES), shipped ^ set(SAMPLES)


@pytest.mark.parametrize("family", list(SAMPLES))
def test_family_tool_calls_non_streamed_and_streamed(served, family):
    client_, engine = served
    use_family(engine, family, "Let me check. " + SAMPLES[family])
    resp = client_.chat.completions.create(model="fake-model", messages=CHAT["messages"],
                                           tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS
    assert engine.tokenizer.last_tools == TOOLS
    assert engine.last_params.skip_special_tokens is False  # markers are often special tokens

    stream = client_.chat.completions.create(model="fake-model", messages=CHAT["messages"],
                                             tools=TOOLS, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [tc for d in deltas for tc in (d.delta.tool_calls or [])]
    head, rest = calls[0], calls[1:]
    assert head.id and head.function.name == "get_weather" and head.function.arguments == ""
    assert rest and all(tc.id is None and tc.function.name is None for tc in rest)
    assert json.loads("".join(tc.function.arguments for tc in rest)) == ARGS
    assert "".join(d.delta.content or "" for d in deltas) == "Let me check."
    assert deltas[-1].finish_reason == "tool_calls"


@pytest.mark.anyio
async def test_text_without_markers_and_tool_choice_none_stay_content():
    engine = use_family(FakeEngine(), "json_tools", "Plain answer.")
    _, c = client(engine)
    async with c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "tools": TOOLS})
        assert r.json()["choices"][0]["message"] == {"role": "assistant",
                                                     "content": "Plain answer."}
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        engine.script = chunks(SAMPLES["json_tools"], 5)
        r = await c.post("/v1/chat/completions", json={**CHAT, "tools": TOOLS,
                                                       "tool_choice": "none"})
    body = r.json()["choices"][0]
    assert body["message"]["content"] == SAMPLES["json_tools"] and body["finish_reason"] == "stop"
    assert engine.tokenizer.last_tools is None  # "none": the template does not see the tools
    assert engine.last_params.json_schema is None
    assert engine.last_params.skip_special_tokens is True


@pytest.mark.anyio
async def test_named_and_required_tool_choice_constrain_and_parse():
    engine = FakeEngine()
    engine.script = chunks('{"city": "Paris", "days": 2}', 4)
    _, c = client(engine)
    named = {"type": "function", "function": {"name": "get_weather"}}
    async with c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "tools": TOOLS,
                                                       "tool_choice": named})
        assert json.loads(engine.last_params.json_schema) == TOOLS[0]["function"]["parameters"]
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == ARGS
        engine.script = chunks('[{"name": "get_time", "parameters": {"tz": "UTC"}}, '
                               '{"name": "get_weather", "parameters": {"city": "Paris"}}]', 7)
        r = await c.post("/v1/chat/completions", json={**CHAT, "tools": TOOLS,
                                                       "tool_choice": "required",
                                                       "stream": True})
    schema = json.loads(engine.last_params.json_schema)
    assert schema["minItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    events = [json.loads(b[6:]) for b in r.text.strip().split("\n\n") if b != "data: [DONE]"]
    calls = [tc for e in events for ch in e["choices"] for tc in ch["delta"].get("tool_calls", [])]
    assert [tc["function"]["name"] for tc in calls if "id" in tc] == ["get_time", "get_weather"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


BAD_TOOLS = [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "strnig"}}}], "tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("extra", "param"), BAD_TOOLS)
async def test_bad_tool_requests_are_400(extra, param):
    engine, c = client()
    async with c:
        r = await c.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert not engine.active


@pytest.mark.anyio
async def test_tool_results_round_trip_through_the_template():
    engine, c = client()
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    async with c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "messages": messages,
                                                       "tools": TOOLS})
    assert r.status_code == 200
    seen = engine.tokenizer.last_messages
    assert seen[1]["tool_calls"][0]["function"]["arguments"] == ARGS  # an object for templates
    assert seen[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}
