"""What a chat request's `tools`, `tool_choice` and `response_format` ask of the engine.

`plan_output` returns an OutputPlan: the JSON schema the output must follow (None:
unconstrained), the factory of the per-choice parser (server/tool_calls.py) and whether
special tokens stay in the text. OpenAI's rules: "none" never calls
(the tools are not even shown to the template), "auto" (the default with tools) lets the
model choose and parses its family's markers, "required" and a named function force a call
through the structured-output engine. Invalid combinations raise InvalidRequestError.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from typing import Any, NamedTuple

from mlxkv.errors import InvalidRequestError
from server.tool_calls import ForcedFunction, ForcedRequired, PlainText, TaggedToolCalls

ANY_OBJECT = {"type": "object"}


def _function(tool: Any, i: int) -> dict:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if (not isinstance(tool, dict) or tool.get("type", "function") != "function"
            or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
            or not fn["name"]):
        raise InvalidRequestError(
            f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")
    params = fn.get("parameters", ANY_OBJECT)
    if not isinstance(params, dict):
        raise InvalidRequestError(f"tools[{i}].function.parameters must be an object", "tools")
    return fn


def _named(tool_choice: Any) -> str:
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError(
            "tool_choice must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    return fn["name"]


def family_parser(tokenizer) -> tuple[str, str, Callable] | None:
    """The model family's (start, end, parse) from mlx-lm's tool_parsers, or None.

    mlx-lm's TokenizerWrapper already chose the parser (tokenizer_config's
    `tool_parser_type`, else inferred from the chat template or vocab); a tokenizer that
    only names `tool_parser_type` is resolved the same way.
    """
    if getattr(tokenizer, "tool_parser", None) is not None and getattr(
            tokenizer, "tool_call_start", None):
        return tokenizer.tool_call_start, tokenizer.tool_call_end or "", tokenizer.tool_parser
    name = getattr(tokenizer, "tool_parser_type", None)
    if not name:
        return None
    module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    return module.tool_call_start, module.tool_call_end, module.parse_tool_call


def required_schema(functions: list[dict]) -> dict:
    """A non-empty list of calls, each {"name": one of the tools, "parameters": its schema}."""
    options = [{"type": "object",
                "properties": {"name": {"const": fn["name"]},
                               "parameters": fn.get("parameters", ANY_OBJECT)},
                "required": ["name", "parameters"], "additionalProperties": False}
               for fn in functions]
    return {"type": "array", "minItems": 1, "items": {"anyOf": options}}


def response_format_schema(response_format: Any) -> dict | None:
    """The JSON schema `response_format` asks for (None for text or when absent)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format.json_schema.schema must be a JSON "
                                      "schema object", "response_format")
        return schema
    raise InvalidRequestError("response_format.type must be 'text', 'json_object' or "
                              "'json_schema'", "response_format")


class OutputPlan(NamedTuple):
    """How to generate and read one chat request's output."""

    json_schema: str | None  # constrain the output to this schema (None: unconstrained)
    make_parser: Callable[[], Any]  # one parser per choice (server/tool_calls.py)
    # Tool-call markers are often special tokens (Mistral's [TOOL_CALLS], Gemma's
    # <|tool_call>): the text must keep them for the family parser to see them.
    skip_special_tokens: bool = True


def plan_output(tools: list | None, tool_choice: Any, response_format: Any,
                tokenizer) -> OutputPlan:
    """What `tools`, `tool_choice` and `response_format` ask for (see the module docstring).

    Raises:
        InvalidRequestError: a malformed tool, tool_choice or response_format.
    """
    schema = response_format_schema(response_format)
    functions = [_function(t, i) for i, t in enumerate(tools or [])]
    if tool_choice is not None and not functions:
        raise InvalidRequestError("tool_choice needs tools", "tool_choice")
    if not functions or tool_choice == "none":
        return OutputPlan(dump_schema(schema), PlainText)
    if tool_choice == "required":
        return OutputPlan(dump_schema(required_schema(functions)), ForcedRequired)
    if tool_choice in (None, "auto"):
        family = family_parser(tokenizer)
        if family is None or schema is not None:
            return OutputPlan(dump_schema(schema), PlainText)
        return OutputPlan(None, functools.partial(TaggedToolCalls, *family, tools), False)
    name = _named(tool_choice)
    match = [fn for fn in functions if fn["name"] == name]
    if not match:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools",
                                  "tool_choice")
    return OutputPlan(dump_schema(match[0].get("parameters", ANY_OBJECT)),
                      functools.partial(ForcedFunction, name))


def dump_schema(schema: dict | None) -> str | None:
    return None if schema is None else json.dumps(schema)


def template_tool_call(call: Any) -> Any:
    """An OpenAI tool call as chat templates expect it: arguments as an object, not text."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**fn, "arguments": arguments}}
