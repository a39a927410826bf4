use std::fmt;

use crate::schema::Section;
use crate::*;

/// A recipe problem: which file, which line (when known), which key, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipeError {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "recipe error in {}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ", key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)?;
        if !self.fix.is_empty() {
            write!(f, "\n  fix: {}", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for RecipeError {}

impl RecipeError {
    pub(crate) fn from_toml(file: &str, text: &str, err: &toml::de::Error) -> Self {
        let line = err.span().map(|span| line_of_offset(text, span.start));
        let key = err
            .span()
            .map(|span| {
                let spanned = text[span.clone()].split('=').next().unwrap_or("").trim();
                // A bad value (an unknown choice, a wrong type) is spanned by the value: name
                // its line's key within its section instead.
                let is_value =
                    spanned.starts_with(['"', '\'', '[', '{']) || spanned.parse::<f64>().is_ok() || ["true", "false"].contains(&spanned);
                // A duplicated key is spanned by part of its name only.
                if is_value || err.message().starts_with("duplicate key") {
                    key_at(text, span.start).unwrap_or_else(|| spanned.to_string())
                } else {
                    spanned.to_string()
                }
            })
            .filter(|k| k.len() < 60 && !k.contains('\n'))
            .unwrap_or_default();
        RecipeError {
            file: file.into(),
            line,
            key,
            message: err.message().to_string(),
            fix: "see `furnace recipe explain` for every section, key, type and accepted value".into(),
        }
    }
}

/// `section.key` of the `key = value` line holding byte `offset`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let key = text[line_start..].split('=').next()?.trim();
    let section =
        before[..line_start].lines().rev().map(str::trim).find(|l| l.starts_with('['))?.trim_matches(|c| c == '[' || c == ']').trim();
    Some(format!("{section}.{key}"))
}

pub(crate) fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Line of `key = ...` inside `[section]`, for errors found after parsing.
pub(crate) fn line_of_key(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_section = trimmed.trim_matches(|c| c == '[' || c == ']').trim() == section;
            continue;
        }
        if in_section && trimmed.split('=').next().map(str::trim) == Some(key) {
            return Some(i + 1);
        }
    }
    None
}

fn section_keys(section: &str) -> Option<Vec<&'static str>> {
    fn keys<S: Section>() -> Vec<&'static str> {
        S::options().iter().map(|o| o.key).collect()
    }
    Some(match section {
        "run" => keys::<RunSection>(),
        "model" => ModelSection::keys(),
        "data" => keys::<DataSection>(),
        "training" => keys::<TrainingSection>(),
        "optimizer" => keys::<OptimizerSection>(),
        "lr_scheduler" => keys::<LrSchedulerSection>(),
        "runtime" => keys::<RuntimeSection>(),
        "distributed" => keys::<DistributedSection>(),
        "activation_checkpoint" => keys::<ActivationCheckpointSection>(),
        "logging" => keys::<LoggingSection>(),
        "eval" => keys::<EvalSection>(),
        "lora" => keys::<LoraSection>(),
        "dpo" => keys::<DpoSection>(),
        "grpo" => keys::<GrpoSection>(),
        "ppo" => keys::<PpoSection>(),
        _ => return None,
    })
}

pub(crate) const SECTIONS: &[&str] = &[
    "run",
    "model",
    "data",
    "training",
    "optimizer",
    "lr_scheduler",
    "runtime",
    "distributed",
    "activation_checkpoint",
    "logging",
    "eval",
    "lora",
    "dpo",
    "grpo",
    "ppo",
];

/// Apply one `section.key=value` override; returns `section.key`. The value is read as TOML
/// (`3e-4`, `true`, `["+"]`), and as a plain string when it is not valid TOML (`llama`).
pub(crate) fn apply_override(table: &mut toml::Table, item: &str, file: &str) -> Result<String, RecipeError> {
    let err = |key: &str, message: String, fix: String| RecipeError {
        file: file.into(),
        line: None,
        key: key.into(),
        message: format!("in --set {item}: {message}"),
        fix,
    };
    let (path, raw) =
        item.split_once('=').ok_or_else(|| err("", "expected section.key=value".into(), "write e.g. --set training.lr=1e-4".into()))?;
    let path = path.trim();
    let (section, key) =
        path.split_once('.').ok_or_else(|| err(path, "expected section.key".into(), format!("sections are: {}", SECTIONS.join(", "))))?;
    let keys = section_keys(section)
        .ok_or_else(|| err(path, format!("unknown section `{section}`"), format!("sections are: {}", SECTIONS.join(", "))))?;
    if !keys.contains(&key) {
        return Err(err(path, format!("unknown key `{key}` in [{section}]"), format!("keys of [{section}] are: {}", keys.join(", "))));
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let section_table =
        table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut().expect("recipe sections are tables");
    section_table.insert(key.to_string(), value);
    Ok(path.to_string())
}
