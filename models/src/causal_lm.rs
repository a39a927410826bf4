use burn::prelude::*;

/// What the trainer and the generator need from any causal language model.
/// Forward returns logits; losses live with the trainer's objectives.
pub trait CausalLm<B: Backend> {
    /// Decoding state kept by the caller between steps (a KV cache, or a recurrent state).
    type State;

    /// Logits `[batch, seq, vocab]` for a whole sequence.
    fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3>;

    /// A fresh decoding state.
    fn init_state(&self) -> Self::State;

    /// Logits for `tokens` that follow what `state` has seen; updates `state`.
    fn forward_step(&self, tokens: Tensor<B, 2, Int>, state: &mut Self::State) -> Tensor<B, 3>;

    /// Forget every position of `state` after the first `len` (drafts speculative decoding
    /// rejected). False where the state cannot go back (a recurrent state): the caller then
    /// reads the kept tokens again from a copy it saved.
    fn rewind(&self, _state: &mut Self::State, _len: usize) -> bool {
        false
    }

    /// Longest sequence the model can process.
    fn max_seq_len(&self) -> usize;

    fn vocab_size(&self) -> usize;
}
