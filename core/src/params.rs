//! Parameters by name: read every float parameter of a module out to the host under its
//! module path (`layers.0.attention.q_proj.weight`), and load such a map back in.
//! Checkpoints, the Hugging Face tables and the optimizer state all key on these paths.

use std::collections::BTreeMap;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// A parameter's value in f32, the type activations are in. Under runtime.precision =
/// "bf16-true" parameters are stored in bf16 and widened where they are used (the cast's
/// backward returns their gradients in bf16); f32 parameters pass through untouched.
pub fn f32_val<B: Backend, const D: usize>(param: &Param<Tensor<B, D>>) -> Tensor<B, D> {
    widened(param.val())
}

/// `tensor` in f32 (no op when it is).
pub fn widened<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Tensor<B, D> {
    match tensor.dtype() {
        DType::F32 => tensor,
        _ => tensor.cast(FloatDType::F32),
    }
}

/// Every float parameter stored as `dtype` (bf16-true), keeping its id and trainability.
pub fn cast_params<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl<B: Backend> PathMapper<B> for Cast {
        fn map<const D: usize>(&mut self, _: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let (trainable, device) = (tensor.is_require_grad(), tensor.device());
            // Through the host, so the result is a fresh leaf rather than the output of a cast.
            let dtype = DType::from(self.0);
            let value = Tensor::from_data(tensor.into_data().convert_dtype(dtype), (&device, dtype));
            Param::from_mapped_value(id, if trainable { value.require_grad() } else { value }, mapper)
        }
    }
    map_with_paths(module, &mut Cast(dtype))
}

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

/// What a parameter is to the optimizer's weight-decay groups. A model says it of its own
/// parameters (`LanguageModel::param_kinds`), so the optimizer never reads a parameter's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A weight matrix, or any tensor of rank 2 or more that is not an embedding table.
    Matrix,
    /// A 1-D gain: a norm's weight, Mamba's skip `D`.
    Norm,
    /// A linear layer's or a norm's bias.
    Bias,
    /// A table of token, position or token-type embeddings.
    Embedding,
}

/// Each float parameter's kind, by module path.
pub type ParamKinds = BTreeMap<String, ParamKind>;

/// Sees each float parameter together with its module path (`layers.0.attention.q_proj.weight`).
pub trait PathVisitor<B: Backend> {
    fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>);
}

/// Rewrites each float parameter, knowing its module path.
pub trait PathMapper<B: Backend> {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>>;
}

/// Keeps the path during Burn's visit or map and hands each parameter on with it.
struct Tracking<'a, T> {
    path: Vec<String>,
    inner: &'a mut T,
}

impl<T> Tracking<'_, T> {
    /// An enum module's variant (`Enum:LanguageModel`) adds no path level: a Llama's
    /// parameters are named the same whether held alone or as a `LanguageModel`.
    fn enter(&mut self, name: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
    }
    fn exit(&mut self, container: &str) {
        if !container.starts_with("Enum:") {
            self.path.pop();
        }
    }
}

impl<B: Backend, T: PathVisitor<B>> ModuleVisitor<B> for Tracking<'_, T> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, container: &str) {
        self.exit(container);
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.inner.visit(&self.path.join("."), param);
    }
}

impl<B: Backend, T: PathMapper<B>> ModuleMapper<B> for Tracking<'_, T> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, container: &str) {
        self.exit(container);
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        self.inner.map(&self.path.join("."), param)
    }
}

pub fn visit_with_paths<B: Backend, M: Module<B>>(module: &M, visitor: &mut impl PathVisitor<B>) {
    module.visit(&mut Tracking { path: Vec::new(), inner: visitor });
}

pub fn map_with_paths<B: Backend, M: Module<B>>(module: M, mapper: &mut impl PathMapper<B>) -> M {
    module.map(&mut Tracking { path: Vec::new(), inner: mapper })
}

/// Every float parameter of `module`, by path.
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M) -> NamedTensors {
    struct Collect(NamedTensors);
    impl<B: Backend> PathVisitor<B> for Collect {
        fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>) {
            self.0.insert(path.to_string(), HostTensor::from_tensor(param.val()));
        }
    }
    let mut collect = Collect(NamedTensors::new());
    visit_with_paths(module, &mut collect);
    collect.0
}

/// (parameters that train, all parameters), counted in elements.
pub fn trainable_params<B: Backend, M: Module<B>>(module: &M) -> (usize, usize) {
    struct Count(usize, usize);
    impl<B: Backend> PathVisitor<B> for Count {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<B, D>>) {
            let n = param.lazy_shape().num_elements();
            self.1 += n;
            if param.val().is_require_grad() {
                self.0 += n;
            }
        }
    }
    let mut count = Count(0, 0);
    visit_with_paths(module, &mut count);
    (count.0, count.1)
}

/// Parameter paths and shapes, without copying data.
pub fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    struct Shapes(BTreeMap<String, Vec<usize>>);
    impl<B: Backend> PathVisitor<B> for Shapes {
        fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>) {
            self.0.insert(path.to_string(), param.lazy_shape().to_vec());
        }
    }
    let mut shapes = Shapes(BTreeMap::new());
    visit_with_paths(module, &mut shapes);
    shapes.0
}

/// Replace every float parameter of `module` with the tensor of the same path.
/// Fails on a missing path, a shape mismatch, or a tensor that matches no parameter.
pub fn load_named<B: Backend, M: Module<B>>(module: M, tensors: &NamedTensors) -> Result<M, String> {
    struct Load<'a> {
        tensors: &'a NamedTensors,
        used: usize,
        errors: Vec<String>,
    }
    impl<B: Backend> PathMapper<B> for Load<'_> {
        fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let Some(host) = self.tensors.get(path) else {
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
    let mut load = Load { tensors, used: 0, errors: Vec::new() };
    let module = map_with_paths(module, &mut load);
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

/// Element type of tensors written to safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    /// The name transformers uses in `torch_dtype`.
    pub fn torch_name(&self) -> &'static str {
        match self {
            StoreDtype::F32 => "float32",
            StoreDtype::F16 => "float16",
            StoreDtype::BF16 => "bfloat16",
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            _ => 2,
        }
    }
}

/// Serialize named tensors as safetensors bytes in `dtype` (rounded to nearest even).
pub fn to_safetensors_as(tensors: &NamedTensors, dtype: StoreDtype) -> Vec<u8> {
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes: Vec<u8> = match dtype {
                StoreDtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                StoreDtype::F16 => t.data.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
                StoreDtype::BF16 => t.data.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            };
            (name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let st_dtype = match dtype {
        StoreDtype::F32 => safetensors::Dtype::F32,
        StoreDtype::F16 => safetensors::Dtype::F16,
        StoreDtype::BF16 => safetensors::Dtype::BF16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            (name.clone(), safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes).expect("consistent shape"))
        })
        .collect();
    safetensors::serialize(views, None).expect("safetensors serialization")
}

/// Serialize named f32 tensors as safetensors bytes.
pub fn to_safetensors(tensors: &NamedTensors) -> Vec<u8> {
    to_safetensors_as(tensors, StoreDtype::F32)
}

/// Parse safetensors bytes (F32, F16 or BF16 tensors) into named f32 tensors.
pub fn from_safetensors(bytes: &[u8]) -> Result<NamedTensors, String> {
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let mut out = NamedTensors::new();
    for (name, view) in file.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            safetensors::Dtype::BF16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            safetensors::Dtype::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(format!("tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 are read")),
        };
        out.insert(name, HostTensor { shape: view.shape().to_vec(), data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file whose JSON header is `header`, followed by `data` bytes.
    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        bytes
    }

    #[test]
    fn hostile_headers_are_errors_not_allocations() {
        let ok = file(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 8);
        assert_eq!(from_safetensors(&ok).unwrap()["w"].data, vec![0.0, 0.0]);
        let hostile = [
            // A shape whose element count overflows, and one far past the data.
            file(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#, 8),
            file(r#"{"w":{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}}"#, 8),
            // Offsets past the end; a header length past the file.
            file(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8000]}}"#, 8),
            u64::MAX.to_le_bytes().to_vec(),
        ];
        for bytes in hostile {
            assert!(from_safetensors(&bytes).is_err());
        }
    }
}
