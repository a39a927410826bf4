"""Reference AdamW trajectories from torch.optim.AdamW, as a test fixture.

    pip install torch
    python scripts/reference/make_optim_fixtures.py

Two parameter groups as Furnace builds them (a matrix with weight decay, a norm weight
without), fixed gradients for 5 steps, gradient clipping by global norm. Writes
tests/fixtures/adamw.json, read by optim/src/tests.rs.
"""

import json
import math
import pathlib

import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "adamw.json"


def grad(step: int, shape, offset: float) -> torch.Tensor:
    n = math.prod(shape)
    values = [math.sin(0.7 * i + 1.3 * step + offset) * (1.0 + step) for i in range(n)]
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def main() -> None:
    weight = torch.tensor([[0.1 * (i - 5) for i in range(4)] for _ in range(3)], dtype=torch.float64) + torch.arange(12, dtype=torch.float64).reshape(3, 4) * 0.01
    norm = torch.ones(4, dtype=torch.float64) * 0.9
    init = {"weight": weight.tolist(), "norm": norm.tolist()}
    weight, norm = weight.clone().requires_grad_(), norm.clone().requires_grad_()
    config = {"lr": [1e-2, 2e-2, 3e-2, 2e-2, 1e-2], "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "max_norm": 5.0}
    opt = torch.optim.AdamW(
        [{"params": [weight], "weight_decay": config["weight_decay"]}, {"params": [norm], "weight_decay": 0.0}],
        lr=config["lr"][0],
        betas=(config["beta1"], config["beta2"]),
        eps=config["eps"],
    )
    grads, norms = [], []
    for step, lr in enumerate(config["lr"]):
        gw, gn = grad(step, (3, 4), 0.0), grad(step, (4,), 2.0)
        grads.append({"weight": gw.tolist(), "norm": gn.tolist()})
        weight.grad, norm.grad = gw.clone(), gn.clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_([weight, norm], config["max_norm"])))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    OUT.write_text(json.dumps({"config": config, "init": init, "grads": grads, "grad_norms": norms, "final": {"weight": weight.tolist(), "norm": norm.tolist()}}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
