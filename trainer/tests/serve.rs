//! `furnace serve` end to end: a tiny checkpoint behind the OpenAI API on a loopback port,
//! spoken to over plain HTTP/1.1 (streaming included), as any client would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

mod common;
use common::{furnace, furnace_bin, text, tiny_checkpoint, workspace};

/// A running server; killed when dropped.
struct Server {
    child: Child,
    address: String,
}

impl Server {
    fn start(checkpoint: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(furnace_bin())
            .args(["serve", "--checkpoint", checkpoint, "--port", "0", "--served-model-name", "tiny"])
            .args(extra)
            .current_dir(workspace())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut address = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("listening on http://") {
                address = rest.split_whitespace().next().map(str::to_string);
            }
            if line.starts_with("serving") {
                break;
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, address: address.expect("the server prints its address") }
    }

    /// (status, headers, body) of one request.
    fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String, Vec<u8>) {
        let mut stream = TcpStream::connect(&self.address).unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.address);
        if let Some(body) = body {
            head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        if let Some(body) = body {
            // A server that refuses a large body early may close before reading all of it.
            let _ = stream.write_all(body);
        }
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut body = raw[split + 4..].to_vec();
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
        (status, head, body)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, body) = self.request("POST", path, Some(body.to_string().as_bytes()));
        (status, serde_json::from_slice(&body).unwrap_or_else(|_| panic!("JSON, got {}", String::from_utf8_lossy(&body))))
    }

    /// The `data:` payloads of a streamed reply.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, _, body) = self.request("POST", path, Some(body.to_string().as_bytes()));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        String::from_utf8(body).unwrap().lines().filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
    }

    fn metrics(&self) -> String {
        String::from_utf8(self.request("GET", "/metrics", None).2).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = body.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[end + 2 + size + 2..];
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".bytes().position(|a| a == c).unwrap() as u32;
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(4) {
        let digits: Vec<u32> = chunk.iter().filter(|&&c| c != b'=').map(|&c| value(c)).collect();
        let n = digits.iter().enumerate().fold(0u32, |n, (i, d)| n | d << (18 - 6 * i));
        out.extend((0..digits.len() - 1).map(|i| (n >> (16 - 8 * i)) as u8));
    }
    out
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("{name} in\n{metrics}"))
}

#[test]
fn serves_completions_and_chat_as_openai_does() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), "llama");
    let server = Server::start(&checkpoint, &["--max-num-seqs", "4"]);
    assert_eq!(server.request("GET", "/health", None).0, 200);
    let (status, _, models) = server.request("GET", "/v1/models", None);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&models).unwrap()["data"][0]["id"], "tiny");

    // Greedy: exactly `furnace generate --temperature 0`, ending at max_tokens with exact usage.
    let greedy = json!({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (status, reply) = server.post("/v1/completions", &greedy);
    assert_eq!(status, 200, "{reply}");
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(reply["usage"]["completion_tokens"], 12);
    let generated = furnace(&[
        "generate",
        "--checkpoint",
        &checkpoint,
        "--prompt",
        "Once upon a time",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
    ]);
    assert!(generated.status.success(), "{}", text(&generated));
    let expected = String::from_utf8_lossy(&generated.stdout).trim_end_matches('\n').strip_prefix("Once upon a time").unwrap().to_string();
    let served = choice["text"].as_str().unwrap().to_string();
    assert_eq!(served, expected, "served greedy text = furnace generate's");
    let prompt_tokens = reply["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 0 && reply["usage"]["total_tokens"] == prompt_tokens + 12, "{reply}");

    // Streamed: the same text in chunks, finish_reason once, a usage chunk with no choices, [DONE].
    let mut streamed_request = greedy.clone();
    streamed_request["stream"] = json!(true);
    streamed_request["stream_options"] = json!({"include_usage": true});
    let events = server.stream("/v1/completions", &streamed_request);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(joined, served);
    assert_eq!(chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).count(), 1);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));

    // n = 3 greedy choices decoded in one batch equal the single greedy reply.
    let mut three = greedy.clone();
    three["n"] = json!(3);
    let (_, reply) = server.post("/v1/completions", &three);
    for i in 0..3 {
        assert_eq!(reply["choices"][i]["text"], served.as_str(), "choice {i}");
    }
    assert_eq!(reply["usage"]["completion_tokens"], 36);

    // A stop string ends the text before it, with finish_reason "stop".
    let cut = served.char_indices().nth(6).map_or(served.len(), |(i, _)| i);
    let stop: String = served[cut..].chars().take(2).collect();
    let mut stopped = greedy.clone();
    stopped["stop"] = json!([stop]);
    let (_, reply) = server.post("/v1/completions", &stopped);
    assert_eq!(reply["choices"][0]["finish_reason"], "stop");
    assert_eq!(reply["choices"][0]["text"], &served[..served.find(&stop).unwrap()]);

    // The same seed gives the same sample; logprobs are ≤ 0 and their tokens make the text.
    let sampled = json!({"prompt": "The fox", "max_tokens": 10, "temperature": 1.0, "seed": 42, "ignore_eos": true, "logprobs": 2});
    let (_, a) = server.post("/v1/completions", &sampled);
    let (_, b) = server.post("/v1/completions", &sampled);
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    let logprobs = &a["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"].as_array().unwrap().len(), 10);
    assert!(logprobs["token_logprobs"].as_array().unwrap().iter().all(|l| l.as_f64().unwrap() <= 0.0));
    assert!(logprobs["top_logprobs"].as_array().unwrap().iter().all(|top| top.as_object().unwrap().len() <= 2));

    // Chat: the assistant's message, streamed with the role first.
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 8, "temperature": 0});
    let (status, reply) = server.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["message"]["role"], "assistant");
    // Chat's logprobs: each token's bytes, joined, are the reply (a token may hold part of a character).
    let mut with_logprobs = chat.clone();
    with_logprobs["logprobs"] = json!(true);
    with_logprobs["top_logprobs"] = json!(3);
    let (_, logged) = server.post("/v1/chat/completions", &with_logprobs);
    let entries = logged["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8)).collect();
    assert_eq!(String::from_utf8_lossy(&bytes), logged["choices"][0]["message"]["content"].as_str().unwrap());
    assert!(entries.iter().all(|e| e["logprob"].as_f64().unwrap() <= 0.0 && e["top_logprobs"].as_array().unwrap().len() == 3));
    let mut streamed_chat = chat.clone();
    streamed_chat["stream"] = json!(true);
    let events = server.stream("/v1/chat/completions", &streamed_chat);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let content: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(content, reply["choices"][0]["message"]["content"].as_str().unwrap());

    // Embeddings: the model's width; the same text alike, another not; base64 the same floats.
    let (status, reply) =
        server.post("/v1/embeddings", &json!({"model": "tiny", "input": ["Once upon a time", "The fox", "Once upon a time"]}));
    assert_eq!(status, 200, "{reply}");
    let floats = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<f32>>();
    let vectors: Vec<Vec<f32>> = reply["data"].as_array().unwrap().iter().map(|d| floats(&d["embedding"])).collect();
    assert_eq!(vectors.len(), 3);
    assert_eq!(vectors[0].len(), 64, "tiny's d_model");
    assert_eq!(vectors[0], vectors[2]);
    assert_ne!(vectors[0], vectors[1]);
    assert!(reply["usage"]["prompt_tokens"].as_u64().unwrap() > 3);
    let (_, encoded) = server.post("/v1/embeddings", &json!({"input": "Once upon a time", "encoding_format": "base64"}));
    let bytes = base64_decode(encoded["data"][0]["embedding"].as_str().unwrap());
    let decoded: Vec<f32> = bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(decoded, vectors[0]);
    assert_eq!(server.post("/v1/embeddings", &json!({"input": []})).0, 400);

    // llama-server's Mirostat 2.0 fields: a seed reproduces the text.
    let mirostat =
        json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 1.0, "seed": 3, "mirostat": 2, "mirostat_tau": 3.0});
    let (status, first) = server.post("/v1/completions", &mirostat);
    assert_eq!(status, 200, "{first}");
    assert_eq!(server.post("/v1/completions", &mirostat).1["choices"][0]["text"], first["choices"][0]["text"]);

    // Bad requests: OpenAI's error object naming the field; the server keeps serving.
    let bad = [
        (json!({"model": "gpt-4", "prompt": "x"}), "model"),
        (json!({"prompt": "x", "top_p": 2.0}), "top_p"),
        (json!({"prompt": "x", "max_tokens": -1}), "max_tokens"),
        (json!({"prompt": "x", "temperature": "hot"}), "temperature"),
        (json!({"prompt": "word ".repeat(400)}), "prompt"),
        (json!({"messages": "hi"}), "messages"),
        (json!({"prompt": "x", "mirostat": 1}), "mirostat"),
        (json!({"prompt": "x", "mirostat": 2, "mirostat_tau": -1}), "mirostat_tau"),
    ];
    for (request, param) in bad {
        let path = if param == "messages" { "/v1/chat/completions" } else { "/v1/completions" };
        let (status, reply) = server.post(path, &request);
        assert_eq!(status, 400, "{request}: {reply}");
        assert_eq!(reply["error"]["param"], param, "{reply}");
        assert!(reply["error"]["message"].as_str().unwrap().len() > 10, "{reply}");
    }
    let (status, _, body) = server.request("POST", "/v1/completions", Some(b"{not json"));
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _, _) = server.request("POST", "/v1/completions", Some(&vec![b' '; 5 << 20]));
    assert_eq!(status, 413);
    assert_eq!(server.post("/v1/completions", &greedy).1["choices"][0]["text"], served.as_str());

    let metrics = server.metrics();
    assert!(metric(&metrics, "furnace_requests_total{status=\"200\"}") >= 8.0, "{metrics}");
    assert!(metric(&metrics, "furnace_requests_total{status=\"400\"}") >= 7.0, "{metrics}");
    assert!(metric(&metrics, "furnace_generation_tokens_total") >= 100.0, "{metrics}");
    assert!(metric(&metrics, "furnace_time_to_first_token_seconds_count") >= 8.0, "{metrics}");
}

#[test]
fn a_full_queue_answers_429_and_a_gone_client_frees_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), "mamba");
    let server = Server::start(&checkpoint, &["--max-num-seqs", "1", "--max-queue", "1"]);
    let long = json!({"prompt": "Once", "max_tokens": 60, "temperature": 0, "ignore_eos": true});
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let (status, head, _) = server.request("POST", "/v1/completions", Some(long.to_string().as_bytes()));
                    (status, head)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().any(|(s, _)| *s == 200), "{statuses:?}");
    let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert!(!refused.is_empty(), "{statuses:?}");
    assert!(refused.iter().all(|(_, head)| head.to_ascii_lowercase().contains("retry-after: 1")), "{refused:?}");
    assert!(statuses.iter().all(|(s, _)| *s == 200 || *s == 429), "{statuses:?}");

    // A streaming client that hangs up after its first chunk: its sequence stops and leaves.
    let before = metric(&server.metrics(), "furnace_generation_tokens_total");
    let mut stream = TcpStream::connect(&server.address).unwrap();
    let body = json!({"prompt": "Once", "max_tokens": 240, "temperature": 0, "ignore_eos": true, "stream": true}).to_string();
    let head =
        format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let mut first = [0u8; 64];
    let _ = stream.read(&mut first).unwrap();
    drop(stream);
    let mut idle = false;
    for _ in 0..200 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        if metric(&server.metrics(), "furnace_num_requests_running") == 0.0 {
            idle = true;
            break;
        }
    }
    assert!(idle, "the hung-up sequence still runs");
    let after = metric(&server.metrics(), "furnace_generation_tokens_total");
    assert!(after - before < 240.0, "the sequence stopped before its 240 tokens: {before} → {after}");
}

/// `response_format` and vLLM's `structured_outputs` hold replies to their grammar, for every
/// choice of a batch and when streamed; a schema that does not compile is a 400 naming the field.
#[test]
fn structured_output_holds_every_choice_to_its_grammar() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), "llama");
    let server = Server::start(&checkpoint, &["--max-num-seqs", "4"]);
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("tests/fixtures/structured/enums.json")).unwrap()).unwrap();
    let request = json!({
        "messages": [{"role": "user", "content": "A shirt?"}], "max_tokens": 200, "temperature": 1.0, "n": 3, "seed": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "shirt", "schema": schema, "strict": true}},
    });
    let (status, reply) = server.post("/v1/chat/completions", &request);
    assert_eq!(status, 200, "{reply}");
    for choice in reply["choices"].as_array().unwrap() {
        assert_eq!(choice["finish_reason"], "stop", "{choice}");
        let shirt: Value = serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
        assert!(["red", "green", "blue"].contains(&shirt["color"].as_str().unwrap()), "{shirt}");
        assert!(["S", "M", "L", "XL"].contains(&shirt["size"].as_str().unwrap()), "{shirt}");
        assert_eq!(shirt["status"], "ok");
    }
    // Streamed, the chunks join into the same reply as the JSON answer with the same seed.
    let array: Value =
        serde_json::from_str(&std::fs::read_to_string(workspace().join("tests/fixtures/structured/array.json")).unwrap()).unwrap();
    let single = json!({"prompt": "x", "max_tokens": 100, "temperature": 1.0, "seed": 9,
        "response_format": {"type": "json_schema", "json_schema": {"name": "numbers", "schema": array}}});
    let (status, whole) = server.post("/v1/completions", &single);
    assert_eq!(status, 200, "{whole}");
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let numbers: Vec<u64> = serde_json::from_str(&text).unwrap();
    assert!((1..=5).contains(&numbers.len()) && numbers.iter().all(|&n| n <= 99), "{text}");
    let mut streamed = single.clone();
    streamed["stream"] = json!(true);
    let chunks = server.stream("/v1/completions", &streamed);
    let joined: String = chunks
        .iter()
        .filter(|c| *c != "[DONE]")
        .filter_map(|c| serde_json::from_str::<Value>(c).ok()?["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(joined, text);
    // Any JSON object: the reply opens one, and is one wherever it ends by the grammar.
    let (status, reply) =
        server.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 60, "seed": 1, "response_format": {"type": "json_object"}}));
    assert_eq!(status, 200, "{reply}");
    let object = reply["choices"][0]["text"].as_str().unwrap();
    assert!(object.starts_with('{'), "{reply}");
    if reply["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(object).unwrap().is_object(), "{reply}");
    }

    let (status, reply) = server
        .post("/v1/completions", &json!({"prompt": "x", "max_tokens": 20, "structured_outputs": {"choice": ["yes", "no", "maybe so"]}}));
    assert_eq!(status, 200, "{reply}");
    assert!(["yes", "no", "maybe so"].contains(&reply["choices"][0]["text"].as_str().unwrap()), "{reply}");
    let (status, reply) =
        server.post("/v1/completions", &json!({"prompt": "x", "max_tokens": 20, "structured_outputs": {"regex": "[0-9]{4}"}}));
    assert_eq!(status, 200, "{reply}");
    let digits = reply["choices"][0]["text"].as_str().unwrap();
    assert!(digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_digit()), "{reply}");

    for (format, field) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}}}),
            "response_format",
        ),
        (json!({"response_format": {"type": "yaml"}}), "response_format"),
        (json!({"structured_outputs": {"regex": "([0-9]"}}), "structured_outputs"),
    ] {
        let mut body = json!({"prompt": "x", "max_tokens": 5});
        body.as_object_mut().unwrap().extend(format.as_object().unwrap().clone());
        let (status, reply) = server.post("/v1/completions", &body);
        assert_eq!(status, 400, "{reply}");
        assert_eq!(reply["error"]["param"], field, "{reply}");
    }
    assert_eq!(server.request("GET", "/health", None).0, 200, "the server keeps serving");
}

/// The tools of the tool-calling tests: arguments the grammar keeps short.
fn test_tools() -> Value {
    serde_json::from_str(&std::fs::read_to_string(workspace().join("tests/fixtures/structured/tools.json")).unwrap()).unwrap()
}

/// A call's arguments, checked against its tool's schema as a validator would.
fn assert_valid_call(name: &str, arguments: &str) {
    let arguments: Value = serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{name}: arguments {arguments:?} are not JSON: {e}"));
    let object = arguments.as_object().unwrap();
    match name {
        "calculator" => {
            let expression = object["expression"].as_str().unwrap();
            assert!(object.len() == 1 && (1..=8).contains(&expression.len()), "{arguments}");
            assert!(expression.bytes().all(|b| b.is_ascii_digit() || b"+*-".contains(&b)), "{arguments}");
        }
        "get_weather" => {
            assert_eq!(object.len(), 2, "{arguments}");
            assert!(["Paris", "Oslo"].contains(&object["city"].as_str().unwrap()), "{arguments}");
            assert!(["c", "f"].contains(&object["unit"].as_str().unwrap()), "{arguments}");
        }
        other => panic!("a call to `{other}`, which is not a tool"),
    }
}

/// `tools` and `tool_choice`: a model with no skill at all, held by the grammar, calls a tool
/// with arguments valid under its schema (`message.tool_calls`, `finish_reason: "tool_calls"`);
/// streamed, the tool-call deltas add up to the same call; `auto` leaves text or calls; the
/// turns of a tool loop render; bad tools are 400s naming the field.
#[test]
fn tool_calls_hold_to_the_tools_schemas_and_stream_as_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), "llama");
    let server = Server::start(&checkpoint, &["--max-num-seqs", "4"]);
    let ask = |choice: Value, extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "Weather or sums?"}], "tools": test_tools(), "tool_choice": choice,
            "max_tokens": 120, "temperature": 1.0, "n": 4, "seed": 3, "parallel_tool_calls": false});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, reply) = server.post("/v1/chat/completions", &ask(json!("required"), json!({})));
    assert_eq!(status, 200, "{reply}");
    for choice in reply["choices"].as_array().unwrap() {
        assert_eq!(choice["finish_reason"], "tool_calls", "{choice}");
        assert!(choice["message"]["content"].is_null(), "{choice}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "parallel_tool_calls = false: {choice}");
        assert!(calls[0]["id"].as_str().unwrap().starts_with("call_") && calls[0]["type"] == "function", "{choice}");
        let name = calls[0]["function"]["name"].as_str().unwrap();
        assert_valid_call(name, calls[0]["function"]["arguments"].as_str().unwrap());
    }
    let (status, reply) =
        server.post("/v1/chat/completions", &ask(json!({"type": "function", "function": {"name": "get_weather"}}), json!({"n": 2})));
    assert_eq!(status, 200, "{reply}");
    for choice in reply["choices"].as_array().unwrap() {
        let call = &choice["message"]["tool_calls"][0]["function"];
        assert_eq!(call["name"], "get_weather", "{choice}");
        assert_valid_call("get_weather", call["arguments"].as_str().unwrap());
    }

    // Streamed with the same seed: a role first, the call's id and name once, its arguments in
    // pieces, `finish_reason: "tool_calls"` once; together the non-streamed reply's call.
    let single = ask(json!("required"), json!({"n": 1, "seed": 8}));
    let (status, whole) = server.post("/v1/chat/completions", &single);
    assert_eq!(status, 200, "{whole}");
    let expected = &whole["choices"][0]["message"]["tool_calls"][0]["function"];
    let mut streamed = single.clone();
    streamed["stream"] = json!(true);
    let chunks: Vec<Value> = server
        .stream("/v1/chat/completions", &streamed)
        .iter()
        .filter(|c| *c != "[DONE]")
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (mut name, mut arguments, mut ids, mut finishes, mut pieces) = (String::new(), String::new(), 0, Vec::new(), 0);
    for chunk in &chunks {
        let choice = &chunk["choices"][0];
        if let Some(finish) = choice["finish_reason"].as_str() {
            finishes.push(finish.to_string());
        }
        assert!(choice["delta"].get("content").is_none_or(|c| c.as_str().is_some_and(str::is_empty)), "{chunk}");
        for call in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(call["index"], 0);
            if let Some(n) = call["function"]["name"].as_str() {
                ids += 1;
                assert!(call["id"].as_str().unwrap().starts_with("call_"));
                name.push_str(n);
            }
            arguments.push_str(call["function"]["arguments"].as_str().unwrap());
            pieces += 1;
        }
    }
    assert_eq!((ids, finishes), (1, vec!["tool_calls".to_string()]));
    assert_eq!((name.as_str(), arguments.as_str()), (expected["name"].as_str().unwrap(), expected["arguments"].as_str().unwrap()));
    assert!(pieces > 2, "the arguments stream as they are generated ({pieces} deltas)");

    // auto: text that opens no call, or calls; either way what comes back is whole.
    let (status, reply) = server.post("/v1/chat/completions", &ask(json!("auto"), json!({"n": 4, "seed": 5})));
    assert_eq!(status, 200, "{reply}");
    for choice in reply["choices"].as_array().unwrap() {
        match choice["message"]["tool_calls"].as_array() {
            Some(calls) => {
                assert_valid_call(calls[0]["function"]["name"].as_str().unwrap(), calls[0]["function"]["arguments"].as_str().unwrap())
            }
            None => assert!(!choice["message"]["content"].as_str().unwrap().starts_with("<tool_call>"), "{choice}"),
        }
    }
    // The turns of a tool loop: the assistant's call (arguments as a string) and the result.
    let loop_turns = json!({"messages": [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\":\"2+3\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}],
        "tools": test_tools(), "max_tokens": 5});
    let (status, reply) = server.post("/v1/chat/completions", &loop_turns);
    assert_eq!(status, 200, "{reply}");

    for (body, field) in [
        (json!({"tools": {"calculator": {}}}), "tools"),
        (json!({"tools": [test_tools()[0], test_tools()[0]]}), "tools"),
        (json!({"tools": test_tools(), "tool_choice": {"type": "function", "function": {"name": "weather"}}}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": test_tools(), "tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tools": test_tools(), "response_format": {"type": "json_object"}}), "tool_choice"),
        (json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "integr"}}}]}), "tools"),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": "{"}}]}]}),
            "messages[0].tool_calls[0]",
        ),
    ] {
        let mut request = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5});
        request.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        let (status, reply) = server.post("/v1/chat/completions", &request);
        assert_eq!(status, 400, "{body} → {reply}");
        assert_eq!(reply["error"]["param"], field, "{body} → {reply}");
    }
    assert_eq!(server.request("GET", "/health", None).0, 200, "the server keeps serving");
}

/// `--lora NAME=DIR`: a PEFT adapter served beside the base by its name; each model's greedy
/// text is `furnace generate`'s (with `--adapter` for the adapter), `/v1/models` lists both, and
/// bad flags stop the server with the flag named.
#[test]
fn lora_adapters_are_served_by_name_beside_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_checkpoint(dir.path(), "llama");
    let tuned = dir.path().join("tuned");
    let trained = furnace(&[
        "train",
        "--config",
        dir.path().join("tiny.toml").to_str().unwrap(),
        "--set",
        &format!("model.init_from=\"{base}\""),
        "--set",
        "lora.r=4",
        "--set",
        "training.steps=4",
        "--set",
        "optimizer.lr=0.05",
        "--set",
        &format!("run.output_dir={}", tuned.display()),
    ]);
    assert!(trained.status.success(), "{}", text(&trained));
    let peft = dir.path().join("peft");
    let exported = furnace(&["export", "--checkpoint", tuned.to_str().unwrap(), "--format", "peft", "--out", peft.to_str().unwrap()]);
    assert!(exported.status.success(), "{}", text(&exported));
    let lora = format!("tuned={}", peft.display());
    let server = Server::start(&base, &["--lora", &lora]);

    let (status, _, body) = server.request("GET", "/v1/models", None);
    assert_eq!(status, 200);
    let models: Value = serde_json::from_slice(&body).unwrap();
    let listed: Vec<(&str, &Value)> =
        models["data"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap(), &m["parent"])).collect();
    assert_eq!(listed, [("tiny", &Value::Null), ("tuned", &json!("tiny"))]);

    let prompt = "Once upon a time";
    let mut logprobs = Vec::new();
    for (model, adapter) in [("tiny", None), ("tuned", Some(peft.to_str().unwrap()))] {
        let request = json!({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true, "logprobs": 1});
        let (status, reply) = server.post("/v1/completions", &request);
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["model"], model);
        let mut args =
            vec!["generate", "--checkpoint", &base, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8", "--ignore-eos"];
        if let Some(adapter) = adapter {
            args.extend(["--adapter", adapter]);
        }
        let generated = furnace(&args);
        assert!(generated.status.success(), "{}", text(&generated));
        let expected = String::from_utf8_lossy(&generated.stdout).trim_end_matches('\n').to_string();
        assert_eq!(format!("{prompt}{}", reply["choices"][0]["text"].as_str().unwrap()), expected, "{model}");
        logprobs.push(reply["choices"][0]["logprobs"]["token_logprobs"].clone());
    }
    assert_ne!(logprobs[0], logprobs[1], "the adapter changes the model");
    let (status, reply) = server.post("/v1/completions", &json!({"model": "other", "prompt": prompt, "max_tokens": 2}));
    assert_eq!(status, 400, "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("`tiny`, `tuned`"), "{reply}");
    drop(server);

    for (flag, says) in [
        ("tuned".to_string(), "NAME=DIR"),
        (format!("tiny={}", peft.display()), "is taken"),
        ("x=/nonexistent".to_string(), "adapter_config.json"),
    ] {
        let out = furnace(&["serve", "--checkpoint", &base, "--port", "0", "--served-model-name", "tiny", "--lora", &flag]);
        assert!(!out.status.success() && text(&out).contains(says) && !text(&out).contains("panicked"), "{flag}: {}", text(&out));
    }
}

/// An encoder (BERT) serves `/v1/embeddings`, each vector the model's own mean-pooled last
/// hidden state (checked against transformers' `BertModel` in models/tests/hf_fidelity.rs);
/// the generating endpoints are a 400 naming the model.
#[test]
fn an_encoder_serves_embeddings_only() {
    use burn::backend::Flex;
    use furnace_trainer::commands::{decoding_model, load_for_decoding};
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), "bert");
    let server = Server::start(&checkpoint, &[]);
    let input = "Once upon a time";
    let (status, reply) = server.post("/v1/embeddings", &json!({"model": "tiny", "input": [input, "a fox"], "encoding_format": "float"}));
    assert_eq!(status, 200, "{reply}");
    let served: Vec<f32> = reply["data"][0]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let path = std::path::Path::new(&checkpoint);
    let (recipe, tokenizer, weights) = load_for_decoding(path, None, None).unwrap();
    let model = decoding_model::<Flex>(&recipe, &tokenizer, &weights, path, &Default::default()).unwrap();
    let expected = model.mean_hidden(&tokenizer.encode(input), &Default::default());
    assert_eq!(served.len(), expected.len());
    assert!(served.iter().zip(&expected).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs().max(1.0)), "{served:?} vs {expected:?}");
    assert_ne!(reply["data"][0]["embedding"], reply["data"][1]["embedding"]);
    for (path, body) in [
        ("/v1/completions", json!({"prompt": input, "max_tokens": 2})),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}]})),
    ] {
        let (status, reply) = server.post(path, &body);
        assert_eq!(status, 400, "{reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains("/v1/embeddings only"), "{reply}");
    }
    assert_eq!(server.request("GET", "/health", None).0, 200);
}

/// The paged KV cache: with too few blocks for every sequence at once, the newest is
/// preempted and recomputed, and every reply is still the one it gets alone; a prompt that
/// shares whole blocks with an earlier one takes them from the prefix cache (seen in /metrics).
#[test]
fn a_full_cache_preempts_the_newest_and_shared_prefixes_are_computed_once() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), "llama");
    // 12 blocks of 16 positions; four sequences of ~70 positions need 20.
    let server = Server::start(&checkpoint, &["--max-num-seqs", "4", "--num-kv-blocks", "12", "--prefill-chunk", "8"]);
    let prompts = ["Once upon a time", "The fox and the dog", "A little girl named Lily", "One day, a big"];
    let request = |prompt: &str| json!({"prompt": prompt, "max_tokens": 60, "temperature": 0, "ignore_eos": true});
    let alone: Vec<Value> = prompts.iter().map(|p| server.post("/v1/completions", &request(p)).1["choices"][0]["text"].clone()).collect();
    assert_eq!(metric(&server.metrics(), "furnace_num_preemptions_total"), 0.0, "one at a time fits");
    let (server, request) = (&server, &request);
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|p| s.spawn(move || server.post("/v1/completions", &request(p)))).collect();
        handles.into_iter().map(|h| h.join().unwrap().1["choices"][0]["text"].clone()).collect()
    });
    assert_eq!(together, alone, "replies under preemption");
    let metrics = server.metrics();
    assert!(metric(&metrics, "furnace_num_preemptions_total") > 0.0, "{metrics}");
    // The engine reports its gauges after the step that sent the last replies.
    let settled = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        metric(&server.metrics(), "furnace_kv_cache_blocks_used") == 0.0
    });
    assert!(settled, "every block is back: {}", server.metrics());
    assert_eq!(metric(&server.metrics(), "furnace_kv_cache_blocks_free"), 12.0);

    // A system prompt of several blocks, shared by two chats: the second reads only its own tail.
    let system = "You are a storyteller. ".repeat(8);
    let chat = |question: &str| json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}], "max_tokens": 4, "temperature": 0});
    let hits = metric(&server.metrics(), "furnace_prefix_cache_hits_total");
    let (status, first) = server.post("/v1/chat/completions", &chat("A tale?"));
    assert_eq!(status, 200, "{first}");
    let (_, second) = server.post("/v1/chat/completions", &chat("Another?"));
    let shared_prompt = first["usage"]["prompt_tokens"].as_f64().unwrap().min(second["usage"]["prompt_tokens"].as_f64().unwrap());
    let found = metric(&server.metrics(), "furnace_prefix_cache_hits_total") - hits;
    assert!(found >= 16.0 && found <= shared_prompt, "{found} prompt tokens from the prefix cache of {shared_prompt}");
    assert!(metric(&server.metrics(), "furnace_prefix_cache_hit_rate") > 0.0);
}
