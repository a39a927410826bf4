#!/usr/bin/env bash
# Memory and speed of fine-tuning the GPT-2 124M shape three ways, in one run on this machine:
# full fine-tuning (every weight, AdamW state for all), LoRA (r=16 on every block linear layer,
# base frozen in f32) and QLoRA (the same adapters over an NF4 base). All start from the same
# base checkpoint (the gpt2-124m recipe after one step) and train on the same data.
# Reports the median tokens/s, the trainer's peak RSS (VmHWM, logged as peak_rss_mb) and the
# NF4 layers' bytes against bf16.
#   scripts/bench_lora.sh              # 8 steps each
#   STEPS=12 scripts/bench_lora.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-8}"
cargo build --release -q -p furnace-trainer
BIN="${CARGO_TARGET_DIR:-target}/release/furnace"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

COMMON=(--set logging.progress=false --set training.eval_every=0 --set training.log_every=1 --set eval.max_new_tokens=0
        --set data.num_examples=4000 --set training.save_every=0)
"$BIN" train --config recipes/gpt2-124m.toml --set run.output_dir="$WORK/base" --max-steps 1 "${COMMON[@]}" > /dev/null

stats() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l]
timed = rows[2:] if len(rows) > 4 else rows  # skip warm-up steps
print(f"{statistics.median(r['tokens_per_sec'] for r in timed):.1f} {max(r['peak_rss_mb'] for r in rows):.0f}")
PY
}

printf "%-8s %10s %14s %10s   %s\n" mode "tok/s" "peak RSS MB" "step s" "notes"
for mode in full lora qlora; do
  extra=(--set "model.init_from=$WORK/base" --set training.steps="$STEPS" --set run.output_dir="$WORK/$mode")
  case "$mode" in
    lora) extra+=(--set lora.r=16 --set lora.alpha=32) ;;
    qlora) extra+=(--set lora.r=16 --set lora.alpha=32 --set 'lora.quantize_base="nf4"') ;;
  esac
  log="$("$BIN" train --config recipes/gpt2-124m.toml "${COMMON[@]}" "${extra[@]}" --set eval.arithmetic_problems=0 2>&1)"
  read -r tps rss < <(stats "$WORK/$mode/metrics.jsonl")
  step=$(python3 -c "print(f'{64 * 4 / $tps:.2f}')")
  notes="$(grep -oE 'trainable% [0-9.]+|base linear layers in NF4: .*' <<<"$log" | tr '\n' ' ' || true)"
  printf "%-8s %10s %14s %10s   %s\n" "$mode" "$tps" "$rss" "$step" "$notes"
done
