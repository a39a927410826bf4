"""What the reference checks share: where the furnace binary is, a tiny training recipe on the
generated stories (`arch` and `extra` keys filled in per check), and running the binary.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
FURNACE = os.environ.get("FURNACE", str(ROOT / "target" / "release" / "furnace"))
PROMPT = "Once upon a time, there was a little"

TINY_RECIPE = """
[run]
seed = 3
[model]
arch = "{arch}"
flavor = "tiny"
{extra}
max_seq_len = 128
[data]
source = "stories"
num_examples = 2000
num_val_examples = 50
tokenizer_vocab_size = 400
[training]
local_batch_size = 8
seq_len = 64
steps = 60
eval_every = 0
log_every = 20
save_every = 0
[optimizer]
lr = 3e-3
[lr_scheduler]
warmup_steps = 10
[logging]
progress = false
peak_tflops = 1.0
"""


def run(*args: str) -> str:
    out = subprocess.run([FURNACE, *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"furnace {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout
