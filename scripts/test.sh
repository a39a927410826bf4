#!/usr/bin/env bash
# The whole test suite: unit, layer, reference-fixture and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace "$@"
