#!/usr/bin/env bash
# Continuous batching against one sequence at a time, on the same server binary and model: a
# GPT-2-124M-shaped model (one training step of recipes/gpt2-124m.toml: its weights are close to
# random, which is all a speed test needs), prompts of 32–512 tokens, 128 output tokens, at
# concurrency 1, 8 and 32 (scripts/bench_serve.py measures TTFT, TPOT, ITL and throughput), and
# the time to first token of prompts sharing a 256-token system prompt (prefix caching).
#
#   scripts/bench_serve.sh            # FURNACE=path/to/furnace, REQUESTS=32, OUTPUT=128
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/serve_bench.sh

"$furnace" train --config recipes/gpt2-124m.toml --set training.steps=1 --set training.eval_every=0 \
  --set logging.progress=false --set run.output_dir="$work/gpt2" >"$work/train.log" 2>&1

serve() { # max_num_seqs; sets $address
  "$furnace" serve --checkpoint "$work/gpt2" --port 0 --max-num-seqs "$1" --max-queue 1024 --kv-cache-mb 8192 >"$work/serve-$1.log" 2>&1 &
  servers+=($!)
  until grep -q '^serving' "$work/serve-$1.log"; do sleep 0.5; done
  address=$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$work/serve-$1.log")
}

serve 32
batched=$address
table_header
for c in 1 8 32; do
  result=$(bench "$batched" "$c")
  row "continuous batching (--max-num-seqs 32)" "$result"
  [ "$c" = 32 ] && batched32=$result
done
# Prefix caching: prompts that share a 256-token system prompt against prompts of the same
# lengths that share nothing, one at a time (TTFT is the prompt's cost).
prefix_row() { # label extra-args
  python3 scripts/bench_serve.py --url "$batched" --concurrency 1 --requests 16 --output 16 --vocab 400 "${@:2}" >"$work/prefix.json"
  python3 - "$1" "$(cat "$work/prefix.json")" <<'EOF'
import json, sys
label, r = sys.argv[1], json.loads(sys.argv[2])
print(f"| {label} | {r['ttft']['median_ms']:.0f} | {r['ttft']['mean_ms']:.0f} |")
EOF
}
echo
echo "| prompts (16, one at a time) | TTFT median ms | TTFT mean ms |"
echo "| --- | --- | --- |"
prefix_row "256 shared tokens + 32–64 own" --shared-prefix 256 --min-prompt 32 --max-prompt 64 --seed 1
prefix_row "288–320 own tokens" --min-prompt 288 --max-prompt 320 --seed 1
echo

serve 1
single=$address
single32=$(bench "$single" 32)
row "one sequence at a time (--max-num-seqs 1)" "$single32"
python3 - "$batched32" "$single32" <<'EOF'
import json, sys
a, b = (json.loads(x)["output_token_throughput"] for x in sys.argv[1:])
print(f"continuous batching / one at a time, output tokens/s at concurrency 32: {a / b:.2f}x")
EOF
