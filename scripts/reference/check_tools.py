"""Tool calling end to end, through the official `openai` client against `furnace serve`: a model
fine-tuned with recipes/tools-quickstart.toml is asked held-out arithmetic questions with a
`calculator` tool offered (tool_choice "auto"); this script is the client that runs the tool and
sends its result back. It reports the share of calls that are well-formed and carry the question's
expression, and the share of final answers that are right, and fails below 95% / 90%.

Held-out questions are the task's held-out tenth of the problem space (the generator's hash,
SplitMix64, written out below), so none was seen in training.

    python scripts/reference/check_tools.py runs/tools-quickstart   # FURNACE=path/to/furnace
"""

import ast
import concurrent.futures
import json
import os
import pathlib
import random
import sys

import openai
from furnace_server import furnace_server

ROOT = pathlib.Path(__file__).resolve().parents[2]
FURNACE = os.environ.get("FURNACE", str(ROOT / "target" / "release" / "furnace"))
MASK = (1 << 64) - 1

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression of whole numbers with + - * and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "pattern": "^[0-9+*() -]+$"}},
            "required": ["expression"],
        },
    },
}


def splitmix_first(seed: int) -> int:
    state = (seed ^ 0x9E3779B97F4A7C15) + 0x9E3779B97F4A7C15 & MASK
    z = state
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK
    return z ^ (z >> 31)


def is_held_out(a: int, op: str, b: int) -> bool:
    """The generator's `Problem::is_held_out`: a fixed tenth of all problems."""
    seed = (a * 1_000_003 & MASK) ^ (b * 7919 & MASK) ^ ord(op)
    return splitmix_first(seed) % 10 == 0


def held_out_questions(count: int, digits: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    phrasings = ["What is {}?", "Compute {}.", "{} = ?", "Calculate {}."]
    out = []

    def operand() -> int:
        # As the generator draws them: the length first, so short numbers are as common as long.
        length = rng.randint(1, digits)
        return rng.randrange(10 ** (length - 1) if length > 1 else 0, 10**length)

    while len(out) < count:
        a, op, b = operand(), rng.choice("+-*"), operand()
        if is_held_out(a, op, b):
            expression = f"{a}{op}{b}"
            out.append((rng.choice(phrasings).format(expression), expression))
    return out


def calculate(expression: str) -> str:
    """The tool: + - * and parentheses over whole numbers, nothing else evaluated."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in (ast.Add, ast.Sub, ast.Mult):
            left, right = value(node.left), value(node.right)
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
        raise ValueError("not an expression")

    try:
        return str(value(ast.parse(expression, mode="eval").body))
    except (SyntaxError, ValueError):
        return "error: not an expression"


def ask(client: openai.OpenAI, question: str, expression: str) -> tuple[bool, bool, str]:
    """(well-formed call with the right arguments, right final answer, a line to show)."""
    messages = [{"role": "user", "content": question}]
    first = client.chat.completions.create(model="tools", messages=messages, tools=[CALCULATOR], tool_choice="auto", temperature=0, max_tokens=100)
    choice = first.choices[0]
    calls = choice.message.tool_calls or []
    if choice.finish_reason != "tool_calls" or len(calls) != 1 or calls[0].function.name != "calculator":
        return False, False, f"{question} → no call: {choice.message.content!r}"
    try:
        arguments = json.loads(calls[0].function.arguments)
    except json.JSONDecodeError:
        return False, False, f"{question} → arguments are not JSON: {calls[0].function.arguments!r}"
    right_call = arguments == {"expression": expression}
    result = calculate(str(arguments.get("expression", "")))
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].id, "type": "function", "function": {"name": "calculator", "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": result},
    ]
    final = client.chat.completions.create(model="tools", messages=messages, tools=[CALCULATOR], temperature=0, max_tokens=32)
    answer = (final.choices[0].message.content or "").strip()
    right_answer = answer == f"{expression}={calculate(expression)}"
    return right_call, right_answer, f"{question} → calculator({calls[0].function.arguments}) → {result} → {answer!r}"


def main() -> int:
    checkpoint = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "runs" / "tools-quickstart")
    count = int(os.environ.get("QUESTIONS", "200"))
    with furnace_server(FURNACE, checkpoint, "--served-model-name", "tools", "--max-num-seqs", "16") as address:
        client = openai.OpenAI(base_url=f"{address}/v1", api_key="unused")
        questions = held_out_questions(count, digits=3, seed=2026)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda q: ask(client, *q), questions))
    calls = sum(r[0] for r in results)
    answers = sum(r[1] for r in results)
    for _, _, line in results[:5]:
        print(" ", line)
    print(f"tool calls well-formed with the right arguments: {calls}/{count} = {100 * calls / count:.1f}% (target 95%)")
    print(f"final answers right after the tool's result:     {answers}/{count} = {100 * answers / count:.1f}% (target 90%)")
    return 0 if calls >= 0.95 * count and answers >= 0.90 * count else 1


if __name__ == "__main__":
    sys.exit(main())
