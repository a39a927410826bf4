#!/usr/bin/env bash
# Data preparation at scale: a generated JSONL corpus (and its .zst) prepared by
# `furnace data prepare` (streamed, tokenized on all cores, into shards), against the same
# tokenizer driven by the `tokenizers` Python package's batch encoding over the same file, in the
# same run: MB/s, tokens/s, peak RSS, and the token counts (which must agree). Then 50 training
# steps on the shards, with the data wait per step (`data_wait_ms` in metrics.jsonl).
#
#   pip install tokenizers numpy
#   scripts/bench_data.sh            # SIZE_MB=2048, FURNACE=path/to/furnace, WORK=folder
set -euo pipefail
cd "$(dirname "$0")/.."
furnace="${FURNACE:-${CARGO_TARGET_DIR:-/var/tmp/furnace-target}/release/furnace}"
size_mb="${SIZE_MB:-2048}"
work="${WORK:-$(mktemp -d)}"
mkdir -p "$work"

if [ ! -s "$work/corpus.jsonl" ]; then
  python3 scripts/reference/make_corpus.py --mb "$size_mb" --out "$work/corpus.jsonl"
fi
[ -s "$work/corpus.jsonl.zst" ] || zstd -q -T0 -f "$work/corpus.jsonl" -o "$work/corpus.jsonl.zst"
"$furnace" data tokenizer --input "$work/corpus.jsonl" --sample-mb 64 --vocab-size 8192 --out "$work/tokenizer.json" >/dev/null

peak_mb() { sed -n 's/.*Maximum resident set size (kbytes): \([0-9]*\).*/\1/p' "$1" | awk '{printf "%.0f", $1/1024}'; }

recipe="$work/recipe.toml"
cat >"$recipe" <<TOML
[model]
arch = "gpt2"
d_model = 128
n_layers = 2
n_heads = 4
d_ff = 512
max_seq_len = 256

[data]
source = "files"
tokenizer = "$work/tokenizer.json"
val_fraction = 0.001

[training]
steps = 50
seq_len = 256
local_batch_size = 8
eval_every = 0
log_every = 10
TOML

echo "| preparer | input | MB | seconds | MB/s | M tokens/s | tokens | peak RSS MB |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for input in corpus.jsonl corpus.jsonl.zst; do
  rm -rf "$work/run-$input"
  /usr/bin/time -v "$furnace" data prepare --config "$recipe" --set "data.files=[\"$work/$input\"]" \
    --set "run.output_dir=$work/run-$input" >"$work/prepare-$input.log" 2>"$work/time-$input.log"
  python3 - "$work/prepare-$input.log" "$input" "$(peak_mb "$work/time-$input.log")" "$(stat -c %s "$work/corpus.jsonl")" <<'PY'
import re, sys
log, name, peak, size = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3], int(sys.argv[4])
tokens = sum(int(n) for n in re.findall(r"(\d+) (?:train|val) tokens", log))
seconds = float(re.search(r"read in ([0-9.]+) s", log).group(1))
print(f"| furnace | {name} | {size / 1e6:.0f} | {seconds:.1f} | {size / 1e6 / seconds:.1f} | {tokens / 1e6 / seconds:.2f} | {tokens} | {peak} |")
PY
done
/usr/bin/time -v python3 scripts/reference/tokenize_jsonl.py --tokenizer "$work/tokenizer.json" --input "$work/corpus.jsonl" \
  --out "$work/python-tokens.bin" >"$work/python.json" 2>"$work/time-python.log"
python3 - "$work/python.json" "$(peak_mb "$work/time-python.log")" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"| tokenizers (Python) | corpus.jsonl | {r['bytes'] / 1e6:.0f} | {r['seconds']:.1f} | {r['mb_per_s']:.1f} | {r['tokens_per_s'] / 1e6:.2f} | {r['tokens']} | {sys.argv[2]} |")
PY

"$furnace" train --config "$recipe" --set "data.files=[\"$work/corpus.jsonl\"]" --set "run.output_dir=$work/run-corpus.jsonl" \
  --set logging.progress=false >"$work/train.log" 2>&1
python3 - "$work/run-corpus.jsonl/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"data_wait_ms"' in l]
for r in rows:
    step_ms = r["tokens_per_sec"] and 1e3 * 8 * 256 / r["tokens_per_sec"]
    print(f"step {r['step']}: data_wait_ms {r['data_wait_ms']:.3f} of a {step_ms:.0f} ms step ({100 * r['data_wait_ms'] / step_ms:.3f}%)")
PY
