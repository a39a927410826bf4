//! OpenAI's tool calling over HTTP: `tools`, `tool_choice` and `parallel_tool_calls` read from a
//! request, assistant `tool_calls` and `tool` turns read from its messages, and a reply's calls
//! written back as `message.tool_calls` or, streaming, as OpenAI's tool-call deltas (the name
//! once, then the arguments' JSON as it is generated).

use serde_json::{json, Map, Value};

use furnace_data::chat::{FunctionCall, ToolCall};

use super::api::{next_id, ApiError};
use crate::tools::{scan, CallText, Scan, ToolChoice, Tools};

/// The request's tools, checked; None when it has none.
pub fn tools(fields: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    let definitions = match fields.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => return Err(ApiError::bad("tools", "tools must be a list of {\"type\": \"function\", \"function\": {...}} definitions")),
    };
    let names = Tools::names(&definitions).map_err(|e| ApiError::bad("tools", e))?;
    let choice = match fields.get("tool_choice") {
        None | Some(Value::Null) if definitions.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(Value::Object(o)) if o.get("function").and_then(|f| f.get("name")).is_some_and(Value::is_string) => {
            let name = o["function"]["name"].as_str().unwrap_or_default().to_string();
            if !names.contains(&name) {
                return Err(ApiError::bad("tool_choice", format!("tool_choice names the function `{name}`, which is not among tools")));
            }
            ToolChoice::Function(name)
        }
        Some(_) => {
            return Err(ApiError::bad(
                "tool_choice",
                "tool_choice is \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ))
        }
    };
    if choice != ToolChoice::None && definitions.is_empty() {
        return Err(ApiError::bad("tool_choice", "tool_choice needs tools to choose from"));
    }
    let parallel = match fields.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("parallel_tool_calls", "parallel_tool_calls must be a boolean")),
    };
    Ok((!definitions.is_empty()).then_some(Tools { definitions, choice, parallel }))
}

/// An assistant turn's `tool_calls` as the chat template takes them (arguments as a JSON object;
/// OpenAI sends them as a string of JSON).
pub fn message_tool_calls(param: &str, value: Option<&Value>) -> Result<Vec<ToolCall>, ApiError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::bad(param, format!("{param}.tool_calls must be a list"))),
    };
    items
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let at = format!("{param}.tool_calls[{j}]");
            let function = call.get("function").ok_or_else(|| ApiError::bad(&at, format!("{at}.function is required")))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad(&at, format!("{at}.function.name must be a string")))?;
            let arguments = match function.get("arguments") {
                Some(Value::String(text)) => serde_json::from_str::<Value>(text)
                    .ok()
                    .filter(Value::is_object)
                    .ok_or_else(|| ApiError::bad(&at, format!("{at}.function.arguments must be a JSON object, as a string")))?,
                Some(object @ Value::Object(_)) => object.clone(),
                _ => return Err(ApiError::bad(&at, format!("{at}.function.arguments must be a string of JSON"))),
            };
            let id = call.get("id").and_then(Value::as_str).map(str::to_string);
            Ok(ToolCall { id, kind: "function".into(), function: FunctionCall { name: name.to_string(), arguments } })
        })
        .collect()
}

fn call_id() -> String {
    format!("call_{:016x}", next_id())
}

/// The assistant message of a whole reply and its finish reason: its calls, when the reply
/// is a run of whole calls ("tool_calls"), else its text.
pub fn reply_message(text: &str, finish: Option<&'static str>) -> (Value, Option<&'static str>) {
    match scan(text) {
        Scan::Calls(calls) if calls.iter().all(|c| c.complete) => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .map(|c| json!({"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
            let finish = if finish == Some("stop") { Some("tool_calls") } else { finish };
            (json!({"role": "assistant", "content": null, "tool_calls": tool_calls}), finish)
        }
        _ => (json!({"role": "assistant", "content": text}), finish),
    }
}

/// One streamed choice's reply, turned into deltas: text is held while it may still open a
/// call; a call's `id`, `type` and `name` go out once its name is whole, then its arguments as
/// they grow.
#[derive(Default)]
pub struct CallStream {
    text: String,
    /// Text already sent as content (a reply that is text).
    text_sent: usize,
    /// For each call begun: its id once announced, and how much of its arguments went out.
    calls: Vec<(Option<String>, usize)>,
}

impl CallStream {
    /// The deltas `piece` of generated text adds.
    pub fn push(&mut self, piece: &str) -> Vec<Value> {
        self.text.push_str(piece);
        match scan(&self.text) {
            Scan::Undecided => Vec::new(),
            Scan::Text => self.flush_text(),
            Scan::Calls(calls) => self.call_deltas(&calls),
        }
    }

    /// The last deltas at the reply's end, and its finish reason.
    pub fn finish(&mut self, finish: &'static str) -> (Vec<Value>, &'static str) {
        match scan(&self.text) {
            Scan::Calls(calls) if calls.iter().all(|c| c.complete) => {
                (self.call_deltas(&calls), if finish == "stop" { "tool_calls" } else { finish })
            }
            // A call cut short stays as far as it went; anything else is text.
            Scan::Calls(calls) if !self.calls.is_empty() => (self.call_deltas(&calls), finish),
            _ => (self.flush_text(), finish),
        }
    }

    fn flush_text(&mut self) -> Vec<Value> {
        let new = &self.text[self.text_sent..];
        self.text_sent = self.text.len();
        if new.is_empty() {
            Vec::new()
        } else {
            vec![json!({"content": new})]
        }
    }

    fn call_deltas(&mut self, calls: &[CallText]) -> Vec<Value> {
        let mut deltas = Vec::new();
        for (index, call) in calls.iter().enumerate() {
            let Some(name) = &call.name else { break };
            if self.calls.len() <= index {
                let id = call_id();
                deltas.push(
                    json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                );
                self.calls.push((Some(id), 0));
            }
            let sent = &mut self.calls[index].1;
            if call.arguments.len() > *sent {
                deltas.push(json!({"tool_calls": [{"index": index, "function": {"arguments": &call.arguments[*sent..]}}]}));
                *sent = call.arguments.len();
            }
        }
        deltas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_deltas_add_up_to_the_whole_reply() {
        let reply = r#"<tool_call>{"name":"calculator","arguments":{"expression":"412*37"}}</tool_call><tool_call>{"name":"calculator","arguments":{"expression":"1+2"}}</tool_call>"#;
        let (whole, finish) = reply_message(reply, Some("stop"));
        assert_eq!(finish, Some("tool_calls"));
        let mut stream = CallStream::default();
        let mut deltas = Vec::new();
        for piece in reply.as_bytes().chunks(3) {
            deltas.extend(stream.push(std::str::from_utf8(piece).unwrap()));
        }
        let (last, finish) = stream.finish("stop");
        deltas.extend(last);
        assert_eq!(finish, "tool_calls");
        // Assembled as the openai client's users assemble them: by index, arguments appended.
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for delta in &deltas {
            assert!(delta.get("content").is_none(), "no text in a reply of calls: {delta}");
            for call in delta["tool_calls"].as_array().unwrap() {
                let index = call["index"].as_u64().unwrap() as usize;
                if let Some(id) = call.get("id") {
                    assert_eq!(index, calls.len());
                    calls.push((id.as_str().unwrap().into(), call["function"]["name"].as_str().unwrap().into(), String::new()));
                }
                calls[index].2.push_str(call["function"]["arguments"].as_str().unwrap());
            }
        }
        let expected: Vec<(String, String)> = whole["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["function"]["name"].as_str().unwrap().into(), c["function"]["arguments"].as_str().unwrap().into()))
            .collect();
        assert_eq!(calls.iter().map(|(_, n, a)| (n.clone(), a.clone())).collect::<Vec<_>>(), expected);
        assert_eq!(expected[0].1, r#"{"expression":"412*37"}"#);
    }

    #[test]
    fn text_streams_as_content_once_it_cannot_open_a_call() {
        let mut stream = CallStream::default();
        assert!(stream.push("<to").is_empty(), "may still open a call");
        assert_eq!(stream.push("p!"), vec![json!({"content": "<top!"})]);
        assert_eq!(stream.push(" ok"), vec![json!({"content": " ok"})]);
        let (last, finish) = stream.finish("stop");
        assert!(last.is_empty());
        assert_eq!(finish, "stop");
        let mut held = CallStream::default();
        assert!(held.push("<tool").is_empty());
        assert_eq!(held.finish("length"), (vec![json!({"content": "<tool"})], "length"));
        assert_eq!(reply_message("4", Some("stop")), (json!({"role": "assistant", "content": "4"}), Some("stop")));
    }

    #[test]
    fn assistant_tool_calls_are_read_with_their_arguments_parsed() {
        let calls =
            json!([{"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\": \"1+2\"}"}}]);
        let read = message_tool_calls("messages[1]", Some(&calls)).unwrap();
        assert_eq!(read[0].function.arguments, json!({"expression": "1+2"}));
        assert_eq!(read[0].id.as_deref(), Some("call_1"));
        let bad = json!([{"type": "function", "function": {"name": "calculator", "arguments": "{not json"}}]);
        let err = message_tool_calls("messages[1]", Some(&bad)).unwrap_err();
        assert!(format!("{err:?}").contains("messages[1].tool_calls[0].function.arguments"), "{err:?}");
    }
}
