"""NF4 + double quantization by bitsandbytes itself (its CPU backend, bitsandbytes >= 0.46), on
inputs chosen to exercise the edges: a zero block, negative maxima, a short last block, values
at ±absmax. Writes tests/fixtures/nf4.safetensors, which models/src/nf4.rs tests against
bit for bit.

The paths followed (bitsandbytes 0.50): `functional.quantize_4bit(A, blocksize=64,
quant_type="nf4", compress_statistics=True)` → the default torch kernel
`backends/default/ops.py::quantize_4bit` (absmax per block, scale by the f32 reciprocal, clamp,
`torch.bucketize` against the midpoints of the NF4 code, high nibble first), then
`offset = absmax.mean()` and `quantize_blockwise(absmax - offset, blocksize=256)` with the
"dynamic" 8-bit map. For that 8-bit step the fixture takes bitsandbytes' generic kernel
(`backends/cpu/ops.py::quantize_blockwise`, the branch for non-f32 input: scale by the f32
reciprocal of the block absmax, clamp, `argmin |scaled − code|`, i.e. the nearest entry, ties to
the lower one). Its f32 fast path, the C++ `quantize_cpu` (csrc/cpu_ops.cpp, common.cpp), uses a
bucketed search (BinSearch "Direct2") that is not exact where the map is dense: on uniform and
log-uniform inputs it lands 1-4 entries from the nearest for about 17% of values
(`--native-sweep` measures it), so no nearest-entry quantizer can match it bit for bit.

    pip install bitsandbytes torch safetensors numpy
    python scripts/reference/make_nf4_fixtures.py
"""

import pathlib

import numpy as np
import torch
import bitsandbytes.functional as F
from safetensors.numpy import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main() -> None:
    rng = np.random.default_rng(20231)
    weights = (rng.standard_normal((80, 251)) * 0.02).astype(np.float32)
    flat = weights.reshape(-1)
    flat[64:128] = 0.0                      # an all-zero block
    flat[128:192] = -np.abs(flat[128:192])  # a block whose maximum magnitude is negative
    flat[200] = 0.5                         # an outlier that dominates its block
    flat[300:364] = np.linspace(-1, 1, 64, dtype=np.float32)  # exact ±absmax and zero
    # 80·251 = 20080 values: 313 full blocks of 64 and one of 48; 314 absmax values → 2 blocks of 256.
    A = torch.from_numpy(weights.copy())
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, plain = F.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=False)
    # The generic (nearest-entry) kernel for the 8-bit step, on the same centred maxima.
    centred = (plain.absmax - state.offset).double()
    codes, scales = torch.ops.bitsandbytes.quantize_blockwise.default(centred, state.state2.code, 256)
    assert torch.equal(scales, state.state2.absmax)
    state.absmax = codes
    dequantized = F.dequantize_4bit(packed, state)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    f32 = lambda t: t.detach().cpu().to(torch.float32).numpy().reshape(-1)
    tensors = {
        "input": weights.reshape(-1),
        "packed": f32(packed.view(torch.uint8)),
        "absmax": f32(plain.absmax),
        "nf4_code": f32(state.code),
        "dq_codes": f32(state.absmax),
        "dq_scales": f32(state.state2.absmax),
        "dq_offset": f32(torch.as_tensor(state.offset).reshape(1)),
        "dq_map": f32(state.state2.code),
        "absmax_dequantized": f32(absmax),
        "dequantized": f32(dequantized),
    }
    out = ROOT / "tests" / "fixtures" / "nf4.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out))
    print(f"wrote {out}: {len(flat)} values, {len(tensors['absmax'])} NF4 blocks, {len(tensors['dq_scales'])} absmax blocks")


def native_sweep() -> None:
    """How far bitsandbytes' C++ CPU 8-bit quantizer lands from the nearest map entry."""
    rng = np.random.default_rng(0)
    values = rng.uniform(-1, 1, size=(4000, 256)).astype(np.float32)
    values[:2000, 1:] = (np.sign(values[:2000, 1:]) * 10 ** rng.uniform(-7, 0, size=(2000, 255))).astype(np.float32)
    values[:, 0] = 1.0  # absmax 1: the scaled value is the value
    code = F.create_dynamic_map()
    native, _ = torch.ops.bitsandbytes.quantize_blockwise.default(torch.from_numpy(values.reshape(-1)), code.clone(), 256)
    generic, _ = torch.ops.bitsandbytes.quantize_blockwise.default(torch.from_numpy(values.reshape(-1)).double(), code.clone(), 256)
    off = (native.int() - generic.int()).abs()
    print(f"native vs nearest: {(off > 0).float().mean().item():.1%} of values differ, by up to {off.max().item()} entries")


if __name__ == "__main__":
    import sys

    native_sweep() if "--native-sweep" in sys.argv else main()
