#!/usr/bin/env bash
# What DPO's frozen reference costs in memory: a GPT-2-small-shaped Llama (85.7M parameters,
# random init) takes 3 DPO steps on the arithmetic pairs, with LoRA adapters and with full
# fine-tuning, the reference run on the fly (kept as a model) or its log-probabilities
# precomputed (no model kept). Under LoRA the reference is the base with the adapters off, as
# TRL's: it should share the frozen weights and cost nothing. Peak RSS from /usr/bin/time -v.
#   scripts/bench_dpo_reference_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p furnace-trainer
BIN="${CARGO_TARGET_DIR:-target}/release/furnace"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

python3 -c "print('\n\n'.join(f'What is {a}+{b}? {a}+{b}={a+b}' for a in range(60) for b in range(60)))" > "$WORK/corpus.txt"
"$BIN" data tokenizer --input "$WORK/corpus.txt" --vocab-size 512 --out "$WORK/tokenizer.json" > /dev/null
COMMON=(--set data.tokenizer="$WORK/tokenizer.json" --set model.init_from= --set model.flavor=gpt2-124m --set model.arch=llama
        --set model.vocab_size=512 --set model.max_seq_len=64 --set data.num_examples=64 --set data.num_val_examples=16
        --set training.local_batch_size=4 --set training.eval_every=0 --set training.save_every=0 --set eval.arithmetic_problems=0
        --set logging.progress=false --max-steps 3)
printf "%-6s %-12s %12s\n" tuning reference "peak RSS MB"
for tuning in lora full; do
  rank=$([ "$tuning" = lora ] && echo 8 || echo 0)
  for precompute in false true; do
    out="$WORK/$tuning-$precompute"
    /usr/bin/time -v -o "$WORK/time" "$BIN" train --config recipes/dpo-quickstart.toml "${COMMON[@]}" --set run.output_dir="$out" \
      --set lora.r="$rank" --set dpo.precompute_ref_log_probs="$precompute" > "$WORK/log" 2>&1 || { cat "$WORK/log"; exit 1; }
    rss_kb="$(grep 'Maximum resident set size' "$WORK/time" | grep -oE '[0-9]+$')"
    printf "%-6s %-12s %12.0f\n" "$tuning" "$([ "$precompute" = true ] && echo precomputed || echo model)" "$(echo "$rss_kb / 1024" | bc -l)"
  done
done
