//! Every architecture behind one config type and one module type, so the trainer, the
//! checkpoints and the generator handle any of them without knowing their insides.

use std::collections::{BTreeMap, HashMap};

use burn::module::{ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use furnace_core::params::{visit_with_paths, ParamKind, ParamKinds, PathVisitor};

use crate::bert::Bert;
use crate::blocks::AttentionContext;
use crate::blocks::Linear;
use crate::causal_lm::CausalLm;
use crate::decoder::{Decoder, KvCache};
use crate::kernels::FusedOps;
use crate::lora::LinearLayers;
use crate::mamba::{Mamba, MambaState};
use crate::mixtral::Routing;
use crate::t5::T5;
pub use furnace_core::arch::ModelConfig;

/// A model built from its configuration, its parameters drawn from `seed`.
pub trait Init {
    type Model<B: Backend>;
    fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> Self::Model<B>;
}

impl Init for ModelConfig {
    type Model<B: Backend> = LanguageModel<B>;

    fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> LanguageModel<B> {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => LanguageModel::Decoder(c.init(seed, device)),
            Self::Mamba(c) => LanguageModel::Mamba(c.init(seed, device)),
            Self::Bert(c) => LanguageModel::Bert(c.init(seed, device)),
            Self::T5(c) => LanguageModel::T5(c.init(seed, device)),
        }
    }
}

/// A model of any architecture. Parameter paths are the architecture's own (the enum adds no
/// level to them; see `params`).
#[derive(Module, Debug)]
pub enum LanguageModel<B: Backend> {
    Decoder(Decoder<B>),
    Mamba(Mamba<B>),
    Bert(Bert<B>),
    T5(T5<B>),
}

/// A capability asked of a model whose architecture lacks it. The recipe check refuses these
/// combinations before any work (from the capability table), so this is the safety net's
/// message, returned as an error rather than a crash.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsupported {
    pub arch: &'static str,
    pub needs: &'static str,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a {} model has no {} (the recipe check should have refused this combination)", self.arch, self.needs)
    }
}

impl std::error::Error for Unsupported {}

impl<B: FusedOps> LanguageModel<B> {
    fn unsupported(&self, needs: &'static str) -> Unsupported {
        let arch = match self {
            Self::Decoder(_) => "transformer decoder",
            Self::Mamba(_) => "Mamba",
            Self::Bert(_) => "BERT",
            Self::T5(_) => "T5",
        };
        Unsupported { arch, needs }
    }

    /// The transformer decoder, for what only it carries: a reward model's score head
    /// (`Decoder::scores`, `Decoder::branched_scores`) and PPO's value head
    /// (`Decoder::logits_and_values`).
    pub fn as_decoder(&self) -> Result<&Decoder<B>, Unsupported> {
        match self {
            Self::Decoder(m) => Ok(m),
            _ => Err(self.unsupported("score or value head (transformer decoders only)")),
        }
    }

    /// An encoder-decoder's training forward: logits `[batch, target_len, vocab]` of the
    /// decoder reading `decoder_input` over `input` (rows `lengths` long, padded after).
    pub fn forward_seq2seq(
        &self,
        input: Tensor<B, 2, Int>,
        lengths: &[usize],
        decoder_input: Tensor<B, 2, Int>,
    ) -> Result<Tensor<B, 3>, Unsupported> {
        match self {
            Self::T5(m) => Ok(m.forward(input, lengths, decoder_input)),
            _ => Err(self.unsupported("encoder for (input, target) pairs (T5 only)")),
        }
    }

    /// Training's forward: logits (of rows packing several sequences when `packed` gives
    /// positions; see [`Decoder::forward_routed`]) and a mixture of experts' routing.
    pub fn forward_routed(
        &self,
        tokens: Tensor<B, 2, Int>,
        packed: Option<&[usize]>,
    ) -> Result<(Tensor<B, 3>, Option<Routing<B>>), Unsupported> {
        match (self, packed) {
            (Self::Decoder(m), _) => Ok(m.forward_routed(tokens, packed)),
            (Self::Mamba(m), None) => Ok((m.forward(tokens), None)),
            (Self::Bert(m), None) => Ok((m.forward(tokens), None)),
            (Self::Mamba(_) | Self::Bert(_), Some(_)) => Err(self.unsupported("packed rows (SFT packing is for transformer decoders)")),
            (Self::T5(_), _) => Err(self.unsupported("single-sequence forward (T5 reads (input, target) pairs)")),
        }
    }

    /// The model as one chain embed → blocks → finish, for activation checkpointing; T5 is two
    /// chains (see `T5::decoder_block`).
    pub fn blocks(&self) -> Result<Blocks<'_, B>, Unsupported> {
        match self {
            Self::Decoder(m) => Ok(Blocks::Decoder(m)),
            Self::Mamba(m) => Ok(Blocks::Mamba(m)),
            Self::Bert(m) => Ok(Blocks::Bert(m)),
            Self::T5(_) => Err(self.unsupported("single chain of blocks (T5 checkpoints its two stacks in its own path)")),
        }
    }

    pub fn n_blocks(&self) -> usize {
        match self {
            Self::Decoder(m) => m.layers.len(),
            Self::Mamba(m) => m.layers.len(),
            Self::Bert(m) => m.layers.len(),
            Self::T5(m) => m.encoder_layers.len() + m.decoder_layers.len(),
        }
    }
}

/// What the model says of its parameters, so that the optimizer and the trainer never parse a
/// parameter's name: its kind (weight-decay groups) and the block it belongs to (FSDP).
impl<B: Backend> LanguageModel<B> {
    /// The architecture's embedding tables (token, position, token-type; T5's relative-position
    /// buckets, an `nn.Embedding` in transformers).
    fn embedding_tables(&self) -> Vec<ParamId> {
        match self {
            Self::Decoder(m) => std::iter::once(&m.embed_tokens).chain(&m.embed_positions).map(|p| p.id).collect(),
            Self::Mamba(m) => vec![m.embed_tokens.id],
            Self::Bert(m) => vec![m.embed_tokens.id, m.embed_positions.id, m.embed_token_types.id],
            Self::T5(m) => vec![m.embed_tokens.id, m.encoder_relative_bias.id, m.decoder_relative_bias.id],
        }
    }

    /// Each float parameter's kind, by path: the embedding tables, the biases (every field
    /// named `bias` or `*_bias`: linear layers', norms', Mamba's `conv_bias`), other 1-D gains
    /// (norm weights, Mamba's `d`) and matrices.
    pub fn param_kinds(&self) -> ParamKinds {
        struct Kinds(Vec<ParamId>, ParamKinds);
        impl<B: Backend> PathVisitor<B> for Kinds {
            fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>) {
                let kind = if self.0.contains(&param.id) {
                    ParamKind::Embedding
                } else if path.rsplit('.').next().is_some_and(|field| field.ends_with("bias")) {
                    ParamKind::Bias
                } else if D == 1 {
                    ParamKind::Norm
                } else {
                    ParamKind::Matrix
                };
                self.1.insert(path.to_string(), kind);
            }
        }
        let mut kinds = Kinds(self.embedding_tables(), ParamKinds::new());
        visit_with_paths(self, &mut kinds);
        kinds.1
    }

    /// The block (index into the chain of [`LanguageModel::blocks`]) each block parameter
    /// belongs to, by path; the embeddings, final norm and head are in none. T5, not one chain,
    /// has none.
    pub fn param_blocks(&self) -> BTreeMap<String, usize> {
        struct Ids(Vec<ParamId>);
        impl<B: Backend> ModuleVisitor<B> for Ids {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                self.0.push(param.id);
            }
        }
        fn ids<B: Backend>(block: &impl Module<B>) -> Vec<ParamId> {
            let mut ids = Ids(Vec::new());
            block.visit(&mut ids);
            ids.0
        }
        let per_block: Vec<Vec<ParamId>> = match self {
            Self::Decoder(m) => m.layers.iter().map(ids).collect(),
            Self::Mamba(m) => m.layers.iter().map(ids).collect(),
            Self::Bert(m) => m.layers.iter().map(ids).collect(),
            Self::T5(_) => Vec::new(),
        };
        let block_of: HashMap<ParamId, usize> =
            per_block.into_iter().enumerate().flat_map(|(block, ids)| ids.into_iter().map(move |id| (id, block))).collect();
        struct Paths<'a>(&'a HashMap<ParamId, usize>, BTreeMap<String, usize>);
        impl<B: Backend> PathVisitor<B> for Paths<'_> {
            fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>) {
                if let Some(&block) = self.0.get(&param.id) {
                    self.1.insert(path.to_string(), block);
                }
            }
        }
        let mut paths = Paths(&block_of, BTreeMap::new());
        visit_with_paths(self, &mut paths);
        paths.1
    }
}

/// A model that is one chain embed → blocks → finish: the trainer keeps each block's input and
/// recomputes one block at a time in backward. Decoder-only transformers (dense or mixture of
/// experts), BERT and Mamba are one.
pub enum Blocks<'a, B: Backend> {
    Decoder(&'a Decoder<B>),
    Mamba(&'a Mamba<B>),
    Bert(&'a Bert<B>),
}

/// What a chain's blocks read besides their input: a transformer's attention context.
pub enum BlockContext<B: Backend> {
    Attention(AttentionContext<B>),
    Recurrent,
}

impl<B: FusedOps> Blocks<'_, B> {
    /// The first block's input and what every block needs (see [`Decoder::embed`]).
    pub fn embed(&self, tokens: Tensor<B, 2, Int>, packed: Option<&[usize]>) -> (Tensor<B, 3>, BlockContext<B>) {
        match self {
            Self::Decoder(m) => {
                let (x, ctx) = m.embed(tokens, 0, packed);
                (x, BlockContext::Attention(ctx))
            }
            Self::Mamba(m) => (m.embed(tokens), BlockContext::Recurrent),
            Self::Bert(m) => {
                let (x, ctx) = m.embed(tokens);
                (x, BlockContext::Attention(ctx))
            }
        }
    }

    /// A block's output, and its router logits when its MLP is a mixture of experts. A
    /// transformer's block given no attention context (`ctx` not from its own `embed`) is an
    /// error, not a guess.
    pub fn block(&self, index: usize, x: Tensor<B, 3>, ctx: &BlockContext<B>) -> Result<(Tensor<B, 3>, Option<Tensor<B, 2>>), Unsupported> {
        match (self, ctx) {
            (Self::Decoder(m), BlockContext::Attention(ctx)) => Ok(m.layers[index].forward(x, ctx, None)),
            (Self::Bert(m), BlockContext::Attention(ctx)) => Ok((m.layers[index].forward(x, ctx), None)),
            (Self::Mamba(m), _) => Ok((m.layers[index].forward(x, None), None)),
            (Self::Decoder(_) | Self::Bert(_), BlockContext::Recurrent) => {
                Err(Unsupported { arch: "transformer", needs: "block without its attention context" })
            }
        }
    }

    /// The routing of a pass from the router logits its blocks gave (None for dense models).
    pub fn routing(&self, logits: Vec<Tensor<B, 2>>) -> Option<Routing<B>> {
        match self {
            Self::Decoder(m) => m.routing(logits),
            Self::Mamba(_) | Self::Bert(_) => None,
        }
    }

    /// Logits from the last block's output.
    pub fn finish(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Decoder(m) => m.finish(x),
            Self::Mamba(m) => m.finish(x),
            Self::Bert(m) => m.finish(x),
        }
    }
}

impl<B: FusedOps> LanguageModel<B> {
    /// Logits `[batch, seq, vocab]` for whole sequences: a decoder's next-token logits, BERT's
    /// masked-token logits. T5 reads (input, target) pairs (`forward_seq2seq`).
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, Unsupported> {
        match self {
            Self::Decoder(m) => Ok(m.forward(tokens)),
            Self::Mamba(m) => Ok(m.forward(tokens)),
            Self::Bert(m) => Ok(m.forward(tokens)),
            Self::T5(_) => Err(self.unsupported("single-sequence forward (T5 reads (input, target) pairs)")),
        }
    }

    /// The model as a left-to-right decoder, for generation and sequence log-probabilities:
    /// transformer decoders and Mamba. T5 decodes through `t5::Conditioned`.
    pub fn as_causal(&self) -> Result<Causal<'_, B>, Unsupported> {
        match self {
            Self::Decoder(m) => Ok(Causal::Decoder(m)),
            Self::Mamba(m) => Ok(Causal::Mamba(m)),
            Self::Bert(_) => Err(self.unsupported("left-to-right decoding (BERT is an encoder: it fills masks)")),
            Self::T5(_) => Err(self.unsupported("decoding without an encoded input (T5 decodes through its encoder)")),
        }
    }

    /// Longest sequence the model reads (T5's relative positions have no limit).
    pub fn max_seq_len(&self) -> usize {
        match self {
            Self::Decoder(m) => m.max_seq_len(),
            Self::Mamba(m) => m.max_seq_len(),
            Self::Bert(m) => m.max_seq_len,
            Self::T5(_) => usize::MAX,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Decoder(m) => CausalLm::vocab_size(m),
            Self::Mamba(m) => CausalLm::vocab_size(m),
            Self::Bert(m) => m.vocab_size,
            Self::T5(m) => m.vocab_size,
        }
    }
}

/// A model that decodes left to right (see [`LanguageModel::as_causal`]).
#[derive(Debug, Clone, Copy)]
pub enum Causal<'a, B: Backend> {
    Decoder(&'a Decoder<B>),
    Mamba(&'a Mamba<B>),
}

/// The decoding state of a [`Causal`] model: made only by its `init_state`.
#[derive(Debug, Clone)]
pub struct DecodeState<B: Backend>(pub(crate) StateOf<B>);

#[derive(Debug, Clone)]
pub(crate) enum StateOf<B: Backend> {
    Decoder(KvCache<B>),
    Mamba(MambaState<B>),
}

impl<B: FusedOps> Causal<'_, B> {
    /// The mean over positions of the last hidden state (after the final norm) of `tokens`: a
    /// sentence embedding `[d_model]`, as `/v1/embeddings` serves it.
    pub fn mean_hidden(&self, tokens: &[u32], device: &B::Device) -> Vec<f32> {
        let hidden = match self {
            Self::Decoder(m) => m.forward_hidden(ids_row(tokens, device), None),
            Self::Mamba(m) => m.forward_hidden(ids_row(tokens, device), None),
        };
        mean_over_positions(hidden)
    }
}

impl<B: FusedOps> LanguageModel<B> {
    /// [`Causal::mean_hidden`] for every architecture: BERT's last block's output (before the
    /// masked-LM head, as transformers' `BertModel` returns it), T5's encoder output (as
    /// `T5EncoderModel`'s), a decoder's or Mamba's final normed state.
    pub fn mean_hidden(&self, tokens: &[u32], device: &B::Device) -> Vec<f32> {
        match self {
            Self::Bert(m) => mean_over_positions(m.forward_hidden(ids_row(tokens, device))),
            Self::T5(m) => mean_over_positions(m.encode(ids_row(tokens, device), &[tokens.len()])),
            Self::Decoder(m) => Causal::Decoder(m).mean_hidden(tokens, device),
            Self::Mamba(m) => Causal::Mamba(m).mean_hidden(tokens, device),
        }
    }
}

fn ids_row<B: Backend>(tokens: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(ids, [1, tokens.len()]), device)
}

fn mean_over_positions<B: Backend>(hidden: Tensor<B, 3>) -> Vec<f32> {
    let [_, _, width] = hidden.dims();
    hidden.mean_dim(1).reshape([width]).into_data().convert::<f32>().into_vec().expect("f32 hidden states")
}

impl<B: FusedOps> CausalLm<B> for Causal<'_, B> {
    type State = DecodeState<B>;

    fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        match self {
            Self::Decoder(m) => m.forward(tokens),
            Self::Mamba(m) => m.forward(tokens),
        }
    }

    fn init_state(&self) -> DecodeState<B> {
        DecodeState(match self {
            Self::Decoder(m) => StateOf::Decoder(m.init_state()),
            Self::Mamba(m) => StateOf::Mamba(m.init_state()),
        })
    }

    fn forward_step(&self, tokens: Tensor<B, 2, Int>, state: &mut DecodeState<B>) -> Tensor<B, 3> {
        match (self, &mut state.0) {
            (Self::Decoder(m), StateOf::Decoder(s)) => m.forward_step(tokens, s),
            (Self::Mamba(m), StateOf::Mamba(s)) => m.forward_step(tokens, s),
            // States are opaque and made by `init_state`: only a caller that hands one model's
            // state to another gets here, a bug in that caller rather than in a recipe.
            _ => unreachable!("a decoding state belongs to the model that made it"),
        }
    }

    fn rewind(&self, state: &mut DecodeState<B>, len: usize) -> bool {
        match (self, &mut state.0) {
            (Self::Decoder(m), StateOf::Decoder(s)) => m.rewind(s, len),
            _ => false,
        }
    }

    fn max_seq_len(&self) -> usize {
        match self {
            Self::Decoder(m) => m.max_seq_len(),
            Self::Mamba(m) => m.max_seq_len(),
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Self::Decoder(m) => CausalLm::vocab_size(*m),
            Self::Mamba(m) => CausalLm::vocab_size(*m),
        }
    }
}

impl<B: Backend> LinearLayers<B> for LanguageModel<B> {
    fn linear_layers_mut(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        match self {
            Self::Decoder(m) => m.linear_layers_mut(),
            Self::Mamba(m) => m.linear_layers_mut(),
            Self::Bert(m) => m.linear_layers_mut(),
            Self::T5(m) => m.linear_layers_mut(),
        }
    }
}
