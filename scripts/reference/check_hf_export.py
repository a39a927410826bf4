"""Proof by transformers: train tiny Llama, GPT-2, Mamba and Mixtral models with furnace, export them with
`furnace export --format safetensors`, load the folders with transformers on CPU, and compare
logits (1e-4 relative, f32) and greedy continuations (identical tokens) with `furnace generate`.

    pip install torch transformers safetensors
    cargo build --release -p furnace-trainer
    python scripts/reference/check_hf_export.py
"""

import pathlib
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from furnace_cli import PROMPT, TINY_RECIPE, run

def check(arch: str, extra: str, work: pathlib.Path) -> bool:
    recipe = work / f"{arch}.toml"
    recipe.write_text(TINY_RECIPE.format(arch=arch, extra=extra))
    run_dir, hf_dir, logits_file = work / f"run_{arch}", work / f"hf_{arch}", work / f"logits_{arch}.safetensors"
    run("train", "--config", str(recipe), "--set", f"run.output_dir={run_dir}")
    run("export", "--checkpoint", str(run_dir), "--format", "safetensors", "--out", str(hf_dir))
    ours_text = run("generate", "--checkpoint", str(run_dir), "--prompt", PROMPT, "--temperature", "0",
                    "--max-new-tokens", "24", "--logits-out", str(logits_file)).rstrip("\n")
    ours = load_file(str(logits_file))
    ids = ours["input_ids"].long().unsqueeze(0)

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    expected_ids = [tokenizer.eos_token_id] + tokenizer.encode(PROMPT, add_special_tokens=False)
    assert ids[0].tolist() == expected_ids, f"tokenization differs: {ids[0].tolist()} vs {expected_ids}"
    with torch.no_grad():
        theirs = model(ids).logits[0]
        generated = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.eos_token_id)
    scale = theirs.abs().max().item()
    err = ((theirs - ours["logits"]).abs().max() / scale).item()
    hf_text = PROMPT + tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    same = hf_text == ours_text
    print(f"{arch:6} {type(model).__name__:18} max |Δlogit|/max|logit| = {err:.2e}  greedy continuation identical: {same}")
    if not same:
        print(f"  furnace:      {ours_text!r}\n  transformers: {hf_text!r}")
    return err < 1e-4 and same


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        ok = check("llama", "n_kv_heads = 2", work)
        ok &= check("gpt2", "", work)
        ok &= check("mamba", "d_state = 8", work)
        ok &= check("mixtral", "n_kv_heads = 2\nn_experts = 4", work)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
