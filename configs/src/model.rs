//! The `[model]` section. Its keys are the architecture's own configuration
//! (`furnace_core::arch`): `arch` picks which, `flavor` fills the sizes a recipe leaves unset,
//! and `init_from` names the weights to start from.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use furnace_core::arch::{Arch, Flavor, KeyError, ModelConfig};
use furnace_core::schema::OptionDoc;

/// The model a recipe describes: the keys it gave, and the configuration they make.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSection {
    arch: Arch,
    flavor: Flavor,
    /// Start from these weights instead of a random init (see `options`).
    pub init_from: String,
    /// The architecture's keys as the recipe gave them (what the recipe writes back).
    given: toml::Table,
    config: ModelConfig,
    /// Why the keys make no model, reported by the recipe check with the key's line.
    problem: Option<KeyError>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self::new(Arch::Llama, Flavor::Tiny, toml::Table::new(), String::new())
    }
}

impl ModelSection {
    /// The section of `arch` and `flavor` with these keys given.
    pub fn new(arch: Arch, flavor: Flavor, given: toml::Table, init_from: String) -> Self {
        // As JSON, a NaN is null: the recipe check's finiteness test names it first.
        let keys = match serde_json::to_value(&given) {
            Ok(Value::Object(keys)) => keys,
            _ => Map::new(),
        };
        let (config, problem) = match ModelConfig::from_keys(arch, flavor, &keys) {
            Ok(config) => (config, None),
            Err(problem) => (ModelConfig::from_keys(arch, flavor, &Map::new()).expect("the defaults make a model"), Some(problem)),
        };
        ModelSection { arch, flavor, init_from, given, config, problem }
    }

    /// A section giving every key of `config`, as a run started from `init_from` stores the
    /// model it loaded.
    pub fn of(config: &ModelConfig, init_from: &str) -> Self {
        let mut given = toml::Table::try_from(config.keys()).expect("a model's keys are a table");
        if config.vocab_size() == 0 {
            given.remove("vocab_size");
        }
        Self::new(config.arch(), Flavor::Tiny, given, init_from.to_string())
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The model's configuration; its vocabulary is 0 while it follows the tokenizer.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model for a tokenizer of `tokenizer_vocab` tokens, which fills an unset vocab_size.
    pub fn model(&self, tokenizer_vocab: Option<usize>) -> ModelConfig {
        match self.config.vocab_size() {
            0 => self.config.clone().with_vocab_size(tokenizer_vocab.unwrap_or(512)),
            _ => self.config.clone(),
        }
    }

    /// model.vocab_size, when the recipe (or its flavor) sets one.
    pub fn vocab_size(&self) -> Option<usize> {
        Some(self.config.vocab_size()).filter(|&v| v > 0)
    }

    /// Whether the recipe gave `key`.
    pub fn gives(&self, key: &str) -> bool {
        self.given.contains_key(key)
    }

    /// The section of a recipe a checkpoint stored. Furnace wrote every architecture's keys into
    /// the recipes it stored before each architecture had its own (2026-12-07); the keys this
    /// architecture lacks are dropped, as they were then ignored.
    pub(crate) fn stored(self) -> Self {
        let own = ModelConfig::options(self.arch);
        let given = self.given.into_iter().filter(|(key, _)| own.iter().any(|o| o.key == key.as_str())).collect();
        let section = Self::new(self.arch, self.flavor, given, self.init_from);
        let unread = self.problem.filter(|p| ["arch", "flavor", "init_from"].contains(&p.key.as_str()));
        Self { problem: unread.or(section.problem), ..section }
    }

    pub(crate) fn problem(&self) -> Option<&KeyError> {
        self.problem.as_ref()
    }

    /// Every key a `[model]` section may hold, over all architectures.
    pub fn keys() -> Vec<&'static str> {
        let mut keys = vec!["arch", "flavor", "init_from"];
        for &arch in Arch::ALL {
            keys.extend(ModelConfig::options(arch).iter().map(|o| o.key).filter(|k| !keys.contains(k)).collect::<Vec<_>>());
        }
        keys
    }

    /// The section's own keys, documented (the architectures' keys are `ModelConfig::options`).
    pub fn options() -> Vec<OptionDoc> {
        vec![
            OptionDoc {
                key: "arch",
                ty: "Arch",
                doc: "Model family: llama (RMSNorm, RoPE, SwiGLU, no bias), gpt2 (LayerNorm, learned positions,\n\
                      GELU, bias), mamba (selective state-space blocks), mixtral (llama with each MLP a sparse\n\
                      mixture of SwiGLU experts), bert (an encoder trained with the masked-LM objective; the\n\
                      tokenizer then needs a `[MASK]` token) or t5 (an encoder-decoder, as transformers'\n\
                      T5ForConditionalGeneration). Each takes its own keys, listed below.\n",
            },
            OptionDoc { key: "flavor", ty: "Flavor", doc: "Size preset: tiny, quickstart, small, gpt2-124m. Keys given override it.\n" },
            OptionDoc {
                key: "init_from",
                ty: "String",
                doc: "Start from these weights instead of a random init: a Furnace run or checkpoint folder,\n\
                      a Hugging Face model folder (config.json, safetensors, tokenizer.json), or a GGUF file\n\
                      in llama.cpp's llama layout (Llama, Mixtral; f32/f16/q8_0/q4_0, dequantized). The\n\
                      architecture and the tokenizer then come from that folder, and the other [model]\n\
                      keys are not used, but dropout and a max_seq_len above the base's: a base whose\n\
                      positions are computed (RoPE, ALiBi, T5, Mamba) takes the longer context, learned\n\
                      positions refuse it.\n",
            },
        ]
    }
}

impl Serialize for ModelSection {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut table = toml::Table::new();
        table.insert("arch".into(), self.arch.to_string().into());
        table.insert("flavor".into(), self.flavor.to_string().into());
        table.extend(self.given.clone());
        table.insert("init_from".into(), self.init_from.clone().into());
        table.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ModelSection {
    /// Never fails on the keys: what is wrong with them is kept for the recipe check, which
    /// reports it with the key's line and a fix.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut given = toml::Table::deserialize(deserializer)?;
        let mut problem = None;
        let arch = take(&mut given, "arch", &mut problem).unwrap_or(Arch::Llama);
        let flavor = take(&mut given, "flavor", &mut problem).unwrap_or(Flavor::Tiny);
        let init_from = take(&mut given, "init_from", &mut problem).unwrap_or_default();
        let mut section = ModelSection::new(arch, flavor, given, init_from);
        section.problem = problem.or(section.problem);
        Ok(section)
    }
}

/// `key` taken out of `given` and read, or the first problem noted.
fn take<T: serde::de::DeserializeOwned>(given: &mut toml::Table, key: &str, problem: &mut Option<KeyError>) -> Option<T> {
    given
        .remove(key)?
        .try_into()
        .map_err(|e| {
            problem.get_or_insert_with(|| KeyError::new(key, e.to_string(), "see `furnace recipe explain` for the accepted values"))
        })
        .ok()
}
