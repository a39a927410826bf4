//! The one seeded RNG every crate uses, so a recipe's seed means the same thing everywhere.

/// SplitMix64: tiny, fast, and its whole state is one u64 (easy to checkpoint).
#[derive(Debug, Clone)]
pub struct SeededRng {
    pub state: u64,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The random streams a run draws from. Each has its own odd constant, so that two streams,
/// two ranks or two steps never start from the same seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// A rank's own seed (rank 0 draws what a single process would).
    Rank,
    /// The backend RNG's dropout masks, per step.
    Dropout,
    /// Masked-LM and span-corruption noise, per micro-batch.
    Denoising,
    /// GRPO's and PPO's sampled replies, per micro-batch.
    Rollout,
    /// One prompt's replies within a rollout.
    Reply,
    /// Sophia's sampled labels, per curvature refresh.
    Curvature,
    /// The loader's shuffle, per epoch.
    Shuffle,
    /// A mixture source's shuffle, per pass over it.
    MixturePass,
    /// Speculative decoding's drafts (index 1) and acceptance tests (index 2).
    Speculation,
}

impl Stream {
    fn constant(self) -> u64 {
        match self {
            Stream::Rank => 0x6A09_E667_F3BC_C909,
            Stream::Dropout => 0x9E37_79B9,
            Stream::Denoising => 0xA24B_AED4_963E_E407,
            Stream::Rollout => 0xD1B5_4A32_D192_ED03,
            Stream::Reply => 0x9E37_79B9_7F4A_7C15,
            Stream::Curvature => 0x2545_F491_4F6C_DD1D,
            Stream::Shuffle => 0xA076_1D64_78BD_642F,
            Stream::MixturePass => 0xE703_7ED1_A0B4_28DB,
            Stream::Speculation => 0x8EBC_6AF0_9C88_C6E3,
        }
    }
}

/// The one seed derivation every stream uses: `base ^ index · k(stream)`. Draws are pure
/// functions of (seed, stream, index), which is what makes a resumed run draw what the
/// uninterrupted one would.
pub fn derive_seed(base: u64, stream: Stream, index: u64) -> u64 {
    base ^ index.wrapping_mul(stream.constant())
}
