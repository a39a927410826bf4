//! OpenAI's HTTP API over the engine: `/v1/models`, `/v1/completions`, `/v1/chat/completions`
//! (plain JSON or server-sent events, tool calls included), `/v1/embeddings`, `/health` and
//! `/metrics`. Bad requests get OpenAI's
//! error object with the field at fault; the server keeps serving the others.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use furnace_core::rng::{derive_seed, Stream};
use furnace_data::chat::{ChatTemplate, Message};
use furnace_data::TextTokenizer;
use furnace_models::paged::BLOCK_SIZE;
use furnace_models::sampling::{Mirostat, SamplingConfig};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

use super::engine::{Event, Job, Params, Sequence, TokenLogprob, TokenText};
use super::metrics::Metrics;
use super::tool_calls::{message_tool_calls, reply_message, tools, CallStream};
use crate::evaluate::encode_prompt;
use crate::structured::{Grammar, Grammars};
use crate::tools::ToolChoice;

/// The largest request body accepted (OpenAI-sized prompts fit many times over).
const MAX_BODY_BYTES: usize = 4 << 20;

/// What the HTTP side knows once the model is loaded.
pub struct Ready {
    /// The base model's name, and the LoRA adapters served beside it (`--lora`).
    pub name: String,
    pub adapters: Vec<String>,
    /// An encoder's kind ("BERT", "T5"): it serves embeddings only.
    pub encoder: Option<&'static str>,
    pub tokenizer: Arc<TextTokenizer>,
    pub template: Result<ChatTemplate, String>,
    pub max_seq_len: usize,
    /// Positions the KV cache holds, in whole blocks.
    pub kv_capacity: usize,
    /// The token table structured output compiles its grammars against.
    pub grammars: Grammars,
}

pub struct Shared {
    pub ready: OnceLock<Ready>,
    pub metrics: Arc<Metrics>,
    /// Each served model's engine queue: the base's and every adapter's.
    pub queues: BTreeMap<String, SyncSender<Job>>,
    pub created: u64,
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint", None).into_response() })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

/// OpenAI's error object.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>, param: Option<&str>) -> Self {
        Self { status, kind, message: message.into(), param: param.map(str::to_string), retry_after: None }
    }

    pub(super) fn bad(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message, Some(param))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status.as_u16()}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn health(State(shared): State<Arc<Shared>>) -> StatusCode {
    if shared.ready.get().is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], shared.metrics.render()).into_response()
}

fn ready(shared: &Shared) -> Result<&Ready, ApiError> {
    shared.ready.get().ok_or_else(|| {
        let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "the model is still loading", None);
        e.retry_after = Some(1);
        e
    })
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    let result = ready(&shared).map(|r| {
        let base = json!({"id": r.name, "object": "model", "created": shared.created, "owned_by": "furnace", "root": r.name, "parent": null, "max_model_len": r.max_seq_len});
        let adapters = r.adapters.iter().map(|a| {
            json!({"id": a, "object": "model", "created": shared.created, "owned_by": "furnace", "root": a, "parent": r.name, "max_model_len": r.max_seq_len})
        });
        Json(json!({"object": "list", "data": std::iter::once(base).chain(adapters).collect::<Vec<_>>()}))
    });
    counted(&shared, result.map(IntoResponse::into_response))
}

/// The response, with its status counted.
fn counted(shared: &Shared, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    shared.metrics.count_request(response.status().as_u16());
    response
}

async fn completions(State(shared): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = handle(&shared, body, Kind::Completion).await;
    counted(&shared, result)
}

async fn chat_completions(State(shared): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = handle(&shared, body, Kind::Chat).await;
    counted(&shared, result)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// A request's fields, checked.
struct Request {
    prompt: Vec<u32>,
    /// The prompt's text, for `echo`.
    echo: Option<String>,
    n: usize,
    stream: bool,
    include_usage: bool,
    params: Params,
    /// `logprobs` asked for (chat: `logprobs: true`; completions: `logprobs: k`).
    logprobs: bool,
    /// What `response_format` (or vLLM's `structured_outputs`, or `tools`) holds the reply to,
    /// and the field.
    grammar: Option<(Grammar, &'static str)>,
    /// The reply may call tools: its calls are read out of its text.
    calls_tools: bool,
}

async fn handle(shared: &Shared, body: Result<Bytes, BytesRejection>, kind: Kind) -> Result<Response, ApiError> {
    let (ready, fields, model) = request_fields(shared, body)?;
    if let Some(encoder) = ready.encoder {
        return Err(ApiError::bad("model", format!("`{model}` is an encoder ({encoder}): it serves /v1/embeddings only")));
    }
    let request = parse(&fields, kind, ready)?;
    let arrived = Instant::now();
    let (events, receiver) = unbounded_channel();
    for choice in 0..request.n {
        let mut params = request.params.clone();
        params.sampling.seed = derive_seed(request.params.sampling.seed, Stream::Reply, choice as u64);
        // Each choice its own matcher; a grammar that does not compile is refused before any is queued.
        let constraint = match &request.grammar {
            Some((grammar, field)) => Some(ready.grammars.constraint(grammar).map_err(|e| ApiError::bad(field, e))?),
            None => None,
        };
        let seq = Sequence { prompt: request.prompt.clone(), params, constraint, choice, arrived, events: events.clone() };
        enqueue(shared, &model, Job::Generate(Box::new(seq)))?;
    }
    drop(events);
    let id = format!("{}-{:016x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, next_id());
    let reply = Reply { id, created: now(), model, kind, prompt_tokens: request.prompt.len() };
    if request.stream {
        Ok(stream(reply, request, receiver).into_response())
    } else {
        Ok(Json(collect(reply, request, receiver).await).into_response())
    }
}

/// `job` into the queue of `model`'s engine, or 429 (full) / 503 (stopped) with Retry-After.
fn enqueue(shared: &Shared, model: &str, job: Job) -> Result<(), ApiError> {
    let queue = shared.queues.get(model).ok_or_else(|| ApiError::bad("model", format!("the model `{model}` has no engine")))?;
    shared.metrics.waiting.fetch_add(1, Ordering::Relaxed);
    let Err(e) = queue.try_send(job) else { return Ok(()) };
    shared.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
    let mut error = match e {
        TrySendError::Full(_) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "the queue is full (--max-queue); retry shortly", None)
        }
        TrySendError::Disconnected(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "the engine has stopped", None)
        }
    };
    error.retry_after = Some(1);
    Err(error)
}

async fn embeddings(State(shared): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    let result = embed(&shared, body).await;
    counted(&shared, result)
}

/// `/v1/embeddings`: each input's last hidden state averaged over its tokens, as floats or
/// (`encoding_format: "base64"`, the `openai` client's default) little-endian f32 bytes.
async fn embed(shared: &Shared, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let (ready, fields, model) = request_fields(shared, body)?;
    let tokens = |v: &Value| -> Option<Vec<u32>> {
        match v {
            Value::String(text) => Some(ready.tokenizer.encode(text)),
            Value::Array(ids) if ids.iter().all(Value::is_u64) => Some(ids.iter().filter_map(Value::as_u64).map(|t| t as u32).collect()),
            _ => None,
        }
    };
    let inputs: Option<Vec<Vec<u32>>> = match fields.get("input") {
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(|i| i.is_string() || i.is_array()) => {
            items.iter().map(tokens).collect()
        }
        Some(single) => tokens(single).map(|t| vec![t]),
        None => None,
    };
    let inputs =
        inputs.ok_or_else(|| ApiError::bad("input", "input is a string, a list of strings, token ids, or a list of token-id lists"))?;
    if inputs.len() > 256 {
        return Err(ApiError::bad("input", format!("{} inputs; send at most 256 per request", inputs.len())));
    }
    for (i, input) in inputs.iter().enumerate() {
        if input.is_empty() || input.len() > ready.max_seq_len {
            return Err(ApiError::bad("input", format!("input {i} has {} tokens; it must have 1 to {}", input.len(), ready.max_seq_len)));
        }
        if let Some(bad) = input.iter().find(|&&t| t as usize >= ready.tokenizer.vocab_size()) {
            return Err(ApiError::bad(
                "input",
                format!("input {i}: token id {bad} is outside the vocabulary of {}", ready.tokenizer.vocab_size()),
            ));
        }
    }
    let base64 = match fields.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::bad("encoding_format", format!("encoding_format `{other}` is not float or base64"))),
    };
    if fields.get("dimensions").is_some_and(|d| !d.is_null()) {
        return Err(ApiError::bad("dimensions", "dimensions is not supported: the embedding has the model's width"));
    }
    let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
    let (reply, answer) = tokio::sync::oneshot::channel();
    enqueue(shared, &model, Job::Embed { inputs, reply })?;
    let vectors =
        answer.await.map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", "the engine has stopped", None))?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 { json!(base64_f32(v)) } else { json!(v) };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(
        json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}),
    )
    .into_response())
}

/// Standard base64 (RFC 4648, padded) of the floats' little-endian bytes.
fn base64_f32(values: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

pub(super) fn next_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(40)
}

/// A request body's fields, once the model is loaded: a JSON object within the size limit, and
/// the model it asks for (`model`: the base or an adapter; the base when absent).
fn request_fields(shared: &Shared, body: Result<Bytes, BytesRejection>) -> Result<(&Ready, Map<String, Value>, String), ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is over {} MiB", MAX_BODY_BYTES >> 20)
        } else {
            e.body_text()
        };
        ApiError::new(status, "invalid_request_error", message, None)
    })?;
    let ready = ready(shared)?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| ApiError::bad("body", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else { return Err(ApiError::bad("body", "the body must be a JSON object")) };
    let model = match fields.get("model") {
        None | Some(Value::Null) => ready.name.clone(),
        Some(model) => {
            let name = model.as_str().ok_or_else(|| ApiError::bad("model", "model must be a string"))?;
            if !shared.queues.contains_key(name) {
                let served: Vec<String> = std::iter::once(&ready.name).chain(&ready.adapters).map(|n| format!("`{n}`")).collect();
                return Err(ApiError::bad("model", format!("the model `{name}` does not exist; this server serves {}", served.join(", "))));
            }
            name.to_string()
        }
    };
    Ok((ready, fields, model))
}

fn parse(fields: &Map<String, Value>, kind: Kind, ready: &Ready) -> Result<Request, ApiError> {
    let tokenizer = &ready.tokenizer;
    let tools = match kind {
        Kind::Chat => tools(fields)?,
        Kind::Completion => None,
    };
    let (prompt, prompt_text) = match kind {
        Kind::Completion => match fields.get("prompt") {
            Some(Value::String(text)) => (encode_prompt(tokenizer, text, false), text.clone()),
            Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
                let text = items[0].as_str().unwrap_or_default();
                (encode_prompt(tokenizer, text, false), text.to_string())
            }
            Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_u64) => {
                let ids: Vec<u32> = items.iter().filter_map(Value::as_u64).map(|t| t as u32).collect();
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= tokenizer.vocab_size()) {
                    return Err(ApiError::bad("prompt", format!("token id {bad} is outside the vocabulary of {}", tokenizer.vocab_size())));
                }
                (ids.clone(), tokenizer.decode(&ids))
            }
            Some(Value::Array(_)) => {
                return Err(ApiError::bad(
                    "prompt",
                    "prompt is a string, a list of one string, or a list of token ids; send one request per prompt",
                ))
            }
            Some(_) => return Err(ApiError::bad("prompt", "prompt must be a string")),
            None => return Err(ApiError::bad("prompt", "prompt is required")),
        },
        Kind::Chat => {
            let messages = messages(fields)?;
            let template =
                ready.template.as_ref().map_err(|e| ApiError::bad("messages", format!("this model has no usable chat template: {e}")))?;
            let definitions = tools.as_ref().map_or(&[][..], |t| &t.definitions[..]);
            let text = template
                .render(&messages, definitions, true)
                .map_err(|e| ApiError::bad("messages", format!("the chat template failed: {e}")))?;
            (tokenizer.encode(&text), text)
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt", "the prompt is empty"));
    }
    if prompt.len() >= ready.max_seq_len {
        return Err(ApiError::bad(
            if kind == Kind::Chat { "messages" } else { "prompt" },
            format!("the prompt has {} tokens and this model's context is {} tokens: shorten it", prompt.len(), ready.max_seq_len),
        ));
    }
    let room = ready.max_seq_len - prompt.len();
    let max_tokens_key = if fields.contains_key("max_completion_tokens") { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = match fields.get(max_tokens_key) {
        None | Some(Value::Null) => {
            if kind == Kind::Completion {
                16.min(room)
            } else {
                room
            }
        }
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| ApiError::bad(max_tokens_key, format!("{max_tokens_key} must be an integer")))?;
            if n < 1 {
                return Err(ApiError::bad(max_tokens_key, format!("{max_tokens_key} must be at least 1, got {n}")));
            }
            if n as usize > room {
                return Err(ApiError::bad(
                    max_tokens_key,
                    format!(
                        "the prompt's {} tokens and {max_tokens_key} = {n} exceed this model's context of {} tokens",
                        prompt.len(),
                        ready.max_seq_len
                    ),
                ));
            }
            n as usize
        }
    };
    let positions = (prompt.len() + max_tokens).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    if positions > ready.kv_capacity {
        return Err(ApiError::bad(
            max_tokens_key,
            format!(
                "the prompt and {max_tokens_key} need {positions} positions of keys and values, over the {} the server's \
                 --kv-cache-mb holds",
                ready.kv_capacity
            ),
        ));
    }
    let temperature = number(fields, "temperature", 1.0, |t| (0.0..=2.0).contains(&t), "between 0 and 2")?;
    let top_p = number(fields, "top_p", 1.0, |p| p > 0.0 && p <= 1.0, "in (0, 1]")?;
    let min_p = number(fields, "min_p", 0.0, |p| (0.0..=1.0).contains(&p), "in [0, 1]")?;
    let top_k = number(fields, "top_k", -1.0, |k| k == -1.0 || (k >= 0.0 && k.fract() == 0.0), "-1 (off) or a whole number ≥ 0")?;
    let presence_penalty = number(fields, "presence_penalty", 0.0, |p| (-2.0..=2.0).contains(&p), "between -2 and 2")?;
    let frequency_penalty = number(fields, "frequency_penalty", 0.0, |p| (-2.0..=2.0).contains(&p), "between -2 and 2")?;
    let repetition_penalty = number(fields, "repetition_penalty", 1.0, |p| p > 0.0 && p <= 10.0, "in (0, 10]")?;
    let n = number(fields, "n", 1.0, |n| (1.0..=16.0).contains(&n) && n.fract() == 0.0, "a whole number from 1 to 16")? as usize;
    let seed = match fields.get("seed") {
        None | Some(Value::Null) => next_id(),
        Some(v) => v.as_i64().ok_or_else(|| ApiError::bad("seed", "seed must be an integer"))? as u64,
    };
    let stop = match fields.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 && items.iter().all(Value::is_string) => {
            items.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()
        }
        Some(_) => return Err(ApiError::bad("stop", "stop is a string or a list of at most 4 strings")),
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad("stop", "a stop string must not be empty"));
    }
    let stream = boolean(fields, "stream")?;
    let include_usage = match fields.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::bad("stream_options.include_usage", "include_usage must be a boolean")),
        },
        Some(_) => return Err(ApiError::bad("stream_options", "stream_options must be an object")),
    };
    let (logprobs, top) = match kind {
        Kind::Chat => {
            let on = boolean(fields, "logprobs")?;
            let top = number(fields, "top_logprobs", 0.0, |k| (0.0..=20.0).contains(&k) && k.fract() == 0.0, "a whole number from 0 to 20")?
                as usize;
            if top > 0 && !on {
                return Err(ApiError::bad("top_logprobs", "top_logprobs needs logprobs: true"));
            }
            (on, top)
        }
        Kind::Completion => match fields.get("logprobs") {
            None | Some(Value::Null) => (false, 0),
            Some(v) => {
                let k = v
                    .as_u64()
                    .filter(|&k| k <= 5)
                    .ok_or_else(|| ApiError::bad("logprobs", "logprobs must be a whole number from 0 to 5"))?;
                (true, k as usize)
            }
        },
    };
    let echo = if kind == Kind::Completion && boolean(fields, "echo")? { Some(prompt_text) } else { None };
    let ignore_eos = boolean(fields, "ignore_eos")?;
    // llama-server's fields: `mirostat` 2 with `mirostat_tau` and `mirostat_eta`.
    let mirostat = match number(fields, "mirostat", 0.0, |m| m == 0.0 || m == 2.0, "0 (off) or 2 (Mirostat 2.0)")? {
        0.0 => None,
        _ => Some(Mirostat {
            tau: number(fields, "mirostat_tau", 5.0, |t| t > 0.0 && t.is_finite(), "a finite number of bits > 0")?,
            eta: number(fields, "mirostat_eta", 0.1, |e| e > 0.0 && e <= 1.0, "in (0, 1]")?,
        }),
    };
    let sampling = SamplingConfig { temperature, top_k: top_k.max(0.0) as usize, top_p, min_p, repetition_penalty, seed, mirostat };
    let params = Params {
        max_tokens,
        sampling,
        presence_penalty: presence_penalty as f32,
        frequency_penalty: frequency_penalty as f32,
        stop,
        ignore_eos,
        logprobs: logprobs.then_some(top),
    };
    let calls_tools = tools.as_ref().is_some_and(|t| t.choice != ToolChoice::None);
    let grammar = match tools.as_ref().and_then(|t| t.grammar()) {
        Some(_) if fields.get("response_format").or(fields.get("structured_outputs")).is_some_and(|f| !f.is_null()) => {
            return Err(ApiError::bad(
                "tool_choice",
                "a reply that may call tools cannot also follow response_format; send tool_choice: \"none\" or drop response_format",
            ))
        }
        Some(calls) => Some((calls, "tools")),
        None => grammar(fields)?,
    };
    Ok(Request { prompt, echo, n, stream, include_usage, params, logprobs, grammar, calls_tools })
}

/// The grammar a request holds its reply to: OpenAI's `response_format` (`json_schema` with its
/// `schema`, `json_object`, or `text`), or vLLM's `structured_outputs` (`json`, `regex`,
/// `grammar` in Lark, or `choice`: one of a list of strings).
fn grammar(fields: &Map<String, Value>) -> Result<Option<(Grammar, &'static str)>, ApiError> {
    if let Some(format) = fields.get("response_format").filter(|f| !f.is_null()) {
        let field = "response_format";
        return match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some((Grammar::JsonSchema(json!({"type": "object"})), field))),
            Some("json_schema") => match format.get("json_schema").and_then(|j| j.get("schema")) {
                Some(schema) if schema.is_object() || schema.is_boolean() => Ok(Some((Grammar::JsonSchema(schema.clone()), field))),
                _ => Err(ApiError::bad(field, "response_format json_schema needs `json_schema: {\"name\": ..., \"schema\": {...}}`")),
            },
            _ => Err(ApiError::bad(field, "response_format.type is text, json_object or json_schema")),
        };
    }
    let Some(outputs) = fields.get("structured_outputs").filter(|o| !o.is_null()) else { return Ok(None) };
    let field = "structured_outputs";
    let escaped = |choice: &str| {
        choice.chars().map(|c| if c.is_alphanumeric() || c == ' ' { c.to_string() } else { format!("\\{c}") }).collect::<String>()
    };
    match (
        outputs.get("json"),
        outputs.get("regex").and_then(Value::as_str),
        outputs.get("grammar").and_then(Value::as_str),
        outputs.get("choice"),
    ) {
        (Some(Value::String(schema)), ..) => serde_json::from_str(schema)
            .map(|schema| Some((Grammar::JsonSchema(schema), field)))
            .map_err(|e| ApiError::bad(field, format!("structured_outputs.json is not JSON: {e}"))),
        (Some(schema), ..) if schema.is_object() => Ok(Some((Grammar::JsonSchema(schema.clone()), field))),
        (None, Some(regex), ..) => Ok(Some((Grammar::Regex(regex.to_string()), field))),
        (None, None, Some(lark), _) => Ok(Some((Grammar::Lark(lark.to_string()), field))),
        (None, None, None, Some(Value::Array(choices))) if !choices.is_empty() && choices.iter().all(Value::is_string) => {
            let alternatives: Vec<String> = choices.iter().filter_map(Value::as_str).map(escaped).collect();
            Ok(Some((Grammar::Regex(format!("({})", alternatives.join("|"))), field)))
        }
        _ => Err(ApiError::bad(
            field,
            "structured_outputs holds one of json (a schema), regex, grammar (Lark) or choice (a list of strings)",
        )),
    }
}

fn number(fields: &Map<String, Value>, key: &str, default: f64, valid: impl Fn(f64) -> bool, range: &str) -> Result<f64, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => {
            let x = v.as_f64().ok_or_else(|| ApiError::bad(key, format!("{key} must be a number")))?;
            if valid(x) {
                Ok(x)
            } else {
                Err(ApiError::bad(key, format!("{key} = {x} is out of range: it must be {range}")))
            }
        }
    }
}

fn boolean(fields: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match fields.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::bad(key, format!("{key} must be a boolean"))),
    }
}

/// A chat's messages: role and text content (a string, or a list of text parts), an assistant's
/// `tool_calls`, a `tool` turn's `tool_call_id`.
fn messages(fields: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(items)) = fields.get("messages") else {
        return Err(ApiError::bad("messages", "messages is required: a list of {\"role\", \"content\"} objects"));
    };
    if items.is_empty() {
        return Err(ApiError::bad("messages", "messages must not be empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let role =
                m.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::bad(&param, format!("{param}.role must be a string")))?;
            if !matches!(role, "system" | "user" | "assistant" | "developer" | "tool") {
                return Err(ApiError::bad(&param, format!("{param}.role `{role}` is not one of system, developer, user, assistant, tool")));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(text)) => Ok(text),
                        _ => Err(ApiError::bad(&param, format!("{param}.content: only text parts are supported"))),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err(ApiError::bad(&param, format!("{param}.content must be a string"))),
            };
            let role = if role == "developer" { "system" } else { role };
            let tool_calls = message_tool_calls(&param, m.get("tool_calls"))?;
            if !tool_calls.is_empty() && role != "assistant" {
                return Err(ApiError::bad(&param, format!("{param}: only an assistant turn has tool_calls")));
            }
            let tool_call_id = m.get("tool_call_id").and_then(Value::as_str).map(str::to_string);
            let name = m.get("name").and_then(Value::as_str).map(str::to_string);
            Ok(Message { role: role.to_string(), content, tool_calls, tool_call_id, name })
        })
        .collect()
}

struct Reply {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": self.prompt_tokens + completion_tokens})
    }

    fn envelope(&self, chunk: bool, choices: Vec<Value>) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }
}

/// Log-probabilities as chat (`content: [{token, logprob, bytes, top_logprobs}]`) or completions
/// (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) report them.
fn logprobs_json(kind: Kind, entries: &[TokenLogprob], offset: usize) -> Value {
    match kind {
        Kind::Chat => {
            let entry = |token: &TokenText, logprob: f32| json!({"token": token.text, "logprob": logprob, "bytes": token.bytes});
            json!({"content": entries.iter().map(|e| {
                let mut v = entry(&e.token, e.logprob);
                v["top_logprobs"] = e.top.iter().map(|(t, l)| entry(t, *l)).collect();
                v
            }).collect::<Vec<_>>()})
        }
        Kind::Completion => {
            let mut offsets = Vec::new();
            let mut at = offset;
            for e in entries {
                offsets.push(at);
                at += e.token.bytes.len();
            }
            json!({
                "tokens": entries.iter().map(|e| e.token.text.clone()).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
                "top_logprobs": entries.iter().map(|e| e.top.iter().map(|(t, l)| (t.text.clone(), *l)).collect::<BTreeMap<_, _>>()).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// The whole reply of a request that did not ask to stream.
async fn collect(reply: Reply, request: Request, mut events: UnboundedReceiver<Event>) -> Value {
    let mut texts = vec![request.echo.clone().unwrap_or_default(); request.n];
    let mut logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); request.n];
    let mut finish = vec![None; request.n];
    let mut completion_tokens = 0;
    while let Some(event) = events.recv().await {
        match event {
            Event::Text { choice, text, logprob } => {
                texts[choice].push_str(&text);
                logprobs[choice].extend(logprob);
            }
            Event::Done { choice, finish_reason, completion_tokens: n } => {
                finish[choice] = Some(finish_reason);
                completion_tokens += n;
            }
        }
    }
    let choices = (0..request.n)
        .map(|i| {
            let lp = request.logprobs.then(|| logprobs_json(reply.kind, &logprobs[i], request.echo.as_ref().map_or(0, String::len)));
            match reply.kind {
                Kind::Chat if request.calls_tools => {
                    let (message, finish) = reply_message(&texts[i], finish[i]);
                    json!({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
                }
                Kind::Chat => {
                    json!({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": lp, "finish_reason": finish[i]})
                }
                Kind::Completion => json!({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": finish[i]}),
            }
        })
        .collect();
    let mut body = reply.envelope(false, choices);
    body["usage"] = reply.usage(completion_tokens);
    body
}

/// Server-sent events: a chunk per piece of text, `finish_reason` once per choice, a usage
/// chunk (no choices) when asked, then `[DONE]`. A client that goes away drops the stream, and
/// with it the engine's channel: its sequences stop at the next step.
fn stream(
    reply: Reply,
    request: Request,
    mut events: UnboundedReceiver<Event>,
) -> Sse<impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>>> {
    let (out, body) = unbounded_channel::<String>();
    tokio::spawn(async move {
        let send = |v: Value| out.send(v.to_string()).is_ok();
        for i in 0..request.n {
            let first = match (reply.kind, &request.echo) {
                (Kind::Chat, _) => {
                    Some(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
                }
                (Kind::Completion, Some(echo)) => Some(json!({"index": i, "text": echo, "logprobs": null, "finish_reason": null})),
                (Kind::Completion, None) => None,
            };
            if let Some(first) = first {
                if !send(reply.envelope(true, vec![first])) {
                    return;
                }
            }
        }
        let mut offsets = vec![request.echo.as_ref().map_or(0, String::len); request.n];
        let mut calls: Vec<CallStream> = (0..request.n).map(|_| CallStream::default()).collect();
        let mut completion_tokens = 0;
        while let Some(event) = events.recv().await {
            let chunks = match event {
                Event::Text { choice, text, logprob } => {
                    let lp = logprob.map(|l| logprobs_json(reply.kind, &[l], offsets[choice]));
                    offsets[choice] += text.len();
                    match reply.kind {
                        // A reply that may call tools: its text held until it is text or calls.
                        Kind::Chat if request.calls_tools => {
                            let mut deltas = calls[choice].push(&text);
                            if deltas.is_empty() && lp.is_some() {
                                deltas.push(json!({}));
                            }
                            let mut lp = lp;
                            deltas
                                .into_iter()
                                .map(|delta| json!({"index": choice, "delta": delta, "logprobs": lp.take(), "finish_reason": null}))
                                .collect()
                        }
                        Kind::Chat => vec![json!({"index": choice, "delta": {"content": text}, "logprobs": lp, "finish_reason": null})],
                        Kind::Completion => vec![json!({"index": choice, "text": text, "logprobs": lp, "finish_reason": null})],
                    }
                }
                Event::Done { choice, finish_reason, completion_tokens: n } => {
                    completion_tokens += n;
                    match reply.kind {
                        Kind::Chat if request.calls_tools => {
                            let (deltas, finish_reason) = calls[choice].finish(finish_reason);
                            let mut chunks: Vec<Value> = deltas
                                .into_iter()
                                .map(|delta| json!({"index": choice, "delta": delta, "logprobs": null, "finish_reason": null}))
                                .collect();
                            chunks.push(json!({"index": choice, "delta": {}, "logprobs": null, "finish_reason": finish_reason}));
                            chunks
                        }
                        Kind::Chat => vec![json!({"index": choice, "delta": {}, "logprobs": null, "finish_reason": finish_reason})],
                        Kind::Completion => vec![json!({"index": choice, "text": "", "logprobs": null, "finish_reason": finish_reason})],
                    }
                }
            };
            for chunk in chunks {
                if !send(reply.envelope(true, vec![chunk])) {
                    return;
                }
            }
        }
        if request.include_usage {
            let mut usage = reply.envelope(true, Vec::new());
            usage["usage"] = reply.usage(completion_tokens);
            send(usage);
        }
        let _ = out.send("[DONE]".into());
    });
    Sse::new(UnboundedReceiverStream::new(body).map(|data| Ok(SseEvent::default().data(data))))
}
