//! `furnace serve`: a checkpoint behind OpenAI's HTTP API. The HTTP side (axum on a small
//! tokio runtime) parses, checks and answers requests; the model runs on one engine thread that
//! batches every running sequence into one forward per step (continuous batching, see
//! `engine`). The listener opens before the model loads: `/health` answers 503 until it is ready.

mod api;
mod engine;
mod metrics;
mod tool_calls;

use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use furnace_configs::Recipe;
use furnace_core::params::NamedTensors;
use furnace_data::chat::ChatTemplate;
use furnace_data::TextTokenizer;
use furnace_models::{CausalLm, LanguageModel};

use crate::backend::{dispatch, BackendJob, TrainBackend};
use crate::checkpoint;
use crate::commands::{decoding_model, load_for_decoding};
use crate::datasets::chat_template_source;
use crate::structured::Grammars;
use crate::ServeArgs;

pub fn serve(args: ServeArgs) -> Result<()> {
    checkpoint::set_verification(!args.no_verify);
    if args.max_num_seqs == 0 || args.max_queue == 0 || args.prefill_chunk == 0 {
        bail!("--max-num-seqs, --max-queue and --prefill-chunk must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((args.host.as_str(), args.port)))
        .with_context(|| format!("cannot listen on {}:{} (--host, --port)", args.host, args.port))?;
    let address = listener.local_addr()?;
    let (queue, requests) = std::sync::mpsc::sync_channel(args.max_queue);
    let shared = Arc::new(api::Shared {
        ready: OnceLock::new(),
        metrics: Arc::new(metrics::Metrics::default()),
        queue,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    });
    let app = api::router(shared.clone());
    std::thread::Builder::new().name("http".into()).spawn(move || {
        let served = runtime.block_on(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await });
        if let Err(e) = served {
            eprintln!("error: the HTTP server stopped: {e}");
            std::process::exit(1);
        }
        println!("stopped");
        std::process::exit(0);
    })?;
    println!("listening on http://{address} (loading {})", args.checkpoint.display());
    let (recipe, tokenizer, weights) = load_for_decoding(&args.checkpoint, None, args.backend.as_deref())?;
    let name = args.served_model_name.clone().unwrap_or_else(|| served_name(&args.checkpoint));
    dispatch(&recipe.clone(), ServeJob { args, name, recipe, tokenizer, weights, shared, requests })
}

/// The checkpoint's folder (or file) name: a run's own name rather than `step_N`.
fn served_name(checkpoint: &std::path::Path) -> String {
    let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match name(checkpoint) {
        Some(n) if n.starts_with("step_") => checkpoint.parent().and_then(|p| p.parent()).and_then(name).unwrap_or(n),
        Some(n) => n.trim_end_matches(".gguf").to_string(),
        None => "furnace".into(),
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = interrupt => {},
        _ = terminate.recv() => {},
    }
}

struct ServeJob {
    args: ServeArgs,
    name: String,
    recipe: Recipe,
    tokenizer: TextTokenizer,
    weights: NamedTensors,
    shared: Arc<api::Shared>,
    requests: std::sync::mpsc::Receiver<engine::Job>,
}

impl BackendJob for ServeJob {
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<()> {
        let Self { args, name, recipe, tokenizer, weights, shared, requests } = self;
        let model = decoding_model::<B::InnerBackend>(&recipe, &tokenizer, &weights, &args.checkpoint, &device)?;
        let causal = model.as_causal().map_err(|e| anyhow::anyhow!("furnace serve decodes left to right: {e}"))?;
        let kv_bytes_per_position = match &model {
            // Keys and values, f32, of every layer.
            LanguageModel::Decoder(m) => m.layers.iter().map(|l| 2 * 4 * l.attention.n_kv_heads * l.attention.head_dim).sum(),
            _ => 0,
        };
        let tokenizer = Arc::new(tokenizer);
        let template = chat_template_source(&recipe).map_err(|e| e.to_string()).and_then(|source| ChatTemplate::new(&source, &tokenizer));
        let limits = engine::Limits {
            max_num_seqs: args.max_num_seqs,
            prefill_chunk: args.prefill_chunk,
            kv_bytes_per_position,
            kv_budget_bytes: args.kv_cache_mb << 20,
        };
        let max_seq_len = causal.max_seq_len();
        let grammars = Grammars::new(&tokenizer, causal.vocab_size()).map_err(anyhow::Error::msg)?;
        let ready = api::Ready {
            name: name.clone(),
            tokenizer: tokenizer.clone(),
            template,
            max_seq_len,
            kv_bytes_per_position,
            kv_budget_bytes: limits.kv_budget_bytes,
            grammars,
        };
        let engine = engine::Engine::new(&causal, &tokenizer, shared.metrics.clone(), limits, device);
        let _ = shared.ready.set(ready);
        println!("serving {name} (max_num_seqs {}, context {max_seq_len} tokens)", args.max_num_seqs);
        engine.run(requests);
        Ok(())
    }
}
