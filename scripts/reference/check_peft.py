"""Proof by PEFT: train tiny Llama and GPT-2 base models with furnace, fine-tune each with LoRA
adapters (rsLoRA and plain scaling, Llama's GQA, GPT-2's fused c_attn), export the base with
`furnace export --format safetensors` and the adapters with `--format peft`, load them with
`peft.PeftModel.from_pretrained(transformers model, adapter folder)` on CPU, and compare the
logits with `furnace generate` on the LoRA checkpoint (1e-4 relative, f32). The adapters'
merge (`merge_and_unload`) must match our `--merge-lora` export as well. The other way round,
adapters made and saved by PEFT itself (`get_peft_model` + `save_pretrained`) on the exported
Llama base must give PEFT's logits in `furnace generate --adapter`.

    pip install torch transformers peft safetensors
    cargo build --release -p furnace-trainer
    python scripts/reference/check_peft.py
"""

import pathlib
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from furnace_cli import PROMPT, TINY_RECIPE, run

LORA = """
[run]
seed = 11
[model]
init_from = "{base}"
[data]
source = "arithmetic"
num_examples = 2000
num_val_examples = 50
[training]
local_batch_size = 8
seq_len = 32
steps = 30
eval_every = 0
log_every = 10
save_every = 0
[optimizer]
lr = 1e-2
[lr_scheduler]
warmup_steps = 5
[lora]
r = {r}
alpha = {alpha}
use_rslora = {rslora}
target_modules = {targets}
[logging]
progress = false
peak_tflops = 1.0
[eval]
arithmetic_problems = 4
max_new_tokens = 4
"""


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def check(name: str, arch: str, extra: str, lora: dict, work: pathlib.Path) -> bool:
    base_run, lora_run = work / f"base_{name}", work / f"lora_{name}"
    (work / f"base_{name}.toml").write_text(TINY_RECIPE.format(arch=arch, extra=extra))
    (work / f"lora_{name}.toml").write_text(LORA.format(base=base_run, **lora))
    run("train", "--config", str(work / f"base_{name}.toml"), "--set", f"run.output_dir={base_run}",
        "--set", "training.steps=40", "--set", "eval.max_new_tokens=4")
    run("train", "--config", str(work / f"lora_{name}.toml"), "--set", f"run.output_dir={lora_run}")
    base_hf, peft_dir, merged_hf = work / f"hf_{name}", work / f"peft_{name}", work / f"merged_{name}"
    run("export", "--checkpoint", str(base_run), "--out", str(base_hf))
    run("export", "--checkpoint", str(lora_run), "--format", "peft", "--out", str(peft_dir))
    run("export", "--checkpoint", str(lora_run), "--merge-lora", "--out", str(merged_hf))
    logits_file = work / f"logits_{name}.safetensors"
    run("generate", "--checkpoint", str(lora_run), "--prompt", PROMPT, "--max-new-tokens", "1",
        "--logits-out", str(logits_file))
    ours = load_file(str(logits_file))
    ids = ours["input_ids"].long().unsqueeze(0)

    base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, peft_dir)
    model.eval()
    with torch.no_grad():
        theirs = model(ids).logits[0]
        without = model.get_base_model()
        with model.disable_adapter():
            base_logits = without(ids).logits[0]
        peft_merged = model.merge_and_unload()
        merged_logits = peft_merged(ids).logits[0]
    ours_merged = AutoModelForCausalLM.from_pretrained(merged_hf, dtype=torch.float32)
    with torch.no_grad():
        ours_merged_logits = ours_merged(ids).logits[0]
    err = max_rel(theirs, ours["logits"])
    moved = max_rel(theirs, base_logits)
    merge_err = max_rel(merged_logits, ours_merged_logits)
    ok = err < 1e-4 and merge_err < 1e-4 and moved > 1e-3
    print(f"{name:14} PEFT vs furnace max |Δlogit|/max|logit| = {err:.2e} | PEFT merge vs --merge-lora = {merge_err:.2e} "
          f"| adapters move logits by {moved:.2e} | {'ok' if ok else 'FAIL'}")
    return ok


def check_peft_made(work: pathlib.Path) -> bool:
    """Adapters PEFT creates and saves, read by furnace over the same base."""
    base_hf = work / "hf_llama-gqa"
    base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj", "gate_proj"],
                        use_rslora=True, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter_dir = work / "peft_made"
    model.save_pretrained(adapter_dir)
    logits_file = work / "logits_peft_made.safetensors"
    run("generate", "--checkpoint", str(base_hf), "--adapter", str(adapter_dir), "--prompt", PROMPT,
        "--max-new-tokens", "1", "--logits-out", str(logits_file))
    ours = load_file(str(logits_file))
    model.eval()
    with torch.no_grad():
        theirs = model(ours["input_ids"].long().unsqueeze(0)).logits[0]
    err = max_rel(theirs, ours["logits"])
    print(f"{'peft-made':14} furnace --adapter vs PEFT max |Δlogit|/max|logit| = {err:.2e} | {'ok' if err < 1e-4 else 'FAIL'}")
    return err < 1e-4


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        ok = check("llama-gqa", "llama", "n_kv_heads = 2",
                   dict(r=4, alpha=8, rslora="false", targets='["all-linear", "lm_head"]'), work)
        ok &= check("llama-rslora", "llama", "",
                    dict(r=8, alpha=4, rslora="true", targets='["q_proj", "v_proj", "up_proj"]'), work)
        ok &= check("gpt2-c_attn", "gpt2", "",
                    dict(r=4, alpha=16, rslora="false", targets='["c_attn", "c_proj", "c_fc"]'), work)
        ok &= check("gpt2-q-only", "gpt2", "",
                    dict(r=2, alpha=4, rslora="true", targets='["q_proj", "mlp.c_proj"]'), work)
        ok &= check_peft_made(work)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
