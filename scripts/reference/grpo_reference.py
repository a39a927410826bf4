"""GRPO advantages and loss by TRL's formulas (trl/trainer/grpo_trainer.py: group-normalised
advantages `(r − mean_group) / (std_group + 1e-4)` with torch's unbiased std, and
`_compute_loss` with num_iterations = 1: per-token `−exp(logp − logp.detach())·A` plus
`β·(exp(ref − logp) − (ref − logp) − 1)`, averaged as loss_type "dapo", "grpo" or "dr_grpo"),
in torch float64, for fixed rewards and per-token log-probabilities. Records each loss and its
gradient with respect to the policy's log-probabilities. Writes tests/fixtures/grpo.json for
trainer/src/objective.rs.

    pip install torch
    python scripts/reference/grpo_reference.py
"""

import json
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def advantages(rewards, group, scale):
    grouped = rewards.view(-1, group)
    mean = grouped.mean(dim=1).repeat_interleave(group)
    std = grouped.std(dim=1).repeat_interleave(group)
    adv = rewards - mean
    return adv / (std + 1e-4) if scale else adv


def loss(logps, ref, mask, adv, beta, loss_type, max_completion_length):
    coef_1 = torch.exp(logps - logps.detach())
    per_token = -coef_1 * adv.unsqueeze(1)
    kl = torch.exp(ref - logps) - (ref - logps) - 1
    if beta != 0.0:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        value = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        value = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        value = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:
        raise ValueError(loss_type)
    mean_kl = (kl * mask).sum() / mask.sum()
    return value, mean_kl


def main() -> None:
    g = torch.Generator().manual_seed(5)
    prompts, group, length, max_len = 3, 4, 6, 8
    rows = prompts * group
    # 0/1 verifier rewards, one group all wrong (zero advantages), plus a fractional reward.
    rewards = (torch.rand(rows, generator=g) > 0.5).double()
    rewards[group:2 * group] = 0.0
    rewards[-1] = 0.5
    logps = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    ref = logps + torch.randn(rows, length, generator=g, dtype=torch.float64) * 0.3
    lengths = torch.randint(1, length + 1, (rows,), generator=g)
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).double()
    out = {
        "group": group, "max_completion_length": max_len,
        "rewards": rewards.tolist(), "logps": logps.tolist(), "ref_logps": ref.tolist(), "mask": mask.tolist(),
        "advantages": {"scaled": advantages(rewards, group, True).tolist(), "unscaled": advantages(rewards, group, False).tolist()},
        "cases": [],
    }
    adv = advantages(rewards, group, True)
    for beta, loss_type in [(0.04, "dapo"), (0.0, "dapo"), (0.1, "grpo"), (0.04, "dr_grpo")]:
        x = logps.clone().requires_grad_(True)
        value, mean_kl = loss(x, ref, mask, adv, beta, loss_type, max_len)
        value.backward()
        out["cases"].append({
            "beta": beta, "loss_type": loss_type, "loss": value.item(), "mean_kl": mean_kl.item(), "grad": x.grad.tolist(),
        })
    path = ROOT / "tests" / "fixtures" / "grpo.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
