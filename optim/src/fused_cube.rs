//! AdamW and Lion as one CubeCL kernel over a flat parameter, for Burn's CubeCL backends (wgpu,
//! CUDA): each element's parameter and state slots are read once and written once, where the
//! composition of tensor ops launches a dozen kernels, each over the whole buffer. Sophia (whose
//! clip count is a reduction), mixed dtypes and `FURNACE_KERNELS=reference` take the composed
//! update.

use burn::tensor::backend::Backend;
use burn::tensor::TensorPrimitive;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::server::ComputeServer;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use crate::algorithm::{Algorithm, Slots};
use crate::fused::{composed_update, FusedUpdate};

const UNITS: u32 = 256;

/// Whether the kernels run (the default) or the composed update (`FURNACE_KERNELS=reference`,
/// as for the model's fused ops), read once per process.
fn fused() -> bool {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FUSED.get_or_init(|| std::env::var("FURNACE_KERNELS").map_or(true, |v| v != "reference"))
}

/// A flat parameter (or gradient, or state slot) as the optimizer holds it.
type Flat<B> = burn::tensor::Tensor<B, 1>;

/// Same operation order as `Algorithm::update` (and the flex kernel), one element per unit.
#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn adamw_kernel<F: Float>(
    param: &Tensor<F>,
    grad: &Tensor<F>,
    exp_avg: &Tensor<F>,
    exp_avg_sq: &Tensor<F>,
    new_param: &mut Tensor<F>,
    new_exp_avg: &mut Tensor<F>,
    new_exp_avg_sq: &mut Tensor<F>,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    bias_correction2_sqrt: f32,
    step_size: f32,
    scale: f32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= param.len() {
        terminate!();
    }
    let g = f32::cast_from(grad[i]) * scale;
    let m = f32::cast_from(exp_avg[i]) * beta1 + g * (1.0 - beta1);
    let v = f32::cast_from(exp_avg_sq[i]) * beta2 + g * g * (1.0 - beta2);
    let denom = v.sqrt() / bias_correction2_sqrt + eps;
    new_param[i] = F::cast_from(f32::cast_from(param[i]) * decay - m / denom * step_size);
    new_exp_avg[i] = F::cast_from(m);
    new_exp_avg_sq[i] = F::cast_from(v);
}

#[allow(clippy::too_many_arguments)]
#[cube(launch)]
fn lion_kernel<F: Float>(
    param: &Tensor<F>,
    grad: &Tensor<F>,
    exp_avg: &Tensor<F>,
    new_param: &mut Tensor<F>,
    new_exp_avg: &mut Tensor<F>,
    beta1: f32,
    beta2: f32,
    lr: f32,
    decay: f32,
    scale: f32,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= param.len() {
        terminate!();
    }
    let g = f32::cast_from(grad[i]) * scale;
    let m = f32::cast_from(exp_avg[i]);
    let interpolated = m * beta1 + g * (1.0 - beta1);
    let mut sign = f32::new(0.0);
    if interpolated > 0.0 {
        sign = f32::new(1.0);
    }
    if interpolated < 0.0 {
        sign = f32::new(-1.0);
    }
    new_param[i] = F::cast_from(f32::cast_from(param[i]) * decay - sign * lr);
    new_exp_avg[i] = F::cast_from(m * beta2 + g * (1.0 - beta2));
}

fn cube<R: CubeRuntime, B: Backend<FloatTensorPrimitive = CubeTensor<R>>>(t: Flat<B>) -> CubeTensor<R> {
    into_contiguous(t.into_primitive().tensor())
}

fn tensor<B: Backend>(t: B::FloatTensorPrimitive) -> Flat<B> {
    Flat::from_primitive(TensorPrimitive::Float(t))
}

impl<R, F, I, BT> FusedUpdate for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    R::Server: ComputeServer,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn update(
        algorithm: &Algorithm,
        step: u64,
        lr: f64,
        weight_decay: f64,
        grad_scale: f64,
        value: Flat<Self>,
        grad: Flat<Self>,
        slots: &mut Slots<Self>,
        clipped: &mut Option<Flat<Self>>,
    ) -> Flat<Self> {
        let one_dtype = fused() && grad.dtype() == value.dtype() && slots.values().all(|s| s.dtype() == value.dtype());
        let (beta1, beta2, adam_eps) = match *algorithm {
            Algorithm::AdamW { beta1, beta2, eps } if one_dtype => (beta1, beta2, Some(eps)),
            Algorithm::Lion { beta1, beta2 } if one_dtype => (beta1, beta2, None),
            _ => return composed_update(algorithm, step, lr, weight_decay, grad_scale, value, grad, slots, clipped),
        };
        let mut slot = |name: &str| cube(slots.remove(name).unwrap_or_else(|| value.zeros_like()));
        let m = slot("exp_avg");
        let v = adam_eps.is_some().then(|| slot("exp_avg_sq"));
        let (param, grad) = (cube(value), cube(grad));
        let n = param.meta.num_elements();
        let new = || empty_device_dtype(param.client.clone(), param.device.clone(), [n].into(), param.dtype);
        let (count, dim) = (CubeCount::new_1d((n as u32).div_ceil(UNITS).max(1)), CubeDim::new_1d(UNITS));
        let (client, dtype) = (param.client.clone(), param.dtype);
        let (decay, scale) = ((1.0 - lr * weight_decay) as f32, grad_scale as f32);
        let (new_param, new_m) = (new(), new());
        match (adam_eps, v) {
            (Some(eps), Some(v)) => {
                let new_v = new();
                adamw_kernel::launch::<R>(
                    &client,
                    count,
                    dim,
                    param.into_tensor_arg(),
                    grad.into_tensor_arg(),
                    m.into_tensor_arg(),
                    v.into_tensor_arg(),
                    new_param.clone().into_tensor_arg(),
                    new_m.clone().into_tensor_arg(),
                    new_v.clone().into_tensor_arg(),
                    beta1 as f32,
                    beta2 as f32,
                    eps as f32,
                    decay,
                    (1.0 - beta2.powi(step as i32)).sqrt() as f32,
                    (lr / (1.0 - beta1.powi(step as i32))) as f32,
                    scale,
                    dtype.into(),
                );
                slots.insert("exp_avg_sq".into(), tensor(new_v));
            }
            _ => lion_kernel::launch::<R>(
                &client,
                count,
                dim,
                param.into_tensor_arg(),
                grad.into_tensor_arg(),
                m.into_tensor_arg(),
                new_param.clone().into_tensor_arg(),
                new_m.clone().into_tensor_arg(),
                beta1 as f32,
                beta2 as f32,
                lr as f32,
                decay,
                scale,
                dtype.into(),
            ),
        }
        slots.insert("exp_avg".into(), tensor(new_m));
        tensor(new_param)
    }
}
