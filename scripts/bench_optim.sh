#!/usr/bin/env bash
# AdamW vs Lion vs Sophia on the quickstart model: the same steps and tokens each, in one run.
# Prints final train loss, validation loss, held-out exact match and tokens/s side by side.
#   scripts/bench_optim.sh                 # the recipes' full 1000 steps (~25 minutes)
#   STEPS=300 scripts/bench_optim.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-1000}"
cargo build --release -q -p furnace-trainer
BIN="${CARGO_TARGET_DIR:-target}/release/furnace"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

printf "%-8s %10s %9s %12s %10s %14s\n" optimizer train_loss val_loss exact_match tok/s "s/step (mean)"
for opt in adamw lion sophia; do
  recipe=recipes/quickstart.toml
  [ "$opt" != adamw ] && recipe="recipes/quickstart-$opt.toml"
  start=$(date +%s.%N)
  "$BIN" train --config "$recipe" --set run.output_dir="$WORK/$opt" --set training.steps="$STEPS" \
    --set training.save_every=0 --set logging.progress=false >"$WORK/$opt.log" 2>&1 || { cat "$WORK/$opt.log"; exit 1; }
  python3 - "$WORK/$opt" "$opt" "$STEPS" <<'PY'
import json, re, statistics, sys
run, opt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
train = [r for r in rows if "loss" in r]
val = [r["val_loss"] for r in rows if "val_loss" in r]
exact = [r["eval/exact_match"] for r in rows if "eval/exact_match" in r]
tps = statistics.mean(r["tokens_per_sec"] for r in train[1:])
tokens = train[-1]["tokens"] / steps
print(f"{opt:<8} {train[-1]['loss']:10.4f} {val[-1]:9.4f} {100 * exact[-1]:11.1f}% {tps:10.0f} {tokens / tps:14.3f}")
PY
done
