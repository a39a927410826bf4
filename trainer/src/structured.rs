//! Structured output: a reply held to a JSON schema, a regular expression or a Lark grammar.
//! llguidance (the engine behind vLLM's "guidance" backend and llama.cpp's optional one)
//! compiles the grammar against the tokenizer's token bytes; at each step its matcher says
//! which tokens keep the reply inside the language, and which tokens the grammar forces.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use furnace_data::TextTokenizer;
use furnace_models::generate::TokenConstraint;

/// What a reply must match.
#[derive(Debug, Clone)]
pub enum Grammar {
    /// A JSON Schema (the subset llguidance supports: types, properties and required keys,
    /// enums and consts, numeric ranges, string lengths and patterns, array lengths,
    /// anyOf/oneOf/allOf, $ref). Written compact (no whitespace between tokens) unless the
    /// schema's own `x-guidance` options say otherwise.
    JsonSchema(Value),
    /// A regular expression (Rust `regex` syntax) that the whole reply matches.
    Regex(String),
    /// A Lark grammar, in llguidance's dialect (`start: ...`).
    Lark(String),
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                // A model with no taste for layout would otherwise spend its tokens on spaces.
                if let Some(object) = schema.as_object_mut() {
                    object.entry("x-guidance").or_insert_with(|| json!({ "whitespace_flexible": false }));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// The tokenizer as llguidance sees it: each token's bytes (a special token behind the 0xFF
/// marker, so that no text spells it), empty tokens where the model's vocabulary is wider than
/// the tokenizer's, and the tokenizer's own encoding for the text a grammar forces.
struct Tokens {
    trie: TokTrie,
    tokenizer: TextTokenizer,
}

impl TokenizerEnv for Tokens {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(bytes) {
            Ok(text) => self.tokenizer.encode(text),
            Err(_) => self.trie.greedy_tokenize(bytes),
        }
    }
}

/// Grammars compiled for one tokenizer and one model vocabulary (the token table is built
/// once and shared by every reply).
pub struct Grammars {
    factory: ParserFactory,
    eos: u32,
}

impl Grammars {
    pub fn new(tokenizer: &TextTokenizer, vocab_size: usize) -> Result<Self, String> {
        let specials = tokenizer.special_ids();
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                if id as usize >= tokenizer.vocab_size() {
                    Vec::new()
                } else if specials.contains(&id) {
                    [&[TokTrie::SPECIAL_TOKEN_MARKER][..], tokenizer.decode_special(id).as_bytes()].concat()
                } else {
                    tokenizer.token_bytes(id)
                }
            })
            .collect();
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, tokenizer.eos()), &words);
        let env: TokEnv = Arc::new(Tokens { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("structured output: {e}"))?;
        factory.quiet();
        Ok(Self { factory, eos: tokenizer.eos() })
    }

    /// A matcher for one reply. A grammar that does not compile (malformed JSON Schema, an
    /// unsatisfiable one, a bad regular expression or Lark grammar) is an error saying what
    /// llguidance found.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Structured, String> {
        let parser = self.factory.create_parser(grammar.top_level()).map_err(|e| e.to_string())?;
        Ok(Structured { matcher: Matcher::new(Ok(parser)), eos: self.eos, error: None })
    }
}

/// One reply's matcher (a `TokenConstraint` for generation).
pub struct Structured {
    matcher: Matcher,
    eos: u32,
    error: Option<String>,
}

impl Structured {
    /// Why the matcher failed mid-reply, if it did (the reply then ended there).
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Whether the reply so far is a whole sentence of the grammar (a reply cut by
    /// max_tokens is not).
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }

    /// Advance past `token` alone, leaving the tokens the grammar forces next to be sampled
    /// (from a mask of one): a batched step feeds every row one token.
    pub fn advance(&mut self, token: u32) {
        if self.error.is_none() && !self.matcher.is_stopped() {
            if let Err(e) = self.matcher.consume_token(token) {
                self.fail(e.to_string());
            }
        }
    }

    fn fail(&mut self, error: String) {
        self.error.get_or_insert(error);
    }
}

impl TokenConstraint for Structured {
    fn mask(&mut self, logits: &mut [f32]) {
        let allowed = match self.error {
            Some(_) => None,
            None => match self.matcher.compute_mask_or_eos() {
                Ok(allowed) if (0..logits.len().min(allowed.len())).any(|t| allowed.is_allowed(t as TokenId)) => Some(allowed),
                Ok(_) => {
                    self.fail("the grammar allows no token of this model's vocabulary here".into());
                    None
                }
                Err(e) => {
                    self.fail(e.to_string());
                    None
                }
            },
        };
        for (token, logit) in logits.iter_mut().enumerate() {
            let keep = match &allowed {
                Some(allowed) => token < allowed.len() && allowed.is_allowed(token as TokenId),
                None => token == self.eos as usize,
            };
            if !keep {
                *logit = f32::NEG_INFINITY;
            }
        }
    }

    fn commit(&mut self, token: u32) -> Vec<u32> {
        self.advance(token);
        if self.error.is_some() || self.matcher.is_stopped() {
            return Vec::new();
        }
        self.matcher.consume_ff_tokens()
    }
}
