#!/usr/bin/env bash
# Build here what scripts/gpu_check.sh runs on a GPU machine that has no network and maybe no
# Rust: the release `furnace` (CUDA and wgpu), the same with the NCCL transport (it links
# OpenMPI's libmpi, which the GPU machine may lack), and the GPU parity suite's test binary;
# stripped and gzipped into dist/gpu (ignored by git; carry it, 64 MiB at most).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/furnace-target}"
dist=dist/gpu
mkdir -p "$dist"

pack() {
  local from=$1 name=$2
  strip -o "$dist/$name" "$from"
  gzip -9 -f "$dist/$name"
}

cargo build --release -p furnace-trainer --features cuda,wgpu,nccl
pack "$CARGO_TARGET_DIR/release/furnace" furnace-nccl
cargo build --release -p furnace-trainer --features cuda,wgpu
pack "$CARGO_TARGET_DIR/release/furnace" furnace
# The test binary's path is the last "executable" cargo reports.
parity=$(cargo test --release -p furnace-trainer --features cuda,wgpu --test gpu_parity --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json, sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
pack "$parity" gpu_parity

du -ch "$dist"/*.gz
total=$(du -cb "$dist"/*.gz | tail -n1 | cut -f1)
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
  echo "gpu_prepare: $dist is $((total / 1024 / 1024)) MiB, over the 60 MiB that leaves room in a 64 MiB carry" >&2
  exit 1
fi
echo "ready: carry $dist and run scripts/gpu_check.sh there"
