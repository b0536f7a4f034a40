"""Talk to `mlxkv serve` with the official openai client (streaming and not).

    mlxkv serve &        # then:
    python examples/openai_client.py
"""

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
model = client.models.list().data[0].id

reply = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name three fruits."}], max_tokens=40,
    temperature=0)
print(reply.choices[0].message.content)
print("usage:", reply.usage)

stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Write a haiku about the sea."}],
    max_tokens=40, stream=True, stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
