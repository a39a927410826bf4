//! The Furnace trainer: the loop, checkpoints, metrics, evaluation and the commands the
//! `furnace` binary runs.

use std::path::PathBuf;

use clap::Args;

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod commands;
pub mod context;
pub mod datasets;
pub mod evaluate;
pub mod export;
pub mod gguf;
pub mod gguf_layout;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod objective;
pub mod objectives;
pub mod parallel;
pub mod precision;
pub mod preference;
pub mod recompute;
pub mod rollout;
pub mod serve;
pub mod signals;
pub mod structured;
pub mod tasks;
pub mod tensorboard;
pub mod tools;
pub mod train;

#[derive(Args, Clone)]
pub struct RecipeArgs {
    /// The recipe (TOML).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override a recipe key, e.g. `--set training.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Continue the run in this output folder from its newest complete checkpoint.
    #[arg(long, value_name = "OUTPUT_DIR")]
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this step; the schedule still spans training.steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Resume (and read model.init_from) without checking checkpoints against their manifests.
    #[arg(long)]
    pub no_verify: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A run folder (its newest checkpoint is used), one checkpoint folder, or a Hugging Face
    /// model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f64,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Mirostat 2.0 with this target surprise τ in bits (llama.cpp's --mirostat 2, whose
    /// default τ is 5): after --temperature it replaces top-k, top-p, min-p and the repetition
    /// penalty, keeping the text's surprise near τ.
    #[arg(long)]
    pub mirostat_tau: Option<f64>,
    /// Mirostat's learning rate η.
    #[arg(long, default_value_t = 0.1)]
    pub mirostat_eta: f64,
    /// Extra stop strings, each encoded to one stop token (the end-of-text token stops too,
    /// unless --ignore-eos).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past end-of-text, to --max-new-tokens (llama.cpp's and transformers'
    /// `ignore_eos`).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Send the prompt as a user turn through the chat template (the checkpoint's
    /// data.chat_template, its base's, or the default) and print the assistant's reply.
    #[arg(long)]
    pub chat: bool,
    /// Also write the prompt's logits (full forward, `[positions, vocab]`) to this safetensors file.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
    /// LoRA adapters in Hugging Face PEFT's layout (adapter_config.json and
    /// adapter_model.safetensors) to apply over the checkpoint's model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Read the checkpoint without checking it against its manifest (for very large models).
    #[arg(long)]
    pub no_verify: bool,
    /// Run on this backend instead of the one the checkpoint trained on.
    #[arg(long, value_parser = ["flex", "cuda", "wgpu"])]
    pub backend: Option<String>,
    /// Hold the reply to the JSON Schema in this file (structured output, as OpenAI's
    /// `response_format` json_schema): every token sampled keeps it valid; the JSON is compact.
    #[arg(long, conflicts_with_all = ["regex", "grammar"])]
    pub json_schema: Option<PathBuf>,
    /// Hold the reply to this regular expression (Rust regex syntax), matched whole.
    #[arg(long, conflicts_with = "grammar")]
    pub regex: Option<String>,
    /// Hold the reply to the Lark grammar in this file (llguidance's dialect: `start: ...`).
    #[arg(long)]
    pub grammar: Option<PathBuf>,
    /// Offer the tools in this JSON file (a list of OpenAI function definitions) to a --chat
    /// reply: the chat template lists them, and a call the model opens is held to their schemas.
    #[arg(long, requires = "chat", conflicts_with_all = ["json_schema", "regex", "grammar"])]
    pub tools: Option<PathBuf>,
    /// With --tools: auto (text or calls), required (one or more calls), none (text), or the
    /// name of the one tool to call.
    #[arg(long, default_value = "auto", requires = "tools")]
    pub tool_choice: String,
    /// Speculative decoding: this smaller model (same tokenizer) drafts tokens and the model
    /// checks them in one forward; the text is the model's own (greedy: identical).
    #[arg(long, conflicts_with = "prompt_lookup")]
    pub draft_checkpoint: Option<PathBuf>,
    /// Speculative decoding with drafts from the text so far: the tokens that followed the
    /// latest earlier occurrence of its last 3, 2 or 1 tokens (transformers' prompt lookup).
    #[arg(long)]
    pub prompt_lookup: bool,
    /// Tokens drafted per model forward under --draft-checkpoint or --prompt-lookup.
    #[arg(long, default_value_t = 4)]
    pub num_speculative_tokens: usize,
    /// Beam search with this many beams (transformers' `generate(num_beams=N)`); 1 is off.
    /// Sampling flags do not apply: beams follow summed log-probabilities.
    #[arg(long, default_value_t = 1, conflicts_with_all = ["json_schema", "regex", "grammar", "tools", "draft_checkpoint", "prompt_lookup", "mirostat_tau"])]
    pub num_beams: usize,
    /// Beam search: scores are summed log-probabilities over length^penalty (above 0 favours
    /// longer replies).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub length_penalty: f32,
    /// Beam search: false (stop when no running beam can beat the finished ones, estimated at
    /// its current length), true (stop once --num-beams replies are finished), or never.
    #[arg(long, default_value = "false", value_parser = ["false", "true", "never"])]
    pub early_stopping: String,
    /// Beam search: print this many of the best replies (at most --num-beams).
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
}

#[derive(Args)]
pub struct ExportArgs {
    /// A run folder (its newest checkpoint) or one checkpoint folder.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output format: safetensors (a Hugging Face model folder), gguf (one llama.cpp file) or
    /// peft (a LoRA run's adapters alone, as Hugging Face PEFT saves them).
    #[arg(long, value_parser = ["safetensors", "gguf", "peft"], default_value = "safetensors")]
    pub format: String,
    /// Fold a LoRA run's adapters into the base weights (W + A·B·alpha/r) before writing.
    #[arg(long)]
    pub merge_lora: bool,
    /// safetensors: weight dtype.
    #[arg(long, value_parser = ["f32", "f16", "bf16"], default_value = "f32")]
    pub dtype: String,
    /// gguf: weight type of the matrices (norms stay f32).
    #[arg(long, value_parser = ["f32", "f16", "q8_0", "q4_0"], default_value = "f32")]
    pub quant: String,
    /// Largest weights file before they split into model-0000N-of-0000M.safetensors
    /// (transformers' `max_shard_size`: e.g. 5GB, 500MB, 200KB). safetensors only.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: usize,
    /// A folder (safetensors, peft) or a file (gguf). Never inside a run's checkpoints.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out (the new export is written beside it, then swapped in).
    #[arg(long)]
    pub force: bool,
    /// Read the checkpoint without checking it against its manifest (for very large models).
    #[arg(long)]
    pub no_verify: bool,
}

/// "5GB" / "500MB" / "200KB" / "1000" (bytes), decimal units as transformers uses them.
fn parse_size(text: &str) -> Result<usize, String> {
    let upper = text.trim().to_ascii_uppercase();
    let (number, scale) = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0)]
        .iter()
        .find_map(|(unit, scale)| upper.strip_suffix(unit).map(|n| (n.trim().to_string(), *scale)))
        .unwrap_or((upper.clone(), 1.0));
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a size like 5GB, 500MB or 200KB"))?;
    Ok((value * scale) as usize)
}

#[derive(Args)]
pub struct ServeArgs {
    /// What to serve: a run folder (its newest checkpoint), one checkpoint folder, a Hugging Face
    /// model folder or a GGUF file, as `furnace generate --checkpoint` reads.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The name clients give as `model` (and /v1/models lists); the checkpoint's folder name by default.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Serve a LoRA adapter (a Hugging Face PEFT folder, as `furnace export --format peft`
    /// writes one) beside the base as model NAME; repeatable. Batched by adapter: each adapter
    /// is its own copy of the base with the adapter's layers, on its own engine thread with its
    /// own batch (--max-num-seqs and --kv-cache-mb apply to each).
    #[arg(long = "lora", value_name = "NAME=DIR")]
    pub lora: Vec<String>,
    /// Sequences decoded together in one batch; more wait in the queue.
    #[arg(long, default_value_t = 16)]
    pub max_num_seqs: usize,
    /// The paged KV cache in MiB, allocated at start (blocks of 16 positions; no more than
    /// --max-num-seqs sequences of the model's context could fill). A sequence joins when its
    /// next tokens fit; when the cache is full the newest sequence is preempted and recomputed
    /// later. Prompts sharing whole blocks of a prefix share those blocks (prefix caching).
    #[arg(long, default_value_t = 1024)]
    pub kv_cache_mb: usize,
    /// The KV cache's size in blocks of 16 positions, instead of what --kv-cache-mb gives
    /// (vLLM's --num-gpu-blocks-override: to test preemption, or to pin the size).
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,
    /// Requests that may wait; beyond them a request gets 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Prompt tokens one prefill pass reads (chunked prefill: a long prompt takes several steps
    /// between the batch's decode steps instead of stalling them).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// flex, cuda or wgpu (the checkpoint recipe's backend when unset).
    #[arg(long, value_parser = ["flex", "cuda", "wgpu"])]
    pub backend: Option<String>,
    /// Skip checking the checkpoint's files against its manifest.
    #[arg(long)]
    pub no_verify: bool,
}
