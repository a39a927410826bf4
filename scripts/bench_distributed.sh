#!/usr/bin/env bash
# Data parallel over OpenMPI on the 124M (GPT-2 small) shape:
#  1. the gradient all-reduce as a training step does it (bucketed by distributed.bucket_mb,
#     host copies, mean) against one raw MPI all-reduce of the same bytes, over shared memory
#     and over TCP (what separate nodes use);
#  2. step time of 1 process with batch 2B against 2 ranks with batch B each (same global batch).
#   scripts/bench_distributed.sh            # 2 ranks, 6 timed steps per run
#   RANKS=4 STEPS=8 scripts/bench_distributed.sh
# On one machine the ranks share its cores: the step-time comparison shows the communication
# and synchronisation overhead, not a speed-up, unless each rank gets cores of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
RANKS="${RANKS:-2}"
STEPS="${STEPS:-6}"
cargo build --release -q -p furnace-trainer --features mpi
BIN="${CARGO_TARGET_DIR:-target}/release/furnace"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
MPIRUN=(mpirun --allow-run-as-root --oversubscribe -np "$RANKS")

echo "== gradient all-reduce, shared memory"
"${MPIRUN[@]}" --mca btl self,vader "$BIN" bench allreduce --config recipes/gpt2-124m.toml
echo "== gradient all-reduce, TCP"
"${MPIRUN[@]}" --mca btl self,tcp "$BIN" bench allreduce --config recipes/gpt2-124m.toml

median_step_ms() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l]
rows = rows[2:] if len(rows) > 4 else rows  # skip warm-up steps
tokens = 8 * 64  # global batch × seq_len: the same in both runs
print(f"{statistics.median(1000 * tokens / r['tokens_per_sec'] for r in rows):.0f}")
PY
}

COMMON=(--config recipes/gpt2-124m.toml --max-steps "$STEPS" --set data.num_examples=3000 --set training.log_every=1
        --set training.eval_every=0 --set training.save_every=0 --set logging.progress=false)
echo "== step time, 124M, global batch 8 × 64 tokens, $STEPS steps"
"$BIN" train "${COMMON[@]}" --set run.output_dir="$WORK/one" --set training.local_batch_size=8 > "$WORK/one.log"
"${MPIRUN[@]}" --mca btl self,vader "$BIN" train "${COMMON[@]}" --set run.output_dir="$WORK/ranks" \
  --set training.local_batch_size=$((8 / RANKS)) > "$WORK/ranks.log"
one=$(median_step_ms "$WORK/one/metrics.jsonl")
ranks=$(median_step_ms "$WORK/ranks/metrics.jsonl")
echo "  1 process, batch 8:          $one ms/step"
echo "  $RANKS ranks, batch $((8 / RANKS)) each:     $ranks ms/step"
python3 -c "print(f'  ratio (ranks / one): {$ranks / $one:.2f}x')"
