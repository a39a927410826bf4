use std::cell::Cell;
use std::sync::Arc;

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::FloatDType;

use crate::init::{constant_param, normal_param};
use crate::kernels::{nf4_matmul, FusedOps};
use crate::lora::LoraAdapter;
use crate::nf4::Nf4Matrix;
use furnace_core::params::{f32_val, widened};
use furnace_core::rng::SeededRng;

/// A dense layer computed as one 2-D matmul over all tokens. The weight is stored
/// `[d_in, d_out]` (Burn's layout; the Hugging Face tables transpose it), either as a parameter
/// or, frozen under QLoRA, in NF4.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// None once the weight is quantized into `nf4`.
    pub weight: Option<Param<Tensor<B, 2>>>,
    /// The frozen weight in NF4, shared by every copy of the model (QLoRA's base layers).
    #[module(skip)]
    pub nf4: Option<Arc<Nf4Matrix>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A trainable low-rank update over this (then frozen) layer; see `lora`.
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Linear<B> {
    pub fn new(d_in: usize, d_out: usize, bias: bool, std: f64, rng: &mut SeededRng, device: &B::Device) -> Self {
        Self {
            weight: Some(normal_param([d_in, d_out], std, rng, device)),
            nf4: None,
            bias: bias.then(|| constant_param([d_out], 0.0, device)),
            lora: None,
        }
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        match (&self.weight, &self.nf4) {
            (Some(weight), _) => weight.lazy_shape().dims(),
            (None, Some(nf4)) => nf4.shape,
            (None, None) => unreachable!("a linear layer holds a dense or an NF4 weight"),
        }
    }

    /// Replace the dense weight by its NF4 quantization (frozen from then on).
    pub fn quantize_nf4(&mut self) {
        if let Some(weight) = self.weight.take() {
            let dims = weight.dims();
            let values: Vec<f32> = weight.val().into_data().convert::<f32>().into_vec().expect("float weight");
            self.nf4 = Some(Arc::new(Nf4Matrix::quantize(&values, dims)));
        }
    }
}

thread_local! {
    /// The dtype dense layers compute their matmuls in on this thread (None: as stored).
    static AUTOCAST: Cell<Option<FloatDType>> = const { Cell::new(None) };
}

/// Run `f` with every dense layer's matmul (the output head's aside, see `lm_logits`) computed in `dtype`,
/// as `torch.autocast` does for linear layers: input and weight are cast to it at the layer and
/// the product cast back to f32, so everything between layers (norms, softmax, attention, the
/// loss) stays f32 and the parameters' gradients arrive in f32 through the casts' backward.
/// Backward replays the graph recorded here, so `f` should hold the backward pass too.
pub fn with_autocast<R>(dtype: Option<FloatDType>, f: impl FnOnce() -> R) -> R {
    let previous = AUTOCAST.with(|a| a.replace(dtype));
    let out = f();
    AUTOCAST.with(|a| a.set(previous));
    out
}

/// `x · w` in the autocast dtype, if one is set.
fn autocast_matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    match AUTOCAST.with(Cell::get) {
        Some(dtype) => x.cast(dtype).matmul(w.cast(dtype)).cast(FloatDType::F32),
        None => x.matmul(widened(w)),
    }
}

impl<B: FusedOps> Linear<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows = x.shape().num_elements() / d_in;
        let x = x.reshape([rows, d_in]);
        let mut out = match (&self.weight, &self.nf4) {
            (Some(weight), _) => autocast_matmul(x.clone(), weight.val()),
            (None, Some(nf4)) => nf4_matmul(x.clone(), nf4),
            (None, None) => unreachable!("a linear layer holds a dense or an NF4 weight"),
        };
        if let Some(bias) = &self.bias {
            out = out + f32_val(bias).unsqueeze_dim(0);
        }
        if let Some(lora) = &self.lora {
            out = out + lora.forward(x);
        }
        let mut out_dims = dims;
        out_dims[D - 1] = out.dims()[1];
        out.reshape(out_dims)
    }
}

/// Logits `[batch, seq, vocab]` for hidden states `[batch, seq, d_model]`: the output head, or
/// the transposed embedding when the head is tied to it. Always f32, under autocast too: the
/// logits feed the loss, and rounded to bf16 they slowed the quickstart's learning measurably.
pub fn lm_logits<B: FusedOps>(hidden: Tensor<B, 3>, head: Option<&Linear<B>>, embed_tokens: &Param<Tensor<B, 2>>) -> Tensor<B, 3> {
    with_autocast(None, || match head {
        Some(head) => head.forward(hidden),
        None => {
            let [batch, seq, d_model] = hidden.dims();
            let vocab = embed_tokens.dims()[0];
            hidden.reshape([batch * seq, d_model]).matmul(f32_val(embed_tokens).transpose()).reshape([batch, seq, vocab])
        }
    })
}
