//! Built-in corpora generated from a seed, so the quickstart and the tests need no download.

use furnace_core::rng::SeededRng;

use serde_json::{json, Value};

use crate::chat::{Conversation, FunctionCall, Message, Preference, ToolCall};

/// One arithmetic problem: `a op b = answer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub a: u64,
    pub op: char,
    pub b: u64,
}

impl Problem {
    pub fn answer(&self) -> i64 {
        let (a, b) = (self.a as i64, self.b as i64);
        match self.op {
            '+' => a + b,
            '-' => a - b,
            '*' => a * b,
            other => unreachable!("operator {other} is rejected by recipe validation"),
        }
    }

    /// What the model is given: `37+45=`.
    pub fn prompt(&self) -> String {
        format!("{}{}{}=", self.a, self.op, self.b)
    }

    /// The expression alone: `37+45`.
    pub fn expression(&self) -> String {
        format!("{}{}{}", self.a, self.op, self.b)
    }

    /// The training document: `37+45=82`.
    pub fn text(&self) -> String {
        format!("{}{}", self.prompt(), self.answer())
    }

    /// The problem as a chat question, in one of a few phrasings (`style` picks; 0 is
    /// "What is 37+45?", the one evaluation asks).
    pub fn question(&self, style: usize) -> String {
        let expr = self.expression();
        match style % 4 {
            0 => format!("What is {expr}?"),
            1 => format!("Compute {expr}."),
            2 => format!("{expr} = ?"),
            _ => format!("Calculate {expr}."),
        }
    }

    /// The problem in English words, for the encoder-decoder task words → digits:
    /// "thirty-seven plus forty-five" (answer "82").
    pub fn words(&self) -> String {
        let op = match self.op {
            '+' => "plus",
            '-' => "minus",
            '*' => "times",
            other => unreachable!("operator {other} is rejected by recipe validation"),
        };
        format!("{} {op} {}", number_words(self.a), number_words(self.b))
    }

    /// Held-out problems are a fixed tenth of the problem space, chosen by a hash of the
    /// problem itself, so no held-out problem ever appears in training data.
    pub fn is_held_out(&self) -> bool {
        let mut h = SeededRng::new(self.a.wrapping_mul(1_000_003) ^ self.b.wrapping_mul(7919) ^ self.op as u64);
        h.next_u64().is_multiple_of(10)
    }
}

/// A number in English words: 0 "zero", 37 "thirty-seven", 412 "four hundred twelve",
/// 1_005 "one thousand five".
pub fn number_words(n: u64) -> String {
    const ONES: [&str; 20] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
    ];
    const TENS: [&str; 10] = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"];
    const SCALES: [(u64, &str); 4] =
        [(1_000_000_000_000, "trillion"), (1_000_000_000, "billion"), (1_000_000, "million"), (1_000, "thousand")];
    if let Some(&(scale, name)) = SCALES.iter().find(|(scale, _)| n >= *scale) {
        let rest = n % scale;
        let head = format!("{} {name}", number_words(n / scale));
        return if rest == 0 { head } else { format!("{head} {}", number_words(rest)) };
    }
    match n {
        0..=19 => ONES[n as usize].to_string(),
        20..=99 if n.is_multiple_of(10) => TENS[n as usize / 10].to_string(),
        20..=99 => format!("{}-{}", TENS[n as usize / 10], ONES[n as usize % 10]),
        _ if n.is_multiple_of(100) => format!("{} hundred", ONES[n as usize / 100]),
        _ => format!("{} hundred {}", ONES[n as usize / 100], number_words(n % 100)),
    }
}

#[derive(Debug, Clone)]
pub struct ArithmeticConfig {
    pub digits: usize,
    pub operators: Vec<char>,
}

/// `count` problems from the training part (or, with `held_out`, the held-out part) of the space.
pub fn arithmetic(config: &ArithmeticConfig, count: usize, seed: u64, held_out: bool) -> Vec<Problem> {
    let mut rng = SeededRng::new(seed);
    let limit = 10u64.pow(config.digits as u32);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        // Operand lengths are drawn first, so short numbers are as common as long ones.
        let operand = |rng: &mut SeededRng| {
            let digits = 1 + rng.below(config.digits);
            let low = if digits == 1 { 0 } else { 10u64.pow(digits as u32 - 1) };
            low + rng.below((10u64.pow(digits as u32) - low) as usize) as u64
        };
        let a = operand(&mut rng).min(limit - 1);
        let b = operand(&mut rng).min(limit - 1);
        let op = config.operators[rng.below(config.operators.len())];
        let problem = Problem { a, op, b };
        if problem.is_held_out() == held_out {
            out.push(problem);
        }
    }
    out
}

/// Problems as single-turn conversations: a question in a random phrasing; the reply restates
/// the problem and solves it (`37+45=82`), the form the pretrained model already computes in.
pub fn arithmetic_conversations(config: &ArithmeticConfig, count: usize, seed: u64, held_out: bool) -> Vec<Conversation> {
    let mut rng = SeededRng::new(seed ^ 0xC4A7);
    arithmetic(config, count, seed, held_out)
        .into_iter()
        .map(|p| Conversation::new(vec![Message::new("user", p.question(rng.below(4))), Message::new("assistant", p.text())]))
        .collect()
}

/// The one tool of the tool-use task, as OpenAI's `tools` list holds it.
pub fn calculator_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluates an arithmetic expression of whole numbers with + - * and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. 412*37", "pattern": "^[0-9+*() -]+$"}},
            "required": ["expression"],
        },
    }})
}

/// The `calculator` tool itself: a whole-number expression of + - * and parentheses, evaluated
/// with the usual precedence; None for anything else (or an overflow).
pub fn calculate(expression: &str) -> Option<i64> {
    fn sum(s: &[u8], at: &mut usize) -> Option<i64> {
        let mut value = product(s, at)?;
        while let Some(&op) = s.get(*at).filter(|c| matches!(c, b'+' | b'-')) {
            *at += 1;
            let rhs = product(s, at)?;
            value = if op == b'+' { value.checked_add(rhs)? } else { value.checked_sub(rhs)? };
        }
        Some(value)
    }
    fn product(s: &[u8], at: &mut usize) -> Option<i64> {
        let mut value = atom(s, at)?;
        while s.get(*at) == Some(&b'*') {
            *at += 1;
            value = value.checked_mul(atom(s, at)?)?;
        }
        Some(value)
    }
    fn atom(s: &[u8], at: &mut usize) -> Option<i64> {
        match s.get(*at)? {
            b'(' => {
                *at += 1;
                let value = sum(s, at)?;
                (s.get(*at) == Some(&b')')).then(|| *at += 1)?;
                Some(value)
            }
            b'-' => {
                *at += 1;
                atom(s, at)?.checked_neg()
            }
            _ => {
                let start = *at;
                while s.get(*at).is_some_and(u8::is_ascii_digit) {
                    *at += 1;
                }
                std::str::from_utf8(&s[start..*at]).ok()?.parse().ok()
            }
        }
    }
    let compact: Vec<u8> = expression.bytes().filter(|b| *b != b' ').collect();
    let mut at = 0;
    let value = sum(&compact, &mut at)?;
    (at == compact.len()).then_some(value)
}

/// Problems as tool use: the user asks (in a random phrasing), the assistant calls the
/// `calculator` tool with the expression, the tool answers with the result, and the assistant
/// replies with the solved problem (`412*37=15244`), copying the result it was given.
pub fn arithmetic_tool_conversations(config: &ArithmeticConfig, count: usize, seed: u64, held_out: bool) -> Vec<Conversation> {
    let mut rng = SeededRng::new(seed ^ 0x7001);
    arithmetic(config, count, seed, held_out)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let id = format!("call_{i}");
            let call = ToolCall {
                id: Some(id.clone()),
                kind: "function".into(),
                function: FunctionCall { name: "calculator".into(), arguments: json!({"expression": p.expression()}) },
            };
            let assistant_call = Message { tool_calls: vec![call], ..Message::new("assistant", "") };
            let result = Message { tool_call_id: Some(id), ..Message::new("tool", p.answer().to_string()) };
            let messages =
                vec![Message::new("user", p.question(rng.below(4))), assistant_call, result, Message::new("assistant", p.text())];
            Conversation { messages, tools: vec![calculator_tool()] }
        })
        .collect()
}

/// Problems as preference pairs: the question in a random phrasing, the solved problem chosen,
/// the same problem with a wrong answer (off by ±1, ±2 or ±10) rejected.
pub fn arithmetic_preferences(config: &ArithmeticConfig, count: usize, seed: u64, held_out: bool) -> Vec<Preference> {
    let mut rng = SeededRng::new(seed ^ 0xD9_0F);
    arithmetic(config, count, seed, held_out)
        .into_iter()
        .map(|p| {
            let offsets = [1i64, -1, 2, -2, 10, -10];
            let wrong = p.answer() + offsets[rng.below(offsets.len())];
            Preference { prompt: p.question(rng.below(4)), chosen: p.text(), rejected: format!("{}{wrong}", p.prompt()) }
        })
        .collect()
}

const NAMES: &[&str] = &["Tim", "Lily", "Max", "Sara", "Ben", "Mia", "Leo", "Zoe", "Sam", "Anna"];
const ANIMALS: &[&str] = &["fox", "cat", "dog", "bird", "bear", "rabbit", "owl", "frog"];
const PLACES: &[&str] = &["forest", "garden", "village", "river", "hill", "park", "beach", "farm"];
const OBJECTS: &[&str] = &["key", "ball", "box", "hat", "kite", "book", "shell", "apple"];
const ADJECTIVES: &[&str] = &["shiny", "red", "small", "big", "old", "soft", "blue", "strange"];
const FEELINGS: &[&str] = &["happy", "sad", "curious", "brave", "tired", "proud", "scared"];

/// A short story from a small grammar: a character, a place, an object and a few events.
pub fn story(rng: &mut SeededRng) -> String {
    let mut pick = |list: &[&'static str]| list[rng.below(list.len())];
    let name = pick(NAMES);
    let friend = pick(NAMES);
    let animal = pick(ANIMALS);
    let place = pick(PLACES);
    let object = pick(OBJECTS);
    let adjective = pick(ADJECTIVES);
    let feeling = pick(FEELINGS);
    let other_place = pick(PLACES);
    let ending = pick(FEELINGS);
    let mut s = format!("Once upon a time, there was a little {animal} named {name}. {name} lived near the {place}. ");
    s += &format!("One day, {name} found a {adjective} {object} by the {other_place}. {name} felt {feeling}. ");
    let event = rng.below(3);
    s += &match event {
        0 => format!("{name} showed the {object} to {friend}. {friend} said, \"Let us keep it safe.\" "),
        1 => format!("{name} lost the {object} in the {place}. {friend} helped {name} look for it. "),
        _ => format!("{name} gave the {object} to {friend}. {friend} smiled and said thank you. "),
    };
    s += &format!("At the end of the day, {name} and {friend} went home. They were {ending}.");
    s
}

pub fn stories(count: usize, seed: u64) -> Vec<String> {
    let mut rng = SeededRng::new(seed);
    (0..count).map(|_| story(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_correct_and_held_out_split_is_disjoint() {
        let config = ArithmeticConfig { digits: 2, operators: vec!['+', '-', '*'] };
        let train = arithmetic(&config, 2000, 1, false);
        let val = arithmetic(&config, 200, 2, true);
        assert!(train.iter().all(|p| !p.is_held_out()) && val.iter().all(Problem::is_held_out));
        assert!(train.iter().all(|p| p.a < 100 && p.b < 100));
        assert_eq!(Problem { a: 37, op: '+', b: 45 }.text(), "37+45=82");
        assert_eq!(Problem { a: 3, op: '-', b: 45 }.text(), "3-45=-42");
    }

    #[test]
    fn conversations_ask_in_words_and_reply_with_the_solved_problem() {
        let config = ArithmeticConfig { digits: 2, operators: vec!['+', '-'] };
        let problems = arithmetic(&config, 50, 4, true);
        let conversations = arithmetic_conversations(&config, 50, 4, true);
        let mut styles = std::collections::BTreeSet::new();
        for (p, c) in problems.iter().zip(&conversations) {
            let c = &c.messages;
            assert_eq!((c[0].role.as_str(), c[1].role.as_str()), ("user", "assistant"));
            styles.insert((0..4).find(|&style| c[0].content == p.question(style)).expect("a known phrasing"));
            assert_eq!(c[1].content, p.text());
        }
        assert_eq!(styles.len(), 4, "every phrasing appears");
    }

    #[test]
    fn the_calculator_evaluates_what_the_task_asks_and_refuses_the_rest() {
        let config = ArithmeticConfig { digits: 3, operators: vec!['+', '-', '*'] };
        for p in arithmetic(&config, 200, 9, false) {
            assert_eq!(calculate(&p.expression()), Some(p.answer()), "{}", p.expression());
        }
        assert_eq!(calculate("2+3*(4-1)"), Some(11));
        assert_eq!(calculate(" -2 * 3 "), Some(-6));
        for bad in ["", "2+", "2**3", "(1+2", "1+2)", "x", "99999999999*99999999999"] {
            assert_eq!(calculate(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn tool_conversations_call_the_calculator_and_answer_with_its_result() {
        let config = ArithmeticConfig { digits: 3, operators: vec!['+', '-', '*'] };
        let problems = arithmetic(&config, 20, 5, true);
        for (p, c) in problems.iter().zip(arithmetic_tool_conversations(&config, 20, 5, true)) {
            let roles: Vec<&str> = c.messages.iter().map(|m| m.role.as_str()).collect();
            assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
            let call = &c.messages[1].tool_calls[0];
            assert_eq!((call.function.name.as_str(), &call.function.arguments), ("calculator", &json!({"expression": p.expression()})));
            assert_eq!(c.messages[2].content, calculate(&p.expression()).unwrap().to_string());
            assert_eq!(c.messages[2].tool_call_id, call.id);
            assert_eq!(c.messages[3].content, p.text());
            assert_eq!(c.tools, [calculator_tool()]);
        }
    }

    #[test]
    fn preference_pairs_choose_the_right_answer_over_a_near_miss() {
        let config = ArithmeticConfig { digits: 2, operators: vec!['+', '-'] };
        let problems = arithmetic(&config, 40, 5, false);
        for (p, pair) in problems.iter().zip(arithmetic_preferences(&config, 40, 5, false)) {
            assert_eq!(pair.chosen, p.text());
            let wrong: i64 = pair.rejected.strip_prefix(&p.prompt()).unwrap().parse().unwrap();
            assert!([1, 2, 10].contains(&(wrong - p.answer()).abs()), "{}", pair.rejected);
            assert!((0..4).any(|style| pair.prompt == p.question(style)));
        }
    }

    #[test]
    fn numbers_and_problems_in_words() {
        let cases = [
            (0, "zero"),
            (7, "seven"),
            (13, "thirteen"),
            (40, "forty"),
            (37, "thirty-seven"),
            (100, "one hundred"),
            (412, "four hundred twelve"),
            (1_005, "one thousand five"),
            (2_300_019, "two million three hundred thousand nineteen"),
        ];
        for (n, words) in cases {
            assert_eq!(number_words(n), words);
        }
        assert_eq!(Problem { a: 37, op: '+', b: 45 }.words(), "thirty-seven plus forty-five");
        assert_eq!(Problem { a: 3, op: '-', b: 12 }.words(), "three minus twelve");
    }

    #[test]
    fn same_seed_same_corpus() {
        assert_eq!(stories(5, 3), stories(5, 3));
        assert_ne!(stories(5, 3), stories(5, 4));
    }
}
