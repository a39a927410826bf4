#!/usr/bin/env bash
# Tool calling, trained and served: train the quickstart (unless runs/quickstart exists), fine-tune
# it on tool use (recipes/tools-quickstart.toml), then serve it and run the tool loop on held-out
# questions through the official openai client (scripts/reference/check_tools.py).
#   scripts/check_tools.sh            # needs: pip install openai
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p furnace-trainer
furnace="${CARGO_TARGET_DIR:-target}/release/furnace"
if [ ! -f runs/quickstart/tokenizer.json ]; then
  "$furnace" train --config recipes/quickstart.toml
fi
if [ -d runs/tools-quickstart ]; then
  echo "runs/tools-quickstart exists: serving it as it is (move it aside to train again)"
else
  "$furnace" train --config recipes/tools-quickstart.toml
fi
FURNACE="$furnace" python3 scripts/reference/check_tools.py runs/tools-quickstart
