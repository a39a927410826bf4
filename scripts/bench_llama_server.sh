#!/usr/bin/env bash
# `furnace serve` against llama.cpp's own `llama-server` on the same model, prompts and machine,
# in one run: a Llama-shaped model of GPT-2-124M's dimensions (recipes/gpt2-124m.toml with
# arch = "llama", one training step: close to random weights, all a speed test needs),
# exported by `furnace export --format gguf` at f32 for llama-server; both servers get 32
# sequences at once (llama-server: 32 parallel slots, f32 KV cache, continuous batching) and
# are measured by scripts/bench_serve.py (prompts of 32–512 tokens, 128 output tokens) at
# concurrency 1 and 32, one server at a time.
#
# llama-server, CPU only, from the llama.cpp sources the llama-cpp-python source package vendors:
#   curl -sLO <llama_cpp_python-X.tar.gz from PyPI> && tar xzf llama_cpp_python-*.tar.gz
#   cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release \
#     -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
#     -DLLAMA_CURL=OFF && cmake --build build --target llama-server -j
#
#   LLAMA_SERVER=path/to/llama-server scripts/bench_llama_server.sh   # FURNACE=path/to/furnace
set -euo pipefail
cd "$(dirname "$0")/.."
llama_server="${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary (see the header of this script)}"
threads="$(nproc)"
source scripts/lib/serve_bench.sh

"$furnace" train --config recipes/gpt2-124m.toml --set model.arch=llama --set training.steps=1 --set training.eval_every=0 \
  --set logging.progress=false --set run.output_dir="$work/llama" >"$work/train.log" 2>&1
"$furnace" export --checkpoint "$work/llama" --format gguf --out "$work/llama.gguf" >"$work/export.log" 2>&1

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

table_header

"$furnace" serve --checkpoint "$work/llama" --port 0 --max-num-seqs 32 --max-queue 1024 --kv-cache-mb 4096 >"$work/furnace.log" 2>&1 &
servers+=($!)
until grep -q '^serving' "$work/furnace.log"; do sleep 0.5; done
url=$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$work/furnace.log")
declare -A furnace_result
for c in 1 32; do
  furnace_result[$c]=$(bench "$url" "$c")
  row "furnace serve" "${furnace_result[$c]}"
done
kill "${servers[@]}"
wait 2>/dev/null || true
servers=()

port=$(free_port)
# 32 slots of 1024 positions each, keys and values in f32 as Furnace keeps them.
"$llama_server" -m "$work/llama.gguf" --host 127.0.0.1 --port "$port" -t "$threads" -np 32 -c 32768 \
  -ctk f32 -ctv f32 --cont-batching >"$work/llama-server.log" 2>&1 &
servers+=($!)
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.5; done
declare -A llama_result
for c in 1 32; do
  llama_result[$c]=$(bench "http://127.0.0.1:$port" "$c")
  row "llama-server" "${llama_result[$c]}"
done

for c in 1 32; do
  python3 - "$c" "${furnace_result[$c]}" "${llama_result[$c]}" <<'EOF'
import json, sys
c, a, b = sys.argv[1], *(json.loads(x)["output_token_throughput"] for x in sys.argv[2:])
print(f"furnace serve / llama-server, output tokens/s at concurrency {c}: {a / b:.2f}x")
EOF
done
