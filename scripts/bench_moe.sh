#!/usr/bin/env bash
# Mixtral's sparse routing against the dense Llama of equal active parameters: E experts of
# width d_ff with top-k routing run k·d_ff of MLP per token, as one dense MLP of width k·d_ff.
# Same data, shapes and tokens per step, in one run on this machine; median tokens/s after
# warm-up. A dispatch that ran every expert on every token would be about E/k times slower.
#   scripts/bench_moe.sh              # 8 timed steps per run, 8 experts top 2
#   STEPS=12 EXPERTS=4 scripts/bench_moe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-8}"
EXPERTS="${EXPERTS:-8}"
TOP_K=2
D_FF=512
cargo build --release -q -p furnace-trainer
BIN="${CARGO_TARGET_DIR:-target}/release/furnace"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

median_tps() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l]
rows = rows[2:] if len(rows) > 4 else rows  # skip warm-up steps
print(f"{statistics.median(r['tokens_per_sec'] for r in rows):.0f}")
PY
}

COMMON=(--set data.source='"stories"' --set data.num_examples=3000 --set data.tokenizer_vocab_size=4096
        --set model.d_model=256 --set model.n_layers=4 --set model.max_seq_len=256 --set training.seq_len=256
        --set training.local_batch_size=8 --set training.log_every=1 --set training.eval_every=0
        --set training.save_every=0 --set training.steps=1000 --set logging.progress=false --set eval.max_new_tokens=0)
printf "%-44s %12s %10s\n" model "params" "tok/s"
tps=()
for model in "mixtral $D_FF" "llama $((TOP_K * D_FF))"; do
  read -r arch d_ff <<<"$model"
  out="$WORK/$arch"
  log="$("$BIN" train --config recipes/quickstart.toml --max-steps $((STEPS + 2)) "${COMMON[@]}" \
    --set run.output_dir="$out" --set model.arch="$arch" --set model.d_ff="$d_ff" \
    --set model.n_experts="$EXPERTS" --set model.experts_per_token="$TOP_K" 2>&1)"
  params="$(grep -oE '[0-9.]+M parameters' <<<"$log" | head -1)"
  desc="$(grep -oE "model: $arch [^|]+" <<<"$log" | sed 's/model: //; s/, [0-9.]*M parameters//')"
  t="$(median_tps "$out/metrics.jsonl")"
  tps+=("$t")
  printf "%-44s %12s %10s\n" "$desc d_ff $d_ff" "$params" "$t"
done
python3 -c "print(f'mixtral / dense of equal active parameters: {${tps[0]} / ${tps[1]}:.2f}x tokens/s')"
