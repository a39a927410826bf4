"""Reference q8_0 / q4_0 encodings from gguf-py, as a test fixture.

    pip install gguf numpy
    python scripts/reference/make_gguf_fixtures.py

Writes tests/fixtures/gguf_quants.json: a float32 input (with ties, zeros, a zero block and
a negative maximum) and the hex bytes `gguf.quants.quantize` gives for it. The Rust test
`trainer/src/gguf.rs` must produce the same bytes.
"""

import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "gguf_quants.json"


def main() -> None:
    rng = np.random.default_rng(0)
    blocks = [
        rng.normal(size=32),
        np.zeros(32),
        np.linspace(-1, 1, 32),
        np.round(rng.normal(size=32) * 4) / 4,
        rng.normal(size=32) * 1e-3,
        -np.abs(rng.normal(size=32)) * 3,
    ]
    data = np.concatenate(blocks).astype(np.float32)
    fixture = {
        "input": [float(v) for v in data],
        "q8_0": quantize(data.reshape(-1, 32), GGMLQuantizationType.Q8_0).tobytes().hex(),
        "q4_0": quantize(data.reshape(-1, 32), GGMLQuantizationType.Q4_0).tobytes().hex(),
    }
    OUT.write_text(json.dumps(fixture))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
