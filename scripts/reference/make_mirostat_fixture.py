"""Mirostat 2.0 as llama.cpp samples it, for tests/fixtures/mirostat.json: llama.cpp's own
sampler chain (temperature, then mirostat_v2, as `--mirostat 2` builds it) applied through
llama-cpp-python's C API to fixed random logits, step by step. Each step records the logits,
how many tokens the sampler kept (the array's size after it) and the token it drew. llama.cpp
draws with std::mt19937 and std::discrete_distribution, which Furnace does not reproduce; the
test follows llama.cpp's draws and checks every kept set, which depends on μ and so on every
earlier step.

    pip install llama-cpp-python numpy      # builds llama.cpp from source
    python scripts/reference/make_mirostat_fixture.py
"""

import ctypes
import json
import pathlib

import llama_cpp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
VOCAB, STEPS, SEED = 64, 300, 1234
CASES = [{"temperature": 0.8, "tau": 4.0, "eta": 0.1}, {"temperature": 1.0, "tau": 3.0, "eta": 0.2}]


def run(case, logits_by_step):
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(case["temperature"]))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_mirostat_v2(SEED, case["tau"], case["eta"]))
    kept, drawn = [], []
    for logits in logits_by_step:
        data = (llama_cpp.llama_token_data * VOCAB)()
        for i, logit in enumerate(logits):
            data[i].id, data[i].logit, data[i].p = i, float(logit), 0.0
        array = llama_cpp.llama_token_data_array(data=data, size=VOCAB, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
        kept.append(int(array.size))
        drawn.append(int(array.data[array.selected].id))
    llama_cpp.llama_sampler_free(chain)
    return kept, drawn


def main():
    rng = np.random.default_rng(7)
    # Logits spread like a language model's: a few likely tokens, a long tail.
    # Three decimals: the fixture stays small and both samplers read exactly these values.
    logits_by_step = np.round(rng.standard_normal((STEPS, VOCAB)) * 2.5, 3).astype(np.float32)
    cases = []
    for case in CASES:
        kept, drawn = run(case, logits_by_step)
        cases.append({**case, "kept": kept, "drawn": drawn})
    fixture = {
        "source": f"llama.cpp {llama_cpp.__version__} (llama-cpp-python): temp then mirostat_v2, seed {SEED}",
        "logits": [[round(float(x), 3) for x in row] for row in logits_by_step],
        "cases": cases,
    }
    out = ROOT / "tests" / "fixtures" / "mirostat.json"
    out.write_text(json.dumps(fixture))
    print(f"wrote {out}: {STEPS} steps, kept sizes {[min(c['kept']) for c in cases]}..{[max(c['kept']) for c in cases]}")


if __name__ == "__main__":
    main()
