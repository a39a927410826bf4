"""The reference for scripts/bench_data.sh: a JSONL corpus tokenized by Hugging Face's
`tokenizers` Python package (its batch encoding, on all cores), the same stream Furnace writes:
each document's text, preceded by end-of-text, written as uint16 tokens.

    pip install tokenizers numpy
    python scripts/reference/tokenize_jsonl.py --tokenizer tokenizer.json --input corpus.jsonl --out tokens.bin

Prints one JSON line: bytes read, tokens, seconds, MB/s and tokens/s.
"""

import argparse
import json
import os
import time

import numpy as np
from tokenizers import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--field", default="text")
    parser.add_argument("--batch", type=int, default=8192)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    tokenizer = Tokenizer.from_file(args.tokenizer)
    eos = tokenizer.token_to_id("<|endoftext|>")
    started = time.perf_counter()
    tokens = 0
    with open(args.input, "rb") as f, open(args.out, "wb") as out:

        def flush(texts: list[str]) -> int:
            ids = []
            for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
                ids.append(eos)
                ids.extend(encoding.ids)
            np.array(ids, dtype=np.uint16).tofile(out)
            return len(ids)

        texts = []
        for line in f:
            if line.strip():
                texts.append(json.loads(line)[args.field])
            if len(texts) == args.batch:
                tokens += flush(texts)
                texts = []
        if texts:
            tokens += flush(texts)
    seconds = time.perf_counter() - started
    size = os.path.getsize(args.input)
    print(json.dumps({"bytes": size, "tokens": tokens, "seconds": seconds, "mb_per_s": size / 1e6 / seconds, "tokens_per_s": tokens / seconds}))


if __name__ == "__main__":
    main()
