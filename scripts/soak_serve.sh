#!/usr/bin/env bash
# Memory under sustained load: `furnace serve` on a GPT-2-124M-shaped model (one training step of
# recipes/gpt2-124m.toml) with --kv-cache-mb 512, driven at concurrency 32 (prompts of 32–512
# tokens, 128 output tokens, scripts/bench_serve.py rounds back to back) for DURATION seconds,
# its RSS sampled every 5 s. Prints RSS once loaded (idle), after the first round (warm), the peak, the last sample,
# the model's and the KV budget's bytes, and fails if the RSS grew by more than 5% from the first
# round to the end or the peak is over model + KV budget + 256 MiB of runtime.
#
#   scripts/soak_serve.sh             # FURNACE=path/to/furnace, DURATION=600
set -euo pipefail
cd "$(dirname "$0")/.."
furnace="${FURNACE:-${CARGO_TARGET_DIR:-/var/tmp/furnace-target}/release/furnace}"
duration="${DURATION:-600}"
kv_mb=512
work=$(mktemp -d)
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

"$furnace" train --config recipes/gpt2-124m.toml --set training.steps=1 --set training.eval_every=0 \
  --set logging.progress=false --set run.output_dir="$work/gpt2" >"$work/train.log" 2>&1
params=$(sed -n 's/.*, \([0-9.]*\)M parameters.*/\1/p' "$work/train.log" | head -1)
"$furnace" serve --checkpoint "$work/gpt2" --port 0 --max-num-seqs 32 --max-queue 1024 --kv-cache-mb "$kv_mb" >"$work/serve.log" 2>&1 &
server=$!
until grep -q '^serving' "$work/serve.log"; do sleep 0.5; done
address=$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$work/serve.log")
rss_mb() { awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$server/status"; }
idle=$(rss_mb)

( while kill -0 "$server" 2>/dev/null; do echo "$(date +%s) $(rss_mb)"; sleep 5; done ) >"$work/rss" &
sampler=$!
start=$(date +%s)
rounds=0
while [ $(( $(date +%s) - start )) -lt "$duration" ]; do
  python3 scripts/bench_serve.py --url "$address" --concurrency 32 --requests 64 --output 128 --vocab 400 --seed "$rounds" >"$work/round-$rounds.json"
  rounds=$((rounds + 1))
  [ "$rounds" = 1 ] && warm=$(rss_mb)
done
final=$(rss_mb)
kill "$sampler" 2>/dev/null || true
peak=$(awk '{print $2}' "$work/rss" | sort -n | tail -1)
python3 - "$params" "$kv_mb" "$idle" "$warm" "$peak" "$final" "$rounds" "$duration" "$work" <<'PY'
import json, pathlib, sys
params, kv_mb, idle, warm, peak, final, rounds, duration, work = sys.argv[1:]
model_mb = float(params) * 4
warm, peak, final, kv_mb = int(warm), int(peak), int(final), int(kv_mb)
results = [json.loads(p.read_text()) for p in pathlib.Path(work).glob("round-*.json")]
tokens = sum(r["output_token_throughput"] * r["seconds"] for r in results)
errors = sum(r["errors"] for r in results)
print(f"{rounds} rounds of 64 requests in {duration} s at concurrency 32: {tokens:.0f} output tokens, {errors} failed requests")
print(f"RSS: loaded and idle {idle} MiB, after the first round {warm} MiB, peak {peak} MiB, end {final} MiB "
      f"(model {model_mb:.0f} MiB f32 + KV budget {kv_mb} MiB = {model_mb + kv_mb:.0f} MiB)")
growth = (final - warm) / warm
print(f"growth from the first round to the end: {100 * growth:+.1f}%")
ok = growth <= 0.05 and peak <= model_mb + kv_mb + 256 and errors == 0
print("ok" if ok else "FAILED: RSS grew or exceeded model + KV budget + 256 MiB")
sys.exit(0 if ok else 1)
PY
