"""Talks to a running `cubeqwen serve` with the official `openai` Python client.

    pip install openai
    cubeqwen serve --port 8080 &
    python3 scripts/openai_client_check.py http://127.0.0.1:8080 [API_KEY]

Checks /v1/models, chat and completions with and without streaming (usage counts, the
streamed text equal to the unstreamed one at temperature 0), and that a bad value is a
BadRequestError naming the field. Exits non-zero on the first failure.
"""

import sys

import openai

base = sys.argv[1].rstrip("/") + "/v1"
client = openai.OpenAI(base_url=base, api_key=sys.argv[2] if len(sys.argv) > 2 else "none")

models = client.models.list()
model = models.data[0].id
print("model:", model)

messages = [{"role": "user", "content": "Say hello."}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
text = chat.choices[0].message.content
print("chat:", repr(text), chat.choices[0].finish_reason, chat.usage)
assert chat.usage.completion_tokens >= 1
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
parts, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
print("chat stream:", repr("".join(parts)), usage)
assert "".join(parts) == text, "streamed chat text differs"
assert usage.completion_tokens == chat.usage.completion_tokens

comp = client.completions.create(model=model, prompt="def fib(n):", max_tokens=8, temperature=0)
print("completion:", repr(comp.choices[0].text), comp.usage)
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=model, prompt="def fib(n):", max_tokens=8, temperature=0, stream=True
    )
    if c.choices
)
assert streamed == comp.choices[0].text, "streamed completion differs"

try:
    client.chat.completions.create(model=model, messages=messages, temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    print("bad request:", e.status_code, e.body)
    assert e.body["param"] == "temperature"

print("openai client: all checks passed")
