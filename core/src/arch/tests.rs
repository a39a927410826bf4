use serde_json::{json, Map, Value};

use super::*;
use crate::blocks::{MlpKind, NormKind, PositionKind};

fn keys(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

#[test]
fn every_architecture_reads_back_what_it_writes() {
    for &arch in Arch::ALL {
        for &flavor in Flavor::ALL {
            let config = ModelConfig::from_keys(arch, flavor, &Map::new()).unwrap();
            assert_eq!(config.arch(), arch);
            assert_eq!(ModelConfig::from_keys(arch, Flavor::Tiny, &config.keys()).unwrap(), config, "{arch} {flavor}");
            let documented: Vec<&str> = ModelConfig::options(arch).iter().map(|o| o.key).collect();
            assert!(config.keys().keys().all(|k| documented.contains(&k.as_str())), "{arch}: a stored key without documentation");
        }
    }
}

#[test]
fn unset_keys_follow_the_arch_and_the_flavor() {
    let gpt2 = ModelConfig::from_keys(Arch::Gpt2, Flavor::Gpt2_124m, &Map::new()).unwrap();
    let c = gpt2.as_decoder().unwrap();
    assert_eq!((c.d_model, c.n_layers, c.vocab_size, c.d_ff), (768, 12, 50257, 3072));
    assert_eq!(
        (c.norm, c.position, c.mlp, c.bias, c.tie_embeddings),
        (NormKind::LayerNorm, PositionKind::Learned, MlpKind::Gelu, true, true)
    );
    let llama = ModelConfig::from_keys(Arch::Llama, Flavor::Quickstart, &keys(json!({"n_heads": 8, "mlp": "gelu"}))).unwrap();
    let c = llama.as_decoder().unwrap();
    assert_eq!((c.n_kv_heads, c.d_ff, c.norm), (8, 512, NormKind::RmsNorm), "kv heads and d_ff follow the keys given");
    let ModelConfig::T5(t5) = ModelConfig::from_keys(Arch::T5, Flavor::Tiny, &keys(json!({"mlp": "gated-gelu"}))).unwrap() else {
        unreachable!()
    };
    assert_eq!((t5.d_ff, t5.head_dim, t5.n_decoder_layers), (192, 16, 2));
    let ModelConfig::Mamba(mamba) = ModelConfig::from_keys(Arch::Mamba, Flavor::Tiny, &keys(json!({"d_model": 100}))).unwrap() else {
        unreachable!()
    };
    assert_eq!(mamba.dt_rank, 7);
}

#[test]
fn a_key_of_another_architecture_or_a_wrong_value_is_named() {
    let err = ModelConfig::from_keys(Arch::Llama, Flavor::Tiny, &keys(json!({"d_state": 16}))).unwrap_err();
    assert_eq!(err.key, "d_state");
    assert!(err.message.contains("mamba"), "{}", err.message);
    let err = ModelConfig::from_keys(Arch::Mixtral, Flavor::Tiny, &keys(json!({"n_layers": 2, "norm": "batchnorm"}))).unwrap_err();
    assert_eq!(err.key, "norm");
    assert!(err.message.contains("rmsnorm"), "{}", err.message);
    let err = ModelConfig::from_keys(Arch::Llama, Flavor::Tiny, &keys(json!({"n_experts": 4}))).unwrap_err();
    assert_eq!(err.key, "n_experts", "experts are Mixtral's");
    let mixtral = ModelConfig::from_keys(Arch::Mixtral, Flavor::Tiny, &keys(json!({"n_experts": 4}))).unwrap();
    assert_eq!(mixtral.as_decoder().unwrap().moe.as_ref().unwrap().n_experts, 4);
}
