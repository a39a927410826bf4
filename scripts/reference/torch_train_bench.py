"""PyTorch CPU reference for scripts/bench_train.sh: the same model and training step as Furnace
runs (AdamW, global-norm clipping at 1.0, fp32), timed on random tokens, written as a PyTorch
user writes it: `F.scaled_dot_product_attention(is_causal=True)` and `torch.optim.AdamW`
(foreach; `--fused-adamw` for its fused kernel), flush-denormal on, optionally `torch.compile`.
`--arch gpt2`: pre-LN blocks, tanh-GELU MLP, learned positions, tied embeddings. `--arch llama`:
RMSNorm, rotary positions (Hugging Face's rotate_half layout), SwiGLU MLP of width 8·d/3
rounded up to a multiple of 32, no biases, an untied head (Furnace's llama defaults).

    python scripts/reference/torch_train_bench.py --layers 4 --d-model 256 --heads 4 \
        --seq-len 256 --batch 8 --vocab 4096 --steps 8 --threads 2 [--arch llama] [--compile]

`--attention plain` computes attention as matmul + mask + softmax instead of SDPA.
`--device cuda --bf16` runs the step on a GPU under bf16 autocast (scripts/gpu_check.sh).

Prints `tokens_per_sec <median over the timed steps>`; with `--compile`, `compile_seconds
<the first step's time, compilation included>` (the timed steps follow the warm-up); on a GPU
`peak_memory_mb <peak allocated>`.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PLAIN_ATTENTION = False


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over `[batch, heads, seq, head_dim]`."""
    if not PLAIN_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[2]
    mask = torch.full((t, t), float("-inf"), device=q.device).triu(1)
    return ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) + mask).softmax(dim=-1) @ v


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.RMSNorm(d, eps=1e-6)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.post_attention_layernorm = nn.RMSNorm(d, eps=1e-6)
        hidden = (8 * d // 3 + 31) // 32 * 32
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.input_layernorm(x)
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(y)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaBlock(d, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        head_dim = d // heads
        self.register_buffer("inv_freq", 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        angles = torch.outer(torch.arange(t, device=idx.device).float(), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in [("layers", 4), ("d-model", 256), ("heads", 4), ("seq-len", 256), ("batch", 8), ("vocab", 4096), ("steps", 8), ("threads", 2), ("warmup", 2)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (f32 master weights), as Furnace's bf16-mixed")
    p.add_argument("--attention", choices=["sdpa", "plain"], default="sdpa")
    p.add_argument("--fused-adamw", action="store_true", help="torch.optim.AdamW(fused=True) instead of foreach")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    a = p.parse_args()
    global PLAIN_ATTENTION
    PLAIN_ATTENTION = a.attention == "plain"
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    # Without this, once the large-vocabulary softmax produces subnormal probabilities the
    # backward pass slows down 10-20x on x86 (measured: 1 s -> 25 s per step by step 8).
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    if a.arch == "llama":
        model = Llama(a.vocab, a.d_model, a.layers, a.heads)
    else:
        model = GPT(a.vocab, a.d_model, a.layers, a.heads, max(a.seq_len, 1024))
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, **({"fused": True} if a.fused_adamw else {}))
    forward = torch.compile(model) if a.compile else model
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(a.warmup + a.steps):
        idx = torch.randint(0, a.vocab, (a.batch, a.seq_len + 1), device=device)
        synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
            logits = forward(idx[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, a.vocab), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()
        if step == 0 and a.compile:
            compile_seconds = time.perf_counter() - start
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
    print(f"tokens_per_sec {a.batch * a.seq_len / statistics.median(times):.1f}")
    if a.compile:
        print(f"compile_seconds {compile_seconds:.1f}")
    if device.type == "cuda":
        print(f"peak_memory_mb {torch.cuda.max_memory_allocated() / 2**20:.0f}")


if __name__ == "__main__":
    main()
