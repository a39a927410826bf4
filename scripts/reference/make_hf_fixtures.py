"""Build tiny random Hugging Face models and record what they compute, as test fixtures.

    pip install torch transformers safetensors
    python scripts/reference/make_hf_fixtures.py

For each of LlamaForCausalLM (with GQA), GPT2LMHeadModel, MambaForCausalLM (its
sequential "slow path": no mamba-ssm kernels on CPU), MixtralForCausalLM, BertForMaskedLM and T5ForConditionalGeneration (ReLU and gated-GELU)
this writes, under
tests/fixtures/<name>/: model.safetensors and config.json (as save_pretrained writes them),
plus tokens.json (a fixed batch) and logits.safetensors (the reference logits, float32); for BERT,
grads.safetensors holds every parameter's gradient of the masked-LM loss on a masked batch.
The Rust test `models/tests/hf_fidelity.rs` loads the weights through our Hugging Face
name table and must reproduce the logits to 1e-4. For Mixtral, losses.json also holds
transformers' load-balancing loss (`aux_loss`) and the router z-loss of ST-MoE computed from
transformers' router logits, which the Rust test matches to 1e-5.
"""

import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

ROOT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def tokens(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 11), generator=g)


def randomize_vectors(model: torch.nn.Module) -> None:
    """Random norm weights and biases too, so a mapping that drops them cannot pass."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "weight" in pname else 0.1 * torch.randn(p.shape, generator=g))


def write(name: str, model: torch.nn.Module, vocab: int) -> None:
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    randomize_vectors(model)
    model.save_pretrained(out, safe_serialization=True)
    batch = tokens(vocab)
    with torch.no_grad():
        logits = model(batch).logits.float().contiguous()
    save_file({"logits": logits}, str(out / "logits.safetensors"))
    (out / "tokens.json").write_text(json.dumps(batch.tolist()))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params, logits {tuple(logits.shape)}")


def main() -> None:
    torch.manual_seed(0)
    llama = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
    )
    llama._attn_implementation = "eager"
    write("tiny_llama", LlamaForCausalLM(llama), llama.vocab_size)

    gpt2 = GPT2Config(
        vocab_size=101,
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        torch_dtype="float32",
    )
    gpt2._attn_implementation = "eager"
    write("tiny_gpt2", GPT2LMHeadModel(gpt2), gpt2.vocab_size)

    mamba = MambaConfig(
        vocab_size=89,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        time_step_rank="auto",
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = MambaForCausalLM(mamba)
    # A_log away from its initial log(1..N), so a mapping that ignores it cannot pass.
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.A_log.add_(0.3 * torch.randn(layer.mixer.A_log.shape))
    write("tiny_mamba", model, mamba.vocab_size)

    mixtral = MixtralConfig(
        vocab_size=83,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        router_jitter_noise=0.0,
        torch_dtype="float32",
    )
    mixtral._attn_implementation = "eager"
    model = MixtralForCausalLM(mixtral)
    # Decisive routers: at init the router logits are nearly tied, and a float's difference in
    # them could pick another expert than transformers does.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(10.0)
    write("tiny_mixtral", model, mixtral.vocab_size)
    with torch.no_grad():
        out = model(tokens(mixtral.vocab_size), output_router_logits=True)
    margins = []
    for logits in out.router_logits:
        top = logits.float().topk(3, -1).values
        margins.append((top[:, 1] - top[:, 2]).min().item())
    assert min(margins) > 1e-3, f"near-tied routing ({margins}): pick another seed"
    router = torch.cat(out.router_logits, 0).float()
    losses = {
        "aux_loss": out.aux_loss.item(),
        "z_loss": torch.logsumexp(router, -1).pow(2).mean().item(),
    }
    (ROOT / "tiny_mixtral" / "losses.json").write_text(json.dumps(losses))
    print(f"tiny_mixtral losses {losses}, smallest routing margin {min(margins):.4f}")

    torch.manual_seed(0)
    bert = BertConfig(
        vocab_size=79,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=1e-12,
        # No padding row: transformers would hold its embedding's gradient at zero.
        pad_token_id=None,
        torch_dtype="float32",
    )
    bert._attn_implementation = "eager"
    model = BertForMaskedLM(bert)
    # GELU inputs of order 1 and MLP outputs that dominate the residual, so that the exact GELU
    # and its tanh approximation give clearly different logits: at init any GELU would pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("intermediate.dense.weight", "output.dense.weight", "transform.dense.weight")):
                p.mul_(20.0)
    write("tiny_bert", model, bert.vocab_size)
    # Gradients of the masked-LM loss (mean over every third position) with respect to every
    # parameter, for the training path.
    batch = tokens(bert.vocab_size)
    labels = torch.full_like(batch, -100)
    labels[:, ::3] = batch[:, ::3]
    inputs = batch.clone()
    inputs[:, ::3] = 1
    model.zero_grad()
    model(inputs, labels=labels).loss.backward()
    grads = {name: p.grad.float().contiguous() for name, p in model.named_parameters()}
    grads["inputs"] = inputs.float()
    grads["labels"] = labels.float()
    save_file(grads, str(ROOT / "tiny_bert" / "grads.safetensors"))

    for name, proj in [("tiny_t5", "relu"), ("tiny_t5_gated", "gated-gelu")]:
        write_t5(name, proj)


def write_t5(name: str, feed_forward_proj: str) -> None:
    """A tiny T5 (d_kv other than d_model / heads, more decoder than encoder blocks, few
    buckets so that the logarithmic ones are used): logits of a decoder batch over an input
    batch with one row padded, and every parameter's gradient of the loss on labels."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=71,
        d_model=32,
        d_kv=12,
        d_ff=64,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=3,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj=feed_forward_proj,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    out = ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    randomize_vectors(model)
    model.save_pretrained(out, safe_serialization=True)
    g = torch.Generator().manual_seed(2)
    inputs = torch.randint(1, config.vocab_size, (2, 13), generator=g)
    labels = torch.randint(1, config.vocab_size, (2, 7), generator=g)
    decoder_inputs = model._shift_right(labels)
    # The second input is 9 tokens, padded to 13: nothing may attend to its padding.
    lengths = torch.tensor([13, 9])
    mask = (torch.arange(13)[None, :] < lengths[:, None]).long()
    inputs[1, 9:] = 0
    with torch.no_grad():
        logits = model(input_ids=inputs, attention_mask=mask, decoder_input_ids=decoder_inputs).logits.float().contiguous()
    model.zero_grad()
    model(input_ids=inputs, attention_mask=mask, decoder_input_ids=decoder_inputs, labels=labels).loss.backward()
    grads = {n: p.grad.float().contiguous() for n, p in model.named_parameters()}
    save_file({"logits": logits, "inputs": inputs.float(), "input_lengths": lengths.float(),
               "decoder_inputs": decoder_inputs.float(), "labels": labels.float()},
              str(out / "logits.safetensors"))
    save_file(grads, str(out / "grads.safetensors"))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} params, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
