//! GGUF v3, written and read by us (no Rust crate writes it): metadata key/values, tensor
//! infos, 32-byte aligned data; f32, f16 and the q8_0 / q4_0 block quantizers, bit-exact with
//! gguf-py's `gguf.quants.quantize` (which matches ggml's reference C).

use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
pub const ALIGNMENT: usize = 32;
const BLOCK: usize = 32;

/// ggml tensor types this writer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
}

impl GgmlType {
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            8 => GgmlType::Q8_0,
            _ => return None,
        })
    }

    /// Bytes for `n` values (n a multiple of the block size for quantized types).
    fn bytes(&self, n: usize) -> usize {
        match self {
            GgmlType::F32 => 4 * n,
            GgmlType::F16 => 2 * n,
            GgmlType::Q8_0 => n / BLOCK * 34,
            GgmlType::Q4_0 => n / BLOCK * 18,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrI32(Vec<i32>),
}

/// A tensor as GGUF stores it: `dims` in ggml order (innermost first), encoded bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Gguf {
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<(String, GgufTensor)>,
}

/// Round half away from zero, as ggml's `roundf` (and gguf-py's `np_roundf`).
fn roundf(x: f32) -> f32 {
    let a = x.abs();
    let floored = a.floor();
    let b = floored + (2.0 * (a - floored)).floor();
    b * if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / BLOCK * 34);
    for block in values.chunks_exact(BLOCK) {
        let d = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| roundf(v * id) as i8 as u8));
    }
    out
}

pub fn quantize_q4_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / BLOCK * 18);
    for block in values.chunks_exact(BLOCK) {
        // The value of largest magnitude, first one on ties (numpy's argmax).
        let max = block.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let q = |v: f32| ((v * id + 8.5).trunc() as i32).clamp(0, 15) as u8;
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend((0..BLOCK / 2).map(|j| q(block[j]) | (q(block[j + BLOCK / 2]) << 4)));
    }
    out
}

/// Encode f32 values as `ty`.
pub fn encode(values: &[f32], ty: GgmlType) -> Vec<u8> {
    match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => quantize_q8_0(values),
        GgmlType::Q4_0 => quantize_q4_0(values),
    }
}

/// Decode `bytes` of type `ty` back to f32.
pub fn decode(bytes: &[u8], ty: GgmlType) -> Vec<f32> {
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    match ty {
        GgmlType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        GgmlType::F16 => bytes.chunks_exact(2).map(f16).collect(),
        GgmlType::Q8_0 => bytes.chunks_exact(34).flat_map(|b| b[2..].iter().map(move |&q| q as i8 as f32 * f16(&b[..2]))).collect(),
        GgmlType::Q4_0 => bytes
            .chunks_exact(18)
            .flat_map(|b| {
                let d = f16(&b[..2]);
                let low = b[2..].iter().map(move |&q| ((q & 0x0F) as i32 - 8) as f32 * d);
                let high = b[2..].iter().map(move |&q| ((q >> 4) as i32 - 8) as f32 * d);
                low.collect::<Vec<_>>().into_iter().chain(high.collect::<Vec<_>>())
            })
            .collect(),
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(ALIGNMENT) {
        out.push(0);
    }
}

impl Gguf {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            match value {
                Value::U32(v) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::I32(v) => {
                    out.extend_from_slice(&5u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::F32(v) => {
                    out.extend_from_slice(&6u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Value::Bool(v) => {
                    out.extend_from_slice(&7u32.to_le_bytes());
                    out.push(*v as u8);
                }
                Value::Str(s) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                Value::ArrStr(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    items.iter().for_each(|s| put_str(&mut out, s));
                }
                Value::ArrI32(items) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&5u32.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    items.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
                }
            }
        }
        let mut offset = 0usize;
        for (name, t) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            t.dims.iter().for_each(|d| out.extend_from_slice(&(*d as u64).to_le_bytes()));
            out.extend_from_slice(&(t.ty as u32).to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += t.bytes.len().div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        pad(&mut out);
        for (_, t) in &self.tensors {
            out.extend_from_slice(&t.bytes);
            pad(&mut out);
        }
        out
    }

    /// Parse a GGUF file; a truncated or corrupted one is an error saying what broke.
    pub fn from_bytes(bytes: &[u8]) -> Result<Gguf, String> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err("not a GGUF file (bad magic)".into());
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(format!("GGUF version {version} is not supported (3 is)"));
        }
        // Every count and size is bounded by the file's length before anything is allocated:
        // a corrupted header must be an error, not a capacity overflow or an abort.
        let n_tensors = r.count(MIN_TENSOR_INFO_BYTES, "tensors")?;
        let n_kv = r.count(MIN_KV_BYTES, "metadata entries")?;
        let mut gguf = Gguf::default();
        for _ in 0..n_kv {
            let key = r.string()?;
            let value = match r.u32()? {
                4 => Value::U32(r.u32()?),
                5 => Value::I32(r.u32()? as i32),
                6 => Value::F32(f32::from_bits(r.u32()?)),
                7 => Value::Bool(r.take(1)?[0] != 0),
                8 => Value::Str(r.string()?),
                9 => match (r.u32()?, r.count(4, "array elements")?) {
                    (8, n) => Value::ArrStr((0..n).map(|_| r.string()).collect::<Result<_, _>>()?),
                    (5, n) => Value::ArrI32((0..n).map(|_| r.u32().map(|v| v as i32)).collect::<Result<_, _>>()?),
                    (t, _) => return Err(format!("metadata `{key}`: arrays of type {t} are not read")),
                },
                t => return Err(format!("metadata `{key}`: value type {t} is not read")),
            };
            gguf.metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > MAX_DIMS {
                return Err(format!("tensor `{name}` claims {n_dims} dimensions (GGUF allows {MAX_DIMS}; corrupted?)"));
            }
            let dims = (0..n_dims).map(|_| r.u64().map(|d| d as usize)).collect::<Result<Vec<_>, _>>()?;
            let raw_ty = r.u32()?;
            let ty = GgmlType::from_u32(raw_ty).ok_or_else(|| format!("tensor `{name}` has ggml type {raw_ty}, which is not read"))?;
            infos.push((name, dims, ty, r.u64()? as usize));
        }
        let data_start = r.at.div_ceil(ALIGNMENT) * ALIGNMENT;
        for (name, dims, ty, offset) in infos {
            let past_end = || format!("tensor `{name}` runs past the end of the file (truncated or corrupted?)");
            let elements = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).filter(|&n| n <= bytes.len()).ok_or_else(past_end)?;
            let start = data_start.checked_add(offset).ok_or_else(past_end)?;
            let end = start.checked_add(ty.bytes(elements)).ok_or_else(past_end)?;
            let bytes = bytes.get(start..end).ok_or_else(past_end)?;
            gguf.tensors.push((name, GgufTensor { dims, ty, bytes: bytes.to_vec() }));
        }
        Ok(gguf)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// The fewest bytes a tensor's header entry takes (an empty name, no dimensions, type, offset)
/// and a metadata entry (an empty key, a type, a one-byte value).
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;
const MIN_KV_BYTES: usize = 8 + 4 + 1;
/// GGML_MAX_DIMS.
const MAX_DIMS: usize = 4;

impl Reader<'_> {
    /// A count of entries of at least `entry_bytes` each, no more than the rest of the file holds.
    fn count(&mut self, entry_bytes: usize, what: &str) -> Result<usize, String> {
        let n = self.u64()?;
        let room = (self.bytes.len() - self.at) / entry_bytes;
        if n > room as u64 {
            return Err(format!(
                "the GGUF header claims {n} {what}, more than the file's {} bytes can hold (corrupted?)",
                self.bytes.len()
            ));
        }
        Ok(n as usize)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let slice = self.bytes.get(self.at..self.at + n).ok_or("the GGUF header ends early (truncated file?)")?;
        self.at += n;
        Ok(slice)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u64()? as usize;
        if n > self.bytes.len() {
            return Err("a GGUF string claims more bytes than the file holds (corrupted?)".into());
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a GGUF string is not UTF-8 (corrupted?)".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        serde_json::from_str(include_str!("../../tests/fixtures/gguf_quants.json")).unwrap()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn quantizers_are_bit_exact_with_gguf_py() {
        let fx = fixture();
        let input: Vec<f32> = fx["input"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(hex(&quantize_q8_0(&input)), fx["q8_0"].as_str().unwrap());
        assert_eq!(hex(&quantize_q4_0(&input)), fx["q4_0"].as_str().unwrap());
    }

    #[test]
    fn file_round_trips_and_truncation_is_an_error() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut g = Gguf::default();
        g.metadata.insert("general.architecture".into(), Value::Str("llama".into()));
        g.metadata.insert("x.list".into(), Value::ArrStr(vec!["a".into(), "b c".into()]));
        g.metadata.insert("x.n".into(), Value::U32(7));
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0] {
            g.tensors.push((format!("t{}", ty as u32), GgufTensor { dims: vec![32, 2], ty, bytes: encode(&values, ty) }));
        }
        let bytes = g.to_bytes();
        assert_eq!(Gguf::from_bytes(&bytes).unwrap(), g);
        let q8 = decode(&g.tensors[2].1.bytes, GgmlType::Q8_0);
        assert!(values.iter().zip(&q8).all(|(a, b)| (a - b).abs() < 0.01));
        assert!(Gguf::from_bytes(&bytes[..bytes.len() - 40]).unwrap_err().contains("truncated"));
        assert!(Gguf::from_bytes(&bytes[..50]).is_err());
        assert!(Gguf::from_bytes(b"GGML....").unwrap_err().contains("magic"));
    }

    #[test]
    fn hostile_counts_and_sizes_are_errors_not_allocations() {
        let mut g = Gguf::default();
        g.tensors.push(("t".into(), GgufTensor { dims: vec![32, 2], ty: GgmlType::F32, bytes: encode(&[0.5; 64], GgmlType::F32) }));
        let good = g.to_bytes();
        // Header: magic, version, then the tensor count and the metadata count (u64 each).
        let with = |at: usize, value: u64| {
            let mut bytes = good.clone();
            bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            Gguf::from_bytes(&bytes).unwrap_err()
        };
        assert!(with(8, 1 << 62).contains("claims 4611686018427387904 tensors"));
        assert!(with(16, u64::MAX).contains("metadata entries"));
        // The first tensor's entry: name length 8 + "t", n_dims 4, then its dimensions.
        let dims_at = 24 + 8 + 1 + 4;
        assert!(with(dims_at, u64::MAX).contains("runs past the end"));
        assert!(with(dims_at, 1 << 40).contains("runs past the end"));
        let mut bytes = good.clone();
        bytes[dims_at - 4..dims_at].copy_from_slice(&1000u32.to_le_bytes());
        assert!(Gguf::from_bytes(&bytes).unwrap_err().contains("1000 dimensions"));
    }
}
