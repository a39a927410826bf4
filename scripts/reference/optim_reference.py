"""Reference trajectories for Furnace's optimizers, as a test fixture.

    pip install torch numpy
    python scripts/reference/optim_reference.py

Two parameters as Furnace groups them (a [3, 4] matrix with weight decay, a [4] norm weight
without), fixed gradients for 6 steps, a changing learning rate and global-norm clipping.
- AdamW: torch.optim.AdamW itself.
- Lion (Chen et al. 2023, Algorithm 2) and Sophia-G (Liu et al. 2023, Algorithm 3): our
  NumPy transcriptions of the papers' pseudo-code, in float64.
For Sophia, steps 1, 3, 5 (k = 2) first fold a curvature estimate B·ĝ⊙ĝ from given ĝ into h.
Writes tests/fixtures/optim.json, read by optim/src/tests.rs.
"""

import json
import math
import pathlib

import numpy as np
import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "optim.json"
STEPS = 6
LR = [1e-2, 2e-2, 3e-2, 2e-2, 1e-2, 5e-3]
MAX_NORM = 5.0
WEIGHT_DECAY = 0.1
SHAPES = {"weight": (3, 4), "norm": (4,)}
DECAY = {"weight": WEIGHT_DECAY, "norm": 0.0}


def series(step: int, shape, offset: float, scale: float = 1.0) -> np.ndarray:
    n = math.prod(shape)
    return np.array([math.sin(0.7 * i + 1.3 * step + offset) * (1.0 + step) * scale for i in range(n)]).reshape(shape)


def init():
    return {
        "weight": np.array([[0.1 * (i - 5) + 0.01 * (4 * r + i) for i in range(4)] for r in range(3)]),
        "norm": np.full(4, 0.9),
    }


def grads(step: int):
    return {"weight": series(step, SHAPES["weight"], 0.0), "norm": series(step, SHAPES["norm"], 2.0)}


def clip(g):
    norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
    factor = MAX_NORM / (norm + 1e-6) if norm > MAX_NORM else 1.0
    return {k: v * factor for k, v in g.items()}, norm


def adamw(config):
    params = {k: torch.tensor(v, requires_grad=True) for k, v in init().items()}
    opt = torch.optim.AdamW(
        [{"params": [params[k]], "weight_decay": DECAY[k]} for k in SHAPES],
        lr=LR[0], betas=(config["beta1"], config["beta2"]), eps=config["eps"],
    )
    for step in range(STEPS):
        for k, g in grads(step).items():
            params[k].grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM)
        for group in opt.param_groups:
            group["lr"] = LR[step]
        opt.step()
    return {k: v.detach().numpy() for k, v in params.items()}


def lion(config):
    b1, b2 = config["beta1"], config["beta2"]
    theta, m = init(), {k: np.zeros(s) for k, s in SHAPES.items()}
    for step in range(STEPS):
        g, _ = clip(grads(step))
        for k in SHAPES:
            c = b1 * m[k] + (1 - b1) * g[k]
            theta[k] = theta[k] - LR[step] * (np.sign(c) + DECAY[k] * theta[k])
            m[k] = b2 * m[k] + (1 - b2) * g[k]
    return theta


def sophia_curvature(step: int):
    return {k: series(step, s, 4.0, 2.0) for k, s in SHAPES.items()}


def sophia(config):
    b1, b2, rho, eps, k_interval, batch = config["beta1"], config["beta2"], config["rho"], config["eps"], config["hessian_interval"], config["batch"]
    theta = init()
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    h = {k: np.zeros(s) for k, s in SHAPES.items()}
    clipped = []
    for step in range(STEPS):
        t = step + 1
        if t % k_interval == 1 % k_interval:
            g_hat = sophia_curvature(step)
            for k in SHAPES:
                h[k] = b2 * h[k] + (1 - b2) * batch * g_hat[k] * g_hat[k]
        g, _ = clip(grads(step))
        count = 0
        for k in SHAPES:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            theta[k] = theta[k] - LR[step] * DECAY[k] * theta[k]
            ratio = m[k] / np.maximum(rho * h[k], eps)
            count += int((np.abs(ratio) >= 1).sum())
            theta[k] = theta[k] - LR[step] * np.clip(ratio, -1, 1)
        clipped.append(count / 16)
    return theta, clipped


def main() -> None:
    fixture = {
        "lr": LR,
        "max_norm": MAX_NORM,
        "weight_decay": WEIGHT_DECAY,
        "init": {k: v.tolist() for k, v in init().items()},
        "grads": [{k: v.tolist() for k, v in grads(s).items()} for s in range(STEPS)],
        "grad_norms": [clip(grads(s))[1] for s in range(STEPS)],
        "curvature_grads": [{k: v.tolist() for k, v in sophia_curvature(s).items()} for s in range(STEPS)],
    }
    configs = {
        "adamw": {"beta1": 0.9, "beta2": 0.95, "eps": 1e-8},
        "lion": {"beta1": 0.9, "beta2": 0.99},
        "sophia": {"beta1": 0.965, "beta2": 0.99, "rho": 0.04, "eps": 1e-12, "hessian_interval": 2, "batch": 8.0},
    }
    fixture["adamw"] = {"config": configs["adamw"], "final": {k: v.tolist() for k, v in adamw(configs["adamw"]).items()}}
    fixture["lion"] = {"config": configs["lion"], "final": {k: v.tolist() for k, v in lion(configs["lion"]).items()}}
    theta, clipped = sophia(configs["sophia"])
    fixture["sophia"] = {"config": configs["sophia"], "final": {k: v.tolist() for k, v in theta.items()}, "clip_fractions": clipped}
    OUT.write_text(json.dumps(fixture, indent=1))
    print(f"wrote {OUT}; sophia clip fractions {clipped}")


if __name__ == "__main__":
    main()
