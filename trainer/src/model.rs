//! From a recipe to a model: the decoder its `[model]` section describes, the weights it
//! starts from (`model.init_from`), and the LoRA adapters its `[lora]` section asks for.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use furnace_configs::{BaseQuant, LoraSection, ModelSection, Recipe, TrainMode};
use furnace_core::params::{from_safetensors, named_tensors, NamedTensors};
use furnace_models::hf::{config_from_hf, from_hf, from_peft, hf_arch_for};
use furnace_models::lora::{attach_lora, has_lora, merge_lora, quantize_base, LoraConfig, LoraInit};
use furnace_models::{Init, LanguageModel, ModelConfig};

use furnace_data::TextTokenizer;

use crate::checkpoint::{self, TOKENIZER_FILE};
use crate::gguf_layout::read_gguf;

/// The adapters a `[lora]` section asks for; None when r = 0.
pub fn lora_config(l: &LoraSection) -> Option<LoraConfig> {
    (l.r > 0).then(|| {
        LoraConfig::new(l.r, l.alpha, l.target_modules.clone()).with_dropout(l.dropout).with_use_rslora(l.use_rslora).with_init(
            match l.init {
                furnace_configs::LoraInit::Kaiming => LoraInit::Kaiming,
                furnace_configs::LoraInit::Gaussian => LoraInit::Gaussian,
            },
        )
    })
}

/// The model a recipe describes for a tokenizer of `vocab` tokens: initialised from the seed,
/// given the base weights, with LoRA adapters attached (and everything else frozen) when
/// `[lora]` asks for them, and the base's linear layers in NF4 under QLoRA. Weights loaded
/// afterwards (`load_named`) keep each parameter's trainable flag.
pub fn build_model<B: Backend>(recipe: &Recipe, vocab: usize, base: Option<&NamedTensors>, device: &B::Device) -> Result<Built<B>> {
    // A reward model's score head, or PPO's value head on the policy.
    let reward = matches!(recipe.training.mode, TrainMode::Reward | TrainMode::Ppo);
    let config = match recipe.model.model(Some(vocab)) {
        ModelConfig::Mamba(_) if reward => {
            bail!("training.mode = \"{}\" needs a transformer with a scalar head; this model is a Mamba", recipe.training.mode)
        }
        config => config.with_score_head(reward),
    };
    let mut model = config.init::<B>(recipe.run.seed, device);
    if let Some(weights) = base {
        // A reward model's score head starts fresh unless the base already is a reward model;
        // only then is the base map copied.
        let mut weights = std::borrow::Cow::Borrowed(weights);
        if reward && !weights.contains_key("score.weight") {
            weights.to_mut().extend(named_tensors(&model).into_iter().filter(|(name, _)| name.starts_with("score.")));
        }
        model = furnace_core::params::load_named(model, &weights)
            .map_err(|e| anyhow::anyhow!("model.init_from = {}: {e}", recipe.model.init_from))?;
    }
    if let Some(lora) = lora_config(&recipe.lora) {
        model = attach_lora(model, &lora, recipe.run.seed, device).map_err(anyhow::Error::msg)?.0;
        if !recipe.lora.adapter_from.is_empty() {
            model = load_peft_adapters(model, &config, lora.r, Path::new(&recipe.lora.adapter_from))?;
        }
    }
    if recipe.lora.quantize_base == BaseQuant::Nf4 {
        if base.is_none() {
            bail!("lora.quantize_base = \"nf4\" quantizes the base weights of model.init_from, and none were given");
        }
        let (model, nf4_bytes, bf16_bytes) = quantize_base(model);
        return Ok(Built { model, nf4_bytes: Some((nf4_bytes, bf16_bytes)) });
    }
    Ok(Built { model, nf4_bytes: None })
}

/// The model with its adapters replaced by those of a PEFT folder (same rank, same layers).
fn load_peft_adapters<B: Backend>(model: LanguageModel<B>, config: &ModelConfig, r: usize, dir: &Path) -> Result<LanguageModel<B>> {
    let file = dir.join("adapter_model.safetensors");
    let peft = from_safetensors(&std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let arch = hf_arch_for(config).map_err(anyhow::Error::msg)?;
    let adapters =
        from_peft(arch, &peft, config.n_layers(), r).map_err(|e| anyhow::anyhow!("lora.adapter_from = {}: {e}", dir.display()))?;
    let mut tensors = named_tensors(&model);
    for (name, tensor) in adapters {
        if !tensors.contains_key(&name) {
            bail!("lora.adapter_from = {}: it adapts `{name}`, which lora.target_modules leaves without an adapter", dir.display());
        }
        tensors.insert(name, tensor);
    }
    furnace_core::params::load_named(model, &tensors).map_err(|e| anyhow::anyhow!("lora.adapter_from = {}: {e}", dir.display()))
}

/// A second model a run reads beside its own (a reward model, a teacher), given by recipe key
/// `key`: loaded as `model.init_from` is, and refused unless it uses `tokenizer`; `fix` says
/// what to do then.
pub fn load_companion(key: &str, path: &Path, tokenizer: &TextTokenizer, fix: &str) -> Result<Base> {
    let key = format!("{key} = {}", path.display());
    let base = load_base(path).with_context(|| key.clone())?;
    let theirs = TextTokenizer::load(&base.tokenizer).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
    if theirs.to_json() != tokenizer.to_json() {
        bail!("{key}: its tokenizer ({}) differs from this run's; {fix}", base.tokenizer.display());
    }
    Ok(base)
}

/// `training.reward_model`: a reward model (a run trained with training.mode = "reward") for a
/// policy that uses `tokenizer`.
pub fn load_reward_model<B: Backend>(path: &Path, tokenizer: &TextTokenizer, device: &B::Device) -> Result<LanguageModel<B>> {
    let base = load_companion("training.reward_model", path, tokenizer, "train the reward model from the policy's base")?;
    let key = format!("training.reward_model = {}", path.display());
    if base.model.as_decoder().is_none() {
        bail!("{key}: reward models are transformers; this one is {}", base.model.arch());
    }
    if !base.weights.contains_key("score.weight") {
        bail!("{key} has no score head: it is not a reward model; train one with training.mode = \"reward\"");
    }
    let model = base.model.clone().with_score_head(true).init::<B>(0, device);
    furnace_core::params::load_named(model, &base.weights).map_err(|e| anyhow::anyhow!("{key}: {e}"))
}

/// A built model, and under QLoRA the bytes of its NF4 layers (and of the same layers in bf16).
pub struct Built<B: Backend> {
    pub model: LanguageModel<B>,
    pub nf4_bytes: Option<(usize, usize)>,
}

/// The base weights a checkpoint of `recipe` needs besides its own tensors: under QLoRA the
/// checkpoint leaves out the NF4 layers, which are quantized again (deterministically) from
/// `model.init_from`.
pub fn base_for(recipe: &Recipe) -> Result<Option<NamedTensors>> {
    if recipe.lora.quantize_base != BaseQuant::Nf4 {
        return Ok(None);
    }
    let path = Path::new(&recipe.model.init_from);
    let base = load_base(path).with_context(|| {
        format!("this QLoRA checkpoint stores adapters only; its base model.init_from = {} must still be there", path.display())
    })?;
    Ok(Some(base.weights))
}

/// Pretrained weights to start from, with the model they fit and their tokenizer.
pub struct Base {
    /// Its vocabulary is the weights'.
    pub model: ModelConfig,
    /// Under our parameter names, adapters already merged.
    pub weights: NamedTensors,
    pub tokenizer: PathBuf,
}

/// Read `model.init_from`: a Furnace run or checkpoint folder, a Hugging Face model folder, or
/// a GGUF file (llama layout; quantized tensors dequantized).
pub fn load_base(path: &Path) -> Result<Base> {
    if is_gguf(path) {
        let gguf = read_gguf(path)?;
        let (n_layers, tied) = (gguf.config.n_layers(), gguf.config.tie_embeddings());
        let weights = from_hf(gguf.arch, &gguf.hf, n_layers, tied).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return Ok(Base { model: gguf.config, weights, tokenizer: tokenizer_file(&gguf.tokenizer_json)? });
    }
    let tokenizer = path.join(TOKENIZER_FILE);
    if path.join("config.json").is_file() {
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path.join("config.json"))?)
            .with_context(|| format!("{} is not valid JSON", path.join("config.json").display()))?;
        let (hf_arch, config) = config_from_hf(&json).map_err(|e| anyhow::anyhow!("{}: {e}", path.join("config.json").display()))?;
        let hf = read_hf_weights(path)?;
        let weights =
            from_hf(hf_arch, &hf, config.n_layers(), config.tie_embeddings()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if !tokenizer.is_file() {
            bail!("{} has no tokenizer.json; Furnace reads Hugging Face fast tokenizers only", path.display());
        }
        return Ok(Base { model: config, weights, tokenizer });
    }
    let checkpoint::StoredModel { dir, recipe, weights } = checkpoint::read_model(path)?;
    let weights = match lora_config(&recipe.lora) {
        Some(lora) if has_lora(&weights) => merge_lora(&weights, lora.scale()),
        _ => weights,
    };
    let vocab = weights.get("embed_tokens").map(|t| t.shape[0]);
    Ok(Base { model: recipe.model.model(vocab), weights, tokenizer: dir.join(TOKENIZER_FILE) })
}

/// A Hugging Face folder's weights: `model.safetensors`, or the shards its index lists.
fn read_hf_weights(dir: &Path) -> Result<NamedTensors> {
    let read = |name: &str| -> Result<NamedTensors> {
        let path = dir.join(name);
        from_safetensors(&std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    };
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return read("model.safetensors");
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)?;
    let mut files: Vec<&str> = json["weight_map"]
        .as_object()
        .with_context(|| format!("{} has no weight_map", index.display()))?
        .values()
        .filter_map(|v| v.as_str())
        .collect();
    files.sort();
    files.dedup();
    let mut all = NamedTensors::new();
    for file in files {
        all.extend(read(file)?);
    }
    Ok(all)
}

/// A GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A GGUF's tokenizer as a file, where the trainer and the generator read tokenizers from:
/// under the system's temporary folder, named by its content (written again when missing).
fn tokenizer_file(json: &str) -> Result<PathBuf> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    json.hash(&mut hasher);
    let dir = std::env::temp_dir().join("furnace-gguf-tokenizers");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(format!("{:016x}.json", hasher.finish()));
    if !path.is_file() {
        furnace_core::fsutil::atomic_write(&path, json.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(path)
}

/// The recipe with `model.init_from` applied: its `[model]` section becomes the base's model
/// (dropout kept from the recipe) and, unless the recipe names one, the base's tokenizer is used.
/// A `model.max_seq_len` above the base's extends its context where its positions are computed
/// rather than learned (RoPE, ALiBi, T5's relative buckets, Mamba): fine-tuning at a longer
/// length teaches the model the new positions. A smaller one is the base's own (as before).
pub fn with_base(mut recipe: Recipe, base: &Base) -> Result<Recipe> {
    let mut model = base.model.clone().with_dropout(recipe.model.config().dropout());
    let max_seq_len = recipe.model.config().max_seq_len();
    if recipe.model.gives("max_seq_len") && max_seq_len > model.max_seq_len() {
        if model.learned_positions() {
            bail!(
                "model.max_seq_len = {max_seq_len}, but the base {} has a learned table of {} positions, which cannot change; remove model.max_seq_len",
                recipe.model.init_from,
                model.max_seq_len()
            );
        }
        model = model.with_max_seq_len(max_seq_len);
    }
    recipe.model = ModelSection::of(&model, &recipe.model.init_from);
    if recipe.data.tokenizer.is_empty() {
        recipe.data.tokenizer = base.tokenizer.display().to_string();
    }
    Ok(recipe)
}

/// Why a `[model]` section that came from `init_from` is what it is, for messages.
pub fn describe(section: &ModelSection) -> String {
    if section.init_from.is_empty() {
        format!("{}", section.arch())
    } else {
        format!("{} from {}", section.arch(), section.init_from)
    }
}
