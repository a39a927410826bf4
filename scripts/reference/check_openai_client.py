"""Proof by the official `openai` client: train a tiny Llama with furnace, serve it with
`furnace serve`, and talk to it as an OpenAI user would:
- models.list holds the served name;
- a completion with max_tokens 5 ends with "length" and exact usage counts, and its greedy text is
  `furnace generate --temperature 0`'s;
- chat returns role "assistant"; streamed chat (include_usage) gives the non-streamed text at
  temperature 0, one finish_reason, and a last chunk with usage and no choices;
- a stop string gives "stop" and is left out; logprobs are <= 0 and their tokens' bytes make the text;
- embeddings (the client's default base64 and floats alike) have the model's width;
- the same seed gives the same text; a bad parameter raises BadRequestError and the next request
  still succeeds;
- structured output: `chat.completions.parse` with a pydantic model (the client sends its strict
  JSON schema as response_format and parses the reply with pydantic) returns a valid instance;
- tool calling: a pydantic tool (`openai.pydantic_function_tool`) with tool_choice "required" comes
  back as a tool call whose arguments the client parses into the model; the client's own stream
  helper assembles the streamed tool-call deltas into the same call; a tool loop's turns (the
  assistant's call, the tool's result) are accepted.

    pip install openai
    python scripts/reference/check_openai_client.py      # FURNACE=path/to/furnace to pick a binary
"""

import os
import pathlib
import subprocess
import sys
import tempfile

import typing

import openai
import pydantic
from furnace_server import furnace_server

ROOT = pathlib.Path(__file__).resolve().parents[2]
FURNACE = os.environ.get("FURNACE", str(ROOT / "target" / "release" / "furnace"))

RECIPE = """
[run]
seed = 3
[model]
arch = "llama"
flavor = "tiny"
max_seq_len = 256
[data]
source = "stories"
num_examples = 300
num_val_examples = 10
tokenizer_vocab_size = 300
[training]
local_batch_size = 4
seq_len = 32
steps = 5
eval_every = 0
save_every = 0
[logging]
progress = false
peak_tflops = 1.0
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "tiny.toml").write_text(RECIPE)
        run = tmp / "run"
        subprocess.run([FURNACE, "train", "--config", str(tmp / "tiny.toml"), "--set", f"run.output_dir={run}"], check=True, capture_output=True)
        with furnace_server(FURNACE, str(run), "--served-model-name", "tiny") as address:
            check(openai.OpenAI(base_url=f"{address}/v1", api_key="unused"), run)
    print("openai client: ok")


def check(client: openai.OpenAI, run: pathlib.Path) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]

    prompt = "Once upon a time"
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    assert choice.finish_reason == "length", choice
    assert done.usage.completion_tokens == 5 and done.usage.total_tokens == done.usage.prompt_tokens + 5, done.usage
    generated = subprocess.run(
        [FURNACE, "generate", "--checkpoint", str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "5", "--ignore-eos"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert generated.rstrip("\n") == prompt + choice.text, (generated, choice.text)

    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.role == "assistant", chat
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens, chunks[-1]

    long = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    stop = long[6:8]
    stopped = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == long[: long.index(stop)], (stopped, stop, long)

    logged = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    entries = logged.choices[0].logprobs.content
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries), entries
    # A token may hold part of a character (`bytes:\\x..`); its bytes, joined, are the reply.
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == logged.choices[0].message.content

    vectors = client.embeddings.create(model="tiny", input=["Once upon a time", "The fox"]).data  # base64 by default
    floats = client.embeddings.create(model="tiny", input=["Once upon a time", "The fox"], encoding_format="float").data
    assert len(vectors) == 2 and len(vectors[0].embedding) == 64, vectors
    assert [v.embedding for v in vectors] == [v.embedding for v in floats]
    assert vectors[0].embedding != vectors[1].embedding

    sampled = [client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1], sampled

    try:
        client.completions.create(model="tiny", prompt=prompt, top_p=1.5)
        raise AssertionError("top_p = 1.5 was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "top_p", e.body
    assert client.completions.create(model="tiny", prompt=prompt, max_tokens=2).choices[0].finish_reason in ("length", "stop")

    class Shirt(pydantic.BaseModel):
        color: typing.Literal["red", "green", "blue"]
        size: typing.Literal["S", "M", "L"]
        quantity: int = pydantic.Field(ge=1, le=9)

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for seed in range(3):
        parsed = parse(model="tiny", messages=messages, response_format=Shirt, max_tokens=60, temperature=1.0, seed=seed)
        shirt = parsed.choices[0].message.parsed
        assert isinstance(shirt, Shirt) and 1 <= shirt.quantity <= 9, parsed

    class Calculator(pydantic.BaseModel):
        expression: str = pydantic.Field(pattern=r"^[0-9+*-]{1,8}$")

    tools = [openai.pydantic_function_tool(Calculator, name="calculator")]
    question = [{"role": "user", "content": "What is 2+3?"}]
    for seed in range(3):
        called = parse(model="tiny", messages=question, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=100, temperature=1.0, seed=seed)
        choice = called.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        call = choice.message.tool_calls[0]
        assert call.function.name == "calculator" and isinstance(call.function.parsed_arguments, Calculator), call
    stream_helper = getattr(client.chat.completions, "stream", None) or client.beta.chat.completions.stream
    with stream_helper(model="tiny", messages=question, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=100, temperature=1.0, seed=0) as events:
        final = events.get_final_completion()
    streamed_call = final.choices[0].message.tool_calls[0]
    first = parse(model="tiny", messages=question, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=100, temperature=1.0, seed=0)
    whole_call = first.choices[0].message.tool_calls[0]
    assert (streamed_call.function.name, streamed_call.function.arguments) == (whole_call.function.name, whole_call.function.arguments), (
        streamed_call,
        whole_call,
    )
    turns = question + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": whole_call.id, "type": "function", "function": {"name": "calculator", "arguments": whole_call.function.arguments}}]},
        {"role": "tool", "tool_call_id": whole_call.id, "content": "5"},
    ]
    answer = client.chat.completions.create(model="tiny", messages=turns, tools=tools, max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls"), answer


if __name__ == "__main__":
    sys.exit(main())
