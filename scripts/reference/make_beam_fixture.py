"""Record transformers' beam search on the tiny decoder fixtures, as a test fixture.

    pip install torch transformers safetensors
    python scripts/reference/make_beam_fixture.py

For tiny_llama, tiny_gpt2, tiny_mixtral and tiny_mamba (tests/fixtures, from make_hf_fixtures.py)
and three prompts each, `generate(num_beams=N, num_return_sequences=N)` runs greedy-free beam
search under several settings (beams, length_penalty, early_stopping). The end-of-text token of
each prompt is the third token greedy decoding writes after it, so that hypotheses end at
different lengths. Writes tests/fixtures/beam_search.json: per case the prompt, the settings, and
each returned hypothesis's generated tokens (through its end-of-text token, padding dropped) and
`sequences_scores`. `models/tests/hf_fidelity.rs` must give the same tokens and scores (1e-4).
"""

import json
import pathlib

import torch
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"
SETTINGS = [
    {"num_beams": 4, "length_penalty": 1.0, "early_stopping": False},
    {"num_beams": 4, "length_penalty": 2.0, "early_stopping": True},
    {"num_beams": 3, "length_penalty": 0.5, "early_stopping": "never"},
    {"num_beams": 2, "length_penalty": -1.0, "early_stopping": False},
]
MAX_NEW_TOKENS = 8


def main() -> None:
    cases = {}
    for name in ["tiny_llama", "tiny_gpt2", "tiny_mixtral", "tiny_mamba"]:
        model = AutoModelForCausalLM.from_pretrained(ROOT / name).eval()
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(7)
        cases[name] = []
        for length in [3, 5, 6]:
            prompt = torch.randint(0, vocab, (1, length), generator=g)
            with torch.no_grad():
                greedy = model.generate(prompt, do_sample=False, max_new_tokens=3, min_new_tokens=3, eos_token_id=None, pad_token_id=0)
            eos = int(greedy[0, length + 2])
            for setting in SETTINGS:
                with torch.no_grad():
                    out = model.generate(
                        prompt,
                        do_sample=False,
                        max_new_tokens=MAX_NEW_TOKENS,
                        eos_token_id=eos,
                        pad_token_id=eos,
                        num_return_sequences=setting["num_beams"],
                        output_scores=True,
                        return_dict_in_generate=True,
                        **setting,
                    )
                beams = []
                for sequence, score in zip(out.sequences, out.sequences_scores):
                    generated = sequence[length:].tolist()
                    if eos in generated:
                        generated = generated[: generated.index(eos) + 1]
                    beams.append({"tokens": generated, "score": float(score)})
                cases[name].append({"prompt": prompt[0].tolist(), "eos": eos, "max_new_tokens": MAX_NEW_TOKENS, **setting, "beams": beams})
    (ROOT / "beam_search.json").write_text(json.dumps(cases, indent=1) + "\n")
    print("wrote", ROOT / "beam_search.json")


if __name__ == "__main__":
    main()
