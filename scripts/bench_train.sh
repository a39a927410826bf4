#!/usr/bin/env bash
# Training throughput of Furnace vs a PyTorch CPU reference of the same model and step,
# on three shapes, in one run on this machine. Needs `pip install torch`.
#   scripts/bench_train.sh            # 8 timed steps per shape
#   STEPS=4 scripts/bench_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-8}"
THREADS="${THREADS:-2}"
cargo build --release -q -p furnace-trainer
BIN="${CARGO_TARGET_DIR:-target}/release/furnace"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# name layers d_model heads seq_len batch vocab
SHAPES=(
  "a:L4-d256-T256-B8-V4096 4 256 4 256 8 4096"
  "b:L4-d256-T256-B8-V50257 4 256 4 256 8 50257"
  "c:gpt2-124m-B4-T64 12 768 12 64 4 50257"
)

median_tokens_per_sec() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l]
rows = rows[2:] if len(rows) > 4 else rows  # skip warm-up steps
print(f"{statistics.median(r['tokens_per_sec'] for r in rows):.1f}")
PY
}

printf "%-26s %14s %14s %8s\n" shape "furnace tok/s" "pytorch tok/s" ratio
for entry in "${SHAPES[@]}"; do
  read -r name layers d heads t b v <<<"$entry"
  out="$WORK/$name"
  "$BIN" train --config recipes/gpt2-124m.toml --max-steps $((STEPS + 2)) \
    --set run.output_dir="$out" --set model.n_layers="$layers" --set model.d_model="$d" \
    --set model.n_heads="$heads" --set model.vocab_size="$v" --set model.max_seq_len=1024 \
    --set training.seq_len="$t" --set training.local_batch_size="$b" --set training.log_every=1 \
    --set training.eval_every=0 --set training.save_every=0 --set training.steps=1000 \
    --set data.num_examples=3000 --set data.tokenizer_vocab_size=2048 \
    --set runtime.threads="$THREADS" --set logging.progress=false --set logging.peak_tflops=1 >"$WORK/$name.log" 2>&1 \
    || { cat "$WORK/$name.log"; exit 1; }
  ours=$(median_tokens_per_sec "$out/metrics.jsonl")
  theirs=$(python3 scripts/reference/torch_train_bench.py --layers "$layers" --d-model "$d" --heads "$heads" \
    --seq-len "$t" --batch "$b" --vocab "$v" --steps "$STEPS" --threads "$THREADS" | awk '{print $2}')
  printf "%-26s %14s %14s %8.2f\n" "${name#*:}" "$ours" "$theirs" "$(python3 -c "print($ours/$theirs)")"
done
