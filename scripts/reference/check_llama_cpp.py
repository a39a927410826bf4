"""Proof by llama.cpp: train tiny Llama, Mixtral and GPT-2 models with furnace, export them to
GGUF, run them with llama.cpp (through llama-cpp-python) on the same token ids, and compare the
logits of every prompt position (f32 export: 1e-4 relative to the largest logit) and the greedy
continuation (f32: identical tokens) with `furnace generate`; for f16, q8_0 and q4_0 it reports
the logit error and the change in perplexity on a short text. It also checks that llama.cpp's
own tokenizer (from the GGUF's vocabulary, merges and `pre` type) splits text, digits included,
into the ids Furnace's tokenizer gives.

    # builds llama.cpp from source, about 12 minutes on 2 cores (a native build may use
    # instructions a VM does not have: keep GGML_NATIVE off)
    CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=OFF" pip install llama-cpp-python safetensors numpy
    cargo build --release -p furnace-trainer
    python scripts/reference/check_llama_cpp.py       # FURNACE=path/to/furnace to pick a binary
"""

import pathlib
import sys
import tempfile

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file

from furnace_cli import PROMPT, TINY_RECIPE, run as furnace

NEW_TOKENS = 16
TEXT = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog. One day she found a red ball under a tree."

def greedy_ids(llm: Llama, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
        out.append(token)
        if len(out) == n:
            break
    return out


def perplexity(llm: Llama, ids: list[int]) -> float:
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
    top = scores.max(1, keepdims=True)
    log_probs = scores - top - np.log(np.exp(scores - top).sum(1, keepdims=True))
    return float(np.exp(-np.mean([log_probs[i, ids[i + 1]] for i in range(len(ids) - 1)])))


def check(arch: str, extra: str, work: pathlib.Path) -> bool:
    recipe = work / f"{arch}.toml"
    recipe.write_text(TINY_RECIPE.format(arch=arch, extra=extra))
    run_dir, logits_file = work / f"run_{arch}", work / f"logits_{arch}.safetensors"
    furnace("train", "--config", str(recipe), "--set", f"run.output_dir={run_dir}")
    ours_text = furnace("generate", "--checkpoint", str(run_dir), "--prompt", PROMPT, "--temperature", "0",
                        "--max-new-tokens", str(NEW_TOKENS), "--logits-out", str(logits_file))
    ours = load_file(str(logits_file))
    ids = [int(t) for t in ours["input_ids"]]
    text_file = work / f"text_{arch}.safetensors"
    furnace("generate", "--checkpoint", str(run_dir), "--prompt", TEXT, "--max-new-tokens", "1", "--logits-out", str(text_file))
    text_ids = [int(t) for t in load_file(str(text_file))["input_ids"]]
    sums = "37+45=82 and 3-45=-42, 2026 x 12."
    sums_file = work / f"sums_{arch}.safetensors"
    furnace("generate", "--checkpoint", str(run_dir), "--prompt", sums, "--max-new-tokens", "1", "--logits-out", str(sums_file))
    sums_ids = [int(t) for t in load_file(str(sums_file))["input_ids"]]
    ok, base_ppl = True, None
    for quant in ["f32", "f16", "q8_0", "q4_0"]:
        gguf = work / f"{arch}-{quant}.gguf"
        furnace("export", "--checkpoint", str(run_dir), "--format", "gguf", "--quant", quant, "--out", str(gguf))
        llm = Llama(model_path=str(gguf), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
        err = float(np.abs(theirs - ours["logits"]).max() / np.abs(ours["logits"]).max())
        continuation = greedy_ids(llm, ids, NEW_TOKENS)
        text = PROMPT + llm.detokenize(continuation).decode("utf-8", errors="replace")
        same = text.startswith(ours_text.rstrip("\n")) or ours_text.rstrip("\n").startswith(text)
        ppl = perplexity(llm, text_ids)
        base_ppl = base_ppl or ppl
        print(f"{arch:7} {quant:5} llama.cpp vs furnace: max |Δlogit|/max|logit| = {err:.2e}  greedy continuation identical: {same}"
              f"  perplexity {ppl:.3f} ({100 * (ppl / base_ppl - 1):+.2f}% vs f32)")
        if not same:
            print(f"  furnace:   {ours_text.rstrip()!r}\n  llama.cpp: {text!r}")
        if quant == "f32":
            # Furnace's prompt ids start with end-of-text; llama.cpp's tokenize adds nothing here.
            tokenized = all(llm.tokenize(t.encode(), add_bos=False, special=False) == ids[1:]
                            for t, ids in [(TEXT, text_ids), (sums, sums_ids)])
            print(f"{arch:7} llama.cpp tokenizes text and digits as furnace does: {tokenized}")
            ok &= err < 1e-4 and same and tokenized
    return ok


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        ok = check("llama", "n_kv_heads = 2", work)
        ok &= check("mixtral", "n_kv_heads = 2\nn_experts = 4", work)
        ok &= check("gpt2", "", work)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
