#!/usr/bin/env bash
# Speculative decoding against plain decoding, greedy, on the same binary: the quickstart model
# as the target, drafted by recipes/draft-quickstart.toml's one-layer model or by prompt lookup,
# 56 new tokens (--ignore-eos) after a few prompts; tokens/s (generate's own stderr line),
# medians of REPS runs alternating, and the share of drafts accepted. Trains both models first
# unless RUNS holds runs/quickstart and runs/draft-quickstart already.
#
#   scripts/bench_speculative.sh            # FURNACE=path/to/furnace, REPS=5, RUNS=dir, K=4
set -euo pipefail
cd "$(dirname "$0")/.."
furnace="${FURNACE:-${CARGO_TARGET_DIR:-/var/tmp/furnace-target}/release/furnace}"
reps="${REPS:-5}"
k="${K:-4}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
runs="${RUNS:-$work}"
for recipe in quickstart draft-quickstart; do
  if [ ! -d "$runs/$recipe/checkpoints" ]; then
    "$furnace" train --config "recipes/$recipe.toml" --set logging.progress=false --set run.output_dir="$runs/$recipe" >"$work/train-$recipe.log" 2>&1
  fi
done

run() { # prompt, flags...: "tokens/s accepted-percent" of one generation
  local prompt=$1
  shift
  "$furnace" generate --checkpoint "$runs/quickstart" --prompt "$prompt" --temperature 0 --max-new-tokens 56 --ignore-eos "$@" 2>&1 >/dev/null |
    awk '/tokens\/s\)$/ {rate = $(NF - 1)} /drafted tokens accepted/ {accepted = $8; gsub(/[(),]/, "", accepted)} END {print rate, (accepted == "" ? "-" : accepted)}'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }

echo "| prompt | plain tokens/s | draft model tokens/s (accepted) | prompt lookup tokens/s (accepted) |"
echo "| --- | --- | --- | --- |"
for prompt in "12+34=" "87-45=" "5+5="; do
  : >"$work/plain" && : >"$work/draft" && : >"$work/lookup"
  for _ in $(seq "$reps"); do
    run "$prompt" >>"$work/plain"
    run "$prompt" --draft-checkpoint "$runs/draft-quickstart" --num-speculative-tokens "$k" >>"$work/draft"
    run "$prompt" --prompt-lookup --num-speculative-tokens "$k" >>"$work/lookup"
  done
  plain=$(cut -d' ' -f1 "$work/plain" | median)
  draft=$(cut -d' ' -f1 "$work/draft" | median)
  lookup=$(cut -d' ' -f1 "$work/lookup" | median)
  echo "| $prompt | $plain | $draft ($(head -1 "$work/draft" | cut -d' ' -f2)) $(python3 -c "print(f'{$draft / $plain:.2f}x')") | $lookup ($(head -1 "$work/lookup" | cut -d' ' -f2)) $(python3 -c "print(f'{$lookup / $plain:.2f}x')") |"
done
