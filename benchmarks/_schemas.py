"""24 JSON schemas for structured-output checks: (name, schema, one valid instance).

Nested objects, arrays, enums, bounded numbers, required/optional keys, $defs/$ref, anyOf,
const, patterns. Strings and arrays are bounded so that a valid completion fits a short
max_tokens even for a random-weight model sampling at temperature 1.
"""

from __future__ import annotations

S8 = {"type": "string", "maxLength": 8}


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False}


SCHEMAS: list[tuple[str, dict, object]] = [
    ("flat_string", _obj({"name": S8}), {"name": "Ada"}),
    ("int_bounded", _obj({"age": {"type": "integer", "minimum": 0, "maximum": 120}}),
     {"age": 36}),
    ("number_bounded", _obj({"score": {"type": "number", "minimum": -1, "maximum": 1}}),
     {"score": 0.5}),
    ("boolean", _obj({"ok": {"type": "boolean"}}), {"ok": True}),
    ("enum_string", _obj({"color": {"enum": ["red", "green", "blue"]}}), {"color": "red"}),
    ("enum_mixed", _obj({"v": {"enum": [1, "two", None, True]}}), {"v": "two"}),
    ("const", _obj({"kind": {"const": "point"}, "x": {"type": "integer", "minimum": 0,
                                                      "maximum": 9}}),
     {"kind": "point", "x": 3}),
    ("optional_keys", _obj({"a": S8, "b": {"type": "integer", "minimum": 0, "maximum": 99},
                            "c": {"type": "boolean"}}, required=["a"]), {"a": "x"}),
    ("all_optional", _obj({"p": {"type": "boolean"}, "q": S8}, required=[]), {}),
    ("nested_object", _obj({"user": _obj({"name": S8, "id": {"type": "integer", "minimum": 1,
                                                            "maximum": 999}})}),
     {"user": {"name": "bo", "id": 7}}),
    ("deep_nesting", _obj({"a": _obj({"b": _obj({"c": {"type": "boolean"}})})}),
     {"a": {"b": {"c": False}}}),
    ("int_array", _obj({"xs": {"type": "array", "maxItems": 4,
                               "items": {"type": "integer", "minimum": 0, "maximum": 9}}}),
     {"xs": [1, 2]}),
    ("enum_array", _obj({"tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                  "items": {"enum": ["a", "b", "c"]}}}), {"tags": ["a"]}),
    ("object_array", _obj({"items": {"type": "array", "maxItems": 2, "items": _obj(
        {"sku": S8, "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}}),
     {"items": [{"sku": "k1", "qty": 2}]}),
    ("top_level_array", {"type": "array", "minItems": 1, "maxItems": 3,
                         "items": {"type": "integer", "minimum": -5, "maximum": 5}}, [0, -1]),
    ("nullable", _obj({"n": {"type": ["integer", "null"], "minimum": 0, "maximum": 5}}),
     {"n": None}),
    ("any_of", _obj({"v": {"anyOf": [{"type": "boolean"}, {"enum": ["x", "y"]}]}}),
     {"v": "y"}),
    ("defs_ref", {"$defs": {"pt": _obj({"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                        "y": {"type": "integer", "minimum": 0,
                                              "maximum": 9}})},
                  **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
     {"a": {"x": 1, "y": 2}, "b": {"x": 0, "y": 0}}),
    ("pattern", _obj({"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}),
     {"code": "AB12"}),
    ("string_length", _obj({"s": {"type": "string", "minLength": 2, "maxLength": 4}}),
     {"s": "abc"}),
    ("exclusive_bounds", _obj({"t": {"type": "integer", "exclusiveMinimum": 0,
                                     "exclusiveMaximum": 4}}), {"t": 2}),
    ("mixed_record", _obj({"title": S8, "year": {"type": "integer", "minimum": 1900,
                                                 "maximum": 2030},
                           "genre": {"enum": ["drama", "comedy"]},
                           "rated": {"type": "boolean"}}, required=["title", "year"]),
     {"title": "Up", "year": 2009}),
    ("tool_args", _obj({"city": S8, "unit": {"enum": ["c", "f"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                       required=["city"]), {"city": "Paris", "unit": "c"}),
    ("free_keys", {"type": "object", "maxProperties": 2, "additionalProperties": False,
                   "patternProperties": {"^[a-z]{1,4}$": {"type": "integer", "minimum": 0,
                                                           "maximum": 9}}},
     {"k": 1}),
]
