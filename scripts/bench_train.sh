#!/usr/bin/env bash
# Training throughput of Furnace vs PyTorch as its users run it (scripts/reference/
# torch_train_bench.py: SDPA attention, torch.optim.AdamW; with COMPILE=1 also torch.compile),
# the same model and step, on GPT-2 and Llama shapes up to 2,048 tokens of context, in one run on
# this machine. Needs `pip install torch`. Furnace and PyTorch alternate, REPS times per shape;
# the table gives the median over reps of each run's median step, MFU against the FMA peak
# `furnace bench gemm` measures, and the ratios (compile time is reported, never timed).
#   scripts/bench_train.sh            # 8 timed steps per shape, 2 repetitions
#   STEPS=12 REPS=3 COMPILE=1 scripts/bench_train.sh
#   ONLY=d BIN=/path/to/other/furnace scripts/bench_train.sh   # one shape, another build
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${STEPS:-8}"
REPS="${REPS:-2}"
THREADS="${THREADS:-2}"
ONLY="${ONLY:-abcdefg}"
COMPILE="${COMPILE:-0}"
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
printf "%-30s %10s %10s %10s %7s %7s %7s %8s %8s\n" shape furnace eager compiled MFU "MFU pt" "MFU c" "/eager" "/compiled"
for entry in "${SHAPES[@]}"; do
  read -r name arch layers d heads t b v <<<"$entry"
  [[ "$ONLY" == *"${name%%:*}"* ]] || continue
  ours=(); eager=(); compiled=(); compile_s=()
  torch_args=(--arch "$arch" --layers "$layers" --d-model "$d" --heads "$heads" --seq-len "$t" --batch "$b" --vocab "$v" --steps "$STEPS" --threads "$THREADS")
  for rep in $(seq "$REPS"); do
    out="$WORK/$name-$rep"
    train_shape "$BIN" "$out" "$arch" "$layers" "$d" "$heads" "$t" "$b" "$v"
    read -r tps flops_per_token < <(furnace_run_stats "$out/metrics.jsonl")
    ours+=("$tps")
    eager+=("$(python3 scripts/reference/torch_train_bench.py "${torch_args[@]}" | awk '/tokens_per_sec/ {print $2}')")
    if [[ "$COMPILE" == 1 ]]; then
      result=$(python3 scripts/reference/torch_train_bench.py "${torch_args[@]}" --compile)
      compiled+=("$(awk '/tokens_per_sec/ {print $2}' <<<"$result")")
      compile_s+=("$(awk '/compile_seconds/ {print $2}' <<<"$result")")
    fi
  done
  o=$(median "${ours[@]}"); e=$(median "${eager[@]}"); c=$([[ "$COMPILE" == 1 ]] && median "${compiled[@]}" || echo 0)
  python3 - "${name#*:}" "$o" "$e" "$c" "$flops_per_token" "$PEAK_GFLOPS" "${ours[*]}" "${eager[*]}" "${compiled[*]:-}" "${compile_s[*]:-}" <<'PY'
import sys
name, o, e, c, fpt, peak = sys.argv[1], *map(float, sys.argv[2:7])
ours, eager, compiled, compile_s = sys.argv[7:11]
mfu = lambda tps: f"{100 * tps * fpt / (peak * 1e9):.1f}%" if tps else "-"
ratio = lambda x: f"{o / x:.2f}" if x else "-"
print(f"{name:<30} {o:>10.1f} {e:>10.1f} {(f'{c:.1f}' if c else '-'):>10} {mfu(o):>7} {mfu(e):>7} {mfu(c):>7} {ratio(e):>8} {ratio(c):>8}"
      f"   (runs: furnace {ours}; eager {eager}" + (f"; compiled {compiled}, compile s {compile_s}" if c else "") + ")")
PY
done
