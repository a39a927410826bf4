#!/usr/bin/env bash
# The one script a GPU machine runs (no network, maybe no Rust there): the parity suite on CUDA
# and on wgpu over the NVIDIA Vulkan driver, the gpt2-124m recipe for a few dozen bf16-mixed
# steps (tokens/s, MFU against the GPU's dense bf16 peak, peak GPU memory), the same step in
# PyTorch when it is installed there, and an NCCL all-reduce of the gradient buffer at world
# size 1. Writes a table (gpu_check.md) and every log to $OUT.
#
#   scripts/gpu_prepare.sh            # here: build, strip and pack the binaries into dist/gpu
#   scripts/gpu_check.sh              # there, with dist/gpu carried beside the tree
#
# STEPS (default 40), BATCH (8) and SEQ (1024) size the 124M run; GPU_DIST says where the packed
# binaries are (dist/gpu). Exits 2 at once, before any
# work, on a machine without an NVIDIA GPU or without the prepared binaries.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out="${OUT:-$root/gpu-check-out}"
steps="${STEPS:-40}"
batch="${BATCH:-8}"
seq="${SEQ:-1024}"
dist="${GPU_DIST:-dist/gpu}"

fail() {
  echo "gpu_check: $*" >&2
  exit 2
}

command -v nvidia-smi >/dev/null || fail "no NVIDIA GPU here (nvidia-smi is not installed); run this on a GPU machine. Without one, the wgpu parity suite runs on lavapipe: FURNACE_REQUIRE_GPU=1 cargo test -p furnace-trainer --features wgpu --test gpu_parity"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)
gpu=${gpu%%$'\n'*}
[ -n "$gpu" ] || fail "nvidia-smi lists no GPU (driver not loaded, or no device visible to this process)"
for packed in furnace furnace-nccl gpu_parity; do
  [ -f "$dist/$packed.gz" ] || fail "$dist/$packed.gz is missing: run scripts/gpu_prepare.sh on the build machine and carry dist/gpu"
done

mkdir -p "$out"
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
for packed in furnace furnace-nccl gpu_parity; do
  gzip -dc "$dist/$packed.gz" >"$bin/$packed" && chmod +x "$bin/$packed"
done

# Dense (not sparse) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
case "$gpu" in
  *H200*) peak=989.4 ;;
  *H100*PCIe*) peak=756.0 ;;
  *H100*) peak=989.4 ;;
  *A100*) peak=312.0 ;;
  *L40S*) peak=362.1 ;;
  *L4*) peak=121.0 ;;
  *) peak=0 ;;
esac

rows=()
row() { rows+=("| $1 | $2 | $3 |"); }
echo "gpu_check on $gpu (dense bf16 peak ${peak} TFLOP/s); logs in $out"

# 1. The parity suite, against flex on the same seeds, once per GPU backend.
parity() {
  local backend=$1
  local start=$SECONDS
  if FURNACE_GPU="$backend" FURNACE_REQUIRE_GPU=1 FURNACE_BIN="$bin/furnace" FURNACE_WORKSPACE="$root" \
    "$bin/gpu_parity" --test-threads=1 >"$out/parity-$backend.log" 2>&1; then
    row "parity suite, $backend" "passed: $(grep -o '[0-9]* passed' "$out/parity-$backend.log" | tail -n1)" "$((SECONDS - start)) s"
  else
    row "parity suite, $backend" "FAILED: $(grep -m1 -A1 'panicked at' "$out/parity-$backend.log" | tail -n1 | cut -c1-160)" "see parity-$backend.log"
  fi
}
parity cuda
if ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1; then
  parity wgpu
else
  row "parity suite, wgpu" "not run: no NVIDIA Vulkan driver (nvidia_icd.json) on this machine" "-"
fi

# 2. The 124M model in bf16-mixed: median tokens/s and MFU after the first 5 steps (kernel
# compilation), peak GPU memory sampled every 100 ms.
run="$out/gpt2-124m"
rm -rf "$run"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$out/memory.csv" 2>/dev/null &
sampler=$!
start=$SECONDS
"$bin/furnace" train --config recipes/gpt2-124m.toml --set runtime.backend=cuda --set runtime.precision=bf16-mixed \
  --set training.steps="$steps" --set training.log_every=1 --set training.eval_every=0 --set training.save_every=0 \
  --set training.local_batch_size="$batch" --set training.seq_len="$seq" --set logging.peak_tflops="$peak" \
  --set run.output_dir="$run" >"$out/gpt2-124m.log" 2>&1
status=$?
kill "$sampler" 2>/dev/null
peak_mb=$(sort -n "$out/memory.csv" 2>/dev/null | tail -n1)
if [ $status -eq 0 ] && [ -f "$run/metrics.jsonl" ]; then
  summary=$(python3 - "$run/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
steps = [r for r in rows if "tokens_per_sec" in r and r.get("step", 0) > 5]
tps = statistics.median(r["tokens_per_sec"] for r in steps)
mfu = statistics.median(r.get("mfu", 0.0) for r in steps)
print(f"{tps:,.0f} tokens/s, MFU {100 * mfu:.1f}%, loss {steps[-1]['loss']:.3f} at step {steps[-1]['step']}")
EOF
  )
  row "gpt2-124m bf16-mixed, B$batch T$seq, Furnace (cuda)" "$summary" "peak GPU memory ${peak_mb:-?} MiB, $((SECONDS - start)) s"
else
  row "gpt2-124m bf16-mixed, B$batch T$seq, Furnace (cuda)" "FAILED (exit $status): $(grep -m1 -iE '^error|panicked' -A1 "$out/gpt2-124m.log" | tail -n1 | cut -c1-160)" "see gpt2-124m.log"
fi

# 3. The same model and step in PyTorch, when the machine has it with CUDA.
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  if python3 scripts/reference/torch_train_bench.py --device cuda --bf16 --layers 12 --d-model 768 --heads 12 \
    --vocab 50257 --seq-len "$seq" --batch "$batch" --steps 20 --warmup 5 >"$out/torch.log" 2>&1; then
    tps=$(awk '/^tokens_per_sec/ {print $2}' "$out/torch.log")
    mem=$(awk '/^peak_memory_mb/ {print $2}' "$out/torch.log")
    row "gpt2-124m bf16 autocast, B$batch T$seq, PyTorch" "$tps tokens/s" "peak allocated ${mem} MiB"
  else
    row "gpt2-124m bf16 autocast, B$batch T$seq, PyTorch" "FAILED: $(tail -n1 "$out/torch.log" | cut -c1-120)" "see torch.log"
  fi
else
  row "gpt2-124m bf16 autocast, PyTorch" "not run: no PyTorch with CUDA on this machine" "-"
fi

# 4. NCCL: the gradient all-reduce of the 124M model as training does it, at world size 1.
if "$bin/furnace-nccl" --version >/dev/null 2>"$out/nccl.log"; then
  if "$bin/furnace-nccl" bench allreduce --config recipes/gpt2-124m.toml --set distributed.backend=nccl --iters 10 >>"$out/nccl.log" 2>&1; then
    row "NCCL all-reduce of the 124M gradients, world size 1" "$(grep -m1 'raw all-reduce' "$out/nccl.log" | sed 's/  */ /g')" "$(grep -m1 'training path (' "$out/nccl.log" | sed 's/  */ /g')"
  else
    row "NCCL all-reduce, world size 1" "FAILED: $(grep -m1 -i 'error' "$out/nccl.log" | cut -c1-120)" "see nccl.log"
  fi
else
  row "NCCL all-reduce, world size 1" "not run: $(head -n1 "$out/nccl.log" | cut -c1-120)" "the nccl build needs OpenMPI's libmpi"
fi

{
  echo "# gpu_check: $gpu, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| check | result | cost |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${rows[@]}"
} | tee "$out/gpu_check.md"
