//! Every recipe option, its default and its meaning. This file is the single source of truth:
//! `furnace recipe explain` prints it, and the loaders deserialize it with unknown keys rejected.

use serde::{Deserialize, Serialize};

use furnace_core::section;

pub use crate::model::ModelSection;
pub use furnace_core::arch::{Arch, Flavor, ModelConfig};
pub use furnace_core::blocks::{MlpKind, NormKind, PositionKind};
use furnace_core::choice;

choice!(
    /// Where training tokens come from.
    DataSource {
        /// Generated arithmetic problems with answers, e.g. `37+45=82` (for t5, the pair
        /// `37+45=` → `82`).
        Arithmetic = "arithmetic",
        /// A generated story corpus (a small grammar of characters, places and events).
        Stories = "stories",
        /// The user's own `.txt` or `.jsonl` files listed in `data.files`.
        Files = "files",
        /// SFT: conversations, one `{"messages": [{"role": ..., "content": ...}, ...]}` per line,
        /// in the `.jsonl` files listed in `data.files` (with `"tools": [...]` beside the
        /// messages, assistant `tool_calls` and `tool` turns, for tool use). GRPO and PPO: each conversation up to
        /// its last assistant turn is a prompt, that turn the answer the verifier accepts.
        Chat = "chat",
        /// SFT, GRPO and PPO: generated arithmetic questions and answers as conversations
        /// (user: "What is 37+45?", assistant: "37+45=82").
        ArithmeticChat = "arithmetic-chat",
        /// SFT: generated tool use. The user asks an arithmetic question, the assistant calls
        /// the `calculator` tool (`{"expression": "412*37"}`), the tool returns the result, and
        /// the assistant answers with it ("412*37=15244"). Use data.digits = 3 and the operators
        /// + - * so that the tool, not the model, computes.
        ArithmeticTools = "arithmetic-tools",
        /// DPO: preference pairs, one `{"prompt": ..., "chosen": ..., "rejected": ...}` per line,
        /// in the `.jsonl` files listed in `data.files`; the prompt is sent as a user turn.
        Preferences = "preferences",
        /// DPO: generated arithmetic questions with the right reply chosen and a wrong one
        /// (the answer off by 1, 2 or 10) rejected.
        ArithmeticPreferences = "arithmetic-preferences",
        /// Encoder-decoder (t5): (input, target) pairs, one `{"input": ..., "target": ...}` per
        /// line, in the `.jsonl` files listed in `data.files`.
        Seq2seq = "seq2seq",
        /// Encoder-decoder (t5): generated arithmetic written in words, answered in digits
        /// ("thirty-seven plus forty-five" → "82").
        ArithmeticWords = "arithmetic-words",
    }
);
choice!(
    /// DPO's loss on the reward margin h = (log π_c − log ref_c) − (log π_r − log ref_r).
    DpoLoss {
        /// −log σ(β·h) (Rafailov et al., 2023); with label_smoothing ε, conservative DPO.
        Sigmoid = "sigmoid",
        /// (h − 1/(2β))² on length-averaged log-probs (Azar et al., 2023), as TRL's "ipo".
        Ipo = "ipo",
    }
);
choice!(
    /// What a document is in a plain-text file of data.source = "files" (JSONL records are one
    /// document each). Each document is preceded by end-of-text in the token stream.
    TextDocuments {
        /// The whole file, newlines and blank lines kept exactly (as nanoGPT's prepare.py and
        /// transformers' run_clm read a book or a play: continuous text).
        File = "file",
        /// Each block between blank lines, trimmed (for corpora that really are one document per
        /// paragraph).
        BlankLine = "blank-line",
        /// Each non-empty line.
        Line = "line",
    }
);
choice!(
    /// What the loop optimises.
    TrainMode {
        /// The architecture's own objective: next-token prediction on every token of packed
        /// windows; masked-token prediction for model.arch = "bert" (see
        /// training.mlm_probability); for "t5", the target given the input on pair data
        /// (seq2seq, arithmetic, arithmetic-words) and span corruption on text (stories, files).
        Pretrain = "pretrain",
        /// Supervised fine-tuning on conversations: one per row, loss on the assistant's tokens only.
        Sft = "sft",
        /// Direct preference optimisation on (prompt, chosen, rejected) pairs against the
        /// starting model as the frozen reference.
        Dpo = "dpo",
        /// A reward model: a scalar head on the last token, trained on preference pairs with the
        /// Bradley-Terry loss −log σ(r_chosen − r_rejected), as TRL's RewardTrainer.
        Reward = "reward",
        /// Group relative policy optimisation (Shao et al., 2024): `grpo.num_generations` replies
        /// sampled per prompt, scored by the verifier, advantages normalised within each group,
        /// a KL penalty to the starting model; no value model.
        Grpo = "grpo",
        /// Proximal policy optimisation (Ouyang et al., 2022; TRL's PPOTrainer): one reply per
        /// prompt scored at its end, a per-token KL penalty to the starting model, a value head
        /// on the policy, GAE advantages, clipped policy and value losses over several epochs.
        Ppo = "ppo",
    }
);
choice!(
    /// How GRPO averages its per-token losses, as TRL's `loss_type`.
    GrpoLoss {
        /// Over all completion tokens of the step (token-level, DAPO; TRL's default).
        Dapo = "dapo",
        /// Over each completion's tokens, then over completions (the GRPO paper).
        Grpo = "grpo",
        /// Summed, divided by completions × max_completion_length (Dr. GRPO: no length bias).
        DrGrpo = "dr_grpo",
    }
);
choice!(
    /// Optimizer algorithm.
    OptimizerName {
        /// AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay.
        AdamW = "adamw",
        /// Lion (Chen et al., 2023): the sign of an interpolated momentum.
        Lion = "lion",
        /// Sophia-G (Liu et al., 2023): momentum preconditioned by a clipped diagonal
        /// Gauss-Newton-Bartlett Hessian estimate, refreshed every `hessian_interval` steps.
        Sophia = "sophia",
    }
);
choice!(
    /// How LoRA's A matrix starts (B starts at zero either way, so step 0 is the base model).
    LoraInit {
        /// Kaiming-uniform with a = √5, PEFT's default (`init_lora_weights = true`).
        Kaiming = "kaiming",
        /// Normal with std 1/r, PEFT's `init_lora_weights = "gaussian"`.
        Gaussian = "gaussian",
    }
);
choice!(
    /// Storage of the frozen base's linear layers under LoRA.
    BaseQuant {
        /// Dense f32, as trained.
        None = "none",
        /// QLoRA: NF4 with double-quantized block maxima (≈4.13 bits a weight), dequantized
        /// inside each layer's forward and backward.
        Nf4 = "nf4",
    }
);
choice!(
    /// How ranks launched by mpirun share the work.
    Strategy {
        /// Data parallel (PyTorch DDP): every rank holds the whole model and optimizer state;
        /// gradients are all-reduced in buckets.
        Ddp = "ddp",
        /// ZeRO stage 1: as ddp, but each rank keeps the optimizer state of its own contiguous
        /// run of parameters, updates only those and broadcasts them to the others.
        Zero1 = "zero1",
        /// ZeRO stage 2: as zero1, and each parameter's gradient is reduced to its owner only
        /// (the others drop theirs), so reduced gradients are sharded too.
        Zero2 = "zero2",
        /// FSDP (ZeRO stage 3): as zero2, and between steps each rank holds only its own
        /// parameters; a block's are gathered from their owners just before it runs (forward,
        /// and again for its recomputation in backward) and released after, and its gradients
        /// go to their owners as soon as its backward ends. Backward recomputes every block
        /// (as activation_checkpoint.mode = "full"), so the same models and modes qualify.
        Fsdp = "fsdp",
    }
);
choice!(
    /// The wire gradients cross between ranks.
    CollectiveBackend {
        /// OpenMPI: shared memory within a node, TCP or InfiniBand between nodes.
        Mpi = "mpi",
        /// NCCL on NVIDIA GPUs (binaries built with `--features nccl`): local rank i uses GPU i;
        /// the unique id goes over MPI, which still launches the ranks.
        Nccl = "nccl",
    }
);
choice!(
    /// Activation checkpointing, with torchtitan's names.
    CheckpointMode {
        /// Keep every activation backward needs (fastest, most memory).
        None = "none",
        /// Keep only each block's input; backward recomputes one block at a time
        /// (about one more forward pass per step, activation memory of one block).
        Full = "full",
        /// Recompute every N-th block only (`selective_ac_option`), keeping the others'
        /// activations: between none and full in both memory and time.
        Selective = "selective",
    }
);
choice!(
    /// Numeric precision of training, with PyTorch Lightning's names.
    Precision {
        /// Everything in f32.
        Fp32 = "fp32",
        /// f32 parameters, gradients and optimizer state; every linear layer's matmul but the
        /// output head's computes in bf16 (inputs and weights cast at the layer, the product
        /// cast back), as torch.autocast does; the head (whose logits feed the loss), norms,
        /// softmax, attention, RoPE, the loss and the gradient reduction stay f32.
        Bf16Mixed = "bf16-mixed",
        /// As bf16-mixed in f16, with dynamic loss scaling (PyTorch's GradScaler): the loss is
        /// multiplied by the scale before backward and the gradients divided after; a step whose
        /// gradients overflow is skipped and the scale halved; every
        /// `runtime.loss_scale_growth_interval` good steps it doubles.
        Fp16Mixed = "fp16-mixed",
        /// The parameters themselves (and so their gradients) in bf16, for memory: the matmuls
        /// compute in bf16 as under bf16-mixed, other ops widen the weights to f32 where they
        /// use them, the optimizer updates in f32 (its state stays f32) and rounds the result to
        /// bf16, so an update below 1/256 of a weight is lost. Pretrain and sft, without
        /// LoRA.
        Bf16True = "bf16-true",
    }
);
choice!(Decay { Cosine = "cosine", Linear = "linear", Wsd = "wsd", Constant = "constant" });
choice!(
    /// Compute backend; GPU backends exist only in binaries built with their cargo feature.
    Backend { Flex = "flex", Cuda = "cuda", Wgpu = "wgpu" }
);

section! {
    /// Run identity and where its outputs go.
    RunSection = "run" {
        /// Name of the run, used in logs and as the default output folder `runs/<name>`.
        name: String = "furnace".into(),
        /// Folder for checkpoints, metrics.jsonl, tb/ and the tokenizer. Empty: `runs/<name>`.
        output_dir: String = String::new(),
        /// Seed for parameter init, data order and sampling. Same seed, same run.
        seed: u64 = 1337,
    }
}

section! {
    /// LoRA adapters (Hu et al., 2021): the base weights freeze and each targeted linear layer
    /// learns a low-rank update `x·A·B·scale`, scale = alpha/r (alpha/√r with use_rslora).
    /// Names, defaults and file format follow Hugging Face PEFT.
    LoraSection = "lora" {
        /// Rank of the adapters. 0: no adapters, every parameter trains.
        r: usize = 0,
        /// Scaling numerator: the update is multiplied by alpha/r.
        alpha: f64 = 16.0,
        /// Dropout on the adapter's input.
        dropout: f64 = 0.0,
        /// Layers that get adapters, by PEFT name: q_proj k_proj v_proj o_proj gate_proj up_proj
        /// down_proj lm_head, GPT-2's c_attn (= q,k,v) attn.c_proj mlp.c_proj c_proj c_fc, or
        /// "all-linear" (every linear layer but the head, as the QLoRA paper adapts). A name that
        /// matches no layer of the model is an error.
        target_modules: Vec<String> = vec!["all-linear".into()],
        /// Initialisation of A: kaiming (PEFT's default) or gaussian.
        init: LoraInit = LoraInit::Kaiming,
        /// Rank-stabilised scaling alpha/√r (Kalajdzievski, 2023), as PEFT's use_rslora.
        use_rslora: bool = false,
        /// Start the adapters from a Hugging Face PEFT folder (adapter_config.json,
        /// adapter_model.safetensors) instead of B = 0, to continue training them. Its rank must
        /// be lora.r and its layers among target_modules.
        adapter_from: String = String::new(),
        /// QLoRA: "nf4" stores the frozen base's linear layers (all but the output head) in 4-bit
        /// NormalFloat, as bitsandbytes' load_in_4bit with nf4 and double quantization.
        /// Needs model.init_from.
        quantize_base: BaseQuant = BaseQuant::None,
    }
}

section! {
    /// Direct preference optimisation (training.mode = "dpo"), with TRL's names and defaults.
    DpoSection = "dpo" {
        /// β: how far the policy may move from the reference (the KL penalty's inverse weight).
        beta: f64 = 0.1,
        /// sigmoid (DPO) or ipo.
        loss_type: DpoLoss = DpoLoss::Sigmoid,
        /// Conservative DPO: the probability that a preference label is flipped (sigmoid loss).
        label_smoothing: f64 = 0.0,
        /// Compute the reference's log-probabilities of every pair once, before the first step
        /// (fast; what TRL's precompute_ref_log_probs does). false: run the frozen reference
        /// model on each batch, as TRL does by default (no pass over the data up front).
        precompute_ref_log_probs: bool = true,
    }
}

section! {
    /// Group relative policy optimisation (training.mode = "grpo"), with TRL's names and
    /// defaults. Each step samples `num_generations` replies to each of `training.local_batch_size`
    /// prompts from the current model, scores them (verifier or reward model), and takes one
    /// optimiser step on them (TRL's num_iterations = 1, so the PPO ratio is 1 and never clipped).
    GrpoSection = "grpo" {
        /// Replies sampled per prompt (the group size G).
        num_generations: usize = 8,
        /// Longest reply sampled, in tokens.
        max_completion_length: usize = 16,
        /// Sampling temperature of the replies.
        temperature: f64 = 1.0,
        /// Weight of the per-token KL penalty to the starting model (k3 estimator); 0 turns it off.
        beta: f64 = 0.04,
        /// dapo, grpo or dr_grpo: how per-token losses are averaged.
        loss_type: GrpoLoss = GrpoLoss::Dapo,
        /// Divide each group's advantages by its reward standard deviation (TRL's scale_rewards).
        scale_rewards: bool = true,
    }
}

section! {
    /// Proximal policy optimisation (training.mode = "ppo"), with TRL's names and defaults. Each
    /// step samples one reply to each of `training.local_batch_size` prompts, scores it (verifier
    /// or `training.reward_model`), and takes `num_ppo_epochs` optimiser steps on the batch.
    PpoSection = "ppo" {
        /// Optimiser steps on each batch of replies.
        num_ppo_epochs: usize = 4,
        /// Longest reply sampled, in tokens.
        max_completion_length: usize = 16,
        /// Sampling temperature of the replies.
        temperature: f64 = 1.0,
        /// Weight of the per-token KL penalty to the starting model, taken out of the reward.
        kl_coef: f64 = 0.05,
        /// Policy ratio clip ε.
        cliprange: f64 = 0.2,
        /// Value clip around the rollout's values.
        cliprange_value: f64 = 0.2,
        /// Weight of the value loss.
        vf_coef: f64 = 0.1,
        /// Discount γ.
        gamma: f64 = 1.0,
        /// GAE's λ.
        lam: f64 = 0.95,
    }
}

/// One source of a weighted data mixture (`[[data.sources]]`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MixtureSource {
    /// Names the source in metrics (`data/source_fraction/<name>`) and prepared files.
    pub name: String,
    /// Files, folders or globs, as data.files.
    pub files: Vec<String>,
    /// Sampling weight; the weights are normalised to probabilities.
    pub weight: f64,
    /// At most this many passes over the source per pass of the mixture; 0: no cap.
    #[serde(default)]
    pub epochs: usize,
}

section! {
    /// Training data: where it comes from and how it is tokenized.
    DataSection = "data" {
        /// Source: arithmetic, stories (both generated, no download) or files.
        source: DataSource = DataSource::Arithmetic,
        /// For source = "files" (and the chat, preference and pair sources): data files, folders
        /// (every data file under them) or globs ("corpus/*.jsonl.zst"). Formats by name: .txt
        /// (see text_documents), .jsonl, .json (an array of records, or one per line), .parquet;
        /// .gz and .zst compressed too.
        files: Vec<String> = Vec::new(),
        /// For source = "files": held-out files for validation (as `files`). Empty: the last
        /// `val_fraction` of the tokens, from a document start when one is near.
        val_files: Vec<String> = Vec::new(),
        /// For source = "files", instead of `files`: a weighted mixture, `[[data.sources]]`
        /// entries of `name`, `files`, `weight` (each sequence's probability of coming from it,
        /// as Megatron's blend) and `epochs` (at most this many passes over the source per pass
        /// of the mixture; 0: no cap). Without val_files each source holds out its own tail.
        sources: Vec<MixtureSource> = Vec::new(),
        /// JSONL, JSON and Parquet: the field (column) holding the text.
        text_field: String = "text".into(),
        /// For .txt files of source = "files": what one document is (file, blank-line or line).
        text_documents: TextDocuments = TextDocuments::File,
        /// Fraction of tokens held out for validation when no val_files are given.
        val_fraction: f64 = 0.05,
        /// Number of generated training examples (arithmetic problems or stories).
        num_examples: usize = 50000,
        /// Number of generated held-out examples.
        num_val_examples: usize = 500,
        /// Arithmetic: largest number of digits per operand.
        digits: usize = 2,
        /// Arithmetic: operators to draw from (any of + - *).
        operators: Vec<String> = vec!["+".into(), "-".into()],
        /// A tokenizer.json to use. Empty: train a byte-level BPE on the training text.
        tokenizer: String = String::new(),
        /// SFT: a Jinja chat template (Hugging Face `chat_template` syntax). Empty: the one in
        /// model.init_from's tokenizer_config.json, else a Zephyr-style template whose turns end
        /// with the end-of-text token.
        chat_template: String = String::new(),
        /// Skip (and count) malformed JSONL lines instead of stopping at the first one.
        skip_bad_lines: bool = false,
        /// For source = "files": drop (and count) each document whose exact text came before
        /// (a 128-bit hash of every document is kept: 16 bytes each, in memory).
        dedup: bool = false,
        /// SFT: pack several conversations into each row (TRL's padding-free packing), attention
        /// and positions reset at each one's start, instead of one conversation per padded row.
        packing: bool = false,
        /// Vocabulary size when training the tokenizer.
        tokenizer_vocab_size: usize = 512,
        /// Training the tokenizer: how much of the training text it learns from (the first
        /// this-many megabytes), so a corpus of any size trains it in bounded time and memory.
        tokenizer_sample_mb: usize = 256,
        /// Tokens per shard file of prepared data; an interrupted `furnace data prepare`
        /// continues at its last complete shard.
        shard_tokens: usize = 100_000_000,
    }
}

section! {
    /// The training loop.
    TrainingSection = "training" {
        /// pretrain (every token of packed windows), sft (conversations, assistant tokens only),
        /// dpo or reward (preference pairs), grpo or ppo (replies sampled and scored).
        mode: TrainMode = TrainMode::Pretrain,
        /// grpo and ppo: a Furnace reward model (a run trained with mode = "reward", on the same
        /// tokenizer) whose score of each reply is its reward. Empty: the exact-match verifier
        /// (1 for the right answer, 0 otherwise).
        reward_model: String = String::new(),
        /// pretrain and sft: a teacher to distil from (Hinton et al., 2015; torchtune's
        /// knowledge distillation): any run or checkpoint folder, Hugging Face folder or GGUF
        /// file model.init_from takes, on the student's tokenizer. Empty: no teacher.
        teacher: String = String::new(),
        /// With a teacher: the distillation term's weight, loss = (1 − kd_ratio)·cross-entropy +
        /// kd_ratio·T²·KL(teacher ‖ student) over the counted targets (torchtune's name).
        kd_ratio: f64 = 0.5,
        /// With a teacher: the temperature T both distributions are softened by.
        kd_temperature: f64 = 1.0,
        /// Sequences per micro-batch on each rank.
        local_batch_size: usize = 8,
        /// Tokens per sequence.
        seq_len: usize = 128,
        /// BERT's masked-LM objective (and T5's noise density, see mean_noise_span_length): the
        /// share of tokens chosen for prediction; of those, 80%
        /// become `[MASK]`, 10% a random token and 10% stay (Devlin et al., 2019; transformers'
        /// DataCollatorForLanguageModeling). The loss counts the chosen tokens only.
        mlm_probability: f64 = 0.15,
        /// T5's span corruption (model.arch = "t5" on text): the share of tokens hidden is
        /// training.mlm_probability (the noise density, 0.15 as T5), in spans of this mean
        /// length, each span replaced by one sentinel in the input; the target lists the spans
        /// after their sentinels (Raffel et al., 2020; transformers' run_t5_mlm_flax.py).
        mean_noise_span_length: f64 = 3.0,
        /// Micro-batches accumulated into one optimizer step.
        grad_accum_steps: usize = 1,
        /// Optimizer steps to run.
        steps: usize = 1000,
        /// Clip the global gradient norm to this value. 0: no clipping.
        max_norm: f64 = 1.0,
        /// Evaluate validation loss every N steps (and at the last step). 0: never.
        eval_every: usize = 100,
        /// Validation batches per evaluation.
        eval_steps: usize = 10,
        /// Log metrics every N steps.
        log_every: usize = 10,
        /// Save a checkpoint every N steps (and at the last step). 0: only at the last step.
        save_every: usize = 500,
        /// Keep the newest N checkpoints. 0: keep all.
        keep_last: usize = 2,
    }
}

section! {
    /// The optimizer and its parameter groups. Unset betas and eps take the chosen
    /// optimizer's published defaults.
    OptimizerSection = "optimizer" {
        /// Optimizer: adamw, lion or sophia.
        name: OptimizerName = OptimizerName::AdamW,
        /// Peak learning rate.
        lr: f64 = 3e-4,
        /// First-moment decay (Lion: interpolation for the update). Unset: adamw 0.9
        /// (GPT-3 / nanoGPT), lion 0.9 (Lion paper), sophia 0.965 (Sophia paper, GPT-2 runs).
        beta1: Option<f64> = None,
        /// Second-moment decay (Lion: momentum decay; Sophia: Hessian EMA). Unset: adamw 0.95
        /// (GPT-3 / nanoGPT), lion 0.99 (Lion paper), sophia 0.99 (Sophia paper).
        beta2: Option<f64> = None,
        /// Denominator floor. Unset: adamw 1e-8 (PyTorch), sophia 1e-12 (authors' code); Lion has none.
        eps: Option<f64> = None,
        /// Decoupled weight decay, applied to the decayed group only (θ ← θ − lr·λ·θ).
        weight_decay: f64 = 0.1,
        /// Sophia's γ (the paper's ρ): scale of the Hessian in the clipped preconditioner
        /// max(γ·h, ε). Paper's GPT-2 runs: 0.01... 0.05; default 0.01.
        rho: f64 = 0.01,
        /// Sophia: refresh the Hessian estimate every k steps (paper: k = 10).
        hessian_interval: usize = 10,
        /// Apply weight decay to norm weights as well.
        decay_norms: bool = false,
        /// Apply weight decay to biases as well.
        decay_biases: bool = false,
        /// Apply weight decay to embeddings (token and position tables) as well.
        decay_embeddings: bool = false,
    }
}

section! {
    /// Learning-rate schedule: linear warmup, then a decay to `min_lr_ratio · lr`.
    LrSchedulerSection = "lr_scheduler" {
        /// Steps of linear warmup from 0 to lr.
        warmup_steps: usize = 100,
        /// Decay after warmup: cosine, linear, wsd (warmup-stable-decay) or constant.
        decay: Decay = Decay::Cosine,
        /// Final learning rate as a fraction of lr.
        min_lr_ratio: f64 = 0.1,
        /// wsd only: fraction of all steps spent in the final linear decay.
        decay_ratio: f64 = 0.2,
    }
}

section! {
    /// Where and how the computation runs.
    RuntimeSection = "runtime" {
        /// Backend: flex (CPU, default), cuda or wgpu (when compiled in).
        backend: Backend = Backend::Flex,
        /// CPU threads. 0: all cores.
        threads: usize = 0,
        /// Memory the run may plan for, in GB: a recipe whose estimate (parameters, gradients,
        /// optimizer state, one micro-batch's activations) exceeds it is refused before any
        /// work starts. 0: this machine's memory.
        max_memory_gb: f64 = 0.0,
        /// flex, reward and DPO only: each micro-batch's pairs are split into this many shards
        /// that train at once, one per thread, each in an autodiff graph of its own (the same
        /// parameters; the gradients summed in shard order, so runs stay deterministic). For
        /// models too small to keep every core busy inside one matmul, as the quickstart's: 2
        /// shards on 2 cores run the reward recipe's steps 1.2-1.3x faster. 1: off.
        batch_shards: usize = 1,
        /// fp32, bf16-mixed, fp16-mixed or bf16-true (see the choices' notes). On the CPU backend the
        /// low-precision matmuls are slower than f32 ones (no native bf16/f16 GEMM there);
        /// mixed precision is for GPUs, where they are the fast path.
        precision: Precision = Precision::Fp32,
        /// fp16-mixed: the loss scale of the first step (GradScaler's init_scale, 2^16).
        initial_loss_scale: f64 = 65536.0,
        /// fp16-mixed: good steps in a row after which the loss scale doubles (GradScaler's
        /// growth_interval).
        loss_scale_growth_interval: usize = 2000,
        /// Treat subnormal floats as zero on CPU (x86 FTZ/DAZ, like torch.set_flush_denormal).
        /// Long runs otherwise slow down 1.5-20x once tiny squared gradients or far-tail
        /// softmax values become subnormal.
        flush_denormals: bool = true,
    }
}

section! {
    /// Training on several processes: `mpirun -np N furnace train --config <recipe>` (any number
    /// of nodes; needs a binary built with `--features mpi`). Each rank reads its own share of
    /// every step's data, so the global batch is local_batch_size × grad_accum_steps × N.
    /// Without mpirun these keys have no effect.
    DistributedSection = "distributed" {
        /// ddp, zero1, zero2 or fsdp.
        strategy: Strategy = Strategy::Ddp,
        /// Gradients are reduced in buckets of this many megabytes (PyTorch DDP's bucket_cap_mb),
        /// bounding the host copy a reduction needs.
        bucket_mb: f64 = 25.0,
        /// mpi or nccl: what carries the gradient reductions and parameter broadcasts.
        backend: CollectiveBackend = CollectiveBackend::Mpi,
    }
}

section! {
    /// Activation (gradient) checkpointing: trade compute for memory in training.
    ActivationCheckpointSection = "activation_checkpoint" {
        /// none, full or selective. full and selective: every architecture, in pretrain and sft
        /// modes, without dropout.
        mode: CheckpointMode = CheckpointMode::None,
        /// For selective: recompute every N-th block ("2": blocks 2, 4, 6, ...), torchtitan's
        /// layer-wise option. (torchtitan's "op" policy is not offered.)
        selective_ac_option: String = "2".into(),
    }
}

impl ActivationCheckpointSection {
    /// Every how many blocks backward recomputes one (1 = all of them); None without
    /// checkpointing. The recipe check has made sure selective_ac_option is a positive integer.
    pub fn recompute_every(&self) -> Option<usize> {
        match self.mode {
            CheckpointMode::None => None,
            CheckpointMode::Full => Some(1),
            CheckpointMode::Selective => Some(self.selective_ac_option.trim().parse().unwrap_or(1)),
        }
    }
}

section! {
    /// Metrics and console output.
    LoggingSection = "logging" {
        /// Write <output_dir>/metrics.jsonl.
        jsonl: bool = true,
        /// Write TensorBoard event files under <output_dir>/tb/.
        tensorboard: bool = true,
        /// Show a progress bar.
        progress: bool = true,
        /// Peak FLOP/s of the device, in TFLOP/s, for MFU. 0: measure a float matmul at start.
        peak_tflops: f64 = 0.0,
    }
}

section! {
    /// What the run reports at its end: a sample generation and, for arithmetic data,
    /// exact-match accuracy on held-out problems.
    EvalSection = "eval" {
        /// Prompt for the sample printed at the end. Empty: a held-out problem or a story opening.
        prompt: String = String::new(),
        /// Tokens to generate for the sample.
        max_new_tokens: usize = 64,
        /// Held-out arithmetic problems solved greedily for exact-match accuracy. 0: skip.
        arithmetic_problems: usize = 200,
    }
}

/// Sentinel tokens of a T5 tokenizer (transformers' `extra_ids`): span corruption replaces each
/// hidden span by the next one, so a row can hold at most this many spans.
pub const SENTINELS: usize = 100;

/// A whole recipe: one table per section, every key optional with a documented default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    pub run: RunSection,
    pub model: ModelSection,
    pub data: DataSection,
    pub training: TrainingSection,
    pub optimizer: OptimizerSection,
    pub lr_scheduler: LrSchedulerSection,
    pub runtime: RuntimeSection,
    pub distributed: DistributedSection,
    pub activation_checkpoint: ActivationCheckpointSection,
    pub logging: LoggingSection,
    pub eval: EvalSection,
    pub lora: LoraSection,
    pub dpo: DpoSection,
    pub grpo: GrpoSection,
    pub ppo: PpoSection,
}
