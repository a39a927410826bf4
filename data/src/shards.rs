//! Token shards: a 24-byte header (magic, version, bytes per token, count) then the tokens,
//! little-endian, u16 when the vocabulary fits and u32 otherwise. Read memory-mapped.

use std::fs::File;
use std::path::Path;

use furnace_core::fsutil::atomic_write;
use memmap2::Mmap;

const MAGIC: &[u8; 8] = b"FURNTOK\0";
const VERSION: u32 = 1;
const HEADER: usize = 24;

/// Write `tokens` as a shard at `path` (atomically).
pub fn write_shard(path: &Path, tokens: &[u32], vocab_size: usize) -> std::io::Result<()> {
    let width: u32 = if vocab_size <= u16::MAX as usize + 1 { 2 } else { 4 };
    let mut bytes = Vec::with_capacity(HEADER + tokens.len() * width as usize);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&width.to_le_bytes());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        match width {
            2 => bytes.extend_from_slice(&(t as u16).to_le_bytes()),
            _ => bytes.extend_from_slice(&t.to_le_bytes()),
        }
    }
    atomic_write(path, &bytes)
}

/// A memory-mapped shard.
#[derive(Debug)]
pub struct Shard {
    map: Mmap,
    width: usize,
    len: usize,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot open token shard {}: {e}", path.display()))?;
        // Safety: shards are written once, atomically, and never modified in place.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot map {}: {e}", path.display()))?;
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
        Ok(Self { map, width, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        let at = HEADER + i * self.width;
        match self.width {
            2 => u16::from_le_bytes([self.map[at], self.map[at + 1]]) as u32,
            _ => u32::from_le_bytes(self.map[at..at + 4].try_into().unwrap()),
        }
    }

    /// Tokens `start..start+len` widened to i64 (Burn's int input).
    pub fn read_into(&self, start: usize, len: usize, out: &mut Vec<i64>) {
        out.extend((start..start + len).map(|i| self.get(i) as i64));
    }
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
}
