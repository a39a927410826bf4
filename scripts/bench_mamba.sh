#!/usr/bin/env bash
# Mamba against a Llama-style transformer of about the same parameter count, training on the
# same data at T = 256 and T = 1024 (same tokens per step), in one run on this machine; then the
# selective scan alone: the fused flex kernel vs the chunked and the step-by-step tensor-op scans.
# Two Mamba blocks hold about the parameters of one transformer block (the paper's pairing), so
# the Mamba has twice the layers. Reports the median tokens/s after warm-up.
#   scripts/bench_mamba.sh            # 8 timed steps per run
#   STEPS=12 scripts/bench_mamba.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-8}"
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
        --set model.d_model=256 --set model.max_seq_len=1024 --set training.log_every=1 --set training.eval_every=0
        --set training.save_every=0 --set training.steps=1000 --set logging.progress=false --set eval.max_new_tokens=0)
printf "%-6s %-34s %10s %10s\n" T model params "tok/s"
for t in 256 1024; do
  batch=$((2048 / t))
  tps=()
  for model in "llama 4" "mamba 8"; do
    read -r arch layers <<<"$model"
    out="$WORK/$arch-$t"
    log="$("$BIN" train --config recipes/quickstart.toml --max-steps $((STEPS + 2)) "${COMMON[@]}" \
      --set run.output_dir="$out" --set model.arch="$arch" --set model.n_layers="$layers" \
      --set training.seq_len="$t" --set training.local_batch_size="$batch" 2>&1)"
    params="$(grep -oE '[0-9.]+M parameters' <<<"$log" | head -1)"
    desc="$(grep -oE "model: $arch [^,]+, d_model [0-9]+" <<<"$log" | sed 's/model: //')"
    tps+=("$(median_tps "$out/metrics.jsonl")")
    printf "%-6s %-34s %10s %10s\n" "$t" "$desc (B=$batch)" "${params% parameters}" "${tps[-1]}"
  done
  python3 -c "print(f'{\"\":6} mamba / transformer at T = $t: {${tps[1]} / ${tps[0]}:.2f}x')"
done
echo
"$BIN" bench scan --batch 2 --seq 256 --channels 512 --state 16
