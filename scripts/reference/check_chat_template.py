"""The reference for chat templates: every rendering Furnace made of a conversation (messages,
tools, add_generation_prompt) is rendered again by transformers' own
`PreTrainedTokenizerFast.apply_chat_template(tokenize=False)` — its Jinja settings, its `tojson`,
its variables — and must be the same text.

Input: a JSON file, a list of {"template", "messages", "tools" (or null),
"add_generation_prompt", "bos_token", "eos_token", "rendered"}. Prints the count checked;
exits 1 showing each rendering that differs.

    pip install transformers        # no torch needed
    python scripts/reference/check_chat_template.py renderings.json
"""

import json
import sys

import tokenizers
import transformers


def tokenizer(bos: str, eos: str) -> transformers.PreTrainedTokenizerFast:
    vocab = {bos: 0, eos: 1, "[UNK]": 2}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token=bos, eos_token=eos, unk_token="[UNK]")


def main(path: str) -> int:
    with open(path) as f:
        cases = json.load(f)
    failures = 0
    for i, case in enumerate(cases):
        tok = tokenizer(case["bos_token"], case["eos_token"])
        theirs = tok.apply_chat_template(
            case["messages"],
            tools=case["tools"],
            chat_template=case["template"],
            add_generation_prompt=case["add_generation_prompt"],
            tokenize=False,
        )
        if theirs != case["rendered"]:
            failures += 1
            print(f"case {i}: transformers renders\n{theirs!r}\nFurnace rendered\n{case['rendered']!r}\n")
    print(f"{len(cases) - failures} of {len(cases)} renderings equal transformers'")
    return 1 if failures or not cases else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
