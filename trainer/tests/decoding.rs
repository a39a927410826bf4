//! Decoding beyond sampling, end to end. Structured output: a model trained for two steps (no
//! skill at all) samples 100 replies per grammar (JSON schemas, a regular expression, a Lark
//! grammar); every one must be a whole sentence of its grammar, as Python's `jsonschema`, `re`
//! and `ast` judge it (scripts/reference/check_structured.py); tool calls likewise, their
//! arguments against their tool's parameters. Speculative decoding: `furnace generate` with a
//! draft checkpoint or prompt lookup prints greedy decoding's text. Beam search (checked against
//! transformers in models/tests/hf_fidelity.rs) through `furnace generate`.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use serde_json::{json, Value};

use furnace_models::generate::GenerateConfig;
use furnace_models::sampling::SamplingConfig;
use furnace_trainer::commands::{decoding_model, load_for_decoding};
use furnace_trainer::evaluate::reply;
use furnace_trainer::structured::{Grammar, Grammars};
use furnace_trainer::tools::{scan, Scan, ToolChoice, Tools};

mod common;
use common::{furnace, text, tiny_checkpoint, workspace};

const SCHEMAS: [&str; 5] = ["nested", "array", "enums", "ranges", "optional"];
const EXPRESSION_REGEX: &str = r"[0-9]{3}-[0-9]{2}-[A-Z][a-z]{1,6}";

fn fixture(name: &str) -> PathBuf {
    workspace().join("tests/fixtures/structured").join(name)
}

/// `count` replies sampled (temperature 1, seeds 0..count) under `grammar`; each must end
/// with the grammar complete, before max_new_tokens.
fn sample(checkpoint: &Path, grammar: Option<&Grammar>, count: u64) -> Vec<String> {
    let device = Default::default();
    let (recipe, tokenizer, weights) = load_for_decoding(checkpoint, None, None).unwrap();
    let model = decoding_model::<Flex>(&recipe, &tokenizer, &weights, checkpoint, &device).unwrap();
    let grammars = Grammars::new(&tokenizer, model.vocab_size()).unwrap();
    let prompt = tokenizer.encode("Once upon a time");
    (0..count)
        .map(|seed| {
            let config = GenerateConfig {
                max_new_tokens: 200,
                stop_tokens: vec![tokenizer.eos()],
                sampling: SamplingConfig { temperature: 1.0, seed, ..Default::default() },
            };
            let Some(grammar) = grammar else {
                return tokenizer.decode(&reply(&model, &prompt, tokenizer.pad(), &config, None, &device, |_| {}).unwrap());
            };
            let mut constraint = grammars.constraint(grammar).unwrap();
            let tokens = reply(&model, &prompt, tokenizer.pad(), &config, Some(&mut constraint), &device, |_| {}).unwrap();
            let text = tokenizer.decode(&tokens);
            assert_eq!(constraint.error(), None, "seed {seed}: {text:?}");
            assert!(constraint.is_complete(), "seed {seed}: cut before the grammar was complete: {text:?}");
            assert_eq!(tokens.last(), Some(&tokenizer.eos()), "seed {seed}: the grammar's end is end-of-text");
            text
        })
        .collect()
}

#[test]
fn every_sampled_reply_is_valid_under_its_grammar() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = PathBuf::from(tiny_checkpoint(dir.path(), "llama"));
    let mut json_groups = Vec::new();
    for name in SCHEMAS {
        let path = fixture(&format!("{name}.json"));
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let replies = sample(&checkpoint, Some(&Grammar::JsonSchema(schema)), 100);
        for reply in &replies {
            assert!(serde_json::from_str::<Value>(reply).is_ok(), "{name}: {reply:?} is not JSON");
        }
        json_groups.push(json!({ "schema": path, "replies": replies }));
    }
    let regex = sample(&checkpoint, Some(&Grammar::Regex(EXPRESSION_REGEX.into())), 100);
    let lark = std::fs::read_to_string(fixture("expression.lark")).unwrap();
    let expressions = sample(&checkpoint, Some(&Grammar::Lark(lark)), 100);
    // Without a grammar the same model writes no JSON at all: the masks do the work.
    let free = sample(&checkpoint, None, 10);
    assert!(free.iter().all(|reply| serde_json::from_str::<Value>(reply).is_err()), "{free:?}");

    let groups = json!({
        "json_schema": json_groups,
        "regex": [{ "pattern": EXPRESSION_REGEX, "replies": regex }],
        "expression": expressions,
    });
    let report = python_checks(dir.path(), &groups);
    assert!(report.contains("700 of 700 replies valid"), "{report}");
}

/// `check_structured.py`'s verdict on `groups`: every reply valid, and how many there were.
fn python_checks(dir: &Path, groups: &Value) -> String {
    let replies = dir.join("replies.json");
    std::fs::write(&replies, groups.to_string()).unwrap();
    let check = Command::new("python3").arg(workspace().join("scripts/reference/check_structured.py")).arg(&replies).output().unwrap();
    let report = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(check.status.success(), "{report}{}", String::from_utf8_lossy(&check.stderr));
    report
}

/// Under `tool_choice` required (and a named function), a model with no skill calls a tool
/// in every reply, and every call's arguments are valid under that tool's parameters.
#[test]
fn every_sampled_tool_call_is_valid_under_its_tools_schema() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = PathBuf::from(tiny_checkpoint(dir.path(), "llama"));
    let definitions: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(fixture("tools.json")).unwrap()).unwrap();
    let mut arguments: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (choice, count) in [(ToolChoice::Required, 80), (ToolChoice::Function("get_weather".into()), 20)] {
        let tools = Tools { definitions: definitions.clone(), choice: choice.clone(), parallel: false };
        for reply in sample(&checkpoint, Some(&tools.grammar().unwrap()), count) {
            let Scan::Calls(calls) = scan(&reply) else { panic!("{choice:?}: {reply:?} is not a call") };
            assert!(calls.len() == 1 && calls[0].complete, "{choice:?}: {reply:?}");
            let name = calls[0].name.clone().unwrap();
            if let ToolChoice::Function(named) = &choice {
                assert_eq!(&name, named);
            }
            arguments.entry(name).or_default().push(calls[0].arguments.clone());
        }
    }
    assert_eq!(arguments.len(), 2, "both tools are called: {arguments:?}");
    let groups: Vec<Value> = definitions
        .iter()
        .map(|tool| {
            let name = tool["function"]["name"].as_str().unwrap();
            let schema = dir.path().join(format!("{name}.json"));
            std::fs::write(&schema, tool["function"]["parameters"].to_string()).unwrap();
            json!({"schema": schema, "replies": arguments[name]})
        })
        .collect();
    let report = python_checks(dir.path(), &json!({ "json_schema": groups }));
    assert!(report.contains("100 of 100 replies valid"), "{report}");
}

#[test]
fn generate_holds_its_reply_to_a_schema_and_names_the_flag_of_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), "llama");
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "--checkpoint", &checkpoint, "--temperature", "1", "--seed", "3", "--max-new-tokens", "200"];
        args.extend_from_slice(extra);
        furnace(&args)
    };
    let schema = fixture("nested.json").display().to_string();
    let out = generate(&["--json-schema", &schema]);
    assert!(out.status.success(), "{}", text(&out));
    let value: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert!(value["name"].is_string() && value["address"]["zip"].as_str().is_some_and(|z| z.len() == 5), "{value}");
    assert!(text(&out).contains("tokens/s"), "{}", text(&out));

    let out = generate(&["--regex", EXPRESSION_REGEX, "--ignore-eos"]);
    assert!(out.status.success(), "{}", text(&out));
    let reply = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let parts: Vec<&str> = reply.split('-').collect();
    assert!(parts.len() == 3 && parts[0].len() == 3 && parts[1].len() == 2, "{reply:?}");
    assert!(text(&out).contains("is complete after"), "--ignore-eos still stops where the grammar ends: {}", text(&out));

    // --tools: the chat prompt lists them and the reply is a call, reported on stderr.
    let tools = fixture("tools.json").display().to_string();
    let out = generate(&["--chat", "--prompt", "Weather?", "--tools", &tools, "--tool-choice", "get_weather"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("<tool_call>{\"name\":\"get_weather\""), "{}", text(&out));
    assert!(text(&out).contains("(tool call: get_weather {\"city\":"), "{}", text(&out));

    let malformed = dir.path().join("malformed.json");
    std::fs::write(&malformed, "{\"type\": \"object\",").unwrap();
    let unsatisfiable = dir.path().join("unsatisfiable.json");
    std::fs::write(&unsatisfiable, r#"{"type": "integer", "minimum": 5, "maximum": 3}"#).unwrap();
    let unknown_type = dir.path().join("unknown.json");
    std::fs::write(&unknown_type, r#"{"type": "integr"}"#).unwrap();
    for (args, says) in [
        (vec!["--json-schema", malformed.to_str().unwrap()], "not valid JSON"),
        (vec!["--json-schema", unsatisfiable.to_str().unwrap()], "--json-schema"),
        (vec!["--json-schema", unknown_type.to_str().unwrap()], "integr"),
        (vec!["--regex", "([0-9]"], "--regex"),
        (vec!["--json-schema", "/nonexistent/schema.json"], "cannot read"),
        (vec!["--chat", "--tools", tools.as_str(), "--tool-choice", "weather"], "--tool-choice weather"),
        (vec!["--chat", "--tools", malformed.to_str().unwrap()], "--tools"),
    ] {
        let out = generate(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let message = text(&out);
        assert!(message.contains(says) && !message.contains("panicked"), "{args:?}: {message}");
    }
}

#[test]
fn speculative_generation_prints_the_models_own_greedy_text() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), "llama");
    // tiny_checkpoint's recipe, with other settings, into `dir/<name>`.
    let train = |name: &str, settings: &[&str]| {
        let run = dir.path().join(name);
        let mut args = vec!["train".to_string(), "--config".into(), dir.path().join("tiny.toml").display().to_string()];
        for setting in settings.iter().map(|s| s.to_string()).chain([format!("run.output_dir={}", run.display())]) {
            args.extend(["--set".to_string(), setting]);
        }
        let out = furnace(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{}", text(&out));
        run
    };
    // A one-layer draft trained on the same data has the same tokenizer.
    let draft = train("draft", &["model.n_layers=1", "training.steps=2"]);
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "--checkpoint", &checkpoint, "--prompt", "the cat and the cat and the", "--temperature", "0"];
        args.extend_from_slice(&["--max-new-tokens", "40", "--ignore-eos"]);
        args.extend_from_slice(extra);
        let out = furnace(&args);
        assert!(out.status.success(), "{extra:?}: {}", text(&out));
        (String::from_utf8_lossy(&out.stdout).to_string(), text(&out))
    };
    let (plain, _) = generate(&[]);
    let (looked_up, report) = generate(&["--prompt-lookup", "--num-speculative-tokens", "3"]);
    assert_eq!(looked_up, plain);
    assert!(report.contains("drafted tokens accepted"), "{report}");
    let (drafted, report) = generate(&["--draft-checkpoint", draft.to_str().unwrap()]);
    assert_eq!(drafted, plain);
    assert!(report.contains("drafted tokens accepted"), "{report}");

    // A draft with another tokenizer is refused, naming the flag.
    let other = train("other", &["data.tokenizer_vocab_size=280", "training.steps=1"]);
    let out = furnace(&["generate", "--checkpoint", &checkpoint, "--draft-checkpoint", other.to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("--draft-checkpoint") && text(&out).contains("tokenizer"), "{}", text(&out));
}

#[test]
fn generate_prints_the_best_beams_with_their_scores() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = tiny_checkpoint(dir.path(), "llama");
    let beams = |extra: &[&str]| {
        let mut args = vec!["generate", "--checkpoint", &checkpoint, "--prompt", "Once upon", "--max-new-tokens", "6", "--num-beams", "4"];
        args.extend_from_slice(extra);
        furnace(&args)
    };
    let out = beams(&["--num-return-sequences", "3", "--length-penalty", "-0.5", "--early-stopping", "never"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let replies: Vec<&str> = stdout.lines().collect();
    assert!(replies.len() == 3 && replies.iter().all(|r| r.starts_with("Once upon")), "{stdout}");
    let scores: Vec<f64> =
        text(&out).lines().filter_map(|l| l.strip_prefix("(beam ")?.split("score ").nth(1)?.split(',').next()?.parse().ok()).collect();
    assert!(scores.len() == 3 && scores.windows(2).all(|w| w[0] >= w[1]), "best first: {}", text(&out));
    let out = beams(&["--num-return-sequences", "5"]);
    assert!(!out.status.success() && text(&out).contains("--num-return-sequences 5"), "{}", text(&out));
    let out = beams(&["--regex", "[0-9]+"]);
    assert!(!out.status.success() && text(&out).contains("--num-beams"), "{}", text(&out));
}
