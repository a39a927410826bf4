//! Parameter groups: which parameters get weight decay, decided by what each one is (the
//! model says: `ParamKind`).

use furnace_configs::OptimizerSection;
use furnace_core::params::ParamKind;

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
    pub fn weight_decay_for(&self, kind: ParamKind) -> f64 {
        let decayed = match kind {
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
