//! Chat data for supervised fine-tuning: conversations in the OpenAI / Hugging Face shape
//! (`{"messages": [{"role": ..., "content": ...}, ...]}`), rendered by a Jinja chat template
//! (the Hugging Face `chat_template` string, run by minijinja), tokenized with a label mask that
//! keeps only the assistant's tokens, as TRL's assistant-only loss does.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use furnace_configs::{DataSection, DataSource, Recipe};

use crate::corpus::{arithmetic_config, val_seed};
use crate::generators::{arithmetic_conversations, arithmetic_preferences};
use crate::inputs::{for_each_record, Input};
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

pub type Conversation = Vec<Message>;

/// The template used when neither the recipe nor the base model's tokenizer_config.json has
/// one: Zephyr's shape, each turn closed by the end-of-text token (so generation stops on it).
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// A compiled chat template with the tokenizer's special tokens bound, as transformers'
/// `apply_chat_template` renders it (`messages`, `add_generation_prompt`, `bos_token`,
/// `eos_token`, `raise_exception`).
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, tokenizer: &TextTokenizer) -> Result<Self, String> {
        let mut env = Environment::new();
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned("chat", source.to_string()).map_err(|e| format!("the chat template does not parse: {e}"))?;
        let eos_token = tokenizer.decode_special(tokenizer.eos());
        Ok(Self { env, bos_token: eos_token.clone(), eos_token })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(context! { messages => messages, add_generation_prompt => add_generation_prompt, bos_token => &self.bos_token, eos_token => &self.eos_token })
            .map_err(|e| format!("the chat template failed: {e}"))
    }
}

/// A tokenized conversation: tokens, and for each token whether the loss counts it.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledTokens {
    pub tokens: Vec<u32>,
    pub trained: Vec<bool>,
}

/// Render and tokenize `conversation`, marking the tokens of every assistant turn (its content
/// and whatever the template closes the turn with) as trained and all others as context.
/// A turn's span runs from the end of the prompt the template renders for it
/// (`add_generation_prompt`) to the end of the text with the turn included.
pub fn label_conversation(template: &ChatTemplate, tokenizer: &TextTokenizer, conversation: &[Message]) -> Result<LabeledTokens, String> {
    let full = template.render(conversation, false)?;
    let mut spans = Vec::new();
    for (i, message) in conversation.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
        let prompt = template.render(&conversation[..i], true)?;
        let with_turn = template.render(&conversation[..=i], false)?;
        if !full.starts_with(&with_turn) || !with_turn.starts_with(&prompt) {
            return Err(format!(
                "the chat template does not render conversations incrementally (turn {i}, {:?}); assistant tokens cannot be located",
                message.content.chars().take(30).collect::<String>()
            ));
        }
        spans.push(prompt.len()..with_turn.len());
    }
    let (tokens, offsets) = tokenizer.encode_with_offsets(&full);
    let trained = offsets.iter().map(|&(start, _)| spans.iter().any(|s| s.contains(&start))).collect();
    Ok(LabeledTokens { tokens, trained })
}

/// Conversations of a JSONL, JSON or Parquet file, one `{"messages": [...]}` record each. A
/// malformed record is an error naming the file and line (or row), or, with `skip_bad`, skipped
/// and counted.
pub fn read_conversations(path: &Path, skip_bad: bool) -> Result<(Vec<Conversation>, usize), String> {
    #[derive(Deserialize)]
    struct Line {
        messages: Conversation,
    }
    let (lines, mut skipped) = read_records::<Line>(path, skip_bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, ...]}")?;
    let mut conversations = Vec::with_capacity(lines.len());
    for line in lines {
        match line.messages.is_empty() {
            false => conversations.push(line.messages),
            true if skip_bad => skipped += 1,
            true => return Err(format!("{}: a line has empty \"messages\"", path.display())),
        }
    }
    Ok((conversations, skipped))
}

/// SFT data for a recipe: train and validation conversations, labelled. `template` renders
/// them; the tokenizer is the base model's. Returns (train, val, malformed lines skipped).
pub fn prepare_sft(
    recipe: &Recipe,
    template: &ChatTemplate,
    tokenizer: &TextTokenizer,
) -> Result<(Vec<LabeledTokens>, Vec<LabeledTokens>, usize), String> {
    let d = &recipe.data;
    let seed = recipe.run.seed;
    let mut skipped = 0;
    let (train, val) = match d.source {
        DataSource::ArithmeticChat => {
            let config = arithmetic_config(d);
            (
                arithmetic_conversations(&config, d.num_examples, seed, false),
                arithmetic_conversations(&config, d.num_val_examples, val_seed(seed), true),
            )
        }
        DataSource::Chat => {
            let (train, val, bad) = read_train_and_val(d, read_conversations)?;
            skipped = bad;
            (train, val)
        }
        other => return Err(format!("data.source = \"{other}\" is not chat data")),
    };
    let label = |conversations: Vec<Conversation>| -> Result<Vec<LabeledTokens>, String> {
        conversations.iter().map(|c| label_conversation(template, tokenizer, c)).collect()
    };
    Ok((label(train)?, label(val)?, skipped))
}

/// A preference pair in TRL's standard form: a prompt, the preferred and the dispreferred reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preference {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

impl Preference {
    /// The two conversations: the prompt as a user turn, each reply as the assistant's.
    fn conversations(&self) -> [Conversation; 2] {
        let user = Message { role: "user".into(), content: self.prompt.clone() };
        let reply = |content: &str| vec![user.clone(), Message { role: "assistant".into(), content: content.into() }];
        [reply(&self.chosen), reply(&self.rejected)]
    }
}

/// A labelled preference pair: the chosen and the rejected conversation.
pub type LabeledPair = (LabeledTokens, LabeledTokens);

/// JSONL lines of the form `{"prompt": ..., "chosen": ..., "rejected": ...}`; malformed lines as
/// in [`read_conversations`].
pub fn read_preferences(path: &Path, skip_bad: bool) -> Result<(Vec<Preference>, usize), String> {
    read_records(path, skip_bad, "{\"prompt\": \"...\", \"chosen\": \"...\", \"rejected\": \"...\"}")
}

/// DPO data for a recipe, labelled like SFT data: (train pairs, val pairs, malformed lines skipped).
pub fn prepare_preferences(
    recipe: &Recipe,
    template: &ChatTemplate,
    tokenizer: &TextTokenizer,
) -> Result<(Vec<LabeledPair>, Vec<LabeledPair>, usize), String> {
    let d = &recipe.data;
    let seed = recipe.run.seed;
    let mut skipped = 0;
    let (train, val) = match d.source {
        DataSource::ArithmeticPreferences => {
            let config = arithmetic_config(d);
            (
                arithmetic_preferences(&config, d.num_examples, seed, false),
                arithmetic_preferences(&config, d.num_val_examples, val_seed(seed), true),
            )
        }
        DataSource::Preferences => {
            let (train, val, bad) = read_train_and_val(d, read_preferences)?;
            skipped = bad;
            (train, val)
        }
        other => return Err(format!("data.source = \"{other}\" is not preference data")),
    };
    let label = |pairs: Vec<Preference>| -> Result<Vec<LabeledPair>, String> {
        pairs
            .iter()
            .map(|p| {
                let [chosen, rejected] = p.conversations();
                Ok((label_conversation(template, tokenizer, &chosen)?, label_conversation(template, tokenizer, &rejected)?))
            })
            .collect()
    };
    Ok((label(train)?, label(val)?, skipped))
}

/// The items of `data.files` and `data.val_files` (files, folders or globs) read by `read`
/// (validation: the val_files' items, else the last `val_fraction` of the training ones), and
/// the malformed records skipped.
pub fn read_train_and_val<T>(
    d: &DataSection,
    read: fn(&Path, bool) -> Result<(Vec<T>, usize), String>,
) -> Result<(Vec<T>, Vec<T>, usize), String> {
    let mut skipped = 0;
    let mut read_all = |files: &[String], key: &str| -> Result<Vec<T>, String> {
        let mut all = Vec::new();
        for input in crate::inputs::expand(files, key)? {
            let (items, bad) = read(&input.path, d.skip_bad_lines)?;
            all.extend(items);
            skipped += bad;
        }
        Ok(all)
    };
    let (train, val) = (read_all(&d.files, "data.files")?, read_all(&d.val_files, "data.val_files")?);
    let (train, val) = split_off_val(train, val, d.val_fraction);
    Ok((train, val, skipped))
}

/// Validation items: the given ones, else the last `fraction` of the training items.
fn split_off_val<T>(mut train: Vec<T>, val: Vec<T>, fraction: f64) -> (Vec<T>, Vec<T>) {
    if !val.is_empty() {
        return (train, val);
    }
    let held = ((train.len() as f64 * fraction).ceil() as usize).max(1).min(train.len().saturating_sub(1));
    let val = train.split_off(train.len() - held);
    (train, val)
}

/// Items of a JSONL, JSON or Parquet file (compressed or not), one record each; `shape`
/// describes a record in errors.
pub(crate) fn read_records<T: serde::de::DeserializeOwned>(path: &Path, skip_bad: bool, shape: &str) -> Result<(Vec<T>, usize), String> {
    let input = Input::new(path.to_path_buf());
    let (mut items, mut skipped) = (Vec::new(), 0);
    for_each_record(&input, &Default::default(), &mut |found, at| {
        match found.and_then(|record| serde_json::from_value::<T>(record).map_err(|e| e.to_string())) {
            Ok(item) => items.push(item),
            Err(_) if skip_bad => skipped += 1,
            Err(e) => return Err(format!("{at}: malformed record ({e}); expected {shape} (or set data.skip_bad_lines = true)")),
        }
        Ok(())
    })?;
    Ok((items, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> TextTokenizer {
        let docs: Vec<String> = (0..200).map(|i| format!("What is {i}+{}? The answer is {}.", i * 3, i * 4)).collect();
        TextTokenizer::train(&docs, 320, crate::tokenizer::ExtraTokens::None).unwrap()
    }

    fn message(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn only_assistant_turns_are_trained() {
        let tok = tokenizer();
        let template = ChatTemplate::new(DEFAULT_CHAT_TEMPLATE, &tok).unwrap();
        let conversation = vec![
            message("system", "Be brief."),
            message("user", "What is 2+3?"),
            message("assistant", "5"),
            message("user", "And 4+4?"),
            message("assistant", "8"),
        ];
        let labeled = label_conversation(&template, &tok, &conversation).unwrap();
        let trained: Vec<u32> = labeled.tokens.iter().zip(&labeled.trained).filter(|(_, t)| **t).map(|(id, _)| *id).collect();
        let text = tok.decode(&trained);
        assert_eq!(text.replace('\n', ""), "58", "assistant content plus its end-of-turn token: {text:?}");
        assert_eq!(trained.iter().filter(|&&id| id == tok.eos()).count(), 2, "each assistant turn ends with eos");
        assert_eq!(labeled.tokens.len(), labeled.trained.len());
    }

    #[test]
    fn hugging_face_templates_render_with_their_variables() {
        let tok = tokenizer();
        let llama3_like = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('roles must be user or assistant') }}{% endif %}<|start|>{{ m.role }}\n\n{{ m.content | trim }}<|eot|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n\n{% endif %}";
        let template = ChatTemplate::new(llama3_like, &tok).unwrap();
        let text = template.render(&[message("user", " hi ")], true).unwrap();
        assert_eq!(text, "<|endoftext|><|start|>user\n\nhi<|eot|><|start|>assistant\n\n");
        let err = template.render(&[message("tool", "x")], false).unwrap_err();
        assert!(err.contains("roles must be user or assistant"), "{err}");
        let labeled = label_conversation(&template, &tok, &[message("user", "hi"), message("assistant", "yo")]).unwrap();
        let trained: Vec<u32> = labeled.tokens.iter().zip(&labeled.trained).filter(|(_, t)| **t).map(|(id, _)| *id).collect();
        assert_eq!(tok.decode(&trained), "yo<|eot|>");
    }

    #[test]
    fn conversations_read_from_parquet_as_from_jsonl() {
        // Written by pyarrow (scripts/reference/make_data_fixtures.py): a `messages` column.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data/chat.parquet");
        let (conversations, skipped) = read_conversations(&path, false).unwrap();
        assert_eq!((conversations.len(), skipped), (5, 0));
        assert_eq!(conversations[2], [message("user", "What is 2 + 2?"), message("assistant", "4")]);
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.jsonl");
        std::fs::write(&path, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n{\"text\": \"no messages\"}\n").unwrap();
        let err = read_conversations(&path, false).unwrap_err();
        assert!(err.contains("chat.jsonl:2"), "{err}");
        assert_eq!(read_conversations(&path, true).unwrap().1, 1);
    }
}
