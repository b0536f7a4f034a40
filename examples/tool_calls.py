"""Tool calls: a forced call, the tool's result sent back, and the model's final answer.

    mlxkv serve &        # then:
    python examples/tool_calls.py

tool_choice "auto" (the default) returns calls only for models whose chat template and
tokenizer define a tool-call format (mlx-lm's tool parsers); "required" or a named
function makes any model call, through the structured-output engine.
"""

import json

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
model = client.models.list().data[0].id
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]

reply = client.chat.completions.create(
    model=model, messages=messages, tools=tools, max_tokens=60,
    tool_choice={"type": "function", "function": {"name": "get_weather"}})
call = reply.choices[0].message.tool_calls[0]
print(reply.choices[0].finish_reason, call.function.name, json.loads(call.function.arguments))

# Streamed: the first delta of a call carries its id and name, later ones its arguments.
stream = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                        max_tokens=60, tool_choice="required", stream=True)
for chunk in stream:
    for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        print("delta:", tc.index, tc.id, tc.function.name, tc.function.arguments)

# Send the tool's result back; the chat template renders the call and the result.
messages += [reply.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
final = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                       max_tokens=40, temperature=0)
print("answer:", final.choices[0].message.content)
