//! Parameter groups: which parameters get weight decay, decided by path.

use furnace_configs::OptimizerSection;

/// What a parameter is, for choosing its weight-decay group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Matrix,
    Norm,
    Bias,
    Embedding,
}

impl ParamKind {
    /// By path and rank: `*.bias`; other 1-D tensors are norm weights; `embed_*` are embeddings.
    pub fn classify(path: &str, rank: usize) -> Self {
        if path.ends_with("bias") {
            ParamKind::Bias
        } else if path.split('.').next().is_some_and(|p| p.starts_with("embed")) {
            ParamKind::Embedding
        } else if rank == 1 {
            ParamKind::Norm
        } else {
            ParamKind::Matrix
        }
    }
}

/// Weight decay for the decayed group; norms, biases and embeddings join it only when asked
/// (the GPT-2/nanoGPT convention).
#[derive(Debug, Clone)]
pub struct DecayGroups {
    pub weight_decay: f64,
    pub decay_norms: bool,
    pub decay_biases: bool,
    pub decay_embeddings: bool,
}

impl From<&OptimizerSection> for DecayGroups {
    fn from(o: &OptimizerSection) -> Self {
        Self {
            weight_decay: o.weight_decay,
            decay_norms: o.decay_norms,
            decay_biases: o.decay_biases,
            decay_embeddings: o.decay_embeddings,
        }
    }
}

impl DecayGroups {
    pub fn weight_decay_for(&self, path: &str, rank: usize) -> f64 {
        let decayed = match ParamKind::classify(path, rank) {
            ParamKind::Matrix => true,
            ParamKind::Norm => self.decay_norms,
            ParamKind::Bias => self.decay_biases,
            ParamKind::Embedding => self.decay_embeddings,
        };
        if decayed {
            self.weight_decay
        } else {
            0.0
        }
    }
}
