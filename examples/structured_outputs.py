"""Structured outputs: JSON mode, a JSON schema, and openai's parse() with a pydantic model.

    mlxkv serve &        # then:
    python examples/structured_outputs.py
"""

import json
from typing import Literal

from openai import OpenAI
from pydantic import BaseModel, Field

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
model = client.models.list().data[0].id
ask = [{"role": "user", "content": "Describe a cat called Tom, aged 3, as JSON."}]

# 1. JSON mode: any JSON object.
reply = client.chat.completions.create(model=model, messages=ask, max_tokens=80,
                                       response_format={"type": "json_object"})
print("json_object:", json.loads(reply.choices[0].message.content))

# 2. A JSON schema, streamed: every token keeps the text a prefix of a valid document.
schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 30}}}
stream = client.chat.completions.create(
    model=model, messages=ask, max_tokens=60, stream=True,
    response_format={"type": "json_schema",
                     "json_schema": {"name": "pet", "schema": schema, "strict": True}})
print("json_schema:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))


# 3. openai's parse(): the schema comes from a pydantic model, the answer is parsed back.
class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)


completion = client.beta.chat.completions.parse(model=model, messages=ask, max_tokens=80,
                                                response_format=Pet)
print("parsed:", repr(completion.choices[0].message.parsed))
