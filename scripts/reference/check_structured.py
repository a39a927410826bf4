"""The reference for structured output: every reply Furnace sampled under a grammar is checked
by an independent implementation of that grammar's language.

- JSON Schema replies: parsed by Python's `json` and validated by the `jsonschema` package
  (Draft 2020-12, the draft OpenAI's structured outputs and llguidance follow);
- regular-expression replies: `re.fullmatch`;
- replies of the arithmetic Lark grammar (tests/fixtures/structured/expression.lark, a subset of
  Python's expressions): Python's own parser (`ast.parse(mode="eval")`), and nothing but
  numbers, operators and parentheses in the tree.

Input: a JSON file {"json_schema": [{"schema": PATH, "replies": [...]}, ...],
"regex": [{"pattern": P, "replies": [...]}], "expression": [...]}. Prints the count checked;
exits 1 naming each reply that fails.

    pip install jsonschema
    python scripts/reference/check_structured.py replies.json
"""

import ast
import json
import re
import sys

import jsonschema


def expression_ok(text):
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    return all(isinstance(node, allowed) for node in ast.walk(tree))


def main(path):
    with open(path) as f:
        groups = json.load(f)
    failures, checked = [], 0
    for group in groups.get("json_schema", []):
        with open(group["schema"]) as f:
            schema = json.load(f)
        validator = jsonschema.Draft202012Validator(schema)
        for reply in group["replies"]:
            checked += 1
            try:
                errors = [e.message for e in validator.iter_errors(json.loads(reply))]
            except json.JSONDecodeError as e:
                errors = [f"not JSON: {e}"]
            if errors:
                failures.append(f"{group['schema']}: {reply!r}: {errors}")
    for group in groups.get("regex", []):
        for reply in group["replies"]:
            checked += 1
            if not re.fullmatch(group["pattern"], reply):
                failures.append(f"regex {group['pattern']!r}: {reply!r} does not match")
    for reply in groups.get("expression", []):
        checked += 1
        if not expression_ok(reply):
            failures.append(f"expression: {reply!r} is not an arithmetic expression")
    for failure in failures:
        print(failure)
    print(f"{checked - len(failures)} of {checked} replies valid")
    sys.exit(1 if failures or checked == 0 else 0)


if __name__ == "__main__":
    main(sys.argv[1])
