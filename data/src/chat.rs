//! Chat data for supervised fine-tuning: conversations in the OpenAI / Hugging Face shape
//! (`{"messages": [{"role": ..., "content": ...}, ...]}`), rendered by a Jinja chat template
//! (the Hugging Face `chat_template` string, run by minijinja), tokenized with a label mask that
//! keeps only the assistant's tokens, as TRL's assistant-only loss does.

use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use furnace_configs::{DataSection, DataSource, Recipe};

use crate::corpus::{arithmetic_config, val_seed};
use crate::generators::{arithmetic_conversations, arithmetic_preferences, arithmetic_tool_conversations};
use crate::inputs::{for_each_record, Input};
use crate::tokenizer::TextTokenizer;

/// One turn, in the shape transformers' chat templates read: `role`, `content`, and for tool
/// use the assistant's `tool_calls` and a `tool` turn's `tool_call_id` / `name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    /// The text; an assistant turn that only calls tools has none (`null` reads as empty).
    #[serde(default, deserialize_with = "text_or_null")]
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None, name: None }
    }
}

fn text_or_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_default())
}

/// A call the assistant makes, as transformers' templates take it: `arguments` is a JSON object
/// (OpenAI's API carries it as a string; the server parses it before rendering).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: Value,
}

fn function_type() -> String {
    "function".into()
}

/// A conversation and the tools its assistant may call (OpenAI's tool definitions,
/// `{"type": "function", "function": {"name", "description", "parameters"}}`), as a line of a
/// chat dataset holds them: `{"messages": [...], "tools": [...]}` (TRL's `tools` column).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Conversation {
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Value>,
}

impl Conversation {
    pub fn new(messages: Vec<Message>) -> Self {
        Self { messages, tools: Vec::new() }
    }
}

/// What opens and closes a tool call in the text of an assistant turn (Hermes' format, which
/// Qwen 2.5 and many others share): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
pub const TOOL_CALL_OPEN: &str = "<tool_call>";
pub const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// The template used when neither the recipe nor the base model's tokenizer_config.json has
/// one: Zephyr's shape, each turn closed by the end-of-text token (so generation stops on it).
/// With tools, a `<|tools|>` turn lists each as `name(parameter, ...)` (short, for small
/// models); an assistant's calls are written as compact JSON between `<tool_call>` tags.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% if tools %}<|tools|>\n{% for tool in tools %}{{ tool.function.name }}({{ tool.function.parameters.properties | join(', ') }})\n{% endfor %}{{ eos_token }}\n{% endif %}{% for message in messages %}<|{{ message.role }}|>\n{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>{\"name\":{{ call.function.name | tojson }},\"arguments\":{{ call.function.arguments | tojson(separators=(',', ':')) }}}</tool_call>{% endfor %}{% else %}{{ message.content }}{% endif %}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// A compiled chat template with the tokenizer's special tokens bound, rendered as transformers'
/// `apply_chat_template` renders it: its Jinja settings (`trim_blocks`, `lstrip_blocks`), its
/// `tojson` (Python's `json.dumps`), and its variables (`messages`, `tools`,
/// `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`).
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, tokenizer: &TextTokenizer) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_filter("tojson", python_tojson);
        env.add_template_owned("chat", source.to_string()).map_err(|e| format!("the chat template does not parse: {e}"))?;
        let eos_token = tokenizer.decode_special(tokenizer.eos());
        Ok(Self { env, bos_token: eos_token.clone(), eos_token })
    }

    /// `tools` are given to the template as transformers gives them: none when empty.
    pub fn render(&self, messages: &[Message], tools: &[Value], add_generation_prompt: bool) -> Result<String, String> {
        let template = self.env.get_template("chat").expect("added in new");
        let tools = (!tools.is_empty()).then_some(tools);
        template
            .render(context! { messages, tools, add_generation_prompt, bos_token => &self.bos_token, eos_token => &self.eos_token })
            .map_err(|e| format!("the chat template failed: {e}"))
    }
}

/// transformers' `tojson` filter: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators)` — keys in their order, non-ASCII kept, no HTML escaping, and Python's
/// default separators (`", "` and `": "`; `","` between items when indented).
fn python_tojson(value: minijinja::Value, kwargs: Kwargs) -> Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators is a pair (item, key)")),
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    write_python_json(&json, indent, (&item, &key), 0, &mut out);
    Ok(out)
}

fn write_python_json(value: &Value, indent: Option<usize>, (item, key): (&str, &str), level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
    };
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, level + 1);
                write_python_json(v, indent, (item, key), level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(entries) if !entries.is_empty() => {
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(item);
                }
                newline(out, level + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(key);
                write_python_json(v, indent, (item, key), level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
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
/// Tool calls are assistant turns like any other (trained); tool results are context.
pub fn label_conversation(
    template: &ChatTemplate,
    tokenizer: &TextTokenizer,
    conversation: &Conversation,
) -> Result<LabeledTokens, String> {
    let (messages, tools) = (&conversation.messages, &conversation.tools);
    let full = template.render(messages, tools, false)?;
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
        let prompt = template.render(&messages[..i], tools, true)?;
        let with_turn = template.render(&messages[..=i], tools, false)?;
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

/// Conversations of a JSONL, JSON or Parquet file, one `{"messages": [...]}` record each
/// (`"tools": [...]` beside it when the assistant calls tools). A malformed record is an error
/// naming the file and line (or row), or, with `skip_bad`, skipped and counted.
pub fn read_conversations(path: &Path, skip_bad: bool) -> Result<(Vec<Conversation>, usize), String> {
    let shape = "{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, ...], \"tools\": [...] (optional)}";
    let (lines, mut skipped) = read_records::<Conversation>(path, skip_bad, shape)?;
    let mut conversations = Vec::with_capacity(lines.len());
    for line in lines {
        match line.messages.is_empty() {
            false => conversations.push(line),
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
        DataSource::ArithmeticTools => {
            let config = arithmetic_config(d);
            (
                arithmetic_tool_conversations(&config, d.num_examples, seed, false),
                arithmetic_tool_conversations(&config, d.num_val_examples, val_seed(seed), true),
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
        let user = Message::new("user", self.prompt.clone());
        let reply = |content: &str| Conversation::new(vec![user.clone(), Message::new("assistant", content)]);
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
        Message::new(role, content)
    }

    #[test]
    fn only_assistant_turns_are_trained() {
        let tok = tokenizer();
        let template = ChatTemplate::new(DEFAULT_CHAT_TEMPLATE, &tok).unwrap();
        let conversation = Conversation::new(vec![
            message("system", "Be brief."),
            message("user", "What is 2+3?"),
            message("assistant", "5"),
            message("user", "And 4+4?"),
            message("assistant", "8"),
        ]);
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
        let text = template.render(&[message("user", " hi ")], &[], true).unwrap();
        assert_eq!(text, "<|endoftext|><|start|>user\n\nhi<|eot|><|start|>assistant\n\n");
        let err = template.render(&[message("tool", "x")], &[], false).unwrap_err();
        assert!(err.contains("roles must be user or assistant"), "{err}");
        let labeled =
            label_conversation(&template, &tok, &Conversation::new(vec![message("user", "hi"), message("assistant", "yo")])).unwrap();
        let trained: Vec<u32> = labeled.tokens.iter().zip(&labeled.trained).filter(|(_, t)| **t).map(|(id, _)| *id).collect();
        assert_eq!(tok.decode(&trained), "yo<|eot|>");
    }

    #[test]
    fn conversations_read_from_parquet_as_from_jsonl() {
        // Written by pyarrow (scripts/reference/make_data_fixtures.py): a `messages` column.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data/chat.parquet");
        let (conversations, skipped) = read_conversations(&path, false).unwrap();
        assert_eq!((conversations.len(), skipped), (5, 0));
        assert_eq!(conversations[2].messages, [message("user", "What is 2 + 2?"), message("assistant", "4")]);
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

    fn calculator() -> Value {
        serde_json::json!({"type": "function", "function": {"name": "calculator", "description": "Evaluates arithmetic.",
            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}})
    }

    #[test]
    fn tools_and_tool_calls_render_and_only_the_assistant_turns_train() {
        let tok = tokenizer();
        let template = ChatTemplate::new(DEFAULT_CHAT_TEMPLATE, &tok).unwrap();
        // As a chat dataset holds it: OpenAI's message shape, arguments as a JSON object.
        let line = r#"{"messages": [{"role": "user", "content": "What is 412*37?"},
            {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "412*37"}}}]},
            {"role": "tool", "tool_call_id": "call_0", "content": "15244"},
            {"role": "assistant", "content": "412*37=15244"}]}"#;
        let mut conversation: Conversation = serde_json::from_str(line).unwrap();
        conversation.tools = vec![calculator()];
        let eos = "<|endoftext|>";
        let expected = format!(
            "<|tools|>\ncalculator(expression)\n{eos}\n<|user|>\nWhat is 412*37?{eos}\n<|assistant|>\n<tool_call>{{\"name\":\"calculator\",\"arguments\":{{\"expression\":\"412*37\"}}}}</tool_call>{eos}\n<|tool|>\n15244{eos}\n<|assistant|>\n412*37=15244{eos}\n"
        );
        assert_eq!(template.render(&conversation.messages, &conversation.tools, false).unwrap(), expected);
        // Without tools the template renders exactly as before tools existed.
        let plain = template.render(&conversation.messages[..1], &[], true).unwrap();
        assert_eq!(plain, format!("<|user|>\nWhat is 412*37?{eos}\n<|assistant|>\n"));
        let labeled = label_conversation(&template, &tok, &conversation).unwrap();
        let trained: Vec<u32> = labeled.tokens.iter().zip(&labeled.trained).filter(|(_, t)| **t).map(|(id, _)| *id).collect();
        assert_eq!(
            tok.decode_keeping_special(&trained),
            format!(
                "<tool_call>{{\"name\":\"calculator\",\"arguments\":{{\"expression\":\"412*37\"}}}}</tool_call>{eos}\n412*37=15244{eos}\n"
            ),
            "the call and the final answer train; the tool's result does not"
        );
    }

    /// Zephyr's template as its model card ships it: every block tag on its own line, which only
    /// transformers' `trim_blocks` / `lstrip_blocks` keep out of the text.
    const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

    /// A Hermes-style tool template (the shape of Qwen 2.5's): tools as `tojson` lines, calls with
    /// their arguments through `tojson`, tool results as user turns.
    const HERMES_TOOLS: &str = r##"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- for call in message.tool_calls %}
            {{- '\n<tool_call>\n{"name": "' + call.function.name + '", "arguments": ' + call.function.arguments | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"##;

    /// Every template × conversation × generation prompt, rendered by Furnace and by transformers'
    /// `apply_chat_template` (scripts/reference/check_chat_template.py): the same text.
    #[test]
    fn templates_render_as_transformers_apply_chat_template() {
        let tok = tokenizer();
        let config = crate::generators::ArithmeticConfig { digits: 3, operators: vec!['+', '-', '*'] };
        let mut tool_use = crate::generators::arithmetic_tool_conversations(&config, 1, 3, false).remove(0);
        tool_use.messages.insert(0, message("system", "Use the tools. Ünïcode & <tags> stay as they are."));
        let nested = serde_json::json!({"type": "function", "function": {"name": "plot", "parameters": {"type": "object",
            "properties": {"points": {"type": "array", "items": {"type": "number"}}, "style": {"enum": ["a", "b"]}}}}});
        tool_use.tools.push(nested);
        let plain = Conversation::new(vec![message("system", "Be brief."), message("user", "What is 2+3?"), message("assistant", "5")]);
        let mut cases = Vec::new();
        for source in [DEFAULT_CHAT_TEMPLATE, ZEPHYR, HERMES_TOOLS] {
            let template = ChatTemplate::new(source, &tok).unwrap();
            for conversation in [&plain, &tool_use] {
                if source == ZEPHYR && !conversation.tools.is_empty() {
                    continue;
                }
                for (end, add_generation_prompt) in [(conversation.messages.len(), false), (2, true)] {
                    let messages = &conversation.messages[..end];
                    let rendered = template.render(messages, &conversation.tools, add_generation_prompt).unwrap();
                    let tools = (!conversation.tools.is_empty()).then_some(&conversation.tools);
                    cases.push(serde_json::json!({"template": source, "messages": messages, "tools": tools,
                        "add_generation_prompt": add_generation_prompt, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "rendered": rendered}));
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("renderings.json");
        std::fs::write(&path, serde_json::to_string(&cases).unwrap()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/reference/check_chat_template.py");
        let check = std::process::Command::new("python3").arg(script).arg(&path).output().unwrap();
        let report = String::from_utf8_lossy(&check.stdout);
        assert!(check.status.success(), "{report}{}", String::from_utf8_lossy(&check.stderr));
        assert!(report.contains(&format!("{n} of {n} renderings equal", n = cases.len())), "{report}");
    }
}
