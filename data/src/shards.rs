//! Token shards: a 24-byte header (magic, version, bytes per token, count) then the tokens,
//! little-endian, u16 when the vocabulary fits and u32 otherwise. Read memory-mapped. A token
//! stream of any length is a list of segments of shards ([`Tokens`]), named by a small JSON
//! manifest beside them.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use furnace_core::fsutil::{atomic_write, sync_dir};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"FURNTOK\0";
const VERSION: u32 = 1;
const HEADER: usize = 24;

fn width_for(vocab_size: usize) -> u32 {
    if vocab_size <= u16::MAX as usize + 1 {
        2
    } else {
        4
    }
}

fn header(width: u32, len: u64) -> [u8; HEADER] {
    let mut bytes = [0u8; HEADER];
    bytes[..8].copy_from_slice(MAGIC);
    bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
    bytes[12..16].copy_from_slice(&width.to_le_bytes());
    bytes[16..24].copy_from_slice(&len.to_le_bytes());
    bytes
}

/// Write `tokens` as a shard at `path` (atomically), for tests: preparation streams shards
/// through [`ShardWriter`].
#[cfg(test)]
pub(crate) fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> std::io::Result<()> {
    let mut writer = ShardWriter::create(path, vocab_size)?;
    writer.push(tokens)?;
    writer.finish().map(|_| ())
}

/// A file written through a buffer into a temporary name that becomes `path` (fsynced,
/// renamed) only when finished: a file under its name is always complete.
struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: BufWriter<File>,
}

impl AtomicFile {
    fn create(path: &Path) -> std::io::Result<Self> {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("tokens");
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        Ok(Self { path: path.to_path_buf(), file: BufWriter::with_capacity(1 << 20, File::create(&tmp)?), tmp })
    }

    /// Write `header` over the file's start, fsync, and move it to its name.
    fn finish(self, header: &[u8]) -> std::io::Result<()> {
        let finished = (|| {
            let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(header)?;
            file.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)
        })();
        if finished.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        finished?;
        sync_dir(self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
    }
}

/// Tokens little-endian in `width` bytes each.
fn write_tokens(out: &mut impl Write, tokens: &[u32], width: u32) -> std::io::Result<()> {
    for &t in tokens {
        match width {
            2 => out.write_all(&(t as u16).to_le_bytes())?,
            _ => out.write_all(&t.to_le_bytes())?,
        }
    }
    Ok(())
}

/// A shard written as tokens arrive (see [`AtomicFile`]).
pub struct ShardWriter {
    file: AtomicFile,
    width: u32,
    len: u64,
}

impl ShardWriter {
    pub fn create(path: &Path, vocab_size: usize) -> std::io::Result<Self> {
        let width = width_for(vocab_size);
        let mut file = AtomicFile::create(path)?;
        file.file.write_all(&header(width, 0))?;
        Ok(Self { file, width, len: 0 })
    }

    pub fn push(&mut self, tokens: &[u32]) -> std::io::Result<()> {
        write_tokens(&mut self.file.file, tokens, self.width)?;
        self.len += tokens.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Complete the header, fsync, and move the shard to its name; returns its token count.
    pub fn finish(self) -> std::io::Result<usize> {
        self.file.finish(&header(self.width, self.len))?;
        Ok(self.len as usize)
    }
}

/// A run of tokens of one shard file (named relative to the manifest's folder).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub file: String,
    pub start: usize,
    pub len: usize,
    /// A token file the user gave (any format [`Shard::open_any`] reads), not a shard Furnace wrote.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external: bool,
}

/// The manifest of a token stream: its segments, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub segments: Vec<Segment>,
}

impl Manifest {
    pub fn tokens(&self) -> usize {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Tokens `range` of the stream, as segments.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Manifest {
        let (mut segments, mut at) = (Vec::new(), 0);
        for s in &self.segments {
            let (from, to) = (range.start.max(at), range.end.min(at + s.len));
            if from < to {
                segments.push(Segment { start: s.start + from - at, len: to - from, ..s.clone() });
            }
            at += s.len;
        }
        Manifest { segments }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        atomic_write(path, serde_json::to_string_pretty(self).expect("a manifest serializes").as_bytes())
    }
}

/// A token stream stored in shards: the segments of a manifest, memory-mapped.
#[derive(Debug)]
pub struct Tokens {
    shards: Vec<(Shard, usize)>,
    /// Where each segment starts in the stream.
    starts: Vec<usize>,
    len: usize,
}

impl Tokens {
    /// The stream a manifest (`<name>.json`) describes.
    pub fn open(manifest: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(manifest).map_err(|e| format!("cannot read token manifest {}: {e}", manifest.display()))?;
        let parsed: Manifest = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a token manifest ({e}); rebuild it with `furnace data prepare`", manifest.display()))?;
        Self::open_segments(manifest.parent().unwrap_or(Path::new(".")), &parsed)
            .map_err(|e| format!("{}: {e}; rebuild it with `furnace data prepare`", manifest.display()))
    }

    /// The stream of `manifest`'s segments, their files under `dir`.
    pub fn open_segments(dir: &Path, manifest: &Manifest) -> Result<Self, String> {
        let mut segments = Vec::new();
        for s in &manifest.segments {
            let path = dir.join(&s.file);
            let shard = if s.external { Shard::open_any(&path)? } else { Shard::open(&path)? };
            if s.start + s.len > shard.len() {
                return Err(format!("segment {}..{} of {} is past its {} tokens", s.start, s.start + s.len, s.file, shard.len()));
            }
            segments.push((shard, s.start, s.len));
        }
        Ok(Self::from_segments(segments))
    }

    fn from_segments(segments: Vec<(Shard, usize, usize)>) -> Self {
        let (mut shards, mut starts, mut len) = (Vec::new(), Vec::new(), 0);
        for (shard, start, n) in segments.into_iter().filter(|s| s.2 > 0) {
            starts.push(len);
            len += n;
            shards.push((shard, start));
        }
        Self { shards, starts, len }
    }

    /// The whole of one shard.
    pub fn whole(shard: Shard) -> Self {
        let len = shard.len();
        Self::from_segments(vec![(shard, 0, len)])
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let segment = self.starts.partition_point(|&s| s <= i) - 1;
        let (shard, start) = &self.shards[segment];
        shard.get(start + i - self.starts[segment])
    }

    /// Tokens `start..start+len` widened to i64 (Burn's int input).
    pub fn read_into(&self, mut start: usize, mut len: usize, out: &mut Vec<i64>) {
        let mut segment = self.starts.partition_point(|&s| s <= start).saturating_sub(1);
        while len > 0 {
            let (shard, shard_start) = &self.shards[segment];
            let segment_end = self.starts.get(segment + 1).copied().unwrap_or(self.len);
            let offset = start - self.starts[segment];
            let n = len.min(segment_end - start);
            out.extend((shard_start + offset..shard_start + offset + n).map(|i| shard.get(i) as i64));
            (start, len, segment) = (start + n, len - n, segment + 1);
        }
    }
}

/// A memory-mapped shard: Furnace's own, or a token file another trainer wrote.
#[derive(Debug)]
pub struct Shard {
    map: Mmap,
    /// Bytes before the first token.
    offset: usize,
    width: usize,
    len: usize,
}

/// llm.c's token files (`dev/data/data_common.py`): 256 little-endian int32s of header (magic,
/// version, token count), then the tokens; GPT-2's as uint16, Llama 3's as uint32.
const LLMC_HEADER: usize = 1024;
const LLMC_GPT2: (u32, u32) = (20240520, 1);
const LLMC_LLAMA3: (u32, u32) = (20240801, 7);

/// Megatron-LM's indexed dataset: the `.idx` beside a `.bin` of raw tokens starts with this.
const MEGATRON_MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";

fn map(path: &Path) -> Result<Mmap, String> {
    let file = File::open(path).map_err(|e| format!("cannot open token file {}: {e}", path.display()))?;
    // Safety: token files are written once, atomically, and never modified in place.
    unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot map {}: {e}", path.display()))
}

impl Shard {
    /// A shard Furnace wrote.
    pub fn open(path: &Path) -> Result<Self, String> {
        let map = map(path)?;
        let bad = |what: &str| format!("{} is not a Furnace token shard ({what}); rebuild it with `furnace data prepare`", path.display());
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let word = |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().unwrap());
        if word(8) != VERSION {
            return Err(bad("unknown version"));
        }
        let width = word(12) as usize;
        let len = u64::from_le_bytes(map[16..24].try_into().unwrap()) as usize;
        if !(width == 2 || width == 4) || map.len() != HEADER + width * len {
            return Err(bad("truncated or inconsistent length"));
        }
        Ok(Self { map, offset: HEADER, width, len })
    }

    /// A token file of any format Furnace reads: its own shards, llm.c's (by their header),
    /// Megatron-LM's (a `.bin` with its `.idx` beside it), else nanoGPT's raw uint16 tokens.
    pub fn open_any(path: &Path) -> Result<Self, String> {
        let map = map(path)?;
        let name = path.display();
        if map.len() >= HEADER && &map[..8] == MAGIC {
            return Self::open(path);
        }
        let word = |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().unwrap());
        if map.len() >= LLMC_HEADER && [LLMC_GPT2.0, LLMC_LLAMA3.0].contains(&word(0)) {
            let (magic, version, len) = (word(0), word(4), word(8) as usize);
            let width = if (magic, version) == LLMC_GPT2 {
                2
            } else if (magic, version) == LLMC_LLAMA3 {
                4
            } else {
                return Err(format!("{name}: llm.c token file of unknown version {version} (magic {magic})"));
            };
            if map.len() != LLMC_HEADER + width * len {
                return Err(format!(
                    "{name}: llm.c token file truncated: its header says {len} tokens, the file holds {} bytes",
                    map.len()
                ));
            }
            return Ok(Self { map, offset: LLMC_HEADER, width, len });
        }
        let index = path.with_extension("idx");
        if index.is_file() {
            let width = megatron_width(&index, map.len())?;
            return Ok(Self { len: map.len() / width, map, offset: 0, width });
        }
        if map.len() % 2 != 0 {
            return Err(format!(
                "{name}: not a token file (Furnace, llm.c, Megatron with its .idx, or nanoGPT's raw uint16: an even size)"
            ));
        }
        Ok(Self { len: map.len() / 2, map, offset: 0, width: 2 })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let at = self.offset + i * self.width;
        match self.width {
            2 => u16::from_le_bytes([self.map[at], self.map[at + 1]]) as u32,
            _ => u32::from_le_bytes(self.map[at..at + 4].try_into().unwrap()),
        }
    }

    /// The largest token id (to check a token file against the tokenizer's vocabulary).
    pub fn max_token(&self) -> Option<u32> {
        let tokens = &self.map[self.offset..self.offset + self.len * self.width];
        match self.width {
            2 => tokens.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).max(),
            _ => tokens.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).max(),
        }
    }
}

/// The token width a Megatron `.idx` gives its `.bin` of `bin_bytes` bytes, checked against the
/// index's sequence lengths (Megatron's DType codes: 3 int16, 4 int32, 8 uint16).
fn megatron_width(index: &Path, bin_bytes: usize) -> Result<usize, String> {
    let bytes = std::fs::read(index).map_err(|e| format!("cannot read {}: {e}", index.display()))?;
    let name = index.display();
    let bad = |what: &str| format!("{name}: not a Megatron index ({what})");
    if bytes.len() < 34 || &bytes[..9] != MEGATRON_MAGIC {
        return Err(bad("bad magic"));
    }
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    if u64_at(9) != 1 {
        return Err(bad("unknown version"));
    }
    let width = match bytes[17] {
        3 | 8 => 2,
        4 => 4,
        code => return Err(format!("{name}: Megatron token type code {code} is not read (int16, uint16 and int32 are)")),
    };
    let sequences = u64_at(18) as usize;
    let lengths = bytes.get(34..34 + 4 * sequences).ok_or_else(|| bad("truncated"))?;
    let tokens: usize = lengths.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).sum();
    if tokens * width != bin_bytes {
        return Err(format!("{name}: its sequences hold {tokens} tokens but the .bin holds {bin_bytes} bytes"));
    }
    Ok(width)
}

/// Write `tokens` as an llm.c token file (GPT-2's uint16 layout when the vocabulary fits,
/// Llama 3's uint32 otherwise), streamed, atomically.
pub fn write_llmc(path: &Path, tokens: &Tokens, vocab_size: usize) -> Result<(), String> {
    let len = i32::try_from(tokens.len()).map_err(|_| format!("{} tokens are past llm.c's int32 token count", tokens.len()))?;
    let ((magic, version), width) = if width_for(vocab_size) == 2 { (LLMC_GPT2, 2) } else { (LLMC_LLAMA3, 4) };
    let mut header = [0u8; LLMC_HEADER];
    for (i, word) in [magic as i32, version as i32, len].into_iter().enumerate() {
        header[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
    }
    let io = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut file = AtomicFile::create(path).map_err(io)?;
    file.file.write_all(&header).map_err(io)?;
    let mut chunk = Vec::new();
    for start in (0..tokens.len()).step_by(1 << 20) {
        chunk.clear();
        chunk.extend((start..tokens.len().min(start + (1 << 20))).map(|i| tokens.get(i)));
        write_tokens(&mut file.file, &chunk, width).map_err(io)?;
    }
    file.finish(&header).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_round_trips_and_rejects_truncation() {
        let dir = tempfile::tempdir().unwrap();
        for vocab in [500, 100_000] {
            let path = dir.path().join(format!("s{vocab}.bin"));
            let tokens: Vec<u32> = (0..1000).map(|i| (i * 37) % vocab as u32).collect();
            write_shard(&path, &tokens, vocab).unwrap();
            let shard = Shard::open(&path).unwrap();
            assert_eq!((0..1000).map(|i| shard.get(i)).collect::<Vec<_>>(), tokens);
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
            assert!(Shard::open(&path).unwrap_err().contains("truncated"));
        }
    }

    #[test]
    fn other_trainers_token_files_read_as_their_writers_laid_them_out() {
        // Written by scripts/reference/make_data_fixtures.py as llm.c, nanoGPT and Megatron-LM write them.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data");
        let expected: std::collections::BTreeMap<String, Vec<u32>> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap();
        assert_eq!(expected.len(), 4);
        for (name, tokens) in &expected {
            let shard = Shard::open_any(&dir.join(name)).unwrap();
            assert_eq!((0..shard.len()).map(|i| shard.get(i)).collect::<Vec<_>>(), *tokens, "{name}");
            assert_eq!(shard.max_token(), tokens.iter().copied().max());
        }
        // llm.c's format written back: the same header and tokens, byte for byte.
        let out = tempfile::tempdir().unwrap();
        for (name, vocab) in [("llmc_gpt2.bin", 50257), ("llmc_llama3.bin", 128256)] {
            let tokens = Tokens::whole(Shard::open_any(&dir.join(name)).unwrap());
            write_llmc(&out.path().join(name), &tokens, vocab).unwrap();
            assert_eq!(std::fs::read(out.path().join(name)).unwrap(), std::fs::read(dir.join(name)).unwrap(), "{name}");
        }
        // A truncated llm.c file, and a Furnace shard with a damaged header, are refused.
        let bytes = std::fs::read(dir.join("llmc_gpt2.bin")).unwrap();
        std::fs::write(out.path().join("cut.bin"), &bytes[..bytes.len() - 2]).unwrap();
        assert!(Shard::open_any(&out.path().join("cut.bin")).unwrap_err().contains("truncated"));
        let shard = out.path().join("shard.bin");
        write_shard(&shard, &[1, 2, 3], 500).unwrap();
        let mut bytes = std::fs::read(&shard).unwrap();
        bytes[0] = b'X';
        std::fs::write(&shard, bytes).unwrap();
        assert!(Shard::open(&shard).unwrap_err().contains("bad magic"));
    }

    #[test]
    fn a_stream_reads_across_segments_and_slices_by_token() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(&dir.path().join("a.bin"), &[0, 1, 2, 3, 4], 500).unwrap();
        write_shard(&dir.path().join("b.bin"), &[5, 6, 7], 500).unwrap();
        let segment = |file: &str, start, len| Segment { file: file.into(), start, len, external: false };
        let all = Manifest { segments: vec![segment("a.bin", 0, 5), segment("b.bin", 0, 3)] };
        let read = |m: &Manifest| {
            let tokens = Tokens::open_segments(dir.path(), m).unwrap();
            let mut out = Vec::new();
            tokens.read_into(0, tokens.len(), &mut out);
            out
        };
        assert_eq!(read(&all), [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(read(&all.slice(3..7)), [3, 4, 5, 6]);
        assert_eq!(all.slice(3..7).segments, [segment("a.bin", 3, 2), segment("b.bin", 0, 2)]);
        let past = Manifest { segments: vec![segment("b.bin", 2, 5)] };
        assert!(Tokens::open_segments(dir.path(), &past).unwrap_err().contains("past its 3 tokens"));
    }
}
