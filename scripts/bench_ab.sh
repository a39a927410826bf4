#!/usr/bin/env bash
# Is a change neutral for speed? Training tokens/s of two furnace builds on bench_train.sh's
# shapes, the builds alternating REPS times per shape on this machine (no PyTorch needed).
# Prints each build's median over reps of each run's median step, and B/A.
#   scripts/bench_ab.sh /path/to/furnace-before /path/to/furnace-after
#   STEPS=12 REPS=3 ONLY=ad scripts/bench_ab.sh A B
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 2 ]] || { echo "usage: $0 FURNACE_A FURNACE_B" >&2; exit 2; }
BINS=("$1" "$2")
STEPS="${STEPS:-8}"
REPS="${REPS:-3}"
THREADS="${THREADS:-2}"
ONLY="${ONLY:-abcd}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# name arch layers d_model heads seq_len batch vocab (as bench_train.sh)
SHAPES=(
  "a:L4-d256-T256-B8-V4096 gpt2 4 256 4 256 8 4096"
  "b:L4-d256-T256-B8-V50257 gpt2 4 256 4 256 8 50257"
  "c:gpt2-124m-B4-T64 gpt2 12 768 12 64 4 50257"
  "d:llama-L4-d256-T256-B8-V4096 llama 4 256 4 256 8 4096"
)

median_tokens_per_sec() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l]
rows = rows[2:] if len(rows) > 4 else rows  # skip warm-up steps
print(f"{statistics.median(r['tokens_per_sec'] for r in rows):.1f}")
PY
}

median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.1f}')" "$@"; }

printf "%-30s %12s %12s %7s\n" shape "A tok/s" "B tok/s" "B/A"
for entry in "${SHAPES[@]}"; do
  read -r name arch layers d heads t b v <<<"$entry"
  [[ "$ONLY" == *"${name%%:*}"* ]] || continue
  runs=(""  "")
  for rep in $(seq "$REPS"); do
    for i in 0 1; do
      out="$WORK/$name-$i-$rep"
      "${BINS[$i]}" train --config recipes/gpt2-124m.toml --max-steps $((STEPS + 2)) \
        --set run.output_dir="$out" --set model.arch="$arch" --set model.n_layers="$layers" --set model.d_model="$d" \
        --set model.n_heads="$heads" --set model.vocab_size="$v" --set model.max_seq_len=1024 \
        --set training.seq_len="$t" --set training.local_batch_size="$b" --set training.log_every=1 \
        --set training.eval_every=0 --set training.save_every=0 --set training.steps=1000 \
        --set data.num_examples=3000 --set data.tokenizer_vocab_size=2048 \
        --set runtime.threads="$THREADS" --set logging.progress=false --set logging.peak_tflops=1 >"$out.log" 2>&1 \
        || { cat "$out.log"; exit 1; }
      runs[$i]="${runs[$i]} $(median_tokens_per_sec "$out/metrics.jsonl")"
    done
  done
  # shellcheck disable=SC2086
  a=$(median ${runs[0]}); b=$(median ${runs[1]})
  printf "%-30s %12s %12s %7s\n" "${name#*:}" "$a" "$b" "$(python3 -c "print(f'{$b / $a:.3f}')")"
done
