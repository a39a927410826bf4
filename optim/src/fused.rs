//! The update of one parameter as a single pass (a backend extension, like the
//! model's fused kernels). Written with tensor ops, AdamW is a dozen separate ops per
//! parameter, each reading and writing a full-size buffer; at 124M parameters those buffers
//! are half a gigabyte each. On the flex backend the parameter and its state slots are
//! updated where they lie, split in fixed-size pieces over the rayon pool; the GPU backends run
//! one CubeCL kernel per parameter (`fused_cube.rs`).

use burn::backend::Flex;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use crate::algorithm::{Algorithm, Slots};

/// Elements per parallel task.
const TASK_ELEMS: usize = 1 << 15;

pub trait FusedUpdate: Backend {
    /// [`Algorithm::update`] applied to `grad · grad_scale`.
    #[allow(clippy::too_many_arguments)]
    fn update(
        algorithm: &Algorithm,
        step: u64,
        lr: f64,
        weight_decay: f64,
        grad_scale: f64,
        value: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        slots: &mut Slots<Self>,
        clipped: &mut Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 1> {
        composed_update(algorithm, step, lr, weight_decay, grad_scale, value, grad, slots, clipped)
    }
}

/// The update from tensor ops: the default, and the reference the fused pass is tested against.
#[allow(clippy::too_many_arguments)]
pub fn composed_update<B: Backend>(
    algorithm: &Algorithm,
    step: u64,
    lr: f64,
    weight_decay: f64,
    grad_scale: f64,
    value: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    slots: &mut Slots<B>,
    clipped: &mut Option<Tensor<B, 1>>,
) -> Tensor<B, 1> {
    let grad = if grad_scale != 1.0 { grad * grad_scale } else { grad };
    algorithm.update(step, lr, weight_decay, value, grad, slots, clipped)
}

impl FusedUpdate for Flex {
    fn update(
        algorithm: &Algorithm,
        step: u64,
        lr: f64,
        weight_decay: f64,
        grad_scale: f64,
        value: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        slots: &mut Slots<Self>,
        clipped: &mut Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, 1> {
        let all_f32 = value.dtype() == DType::F32 && grad.dtype() == DType::F32 && slots.values().all(|s| s.dtype() == DType::F32);
        if !all_f32 {
            return composed_update(algorithm, step, lr, weight_decay, grad_scale, value, grad, slots, clipped);
        }
        let device = value.device();
        let n = value.dims()[0];
        let mut value = owned_contiguous(value);
        let grad = owned_contiguous(grad);
        let g = grad.as_slice::<f32>().expect("contiguous f32");
        let mut slot = |name: &str| slots.remove(name).map(owned_contiguous).unwrap_or_else(|| FlexTensor::zeros([n].into(), DType::F32));
        let decay = (1.0 - lr * weight_decay) as f32;
        let scale = grad_scale as f32;
        let mut refreshed = Vec::new();
        match *algorithm {
            Algorithm::AdamW { beta1, beta2, eps } => {
                let (mut m, mut v) = (slot("exp_avg"), slot("exp_avg_sq"));
                let c = AdamW {
                    beta1: beta1 as f32,
                    beta2: beta2 as f32,
                    eps: eps as f32,
                    decay,
                    bias_correction2_sqrt: (1.0 - beta2.powi(step as i32)).sqrt() as f32,
                    step_size: (lr / (1.0 - beta1.powi(step as i32))) as f32,
                    scale,
                };
                pieces3(&mut value, &mut m, &mut v).zip(g.par_chunks(TASK_ELEMS)).for_each(|(((p, m), v), g)| adamw(&c, p, m, v, g));
                refreshed.extend([("exp_avg", m), ("exp_avg_sq", v)]);
            }
            Algorithm::Lion { beta1, beta2 } => {
                let mut m = slot("exp_avg");
                let c = Lion { beta1: beta1 as f32, beta2: beta2 as f32, lr: lr as f32, decay, scale };
                pieces(&mut value).zip(pieces(&mut m)).zip(g.par_chunks(TASK_ELEMS)).for_each(|((p, m), g)| lion(&c, p, m, g));
                refreshed.push(("exp_avg", m));
            }
            Algorithm::Sophia { beta1, rho, eps, .. } => {
                let mut m = slot("exp_avg");
                let hessian = slots.get("hessian").map(|h| h.clone().into_primitive().tensor().to_contiguous());
                let h = hessian.as_ref().map(|h| h.as_slice::<f32>().expect("contiguous f32"));
                let c = Sophia { beta1: beta1 as f32, rho: rho as f32, eps: eps as f32, lr: lr as f32, decay, scale };
                let count: usize = pieces(&mut value)
                    .zip(pieces(&mut m))
                    .zip(g.par_chunks(TASK_ELEMS))
                    .enumerate()
                    .map(|(i, ((p, m), g))| sophia(&c, p, m, g, h.map(|h| &h[i * TASK_ELEMS..][..p.len()])))
                    .sum();
                let count = Tensor::<Flex, 1>::from_data(TensorData::new(vec![count as f32], [1]), &device);
                *clipped = Some(match clipped.take() {
                    Some(total) => total + count,
                    None => count,
                });
                refreshed.push(("exp_avg", m));
            }
        }
        for (name, tensor) in refreshed {
            slots.insert(name.into(), tensor_of(tensor));
        }
        tensor_of(value)
    }
}

/// The tensor's storage, contiguous and owned by this handle alone, so it can be written in place.
fn owned_contiguous(t: Tensor<Flex, 1>) -> FlexTensor {
    let t = t.into_primitive().tensor();
    let contiguous = t.to_contiguous();
    // Drop the original handle first: `to_contiguous` shares the buffer when there is nothing to copy.
    drop(t);
    contiguous
}

fn tensor_of(t: FlexTensor) -> Tensor<Flex, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn pieces(t: &mut FlexTensor) -> rayon::slice::ChunksMut<'_, f32> {
    t.storage_mut::<f32>().par_chunks_mut(TASK_ELEMS)
}

type Pieces3<'a> = rayon::iter::Zip<
    rayon::iter::Zip<rayon::slice::ChunksMut<'a, f32>, rayon::slice::ChunksMut<'a, f32>>,
    rayon::slice::ChunksMut<'a, f32>,
>;

fn pieces3<'a>(a: &'a mut FlexTensor, b: &'a mut FlexTensor, c: &'a mut FlexTensor) -> Pieces3<'a> {
    pieces(a).zip(pieces(b)).zip(pieces(c))
}

struct AdamW {
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    bias_correction2_sqrt: f32,
    step_size: f32,
    scale: f32,
}

/// Same operation order as `Algorithm::update`, one element at a time.
fn adamw(c: &AdamW, param: &mut [f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], grad: &[f32]) {
    for (((p, m), v), &g) in param.iter_mut().zip(exp_avg).zip(exp_avg_sq).zip(grad) {
        let g = g * c.scale;
        *m = *m * c.beta1 + g * (1.0 - c.beta1);
        *v = *v * c.beta2 + g * g * (1.0 - c.beta2);
        let denom = v.sqrt() / c.bias_correction2_sqrt + c.eps;
        *p = *p * c.decay - *m / denom * c.step_size;
    }
}

struct Lion {
    beta1: f32,
    beta2: f32,
    lr: f32,
    decay: f32,
    scale: f32,
}

fn lion(c: &Lion, param: &mut [f32], exp_avg: &mut [f32], grad: &[f32]) {
    for ((p, m), &g) in param.iter_mut().zip(exp_avg).zip(grad) {
        let g = g * c.scale;
        let interpolated = *m * c.beta1 + g * (1.0 - c.beta1);
        let sign = if interpolated > 0.0 {
            1.0
        } else if interpolated < 0.0 {
            -1.0
        } else {
            0.0
        };
        *p = *p * c.decay - sign * c.lr;
        *m = *m * c.beta2 + g * (1.0 - c.beta2);
    }
}

struct Sophia {
    beta1: f32,
    rho: f32,
    eps: f32,
    lr: f32,
    decay: f32,
    scale: f32,
}

/// Returns how many coordinates hit the clip.
fn sophia(c: &Sophia, param: &mut [f32], exp_avg: &mut [f32], grad: &[f32], hessian: Option<&[f32]>) -> usize {
    let mut clipped = 0;
    for (i, ((p, m), &g)) in param.iter_mut().zip(exp_avg).zip(grad).enumerate() {
        *m = *m * c.beta1 + g * c.scale * (1.0 - c.beta1);
        let ratio = match hessian {
            Some(h) => *m / (h[i] * c.rho).max(c.eps),
            None => *m / c.eps,
        };
        clipped += (ratio.abs() >= 1.0) as usize;
        *p = *p * c.decay - ratio.clamp(-1.0, 1.0) * c.lr;
    }
    clipped
}

#[cfg(test)]
mod tests {
    use burn::tensor::Distribution;

    use super::*;

    /// The fused pass against the composed ops over several steps of random gradients.
    #[test]
    fn fused_updates_match_the_composed_ones() {
        let device = Default::default();
        let algorithms = [
            Algorithm::AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8 },
            Algorithm::Lion { beta1: 0.9, beta2: 0.99 },
            Algorithm::Sophia { beta1: 0.96, beta2: 0.99, rho: 0.04, eps: 1e-12, hessian_interval: 2 },
        ];
        for algorithm in algorithms {
            let n = 3 * TASK_ELEMS + 123;
            Flex::seed(&device, 7);
            let init = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
            let (mut fused_value, mut composed_value) = (init.clone(), init);
            let (mut fused_slots, mut composed_slots) = (Slots::new(), Slots::new());
            let (mut fused_clipped, mut composed_clipped) = (None, None);
            for step in 1..=4u64 {
                let grad = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, 0.01), &device);
                if algorithm.needs_curvature(step) {
                    let estimate = grad.clone().square() * 64.0;
                    algorithm.update_curvature(estimate.clone(), &mut fused_slots);
                    algorithm.update_curvature(estimate, &mut composed_slots);
                }
                fused_value =
                    Flex::update(&algorithm, step, 1e-2, 0.1, 0.5, fused_value, grad.clone(), &mut fused_slots, &mut fused_clipped);
                composed_value =
                    composed_update(&algorithm, step, 1e-2, 0.1, 0.5, composed_value, grad, &mut composed_slots, &mut composed_clipped);
            }
            let values = |t: Tensor<Flex, 1>| t.into_data().into_vec::<f32>().unwrap();
            for (i, (a, b)) in values(fused_value).iter().zip(values(composed_value)).enumerate() {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{algorithm:?} [{i}]: fused {a} vs composed {b}");
            }
            for (name, slot) in &composed_slots {
                let (a, b) = (values(fused_slots[name].clone()), values(slot.clone()));
                assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() <= 1e-6 * (1.0 + b.abs())), "{algorithm:?} slot {name}");
            }
            let count = |c: Option<Tensor<Flex, 1>>| c.map(|c| c.into_scalar());
            assert_eq!(count(fused_clipped), count(composed_clipped), "{algorithm:?} clipped coordinates");
        }
    }
}
