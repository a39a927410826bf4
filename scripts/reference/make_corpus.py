"""A synthetic JSONL corpus of a given size for scripts/bench_data.sh: documents of Zipf-
distributed words (a vocabulary of 20,000 made-up words), 50 to 2,000 words each, with
punctuation, digits and paragraph breaks, one {"text": ...} record per line. Deterministic.

    python scripts/reference/make_corpus.py --mb 2048 --out corpus.jsonl
"""

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    weights = np.linspace(2.0, 0.2, len(letters))
    weights /= weights.sum()
    words = ["".join(rng.choice(letters, size=rng.integers(1, 11), p=weights)) for _ in range(20_000)]
    words = np.array(words)
    ranks = np.arange(1, len(words) + 1)
    zipf = 1.0 / ranks
    zipf /= zipf.sum()
    target = int(args.mb * 1e6)
    cdf = np.cumsum(zipf)
    suffixes = np.array(["", ".", ",", ".\n\n"])
    written = 0
    with open(args.out, "w", encoding="utf-8") as out:
        while written < target:
            # A block of words at a time (vectorised), cut into documents of 50 to 2,000 words.
            picked = words[np.minimum(np.searchsorted(cdf, rng.random(1 << 20)), len(words) - 1)]
            marks = rng.random(len(picked))
            suffix = suffixes[(marks < 0.06) * 1 + ((marks >= 0.06) & (marks < 0.1)) * 2 + ((marks >= 0.1) & (marks < 0.105)) * 3]
            tokens = np.char.add(picked, suffix).tolist()
            at = 0
            lines = []
            while at < len(tokens) and written < target:
                n = int(rng.integers(50, 2000))
                text = " ".join(tokens[at : at + n]).capitalize()
                at += n
                line = json.dumps({"text": text}) + "\n"
                lines.append(line)
                written += len(line)
            out.write("".join(lines))


if __name__ == "__main__":
    main()
