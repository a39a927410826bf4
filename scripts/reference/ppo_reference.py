"""PPO's advantages and losses by TRL's formulas (trl/trainer/ppo_trainer.py: per-token rewards
−kl_coef·(logp_old − logp_ref) with the score added at each reply's last token, GAE backwards
with values zeroed past the reply, `masked_whiten` of the advantages (unbiased variance,
shifted mean), then the clipped policy loss and the clipped value loss
0.5·max((v − R)², (clip(v, v_old ± ε_v) − R)²), both masked means, loss = pg + vf_coef·vf), in
torch float64 for fixed rollouts. Records advantages, returns, the losses and the gradients with
respect to the new log-probabilities and values. Writes tests/fixtures/ppo.json for
trainer/src/objective.rs.

    pip install torch
    python scripts/reference/ppo_reference.py
"""

import json
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def advantages_and_returns(rewards, values, mask, gamma, lam):
    values = values * mask
    rows, length = rewards.shape
    last = torch.zeros(rows, dtype=torch.float64)
    out = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    adv = torch.stack(out[::-1], dim=1)
    returns = adv + values
    return masked_whiten(adv, mask) * mask, returns


def main() -> None:
    g = torch.Generator().manual_seed(9)
    rows, length = 5, 7
    lengths = torch.randint(2, length + 1, (rows,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).double()
    old = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    ref = old + torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.2
    values = torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.5
    scores = (torch.rand(rows, generator=g) > 0.5).double()
    new = old + torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.3
    new_values = values + torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.4
    out = {"mask": mask.tolist(), "old_logps": old.tolist(), "ref_logps": ref.tolist(), "values": values.tolist(),
           "scores": scores.tolist(), "new_logps": new.tolist(), "new_values": new_values.tolist(), "cases": []}
    for kl_coef, gamma, lam, cliprange, cliprange_value, vf_coef in [(0.05, 1.0, 0.95, 0.2, 0.2, 0.1), (0.2, 0.9, 0.8, 0.1, 0.5, 0.5)]:
        rewards = -kl_coef * (old - ref) * mask
        rewards[torch.arange(rows), lengths - 1] += scores
        adv, returns = advantages_and_returns(rewards, values, mask, gamma, lam)
        x = new.clone().requires_grad_(True)
        v = new_values.clone().requires_grad_(True)
        vclipped = torch.clamp(v, values - cliprange_value, values + cliprange_value)
        vf = 0.5 * masked_mean(torch.max((v - returns) ** 2, (vclipped - returns) ** 2), mask)
        ratio = torch.exp(x - old)
        pg = masked_mean(torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)), mask)
        loss = pg + vf_coef * vf
        loss.backward()
        out["cases"].append({
            "kl_coef": kl_coef, "gamma": gamma, "lam": lam, "cliprange": cliprange, "cliprange_value": cliprange_value,
            "vf_coef": vf_coef, "advantages": adv.tolist(), "returns": returns.tolist(), "pg_loss": pg.item(),
            "vf_loss": vf.item(), "loss": loss.item(), "grad_logps": x.grad.tolist(), "grad_values": v.grad.tolist(),
        })
    path = ROOT / "tests" / "fixtures" / "ppo.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
