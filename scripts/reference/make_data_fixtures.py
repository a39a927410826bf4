"""Parquet data files written by pyarrow (what Hugging Face `datasets` writes), as test fixtures.

    pip install pyarrow
    python scripts/reference/make_data_fixtures.py

Writes under tests/fixtures/data/:
- docs.jsonl: the documents, one {"id", "text"} record per line (json.dumps);
- docs.parquet: the same records, snappy-compressed, in row groups of 7 rows;
- docs_zstd.parquet: the same, zstd-compressed, one row group;
- chat.parquet: conversations, a `messages` column of lists of {role, content} structs;
- token files of other trainers, laid out as their writers lay them out: llm.c's
  (dev/data/data_common.py `write_datafile`: 256 int32 of header — magic, version, count — then
  uint16 tokens for GPT-2, uint32 for Llama 3), nanoGPT's (prepare.py: raw uint16) and
  Megatron-LM's indexed dataset (.bin of raw tokens, .idx: "MMIDIDX\\x00\\x00", version, dtype
  code, sequence and document counts, sequence lengths, byte pointers, document indices), and
  tokens.json with the tokens each holds.
The Rust tests in data/src/inputs.rs and data/src/shards.rs read each and must find the same
records and tokens.
"""

import json
import pathlib
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "data"


def documents() -> list[str]:
    docs = []
    for i in range(23):
        words = " ".join(f"word{(i * 7 + k) % 31}" for k in range(5 + i))
        docs.append(f"Document {i}: {words}.")
    docs.append('Quotes "inside", a backslash \\ and a tab\tcharacter.')
    docs.append("Unicode: naïve café, 東京, emoji 🔥, Ωmega.")
    docs.append("Two lines\nin one record.")
    return docs


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    docs = documents()
    with open(OUT / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, OUT / "docs.parquet", compression="snappy", row_group_size=7)
    pq.write_table(table, OUT / "docs_zstd.parquet", compression="zstd")
    conversations = [
        [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}] for i in range(5)
    ]
    pq.write_table(pa.table({"messages": conversations}), OUT / "chat.parquet")
    write_token_files()


def llmc_file(path: pathlib.Path, tokens: list[int], magic: int, version: int, dtype) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=dtype).tobytes())


def megatron_files(stem: pathlib.Path, sequences: list[list[int]]) -> None:
    uint16_code = 8
    with open(stem.with_suffix(".bin"), "wb") as f:
        for seq in sequences:
            f.write(np.array(seq, dtype=np.uint16).tobytes())
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * 2]).astype(np.int64)
    document_indices = np.arange(len(sequences) + 1, dtype=np.int64)
    with open(stem.with_suffix(".idx"), "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", uint16_code))
        f.write(struct.pack("<Q", len(sequences)))
        f.write(struct.pack("<Q", len(document_indices)))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(document_indices.tobytes())


def write_token_files() -> None:
    rng = np.random.default_rng(0)
    gpt2 = [50256] + rng.integers(0, 50257, size=300).tolist()
    llama3 = [128000] + rng.integers(0, 128256, size=200).tolist()
    nanogpt = rng.integers(0, 50257, size=257).tolist()
    sequences = [rng.integers(0, 32000, size=n).tolist() for n in (5, 17, 9)]
    llmc_file(OUT / "llmc_gpt2.bin", gpt2, 20240520, 1, np.uint16)
    llmc_file(OUT / "llmc_llama3.bin", llama3, 20240801, 7, np.uint32)
    np.array(nanogpt, dtype=np.uint16).tofile(OUT / "nanogpt.bin")
    megatron_files(OUT / "megatron_text_document", sequences)
    expected = {
        "llmc_gpt2.bin": gpt2,
        "llmc_llama3.bin": llama3,
        "nanogpt.bin": nanogpt,
        "megatron_text_document.bin": [t for s in sequences for t in s],
    }
    (OUT / "tokens.json").write_text(json.dumps(expected))


if __name__ == "__main__":
    main()
