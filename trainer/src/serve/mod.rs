//! `furnace serve`: a checkpoint behind OpenAI's HTTP API. The HTTP side (axum on a small
//! tokio runtime) parses, checks and answers requests; the model runs on one engine thread that
//! batches every running sequence into one forward per step (continuous batching, see
//! `engine`). The listener opens before the model loads: `/health` answers 503 until it is ready.
//! LoRA adapters (`--lora NAME=DIR`) are batched by adapter: each is its own model (the base
//! with the adapter's layers) on its own engine thread, chosen by the request's `model`.

mod api;
mod engine;
mod metrics;
mod tool_calls;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use furnace_configs::Recipe;
use furnace_core::params::NamedTensors;
use furnace_data::chat::ChatTemplate;
use furnace_data::TextTokenizer;
use furnace_models::kernels::FusedOps;
use furnace_models::paged::BLOCK_SIZE;
use furnace_models::{CausalLm, LanguageModel};

use crate::backend::{dispatch, BackendJob, TrainBackend};
use crate::checkpoint;
use crate::commands::{decoding_model, load_for_decoding, with_peft_adapter};
use crate::datasets::chat_template_source;
use crate::memory::{collect_freed_memory, retain_freed_memory};
use crate::structured::Grammars;
use crate::ServeArgs;

pub fn serve(args: ServeArgs) -> Result<()> {
    checkpoint::set_verification(!args.no_verify);
    // Loading (file contents, host copies of the weights) gives its memory back; serving then
    // keeps its working set mapped (see `serving_memory`).
    retain_freed_memory(false);
    if args.max_num_seqs == 0 || args.max_queue == 0 || args.prefill_chunk == 0 {
        bail!("--max-num-seqs, --max-queue and --prefill-chunk must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((args.host.as_str(), args.port)))
        .with_context(|| format!("cannot listen on {}:{} (--host, --port)", args.host, args.port))?;
    let address = listener.local_addr()?;
    let name = args.served_model_name.clone().unwrap_or_else(|| served_name(&args.checkpoint));
    let adapters = lora_flags(&args.lora, &name)?;
    let mut queues = BTreeMap::new();
    let mut receivers = Vec::new();
    for model in std::iter::once(&name).chain(adapters.iter().map(|(n, _)| n)) {
        let (queue, requests) = std::sync::mpsc::sync_channel(args.max_queue);
        queues.insert(model.clone(), queue);
        receivers.push(requests);
    }
    let shared = Arc::new(api::Shared {
        ready: OnceLock::new(),
        metrics: Arc::new(metrics::Metrics::default()),
        queues,
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
    // Every adapter read and checked against the base before anything is served.
    let mut receivers = receivers.into_iter();
    let base_requests = receivers.next().context("the base's queue")?;
    let adapted = adapters
        .into_iter()
        .zip(receivers)
        .map(|((name, dir), requests)| {
            let (recipe, weights) =
                with_peft_adapter(recipe.clone(), weights.clone(), &dir).with_context(|| format!("--lora {name}={}", dir.display()))?;
            Ok(Served { name, recipe, weights, requests })
        })
        .collect::<Result<Vec<_>>>()?;
    // The host copy of the weights goes with the base: it is dropped once the model is built.
    let base = Served { name, recipe: recipe.clone(), weights, requests: base_requests };
    dispatch(&recipe, ServeJob { args, tokenizer, base, adapted, shared })
}

/// `--lora NAME=DIR` flags: unique names, none the base's, each a PEFT folder.
fn lora_flags(flags: &[String], base: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut adapters: Vec<(String, PathBuf)> = Vec::new();
    for flag in flags {
        let Some((name, dir)) = flag.split_once('=').filter(|(n, d)| !n.is_empty() && !d.is_empty()) else {
            bail!("--lora {flag}: give NAME=DIR, the name requests use as `model` and a PEFT adapter folder");
        };
        if name == base || adapters.iter().any(|(n, _)| n == name) {
            bail!("--lora {flag}: the name `{name}` is taken (by the base or another adapter); pick another");
        }
        let dir = PathBuf::from(dir);
        if !dir.join("adapter_config.json").is_file() {
            bail!(
                "--lora {flag}: {} has no adapter_config.json; give a PEFT adapter folder (furnace export --format peft writes one)",
                dir.display()
            );
        }
        adapters.push((name.to_string(), dir));
    }
    Ok(adapters)
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

/// One served model: the base, or the base with an adapter's layers.
struct Served {
    name: String,
    recipe: Recipe,
    weights: NamedTensors,
    requests: Receiver<engine::Job>,
}

struct ServeJob {
    args: ServeArgs,
    tokenizer: TextTokenizer,
    base: Served,
    adapted: Vec<Served>,
    shared: Arc<api::Shared>,
}

impl BackendJob for ServeJob {
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<()> {
        let Self { args, tokenizer, base, adapted, shared } = self;
        let Served { name, recipe, weights, requests } = base;
        let model = decoding_model::<B::InnerBackend>(&recipe, &tokenizer, &weights, &args.checkpoint, &device)?;
        drop(weights);
        let causal = match model.as_causal() {
            Ok(causal) => causal,
            Err(_) if adapted.is_empty() => return serve_encoder(&model, name, tokenizer, &shared, requests, device),
            Err(e) => bail!("--lora serves adapters of a decoder: {e}"),
        };
        // Positions of keys and values the cache holds (a sequence needs whole blocks); Mamba's
        // states are fixed-size.
        let (kv_blocks, kv_capacity) = match &model {
            LanguageModel::Decoder(m) => {
                let blocks = args.num_kv_blocks.unwrap_or_else(|| m.kv_cache_blocks(args.max_num_seqs, args.kv_cache_mb << 20));
                (blocks, blocks * BLOCK_SIZE)
            }
            _ => (1, usize::MAX),
        };
        if kv_blocks == 0 {
            bail!("--kv-cache-mb {} holds no block of {BLOCK_SIZE} positions of keys and values: raise it", args.kv_cache_mb);
        }
        let limits = engine::Limits { max_num_seqs: args.max_num_seqs, prefill_chunk: args.prefill_chunk, kv_blocks };
        let tokenizer = Arc::new(tokenizer);
        let template = chat_template_source(&recipe).map_err(|e| e.to_string()).and_then(|source| ChatTemplate::new(&source, &tokenizer));
        let max_seq_len = causal.max_seq_len();
        let grammars = Grammars::new(&tokenizer, causal.vocab_size()).map_err(anyhow::Error::msg)?;
        let ready = api::Ready {
            name: name.clone(),
            adapters: adapted.iter().map(|a| a.name.clone()).collect(),
            encoder: None,
            tokenizer: tokenizer.clone(),
            template,
            max_seq_len,
            kv_capacity,
            grammars,
        };
        // Each adapter's model is built on its own engine thread, before the server is ready.
        let (built, adapters_ready) = std::sync::mpsc::channel::<Result<String>>();
        let count = adapted.len();
        std::thread::scope(|scope| {
            for served in adapted {
                let (tokenizer, metrics, device, checkpoint, built) =
                    (&tokenizer, shared.metrics.clone(), device.clone(), &args.checkpoint, built.clone());
                scope.spawn(move || {
                    let Served { name, recipe, weights, requests } = served;
                    let model = match decoding_model::<B::InnerBackend>(&recipe, tokenizer, &weights, checkpoint, &device) {
                        Ok(model) => model,
                        Err(e) => return drop(built.send(Err(e.context(format!("--lora {name}"))))),
                    };
                    drop(weights);
                    let Ok(causal) = model.as_causal() else {
                        return drop(built.send(Err(anyhow::anyhow!("--lora {name}: not a decoder"))));
                    };
                    let _ = built.send(Ok(name));
                    drop(built);
                    engine::Engine::new(&causal, tokenizer, metrics, limits, device).run(requests);
                });
            }
            drop(built);
            let adapters: Vec<String> = adapters_ready.iter().take(count).collect::<Result<_>>().unwrap_or_else(|e| {
                eprintln!("error: {e:#}");
                std::process::exit(1)
            });
            serving_memory();
            let engine = engine::Engine::new(&causal, &tokenizer, shared.metrics.clone(), limits, device);
            let _ = shared.ready.set(ready);
            let with = if adapters.is_empty() { String::new() } else { format!(" with LoRA adapters {}", adapters.join(", ")) };
            println!("serving {name}{with} (max_num_seqs {}, context {max_seq_len} tokens)", args.max_num_seqs);
            engine.run(requests);
        });
        Ok(())
    }
}

/// An encoder (BERT; T5, whose decoder needs an input to decode from) serves `/v1/embeddings`
/// only, each request in turn on this thread; the HTTP side refuses the generating endpoints.
fn serve_encoder<B: FusedOps>(
    model: &LanguageModel<B>,
    name: String,
    tokenizer: TextTokenizer,
    shared: &api::Shared,
    requests: Receiver<engine::Job>,
    device: B::Device,
) -> Result<()> {
    let kind = if matches!(model, LanguageModel::Bert(_)) { "BERT" } else { "T5" };
    let tokenizer = Arc::new(tokenizer);
    let ready = api::Ready {
        name: name.clone(),
        adapters: Vec::new(),
        encoder: Some(kind),
        tokenizer: tokenizer.clone(),
        template: Err(format!("{name} is an encoder ({kind})")),
        max_seq_len: model.max_seq_len(),
        kv_capacity: usize::MAX,
        grammars: Grammars::new(&tokenizer, model.vocab_size()).map_err(anyhow::Error::msg)?,
    };
    serving_memory();
    let _ = shared.ready.set(ready);
    println!("serving {name} (an encoder, {kind}: /v1/embeddings only)");
    for job in requests {
        shared.metrics.waiting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let engine::Job::Embed { inputs, reply } = job {
            shared.metrics.prompt_tokens.fetch_add(inputs.iter().map(Vec::len).sum::<usize>() as u64, std::sync::atomic::Ordering::Relaxed);
            let _ = reply.send(inputs.iter().map(|tokens| model.mean_hidden(tokens, &device)).collect());
        }
    }
    Ok(())
}

/// Once every model is built: what loading freed goes back to the OS, and from then on freed
/// memory stays mapped, as in training (each step reuses the last one's buffers).
fn serving_memory() {
    collect_freed_memory();
    retain_freed_memory(true);
}
