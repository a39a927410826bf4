//! The user's data files, read as a stream: plain text, JSONL, JSON (an array of records, or
//! records one per line as Hugging Face `datasets` writes `.json`) and Parquet, the text formats
//! optionally gzip- (`.gz`) or zstd-compressed (`.zst`). An entry of `data.files` is a file, a
//! folder (every data file under it) or a glob. Nothing is read whole: records come one at a
//! time, and long texts in pieces, so memory stays bounded whatever the corpus size.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use furnace_configs::TextDocuments;
use serde_json::Value;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

use crate::tokenizer::{cut_point, ENCODE_PIECE_BYTES};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Jsonl,
    /// `.json`: an array of records, or records one per line.
    Json,
    Parquet,
    /// `.bin`: tokens already (Furnace's shards, llm.c's, Megatron-LM's or nanoGPT's files).
    Tokens,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One data file and how to read it, told by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub path: PathBuf,
    pub format: Format,
    pub compression: Compression,
}

impl Input {
    pub fn new(path: PathBuf) -> Self {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
        let (stem, compression) = match () {
            _ if name.ends_with(".gz") => (&name[..name.len() - 3], Compression::Gzip),
            _ if name.ends_with(".zst") => (&name[..name.len() - 4], Compression::Zstd),
            _ => (name.as_str(), Compression::None),
        };
        let format = match () {
            _ if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") => Format::Jsonl,
            _ if stem.ends_with(".json") => Format::Json,
            _ if stem.ends_with(".parquet") => Format::Parquet,
            _ if name.ends_with(".bin") => Format::Tokens,
            _ => Format::Text,
        };
        Self { path, format, compression }
    }

    /// Size on disk (compressed), for progress.
    pub fn size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

/// Extensions a folder's files must have to be read as data (compressed forms included).
const DATA_EXTENSIONS: [&str; 7] = ["txt", "jsonl", "ndjson", "json", "parquet", "md", "bin"];

fn is_data_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_ascii_lowercase();
    let name = name.strip_suffix(".gz").or_else(|| name.strip_suffix(".zst")).unwrap_or(&name);
    !name.starts_with('.') && DATA_EXTENSIONS.iter().any(|e| name.ends_with(&format!(".{e}")))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out)?;
        } else if is_data_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Whether an entry of `data.files` is a glob pattern rather than a path.
pub fn is_pattern(entry: &str) -> bool {
    entry.contains(['*', '?', '['])
}

/// The files `entries` name, in order: a file as is, a folder's data files (sorted, recursively),
/// a glob's matches (sorted). `key` names the recipe key in errors.
pub fn expand(entries: &[String], key: &str) -> Result<Vec<Input>, String> {
    let mut inputs = Vec::new();
    for entry in entries {
        let mut paths = Vec::new();
        if is_pattern(entry) {
            // As a shell globs: `*` does not match a hidden file's leading dot.
            let options = glob::MatchOptions { require_literal_leading_dot: true, ..Default::default() };
            let matches = glob::glob_with(entry, options).map_err(|e| format!("{key}: `{entry}` is not a valid glob: {e}"))?;
            for path in matches {
                let path = path.map_err(|e| format!("{key}: `{entry}`: {e}"))?;
                if path.is_file() {
                    paths.push(path);
                }
            }
            if paths.is_empty() {
                return Err(format!("{key}: `{entry}` matches no file"));
            }
        } else {
            let path = PathBuf::from(entry);
            if path.is_dir() {
                walk(&path, &mut paths).map_err(|e| format!("{key}: cannot list `{entry}`: {e}"))?;
                if paths.is_empty() {
                    return Err(format!(
                        "{key}: folder `{entry}` holds no data file ({})",
                        DATA_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
                    ));
                }
            } else if path.is_file() {
                paths.push(path);
            } else {
                return Err(format!("{key}: data file `{entry}` does not exist"));
            }
        }
        inputs.extend(paths.into_iter().map(Input::new));
    }
    Ok(inputs)
}

/// A reader that counts the bytes read through it (the compressed bytes, for progress).
struct Counted<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The decompressed bytes of a text-format input; `read` counts the file's bytes read.
fn open(input: &Input, read: &Arc<AtomicU64>) -> Result<Box<dyn BufRead + Send>, String> {
    let file = File::open(&input.path).map_err(|e| format!("cannot read {}: {e}", input.path.display()))?;
    let counted = BufReader::with_capacity(1 << 20, Counted { inner: file, count: read.clone() });
    Ok(match input.compression {
        Compression::None => Box::new(counted),
        Compression::Gzip => Box::new(BufReader::with_capacity(1 << 20, flate2::bufread::MultiGzDecoder::new(counted))),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            1 << 20,
            zstd::stream::read::Decoder::with_buffer(counted).map_err(|e| format!("cannot read {}: {e}", input.path.display()))?,
        )),
    })
}

/// Where a record came from, for errors: the file and its line, element or row.
fn at(input: &Input, unit: &str, i: usize) -> String {
    match unit {
        "line" => format!("{}:{i}", input.path.display()),
        _ => format!("{} {unit} {i}", input.path.display()),
    }
}

/// What reading a record found: a record, or one that is malformed (with why).
pub type Found = Result<Value, String>;

/// Call `f` with each record of a JSONL, JSON or Parquet input and where it is (for errors).
/// A line that is not JSON is passed as `Err`; a JSON array that does not parse stops the read.
pub fn for_each_record(input: &Input, read: &Arc<AtomicU64>, f: &mut dyn FnMut(Found, &str) -> Result<(), String>) -> Result<(), String> {
    let name = input.path.display();
    match input.format {
        Format::Parquet => crate::parquet::for_each_row(input, read, f),
        Format::Text => Err(format!("{name} is plain text, not records: name it .jsonl, .json or .parquet")),
        Format::Tokens => Err(format!("{name} holds tokens, not records")),
        Format::Jsonl | Format::Json => {
            let mut reader = open(input, read)?;
            let first = loop {
                let buf = reader.fill_buf().map_err(|e| format!("cannot read {name}: {e}"))?;
                match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                    Some(i) => break Some(buf[i]),
                    None if buf.is_empty() => break None,
                    None => {
                        let n = buf.len();
                        reader.consume(n)
                    }
                }
            };
            if first == Some(b'[') {
                return for_each_array_element(input, reader, f);
            }
            let mut line = Vec::new();
            for number in 1.. {
                line.clear();
                if reader.read_until(b'\n', &mut line).map_err(|e| format!("cannot read {name}: {e}"))? == 0 {
                    break;
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let found = serde_json::from_slice::<Value>(&line).map_err(|e| format!("invalid JSON: {e}"));
                f(found, &at(input, "line", number))?;
            }
            Ok(())
        }
    }
}

/// The elements of a JSON array, one at a time (serde's sequence access, never the whole array).
fn for_each_array_element(
    input: &Input,
    reader: Box<dyn BufRead + Send>,
    f: &mut dyn FnMut(Found, &str) -> Result<(), String>,
) -> Result<(), String> {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    struct Elements<'a> {
        input: &'a Input,
        f: &'a mut dyn FnMut(Found, &str) -> Result<(), String>,
        stopped: Option<String>,
    }
    impl<'de> Visitor<'de> for &mut Elements<'_> {
        type Value = ();
        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("an array of records")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while let Some(value) = seq.next_element::<Value>()? {
                i += 1;
                if let Err(e) = (self.f)(Ok(value), &at(self.input, "element", i)) {
                    self.stopped = Some(e);
                    return Err(serde::de::Error::custom("stopped"));
                }
            }
            Ok(())
        }
    }
    let mut elements = Elements { input, f, stopped: None };
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let parsed = deserializer.deserialize_seq(&mut elements);
    if let Some(stopped) = elements.stopped {
        return Err(stopped);
    }
    parsed.map_err(|e| format!("{}: not a JSON array of records: {e}", input.path.display()))?;
    deserializer.end().map_err(|e| format!("{}: text after the JSON array: {e}", input.path.display()))
}

/// A piece of a document's text, at most about [`ENCODE_PIECE_BYTES`] long, cut where the
/// tokenizer's pre-tokenizer splits anyway (so the pieces' tokens are the document's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    /// The first piece of a document (end-of-text goes before it).
    pub starts_document: bool,
}

/// Options for reading documents out of inputs.
#[derive(Debug, Clone, Copy)]
pub struct TextOptions<'a> {
    /// The record field that holds a document's text.
    pub field: &'a str,
    pub documents: TextDocuments,
    pub skip_bad: bool,
}

/// What reading documents counted: malformed records skipped, duplicate documents dropped, and
/// (with deduplication on) the hashes of the documents read so far.
#[derive(Debug, Default)]
pub struct Reading {
    pub skipped: usize,
    pub duplicates: usize,
    /// 128-bit hashes of the documents' text; None: no deduplication.
    seen: Option<HashSet<u128>>,
}

impl Reading {
    /// `dedup`: drop a document whose exact text was read before (`data.dedup`).
    pub fn new(dedup: bool) -> Self {
        Self { seen: dedup.then(HashSet::new), ..Default::default() }
    }

    /// Whether a document of this hash is read (the first of its text, or no deduplication).
    fn keeps(&mut self, hash: impl FnOnce() -> u128) -> bool {
        let Some(seen) = &mut self.seen else { return true };
        let first = seen.insert(hash());
        self.duplicates += !first as usize;
        first
    }
}

/// `text` as pieces, passed to `emit`; the first starts a document when `starts_document`.
pub(crate) fn emit_pieces(text: &str, starts_document: bool, emit: &mut dyn FnMut(Piece) -> Result<(), String>) -> Result<(), String> {
    let mut rest = text;
    let mut first = starts_document;
    while !rest.is_empty() {
        let cut = cut_point(rest, ENCODE_PIECE_BYTES);
        emit(Piece { text: rest[..cut].to_string(), starts_document: first })?;
        first = false;
        rest = &rest[cut..];
    }
    Ok(())
}

/// The documents of `input` as pieces, in order; what was skipped or dropped is counted in
/// `reading`.
pub fn for_each_piece(
    input: &Input,
    options: TextOptions<'_>,
    read: &Arc<AtomicU64>,
    reading: &mut Reading,
    emit: &mut dyn FnMut(Piece) -> Result<(), String>,
) -> Result<(), String> {
    if input.format == Format::Tokens {
        return Err(format!("{} holds tokens, not text: list token files alone in data.files, with data.tokenizer", input.path.display()));
    }
    let document = |text: &str, reading: &mut Reading, emit: &mut dyn FnMut(Piece) -> Result<(), String>| match reading
        .keeps(|| xxh3_128(text.as_bytes()))
    {
        true => emit_pieces(text, true, emit),
        false => Ok(()),
    };
    if input.format != Format::Text {
        let mut skipped = 0;
        let field = options.field;
        for_each_record(input, read, &mut |found, at| {
            let text = found.and_then(|record| match record.get(field) {
                Some(Value::String(text)) => Ok(text.clone()),
                _ => Err(format!("no string field `{field}` (set data.text_field)")),
            });
            match text {
                Ok(text) => document(&text, reading, emit),
                Err(_) if options.skip_bad => {
                    skipped += 1;
                    Ok(())
                }
                Err(e) => Err(format!("{at}: {e} (or set data.skip_bad_lines = true)")),
            }
        })?;
        if skipped > 0 {
            eprintln!("warning: {}: skipped {skipped} malformed record(s) (data.skip_bad_lines = true)", input.path.display());
        }
        reading.skipped += skipped;
        return Ok(());
    }
    let name = input.path.display();
    let io = |e: std::io::Error| format!("cannot read {name}: {e}");
    let utf8 = |line: usize| format!("{name}:{line}: not UTF-8 text (a text data file must be UTF-8)");
    match options.documents {
        TextDocuments::File => {
            // Deduplicating whole files: a first pass hashes the text before any of it is sent.
            if reading.seen.is_some() {
                let mut hasher = Xxh3::new();
                let mut reader = open(input, &Default::default())?;
                let mut chunk = vec![0u8; 1 << 20];
                loop {
                    match reader.read(&mut chunk).map_err(io)? {
                        0 => break,
                        n => hasher.update(&chunk[..n]),
                    }
                }
                if !reading.keeps(|| hasher.digest128()) {
                    read.fetch_add(input.size(), Ordering::Relaxed);
                    return Ok(());
                }
            }
            // The whole file is one document, streamed: pieces are cut once enough text is
            // buffered that the cut is the one the whole text would get.
            let mut reader = open(input, read)?;
            let (mut text, mut pending, mut chunk) = (String::new(), Vec::new(), vec![0u8; 1 << 20]);
            let (mut started, mut emitted) = (false, false);
            let mut line = 1;
            loop {
                let n = reader.read(&mut chunk).map_err(io)?;
                pending.extend_from_slice(&chunk[..n]);
                let valid = match std::str::from_utf8(&pending) {
                    Ok(s) => s.len(),
                    Err(e) if e.error_len().is_none() && n > 0 => e.valid_up_to(),
                    Err(e) => return Err(utf8(line + bytecount_newlines(&pending[..e.valid_up_to()]))),
                };
                line += bytecount_newlines(&pending[..valid]);
                text.push_str(std::str::from_utf8(&pending[..valid]).expect("checked"));
                pending.drain(..valid);
                started |= !text.trim().is_empty();
                while started && text.len() > ENCODE_PIECE_BYTES + 8 {
                    let cut = cut_point(&text, ENCODE_PIECE_BYTES);
                    emit(Piece { text: text[..cut].to_string(), starts_document: !emitted })?;
                    emitted = true;
                    text.drain(..cut);
                }
                if n == 0 {
                    break;
                }
            }
            if started {
                emit_pieces(&text, !emitted, emit)?;
            }
        }
        TextDocuments::BlankLine | TextDocuments::Line => {
            let mut reader = open(input, read)?;
            let (mut block, mut line) = (String::new(), Vec::new());
            for number in 1.. {
                line.clear();
                let n = reader.read_until(b'\n', &mut line).map_err(io)?;
                let text = std::str::from_utf8(&line).map_err(|_| utf8(number))?;
                let text = text.strip_suffix('\n').unwrap_or(text);
                match options.documents {
                    TextDocuments::Line => {
                        let text = text.strip_suffix('\r').unwrap_or(text);
                        if !text.trim().is_empty() {
                            document(text, reading, emit)?;
                        }
                    }
                    _ if n == 0 || text.is_empty() => {
                        let trimmed = block.trim();
                        if !trimmed.is_empty() {
                            document(trimmed, reading, emit)?;
                        }
                        block.clear();
                    }
                    _ => {
                        if !block.is_empty() {
                            block.push('\n');
                        }
                        block.push_str(text);
                    }
                }
                if n == 0 {
                    break;
                }
            }
        }
    }
    Ok(())
}

fn bytecount_newlines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const PLAY: &str = "ROMEO: But soft.\nWhat light?\n\nJULIET: Ay me.\n\n\nROMEO: She speaks.\n";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data").join(name)
    }

    /// The documents of `path`, each its pieces joined.
    fn documents(path: &Path, options: TextOptions<'_>) -> Result<Vec<String>, String> {
        let mut docs: Vec<String> = Vec::new();
        for_each_piece(&Input::new(path.to_path_buf()), options, &Default::default(), &mut Reading::default(), &mut |piece| {
            match (piece.starts_document, docs.last_mut()) {
                (false, Some(last)) => last.push_str(&piece.text),
                _ => docs.push(piece.text),
            }
            Ok(())
        })?;
        Ok(docs)
    }

    fn text_options(documents: TextDocuments) -> TextOptions<'static> {
        TextOptions { field: "text", documents, skip_bad: false }
    }

    fn documents_of(text: &str, documents: TextDocuments) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("play.txt");
        std::fs::write(&path, text).unwrap();
        self::documents(&path, text_options(documents)).unwrap()
    }

    #[test]
    fn a_text_file_is_one_document_a_block_or_a_line_as_asked() {
        assert_eq!(documents_of(PLAY, TextDocuments::File), [PLAY], "the whole file, blank lines kept");
        assert_eq!(documents_of(PLAY, TextDocuments::BlankLine), ["ROMEO: But soft.\nWhat light?", "JULIET: Ay me.", "ROMEO: She speaks."]);
        assert_eq!(documents_of(PLAY, TextDocuments::Line), ["ROMEO: But soft.", "What light?", "JULIET: Ay me.", "ROMEO: She speaks."]);
        assert!(documents_of("\n\n  \n", TextDocuments::File).is_empty());
    }

    #[test]
    fn a_long_text_streams_in_the_pieces_the_whole_text_is_cut_into() {
        // 3.5 MB with multi-byte characters, read in 1 MB chunks: the streamed pieces are the
        // pieces of the text read whole, so the tokens are the same.
        let text: String = (0..250_000).map(|i| format!("wörd{i} ünd {}", if i % 97 == 0 { "\n\n" } else { "" })).collect();
        assert!(text.len() > 3 * ENCODE_PIECE_BYTES);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("book.txt");
        std::fs::write(&path, &text).unwrap();
        let mut streamed = Vec::new();
        for_each_piece(&Input::new(path), text_options(TextDocuments::File), &Default::default(), &mut Reading::default(), &mut |piece| {
            streamed.push((piece.text, piece.starts_document));
            Ok(())
        })
        .unwrap();
        let mut whole = Vec::new();
        emit_pieces(&text, true, &mut |piece| {
            whole.push((piece.text, piece.starts_document));
            Ok(())
        })
        .unwrap();
        assert!(whole.len() >= 4);
        assert_eq!(streamed, whole);
    }

    #[test]
    fn deduplication_drops_documents_whose_exact_text_came_before() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            Input::new(path)
        };
        let inputs = [
            write("a.jsonl", "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": \"one\"}\n"),
            write("b.txt", "two\nthree\none \n"),
            write("c.txt", "a whole file\n"),
            write("d.txt", "a whole file\n"),
        ];
        let read = |dedup: bool| {
            let (mut docs, mut reading) = (Vec::new(), Reading::new(dedup));
            for (input, documents) in
                inputs.iter().zip([TextDocuments::File, TextDocuments::Line, TextDocuments::File, TextDocuments::File])
            {
                for_each_piece(input, text_options(documents), &Default::default(), &mut reading, &mut |piece| {
                    docs.push(piece.text);
                    Ok(())
                })
                .unwrap();
            }
            (docs, reading.duplicates)
        };
        assert_eq!(read(true), (vec!["one".into(), "two".into(), "three".into(), "one ".into(), "a whole file\n".into()], 3));
        assert_eq!(read(false).0.len(), 8);
    }

    #[test]
    fn malformed_jsonl_lines_stop_the_read_unless_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.jsonl");
        std::fs::write(&path, "{\"text\": \"one\"}\nnot json\n{\"other\": 1}\n{\"text\": \"two\"}\n").unwrap();
        let err = documents(&path, text_options(TextDocuments::File)).unwrap_err();
        assert!(err.contains("docs.jsonl:2: invalid JSON") && err.contains("skip_bad_lines"), "{err}");
        let skipping = TextOptions { skip_bad: true, ..text_options(TextDocuments::File) };
        assert_eq!(documents(&path, skipping).unwrap(), ["one", "two"]);
    }

    #[test]
    fn every_format_and_compression_reads_the_same_documents() {
        // The reference: the JSONL that scripts/reference/make_data_fixtures.py wrote.
        let options = text_options(TextDocuments::Line);
        let expected = documents(&fixture("docs.jsonl"), options).unwrap();
        assert_eq!(expected.len(), 26);
        let records: Vec<Value> = expected.iter().map(|t| serde_json::json!({ "text": t })).collect();
        let jsonl: String = records.iter().map(|r| format!("{r}\n")).collect();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(jsonl.as_bytes()).unwrap();
        let files = [
            write("docs.jsonl.gz", &gzip.finish().unwrap()),
            write("docs.jsonl.zst", &zstd::encode_all(jsonl.as_bytes(), 3).unwrap()),
            write("array.json", serde_json::to_string_pretty(&records).unwrap().as_bytes()),
            write("lines.json", jsonl.as_bytes()),
            fixture("docs.parquet"),
            fixture("docs_zstd.parquet"),
        ];
        for path in files {
            assert_eq!(documents(&path, options).unwrap(), expected, "{}", path.display());
        }
        // Plain text of the same documents, one per line (those without a newline).
        let lines: Vec<String> = expected.iter().filter(|d| !d.contains('\n')).cloned().collect();
        let text = lines.join("\n") + "\n";
        let mut zstd_text = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        zstd_text.write_all(text.as_bytes()).unwrap();
        let path = write("lines.txt.zst", &zstd_text.finish().unwrap());
        assert_eq!(documents(&path, options).unwrap(), lines);
    }

    #[test]
    fn nested_parquet_columns_read_as_json_records() {
        let mut conversations = Vec::new();
        for_each_record(&Input::new(fixture("chat.parquet")), &Default::default(), &mut |found, _| {
            conversations.push(found?);
            Ok(())
        })
        .unwrap();
        assert_eq!(conversations.len(), 5);
        assert_eq!(
            conversations[3],
            serde_json::json!({"messages": [{"role": "user", "content": "What is 3 + 3?"}, {"role": "assistant", "content": "6"}]})
        );
    }

    #[test]
    fn folders_and_globs_expand_to_their_data_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("corpus/b")).unwrap();
        for name in ["corpus/z.jsonl.zst", "corpus/a.txt", "corpus/b/c.parquet", "corpus/notes.csv", "corpus/.hidden.txt"] {
            std::fs::write(root.join(name), "x").unwrap();
        }
        let names = |inputs: Vec<Input>| -> Vec<String> {
            inputs.iter().map(|i| i.path.strip_prefix(root).unwrap().display().to_string()).collect()
        };
        let folder = root.join("corpus").display().to_string();
        assert_eq!(names(expand(&[folder], "data.files").unwrap()), ["corpus/a.txt", "corpus/b/c.parquet", "corpus/z.jsonl.zst"]);
        let glob = root.join("corpus/*.*").display().to_string();
        assert_eq!(names(expand(&[glob], "data.files").unwrap()), ["corpus/a.txt", "corpus/notes.csv", "corpus/z.jsonl.zst"]);
        let none = root.join("corpus/*.md").display().to_string();
        assert!(expand(&[none], "data.val_files").unwrap_err().contains("data.val_files: `"));
        let missing = root.join("nope.txt").display().to_string();
        assert!(expand(&[missing], "data.files").unwrap_err().contains("does not exist"));
        let z = Input::new(root.join("corpus/z.jsonl.zst"));
        assert_eq!((z.format, z.compression), (Format::Jsonl, Compression::Zstd));
    }
}
