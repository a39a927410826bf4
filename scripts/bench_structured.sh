#!/usr/bin/env bash
# What structured output costs: `furnace generate` tokens/s with and without a JSON schema (an
# array of integers: 12 for the quickstart model's 64-token context, ~40 tokens; 50 for the
# 124M shape, ~200), on the quickstart model and a GPT-2-124M-shaped one (one
# training step each: their weights are close to random, which is all a speed test needs).
# Medians of REPS runs, the two kinds alternating; the rate is generate's own stderr line.
#
#   scripts/bench_structured.sh            # FURNACE=path/to/furnace, REPS=5
set -euo pipefail
cd "$(dirname "$0")/.."
furnace="${FURNACE:-${CARGO_TARGET_DIR:-/var/tmp/furnace-target}/release/furnace}"
reps="${REPS:-5}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
numbers() { # count
  echo "{\"type\": \"array\", \"items\": {\"type\": \"integer\", \"minimum\": 0, \"maximum\": 999}, \"minItems\": $1, \"maxItems\": $1}" >"$work/numbers-$1.json"
}
numbers 12
numbers 50

for model in quickstart gpt2-124m; do
  "$furnace" train --config "recipes/$model.toml" --set training.steps=1 --set training.eval_every=0 \
    --set logging.progress=false --set run.output_dir="$work/$model" >"$work/train-$model.log" 2>&1
done

rate() { # model, extra flags...: tokens/s and token count of one generation
  local model=$1
  shift
  "$furnace" generate --checkpoint "$work/$model" --prompt "x" --temperature 1 --seed 1 "$@" 2>&1 >/dev/null |
    sed -n 's/^(\([0-9]*\) tokens in .*: \([0-9.]*\) tokens\/s)$/\2 \1/p'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

echo "| model | free tokens/s | JSON schema tokens/s | schema / free | tokens (free, schema) |"
echo "| --- | --- | --- | --- | --- |"
for model in quickstart gpt2-124m; do
  if [ "$model" = quickstart ]; then items=12 free_tokens=40; else items=50 free_tokens=200; fi
  : >"$work/free" && : >"$work/schema"
  for _ in $(seq "$reps"); do
    rate "$model" --max-new-tokens "$free_tokens" --ignore-eos >>"$work/free"
    rate "$model" --max-new-tokens 400 --json-schema "$work/numbers-$items.json" >>"$work/schema"
  done
  free=$(cut -d' ' -f1 "$work/free" | median)
  schema=$(cut -d' ' -f1 "$work/schema" | median)
  echo "| $model | $free | $schema | $(python3 -c "print(f'{$schema / $free:.2f}')") | $(head -1 "$work/free" | cut -d' ' -f2), $(head -1 "$work/schema" | cut -d' ' -f2) |"
done
