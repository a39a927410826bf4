"""DPO and reward-model losses by TRL's formulas (RewardTrainer: −logsigmoid(r_c − r_r)), and DPO
losses and implicit rewards (trl/trainer/dpo_trainer.py, `dpo_loss`,
loss_type "sigmoid" with and without label smoothing (conservative DPO) and "ipo", whose
log-probabilities TRL averages over the completion's tokens), in torch float64, for fixed
sequence log-probabilities. Writes tests/fixtures/dpo.json for trainer/src/objective.rs.

    pip install torch
    python scripts/reference/dpo_reference.py
"""

import json
import pathlib

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[2]


def dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing):
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(loss_type)
    return losses, beta * (pc - rc), beta * (pr - rr)


def main() -> None:
    g = torch.Generator().manual_seed(7)
    n = 6
    sums = lambda: (-torch.rand(n, generator=g, dtype=torch.float64) * 40 - 1)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = sums(), sums(), sums(), sums()
    count_chosen = torch.randint(3, 12, (n,), generator=g).double()
    count_rejected = torch.randint(3, 12, (n,), generator=g).double()
    cases = []
    for beta, loss_type, ls in [(0.1, "sigmoid", 0.0), (0.5, "sigmoid", 0.2), (0.1, "ipo", 0.0), (1.0, "ipo", 0.0)]:
        if loss_type == "ipo":
            args = (policy_chosen / count_chosen, policy_rejected / count_rejected, ref_chosen / count_chosen, ref_rejected / count_rejected)
        else:
            args = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
        losses, chosen_rewards, rejected_rewards = dpo_loss(*args, beta, loss_type, ls)
        cases.append({
            "beta": beta, "loss_type": loss_type, "label_smoothing": ls,
            "losses": losses.tolist(), "chosen_rewards": chosen_rewards.tolist(), "rejected_rewards": rejected_rewards.tolist(),
        })
    out = {
        "policy_chosen": policy_chosen.tolist(), "policy_rejected": policy_rejected.tolist(),
        "ref_chosen": ref_chosen.tolist(), "ref_rejected": ref_rejected.tolist(),
        "count_chosen": count_chosen.tolist(), "count_rejected": count_rejected.tolist(),
        "cases": cases,
    }
    chosen = torch.randn(n, generator=g, dtype=torch.float64) * 3
    rejected = torch.randn(n, generator=g, dtype=torch.float64) * 3
    out["reward"] = {
        "chosen": chosen.tolist(), "rejected": rejected.tolist(),
        "losses": (-F.logsigmoid(chosen - rejected)).tolist(),
    }
    path = ROOT / "tests" / "fixtures" / "dpo.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
