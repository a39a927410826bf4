"""Proof by transformers: train tiny Llama, GPT-2, Mamba and Mixtral models with furnace, export them with
`furnace export --format safetensors`, load the folders with transformers on CPU, and compare
logits (1e-4 relative, f32) and greedy continuations (identical tokens) with `furnace generate`.
A tiny BERT goes the same way through AutoModelForMaskedLM: logits on a prompt with [MASK],
and transformers' fill-mask pipeline must pick the tokens `furnace generate` picks. A tiny T5
(span corruption) through AutoModelForSeq2SeqLM: the decoder's logits over its reply to a
prompt with a sentinel, and transformers' greedy generate must write the same tokens.

    pip install torch transformers safetensors
    cargo build --release -p furnace-trainer
    python scripts/reference/check_hf_export.py
"""

import pathlib
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

from furnace_cli import PROMPT, TINY_RECIPE, run

MASKED_PROMPT = "Once upon a time, there was a little fox named Tim. [MASK] lived near the [MASK]."
SPAN_PROMPT = "Once upon a time, there was a little fox named Tim. <extra_id_0> lived near the <extra_id_1>."

def train_and_export(arch: str, extra: str, work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    recipe = work / f"{arch}.toml"
    recipe.write_text(TINY_RECIPE.format(arch=arch, extra=extra))
    run_dir, hf_dir = work / f"run_{arch}", work / f"hf_{arch}"
    run("train", "--config", str(recipe), "--set", f"run.output_dir={run_dir}")
    run("export", "--checkpoint", str(run_dir), "--format", "safetensors", "--out", str(hf_dir))
    return run_dir, hf_dir


def logit_error(model, tokenizer, prompt: str, ours: dict) -> float:
    """Largest |Δlogit| relative to the largest logit, on the ids `furnace generate --logits-out`
    wrote, after checking that transformers tokenizes the prompt to the same ids."""
    ids = ours["input_ids"].long().unsqueeze(0)
    expected_ids = [tokenizer.eos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0].tolist() == expected_ids, f"tokenization differs: {ids[0].tolist()} vs {expected_ids}"
    with torch.no_grad():
        theirs = model(ids).logits[0]
    return ((theirs - ours["logits"]).abs().max() / theirs.abs().max()).item()


def check(arch: str, extra: str, work: pathlib.Path) -> bool:
    run_dir, hf_dir = train_and_export(arch, extra, work)
    logits_file = work / f"logits_{arch}.safetensors"
    ours_text = run("generate", "--checkpoint", str(run_dir), "--prompt", PROMPT, "--temperature", "0",
                    "--max-new-tokens", "24", "--logits-out", str(logits_file)).rstrip("\n")
    ours = load_file(str(logits_file))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    err = logit_error(model, tokenizer, PROMPT, ours)
    with torch.no_grad():
        ids = ours["input_ids"].long().unsqueeze(0)
        generated = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.eos_token_id)
    hf_text = PROMPT + tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    same = hf_text == ours_text
    print(f"{arch:6} {type(model).__name__:18} max |Δlogit|/max|logit| = {err:.2e}  greedy continuation identical: {same}")
    if not same:
        print(f"  furnace:      {ours_text!r}\n  transformers: {hf_text!r}")
    return err < 1e-4 and same


def check_bert(work: pathlib.Path) -> bool:
    run_dir, hf_dir = train_and_export("bert", "", work)
    logits_file = work / "logits_bert.safetensors"
    filled = run("generate", "--checkpoint", str(run_dir), "--prompt", MASKED_PROMPT, "--logits-out", str(logits_file))
    # "  [MASK] 1: " Tim" 0.912, ..." → the first candidate of each mask.
    our_picks = [line.split(": ", 1)[1].split('" ')[0].lstrip('"') for line in filled.splitlines() if line.startswith("  [MASK]")]
    model = AutoModelForMaskedLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    err = logit_error(model, tokenizer, MASKED_PROMPT, load_file(str(logits_file)))
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer, top_k=1)
    hf_picks = [answer[0]["token_str"] for answer in fill(tokenizer.eos_token + MASKED_PROMPT)]
    same = [p.strip() for p in hf_picks] == [p.strip() for p in our_picks]
    print(f"bert   {type(model).__name__:18} max |Δlogit|/max|logit| = {err:.2e}  fill-mask picks identical: {same} {our_picks}")
    if not same:
        print(f"  furnace:      {our_picks}\n  transformers: {hf_picks}")
    return err < 1e-4 and same


def check_t5(work: pathlib.Path, extra: str, label: str) -> bool:
    """T5 (tied head, ReLU) or T5 v1.1 (its own head, gated GELU), trained by span corruption."""
    sub = work / label
    sub.mkdir()
    run_dir, hf_dir = train_and_export("t5", extra, sub)
    logits_file = sub / "logits_t5.safetensors"
    ours_text = run("generate", "--checkpoint", str(run_dir), "--prompt", SPAN_PROMPT, "--temperature", "0",
                    "--max-new-tokens", "12", "--logits-out", str(logits_file)).strip()
    ours = load_file(str(logits_file))
    model = AutoModelForSeq2SeqLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    input_ids = ours["input_ids"].long().unsqueeze(0)
    decoder_ids = ours["decoder_input_ids"].long().unsqueeze(0)
    expected_ids = tokenizer.encode(SPAN_PROMPT, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert input_ids[0].tolist() == expected_ids, f"tokenization differs: {input_ids[0].tolist()} vs {expected_ids}"
    with torch.no_grad():
        theirs = model(input_ids=input_ids, decoder_input_ids=decoder_ids).logits[0]
        generated = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    err = ((theirs - ours["logits"]).abs().max() / theirs.abs().max()).item()
    # Both start from the decoder start token; furnace's reply may end at end-of-text as theirs does.
    same = generated[0].tolist() == decoder_ids[0].tolist()
    print(f"{label:6} {type(model).__name__:18} max |Δlogit|/max|logit| = {err:.2e}  greedy reply identical: {same} {ours_text!r}")
    if not same:
        print(f"  furnace:      {decoder_ids[0].tolist()}\n  transformers: {generated[0].tolist()}")
    return err < 1e-4 and same


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        ok = check("llama", "n_kv_heads = 2", work)
        ok &= check("gpt2", "", work)
        ok &= check("mamba", "d_state = 8", work)
        ok &= check("mixtral", "n_kv_heads = 2\nn_experts = 4", work)
        ok &= check_bert(work)
        ok &= check_t5(work, "", "t5")
        ok &= check_t5(work, 'mlp = "gated-gelu"\ntie_embeddings = false', "t5v1.1")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
