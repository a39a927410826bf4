//! `furnace`: train, generate, check recipes, prepare data, measure the machine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use furnace_data::tokenizer::ExtraTokens;
use furnace_trainer::{commands, ExportArgs, GenerateArgs, RecipeArgs, ServeArgs, TrainArgs};

// A retaining allocator: Burn allocates a fresh large buffer per op, and glibc's malloc hands
// those back to the OS and faults them in again on every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "furnace", version, about = "Train, fine-tune and run language models from one TOML recipe.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model as a recipe describes.
    Train(TrainArgs),
    /// Generate text from a checkpoint.
    Generate(GenerateArgs),
    /// Serve a checkpoint over HTTP with OpenAI's API: completions, chat, streaming, /metrics.
    Serve(ServeArgs),
    /// Export a checkpoint to another format (a Hugging Face model folder).
    Export(ExportArgs),
    /// Validate a recipe, or print every option with its default and meaning.
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// Prepare data: token shards from a recipe, or a tokenizer from text files.
    #[command(subcommand)]
    Data(DataCommand),
    /// Measure this machine.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// Parse and validate a recipe; print the resolved model.
    Check {
        /// The recipe (TOML).
        file: PathBuf,
        /// Override a recipe key, e.g. `--set training.lr=1e-4` (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Print every section and option with its default and meaning; given a recipe, print
    /// that recipe with every default filled in.
    Explain { file: Option<PathBuf> },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Build the tokenizer and token shards a recipe trains on, under its output folder.
    Prepare(RecipeArgs),
    /// Write a recipe's prepared train and validation tokens as llm.c token files
    /// (`<out>/train.bin`, `<out>/val.bin`), which llm.c and nanoGPT-style loaders read.
    ExportTokens {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a byte-level BPE tokenizer on data files (text, JSONL, JSON, Parquet; .gz, .zst),
    /// folders or globs.
    Tokenizer {
        #[arg(long, required = true, num_args = 1..)]
        input: Vec<String>,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// JSONL, JSON and Parquet: the field (column) holding the text.
        #[arg(long, default_value = "text")]
        text_field: String,
        /// Train on the inputs' first this-many megabytes of text.
        #[arg(long, default_value_t = 256)]
        sample_mb: usize,
        /// Add a `[MASK]` token, for masked-LM (BERT) training.
        #[arg(long, conflicts_with = "sentinels")]
        masked_lm: bool,
        /// Add T5's sentinels `<extra_id_0>` … `<extra_id_99>`, for span corruption (T5 training).
        #[arg(long)]
        sentinels: bool,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Float matmul throughput (the peak that MFU is measured against).
    Gemm {
        #[arg(long, default_value_t = 1024)]
        size: usize,
    },
    /// Mamba's selective scan, forward and backward: fused kernel, chunked and sequential scans.
    Scan {
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 1024)]
        seq: usize,
        #[arg(long, default_value_t = 512)]
        channels: usize,
        #[arg(long, default_value_t = 16)]
        state: usize,
    },
    /// Causal attention on the wgpu device, forward and backward: what the forward keeps for the
    /// backward and the time (FURNACE_KERNELS=reference for the composed path).
    Attention {
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 64)]
        dim: usize,
    },
    /// Under mpirun: the recipe model's gradient all-reduce as training does it, against one raw
    /// MPI all-reduce of the same bytes.
    Allreduce {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
}

fn main() -> ExitCode {
    furnace_trainer::memory::retain_freed_memory(true);
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => commands::train(args),
        Command::Generate(args) => commands::generate(args),
        Command::Serve(args) => furnace_trainer::serve::serve(args),
        Command::Export(args) => commands::export(args),
        Command::Recipe(RecipeCommand::Check { file, overrides }) => commands::recipe_check(RecipeArgs { config: file, overrides }),
        Command::Recipe(RecipeCommand::Explain { file }) => commands::recipe_explain(file.as_deref()),
        Command::Data(DataCommand::Prepare(args)) => commands::data_prepare(args),
        Command::Data(DataCommand::ExportTokens { recipe, out }) => commands::data_export_tokens(recipe, &out),
        Command::Data(DataCommand::Tokenizer { input, vocab_size, text_field, sample_mb, masked_lm, sentinels, out }) => {
            let extra = match (masked_lm, sentinels) {
                (true, _) => ExtraTokens::Mask,
                (_, true) => ExtraTokens::Sentinels,
                _ => ExtraTokens::None,
            };
            commands::data_tokenizer(&input, vocab_size, &text_field, sample_mb, extra, &out)
        }
        Command::Bench(BenchCommand::Gemm { size }) => commands::bench_gemm(size),
        Command::Bench(BenchCommand::Scan { batch, seq, channels, state }) => commands::bench_scan(batch, seq, channels, state),
        Command::Bench(BenchCommand::Attention { batch, seq, heads, dim }) => commands::bench_attention(batch, seq, heads, dim),
        Command::Bench(BenchCommand::Allreduce { recipe, iters }) => commands::bench_all_reduce(recipe, iters),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => match err.downcast_ref::<furnace_trainer::signals::Stopped>() {
            Some(stopped) => {
                print_last_line(&stopped.to_string());
                ExitCode::from(furnace_trainer::signals::STOPPED_EXIT_CODE)
            }
            None => {
                print_last_line(&format!("error: {err:#}"));
                ExitCode::FAILURE
            }
        },
    }
}

/// The run's last line on stderr in one write: stderr is unbuffered, and under mpirun the
/// pieces of several ranks' lines written piecemeal interleave mid-line.
fn print_last_line(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}
