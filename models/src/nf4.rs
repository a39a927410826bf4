//! NF4, QLoRA's 4-bit NormalFloat (Dettmers et al., 2023), with double quantization of the
//! block scales, bit-exact with bitsandbytes (`quantize_4bit(..., quant_type="nf4",
//! compress_statistics=True)`; see `scripts/reference/make_nf4_fixtures.py` for the code paths).
//!
//! A weight is cut into blocks of 64 values; each block keeps its absolute maximum and, per
//! value, the index of the nearest of 16 levels (quantiles of N(0, 1) scaled to [-1, 1], with an
//! exact zero), two indices per byte, high nibble first. The 4-byte block maxima are themselves
//! quantized: their mean is subtracted, and blocks of 256 are stored as 8-bit indices into the
//! signed "dynamic" map with one f32 scale each: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight.

use std::any::Any;
use std::sync::{Arc, OnceLock};

/// The 16 NF4 levels, as the QLoRA paper and bitsandbytes define them.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];

/// Values per NF4 block.
pub const NF4_BLOCK: usize = 64;
/// Block maxima per 8-bit block of the double quantization.
pub const ABSMAX_BLOCK: usize = 256;

/// The signed 8-bit "dynamic" map (Dettmers, 2016) of bitsandbytes' `create_dynamic_map()`:
/// for exponents 10⁻⁶…10⁰, the midpoints of a linear split of [0.1, 1] into 2^i parts, both
/// signs, then 0 and 1; sorted. Computed here in exact arithmetic; bitsandbytes builds it with
/// torch's vectorised f32 `linspace` and f32 products, which leave 72 of the 256 entries one
/// unit in the last place away (the tests quantize with its own map to compare bit for bit).
pub fn dynamic_map() -> [f32; 256] {
    let mut values: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let parts = 1usize << i;
        let scale = 10f64.powi(i - 6);
        for k in 0..parts {
            let lo = 0.1 + 0.9 * k as f64 / parts as f64;
            let hi = 0.1 + 0.9 * (k + 1) as f64 / parts as f64;
            let mid = (scale * (lo + hi) / 2.0) as f32;
            values.extend([mid, -mid]);
        }
    }
    values.extend([0.0, 1.0]);
    values.sort_by(f32::total_cmp);
    values.try_into().expect("2·(2⁷ − 1) + 2 = 256 values")
}

/// NF4 indices of `values`, packed two per byte (high nibble first), and each block's absmax.
/// As bitsandbytes: full blocks scale by the f32 reciprocal of their absmax, a short last block
/// divides by it; ties between two levels go to the lower one; an odd count is padded with 0.
pub fn quantize_nf4(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut bounds = [0f32; 15];
    for (i, b) in bounds.iter_mut().enumerate() {
        *b = (NF4_LEVELS[i] + NF4_LEVELS[i + 1]) / 2.0;
    }
    let level = |scaled: f32| bounds.iter().take_while(|&&b| b < scaled).count() as u8;
    let mut indices: Vec<u8> = Vec::with_capacity(values.len() + 1);
    let mut absmax = Vec::with_capacity(values.len().div_ceil(NF4_BLOCK));
    for block in values.chunks(NF4_BLOCK) {
        let max = block.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-38);
        absmax.push(block.iter().fold(0f32, |m, v| m.max(v.abs())));
        if block.len() == NF4_BLOCK {
            let reciprocal = 1.0 / max;
            indices.extend(block.iter().map(|&v| level((v * reciprocal).clamp(-1.0, 1.0))));
        } else {
            *absmax.last_mut().expect("pushed") = max;
            indices.extend(block.iter().map(|&v| level((v / max).clamp(-1.0, 1.0))));
        }
    }
    if indices.len() % 2 == 1 {
        indices.push(level(0.0));
    }
    (indices.chunks(2).map(|pair| (pair[0] << 4) | pair[1]).collect(), absmax)
}

/// Blockwise 8-bit quantization onto `map` (sorted, 256 entries), as bitsandbytes' generic
/// kernel: scale by the f32 reciprocal of the block's absmax, clamp to [-1, 1], take the nearest
/// entry (ties to the lower one).
pub fn quantize_blockwise(values: &[f32], map: &[f32; 256], block: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(block));
    for chunk in values.chunks(block) {
        let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        scales.push(absmax);
        let reciprocal = 1.0 / absmax;
        for &v in chunk {
            let scaled = (v * reciprocal).clamp(-1.0, 1.0);
            let above = map.partition_point(|&c| c < scaled).min(255);
            let below = above.saturating_sub(1);
            let nearer_below = (scaled - map[below]).abs() <= (scaled - map[above]).abs();
            codes.push(if nearer_below { below } else { above } as u8);
        }
    }
    (codes, scales)
}

/// The block maxima of an NF4 tensor, 8-bit quantized around their mean.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub offset: f32,
}

impl DoubleQuant {
    pub fn new(absmax: &[f32], map: &[f32; 256]) -> Self {
        let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let centered: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
        let (codes, scales) = quantize_blockwise(&centered, map, ABSMAX_BLOCK);
        Self { codes, scales, offset }
    }

    /// The block maxima back: `map[code] · scale + offset`.
    pub fn absmax(&self, map: &[f32; 256]) -> Vec<f32> {
        self.codes.iter().enumerate().map(|(i, &c)| map[c as usize] * self.scales[i / ABSMAX_BLOCK] + self.offset).collect()
    }
}

/// Values back from NF4 indices and block maxima: `level · absmax`.
pub fn dequantize_nf4_into(packed: &[u8], absmax: &[f32], out: &mut [f32]) {
    for (i, v) in out.iter_mut().enumerate() {
        let byte = packed[i / 2];
        let index = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
        *v = NF4_LEVELS[index as usize] * absmax[i / NF4_BLOCK];
    }
}

/// A weight matrix stored in NF4 with double-quantized block maxima.
#[derive(Debug, Clone)]
pub struct Nf4Matrix {
    pub shape: [usize; 2],
    pub(crate) packed: Vec<u8>,
    pub(crate) absmax: DoubleQuant,
    /// What a GPU backend keeps of the matrix on its device (the packed codes and decoded
    /// block maxima, uploaded by the first matmul there), as bitsandbytes keeps its 4-bit
    /// weights on the GPU.
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
    pub(crate) resident: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl Nf4Matrix {
    pub fn quantize(values: &[f32], shape: [usize; 2]) -> Self {
        assert_eq!(values.len(), shape[0] * shape[1], "values fill the shape");
        let (packed, absmax) = quantize_nf4(values);
        Self { shape, packed, absmax: DoubleQuant::new(&absmax, &dynamic_map()), resident: OnceLock::new() }
    }

    /// The dense matrix, row-major; pieces of 256 blocks dequantize in parallel.
    pub fn dequantize(&self) -> Vec<f32> {
        use rayon::prelude::*;
        const PIECE: usize = NF4_BLOCK * ABSMAX_BLOCK;
        let absmax = self.absmax.absmax(&dynamic_map());
        let mut out = vec![0.0; self.shape[0] * self.shape[1]];
        out.par_chunks_mut(PIECE).enumerate().for_each(|(i, piece)| {
            let blocks = i * ABSMAX_BLOCK;
            dequantize_nf4_into(&self.packed[i * PIECE / 2..], &absmax[blocks..], piece);
        });
        out
    }

    /// Bytes held: packed indices, 8-bit block maxima, their scales and offset.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.absmax.codes.len() + 4 * self.absmax.scales.len() + 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use furnace_core::params::from_safetensors;

    /// What bitsandbytes computed (scripts/reference/make_nf4_fixtures.py).
    fn fixture() -> furnace_core::params::NamedTensors {
        from_safetensors(include_bytes!("../../tests/fixtures/nf4.safetensors")).unwrap()
    }

    fn bytes(values: &[f32]) -> Vec<u8> {
        values.iter().map(|&v| v as u8).collect()
    }

    #[test]
    fn levels_are_bitsandbytes_nf4() {
        assert_eq!(fixture()["nf4_code"].data, NF4_LEVELS.to_vec());
    }

    #[test]
    fn nf4_indices_and_block_maxima_are_bit_exact() {
        let f = fixture();
        let (packed, absmax) = quantize_nf4(&f["input"].data);
        assert_eq!(absmax, f["absmax"].data);
        let expected = bytes(&f["packed"].data);
        let wrong = packed.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(wrong, 0, "{wrong} of {} bytes differ", expected.len());
        assert_eq!(packed.len(), expected.len());
    }

    /// Against bitsandbytes' nearest-entry kernel on its own map (see the fixture script for
    /// why its approximate C++ search is not the reference).
    #[test]
    fn double_quantization_is_bit_exact_on_its_map() {
        let f = fixture();
        let map: [f32; 256] = f["dq_map"].data.clone().try_into().unwrap();
        let dq = DoubleQuant::new(&f["absmax"].data, &map);
        assert_eq!(dq.offset, f["dq_offset"].data[0]);
        assert_eq!(dq.scales, f["dq_scales"].data);
        assert_eq!(dq.codes, bytes(&f["dq_codes"].data));
        assert_eq!(dq.absmax(&map), f["absmax_dequantized"].data);
        let (packed, _) = quantize_nf4(&f["input"].data);
        let mut out = vec![0.0; f["input"].data.len()];
        dequantize_nf4_into(&packed, &dq.absmax(&map), &mut out);
        assert_eq!(out, f["dequantized"].data);
    }

    #[test]
    fn dynamic_map_matches_bitsandbytes_to_one_ulp() {
        let theirs = &fixture()["dq_map"].data;
        for (a, b) in dynamic_map().iter().zip(theirs) {
            assert!((a.to_bits() as i64 - b.to_bits() as i64).abs() <= 1, "{a} vs {b}");
        }
    }

    #[test]
    fn nf4_matrix_is_about_four_bits_a_weight_and_round_trips() {
        let f = fixture();
        let values = &f["input"].data;
        let matrix = Nf4Matrix::quantize(values, [80, 251]);
        let bits = 8.0 * matrix.bytes() as f64 / values.len() as f64;
        assert!(bits < 4.2, "{bits} bits per weight");
        let back = matrix.dequantize();
        let reference = &f["dequantized"].data;
        let worst = back.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 1e-6, "our map vs bitsandbytes' map: {worst}");
    }
}
