# Sourced by bench_serve.sh and bench_llama_server.sh: the furnace binary, the load's size
# (REQUESTS at concurrency above 1, OUTPUT tokens each), a scratch folder $work and the servers
# started into $servers, both cleaned up on exit; one load-generator run and its row of the table.

furnace="${FURNACE:-${CARGO_TARGET_DIR:-/var/tmp/furnace-target}/release/furnace}"
requests="${REQUESTS:-32}"
output="${OUTPUT:-128}"
work=$(mktemp -d)
servers=()
trap 'kill "${servers[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

# bench URL CONCURRENCY: scripts/bench_serve.py's result (JSON) for prompts of 32–512 token ids
# under 400 (inside the stories tokenizer's vocabulary); 8 requests at concurrency 1.
bench() {
  python3 scripts/bench_serve.py --url "$1" --concurrency "$2" --requests "$(( $2 == 1 ? 8 : requests ))" --output "$output" --vocab 400
}

table_header() {
  echo "| server | concurrency | requests/s | output tokens/s | TTFT median ms | TPOT median ms | ITL p99 ms | failed |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
}

row() { # label result-json
  python3 - "$1" "$2" <<'PY'
import json, sys
label, r = sys.argv[1], json.loads(sys.argv[2])
print(f"| {label} | {r['concurrency']} | {r['request_throughput']:.2f} | {r['output_token_throughput']:.1f} | "
      f"{r['ttft']['median_ms']:.0f} | {r['tpot']['median_ms']:.0f} | {r['itl']['p99_ms']:.0f} | {r['errors']} |")
PY
}
