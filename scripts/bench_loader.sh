#!/usr/bin/env bash
# What training waits for its batches, two furnace builds alternating: a token file of SIZE_MB
# (nanoGPT's raw uint16, random tokens, read in place) is dropped from the page cache before
# each run, so batches are random windows of a cold file, as on a corpus larger than memory.
# Each run trains a GPT-2 of L2 d128 (bench_data.sh's) on BATCH × SEQ (8 × 256) for STEPS steps and
# prints `data_wait_ms` (per step, from metrics.jsonl) over steps 1–10 and over the rest, and
# the median step time.
#
#   pip install numpy
#   scripts/bench_loader.sh /path/to/furnace-before /path/to/furnace-after   # SIZE_MB=1024 STEPS=50 REPS=2 BATCH=8 SEQ=256
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 2 ]] || { echo "usage: $0 FURNACE_A FURNACE_B" >&2; exit 2; }
BINS=("$1" "$2")
SIZE_MB="${SIZE_MB:-1024}"
STEPS="${STEPS:-50}"
REPS="${REPS:-2}"
BATCH="${BATCH:-8}"
SEQ="${SEQ:-256}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

python3 - "$WORK/train.bin" "$SIZE_MB" <<'PY'
import sys
import numpy as np
rng = np.random.default_rng(0)
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(rng.integers(0, 8192, size=1 << 19, dtype=np.uint16).tobytes())
PY
python3 scripts/reference/make_corpus.py --mb 4 --out "$WORK/text.jsonl"
"${BINS[1]}" data tokenizer --input "$WORK/text.jsonl" --vocab-size 8192 --out "$WORK/tokenizer.json" >/dev/null

cat >"$WORK/recipe.toml" <<TOML
[model]
arch = "gpt2"
d_model = 128
n_layers = 2
n_heads = 4
d_ff = 512
max_seq_len = $SEQ

[data]
source = "files"
files = ["$WORK/train.bin"]
tokenizer = "$WORK/tokenizer.json"
val_fraction = 0.001

[training]
steps = $STEPS
seq_len = $SEQ
local_batch_size = $BATCH
eval_every = 0
log_every = 10

[logging]
progress = false
TOML

echo "| build | rep | data_wait_ms, steps 1–10 | data_wait_ms, steps 11–$STEPS | median step ms |"
echo "| --- | --- | --- | --- | --- |"
for rep in $(seq 1 "$REPS"); do
  for i in 0 1; do
    run="$WORK/run-$rep-$i"
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$WORK/train.bin"
    "${BINS[$i]}" train --config "$WORK/recipe.toml" --set "run.output_dir=$run" >"$run.log" 2>&1 || { tail -20 "$run.log"; exit 1; }
    python3 - "$run/metrics.jsonl" "$([ $i = 0 ] && echo A || echo B)" "$rep" "$((BATCH * SEQ))" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"data_wait_ms"' in l]
step_ms = [1e3 * int(sys.argv[4]) / r["tokens_per_sec"] for r in rows]
later = [r["data_wait_ms"] for r in rows[1:]]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {rows[0]['data_wait_ms']:.3f} | {statistics.mean(later):.3f} | {statistics.median(step_ms):.0f} |")
PY
  done
done
