# Sourced by bench_train.sh and bench_ab.sh: the shapes they time, and one timed Furnace run.

# name arch layers d_model heads seq_len batch vocab
SHAPES=(
  "a:L4-d256-T256-B8-V4096 gpt2 4 256 4 256 8 4096"
  "b:L4-d256-T256-B8-V50257 gpt2 4 256 4 256 8 50257"
  "c:gpt2-124m-B4-T64 gpt2 12 768 12 64 4 50257"
  "d:llama-L4-d256-T256-B8-V4096 llama 4 256 4 256 8 4096"
  "e:llama-L4-d256-T1024-B2-V4096 llama 4 256 4 1024 2 4096"
  "f:llama-L4-d256-T2048-B1-V4096 llama 4 256 4 2048 1 4096"
  "g:gpt2-124m-B2-T256 gpt2 12 768 12 256 2 50257"
)

# train_shape BIN OUT arch layers d_model heads seq_len batch vocab: STEPS + 2 steps of the
# shape into OUT (metrics.jsonl, one log line per step), its output in OUT.log.
train_shape() {
  local bin="$1" out="$2" arch="$3" layers="$4" d="$5" heads="$6" t="$7" b="$8" v="$9"
  "$bin" train --config recipes/gpt2-124m.toml --max-steps $((STEPS + 2)) \
    --set run.output_dir="$out" --set model.arch="$arch" --set model.n_layers="$layers" --set model.d_model="$d" \
    --set model.n_heads="$heads" --set model.vocab_size="$v" --set model.max_seq_len=$((t > 1024 ? t : 1024)) \
    --set training.seq_len="$t" --set training.local_batch_size="$b" --set training.log_every=1 \
    --set training.eval_every=0 --set training.save_every=0 --set training.steps=1000 \
    --set data.num_examples=3000 --set data.tokenizer_vocab_size=2048 \
    --set runtime.threads="$THREADS" --set logging.progress=false --set logging.peak_tflops=1 >"$out.log" 2>&1 \
    || { cat "$out.log"; exit 1; }
}

median() { python3 -c "import statistics, sys; print(f'{statistics.median(float(x) for x in sys.argv[1:]):.1f}')" "$@"; }
