//! Tokenizers through Hugging Face `tokenizers`: train a byte-level BPE on our text, or load
//! any `tokenizer.json`.

use std::path::Path;

use furnace_configs::SENTINELS;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

/// The document separator, as GPT-2 names it.
pub const END_OF_TEXT: &str = "<|endoftext|>";

/// The masked-LM placeholder, as BERT names it.
pub const MASK: &str = "[MASK]";

/// Special tokens beyond end-of-text that a model's objective needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraTokens {
    None,
    /// BERT's `[MASK]`.
    Mask,
    /// T5's span-corruption sentinels `<extra_id_0>` … `<extra_id_99>` ([`SENTINELS`]).
    Sentinels,
}

fn sentinel(i: usize) -> String {
    format!("<extra_id_{i}>")
}

/// The size of the pieces long texts are encoded in.
pub(crate) const ENCODE_PIECE_BYTES: usize = 1 << 20;

/// Where the first piece of `text` ends: all of it when it is at most `max_bytes`, else just
/// before the last space between two non-spaces within `max_bytes` (the byte-level
/// pre-tokenizer splits there too: the space starts the next word, and no merge crosses a
/// split, so the pieces' tokens are the whole text's); a stretch of `max_bytes` without such a
/// space is cut at a character boundary instead. The cut depends only on the first
/// `max_bytes + 4` bytes, so a stream can be cut before it is read whole.
pub(crate) fn cut_point(text: &str, max_bytes: usize) -> usize {
    if text.len() <= max_bytes {
        return text.len();
    }
    let mut limit = max_bytes;
    while !text.is_char_boundary(limit) {
        limit -= 1;
    }
    let at_word = text[..limit].char_indices().rev().find(|&(i, c)| {
        c == ' '
            && i > 0
            && text[..i].chars().next_back().is_some_and(|p| !p.is_whitespace())
            && text[i + 1..].chars().next().is_some_and(|n| !n.is_whitespace())
    });
    at_word.map_or(limit.max(text.chars().next().map_or(1, char::len_utf8)), |(i, _)| i)
}

/// `text` cut into pieces at [`cut_point`]s.
fn pieces(text: &str, max_bytes: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (piece, tail) = rest.split_at(cut_point(rest, max_bytes));
        rest = tail;
        Some(piece)
    })
}

#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    eos: u32,
}

impl TextTokenizer {
    /// Train a byte-level BPE with `vocab_size` entries (256 bytes + merges + `<|endoftext|>`
    /// and the `extra` tokens). Digits are split one per token before BPE (as
    /// Llama's tokenizer does), so numbers are read digit by digit and arithmetic stays
    /// learnable. `[MASK]` takes the space before it (as RoBERTa's `<mask>`), so "the [MASK]
    /// sat" hides a whole word the way training's masking did.
    pub fn train(documents: &[String], vocab_size: usize, extra: ExtraTokens) -> Result<Self, String> {
        let mut special_tokens = vec![AddedToken::from(END_OF_TEXT, true)];
        match extra {
            ExtraTokens::None => {}
            ExtraTokens::Mask => special_tokens.push(AddedToken::from(MASK, true).lstrip(true)),
            ExtraTokens::Sentinels => special_tokens.extend((0..SENTINELS).map(|i| AddedToken::from(sentinel(i), true))),
        }
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(special_tokens)
            .build();
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer = Sequence::new(vec![Digits::new(true).into(), byte_level.into()]);
        let mut tokenizer = TokenizerBuilder::<BPE, _, _, _, _>::new()
            .with_model(BPE::default())
            .with_normalizer(None::<tokenizers::NormalizerWrapper>)
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level))
            .build()
            .map_err(|e| e.to_string())?;
        // In pieces, as `encode` reads text: the same words, counted in bounded memory.
        let texts = documents.iter().flat_map(|d| pieces(d, ENCODE_PIECE_BYTES));
        tokenizer.train(&mut trainer, texts).map_err(|e| format!("tokenizer training failed: {e}"))?;
        Self::from_tokenizer(Tokenizer::from(tokenizer))
    }

    /// Load a Hugging Face `tokenizer.json`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let inner = Tokenizer::from_file(path).map_err(|e| format!("cannot load tokenizer {}: {e}", path.display()))?;
        Self::from_tokenizer(inner)
    }

    fn from_tokenizer(inner: Tokenizer) -> Result<Self, String> {
        let eos = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .ok_or("the tokenizer has no end-of-text token (<|endoftext|>, </s>, <eos>)")?;
        Ok(Self { inner, eos })
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        self.inner.save(path, false).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub fn to_json(&self) -> String {
        self.inner.to_string(false).expect("tokenizer serializes")
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The padding token: `<pad>` where the tokenizer has one (T5's, which also starts its
    /// decoder), else end-of-text, which Furnace pads with.
    pub fn pad(&self) -> u32 {
        self.inner.token_to_id("<pad>").unwrap_or(self.eos)
    }

    /// The masked-LM placeholder (`[MASK]`, or RoBERTa's `<mask>`), if the tokenizer has one.
    pub fn mask(&self) -> Option<u32> {
        [MASK, "<mask>"].iter().find_map(|t| self.inner.token_to_id(t))
    }

    /// T5's sentinels `<extra_id_0>`, `<extra_id_1>`, … as far as the tokenizer has them.
    pub fn sentinels(&self) -> Vec<u32> {
        (0..).map_while(|i| self.inner.token_to_id(&sentinel(i))).collect()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The token ids of `text`, encoded in pieces of about `ENCODE_PIECE_BYTES` (see `pieces`):
    /// a 50 MB line then needs megabytes, not the gigabytes of one whole encoding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for piece in pieces(text, ENCODE_PIECE_BYTES) {
            ids.extend_from_slice(self.inner.encode(piece, false).expect("byte-level encoding cannot fail").get_ids());
        }
        ids
    }

    /// Token ids and each token's byte span in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> (Vec<u32>, Vec<(usize, usize)>) {
        let encoding = self.inner.encode(text, false).expect("byte-level encoding cannot fail");
        (encoding.get_ids().to_vec(), encoding.get_offsets().to_vec())
    }

    /// The text of one token, special tokens included (e.g. `<|endoftext|>`).
    pub fn decode_special(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }

    /// The text of `ids` with special tokens written out (a T5's sentinels, end-of-text).
    pub fn decode_keeping_special(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }

    /// The special tokens (end-of-text, `[MASK]`, sentinels, chat markers): tokens that stand
    /// for no text of their own.
    pub fn special_ids(&self) -> Vec<u32> {
        self.inner.get_added_tokens_decoder().iter().filter(|(_, token)| token.special).map(|(&id, _)| id).collect()
    }

    /// The bytes one token stands for: what a byte-level BPE token encodes (a token may hold part
    /// of a multi-byte character, which its text cannot show), a special token's text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let byte_level = matches!(self.inner.get_decoder(), Some(tokenizers::DecoderWrapper::ByteLevel(_)));
        let token = self.inner.id_to_token(id).unwrap_or_default();
        match byte_level.then(|| token.chars().map(byte_of_char).collect::<Option<Vec<u8>>>()).flatten() {
            Some(bytes) => bytes,
            None => self.decode_keeping_special(&[id]).into_bytes(),
        }
    }
}

/// A growing reply's text, decoded a few tokens at a time (the window vLLM and TGI decode): each
/// new token decodes the tokens since the last complete text and keeps the difference, so a
/// reply of n tokens costs O(n) rather than re-decoding all of it each token. Decoders that
/// drop a leading space (SentencePiece's) drop it from both ends of the difference alike.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    tokens: Vec<u32>,
    /// Where the window starts: text before it is final.
    prefix_offset: usize,
    /// Tokens whose text is in `text`.
    read_offset: usize,
    text: String,
    keep_special: bool,
}

impl Detokenizer {
    /// `keep_special`: write special tokens out (a T5's sentinels), as `decode_keeping_special`.
    pub fn new(keep_special: bool) -> Self {
        Self { keep_special, ..Self::default() }
    }

    fn decode(&self, tokenizer: &TextTokenizer, ids: &[u32]) -> String {
        if self.keep_special {
            tokenizer.decode_keeping_special(ids)
        } else {
            tokenizer.decode(ids)
        }
    }

    /// Add `token`. Returns the text so far that ends on a complete character: what decoding
    /// every token gives, less a trailing character whose bytes have not all arrived.
    pub fn push(&mut self, tokenizer: &TextTokenizer, token: u32) -> &str {
        self.tokens.push(token);
        let prefix = self.decode(tokenizer, &self.tokens[self.prefix_offset..self.read_offset]);
        let window = self.decode(tokenizer, &self.tokens[self.prefix_offset..]);
        if window.len() > prefix.len() && !window.ends_with('\u{FFFD}') {
            if let Some(new) = window.get(prefix.len()..) {
                self.text.push_str(new);
                self.prefix_offset = self.read_offset;
                self.read_offset = self.tokens.len();
            }
        }
        &self.text
    }

    /// What `push` last returned.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The whole text, a trailing partial character included (as U+FFFD): a reply that ends.
    pub fn finish(&self, tokenizer: &TextTokenizer) -> String {
        let prefix = self.decode(tokenizer, &self.tokens[self.prefix_offset..self.read_offset]);
        let window = self.decode(tokenizer, &self.tokens[self.prefix_offset..]);
        format!("{}{}", self.text, window.get(prefix.len()..).unwrap_or(""))
    }
}

/// The byte a byte-level BPE character stands for (GPT-2's table: printable bytes are
/// themselves, the others the characters from U+0100 on, in byte order).
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 {
        return printable(code).then_some(code as u8);
    }
    (0..=255u32).filter(|&b| !printable(b)).nth((code - 256) as usize).map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each token's bytes, joined, are the text's UTF-8, characters split across tokens included.
    #[test]
    fn token_bytes_join_to_the_text() {
        let docs: Vec<String> = crate::generators::stories(200, 1);
        let tokenizer = TextTokenizer::train(&docs, 300, ExtraTokens::None).unwrap();
        let text = "Once upon a time — a fox named Zoë saw 🦊 and said “hello”.";
        let ids = tokenizer.encode(text);
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tokenizer.token_bytes(id)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
        assert!(ids.iter().any(|&id| std::str::from_utf8(&tokenizer.token_bytes(id)).is_err()), "some token splits a character");
        assert_eq!(tokenizer.token_bytes(tokenizer.eos()), tokenizer.decode_special(tokenizer.eos()).into_bytes());
    }

    /// Token by token, the incremental text is the whole decode's, never a partial character.
    #[test]
    fn incremental_text_equals_decoding_everything() {
        let docs: Vec<String> = crate::generators::stories(200, 1);
        let tokenizer = TextTokenizer::train(&docs, 300, ExtraTokens::None).unwrap();
        let text = "Once upon a time — a fox named Zoë saw 🦊 and said “hello”.";
        let mut ids = tokenizer.encode(text);
        ids.insert(5, tokenizer.eos());
        let mut detokenizer = Detokenizer::new(false);
        for end in 1..=ids.len() {
            let incremental = detokenizer.push(&tokenizer, ids[end - 1]).to_string();
            let whole = tokenizer.decode(&ids[..end]);
            assert_eq!(incremental, whole.trim_end_matches('\u{FFFD}'), "after {end} tokens");
            assert_eq!(detokenizer.finish(&tokenizer), whole, "after {end} tokens");
        }
        let mut special = Detokenizer::new(true);
        let pushed: Vec<String> = ids.iter().map(|&id| special.push(&tokenizer, id).to_string()).collect();
        assert_eq!(pushed.last().unwrap(), &tokenizer.decode_keeping_special(&ids));
    }

    #[test]
    fn trained_tokenizer_round_trips_text_and_reloads() {
        let docs: Vec<String> = crate::generators::stories(200, 1);
        let tok = TextTokenizer::train(&docs, 400, ExtraTokens::None).unwrap();
        assert_eq!(tok.mask(), None);
        assert!(tok.vocab_size() <= 400 && tok.vocab_size() > 300);
        let text = "Once upon a time, Zoë found 42 shells.";
        assert_eq!(tok.decode(&tok.encode(text)), text);
        assert!(tok.encode(&docs[0]).len() < docs[0].len() / 2, "merges compress the corpus");
        assert_eq!(tok.encode("12345").len(), 5, "one token per digit");
        let dir = tempfile::tempdir().unwrap();
        tok.save(&dir.path().join("tokenizer.json")).unwrap();
        let loaded = TextTokenizer::load(&dir.path().join("tokenizer.json")).unwrap();
        assert_eq!(loaded.encode(text), tok.encode(text));
        assert_eq!(loaded.eos(), tok.eos());
    }

    #[test]
    fn long_texts_encode_in_pieces_to_the_whole_texts_tokens() {
        let docs: Vec<String> = crate::generators::stories(200, 1);
        let tok = TextTokenizer::train(&docs, 400, ExtraTokens::Mask).unwrap();
        let text = format!("{} 12 345  double  spaces\n\nZoë's [MASK] sat, «quoted» 7.5%! {}", docs[..20].join(" "), docs[20]);
        let whole = tok.inner.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        for max_bytes in [1, 2, 3, 7, 16, 64, 1000] {
            let cut: Vec<&str> = pieces(&text, max_bytes).collect();
            assert_eq!(cut.concat(), text, "pieces of {max_bytes} bytes cover the text");
            let ids: Vec<u32> = cut.iter().flat_map(|p| tok.inner.encode(*p, false).unwrap().get_ids().to_vec()).collect();
            if max_bytes >= 16 {
                assert_eq!(ids, whole, "pieces of {max_bytes} bytes tokenize as the whole");
            }
        }
        assert_eq!(tok.encode(&text), whole);
        // No space to cut at: character boundaries, never inside a character.
        let unbroken = "Zoë".repeat(50);
        assert!(pieces(&unbroken, 4).all(|p| p.len() <= 4 && !p.is_empty()));
        assert_eq!(pieces(&unbroken, 4).collect::<String>(), unbroken);
    }

    #[test]
    fn masked_lm_tokenizer_masks_a_word_with_its_space() {
        let docs: Vec<String> = crate::generators::stories(200, 1);
        let tok = TextTokenizer::train(&docs, 400, ExtraTokens::Mask).unwrap();
        let mask = tok.mask().expect("a [MASK] token");
        let expected: Vec<u32> = [tok.encode("the"), vec![mask], tok.encode(" sat")].concat();
        assert_eq!(tok.encode("the [MASK] sat"), expected, "the space before [MASK] goes with it");
    }

    #[test]
    fn span_corruption_tokenizer_has_t5_sentinels() {
        let docs: Vec<String> = crate::generators::stories(200, 1);
        let tok = TextTokenizer::train(&docs, 600, ExtraTokens::Sentinels).unwrap();
        let sentinels = tok.sentinels();
        assert_eq!(sentinels.len(), SENTINELS);
        assert_eq!(tok.encode("a<extra_id_7>b")[1], sentinels[7]);
        assert!(TextTokenizer::train(&docs, 400, ExtraTokens::None).unwrap().sentinels().is_empty());
    }
}
