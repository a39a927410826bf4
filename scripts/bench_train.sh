#!/usr/bin/env bash
# Training throughput of Furnace vs a PyTorch CPU reference of the same model and step,
# on four shapes (three GPT-2 style, one Llama), in one run on this machine. Needs `pip install torch`.
# Furnace and PyTorch alternate, REPS times per shape; the table gives the median over reps of
# each run's median step, MFU against the FMA peak `furnace bench gemm` measures, and the ratio.
#   scripts/bench_train.sh            # 8 timed steps per shape, 2 repetitions
#   STEPS=12 REPS=3 scripts/bench_train.sh
#   ONLY=d BIN=/path/to/other/furnace scripts/bench_train.sh   # one shape, another build
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-8}"
REPS="${REPS:-2}"
THREADS="${THREADS:-2}"
ONLY="${ONLY:-abcd}"
if [[ -z "${BIN:-}" ]]; then
  cargo build --release -q -p furnace-trainer
  BIN="${CARGO_TARGET_DIR:-target}/release/furnace"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

source scripts/lib/train_shapes.sh

# Prints "median_tokens_per_sec flops_per_token" of one run (the trainer logs achieved TFLOP/s
# as `mfu` when logging.peak_tflops = 1).
furnace_run_stats() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l]
rows = rows[2:] if len(rows) > 4 else rows  # skip warm-up steps
print(f"{statistics.median(r['tokens_per_sec'] for r in rows):.1f} {rows[-1]['mfu'] * 1e12 / rows[-1]['tokens_per_sec']:.0f}")
PY
}

PEAK_GFLOPS=$("$BIN" bench gemm 2>/dev/null | awk '/GFLOP/ {print $(NF-1)}')
echo "FMA peak (furnace bench gemm, ${THREADS} threads): ${PEAK_GFLOPS} GFLOP/s"
printf "%-26s %14s %14s %8s %8s %8s\n" shape "furnace tok/s" "pytorch tok/s" "MFU" "MFU pt" ratio
for entry in "${SHAPES[@]}"; do
  read -r name arch layers d heads t b v <<<"$entry"
  [[ "$ONLY" == *"${name%%:*}"* ]] || continue
  ours=(); theirs=()
  for rep in $(seq "$REPS"); do
    out="$WORK/$name-$rep"
    train_shape "$BIN" "$out" "$arch" "$layers" "$d" "$heads" "$t" "$b" "$v"
    read -r tps flops_per_token < <(furnace_run_stats "$out/metrics.jsonl")
    ours+=("$tps")
    theirs+=("$(python3 scripts/reference/torch_train_bench.py --arch "$arch" --layers "$layers" --d-model "$d" --heads "$heads" \
      --seq-len "$t" --batch "$b" --vocab "$v" --steps "$STEPS" --threads "$THREADS" | awk '{print $2}')")
  done
  o=$(median "${ours[@]}"); p=$(median "${theirs[@]}")
  python3 - "${name#*:}" "$o" "$p" "$flops_per_token" "$PEAK_GFLOPS" "${ours[*]}" "${theirs[*]}" <<'PY'
import sys
name, o, p, fpt, peak, ours, theirs = sys.argv[1], *map(float, sys.argv[2:6]), sys.argv[6], sys.argv[7]
mfu = lambda tps: f"{100 * tps * fpt / (peak * 1e9):.1f}%"
print(f"{name:<26} {o:>14.1f} {p:>14.1f} {mfu(o):>8} {mfu(p):>8} {o / p:>8.2f}   (runs: furnace {ours}; pytorch {theirs})")
PY
done
