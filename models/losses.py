"""DSN's training objective.

    L = CE_fine + l_coarse * CE_coarse + l_budget * sum_branch mean_l (usage_l - target_branch)^2 + l_rank * L_rank

``usage_l`` is the batch mean of gate ``l``'s value (ConvNet-AIG's target-rate loss, one target per branch).
``L_rank`` is our design of the paper's ranking loss (the TIP paper's exact form is not available):

* difficulty ranking: for pairs of samples where ``i`` is harder than ``j`` (higher detached fine CE), the
  fraction of gated blocks ``i`` uses must exceed ``j``'s by ``margin`` (hinge, averaged over ordered pairs);
* branch ranking: per sample, the fine branch's usage must exceed the coarse branch's by ``margin``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from models.network import ModelOutput
from robustness.core.runtime import accumulation_dtype


@dataclass(frozen=True)
class LossWeights:
    """Weights and targets of the objective; ``target_*`` is the wanted fraction of a branch's gated blocks run."""

    coarse: float = 1.0
    budget: float = 2.0
    rank: float = 0.5
    target_coarse: float = 0.4
    target_fine: float = 0.7
    margin: float = 0.05


@dataclass(frozen=True)
class LossParts:
    """The objective's terms for one batch, for logging: detached 0-dim tensors on the loss's device, so that a
    training step never waits for the GPU to hand them over (``to_dict`` converts, and waits, once)."""

    total: torch.Tensor
    ce_fine: torch.Tensor
    ce_coarse: torch.Tensor
    budget: torch.Tensor
    rank: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """The five terms as one tensor [5] on their device, in its accumulation dtype (float64 but on MPS)."""
        terms = torch.stack([self.total, self.ce_fine, self.ce_coarse, self.budget, self.rank])
        return terms.to(accumulation_dtype(terms.device))

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def budget_loss(values: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    """Sum over branches of mean over gates of (batch usage - branch target)^2."""
    total = next(iter(values.values())).new_zeros(())
    for branch, v in values.items():
        target = weights.target_coarse if branch == "coarse" else weights.target_fine
        total = total + ((v.mean(0) - target) ** 2).mean()
    return total


def ranking_loss(values: dict[str, torch.Tensor], difficulty: torch.Tensor, margin: float) -> torch.Tensor:
    """Harder samples use more blocks; the fine branch uses more blocks than the coarse one (hinge losses)."""
    usage = torch.cat(list(values.values()), 1).mean(1)
    harder = difficulty[:, None] > difficulty[None, :]
    gap = usage[:, None] - usage[None, :]
    pair_loss = (F.relu(margin - gap) * harder).sum() / harder.sum().clamp(min=1)
    branch_loss = usage.new_zeros(())
    if "coarse" in values and "fine" in values:
        branch_loss = F.relu(margin - (values["fine"].mean(1) - values["coarse"].mean(1))).mean()
    return pair_loss + branch_loss


def dsn_loss(out: ModelOutput, fine: torch.Tensor, coarse: torch.Tensor, weights: LossWeights,
             gate_weight: float = 1.0) -> tuple[torch.Tensor, LossParts]:
    """The full objective; ``gate_weight`` in [0, 1] ramps the budget and ranking terms in after warm-up.

    For a model without gates the gate terms are zero.
    """
    ce_fine_per_sample = F.cross_entropy(out.fine, fine, reduction="none")
    ce_fine = ce_fine_per_sample.mean()
    ce_coarse = F.cross_entropy(out.coarse, coarse)
    total = ce_fine + weights.coarse * ce_coarse
    budget = rank = ce_fine.new_zeros(())
    if out.values and gate_weight > 0:
        budget = budget_loss(out.values, weights)
        rank = ranking_loss(out.values, ce_fine_per_sample.detach(), weights.margin)
        total = total + gate_weight * (weights.budget * budget + weights.rank * rank)
    return total, LossParts(total=total.detach().float(), ce_fine=ce_fine.detach().float(),
                            ce_coarse=ce_coarse.detach().float(), budget=budget.detach().float(),
                            rank=rank.detach().float())
