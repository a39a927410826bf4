#!/usr/bin/env bash
# The whole test suite: unit, layer, reference-fixture and end-to-end tests, and the multi-process
# tests under mpirun when OpenMPI is installed (`apt install openmpi-bin libopenmpi-dev
# libclang-dev`; CI installs it and sets FURNACE_REQUIRE_MPI=1 so they can never be skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
features=()
if command -v mpirun >/dev/null && pkg-config --exists ompi 2>/dev/null; then
  features=(--features furnace-trainer/mpi)
elif [ "${FURNACE_REQUIRE_MPI:-0}" = 1 ]; then
  echo "FURNACE_REQUIRE_MPI=1 but OpenMPI is missing: apt install openmpi-bin libopenmpi-dev libclang-dev" >&2
  exit 1
else
  echo "note: OpenMPI not found; skipping the mpirun tests (apt install openmpi-bin libopenmpi-dev libclang-dev to run them)" >&2
fi
cargo test --workspace "${features[@]}" "$@"
