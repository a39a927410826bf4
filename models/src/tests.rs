//! Layer tests: gradients against finite differences, cached decoding against full recompute.

use burn::backend::Autodiff;
use burn::prelude::*;

use crate::blocks::*;
use crate::decoder::MlpLayer;
use crate::generate::{generate, GenerateConfig};
use crate::kernels::FusedOps;
use crate::mixtral::SparseMoe;
use crate::sampling::{argmax, SamplingConfig};
use crate::{CausalLm, DecoderConfig, Init, LanguageModel, MambaConfig, ModelConfig, MoeConfig, PositionKind};
use furnace_core::rng::SeededRng;

// f32 central differences: step 1e-2 keeps rounding noise ~1e-4 while the O(h²) truncation
// stays below the tolerance; a wrong gradient is off by O(1).
type B = burn::backend::Flex;
type AB = Autodiff<B>;

fn random(shape: [usize; 3], seed: u64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..shape.iter().product::<usize>()).map(|_| rng.normal() as f32).collect()
}

fn tensor<Bk: Backend>(values: &[f32], shape: [usize; 3]) -> Tensor<Bk, 3> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), &Default::default())
}

/// Compare d(sum(f(x) · w))/dx from autodiff with central finite differences at every input.
fn check_input_gradient(shape: [usize; 3], out_shape: [usize; 3], f: impl Fn(Tensor<AB, 3>) -> Tensor<AB, 3>) {
    let x = random(shape, 1);
    let w = random(out_shape, 2);
    let loss = |x: Tensor<AB, 3>| (f(x) * tensor::<AB>(&w, out_shape)).sum();
    let input = tensor::<AB>(&x, shape).require_grad();
    let grads = loss(input.clone()).backward();
    let analytic: Vec<f32> = input.grad(&grads).unwrap().into_data().into_vec().unwrap();
    let eps = 1e-2;
    for i in 0..x.len() {
        let mut plus = x.clone();
        plus[i] += eps;
        let mut minus = x.clone();
        minus[i] -= eps;
        let numeric = (loss(tensor(&plus, shape)).into_scalar() - loss(tensor(&minus, shape)).into_scalar()) / (2.0 * eps);
        let err = (numeric - analytic[i]).abs() / numeric.abs().max(1.0);
        assert!(err < 5e-3, "input {i}: analytic {} vs numeric {numeric}", analytic[i]);
    }
}

#[test]
fn attention_with_rope_and_gqa_matches_finite_differences() {
    let device = Default::default();
    let mut rng = SeededRng::new(3);
    let attn = Attention::<AB>::new(16, 4, 2, false, 0.3, 0.3, &mut rng, &device);
    let rope = Rope::<AB>::new(4, 8, 10000.0, &device);
    let ctx = AttentionContext { rope: Some(rope.slice(0, 5)), bias: attention_bias(5, 0, 0, None, &device) };
    check_input_gradient([2, 5, 16], [2, 5, 16], |x| attn.forward(x, &ctx, None));
}

#[test]
fn attention_with_alibi_and_window_matches_finite_differences() {
    let device = Default::default();
    let mut rng = SeededRng::new(4);
    let attn = Attention::<AB>::new(8, 2, 1, true, 0.3, 0.3, &mut rng, &device);
    let slopes = alibi_slopes(2);
    let ctx = AttentionContext { rope: None, bias: attention_bias(6, 0, 3, Some(&slopes), &device) };
    check_input_gradient([1, 6, 8], [1, 6, 8], |x| attn.forward(x, &ctx, None));
}

#[test]
fn mlps_match_finite_differences() {
    let device = Default::default();
    let mut rng = SeededRng::new(5);
    for kind in [MlpKind::SwiGlu, MlpKind::Gelu] {
        let mlp = FeedForward::<AB>::new(kind, 8, 12, true, 0.3, 0.3, &mut rng, &device);
        check_input_gradient([2, 3, 8], [2, 3, 8], |x| mlp.forward(x));
    }
}

#[test]
fn norms_match_finite_differences() {
    let device = Default::default();
    for kind in [NormKind::RmsNorm, NormKind::LayerNorm] {
        let norm = Norm::<AB>::new(kind, 8, 1e-5, true, &device);
        check_input_gradient([2, 3, 8], [2, 3, 8], |x| norm.forward(x));
    }
}

#[test]
fn parameter_gradient_matches_finite_differences() {
    // Gradient with respect to a weight, not only the input: q_proj of a GQA attention layer.
    let device = Default::default();
    let shape = [1, 4, 8];
    let x = random(shape, 9);
    let w = random(shape, 10);
    let build = |delta: Option<(usize, f32)>| {
        let mut rng = SeededRng::new(11);
        let mut attn = Attention::<AB>::new(8, 2, 1, false, 0.3, 0.3, &mut rng, &device);
        if let Some((i, d)) = delta {
            let mut values: Vec<f32> = attn.q_proj.weight.as_ref().unwrap().val().into_data().into_vec().unwrap();
            values[i] += d;
            attn.q_proj.weight = Some(burn::module::Param::from_tensor(Tensor::from_data(TensorData::new(values, [8, 8]), &device)));
        }
        attn
    };
    let rope = Rope::<AB>::new(4, 8, 10000.0, &device);
    let ctx = AttentionContext { rope: Some(rope.slice(0, 4)), bias: attention_bias(4, 0, 0, None, &device) };
    let loss = |attn: &Attention<AB>| (attn.forward(tensor(&x, shape), &ctx, None) * tensor::<AB>(&w, shape)).sum();
    let attn = build(None);
    let grads = loss(&attn).backward();
    let analytic: Vec<f32> = attn.q_proj.weight.as_ref().unwrap().val().grad(&grads).unwrap().into_data().into_vec().unwrap();
    for i in [0, 7, 19, 40, 63] {
        let numeric = (loss(&build(Some((i, 1e-2)))).into_scalar() - loss(&build(Some((i, -1e-2)))).into_scalar()) / 2e-2;
        assert!((numeric - analytic[i]).abs() < 5e-3 * numeric.abs().max(1.0), "weight {i}: {} vs {numeric}", analytic[i]);
    }
}

fn moe(n_experts: usize, top_k: usize, seed: u64) -> SparseMoe<AB> {
    let mut rng = SeededRng::new(seed);
    crate::mixtral::sparse_moe(
        &MoeConfig::new().with_n_experts(n_experts).with_experts_per_token(top_k),
        8,
        12,
        0.3,
        0.3,
        &mut rng,
        &Default::default(),
    )
}

#[test]
fn moe_layer_matches_finite_differences() {
    // Every expert chosen: the output is smooth in the input, through the gathers, the
    // scatter-add and the renormalised router weights.
    let layer = moe(3, 3, 6);
    check_input_gradient([2, 3, 8], [2, 3, 8], |x| layer.forward(x).0);
}

#[test]
fn router_gradient_through_the_top_k_weights_matches_finite_differences() {
    // Top 2 of 4: the router learns only through the chosen experts' renormalised weights.
    // A small step leaves every token's choice unchanged, so the loss is smooth there.
    let device = Default::default();
    let shape = [1, 6, 8];
    let (x, w) = (random(shape, 12), random(shape, 13));
    let build = |delta: Option<(usize, f32)>| {
        let mut layer = moe(4, 2, 14);
        if let Some((i, d)) = delta {
            let mut values: Vec<f32> = layer.router.weight.as_ref().unwrap().val().into_data().into_vec().unwrap();
            values[i] += d;
            layer.router.weight = Some(burn::module::Param::from_tensor(Tensor::from_data(TensorData::new(values, [8, 4]), &device)));
        }
        layer
    };
    let loss = |layer: &SparseMoe<AB>| (layer.forward(tensor(&x, shape)).0 * tensor::<AB>(&w, shape)).sum();
    let layer = build(None);
    let grads = loss(&layer).backward();
    let analytic: Vec<f32> = layer.router.weight.as_ref().unwrap().val().grad(&grads).unwrap().into_data().into_vec().unwrap();
    assert!(analytic.iter().any(|g| g.abs() > 1e-3), "the router gets a gradient");
    for i in [0, 5, 13, 22, 31] {
        let eps = 1e-3;
        let numeric = (loss(&build(Some((i, eps)))).into_scalar() - loss(&build(Some((i, -eps)))).into_scalar()) / (2.0 * eps);
        assert!((numeric - analytic[i]).abs() < 1e-2 * numeric.abs().max(0.1), "router weight {i}: {} vs {numeric}", analytic[i]);
    }
}

#[test]
fn expert_capacity_drops_the_tokens_past_it() {
    let x = tensor::<AB>(&random([1, 16, 8], 15), [1, 16, 8]);
    let dropless = moe(4, 2, 16);
    let mut limited = moe(4, 2, 16);
    // 16 tokens × 2 choices / 4 experts = 8 each when even; a factor of 1/8 keeps 1 per expert.
    limited.capacity_factor = 0.125;
    let rows =
        |out: Tensor<AB, 3>| -> Vec<Vec<f32>> { out.into_data().into_vec::<f32>().unwrap().chunks(8).map(<[f32]>::to_vec).collect() };
    let (full, kept) = (rows(dropless.forward(x.clone()).0), rows(limited.forward(x).0));
    let nonzero = kept.iter().filter(|r| r.iter().any(|v| *v != 0.0)).count();
    assert!((1..=4).contains(&nonzero), "at most one token per expert keeps an output: {nonzero}");
    // The first token comes first in both its experts' queues.
    assert_eq!(full[0], kept[0]);
}

fn tiny(position: PositionKind) -> DecoderConfig {
    DecoderConfig::new(50, 32, 2, 4, 48, 32).with_n_kv_heads(2).with_position(position)
}

fn tiny_mamba() -> MambaConfig {
    MambaConfig::new(50, 32, 2, 32).with_d_state(8)
}

/// Cached decoding (prefill, then one token at a time) equals recomputing the whole sequence.
fn check_cache_equals_recompute(config: ModelConfig) {
    type F = burn::backend::Flex;
    let device = Default::default();
    let model = config.init::<F>(7, &device);
    let model = model.as_causal().expect("a decoding model");
    let tokens: Vec<i64> = (0..12).map(|i| (i * 7 + 3) % 50).collect();
    let full = model.forward(Tensor::<F, 2, Int>::from_data(TensorData::new(tokens.clone(), [1, 12]), &device));
    let full: Vec<f32> = full.into_data().into_vec().unwrap();
    let mut state = model.init_state();
    let mut stepped = Vec::new();
    let prefill = 5;
    let first = model.forward_step(Tensor::from_data(TensorData::new(tokens[..prefill].to_vec(), [1, prefill]), &device), &mut state);
    stepped.extend(first.into_data().into_vec::<f32>().unwrap());
    for &t in &tokens[prefill..] {
        let logits = model.forward_step(Tensor::from_data(TensorData::new(vec![t], [1, 1]), &device), &mut state);
        stepped.extend(logits.into_data().into_vec::<f32>().unwrap());
    }
    assert_eq!(full.len(), stepped.len());
    for (i, (a, b)) in full.iter().zip(&stepped).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "logit {i}: full {a} vs cached {b}");
    }
    for pos in 0..12 {
        let row = |v: &[f32]| argmax(&v[pos * 50..(pos + 1) * 50]);
        assert_eq!(row(&full), row(&stepped));
    }
}

#[test]
fn cached_decoding_equals_recompute_llama_gqa_rope() {
    check_cache_equals_recompute(ModelConfig::Llama(tiny(PositionKind::Rope)));
}

#[test]
fn cached_decoding_equals_recompute_gpt2_learned_positions() {
    check_cache_equals_recompute(ModelConfig::Llama(
        tiny(PositionKind::Learned).with_norm(NormKind::LayerNorm).with_mlp(MlpKind::Gelu).with_bias(true).with_tie_embeddings(true),
    ));
}

#[test]
fn cached_decoding_equals_recompute_alibi_sliding_window_parallel() {
    check_cache_equals_recompute(ModelConfig::Llama(tiny(PositionKind::Alibi).with_sliding_window(4).with_parallel_block(true)));
}

/// Mamba's recurrent decoding (conv and scan state per layer) against its full-sequence pass,
/// which on flex runs the fused scan kernel while the steps run the chunked tensor-op scan.
#[test]
fn cached_decoding_equals_recompute_mixtral() {
    let experts = MoeConfig::new().with_n_experts(4).with_experts_per_token(2);
    check_cache_equals_recompute(ModelConfig::Mixtral(tiny(PositionKind::Rope).with_moe(Some(experts))));
}

/// T5: the encoder runs once; decoding one token at a time with the self-attention cache and
/// the cross-attention keys and values computed once gives the full decoder pass's logits,
/// with one input row padded (and the config counts the parameters the model has).
#[test]
fn cached_decoding_equals_recompute_t5() {
    use crate::blocks::MlpKind;
    use crate::t5::T5Config;
    type F = burn::backend::Flex;
    let device = Default::default();
    for mlp in [MlpKind::Relu, MlpKind::GatedGelu] {
        let config = T5Config::new(61, 32, 12, 64, 4, 2, 3).with_relative_attention_num_buckets(8).with_mlp(mlp);
        let model = config.init::<F>(5, &device);
        assert_eq!(config.num_params(), furnace_core::params::trainable_params(&model).1, "{mlp:?}");
        let input =
            Tensor::<F, 2, Int>::from_data(TensorData::new((0..18).map(|i| (i * 7 % 61) as i64).collect::<Vec<_>>(), [2, 9]), &device);
        let decoder =
            Tensor::<F, 2, Int>::from_data(TensorData::new((0..12).map(|i| (i * 5 % 61) as i64).collect::<Vec<_>>(), [2, 6]), &device);
        let lengths = [9, 6];
        let full: Vec<f32> = model.forward(input.clone(), &lengths, decoder.clone()).into_data().into_vec().unwrap();
        let mut state = model.start_decoding(model.encode(input, &lengths), &lengths);
        let steps: Vec<Tensor<F, 3>> = (0..6).map(|t| model.decode(decoder.clone().narrow(1, t, 1), &mut state)).collect();
        let stepped: Vec<f32> = Tensor::cat(steps, 1).into_data().into_vec().unwrap();
        let worst = full.iter().zip(&stepped).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-4, "{mlp:?}: cached decoding differs by {worst}");
    }
}

/// T5 through the shared generator: greedy decoding over an encoded input (from the start
/// token, with caches) equals the argmax chain of full decoder passes.
#[test]
fn t5_greedy_generation_equals_argmax_of_full_decoder_passes() {
    use crate::t5::{Conditioned, T5Config};
    type F = burn::backend::Flex;
    let device = Default::default();
    let model = T5Config::new(50, 32, 8, 64, 4, 2, 2).with_relative_attention_num_buckets(8).init::<F>(3, &device);
    let input = Tensor::<F, 2, Int>::from_data(TensorData::new(vec![5i64, 9, 2, 7, 7, 1], [1, 6]), &device);
    check_greedy_generation(&Conditioned { model: &model, input, lengths: vec![6] }, &[0]);
}

#[test]
fn recurrent_decoding_equals_recompute_mamba() {
    check_cache_equals_recompute(ModelConfig::Mamba(tiny_mamba()));
}

#[test]
fn greedy_generation_equals_argmax_of_full_forward() {
    for config in [ModelConfig::Llama(tiny(PositionKind::Rope)), ModelConfig::Mamba(tiny_mamba())] {
        check_greedy_generation(
            &config.init::<burn::backend::Flex>(3, &Default::default()).as_causal().expect("a decoding model"),
            &[1, 2, 3],
        );
    }
}

/// Greedy decoding after `prompt` (6 tokens, through the model's decoding state) equals the
/// argmax chain of full forward passes.
fn check_greedy_generation<M: CausalLm<burn::backend::Flex>>(model: &M, prompt: &[u32]) {
    let device = Default::default();
    let config = GenerateConfig { max_new_tokens: 6, stop_tokens: vec![], sampling: SamplingConfig::default() };
    let generated = generate(model, prompt, &config, None, &device, |_| {});
    let vocab = model.vocab_size();
    let mut seq: Vec<u32> = prompt.to_vec();
    for _ in 0..6 {
        let input: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
        let logits = model.forward(Tensor::from_data(TensorData::new(input, [1, seq.len()]), &device));
        let values: Vec<f32> = logits.into_data().into_vec().unwrap();
        seq.push(argmax(&values[(seq.len() - 1) * vocab..seq.len() * vocab]));
    }
    assert_eq!(generated, seq[prompt.len()..]);
}

#[test]
fn param_count_matches_the_module() {
    type F = burn::backend::Flex;
    for config in [
        tiny(PositionKind::Rope),
        tiny(PositionKind::Learned).with_bias(true).with_norm(NormKind::LayerNorm).with_mlp(MlpKind::Gelu).with_tie_embeddings(true),
        tiny(PositionKind::Alibi).with_parallel_block(true),
        tiny(PositionKind::Rope).with_moe(Some(MoeConfig::new().with_n_experts(3))),
    ] {
        let model = config.init::<F>(1, &Default::default());
        assert_eq!(model.num_params(), config.num_params());
    }
    for config in [tiny_mamba(), tiny_mamba().with_tie_embeddings(false).with_dt_rank(5).with_expand(3)] {
        let model = config.init::<F>(1, &Default::default());
        assert_eq!(model.num_params(), config.num_params());
    }
}

#[test]
fn an_architecture_inside_language_model_keeps_its_parameter_names() {
    type F = burn::backend::Flex;
    let device = Default::default();
    let decoder = tiny(PositionKind::Rope).init::<F>(1, &device);
    let named = furnace_core::params::named_tensors(&decoder);
    assert_eq!(furnace_core::params::named_tensors(&LanguageModel::Decoder(decoder)), named);
    let mamba = furnace_core::params::named_tensors(&ModelConfig::Mamba(tiny_mamba()).init::<F>(1, &device));
    assert!(mamba.contains_key("layers.1.mixer.a_log"), "{:?}", mamba.keys().collect::<Vec<_>>());
}

#[test]
fn named_tensors_round_trip_through_load() {
    type F = burn::backend::Flex;
    let device = Default::default();
    let a = tiny(PositionKind::Rope).init::<F>(1, &device);
    let b = tiny(PositionKind::Rope).init::<F>(2, &device);
    let named = furnace_core::params::named_tensors(&a);
    assert!(named.contains_key("layers.1.attention.q_proj.weight"), "{:?}", named.keys().collect::<Vec<_>>());
    let b = furnace_core::params::load_named(b, &named).unwrap();
    assert_eq!(furnace_core::params::named_tensors(&b), named);
    let mut wrong = named.clone();
    wrong.get_mut("norm.weight").unwrap().shape = vec![31];
    assert!(furnace_core::params::load_named(b, &wrong).unwrap_err().contains("norm.weight"));
}

mod lora {
    use burn::optim::GradientsParams;

    use super::*;
    use crate::hf::{from_peft, to_peft, HfArch};
    use crate::lora::{attach_lora, merge_lora, LoraConfig, LoraInit};
    use furnace_core::params::{load_named, named_tensors, trainable_params, HostTensor};

    fn tokens<Bk: Backend>() -> Tensor<Bk, 2, Int> {
        Tensor::from_data(TensorData::new((0..24).map(|i| (i * 7 % 50) as i64).collect::<Vec<_>>(), [2, 12]), &Default::default())
    }

    fn config(targets: &[&str]) -> LoraConfig {
        LoraConfig::new(4, 8.0, targets.iter().map(|s| s.to_string()).collect())
    }

    fn logits<Bk: Backend, M: CausalLm<Bk>>(model: &M) -> Vec<f32> {
        model.forward(tokens()).into_data().into_vec().unwrap()
    }

    /// Give every adapter a random B, as training would.
    fn train_b<Bk: Backend, M: Module<Bk>>(model: M, seed: u64) -> M {
        let mut tensors = named_tensors(&model);
        let mut rng = SeededRng::new(seed);
        for (name, t) in tensors.iter_mut() {
            if name.ends_with(".lora.b") {
                t.data.iter_mut().for_each(|v| *v = (rng.normal() * 0.05) as f32);
            }
        }
        load_named(model, &tensors).unwrap()
    }

    #[test]
    fn adapters_start_as_the_base_model() {
        let base = DecoderConfig::new(50, 32, 2, 4, 64, 16).with_n_kv_heads(2).init::<B>(3, &Default::default());
        let before = logits(&base);
        for init in [LoraInit::Kaiming, LoraInit::Gaussian] {
            let (adapted, count) = attach_lora(base.clone(), &config(&["all-linear"]).with_init(init), 1, &Default::default()).unwrap();
            assert_eq!(count, 2 * 7);
            assert_eq!(logits(&adapted), before, "B = 0: the update is exactly zero");
        }
    }

    #[test]
    fn only_adapters_train() {
        let base = DecoderConfig::new(50, 32, 2, 4, 64, 16).init::<AB>(3, &Default::default());
        let (model, count) = attach_lora(base, &config(&["q_proj", "v_proj", "down_proj"]), 1, &Default::default()).unwrap();
        assert_eq!(count, 6);
        let (trainable, total) = trainable_params(&model);
        assert_eq!(trainable, 2 * (2 * 4 * (32 + 32) + 4 * (64 + 32)));
        assert!(total > 10 * trainable);
        let model = train_b(model, 5);
        let grads = GradientsParams::from_grads(model.forward(tokens()).sum().backward(), &model);
        assert_eq!(grads.len(), 2 * count, "gradients for A and B of each adapter, none for frozen weights");
    }

    #[test]
    fn merged_weights_give_the_adapted_logits() {
        let decoder = DecoderConfig::new(50, 32, 2, 4, 64, 16).with_n_kv_heads(2);
        let lora = config(&["all-linear", "lm_head"]).with_use_rslora(true);
        let (adapted, _) = attach_lora(decoder.init::<B>(3, &Default::default()), &lora, 1, &Default::default()).unwrap();
        let adapted = train_b(adapted, 9);
        let merged = merge_lora(&named_tensors(&adapted), lora.scale());
        assert!(merged.keys().all(|k| !k.contains("lora")));
        let plain = load_named(decoder.init::<B>(0, &Default::default()), &merged).unwrap();
        let (a, b) = (logits(&adapted), logits(&plain));
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-5 * scale.max(1.0), "merged vs adapted: {diff}");
        assert!(logits(&decoder.init::<B>(3, &Default::default())) != a, "the trained adapters change the output");
    }

    #[test]
    fn unknown_targets_list_the_layers_there_are() {
        let llama = DecoderConfig::new(50, 32, 2, 4, 64, 16).init::<B>(3, &Default::default());
        let err = attach_lora(llama.clone(), &config(&["qkv"]), 1, &Default::default()).unwrap_err();
        assert!(err.contains("`qkv`") && err.contains("q_proj") && err.contains("gate_proj"), "{err}");
        let tied = DecoderConfig::new(50, 32, 2, 4, 64, 16).with_tie_embeddings(true).init::<B>(3, &Default::default());
        let err = attach_lora(tied, &config(&["lm_head"]), 1, &Default::default()).unwrap_err();
        assert!(err.contains("`lm_head`"), "{err}");
        assert!(attach_lora(llama, &config(&["lm_head"]), 1, &Default::default()).is_ok());
        let gpt2 =
            DecoderConfig::new(50, 32, 2, 4, 64, 16).with_mlp(MlpKind::Gelu).with_tie_embeddings(true).init::<B>(3, &Default::default());
        let err = attach_lora(gpt2, &config(&["gate_proj"]), 1, &Default::default()).unwrap_err();
        assert!(err.contains("c_attn") && !err.contains("gate_proj,"), "{err}");
    }

    /// PEFT's update for a module is `(lora_B · lora_A)ᵀ` in our `[in, out]` layout, times
    /// alpha/r of that module: it must equal our `A·B·scale` for every layer, including GPT-2's
    /// fused c_attn whose adapter stacks ours.
    #[test]
    fn peft_layout_holds_the_same_updates() {
        for (arch, decoder) in [
            (HfArch::Llama, DecoderConfig::new(50, 32, 2, 4, 64, 16).with_n_kv_heads(2)),
            (HfArch::Gpt2, DecoderConfig::new(50, 32, 2, 4, 64, 16).with_mlp(MlpKind::Gelu).with_bias(true).with_tie_embeddings(true)),
        ] {
            let lora = config(&["q_proj", "v_proj", "o_proj", "up_proj"]);
            let (model, _) = attach_lora(decoder.init::<B>(3, &Default::default()), &lora, 1, &Default::default()).unwrap();
            let ours = named_tensors(&train_b(model, 2));
            let peft = to_peft(arch, &ours, 2, lora.scale(), false).unwrap();
            let adapters: furnace_core::params::NamedTensors =
                ours.iter().filter(|(k, _)| k.contains(".lora.")).map(|(k, v)| (k.clone(), v.clone())).collect();
            assert_eq!(from_peft(arch, &peft.tensors, 2, lora.r).unwrap(), adapters, "{arch:?}: PEFT files read back");
            let merged_ours = merge_lora(&ours, lora.scale());
            // Apply PEFT's adapters to the base weights in torch layout, then compare per layer.
            let mut applied = crate::hf::to_hf(arch, &merge_lora(&ours, 0.0), 2).unwrap();
            for (key, a) in peft.tensors.iter().filter(|(k, _)| k.ends_with("lora_A.weight")) {
                let module = key.strip_prefix("base_model.model.").unwrap().strip_suffix(".lora_A.weight").unwrap();
                let b = &peft.tensors[&key.replace("lora_A", "lora_B")];
                let target = peft.modules.iter().find(|(t, _)| module.ends_with(t.as_str())).unwrap();
                let (rank, alpha) = *target.1;
                let weight = applied.get_mut(&format!("{module}.weight")).unwrap();
                add_peft_update(weight, a, b, alpha / rank as f64, arch == HfArch::Gpt2);
            }
            let expected = crate::hf::to_hf(arch, &merged_ours, 2).unwrap();
            for (name, t) in &expected {
                let diff = t.data.iter().zip(&applied[name].data).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(diff < 1e-6, "{arch:?} {name}: {diff}");
            }
        }
    }

    /// `weight += (B·A)·scale`, with B·A `[out, in]` transposed for a Conv1D (`[in, out]`) weight.
    fn add_peft_update(weight: &mut HostTensor, a: &HostTensor, b: &HostTensor, scale: f64, conv1d: bool) {
        let (r, d_in, d_out) = (a.shape[0], a.shape[1], b.shape[0]);
        for o in 0..d_out {
            for i in 0..d_in {
                let update: f64 = (0..r).map(|k| b.data[o * r + k] as f64 * a.data[k * d_in + i] as f64).sum();
                let index = if conv1d { i * d_out + o } else { o * d_in + i };
                weight.data[index] += (update * scale) as f32;
            }
        }
    }
}

mod qlora {
    use burn::optim::GradientsParams;

    use super::*;
    use crate::lora::{attach_lora, quantize_base, LoraConfig};
    use crate::nf4::Nf4Matrix;
    use furnace_core::params::{load_named, named_tensors};

    /// A decoder whose block linears hold exactly their NF4 dequantization, dense: what the
    /// quantized model must compute.
    fn dequantized<Bk: Backend>(decoder: &DecoderConfig) -> Decoder<Bk> {
        let mut tensors = named_tensors(&decoder.init::<Bk>(3, &Default::default()));
        for (name, t) in tensors.iter_mut() {
            if name.starts_with("layers.") && t.shape.len() == 2 {
                t.data = Nf4Matrix::quantize(&t.data, [t.shape[0], t.shape[1]]).dequantize();
            }
        }
        load_named(decoder.init::<Bk>(0, &Default::default()), &tensors).unwrap()
    }

    use crate::Decoder;

    #[test]
    fn nf4_layers_compute_their_dequantized_weights_and_pass_gradients_to_adapters() {
        let decoder = DecoderConfig::new(50, 64, 2, 4, 128, 16).with_n_kv_heads(2);
        let lora = LoraConfig::new(4, 8.0, vec!["all-linear".into()]);
        let tokens = || {
            Tensor::<AB, 2, Int>::from_data(
                TensorData::new((0..24).map(|i| (i * 5 % 50) as i64).collect::<Vec<_>>(), [2, 12]),
                &Default::default(),
            )
        };
        let (dense, _) = attach_lora(dequantized::<AB>(&decoder), &lora, 1, &Default::default()).unwrap();
        let (quantized, _) = attach_lora(decoder.init::<AB>(3, &Default::default()), &lora, 1, &Default::default()).unwrap();
        let (quantized, nf4_bytes, bf16_bytes) = quantize_base(quantized);
        assert!((nf4_bytes as f64) < 0.3 * bf16_bytes as f64, "{nf4_bytes} vs {bf16_bytes}");
        // Same adapters (B made non-zero) on both.
        let mut adapters = named_tensors(&dense);
        let mut rng = SeededRng::new(4);
        adapters
            .iter_mut()
            .filter(|(k, _)| k.ends_with("lora.b"))
            .for_each(|(_, t)| t.data.iter_mut().for_each(|v| *v = (rng.normal() * 0.1) as f32));
        let dense = load_named(dense, &adapters).unwrap();
        let quantized_tensors: furnace_core::params::NamedTensors = adapters
            .iter()
            .filter(|(k, _)| !(k.starts_with("layers.") && k.ends_with(".weight") && !k.contains("norm") && !k.contains("lora")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let quantized = load_named(quantized, &quantized_tensors).unwrap();

        let (a, b) = (dense.forward(tokens()), quantized.forward(tokens()));
        let diff = (a.clone() - b.clone()).abs().max().into_scalar();
        assert!(diff < 1e-5, "logits {diff}");
        let (ga, gb) =
            (GradientsParams::from_grads(a.sum().backward(), &dense), GradientsParams::from_grads(b.sum().backward(), &quantized));
        assert_eq!(gb.len(), 2 * 14, "only the adapters have gradients");
        assert_eq!(ga.len(), gb.len());
        let grad = |m: &Decoder<AB>, g: &GradientsParams| -> Vec<f32> {
            let MlpLayer::Dense(mlp) = &m.layers[1].feed_forward else { panic!("a dense MLP") };
            let lora = mlp.down_proj.lora.as_ref().unwrap();
            g.get::<B, 2>(lora.a.id).unwrap().into_data().into_vec().unwrap()
        };
        let (x, y) = (grad(&dense, &ga), grad(&quantized, &gb));
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = x.iter().zip(&y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(worst <= 1e-5 * scale, "gradient through NF4 layers: {worst} of {scale}");
    }
}

#[test]
fn group_generation_decodes_each_row_as_alone() {
    use crate::generate::generate_group;
    type F = burn::backend::Flex;
    let device = Default::default();
    for config in [ModelConfig::Llama(tiny(PositionKind::Rope)), ModelConfig::Mamba(tiny_mamba())] {
        let model = config.init::<F>(5, &device);
        let model = model.as_causal().expect("a decoding model");
        let prompt = [4u32, 9, 2];
        // Greedy: every row is the single-sequence greedy continuation, cut at the stop token.
        let greedy = GenerateConfig { max_new_tokens: 7, stop_tokens: vec![], sampling: SamplingConfig::default() };
        let alone = generate(&model, &prompt, &greedy, None, &device, |_| {});
        let stop = GenerateConfig { stop_tokens: vec![alone[3]], ..greedy.clone() };
        let cut = alone[..=alone.iter().position(|&t| t == alone[3]).unwrap()].to_vec();
        assert_eq!(generate_group(&model, &prompt, 3, &stop, &device), vec![cut; 3]);
        // Sampling: reproducible from the seed, and the rows differ.
        let sampled =
            GenerateConfig { sampling: SamplingConfig { temperature: 1.5, seed: 9, ..SamplingConfig::default() }, ..greedy.clone() };
        let group = generate_group(&model, &prompt, 6, &sampled, &device);
        assert_eq!(group, generate_group(&model, &prompt, 6, &sampled, &device));
        assert!(group.iter().all(|r| r.len() == 7) && group.iter().any(|r| r != &group[0]), "{group:?}");
    }
}

/// Two sequences packed into one row (plus padding) give each the logits it gets alone.
#[test]
fn packed_rows_compute_each_sequence_as_if_alone() {
    type F = burn::backend::Flex;
    let device = Default::default();
    for config in [
        tiny(PositionKind::Rope),
        tiny(PositionKind::Learned).with_norm(NormKind::LayerNorm).with_mlp(MlpKind::Gelu).with_bias(true).with_tie_embeddings(true),
        tiny(PositionKind::Alibi).with_sliding_window(3),
    ] {
        let model = config.init::<F>(4, &device);
        let (a, b): (Vec<i64>, Vec<i64>) = ((0..5).map(|i| (i * 7 + 1) % 50).collect(), (0..4).map(|i| (i * 11 + 2) % 50).collect());
        let alone = |tokens: &[i64]| -> Vec<f32> {
            model.forward(Tensor::from_data(TensorData::new(tokens.to_vec(), [1, tokens.len()]), &device)).into_data().into_vec().unwrap()
        };
        let row: Vec<i64> = [a.clone(), b.clone(), vec![0; 3]].concat();
        let positions: Vec<usize> = (0..5).chain(0..4).chain(0..3).collect();
        let packed: Vec<f32> =
            model.forward_packed(Tensor::from_data(TensorData::new(row, [1, 12]), &device), &positions).into_data().into_vec().unwrap();
        let expected = [alone(&a), alone(&b)].concat();
        for (i, (got, want)) in packed[..9 * 50].iter().zip(&expected).enumerate() {
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{:?} logit {i}: packed {got} vs alone {want}", config.position);
        }
    }
}

/// Replies sharing a prompt, laid out as branches of one row (the prompt once, then each
/// reply), score as each whole sequence does alone: positions continue the prompt's and a reply
/// sees the prompt but not the other reply.
#[test]
fn branched_rows_score_each_sequence_as_if_alone() {
    type F = burn::backend::Flex;
    let device = Default::default();
    for config in [
        tiny(PositionKind::Rope),
        tiny(PositionKind::Learned).with_norm(NormKind::LayerNorm).with_mlp(MlpKind::Gelu).with_bias(true),
        tiny(PositionKind::Alibi).with_sliding_window(4),
    ] {
        let position = config.position;
        let model = config.with_score_head(true).init::<F>(4, &device);
        let seq = |tokens: &[i64]| tokens.to_vec();
        let (prompt_a, prompt_b) = (seq(&[3, 9, 14, 27, 5, 8]), seq(&[41, 2, 7]));
        let replies_a = [seq(&[11, 12, 13]), seq(&[30, 31])];
        let replies_b = [seq(&[19]), seq(&[20, 21, 22, 23])];
        let alone: Vec<f32> = [(&prompt_a, &replies_a), (&prompt_b, &replies_b)]
            .iter()
            .flat_map(|(prompt, replies)| replies.iter().map(|reply| [prompt.as_slice(), reply].concat()))
            .map(|tokens| {
                let n = tokens.len();
                let score = model.scores(Tensor::from_data(TensorData::new(tokens, [1, n]), &device), &[n - 1]);
                score.into_scalar()
            })
            .collect();
        // Row 0: prompt a (6), reply 0 (3), reply 1 (2). Row 1: prompt b (3), reply 0 (1),
        // reply 1 (4), then 3 of padding (branch 3, attending to nothing it could change).
        let len = 11;
        let tokens: Vec<i64> = [&prompt_a[..], &replies_a[0], &replies_a[1], &prompt_b, &replies_b[0], &replies_b[1], &[0, 0, 0]].concat();
        let positions: Vec<usize> = (0..9).chain(6..8).chain(0..4).chain(3..7).chain([0; 3]).collect();
        let branches: Vec<u32> = [[0; 6].as_slice(), &[1; 3], &[2; 2], &[0; 3], &[1], &[2; 4], &[3; 3]].concat();
        let reads = [8, 10, len + 3, len + 7];
        let branched = model.branched_scores(Tensor::from_data(TensorData::new(tokens, [2, len]), &device), &positions, &branches, &reads);
        let branched: Vec<f32> = branched.into_data().into_vec().unwrap();
        for (i, (got, want)) in branched.iter().zip(&alone).enumerate() {
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{position:?} sequence {i}: branched {got} vs alone {want}");
        }
    }
}

#[test]
fn activation_estimate_follows_the_published_formula() {
    // GPT-3's 175B shape in Korthikanti et al. (2022), one sequence: 34·s·b·h + 5·a·s²·b bytes
    // per layer in fp16; ours counts f32 (twice) and adds the logits and their gradient.
    let config = DecoderConfig::new(51200, 12288, 96, 96, 4 * 12288, 2048);
    let (s, h, a) = (2048.0, 12288.0, 96.0);
    let per_layer_fp16 = 34.0 * s * h + 5.0 * a * s * s;
    let logits = 2.0 * 4.0 * s * 51200.0;
    let plain = config.activation_bytes(1, 2048, None);
    assert_eq!(plain, 96.0 * 2.0 * per_layer_fp16 + logits);
    let recomputed = config.activation_bytes(1, 2048, Some(1));
    assert_eq!(recomputed, 2.0 * per_layer_fp16 + 95.0 * 4.0 * s * h + logits, "the last block is kept");
    assert!(recomputed < plain / 10.0);
    // Every second block recomputed: half the layers keep everything, half their input.
    let selective = config.activation_bytes(1, 2048, Some(2));
    assert_eq!(selective, 49.0 * 2.0 * per_layer_fp16 + 47.0 * 4.0 * s * h + logits);
}

#[test]
fn mamba_and_t5_activation_estimates_count_what_their_checkpointing_keeps() {
    // Mamba, d_model 512 (d_inner 1024, dt_rank 32, N 16), 6 layers, T 2048, 2 rows: each layer
    // keeps 2·512 + 9·1024 + 32 + 2·16 floats per token; a recomputed one its 512-float input.
    let mamba = MambaConfig::new(4096, 512, 6, 2048);
    let tokens = 2.0 * 2048.0;
    let (layer, input, logits) = (4.0 * tokens * 10304.0, 4.0 * tokens * 512.0, 8.0 * tokens * 4096.0);
    assert_eq!(mamba.activation_bytes(2, 2048, None), 6.0 * layer + logits);
    assert_eq!(mamba.activation_bytes(2, 2048, Some(1)), layer + 5.0 * input + logits, "the last block is kept");
    // T5, 3 + 3 blocks: under checkpointing every encoder block keeps only its input, the
    // decoder's last keeps everything (with its cross-attention); the encoder's output is held.
    let t5 = crate::t5::T5Config::new(100, 64, 16, 256, 4, 3, 3);
    let (s, b, d, a) = (32.0, 2.0, 64.0, 4.0);
    let block = 2.0 * s * b * d * (34.0 + 5.0 * a * s / d);
    let cross = 2.0 * s * b * (11.0 * d + 5.0 * a * s);
    let (input, logits) = (4.0 * s * b * d, 8.0 * s * b * 100.0);
    assert_eq!(t5.activation_bytes(2, 32, None), 3.0 * block + 3.0 * (block + cross) + input + logits);
    assert_eq!(t5.activation_bytes(2, 32, Some(1)), 3.0 * input + 2.0 * input + (block + cross) + input + logits);
    // Selective: every encoder block still recomputed, the decoder's second.
    assert_eq!(t5.activation_bytes(2, 32, Some(2)), 3.0 * input + input + 2.0 * (block + cross) + input + logits);
}

/// Greedy decoding of `prompt` alone: the next-token logits after the prompt and after each of
/// the `steps` tokens chosen, and those tokens.
fn decode_alone<B: FusedOps, M: CausalLm<B>>(model: &M, prompt: &[u32], steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let device = Default::default();
    let mut state = model.init_state();
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let logits = model.forward_step(Tensor::from_data(TensorData::new(ids, [1, prompt.len()]), &device), &mut state);
    let vocab = logits.dims()[2];
    let mut last: Vec<f32> = logits.narrow(1, prompt.len() - 1, 1).into_data().convert::<f32>().into_vec().unwrap();
    let (mut all, mut tokens) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let token = argmax(&last) as u32;
        all.push(last);
        tokens.push(token);
        let logits = model.forward_step(Tensor::from_data(TensorData::new(vec![token as i64], [1, 1]), &device), &mut state);
        last = logits.reshape([vocab]).into_data().convert::<f32>().into_vec().unwrap();
    }
    all.push(last);
    (all, tokens)
}

/// Continuous batching: prompts of different lengths join a running batch at different steps,
/// are read three tokens a step beside the others' decoding (chunked prefill) and leave when
/// done, and every sequence's logits (1e-4) and greedy tokens equal those of it decoded alone.
/// A prompt sharing another's first 17 tokens takes its first block from the prefix cache, and
/// one sequence is preempted mid-way (removed, then added back with what it generated).
fn check_batched_equals_alone(config: ModelConfig) {
    use crate::batching::{BatchedDecoding, SequenceCache};
    type F = burn::backend::Flex;
    let device = Default::default();
    let model = config.init::<F>(11, &device);
    let model = model.as_causal().expect("a decoding model");
    let paged = matches!(model, crate::Causal::Decoder(_));
    let shared: Vec<u32> = (0..17).map(|i| (i * 5 + 1) % 50).collect();
    let sharing: Vec<u32> = shared.iter().copied().chain([3, 44]).collect();
    // (prompt, step it joins at, tokens it generates)
    let requests: [(&[u32], usize, usize); 5] =
        [(&[1, 2, 3, 4, 5, 6, 7], 0, 6), (&[9], 1, 3), (&shared, 1, 4), (&[4, 8, 15], 2, 7), (&sharing, 8, 4)];
    let preempted = (0, 4);
    let alone: Vec<_> = requests.iter().map(|&(prompt, _, steps)| decode_alone::<F, _>(&model, prompt, steps)).collect();
    let close = |what: &str, a: &[f32], b: &[f32]| {
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-4 * a.iter().fold(1.0f32, |m, x| m.max(x.abs())), "{what}: batched logits differ by {worst}");
    };
    let mut batch = model.new_batch(64);
    // Per live sequence: its request, its tokens (prompt and generated) and how many are cached.
    let mut live: Vec<(usize, Vec<u32>, usize)> = Vec::new();
    let mut finished = 0;
    for iteration in 0.. {
        for (r, &(prompt, joins, _)) in requests.iter().enumerate() {
            if joins == iteration {
                let cached = batch.add(r as u64, prompt);
                assert_eq!(cached, if paged && r == 4 { 16 } else { 0 }, "request {r}: prompt tokens found in the prefix cache");
                live.push((r, prompt.to_vec(), cached));
            }
        }
        if iteration == preempted.1 {
            let (r, tokens, cached) = live.iter_mut().find(|(r, ..)| *r == preempted.0).expect("running");
            batch.remove(*r as u64);
            *cached = batch.add(*r as u64, tokens);
        }
        if live.is_empty() {
            break;
        }
        let entries: Vec<(u64, &[u32])> =
            live.iter().map(|(r, tokens, cached)| (*r as u64, &tokens[*cached..tokens.len().min(cached + 3)])).collect();
        for &(id, tokens) in &entries {
            assert!(batch.reserve(id, tokens.len()), "room for request {id}");
        }
        let logits = model.step(&mut batch, &entries);
        let reads: Vec<usize> = entries.iter().map(|(_, tokens)| tokens.len()).collect();
        let vocab = logits.dims()[1];
        let logits: Vec<f32> = logits.into_data().convert::<f32>().into_vec().unwrap();
        for (i, (r, tokens, cached)) in live.iter_mut().enumerate() {
            *cached += reads[i];
            if *cached < tokens.len() {
                continue;
            }
            let generated = tokens.len() - requests[*r].0.len();
            let row = &logits[i * vocab..(i + 1) * vocab];
            close(&format!("request {r} after {generated} tokens"), &alone[*r].0[generated], row);
            tokens.push(argmax(row) as u32);
        }
        for i in (0..live.len()).rev() {
            let (r, tokens, _) = &live[i];
            if tokens.len() - requests[*r].0.len() == requests[*r].2 {
                assert_eq!(&tokens[requests[*r].0.len()..], &alone[*r].1[..], "request {r}: batched greedy tokens");
                batch.remove(*r as u64);
                live.remove(i);
                finished += 1;
            }
        }
    }
    assert_eq!(finished, requests.len());
    if paged {
        assert_eq!(batch.blocks().0, 0, "every block is back in the pool");
    }
}

#[test]
fn batched_decoding_equals_decoding_alone() {
    let sliding = tiny(PositionKind::Alibi).with_sliding_window(4);
    for config in [tiny(PositionKind::Rope), tiny(PositionKind::Learned), sliding] {
        check_batched_equals_alone(ModelConfig::Llama(config));
    }
    check_batched_equals_alone(ModelConfig::Mamba(tiny_mamba()));
}

/// The model, not a name pattern, says what each parameter is and which block holds it. The
/// blocks' parameters are exactly those under `layers.<i>.` (the naming the checkpoints use).
#[test]
fn models_say_each_parameters_kind_and_block() {
    use furnace_core::params::ParamKind::*;
    let device = Default::default();
    let gpt2 = ModelConfig::Llama(
        tiny(PositionKind::Learned).with_norm(NormKind::LayerNorm).with_mlp(MlpKind::Gelu).with_bias(true).with_tie_embeddings(true),
    )
    .init::<B>(1, &device);
    let kinds = gpt2.param_kinds();
    for (path, kind) in [
        ("layers.0.attention.q_proj.weight", Matrix),
        ("layers.0.attention.q_proj.bias", Bias),
        ("layers.1.ffn_norm.weight", Norm),
        ("layers.1.ffn_norm.bias", Bias),
        ("embed_tokens", Embedding),
        ("embed_positions", Embedding),
        ("norm.weight", Norm),
    ] {
        assert_eq!(kinds.get(path), Some(&kind), "{path}");
    }
    let bert = ModelConfig::Bert(crate::BertConfig::new(50, 32, 2, 4, 64, 32)).init::<B>(1, &device);
    let kinds = bert.param_kinds();
    assert_eq!(kinds["embed_token_types"], Embedding);
    // A norm after the embeddings is a norm, whatever its name begins with.
    assert_eq!(kinds["embed_norm.weight"], Norm);
    let t5 = ModelConfig::T5(crate::t5::T5Config::new(50, 32, 8, 64, 4, 2, 2)).init::<B>(1, &device);
    let kinds = t5.param_kinds();
    assert_eq!(kinds["encoder_relative_bias"], Embedding);
    assert_eq!(kinds["decoder_relative_bias"], Embedding);
    assert!(t5.param_blocks().is_empty(), "T5 is two stacks, not one chain of blocks");
    let mamba = ModelConfig::Mamba(tiny_mamba()).init::<B>(1, &device);
    assert_eq!(mamba.param_kinds()["layers.0.mixer.d"], Norm);
    assert_eq!(mamba.param_kinds()["layers.0.mixer.conv_bias"], Bias);

    for model in [&gpt2, &bert, &mamba] {
        let blocks = model.param_blocks();
        assert!(!blocks.is_empty());
        for path in model.param_kinds().keys() {
            let by_name = path.strip_prefix("layers.").and_then(|rest| rest.split('.').next()).and_then(|i| i.parse::<usize>().ok());
            assert_eq!(blocks.get(path).copied(), by_name, "{path}");
        }
    }
}

/// Greedy speculative decoding is greedy decoding: the same tokens from every decoder
/// architecture, drafted by prompt lookup or by a model. A target drafting for itself accepts
/// every draft, so it runs one forward per k + 1 tokens.
#[test]
fn greedy_speculative_decoding_equals_greedy_decoding() {
    use crate::speculative::{generate_speculative, Drafter};
    type F = burn::backend::Flex;
    let device = Default::default();
    let greedy = GenerateConfig { max_new_tokens: 20, stop_tokens: vec![], sampling: SamplingConfig::default() };
    let prompt = [5u32, 9, 13, 17, 5, 9, 13, 17, 5, 9];
    let draft = ModelConfig::Llama(DecoderConfig::new(50, 16, 1, 2, 32, 32)).init::<F>(11, &device);
    let draft = draft.as_causal().unwrap();
    for config in [
        ModelConfig::Llama(tiny(PositionKind::Rope)),
        ModelConfig::Llama(
            tiny(PositionKind::Learned).with_norm(NormKind::LayerNorm).with_mlp(MlpKind::Gelu).with_bias(true).with_tie_embeddings(true),
        ),
        ModelConfig::Mixtral(tiny(PositionKind::Rope).with_moe(Some(MoeConfig::new().with_n_experts(3)))),
        ModelConfig::Mamba(tiny_mamba()),
    ] {
        let model = config.init::<F>(7, &device);
        let model = model.as_causal().unwrap();
        let plain = generate(&model, &prompt, &greedy, None, &device, |_| {});
        for k in [1, 3] {
            let lookup: Drafter<'_, crate::Causal<'_, F>> = Drafter::PromptLookup { max_ngram: 3 };
            let (looked_up, _) = generate_speculative(&model, lookup, k, &prompt, &greedy, &device, |_| {});
            assert_eq!(looked_up, plain, "prompt lookup, k = {k}");
            let (drafted, _) = generate_speculative(&model, Drafter::Model(&draft), k, &prompt, &greedy, &device, |_| {});
            assert_eq!(drafted, plain, "draft model, k = {k}");
        }
        let mut streamed = Vec::new();
        let (itself, stats) = generate_speculative(&model, Drafter::Model(&model), 3, &prompt, &greedy, &device, |t| streamed.push(t));
        assert_eq!((&itself, &streamed), (&plain, &plain));
        assert_eq!((stats.accepted, stats.drafted, stats.rounds), (15, 15, 5), "{stats:?}");
    }
}

/// Sampled speculative decoding draws from the target's distribution, not the draft's: over
/// 20,000 seeds the first token's counts fit the target's softmax (chi-square, 7 degrees of
/// freedom, p = 0.001), where the draft's own distribution is far from it.
#[test]
fn speculative_sampling_draws_from_the_target_distribution() {
    use crate::speculative::{generate_speculative, Drafter};
    type F = burn::backend::Flex;
    let device = Default::default();
    let vocab = 8;
    let prompt = [1u32, 2, 3];
    let target = ModelConfig::Llama(DecoderConfig::new(vocab, 16, 1, 2, 32, 16).with_init_std(0.5)).init::<F>(1, &device);
    let draft = ModelConfig::Llama(DecoderConfig::new(vocab, 16, 1, 2, 32, 16).with_init_std(0.5)).init::<F>(2, &device);
    let (target, draft) = (target.as_causal().unwrap(), draft.as_causal().unwrap());
    let softmax = |model: &crate::Causal<F>| {
        let ids = TensorData::new(prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, prompt.len()]);
        let logits: Vec<f32> = model.forward(Tensor::from_data(ids, &device)).into_data().into_vec().unwrap();
        let last = &logits[(prompt.len() - 1) * vocab..];
        let total: f64 = last.iter().map(|&l| (l as f64).exp()).sum();
        last.iter().map(|&l| (l as f64).exp() / total).collect::<Vec<f64>>()
    };
    let (p, q) = (softmax(&target), softmax(&draft));
    let distance: f64 = p.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum::<f64>() / 2.0;
    assert!(distance > 0.1, "the draft must disagree with the target for the test to mean anything: {distance}");
    let draws = 20_000;
    let mut counts = vec![0usize; vocab];
    let mut accepted = 0;
    for seed in 0..draws {
        let config = GenerateConfig {
            max_new_tokens: 3,
            stop_tokens: vec![],
            sampling: SamplingConfig { temperature: 1.0, seed, ..Default::default() },
        };
        let (tokens, stats) = generate_speculative(&target, Drafter::Model(&draft), 2, &prompt, &config, &device, |_| {});
        counts[tokens[0] as usize] += 1;
        accepted += stats.accepted;
    }
    let chi_square: f64 = counts.iter().zip(&p).map(|(&c, &pi)| (c as f64 - pi * draws as f64).powi(2) / (pi * draws as f64)).sum();
    assert!(chi_square < 24.32, "chi-square {chi_square:.1} over {counts:?} against {p:?}");
    // Some drafts were kept and some replaced: both branches of the rule drew.
    assert!(accepted > 0 && accepted < 2 * draws as usize, "{accepted}");
    // The same counts against the draft's distribution are far off.
    let against_draft: f64 = counts.iter().zip(&q).map(|(&c, &qi)| (c as f64 - qi * draws as f64).powi(2) / (qi * draws as f64)).sum();
    assert!(against_draft > 100.0, "{against_draft}");
}
