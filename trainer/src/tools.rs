//! Tool calling: the grammar that holds a reply to the tools' schemas once the model calls one,
//! and the calls read back out of the reply's text (whole, or as far as a stream has come).
//! Calls are written in Hermes' format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
//! as Furnace's default chat template renders them; a reply is either text or a run of calls.

use serde_json::{json, Value};

use furnace_data::chat::{TOOL_CALL_CLOSE, TOOL_CALL_OPEN};

use crate::structured::Grammar;

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// The model does not call tools: its reply is text.
    None,
    /// The model replies with text or calls.
    Auto,
    /// The model calls one or more tools.
    Required,
    /// The model calls this function.
    Function(String),
}

/// The tools a reply may call (OpenAI's definitions), how, and whether several calls may
/// follow one another (`parallel_tool_calls`).
#[derive(Debug, Clone)]
pub struct Tools {
    pub definitions: Vec<Value>,
    pub choice: ToolChoice,
    pub parallel: bool,
}

impl Tools {
    /// Each tool's name, checked: a definition is `{"type": "function", "function": {"name",
    /// "description"?, "parameters"?}}` with a unique name of letters, digits, `_` and `-`.
    pub fn names(definitions: &[Value]) -> Result<Vec<String>, String> {
        let mut names: Vec<String> = Vec::new();
        for (i, tool) in definitions.iter().enumerate() {
            let function = match (tool.get("type").and_then(Value::as_str), tool.get("function")) {
                (Some("function"), Some(function)) if function.is_object() => function,
                _ => {
                    return Err(format!(
                        "tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": {{...}}}}}}"
                    ))
                }
            };
            let name = function.get("name").and_then(Value::as_str).unwrap_or_default();
            if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(format!("tools[{i}].function.name `{name}` must be 1 to 64 letters, digits, `_` or `-`"));
            }
            if names.iter().any(|n| n == name) {
                return Err(format!("tools[{i}]: two tools are named `{name}`"));
            }
            if function.get("parameters").is_some_and(|p| !p.is_object()) {
                return Err(format!("tools[{i}].function.parameters must be a JSON Schema object"));
            }
            names.push(name.to_string());
        }
        Ok(names)
    }

    /// The grammar of a reply: under `auto`, text that does not open a call, or calls; under
    /// `required` or a named function, calls only. Each call's JSON is one of the tools' (its
    /// `name` and `arguments` valid under its parameters' schema). None under `none`.
    pub fn grammar(&self) -> Option<Grammar> {
        let calls: Vec<Value> = self
            .definitions
            .iter()
            .filter_map(|tool| tool.get("function"))
            .filter(|f| match &self.choice {
                ToolChoice::Function(name) => f.get("name").and_then(Value::as_str) == Some(name),
                _ => true,
            })
            .map(|f| {
                let parameters = f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f["name"]}, "arguments": parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = json!({"x-guidance": {"whitespace_flexible": false}, "anyOf": calls});
        let call = format!("call: \"{TOOL_CALL_OPEN}\" %json {schema} \"{TOOL_CALL_CLOSE}\"\n");
        // A named function is called once, as OpenAI's `tool_choice` names it.
        let several = self.parallel && !matches!(self.choice, ToolChoice::Function(_));
        let calls = if several { "calls: call+\n" } else { "calls: call\n" };
        let start = match self.choice {
            ToolChoice::None => return None,
            ToolChoice::Auto => format!("start: TEXT | calls\nTEXT: /{}/\n", not_starting_with(TOOL_CALL_OPEN)),
            ToolChoice::Required | ToolChoice::Function(_) => "start: calls\n".to_string(),
        };
        Some(Grammar::Lark(format!("{start}{calls}{call}")))
    }
}

/// A regular expression for every text that does not begin with `prefix` (the empty text and
/// the prefix's own proper beginnings included).
fn not_starting_with(prefix: &str) -> String {
    // Only the regex syntax's own characters: `\<` and `\>` are word boundaries there.
    let escape = |c: char| if "\\.+*?()|[]{}^$#&-~/".contains(c) { format!("\\{c}") } else { c.to_string() };
    let chars: Vec<char> = prefix.chars().collect();
    let mut alternatives = Vec::new();
    for i in 0..chars.len() {
        let head: String = chars[..i].iter().map(|&c| escape(c)).collect();
        alternatives.push(format!("{head}([^{}](.|\\n)*)?", escape(chars[i])));
    }
    format!("({})", alternatives.join("|"))
}

/// One call as far as the reply's text has written it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallText {
    /// The function's name, once its string is whole.
    pub name: Option<String>,
    /// The JSON text of the arguments written so far (all of it once `complete`).
    pub arguments: String,
    /// The call is closed (`</tool_call>`) and its JSON parses as a call.
    pub complete: bool,
}

/// What a reply's text is so far.
#[derive(Debug, Clone, PartialEq)]
pub enum Scan {
    /// It may still open a call: nothing to show yet.
    Undecided,
    /// Plain text.
    Text,
    /// Calls, the last possibly unfinished.
    Calls(Vec<CallText>),
}

/// Read the calls out of a reply's text, whole or a stream's beginning: the same function
/// serves both, so a streamed reply adds up to the reply sent whole.
pub fn scan(text: &str) -> Scan {
    let body = text.trim_start();
    if !body.starts_with(TOOL_CALL_OPEN) {
        return if TOOL_CALL_OPEN.starts_with(body) { Scan::Undecided } else { Scan::Text };
    }
    let mut calls = Vec::new();
    let mut rest = body;
    while let Some(after_open) = rest.strip_prefix(TOOL_CALL_OPEN) {
        let (json, closed) = match after_open.find(TOOL_CALL_CLOSE) {
            Some(end) => (&after_open[..end], Some(&after_open[end + TOOL_CALL_CLOSE.len()..])),
            None => (after_open, None),
        };
        calls.push(call_text(json, closed.is_some()));
        match closed {
            Some(next) => rest = next.trim_start(),
            None => break,
        }
        if rest.is_empty() || !rest.starts_with(TOOL_CALL_OPEN) && !TOOL_CALL_OPEN.starts_with(rest) {
            break;
        }
    }
    Scan::Calls(calls)
}

/// A call's name and arguments from its JSON, whole (`closed`) or begun.
fn call_text(json: &str, closed: bool) -> CallText {
    let name = value_after_key(json, "name").and_then(|v| serde_json::from_str::<String>(first_json_value(v)?).ok());
    let arguments = value_after_key(json, "arguments").map(|v| first_json_value(v).unwrap_or(v)).unwrap_or_default();
    let parses = serde_json::from_str::<Value>(json.trim()).is_ok_and(|v| v.get("name").is_some_and(Value::is_string));
    let complete = closed && parses && name.is_some() && serde_json::from_str::<Value>(arguments).is_ok_and(|a| a.is_object());
    CallText { name, arguments: arguments.to_string(), complete }
}

/// The text after `"key":` at the top level of a JSON object's beginning.
fn value_after_key<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    for (i, c) in json.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' if in_string => in_string = false,
            '"' => {
                if depth == 1 && json[i..].starts_with(&quoted) {
                    let after = json[i + quoted.len()..].trim_start();
                    if let Some(value) = after.strip_prefix(':') {
                        return Some(value.trim_start());
                    }
                }
                in_string = true;
            }
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The first whole JSON value at the start of `text` (an object, array, string or scalar), or
/// None while it is unfinished.
fn first_json_value(text: &str) -> Option<&str> {
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' if in_string => {
                in_string = false;
                if depth == 0 {
                    return Some(&text[..=i]);
                }
            }
            '"' => in_string = true,
            '{' | '[' if !in_string => depth += 1,
            '}' | ']' if !in_string => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(&text[..=i]);
                }
            }
            ',' | '}' | ']' if depth == 0 => return Some(text[..i].trim_end()),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calculator() -> Value {
        furnace_data::generators::calculator_tool()
    }

    #[test]
    fn calls_are_read_whole_and_as_a_stream_writes_them() {
        let reply = r#"<tool_call>{"name":"calculator","arguments":{"expression":"412*37"}}</tool_call><tool_call>{"name": "add", "arguments": {"a": [1, {"b": "}"}]}}</tool_call>"#;
        let Scan::Calls(calls) = scan(reply) else { panic!("calls") };
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0], CallText { name: Some("calculator".into()), arguments: r#"{"expression":"412*37"}"#.into(), complete: true });
        assert_eq!(calls[1], CallText { name: Some("add".into()), arguments: r#"{"a": [1, {"b": "}"}]}"#.into(), complete: true });
        // Every beginning of the reply: arguments only ever grow, and end as the whole reply's.
        let mut previous: Vec<CallText> = Vec::new();
        for end in (0..=reply.len()).filter(|&e| reply.is_char_boundary(e)) {
            match scan(&reply[..end]) {
                Scan::Undecided => assert!(TOOL_CALL_OPEN.starts_with(&reply[..end])),
                Scan::Text => panic!("a call's beginning read as text at {end}"),
                Scan::Calls(now) => {
                    for (before, after) in previous.iter().zip(&now) {
                        assert!(after.arguments.starts_with(&before.arguments), "{before:?} → {after:?}");
                        assert!(before.name.is_none() || before.name == after.name);
                    }
                    previous = now;
                }
            }
        }
        assert_eq!(previous, calls);
        assert_eq!(scan("The answer is 4."), Scan::Text);
        assert_eq!(scan("<tool"), Scan::Undecided);
        assert_eq!(scan("<tools are fun"), Scan::Text);
        let Scan::Calls(cut) = scan(r#"<tool_call>{"name":"calculator","arguments":{"expr"#) else { panic!() };
        assert_eq!((cut[0].arguments.as_str(), cut[0].complete), (r#"{"expr"#, false));
        let Scan::Calls(bad) = scan(r#"<tool_call>{"name":"calculator","arguments":7}</tool_call>"#) else { panic!() };
        assert!(!bad[0].complete, "arguments must be an object");
    }

    #[test]
    fn definitions_are_checked_by_name_and_shape() {
        assert_eq!(Tools::names(&[calculator()]).unwrap(), ["calculator"]);
        let err = Tools::names(&[calculator(), calculator()]).unwrap_err();
        assert!(err.contains("two tools are named `calculator`"), "{err}");
        let err = Tools::names(&[json!({"type": "function", "function": {"name": "a b"}})]).unwrap_err();
        assert!(err.contains("tools[0].function.name"), "{err}");
        let err = Tools::names(&[json!({"type": "retrieval"})]).unwrap_err();
        assert!(err.contains("tools[0] must be"), "{err}");
    }

    #[test]
    fn the_text_alternative_excludes_exactly_the_replies_that_open_a_call() {
        let regex = regex_lite_full_match(&not_starting_with(TOOL_CALL_OPEN));
        for text in ["", "<", "<tool_cal", "Hello", "<b>bold</b>", "<tool_cal>", "x<tool_call>", "line\nbreak"] {
            assert!(regex(text), "{text:?} is text");
        }
        for text in ["<tool_call>", "<tool_call>{}", "<tool_call>\n"] {
            assert!(!regex(text), "{text:?} opens a call");
        }
    }

    /// A whole-string matcher for the regex (Rust regex syntax, as llguidance reads it).
    fn regex_lite_full_match(pattern: &str) -> impl Fn(&str) -> bool {
        let re = regex::Regex::new(&format!("^(?:{pattern})$")).unwrap();
        move |text| re.is_match(text)
    }
}
