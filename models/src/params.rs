//! Parameters by name: read every float parameter of a module out to the host under its
//! module path (`layers.0.attention.q_proj.weight`), and load such a map back in.
//! Checkpoints, the Hugging Face tables and the optimizer state all key on these paths.

use std::collections::BTreeMap;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;

/// A float tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn from_tensor<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Self {
        let shape = tensor.dims().to_vec();
        let data = tensor.into_data().convert::<f32>().into_vec().expect("float tensor");
        Self { shape, data }
    }

    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(self.data.clone(), self.shape.clone()), device)
    }

    /// The transpose of a 2-D tensor.
    pub fn transposed(&self) -> Self {
        let [rows, cols] = [self.shape[0], self.shape[1]];
        let mut data = vec![0.0; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = self.data[r * cols + c];
            }
        }
        Self { shape: vec![cols, rows], data }
    }
}

pub type NamedTensors = BTreeMap<String, HostTensor>;

/// Tracks the module path during a visit or a map.
#[derive(Debug, Default)]
pub struct PathStack(Vec<String>);

impl PathStack {
    pub fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }

    pub fn exit(&mut self) {
        self.0.pop();
    }

    pub fn path(&self) -> String {
        self.0.join(".")
    }
}

/// Every float parameter of `module`, by path.
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M) -> NamedTensors {
    struct Collect {
        path: PathStack,
        out: NamedTensors,
    }
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out.insert(self.path.path(), HostTensor::from_tensor(param.val()));
        }
    }
    let mut collect = Collect { path: PathStack::default(), out: NamedTensors::new() };
    module.visit(&mut collect);
    collect.out
}

/// Parameter paths and shapes, without copying data.
pub fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Shapes {
        path: PathStack,
        out: BTreeMap<String, Vec<usize>>,
    }
    impl<B: Backend> ModuleVisitor<B> for Shapes {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out.insert(self.path.path(), param.lazy_shape().to_vec());
        }
    }
    let mut shapes = Shapes { path: PathStack::default(), out: BTreeMap::new() };
    module.visit(&mut shapes);
    shapes.out
}

/// Replace every float parameter of `module` with the tensor of the same path.
/// Fails on a missing path, a shape mismatch, or a tensor that matches no parameter.
pub fn load_named<B: Backend, M: Module<B>>(module: M, tensors: &NamedTensors) -> Result<M, String> {
    struct Load<'a> {
        path: PathStack,
        tensors: &'a NamedTensors,
        used: usize,
        errors: Vec<String>,
    }
    impl<B: Backend> ModuleMapper<B> for Load<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.enter(name);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let path = self.path.path();
            let Some(host) = self.tensors.get(&path) else {
                self.errors.push(format!("missing tensor `{path}`"));
                return Param::from_mapped_value(id, tensor, mapper);
            };
            if host.shape != tensor.dims() {
                self.errors.push(format!("tensor `{path}` has shape {:?}, the model expects {:?}", host.shape, tensor.dims()));
                return Param::from_mapped_value(id, tensor, mapper);
            }
            self.used += 1;
            let mut loaded = host.to_tensor::<B, D>(&tensor.device());
            if tensor.is_require_grad() {
                loaded = loaded.require_grad();
            }
            Param::from_mapped_value(id, loaded, mapper)
        }
    }
    let mut load = Load { path: PathStack::default(), tensors, used: 0, errors: Vec::new() };
    let module = module.map(&mut load);
    if load.used != tensors.len() && load.errors.is_empty() {
        let expected = param_shapes::<B, M>(&module);
        let extra: Vec<_> = tensors.keys().filter(|k| !expected.contains_key(*k)).cloned().collect();
        load.errors.push(format!("tensors that match no parameter: {}", extra.join(", ")));
    }
    if load.errors.is_empty() {
        Ok(module)
    } else {
        Err(load.errors.join("; "))
    }
}

/// Serialize named f32 tensors as safetensors bytes.
pub fn to_safetensors(tensors: &NamedTensors) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes: &[u8] = bytemuck_f32(&t.data);
            (name.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), bytes).expect("consistent shape"))
        })
        .collect();
    safetensors::serialize(views, None).expect("safetensors serialization")
}

fn bytemuck_f32(data: &[f32]) -> &[u8] {
    // f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) }
}

/// Parse safetensors bytes (F32, F16 or BF16 tensors) into named f32 tensors.
pub fn from_safetensors(bytes: &[u8]) -> Result<NamedTensors, String> {
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let mut out = NamedTensors::new();
    for (name, view) in file.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            safetensors::Dtype::BF16 => raw.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect(),
            safetensors::Dtype::F16 => raw.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
            other => return Err(format!("tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 are read")),
        };
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok(out)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: renormalise.
            let shift = frac.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | ((frac << shift) & 0x3ff) << 13
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}
