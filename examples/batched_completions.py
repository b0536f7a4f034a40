"""Several prompts in one /v1/completions request: each runs as its own request in the
continuous batch; choice i * n + j is fork j of prompt i.

    mlxkv serve &        # then:
    python examples/batched_completions.py
"""

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
model = client.models.list().data[0].id
prompts = ["The capital of France is", "Two plus two equals", "The sky is"]

reply = client.completions.create(model=model, prompt=prompts, max_tokens=8, temperature=0)
for choice in reply.choices:
    print(choice.index, repr(prompts[choice.index] + choice.text))
print("usage:", reply.usage)

texts = {}
for chunk in client.completions.create(model=model, prompt=prompts, max_tokens=8, n=2,
                                       temperature=0.8, seed=1, stream=True):
    for choice in chunk.choices:
        texts[choice.index] = texts.get(choice.index, "") + choice.text
for index, text in sorted(texts.items()):
    print(f"prompt {index // 2}, fork {index % 2}: {text!r}")
