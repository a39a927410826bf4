"""Record transformers' sentence embeddings (the last hidden state averaged over positions) of
the tiny BERT and T5 fixtures, as `/v1/embeddings` serves them for encoders.

    pip install torch transformers safetensors
    python scripts/reference/make_embedding_fixture.py

`BertModel` (the tiny_bert fixture's encoder, without its masked-LM head) and `T5EncoderModel`
(tiny_t5's encoder, final norm included) read three token sequences each; writes
tests/fixtures/embeddings.json with the tokens and the mean of `last_hidden_state` over
positions. `models/tests/hf_fidelity.rs` must reproduce them to 1e-4.
"""

import json
import pathlib

import torch
from transformers import BertModel, T5EncoderModel

ROOT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"


def main() -> None:
    out = {}
    for name, cls in [("tiny_bert", BertModel), ("tiny_t5", T5EncoderModel)]:
        model = cls.from_pretrained(ROOT / name).eval()
        g = torch.Generator().manual_seed(11)
        cases = []
        for length in [1, 4, 9]:
            tokens = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
            with torch.no_grad():
                # BERT: segment 0 everywhere, no padding (as Furnace embeds one input).
                hidden = model(input_ids=tokens).last_hidden_state
            cases.append({"tokens": tokens[0].tolist(), "embedding": hidden.mean(dim=1)[0].tolist()})
        out[name] = cases
    (ROOT / "embeddings.json").write_text(json.dumps(out) + "\n")
    print("wrote", ROOT / "embeddings.json")


if __name__ == "__main__":
    main()
