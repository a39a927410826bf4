#!/usr/bin/env bash
# The GPU backends' fused CubeCL kernels against the reference compositions of Burn ops, on
# whatever Vulkan device wgpu finds (Mesa's lavapipe on a machine without a GPU): training
# tokens/s of the quickstart and of a 124M-shaped model cut to 2 layers, the two paths
# alternating REPS times, and causal attention at T = 2048 (what its forward keeps for the
# backward, and a forward + backward). On lavapipe the device is this machine's CPU, so the
# ratio measures kernels launched and bytes moved, not a GPU's speed.
#
#   cargo build --release -p furnace-trainer --features wgpu
#   scripts/bench_gpu.sh                     # BIN=path/to/furnace, STEPS=8, REPS=2
#   ONLY=qlora scripts/bench_gpu.sh          # the rows whose name holds ONLY (ONLY=attention: that part)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-${CARGO_TARGET_DIR:-target}/release/furnace}"
STEPS="${STEPS:-8}"
REPS="${REPS:-2}"
ONLY="${ONLY:-}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
[[ -x "$BIN" ]] || { echo "bench_gpu: $BIN is missing: cargo build --release -p furnace-trainer --features wgpu" >&2; exit 2; }

source scripts/lib/train_shapes.sh

# QLoRA's base: the 124M-shaped model below after one step on flex (only its weights matter).
SHAPE_124M="--set model.n_layers=2 --set model.vocab_size=16384 --set training.seq_len=256 --set training.local_batch_size=2 --set data.num_examples=3000 --set data.tokenizer_vocab_size=2048"
# shellcheck disable=SC2086
"$BIN" train --config recipes/gpt2-124m.toml --max-steps 1 $SHAPE_124M --set run.output_dir="$WORK/base" \
  --set training.save_every=1 --set training.eval_every=0 --set logging.progress=false >"$WORK/base.log" 2>&1 \
  || { cat "$WORK/base.log"; exit 1; }

# Steps after the first three (which compile the kernels), median tokens/s.
median_tokens_per_sec() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"tokens_per_sec"' in l]
print(f"{statistics.median(r['tokens_per_sec'] for r in rows[3:]):.1f}")
PY
}

# name recipe overrides…: the quickstart as it is; GPT-2 124M's blocks (d_model 768, 12 heads)
# with 2 layers and a 16384-token vocabulary (50257 × 768 floats exceed lavapipe's 128 MiB
# buffers), batch 2 × 256; a Mamba (4 layers, d_model 256) on the quickstart's data; QLoRA
# (NF4 base, r = 16 on every linear layer) over the 124M-shaped base, batch 8 × 64.
RUNS=(
  "quickstart recipes/quickstart.toml"
  "124M-shaped-L2-T256-B2-V16384 recipes/gpt2-124m.toml $SHAPE_124M"
  "mamba-L4-d256-T64-B32 recipes/quickstart.toml --set model.arch=mamba --set model.d_model=256"
  "qlora-124M-shaped-L2-T64-B8 recipes/qlora.toml --set model.init_from=$WORK/base --set training.local_batch_size=8"
)

train_on_wgpu() {
  local out="$1" kernels="$2" recipe="$3"
  shift 3
  FURNACE_KERNELS="$kernels" "$BIN" train --config "$recipe" --max-steps $((STEPS + 3)) "$@" \
    --set run.output_dir="$out" --set runtime.backend=wgpu --set training.log_every=1 \
    --set training.eval_every=0 --set training.save_every=0 --set logging.progress=false >"$out.log" 2>&1 \
    || { cat "$out.log"; exit 1; }
}

echo "bench_gpu: $("$BIN" --version 2>/dev/null || echo furnace) on $(vulkaninfo --summary 2>/dev/null | grep -m1 deviceName | sed 's/.*= //' || echo 'the default Vulkan device'), $(date -u +%F)"
printf "%-34s %14s %14s %8s\n" "training (wgpu)" "reference tok/s" "fused tok/s" "fused/ref"
for entry in "${RUNS[@]}"; do
  read -r name recipe overrides <<<"$entry"
  [[ "$name" == *"$ONLY"* ]] || continue
  runs=("" "")
  for rep in $(seq "$REPS"); do
    for i in 0 1; do
      kernels=$([[ $i -eq 0 ]] && echo reference || echo fused)
      out="$WORK/$name-$kernels-$rep"
      # shellcheck disable=SC2086
      train_on_wgpu "$out" "$kernels" "$recipe" $overrides
      runs[$i]="${runs[$i]} $(median_tokens_per_sec "$out/metrics.jsonl")"
    done
  done
  # shellcheck disable=SC2086
  a=$(median ${runs[0]}); b=$(median ${runs[1]})
  printf "%-34s %14s %14s %8s\n" "$name" "$a" "$b" "$(python3 -c "print(f'{$b / $a:.2f}')")"
done

[[ "attention" == *"$ONLY"* ]] || exit 0
echo
for kernels in reference fused; do
  FURNACE_KERNELS="$kernels" "$BIN" bench attention --seq 2048 --heads 4 --dim 64 2>&1 | grep -v XDG_RUNTIME_DIR
done
