//! Evaluation that depends on the data rather than the training mode: greedy exact match when
//! the data source is the arithmetic task (its held-out problems are known), the tool-use loop
//! on the arithmetic tool task, and the greedy sample a generative run ends with.

use anyhow::{Context as _, Result};
use furnace_configs::DataSource;
use furnace_data::chat::{FunctionCall, Message, ToolCall};
use furnace_data::corpus::{arithmetic_config, val_seed};
use furnace_data::generators::{arithmetic, calculate, calculator_tool};
use furnace_models::LanguageModel;
use serde_json::{json, Value};

use crate::backend::TrainBackend;
use crate::context::Context;
use crate::evaluate::{arithmetic_exact_match, greedy, reply, Asked};
use crate::structured::Grammars;
use crate::tools::{scan, Scan, ToolChoice, Tools};

type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;

/// Greedy exact match on the held-out arithmetic problems (the verifier's mean reward),
/// printed and logged as `eval/exact_match`; `when` labels the line. Returns the first
/// question, or None when the data is not arithmetic.
pub fn held_out_exact_match<B: TrainBackend>(cx: &mut Context<B>, model: &LanguageModel<Inner<B>>, when: &str) -> Result<Option<String>> {
    let (eval, data) = (&cx.recipe.eval, &cx.recipe.data);
    if data.source == DataSource::ArithmeticTools && eval.arithmetic_problems > 0 {
        return held_out_tool_use(cx, model, when);
    }
    let arithmetic_data = matches!(
        data.source,
        DataSource::Arithmetic | DataSource::ArithmeticWords | DataSource::ArithmeticChat | DataSource::ArithmeticPreferences
    );
    if !arithmetic_data || eval.arithmetic_problems == 0 {
        return Ok(None);
    }
    let chat = cx.chat_template.is_some();
    let problems = arithmetic(&arithmetic_config(data), eval.arithmetic_problems, val_seed(cx.recipe.run.seed), true);
    let asked = problems
        .iter()
        .map(|p| {
            let (question, expected) = match data.source {
                _ if chat => (p.question(0), p.text()),
                DataSource::ArithmeticWords => (p.words(), p.answer().to_string()),
                _ => (p.prompt(), p.answer().to_string()),
            };
            Ok(Asked { ids: cx.encode_question(&question)?, question, expected })
        })
        .collect::<Result<Vec<_>>>()?;
    let (correct, total, shown) = arithmetic_exact_match(model, &cx.tokenizer, &asked, &cx.device)?;
    println!(
        "exact match on {total} held-out problems (never seen in training){when}: {correct}/{total} = {:.1}%",
        100.0 * correct as f64 / total as f64
    );
    let separator = if cx.reply_apart() { " → " } else { "" };
    for (question, answer, ok) in shown {
        println!("  {question}{separator}{answer}  {}", if ok { "✓" } else { "✗" });
    }
    cx.metrics.log(cx.state.step, &[("eval/exact_match", correct as f64 / total as f64)])?;
    Ok(asked.into_iter().next().map(|a| a.question))
}

/// The tool-use loop on held-out problems, as a client of `furnace serve` runs it: the question
/// asked with the `calculator` tool offered (`tool_choice` auto, the call held to the tool's
/// schema once the model opens one), the tool run on the expression the model sent, its result
/// fed back, and the model's final reply compared with the solved problem. Prints and logs the
/// share of calls that are well-formed with the right arguments (`eval/tool_calls`) and of right
/// final replies (`eval/exact_match`); returns the first question.
fn held_out_tool_use<B: TrainBackend>(cx: &mut Context<B>, model: &LanguageModel<Inner<B>>, when: &str) -> Result<Option<String>> {
    let (eval, data) = (&cx.recipe.eval, &cx.recipe.data);
    let template = cx.chat_template.as_ref().context("tool use is asked through a chat template")?;
    let tools = Tools { definitions: vec![calculator_tool()], choice: ToolChoice::Auto, parallel: false };
    let grammar = tools.grammar().context("tool_choice auto has a grammar")?;
    let grammars = Grammars::new(&cx.tokenizer, model.vocab_size()).map_err(anyhow::Error::msg)?;
    let config = greedy(&cx.tokenizer, eval.max_new_tokens);
    let problems = arithmetic(&arithmetic_config(data), eval.arithmetic_problems, val_seed(cx.recipe.run.seed), true);
    let (mut right_calls, mut right_answers, mut shown) = (0, 0, Vec::new());
    for p in &problems {
        let mut messages = vec![Message::new("user", p.question(0))];
        let prompt = template.render(&messages, &tools.definitions, true).map_err(anyhow::Error::msg)?;
        let mut constraint = grammars.constraint(&grammar).map_err(anyhow::Error::msg)?;
        let out = reply(model, &cx.tokenizer.encode(&prompt), cx.tokenizer.pad(), &config, Some(&mut constraint), &cx.device, |_| {})?;
        let said = cx.tokenizer.decode(&out);
        let arguments = match scan(&said) {
            Scan::Calls(calls) if calls.len() == 1 && calls[0].complete && calls[0].name.as_deref() == Some("calculator") => {
                serde_json::from_str::<Value>(&calls[0].arguments).ok()
            }
            _ => None,
        };
        let Some(arguments) = arguments else {
            if shown.len() < 5 {
                shown.push(format!("  {} → {said:?}  ✗ (no whole call)", p.question(0)));
            }
            continue;
        };
        right_calls += (arguments == json!({"expression": p.expression()})) as usize;
        // The tool runs on what the model sent, right or wrong.
        let result =
            arguments["expression"].as_str().and_then(calculate).map_or_else(|| "error: not an expression".into(), |v| v.to_string());
        let call = ToolCall {
            id: Some("call_0".into()),
            kind: "function".into(),
            function: FunctionCall { name: "calculator".into(), arguments },
        };
        messages.push(Message { tool_calls: vec![call], ..Message::new("assistant", "") });
        messages.push(Message { tool_call_id: Some("call_0".into()), ..Message::new("tool", result.clone()) });
        let prompt = template.render(&messages, &tools.definitions, true).map_err(anyhow::Error::msg)?;
        let out = reply(model, &cx.tokenizer.encode(&prompt), cx.tokenizer.pad(), &config, None, &cx.device, |_| {})?;
        let answer = cx.tokenizer.decode(&out).trim().to_string();
        let ok = answer == p.text();
        right_answers += ok as usize;
        if shown.len() < 5 {
            shown.push(format!("  {} → {said} → {result} → {answer}  {}", p.question(0), if ok { "✓" } else { "✗" }));
        }
    }
    let total = problems.len();
    let share = |n: usize| 100.0 * n as f64 / total as f64;
    println!(
        "tool use on {total} held-out problems (never seen in training){when}: calls well-formed with the right arguments {right_calls}/{total} = {:.1}%, final answers right {right_answers}/{total} = {:.1}%",
        share(right_calls),
        share(right_answers)
    );
    for line in shown {
        println!("{line}");
    }
    let step = cx.state.step;
    cx.metrics
        .log(step, &[("eval/tool_calls", right_calls as f64 / total as f64), ("eval/exact_match", right_answers as f64 / total as f64)])?;
    Ok(problems.first().map(|p| p.question(0)))
}

/// The end of a generative run's report: held-out exact match where the task has it, then a
/// greedy reply to `eval.prompt` (or the first held-out question), then the checkpoint.
pub fn exact_match_and_sample<B: TrainBackend>(cx: &mut Context<B>, model: &LanguageModel<Inner<B>>) -> Result<()> {
    // The tool task's samples are the tool loop's own lines: a question without its tools
    // would show nothing the model learned.
    if cx.recipe.data.source == DataSource::ArithmeticTools && cx.recipe.eval.prompt.is_empty() {
        held_out_exact_match(cx, model, "")?;
        cx.print_checkpoint();
        return Ok(());
    }
    let mut prompt = cx.recipe.eval.prompt.clone();
    if let Some(first_question) = held_out_exact_match(cx, model, "")? {
        if prompt.is_empty() {
            prompt = first_question;
        }
    }
    if prompt.is_empty() {
        prompt = "Once upon a time".into();
    }
    let config = greedy(&cx.tokenizer, cx.recipe.eval.max_new_tokens);
    let out = reply(model, &cx.encode_question(&prompt)?, cx.tokenizer.pad(), &config, None, &cx.device, |_| {})?;
    println!("sample (greedy): {prompt}{}{}", if cx.reply_apart() { " → " } else { "" }, cx.tokenizer.decode(&out));
    cx.print_checkpoint();
    Ok(())
}
