//! Evaluation that depends on the data rather than the training mode: greedy exact match when
//! the data source is the arithmetic task (its held-out problems are known), and the greedy
//! sample a generative run ends with.

use anyhow::Result;
use furnace_configs::DataSource;
use furnace_data::corpus::{arithmetic_config, val_seed};
use furnace_data::generators::arithmetic;
use furnace_models::LanguageModel;

use crate::backend::TrainBackend;
use crate::context::Context;
use crate::evaluate::{arithmetic_exact_match, greedy, reply, Asked};

type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;

/// Greedy exact match on the held-out arithmetic problems (the verifier's mean reward),
/// printed and logged as `eval/exact_match`; `when` labels the line. Returns the first
/// question, or None when the data is not arithmetic.
pub fn held_out_exact_match<B: TrainBackend>(cx: &mut Context<B>, model: &LanguageModel<Inner<B>>, when: &str) -> Result<Option<String>> {
    let (eval, data) = (&cx.recipe.eval, &cx.recipe.data);
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

/// The end of a generative run's report: held-out exact match where the task has it, then a
/// greedy reply to `eval.prompt` (or the first held-out question), then the checkpoint.
pub fn exact_match_and_sample<B: TrainBackend>(cx: &mut Context<B>, model: &LanguageModel<Inner<B>>) -> Result<()> {
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
