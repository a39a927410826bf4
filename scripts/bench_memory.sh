#!/usr/bin/env bash
# Peak memory and step time of activation checkpointing and mixed precision: a 6-layer d_model
# 512 Llama-style model (or T5 with ARCH=t5) at T = 512 and T = 2048 (4096 tokens per step), for each precision and
# checkpoint mode (none, full, selective: every second block), in one run on this machine. Peak RSS from /usr/bin/time -v
# (the whole process), step time the median after warm-up.
#   scripts/bench_memory.sh              # 4 timed steps per run, every precision
#   STEPS=6 PRECISIONS="fp32 bf16-mixed" MODES="none selective" scripts/bench_memory.sh
#   ARCH=t5 PRECISIONS=fp32 scripts/bench_memory.sh   # T5, 6 + 6 blocks, span corruption
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-4}"
PRECISIONS="${PRECISIONS:-fp32 bf16-mixed fp16-mixed}"
MODES="${MODES:-none full selective}"
ARCH="${ARCH:-llama}"
cargo build --release -q -p furnace-trainer
BIN="${CARGO_TARGET_DIR:-target}/release/furnace"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

median_step_s() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l]
# A step's time is the tokens it counted over its tokens/s (T5 counts the real input and target
# tokens, which vary by step).
times = [(b["tokens"] - a["tokens"]) / b["tokens_per_sec"] for a, b in zip(rows, rows[1:])]
times = times[1:] if len(times) > 2 else times  # skip warm-up steps
print(f"{statistics.median(times):.2f}")
PY
}

COMMON=(--set data.source='"stories"' --set data.num_examples=3000 --set data.tokenizer_vocab_size=4096
        --set model.d_model=512 --set model.n_layers=6 --set model.n_heads=8 --set model.max_seq_len=2048
        --set training.log_every=1 --set training.eval_every=0 --set training.save_every=0 --set training.steps=1000
        --set logging.progress=false --set eval.max_new_tokens=0)
if [ "$ARCH" = t5 ]; then
  # Spans of 8 tokens on average: T = 2048 stays within T5's 100 sentinels.
  COMMON+=(--set model.arch=t5 --set model.n_kv_heads=8 --set model.n_decoder_layers=6 --set training.mean_noise_span_length=8)
fi
printf "%-6s %-11s %-9s %14s %12s\n" T precision mode "peak RSS MB" "step s"
for t in 512 2048; do
  batch=$((4096 / t))
  for precision in $PRECISIONS; do
  for mode in $MODES; do
    out="$WORK/$t-$precision-$mode"
    /usr/bin/time -v -o "$WORK/time" "$BIN" train --config recipes/quickstart.toml --max-steps $((STEPS + 2)) "${COMMON[@]}" \
      --set run.output_dir="$out" --set training.seq_len="$t" --set training.local_batch_size="$batch" \
      --set activation_checkpoint.mode="$mode" --set runtime.precision="\"$precision\"" > "$WORK/log" 2>&1 || { cat "$WORK/log"; exit 1; }
    rss_kb="$(grep 'Maximum resident set size' "$WORK/time" | grep -oE '[0-9]+$')"
    printf "%-6s %-11s %-9s %14.0f %12s\n" "$t" "$precision" "$mode" "$(echo "$rss_kb / 1024" | bc -l)" "$(median_step_s "$out/metrics.jsonl")"
  done
  done
done
