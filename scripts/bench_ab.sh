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
ONLY="${ONLY:-abcdefg}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

source scripts/lib/train_shapes.sh

median_tokens_per_sec() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l]
rows = rows[2:] if len(rows) > 4 else rows  # skip warm-up steps
print(f"{statistics.median(r['tokens_per_sec'] for r in rows):.1f}")
PY
}

printf "%-30s %12s %12s %7s\n" shape "A tok/s" "B tok/s" "B/A"
for entry in "${SHAPES[@]}"; do
  read -r name arch layers d heads t b v <<<"$entry"
  [[ "$ONLY" == *"${name%%:*}"* ]] || continue
  runs=(""  "")
  for rep in $(seq "$REPS"); do
    for i in 0 1; do
      out="$WORK/$name-$i-$rep"
      train_shape "${BINS[$i]}" "$out" "$arch" "$layers" "$d" "$heads" "$t" "$b" "$v"
      runs[$i]="${runs[$i]} $(median_tokens_per_sec "$out/metrics.jsonl")"
    done
  done
  # shellcheck disable=SC2086
  a=$(median ${runs[0]}); b=$(median ${runs[1]})
  printf "%-30s %12s %12s %7s\n" "${name#*:}" "$a" "$b" "$(python3 -c "print(f'{$b / $a:.3f}')")"
done
