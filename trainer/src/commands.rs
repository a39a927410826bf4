//! What each subcommand does, in terms of the library crates.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use furnace_configs::{ModelSection, Recipe, TextDocuments};
use furnace_core::params::{from_safetensors, load_named, to_safetensors, HostTensor, NamedTensors, StoreDtype};
use furnace_data::chat::{ChatTemplate, Message};
use furnace_data::corpus::{prepare, sample_inputs, Prepared};
use furnace_data::inputs::{expand, TextOptions};
use furnace_data::shards::write_llmc;
use furnace_data::tokenizer::ExtraTokens;
use furnace_data::{Detokenizer, TextTokenizer, Tokens};
use furnace_models::beam::{beam_search, BeamConfig, EarlyStopping};
use furnace_models::generate::{GenerateConfig, TokenConstraint};
use furnace_models::hf::{from_peft, hf_arch_for};
use furnace_models::kernels::FusedOps;
use furnace_models::sampling::{Mirostat, SamplingConfig};
use furnace_models::speculative::{generate_speculative, Drafter};
use furnace_models::{Causal, LanguageModel};

use crate::backend::{dispatch, BackendJob, TrainBackend};
use crate::checkpoint::{self, TOKENIZER_FILE};
use crate::datasets::chat_template_source;
use crate::evaluate::{encode_prompt, fill_mask_line, reply};
use crate::memory::check_fits;
use crate::model::{base_for, build_model, is_gguf, load_base};
use crate::structured::{Grammar, Grammars};
use crate::tools::{scan, Scan, ToolChoice, Tools};
use crate::train::{output_dir, TrainJob};
use crate::{ExportArgs, GenerateArgs, RecipeArgs, TrainArgs};

/// A recipe that parses, validates and, by its memory estimate, fits this machine; the
/// estimate in GB when there is one.
fn load_recipe_estimated(args: &RecipeArgs) -> Result<(Recipe, Option<f64>)> {
    let recipe = Recipe::load(&args.config, &args.overrides)?;
    let estimate = check_fits(&recipe)?;
    Ok((recipe, estimate))
}

fn load_recipe(args: &RecipeArgs) -> Result<Recipe> {
    Ok(load_recipe_estimated(args)?.0)
}

pub fn train(args: TrainArgs) -> Result<()> {
    checkpoint::set_verification(!args.no_verify);
    let recipe = load_recipe(&args.recipe)?;
    let out = output_dir(&recipe, args.resume.as_deref());
    let job = TrainJob { output_dir: out, resume: args.resume.is_some(), max_steps: args.max_steps, recipe: recipe.clone() };
    dispatch(&recipe, job)
}

pub fn recipe_check(args: RecipeArgs) -> Result<()> {
    let (recipe, estimate) = load_recipe_estimated(&args)?;
    let model = recipe.model.model(Some(recipe.planned_vocab_size()));
    let memory = match estimate {
        Some(gb) if gb < 1.0 => format!(", ~{:.0} MB of memory", gb * 1e3),
        Some(gb) => format!(", ~{gb:.1} GB of memory"),
        None => String::new(),
    };
    println!(
        "ok: {} — {} {}, ~{:.2}M parameters{memory}; {} steps of {} tokens; output {}",
        args.config.display(),
        recipe.model.arch(),
        model.summary(),
        model.num_params() as f64 / 1e6,
        recipe.training.steps,
        recipe.tokens_per_step(),
        recipe.output_dir().display()
    );
    Ok(())
}

pub fn recipe_explain(file: Option<&Path>) -> Result<()> {
    match file {
        None => print!("{}", furnace_configs::explain()),
        Some(path) => print!("{}", Recipe::load(path, &[])?.to_toml()),
    }
    Ok(())
}

pub fn data_prepare(args: RecipeArgs) -> Result<()> {
    let recipe = load_recipe(&args)?;
    let out = recipe.output_dir();
    let prepared = prepare(&recipe, &out).map_err(anyhow::Error::msg)?;
    println!(
        "{}: {} train tokens in {}, {} val tokens in {}, tokenizer {} (vocab {})",
        if prepared.reused { "up to date" } else { "prepared" },
        prepared.train_tokens,
        prepared.train.display(),
        prepared.val_tokens,
        prepared.val.display(),
        prepared.tokenizer_path.display(),
        prepared.tokenizer.vocab_size()
    );
    if let Some(rates) = preparation_rates(&prepared) {
        println!("  {rates}");
    }
    Ok(())
}

pub fn data_export_tokens(args: RecipeArgs, out: &Path) -> Result<()> {
    let recipe = load_recipe(&args)?;
    let prepared = prepare(&recipe, &recipe.output_dir()).map_err(anyhow::Error::msg)?;
    for (split, manifest) in [("train", &prepared.train), ("val", &prepared.val)] {
        let tokens = Tokens::open(manifest).map_err(anyhow::Error::msg)?;
        let path = out.join(format!("{split}.bin"));
        write_llmc(&path, &tokens, prepared.tokenizer.vocab_size()).map_err(anyhow::Error::msg)?;
        println!("{split}: {} tokens in {} (llm.c format)", tokens.len(), path.display());
    }
    Ok(())
}

/// How fast a preparation read and tokenized, or None when it was reused.
pub fn preparation_rates(prepared: &Prepared) -> Option<String> {
    let seconds = prepared.seconds.max(1e-9);
    let tokens = (prepared.train_tokens + prepared.val_tokens) as f64;
    (!prepared.reused).then(|| {
        format!(
            "{:.1} MB read in {:.1} s: {:.1} MB/s, {:.2} M tokens/s{}{}",
            prepared.input_bytes as f64 / 1e6,
            prepared.seconds,
            prepared.input_bytes as f64 / 1e6 / seconds,
            tokens / 1e6 / seconds,
            if prepared.skipped > 0 { format!(", {} malformed records skipped", prepared.skipped) } else { String::new() },
            if prepared.duplicates > 0 { format!(", {} duplicate documents dropped", prepared.duplicates) } else { String::new() }
        )
    })
}

pub fn data_tokenizer(
    inputs: &[String],
    vocab_size: usize,
    text_field: &str,
    sample_mb: usize,
    extra: ExtraTokens,
    out: &Path,
) -> Result<()> {
    let inputs = expand(inputs, "--input").map_err(anyhow::Error::msg)?;
    let options = TextOptions { field: text_field, documents: TextDocuments::File, skip_bad: false };
    let sample = sample_inputs(&inputs, options, sample_mb).map_err(anyhow::Error::msg)?;
    let tokenizer = TextTokenizer::train(&sample, vocab_size, extra).map_err(anyhow::Error::msg)?;
    tokenizer.save(out).map_err(anyhow::Error::msg)?;
    let megabytes = sample.iter().map(String::len).sum::<usize>() as f64 / 1e6;
    println!(
        "trained a byte-level BPE of {} tokens on {megabytes:.1} MB of {} file(s): {}",
        tokenizer.vocab_size(),
        inputs.len(),
        out.display()
    );
    Ok(())
}

pub fn bench_gemm(size: usize) -> Result<()> {
    let gflops = crate::bench::matmul_gflops::<burn::backend::Flex>(size, &Default::default());
    println!("flex f32 matmul {size}x{size}: {gflops:.1} GFLOP/s");
    Ok(())
}

pub fn bench_scan(batch: usize, seq: usize, channels: usize, state: usize) -> Result<()> {
    println!("selective scan forward+backward, batch {batch}, seq {seq}, channels {channels}, state {state}:");
    let timings = crate::bench::scan_seconds(batch, seq, channels, state, 3);
    let fused = timings[0].1;
    for (name, seconds) in timings {
        println!("  {name:<24} {:>9.2} ms  {:>6.1}x the fused time", seconds * 1e3, seconds / fused);
    }
    Ok(())
}

pub fn bench_attention(batch: usize, seq: usize, heads: usize, dim: usize) -> Result<()> {
    #[cfg(feature = "wgpu")]
    {
        let kernels = if std::env::var("FURNACE_KERNELS").as_deref() == Ok("reference") { "reference ops" } else { "fused kernels" };
        let measured = crate::bench::attention_on_wgpu(batch, seq, heads, dim, 3);
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        println!("causal attention on wgpu, [batch {batch}, seq {seq}, heads {heads}, head_dim {dim}], {kernels}:");
        println!(
            "  kept for the backward   {:>10.2} MiB ({} bytes, beside the output's {:.2} MiB)",
            mib(measured.kept_bytes),
            measured.kept_bytes,
            mib(measured.output_bytes)
        );
        println!("  forward + backward      {:>10.1} ms (best of 3)", measured.seconds * 1e3);
        Ok(())
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = (batch, seq, heads, dim);
        bail!("furnace bench attention runs on wgpu; build with `cargo build --release -p furnace-trainer --features wgpu`")
    }
}

pub fn bench_all_reduce(args: RecipeArgs, iters: usize) -> Result<()> {
    let recipe = load_recipe(&args)?;
    let times = crate::bench::all_reduce_seconds(&recipe, iters.max(1))?;
    let world = furnace_distributed::World::from_env();
    if world.is_main() {
        let megabytes = times.elements as f64 * 4.0 / 1e6;
        let rate = |seconds: f64| megabytes / 1e3 / seconds;
        println!(
            "gradient all-reduce over {} ranks, {} f32 ({megabytes:.1} MB), buckets of {} MB, best of {iters}:",
            world.size, times.elements, recipe.distributed.bucket_mb
        );
        println!("  training path (bucketed, host copies, mean) {:>9.1} ms  {:>6.2} GB/s", times.training * 1e3, rate(times.training));
        println!("  raw all-reduce of the same bytes            {:>9.1} ms  {:>6.2} GB/s", times.raw * 1e3, rate(times.raw));
        println!("  training path throughput / raw: {:.0}%", 100.0 * times.raw / times.training);
    }
    Ok(())
}

struct GenerateJob {
    args: GenerateArgs,
    recipe: Recipe,
    tokenizer: TextTokenizer,
    weights: NamedTensors,
    /// --json-schema, --regex, --grammar or --tools, and the flag that gave it.
    grammar: Option<(Grammar, String)>,
    tools: Option<Tools>,
}

impl BackendJob for GenerateJob {
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<()> {
        let Self { args, recipe, tokenizer, weights, grammar, tools } = self;
        let model = decoding_model::<B::InnerBackend>(&recipe, &tokenizer, &weights, &args.checkpoint, &device)?;
        let mut constraint = match &grammar {
            Some(_) if matches!(model, LanguageModel::Bert(_)) => {
                bail!("{} is a BERT, which fills masks: structured output needs a model that generates", args.checkpoint.display())
            }
            Some((grammar, flag)) => Some(
                Grammars::new(&tokenizer, model.vocab_size())
                    .and_then(|grammars| grammars.constraint(grammar))
                    .map_err(|e| anyhow::anyhow!("{flag}: {e}"))?,
            ),
            None => None,
        };
        let drafter = match (&args.draft_checkpoint, args.prompt_lookup) {
            (None, false) => None,
            _ if grammar.is_some() => {
                bail!("speculative decoding (--draft-checkpoint, --prompt-lookup) does not combine with a grammar yet")
            }
            _ if model.as_causal().is_err() => {
                bail!("speculative decoding needs a model that decodes left to right; {} is not one", args.checkpoint.display())
            }
            _ if args.num_speculative_tokens == 0 => bail!("--num-speculative-tokens must be at least 1"),
            _ if args.mirostat_tau.is_some() => {
                bail!("speculative decoding draws from a fixed distribution; Mirostat's changes each token")
            }
            (Some(path), _) => {
                Some(Draft::Model(load_draft::<B::InnerBackend>(path, &tokenizer, &model, args.backend.as_deref(), &device)?))
            }
            (None, true) => Some(Draft::PromptLookup),
        };
        // The grammar's end is end-of-text, --ignore-eos or not.
        let mut stop_tokens = if args.ignore_eos && constraint.is_none() { Vec::new() } else { vec![tokenizer.eos()] };
        for s in &args.stop {
            match tokenizer.encode(s).as_slice() {
                [single] => stop_tokens.push(*single),
                _ => bail!("--stop {s:?} is not a single token of this tokenizer"),
            }
        }
        let generation = GenerateConfig {
            max_new_tokens: args.max_new_tokens,
            stop_tokens,
            sampling: SamplingConfig {
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                min_p: args.min_p,
                repetition_penalty: args.repetition_penalty,
                seed: args.seed,
                mirostat: args.mirostat_tau.map(|tau| Mirostat { tau, eta: args.mirostat_eta }),
            },
        };
        let encoder_decoder = matches!(model, LanguageModel::T5(_));
        if encoder_decoder && args.chat {
            bail!(
                "--chat renders a chat template for a decoder; {} is an encoder-decoder (T5): give its input as --prompt",
                args.checkpoint.display()
            );
        }
        let prompt = if args.chat {
            let template = ChatTemplate::new(&chat_template_source(&recipe)?, &tokenizer).map_err(anyhow::Error::msg)?;
            let turn = [Message::new("user", args.prompt.clone())];
            let definitions = tools.as_ref().map_or(&[][..], |t| &t.definitions[..]);
            tokenizer.encode(&template.render(&turn, definitions, true).map_err(anyhow::Error::msg)?)
        } else {
            encode_prompt(&tokenizer, &args.prompt, encoder_decoder)
        };
        // A decoder's prompt and reply share its context: a longer prompt keeps its end, with
        // room for at least one new token.
        let context = model.max_seq_len();
        let prompt = if !encoder_decoder && prompt.len() >= context {
            eprintln!(
                "warning: the prompt has {} tokens and the model's context is {context} (model.max_seq_len): using its last {} tokens",
                prompt.len(),
                context - 1
            );
            prompt[prompt.len() - (context - 1)..].to_vec()
        } else {
            prompt
        };
        if let (Some(path), false) = (&args.logits_out, encoder_decoder) {
            let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
            let logits = model.forward(burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(ids, [1, prompt.len()]), &device))?;
            let [_, positions, vocab] = logits.dims();
            let mut out = NamedTensors::new();
            out.insert("logits".into(), HostTensor::from_tensor(logits.reshape([positions, vocab])));
            let mut ids = NamedTensors::new();
            ids.insert("input_ids".into(), HostTensor { shape: vec![prompt.len()], data: prompt.iter().map(|&t| t as f32).collect() });
            out.extend(ids);
            std::fs::write(path, to_safetensors(&out)).with_context(|| format!("cannot write {}", path.display()))?;
        }
        // An encoder fills the prompt's masks instead of continuing it.
        if let LanguageModel::Bert(bert) = &model {
            println!("{}", fill_mask_line(bert, &tokenizer, &args.prompt, &device)?);
            return Ok(());
        }
        if args.num_beams > 1 {
            return print_beams(&model, &tokenizer, &prompt, &args, &generation.stop_tokens, &device);
        }
        // A chat reply or an encoder-decoder's output stands alone; a plain continuation
        // follows its prompt.
        if !args.chat && !encoder_decoder {
            print!("{}", args.prompt);
        }
        // T5's sentinels are what a span-corruption model writes: they stay visible.
        let mut detokenizer = Detokenizer::new(encoder_decoder);
        let mut printed = 0;
        let mut stdout = std::io::stdout();
        let stop_tokens = generation.stop_tokens.clone();
        let started = std::time::Instant::now();
        let print_token = |token: u32| {
            if stop_tokens.contains(&token) {
                return;
            }
            // A trailing partial UTF-8 character waits until its bytes arrive.
            let complete = detokenizer.push(&tokenizer, token);
            if complete.len() > printed {
                let _ = write!(stdout, "{}", &complete[printed..]);
                let _ = stdout.flush();
                printed = complete.len();
            }
        };
        let (reply_tokens, speculation) = match &drafter {
            Some(drafter) => {
                let target = model.as_causal()?;
                let k = args.num_speculative_tokens;
                let (tokens, stats) = match drafter {
                    Draft::Model(draft) => {
                        let draft = draft.as_causal()?;
                        generate_speculative(&target, Drafter::Model(&draft), k, &prompt, &generation, &device, print_token)
                    }
                    Draft::PromptLookup => {
                        let lookup: Drafter<'_, Causal<'_, _>> = Drafter::PromptLookup { max_ngram: 3 };
                        generate_speculative(&target, lookup, k, &prompt, &generation, &device, print_token)
                    }
                };
                (tokens, Some(stats))
            }
            None => {
                let as_constraint = constraint.as_mut().map(|c| c as &mut dyn TokenConstraint);
                (reply(&model, &prompt, tokenizer.pad(), &generation, as_constraint, &device, print_token)?, None)
            }
        };
        // A reply that ends inside a character shows what it has (U+FFFD), as the server sends it.
        print!("{}", detokenizer.finish(&tokenizer).get(printed..).unwrap_or(""));
        println!();
        // Why it stopped, on stderr so that stdout stays the text.
        match reply_tokens.last() {
            Some(&last) if last == tokenizer.eos() && grammar.is_some() => {
                eprintln!(
                    "(stopped: {} is complete after {} tokens)",
                    grammar.as_ref().map_or("", |(_, flag)| flag),
                    reply_tokens.len() - 1
                )
            }
            Some(&last) if last == tokenizer.eos() && !args.ignore_eos => eprintln!(
                "(stopped: the model wrote end-of-text after {} tokens; --ignore-eos continues to --max-new-tokens)",
                reply_tokens.len() - 1
            ),
            Some(&last) if generation.stop_tokens.contains(&last) => {
                eprintln!("(stopped at a --stop token after {} tokens)", reply_tokens.len() - 1)
            }
            _ => eprintln!("(stopped at --max-new-tokens = {})", args.max_new_tokens),
        }
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("({} tokens in {seconds:.2} s: {:.1} tokens/s)", reply_tokens.len(), reply_tokens.len() as f64 / seconds.max(1e-9));
        if let Some(s) = speculation {
            eprintln!(
                "(speculative: {} of {} drafted tokens accepted ({:.0}%), {} model forwards for {} tokens)",
                s.accepted,
                s.drafted,
                100.0 * s.acceptance(),
                s.rounds,
                reply_tokens.len()
            );
        }
        if let (Some(constraint), Some((_, flag))) = (constraint.as_mut(), &grammar) {
            if let Some(error) = constraint.error() {
                bail!("{flag}: the grammar failed mid-reply: {error}");
            }
            if !constraint.is_complete() {
                eprintln!("warning: the reply ends at --max-new-tokens before {flag} is complete; raise --max-new-tokens");
            }
        }
        if tools.as_ref().is_some_and(|t| t.choice != ToolChoice::None) {
            if let Scan::Calls(calls) = scan(&tokenizer.decode(&reply_tokens)) {
                for call in calls.iter().filter(|c| c.complete) {
                    eprintln!("(tool call: {} {})", call.name.as_deref().unwrap_or_default(), call.arguments);
                }
            }
        }
        if let (Some(path), LanguageModel::T5(_)) = (&args.logits_out, &model) {
            write_seq2seq_logits(&model, &prompt, tokenizer.pad(), &reply_tokens, path, &device)?;
        }
        Ok(())
    }
}

/// An encoder-decoder's `--logits-out`: the decoder's logits over the start token and the
/// reply (`decoder_input_ids`), reading the prompt (`input_ids`), as transformers computes
/// them from the same two id lists.
fn write_seq2seq_logits<B: FusedOps>(
    model: &LanguageModel<B>,
    prompt: &[u32],
    start: u32,
    reply: &[u32],
    path: &Path,
    device: &B::Device,
) -> Result<()> {
    let decoder: Vec<u32> = std::iter::once(start).chain(reply.iter().copied()).collect();
    let ids = |tokens: &[u32]| {
        let values: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        burn::tensor::Tensor::<B, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(values, [1, tokens.len()]), device)
    };
    let logits = model.forward_seq2seq(ids(prompt), &[prompt.len()], ids(&decoder))?;
    let [_, positions, vocab] = logits.dims();
    let as_floats = |tokens: &[u32]| HostTensor { shape: vec![tokens.len()], data: tokens.iter().map(|&t| t as f32).collect() };
    let mut out = NamedTensors::new();
    out.insert("logits".into(), HostTensor::from_tensor(logits.reshape([positions, vocab])));
    out.insert("input_ids".into(), as_floats(prompt));
    out.insert("decoder_input_ids".into(), as_floats(&decoder));
    std::fs::write(path, to_safetensors(&out)).with_context(|| format!("cannot write {}", path.display()))
}

pub fn export(args: ExportArgs) -> Result<()> {
    checkpoint::set_verification(!args.no_verify);
    if args.format == "gguf" {
        let quant = match args.quant.as_str() {
            "f16" => crate::gguf::GgmlType::F16,
            "q8_0" => crate::gguf::GgmlType::Q8_0,
            "q4_0" => crate::gguf::GgmlType::Q4_0,
            _ => crate::gguf::GgmlType::F32,
        };
        return crate::export::export_gguf(&args.checkpoint, &args.out, args.force, quant, args.merge_lora);
    }
    if args.format == "peft" {
        return crate::export::export_peft(&args.checkpoint, &args.out, args.force);
    }
    let dtype = match args.dtype.as_str() {
        "f16" => StoreDtype::F16,
        "bf16" => StoreDtype::BF16,
        _ => StoreDtype::F32,
    };
    crate::export::export_hf(&args.checkpoint, &args.out, args.force, dtype, args.max_shard_size, args.merge_lora)
}

/// Generate from a Furnace checkpoint (adapters included), a Hugging Face model folder or a GGUF file.
pub fn generate(args: GenerateArgs) -> Result<()> {
    check_sampling_flags(&args)?;
    let tools = tools_flag(&args)?;
    let grammar = match &tools {
        Some(t) => t.grammar().map(|g| (g, format!("--tools {}", args.tools.as_deref().unwrap_or(Path::new("")).display()))),
        None => grammar_flag(&args)?,
    };
    checkpoint::set_verification(!args.no_verify);
    let (recipe, tokenizer, weights) = load_for_decoding(&args.checkpoint, args.adapter.as_deref(), args.backend.as_deref())?;
    dispatch(&recipe.clone(), GenerateJob { args, recipe, tokenizer, weights, grammar, tools })
}

/// Beam search's best replies (`--num-return-sequences` of them), each on its own line, the
/// scores on stderr.
fn print_beams<B: FusedOps>(
    model: &LanguageModel<B>,
    tokenizer: &TextTokenizer,
    prompt: &[u32],
    args: &GenerateArgs,
    stop_tokens: &[u32],
    device: &B::Device,
) -> Result<()> {
    if args.num_return_sequences == 0 || args.num_return_sequences > args.num_beams {
        bail!("--num-return-sequences {} must be from 1 to --num-beams ({})", args.num_return_sequences, args.num_beams);
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1 for beam search");
    }
    let causal = model.as_causal().map_err(|e| anyhow::anyhow!("beam search: {e}"))?;
    let config = BeamConfig {
        num_beams: args.num_beams,
        max_new_tokens: args.max_new_tokens,
        length_penalty: args.length_penalty,
        early_stopping: match args.early_stopping.as_str() {
            "true" => EarlyStopping::WhenFull,
            "never" => EarlyStopping::Never,
            _ => EarlyStopping::Heuristic,
        },
        stop_tokens: stop_tokens.to_vec(),
    };
    let started = std::time::Instant::now();
    let beams = beam_search(&causal, prompt, &config, device);
    let lead = if args.chat { "" } else { args.prompt.as_str() };
    for (i, beam) in beams.iter().take(args.num_return_sequences).enumerate() {
        println!("{lead}{}", tokenizer.decode(&beam.tokens));
        eprintln!("(beam {}: score {:.4}, {} tokens)", i + 1, beam.score, beam.tokens.len());
    }
    eprintln!("({} beams in {:.2} s)", args.num_beams, started.elapsed().as_secs_f64());
    Ok(())
}

/// The tools `--tools` offers, checked, with `--tool-choice`.
fn tools_flag(args: &GenerateArgs) -> Result<Option<Tools>> {
    let Some(path) = &args.tools else { return Ok(None) };
    let flag = format!("--tools {}", path.display());
    let text = std::fs::read_to_string(path).with_context(|| format!("{flag}: cannot read it"))?;
    let definitions: Vec<serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("{flag}: not a JSON list of function definitions"))?;
    let names = Tools::names(&definitions).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    let choice = match args.tool_choice.as_str() {
        "auto" => ToolChoice::Auto,
        "required" => ToolChoice::Required,
        "none" => ToolChoice::None,
        name if names.iter().any(|n| n == name) => ToolChoice::Function(name.to_string()),
        other => bail!("--tool-choice {other}: give auto, required, none or one of the tools: {}", names.join(", ")),
    };
    Ok(Some(Tools { definitions, choice, parallel: true }))
}

/// Where `furnace generate --draft-checkpoint` or `--prompt-lookup` takes its drafts from.
enum Draft<B: FusedOps> {
    Model(LanguageModel<B>),
    PromptLookup,
}

/// The draft model of `--draft-checkpoint`: it must share the target's tokenizer and vocabulary.
fn load_draft<B: FusedOps>(
    path: &Path,
    tokenizer: &TextTokenizer,
    target: &LanguageModel<B>,
    backend: Option<&str>,
    device: &B::Device,
) -> Result<LanguageModel<B>> {
    let (recipe, draft_tokenizer, weights) = load_for_decoding(path, None, backend)?;
    if draft_tokenizer.to_json() != tokenizer.to_json() {
        bail!("--draft-checkpoint {}: its tokenizer differs from the model's; a draft must share it", path.display());
    }
    let draft = decoding_model::<B>(&recipe, &draft_tokenizer, &weights, path, device)?;
    if draft.as_causal().is_err() || draft.vocab_size() != target.vocab_size() {
        bail!(
            "--draft-checkpoint {}: a draft is a left-to-right model with the model's vocabulary of {} (it has {})",
            path.display(),
            target.vocab_size(),
            draft.vocab_size()
        );
    }
    Ok(draft)
}

/// The grammar `--json-schema`, `--regex` or `--grammar` gives, read (not yet compiled: that
/// needs the model's vocabulary), and the flag as the user wrote it.
fn grammar_flag(args: &GenerateArgs) -> Result<Option<(Grammar, String)>> {
    let read =
        |path: &Path, flag: &str| std::fs::read_to_string(path).with_context(|| format!("{flag} {}: cannot read it", path.display()));
    Ok(if let Some(path) = &args.json_schema {
        let flag = format!("--json-schema {}", path.display());
        let schema = serde_json::from_str(&read(path, "--json-schema")?).with_context(|| format!("{flag}: not valid JSON"))?;
        Some((Grammar::JsonSchema(schema), flag))
    } else if let Some(regex) = &args.regex {
        Some((Grammar::Regex(regex.clone()), format!("--regex {regex:?}")))
    } else if let Some(path) = &args.grammar {
        Some((Grammar::Lark(read(path, "--grammar")?), format!("--grammar {}", path.display())))
    } else {
        None
    })
}

/// The model `load_for_decoding`'s recipe and weights describe, on `device`.
pub fn decoding_model<B: FusedOps>(
    recipe: &Recipe,
    tokenizer: &TextTokenizer,
    weights: &NamedTensors,
    checkpoint: &Path,
    device: &B::Device,
) -> Result<LanguageModel<B>> {
    let base = base_for(recipe)?;
    load_named(build_model::<B>(recipe, tokenizer.vocab_size(), base.as_ref(), device)?.model, weights)
        .map_err(|e| anyhow::anyhow!("{} does not fit its model: {e}", checkpoint.display()))
}

/// What decoding a checkpoint needs — a Furnace run or checkpoint folder, a Hugging Face model
/// folder or a GGUF file, with PEFT adapters from `adapter` on top — to run on `backend`
/// (flex, cuda, wgpu; the recipe's when None).
pub fn load_for_decoding(
    checkpoint: &Path,
    adapter: Option<&Path>,
    backend: Option<&str>,
) -> Result<(Recipe, TextTokenizer, NamedTensors)> {
    let (recipe, tokenizer, weights) = if checkpoint.join("config.json").is_file() || is_gguf(checkpoint) {
        let base = load_base(checkpoint)?;
        let recipe = Recipe { model: ModelSection::of(&base.model, &checkpoint.display().to_string()), ..Default::default() };
        (recipe, TextTokenizer::load(&base.tokenizer).map_err(anyhow::Error::msg)?, base.weights)
    } else {
        let stored = checkpoint::read_model(checkpoint)?;
        let tokenizer = TextTokenizer::load(&stored.dir.join(TOKENIZER_FILE)).map_err(anyhow::Error::msg)?;
        (stored.recipe, tokenizer, stored.weights)
    };
    let (mut recipe, weights) = match adapter {
        Some(dir) => with_peft_adapter(recipe, weights, dir)?,
        None => (recipe, weights),
    };
    if let Some(backend) = backend {
        recipe.runtime.backend =
            *furnace_configs::Backend::ALL.iter().find(|b| b.as_str() == backend).context("--backend is one of flex, cuda, wgpu")?;
    }
    Ok((recipe, tokenizer, weights))
}

/// The sampling flags in their ranges (as transformers' GenerationConfig checks them).
fn check_sampling_flags(args: &GenerateArgs) -> Result<()> {
    let checks = [
        ("--temperature", args.temperature, args.temperature >= 0.0 && args.temperature.is_finite(), "a finite number ≥ 0 (0 is greedy)"),
        ("--top-p", args.top_p, args.top_p > 0.0 && args.top_p <= 1.0, "in (0, 1] (1 keeps every token)"),
        ("--min-p", args.min_p, (0.0..=1.0).contains(&args.min_p), "in [0, 1] (0 is off)"),
        (
            "--repetition-penalty",
            args.repetition_penalty,
            args.repetition_penalty > 0.0 && args.repetition_penalty.is_finite(),
            "a finite number > 0 (1 is off)",
        ),
        (
            "--mirostat-tau",
            args.mirostat_tau.unwrap_or(5.0),
            args.mirostat_tau.is_none_or(|t| t > 0.0 && t.is_finite()),
            "a finite number of bits > 0",
        ),
        ("--mirostat-eta", args.mirostat_eta, args.mirostat_eta > 0.0 && args.mirostat_eta <= 1.0, "in (0, 1]"),
    ];
    match checks.iter().find(|(_, _, ok, _)| !ok) {
        Some((flag, value, _, range)) => bail!("{flag} {value} is out of range: it must be {range}"),
        None => Ok(()),
    }
}

/// The model and weights with the PEFT adapters in `dir` on top: `[lora]` from its
/// adapter_config.json (r, lora_alpha, use_rslora), the adapted layers from its tensors.
pub(crate) fn with_peft_adapter(mut recipe: Recipe, mut weights: NamedTensors, dir: &Path) -> Result<(Recipe, NamedTensors)> {
    if recipe.lora.r > 0 {
        bail!("the checkpoint already has LoRA adapters; apply --adapter to a base model (or merge first with export --merge-lora)");
    }
    let config_path = dir.join("adapter_config.json");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).with_context(|| format!("cannot read {}", config_path.display()))?)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    if config["peft_type"] != "LORA" {
        bail!("{}: peft_type {} is not LORA", config_path.display(), config["peft_type"]);
    }
    let r = config["r"].as_u64().with_context(|| format!("{} has no integer `r`", config_path.display()))? as usize;
    let alpha = config["lora_alpha"].as_f64().with_context(|| format!("{} has no `lora_alpha`", config_path.display()))?;
    let tensors_path = dir.join("adapter_model.safetensors");
    let peft = from_safetensors(&std::fs::read(&tensors_path).with_context(|| format!("cannot read {}", tensors_path.display()))?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tensors_path.display()))?;
    let model = recipe.model.model(weights.get("embed_tokens").map(|t| t.shape[0]));
    let arch = hf_arch_for(&model).map_err(anyhow::Error::msg)?;
    let adapters = from_peft(arch, &peft, model.n_layers(), r).map_err(|e| anyhow::anyhow!("{}: {e}", tensors_path.display()))?;
    // Adapt exactly the layers the file has adapters for, by their names (`q_proj`, ...).
    let mut targets: Vec<String> =
        adapters.keys().filter_map(|k| k.strip_suffix(".lora.a")?.rsplit('.').next().map(str::to_string)).collect();
    targets.sort();
    targets.dedup();
    recipe.lora.r = r;
    recipe.lora.alpha = alpha;
    recipe.lora.use_rslora = config["use_rslora"].as_bool().unwrap_or(false);
    recipe.lora.target_modules = targets;
    weights.extend(adapters);
    Ok((recipe, weights))
}
