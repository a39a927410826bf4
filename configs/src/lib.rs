//! The Furnace recipe: a TOML file of sections (see `recipe.rs`), read with unknown keys
//! rejected, overridden from the command line with `--set section.key=value`, validated before
//! any work starts, and its `[model]` section read into the architecture's configuration (`furnace_core::arch`).

pub mod capabilities;
pub mod recipe;

mod error;
mod explain;
mod model;
mod validate;

use std::path::{Path, PathBuf};

pub use error::RecipeError;
pub use explain::explain;
pub use furnace_core::schema;
pub use recipe::*;

impl Recipe {
    /// Read a recipe file, apply `section.key=value` overrides, and validate the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError {
            file: file.clone(),
            line: None,
            key: String::new(),
            message: format!("cannot read the recipe: {e}"),
            fix: "pass an existing TOML file with --config (see recipes/ for examples)".into(),
        })?;
        Self::from_toml(&text, &file, overrides)
    }

    /// Parse recipe text; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str, overrides: &[String]) -> Result<Recipe, RecipeError> {
        let recipe: Recipe = toml::from_str(text).map_err(|e| RecipeError::from_toml(file, text, &e))?;
        let recipe = if overrides.is_empty() {
            recipe
        } else {
            let mut table = toml::Table::try_from(&recipe).expect("a recipe always serializes");
            let mut applied = recipe;
            // Read after each override, so a value of the wrong type is named by its key.
            for item in overrides {
                let key = error::apply_override(&mut table, item, file)?;
                applied = Recipe::deserialize_value(table.clone(), file, item, &key)?;
            }
            applied
        };
        validate::validate(&recipe, file, text, true)?;
        Ok(recipe)
    }

    /// Parse the recipe a checkpoint stored. Its data files may have moved since training,
    /// so only values are checked, not that files exist.
    pub fn from_stored(text: &str, file: &str) -> Result<Recipe, RecipeError> {
        let recipe: Recipe = toml::from_str(text).map_err(|e| RecipeError::from_toml(file, text, &e))?;
        validate::validate(&recipe, file, text, false)?;
        Ok(recipe)
    }

    /// Parse the recipe a checkpoint stored, written by this or an earlier Furnace: as
    /// `from_stored`, with the `[model]` keys its architecture lacks dropped (see
    /// `ModelSection::stored`).
    pub fn from_checkpoint(text: &str, file: &str) -> Result<Recipe, RecipeError> {
        let recipe: Recipe = toml::from_str(text).map_err(|e| RecipeError::from_toml(file, text, &e))?;
        let recipe = Recipe { model: recipe.model.stored(), ..recipe };
        validate::validate(&recipe, file, text, false)?;
        Ok(recipe)
    }

    fn deserialize_value(table: toml::Table, file: &str, item: &str, key: &str) -> Result<Recipe, RecipeError> {
        use serde::Deserialize;
        Recipe::deserialize(toml::Value::Table(table)).map_err(|e| RecipeError {
            file: file.into(),
            line: None,
            key: key.into(),
            message: format!("in --set {item}: {}", e.to_string().trim()),
            fix: format!("give {key} a value of the type `furnace recipe explain` lists for it"),
        })
    }

    /// The folder this run writes to.
    pub fn output_dir(&self) -> PathBuf {
        if self.run.output_dir.is_empty() {
            PathBuf::from("runs").join(&self.run.name)
        } else {
            PathBuf::from(&self.run.output_dir)
        }
    }

    /// The recipe as TOML, with every default written out (stored in each checkpoint).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a recipe always serializes")
    }

    /// (beta1, beta2, eps) after the chosen optimizer's defaults fill unset values.
    pub fn optimizer_betas_eps(&self) -> (f64, f64, f64) {
        let o = &self.optimizer;
        let (b1, b2, eps) = match o.name {
            OptimizerName::AdamW => (0.9, 0.95, 1e-8),
            OptimizerName::Lion => (0.9, 0.99, 0.0),
            OptimizerName::Sophia => (0.965, 0.99, 1e-12),
        };
        (o.beta1.unwrap_or(b1), o.beta2.unwrap_or(b2), o.eps.unwrap_or(eps))
    }

    /// Tokens consumed by one optimizer step on one rank.
    /// An encoder-decoder trained on (input, target) pairs (seq2seq files or generated
    /// arithmetic); on other data (text) it trains by span corruption.
    pub fn trains_on_pairs(&self) -> bool {
        self.model.arch() == Arch::T5
            && matches!(self.data.source, DataSource::Seq2seq | DataSource::Arithmetic | DataSource::ArithmeticWords)
    }

    /// The vocabulary before a tokenizer exists: model.vocab_size, else the size the tokenizer
    /// will be trained to.
    pub fn planned_vocab_size(&self) -> usize {
        self.model.vocab_size().unwrap_or(self.data.tokenizer_vocab_size)
    }

    pub fn tokens_per_step(&self) -> usize {
        self.training.local_batch_size * self.training.seq_len * self.training.grad_accum_steps
    }
}

#[cfg(test)]
mod tests;
