use crate::recipe::*;

/// The model with every choice made: preset, arch defaults and explicit overrides applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    pub arch: Arch,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_decoder_layers: usize,
    pub head_dim: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_ff: usize,
    pub max_seq_len: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub position: PositionKind,
    pub rope_theta: f64,
    pub mlp: MlpKind,
    pub bias: bool,
    pub tie_embeddings: bool,
    pub sliding_window: usize,
    pub parallel_block: bool,
    pub d_state: usize,
    pub d_conv: usize,
    pub expand: usize,
    pub dt_rank: usize,
    pub n_experts: usize,
    pub experts_per_token: usize,
    pub capacity_factor: f64,
    pub router_aux_loss_coef: f64,
    pub router_z_loss_coef: f64,
    pub dropout: f64,
}

struct Preset {
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
    max_seq_len: usize,
    vocab_size: Option<usize>,
}

fn preset(flavor: Flavor) -> Preset {
    match flavor {
        Flavor::Tiny => Preset { d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 256, vocab_size: None },
        Flavor::Quickstart => Preset { d_model: 128, n_layers: 4, n_heads: 4, max_seq_len: 256, vocab_size: None },
        Flavor::Small => Preset { d_model: 256, n_layers: 4, n_heads: 4, max_seq_len: 1024, vocab_size: None },
        Flavor::Gpt2_124m => Preset { d_model: 768, n_layers: 12, n_heads: 12, max_seq_len: 1024, vocab_size: Some(50257) },
    }
}

impl ModelSection {
    /// Resolve preset + arch defaults + overrides. `tokenizer_vocab` fills an unset vocab_size.
    pub fn resolve(&self, tokenizer_vocab: Option<usize>) -> ResolvedModel {
        let p = preset(self.flavor);
        // Mixtral is a Llama in all but its MLPs.
        let llama = matches!(self.arch, Arch::Llama | Arch::Mixtral);
        // BERT is a GPT-2 in its parts (LayerNorm, learned positions, GELU, bias, tied head).
        let bert = self.arch == Arch::Bert;
        // T5: RMS norms without biases (as llama), relative positions, ReLU MLPs, a tied head.
        let t5 = self.arch == Arch::T5;
        let d_model = self.d_model.unwrap_or(p.d_model);
        let mlp = self.mlp.unwrap_or(if llama {
            MlpKind::SwiGlu
        } else if t5 {
            MlpKind::Relu
        } else {
            MlpKind::Gelu
        });
        let n_heads = self.n_heads.unwrap_or(p.n_heads);
        let n_layers = self.n_layers.unwrap_or(p.n_layers);
        ResolvedModel {
            arch: self.arch,
            vocab_size: self.vocab_size.or(p.vocab_size).or(tokenizer_vocab).unwrap_or(512),
            d_model,
            n_layers,
            n_decoder_layers: self.n_decoder_layers.unwrap_or(n_layers),
            head_dim: self.head_dim.unwrap_or(d_model / n_heads.max(1)),
            relative_attention_num_buckets: self.relative_attention_num_buckets,
            relative_attention_max_distance: self.relative_attention_max_distance,
            n_heads,
            n_kv_heads: self.n_kv_heads.unwrap_or(n_heads),
            d_ff: self.d_ff.unwrap_or(match mlp {
                MlpKind::Gelu | MlpKind::GeluExact | MlpKind::Relu => 4 * d_model,
                MlpKind::SwiGlu | MlpKind::GatedGelu => (8 * d_model / 3).div_ceil(32) * 32,
            }),
            max_seq_len: self.max_seq_len.unwrap_or(p.max_seq_len),
            norm: self.norm.unwrap_or(if matches!(self.arch, Arch::Gpt2 | Arch::Bert) { NormKind::LayerNorm } else { NormKind::RmsNorm }),
            norm_eps: self.norm_eps.unwrap_or(if llama || t5 {
                1e-6
            } else if bert {
                1e-12
            } else {
                1e-5
            }),
            position: self.position.unwrap_or(if llama {
                PositionKind::Rope
            } else if t5 {
                PositionKind::Relative
            } else {
                PositionKind::Learned
            }),
            rope_theta: self.rope_theta,
            mlp,
            bias: self.bias.unwrap_or(!llama && !t5),
            tie_embeddings: self.tie_embeddings.unwrap_or(!llama),
            sliding_window: self.sliding_window,
            parallel_block: self.parallel_block,
            d_state: self.d_state,
            d_conv: self.d_conv,
            expand: self.expand,
            dt_rank: self.dt_rank.unwrap_or(d_model.div_ceil(16)),
            n_experts: self.n_experts,
            experts_per_token: self.experts_per_token,
            capacity_factor: self.capacity_factor,
            router_aux_loss_coef: self.router_aux_loss_coef,
            router_z_loss_coef: self.router_z_loss_coef,
            dropout: self.dropout,
        }
    }
}

impl ResolvedModel {
    /// A `[model]` section that resolves to exactly this model (every dimension explicit), as
    /// a checkpoint stores a model that came from `init_from`.
    pub fn to_section(&self, init_from: &str) -> ModelSection {
        ModelSection {
            arch: self.arch,
            flavor: Flavor::Tiny,
            vocab_size: Some(self.vocab_size),
            d_model: Some(self.d_model),
            n_layers: Some(self.n_layers),
            // T5's keys only: any other arch refuses them.
            n_decoder_layers: (self.arch == Arch::T5).then_some(self.n_decoder_layers),
            head_dim: (self.arch == Arch::T5).then_some(self.head_dim),
            relative_attention_num_buckets: self.relative_attention_num_buckets,
            relative_attention_max_distance: self.relative_attention_max_distance,
            n_heads: Some(self.n_heads),
            n_kv_heads: Some(self.n_kv_heads),
            d_ff: Some(self.d_ff),
            max_seq_len: Some(self.max_seq_len),
            norm: Some(self.norm),
            norm_eps: Some(self.norm_eps),
            position: Some(self.position),
            rope_theta: self.rope_theta,
            mlp: Some(self.mlp),
            bias: Some(self.bias),
            tie_embeddings: Some(self.tie_embeddings),
            sliding_window: self.sliding_window,
            parallel_block: self.parallel_block,
            d_state: self.d_state,
            d_conv: self.d_conv,
            expand: self.expand,
            dt_rank: Some(self.dt_rank),
            n_experts: self.n_experts,
            experts_per_token: self.experts_per_token,
            capacity_factor: self.capacity_factor,
            router_aux_loss_coef: self.router_aux_loss_coef,
            router_z_loss_coef: self.router_z_loss_coef,
            dropout: self.dropout,
            init_from: init_from.to_string(),
        }
    }
}
