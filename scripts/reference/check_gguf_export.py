"""Proof by gguf-py: train a tiny Llama, Mixtral and GPT-2 with furnace, export them to GGUF (f32, f16, q8_0, q4_0)
and to Hugging Face safetensors, then read every GGUF metadata key and tensor back with
gguf-py's GGUFReader and compare them with the model:
- metadata: architecture, sizes, heads, eps, RoPE base and dimension, vocabulary, merges, ids;
- tensors: names and shapes as llama.cpp expects them; f32 bytes equal to the weights (with
  Q and K rows permuted as llama.cpp's converter permutes them), f16 / q8_0 / q4_0 bytes equal
  to `gguf.quants.quantize` of those weights (bit for bit); norms kept in f32;
- Mixtral: expert_count / expert_used_count, the router as ffn_gate_inp (f32) and each layer's
  experts stacked into ffn_gate_exps / ffn_down_exps / ffn_up_exps (experts outermost), as
  llama.cpp's converter writes them;
- GPT-2: the `gpt2` architecture's keys and tensor names, Conv1D weights transposed to
  nn.Linear's layout, biases and the position table kept in f32.

    pip install gguf safetensors numpy
    python scripts/reference/check_gguf_export.py      # FURNACE=path/to/furnace to pick a binary
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import quantize
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
FURNACE = os.environ.get("FURNACE", str(ROOT / "target" / "release" / "furnace"))

RECIPE = """
[run]
name = "gguf-check"
seed = 5
[model]
{extra}
flavor = "tiny"
max_seq_len = 64
[data]
source = "stories"
num_examples = 400
num_val_examples = 20
tokenizer_vocab_size = 320
[training]
local_batch_size = 4
seq_len = 32
steps = 5
eval_every = 0
save_every = 0
[logging]
progress = false
peak_tflops = 1.0
"""

NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
GPT2_NAMES = {
    "transformer.wte.weight": "token_embd.weight",
    "transformer.wpe.weight": "position_embd.weight",
    "transformer.ln_f.weight": "output_norm.weight",
    "transformer.ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
    "ln_1.weight": "attn_norm.weight",
    "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight",
    "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight",
    "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight",
    "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight",
    "mlp.c_proj.bias": "ffn_down.bias",
}
EXPERT_PARTS = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}
QUANTS = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def furnace(*args: str) -> None:
    out = subprocess.run([FURNACE, *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"furnace {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")


def gguf_name(hf: str, gpt2: bool = False) -> str:
    names = GPT2_NAMES if gpt2 else NAMES
    if hf in names:
        return names[hf]
    layer, rest = hf.removeprefix("model.layers.").removeprefix("transformer.h.").split(".", 1)
    return f"blk.{layer}.{names[rest]}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader: GGUFReader, key: str):
    f = reader.fields[key]
    if f.types and f.types[0].name == "STRING" and len(f.types) == 1:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0].name == "ARRAY":
        return [bytes(f.parts[i]).decode() if f.types[1].name == "STRING" else int(f.parts[i][0]) for i in f.data]
    return f.parts[f.data[0]][0].item()


def stack_experts(hf: dict, config: dict) -> dict:
    """The per-expert HF tensors replaced by one [E, rows, cols] tensor per layer and matrix."""
    n_experts = config.get("num_local_experts", 0)
    out = {k: v for k, v in hf.items() if ".experts." not in k}
    for layer in range(config["num_hidden_layers"] if n_experts else 0):
        for part, name in EXPERT_PARTS.items():
            prefix = f"model.layers.{layer}.block_sparse_moe.experts"
            out[f"blk.{layer}.{name}.weight"] = np.stack([hf[f"{prefix}.{e}.{part}.weight"] for e in range(n_experts)])
    return out


def check(work: pathlib.Path, quant: str, hf: dict, config: dict, tokenizer: dict) -> list[str]:
    arch = config["model_type"]
    path = work / f"model-{arch}-{quant}.gguf"
    furnace("export", "--checkpoint", str(work / "run"), "--format", "gguf", "--quant", quant, "--out", str(path))
    reader = GGUFReader(path)
    problems = []
    if arch == "gpt2":
        return problems + check_gpt2(reader, quant, hf, config)
    expect = {
        "general.architecture": "llama",
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.context_length": config["max_position_embeddings"],
        "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.eos_token_id": config["eos_token_id"],
        "tokenizer.ggml.bos_token_id": config["bos_token_id"],
    }
    if arch == "mixtral":
        expect["llama.expert_count"] = config["num_local_experts"]
        expect["llama.expert_used_count"] = config["num_experts_per_tok"]
    for key, want in expect.items():
        if field(reader, key) != want:
            problems.append(f"{quant}: {key} = {field(reader, key)!r}, expected {want!r}")
    for key, want in [("llama.attention.layer_norm_rms_epsilon", config["rms_norm_eps"]), ("llama.rope.freq_base", config["rope_theta"])]:
        if abs(field(reader, key) - want) > 1e-6 * abs(want):
            problems.append(f"{quant}: {key} = {field(reader, key)}, expected {want}")
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = field(reader, "tokenizer.ggml.tokens")
    if [t for t, _ in vocab] != tokens[: len(vocab)]:
        problems.append(f"{quant}: tokenizer.ggml.tokens differ from tokenizer.json")
    merges = [" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]]
    if field(reader, "tokenizer.ggml.merges") != merges:
        problems.append(f"{quant}: tokenizer.ggml.merges differ from tokenizer.json")
    tensors = {t.name: t for t in reader.tensors}
    if len(tensors) != len(stack_experts(hf, config)):
        problems.append(f"{quant}: {len(tensors)} tensors, the model has {len(stack_experts(hf, config))}")
    for hf_name, weight in stack_experts(hf, config).items():
        name = hf_name if hf_name.startswith("blk.") else gguf_name(hf_name)
        t = tensors.get(name)
        if t is None:
            problems.append(f"{quant}: missing {name}")
            continue
        if name.endswith("attn_q.weight"):
            weight = permute(weight, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            weight = permute(weight, config["num_key_value_heads"])
        if list(t.shape) != list(reversed(weight.shape)):
            problems.append(f"{quant}: {name} has ggml shape {list(t.shape)}, expected {list(reversed(weight.shape))}")
        router = name.endswith("ffn_gate_inp.weight")
        qtype = QUANTS[quant] if weight.ndim >= 2 and weight.shape[-1] % 32 == 0 and not router else GGMLQuantizationType.F32
        if t.tensor_type != qtype:
            problems.append(f"{quant}: {name} is {t.tensor_type.name}, expected {qtype.name}")
            continue
        want = quantize(weight.astype(np.float32), qtype)
        if np.asarray(t.data).tobytes() != np.asarray(want).tobytes():
            problems.append(f"{quant}: {name} bytes differ from gguf.quants.quantize")
    print(f"{arch:7} {quant:5} {len(reader.fields)} metadata keys, {len(tensors)} tensors: {'ok' if not problems else 'MISMATCH'}")
    return problems


def check_gpt2(reader: GGUFReader, quant: str, hf: dict, config: dict) -> list[str]:
    problems = []
    expect = {
        "general.architecture": "gpt2",
        "gpt2.embedding_length": config["n_embd"],
        "gpt2.block_count": config["n_layer"],
        "gpt2.feed_forward_length": config["n_inner"],
        "gpt2.attention.head_count": config["n_head"],
        "gpt2.context_length": config["n_positions"],
    }
    for key, want in expect.items():
        if field(reader, key) != want:
            problems.append(f"{quant}: {key} = {field(reader, key)!r}, expected {want!r}")
    if abs(field(reader, "gpt2.attention.layer_norm_epsilon") - config["layer_norm_epsilon"]) > 1e-9:
        problems.append(f"{quant}: gpt2.attention.layer_norm_epsilon differs")
    tensors = {t.name: t for t in reader.tensors}
    if len(tensors) != len(hf):
        problems.append(f"{quant}: {len(tensors)} tensors, the model has {len(hf)}")
    for hf_name, weight in hf.items():
        name = gguf_name(hf_name, gpt2=True)
        t = tensors.get(name)
        if t is None:
            problems.append(f"{quant}: missing {name}")
            continue
        if name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")):
            weight = weight.T  # Conv1D [in, out] -> nn.Linear [out, in]
        if list(t.shape) != list(reversed(weight.shape)):
            problems.append(f"{quant}: {name} has ggml shape {list(t.shape)}, expected {list(reversed(weight.shape))}")
        quantized = weight.ndim == 2 and weight.shape[-1] % 32 == 0 and name != "position_embd.weight"
        qtype = QUANTS[quant] if quantized else GGMLQuantizationType.F32
        if t.tensor_type != qtype:
            problems.append(f"{quant}: {name} is {t.tensor_type.name}, expected {qtype.name}")
            continue
        want = quantize(np.ascontiguousarray(weight).astype(np.float32), qtype)
        if np.asarray(t.data).tobytes() != np.asarray(want).tobytes():
            problems.append(f"{quant}: {name} bytes differ from gguf.quants.quantize")
    print(f"gpt2    {quant:5} {len(reader.fields)} metadata keys, {len(tensors)} tensors: {'ok' if not problems else 'MISMATCH'}")
    return problems


def main() -> None:
    problems = []
    for arch, extra in [("llama", "n_kv_heads = 2"), ("mixtral", 'arch = "mixtral"\nn_experts = 4\nn_kv_heads = 2'), ("gpt2", 'arch = "gpt2"')]:
        with tempfile.TemporaryDirectory() as tmp:
            work = pathlib.Path(tmp)
            (work / "recipe.toml").write_text(RECIPE.format(extra=extra))
            furnace("train", "--config", str(work / "recipe.toml"), "--set", f"run.output_dir={work / 'run'}")
            furnace("export", "--checkpoint", str(work / "run"), "--format", "safetensors", "--out", str(work / "hf"))
            hf = load_file(str(work / "hf" / "model.safetensors"))
            config = json.loads((work / "hf" / "config.json").read_text())
            tokenizer = json.loads((work / "hf" / "tokenizer.json").read_text())
            assert config["model_type"] == arch, config["model_type"]
            for quant in QUANTS:
                problems += check(work, quant, hf, config, tokenizer)
    for p in problems:
        print("  " + p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
