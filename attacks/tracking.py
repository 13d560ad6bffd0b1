"""The one owner of "which adversarial example does an attack return": per sample and budget, the first candidate
that fools the *deployed* forward, else the one closest to fooling it.

An iterative attack's last iterate is not its best: an iterate that fooled the model mid-run can be undone by the
next step, and a surrogate gradient (BPDA, EOT) optimises a network that is not the one deployed. So every
fixed-budget attack runs under a :class:`BestAdversarial` (set up by :meth:`attacks.base.Attack.__call__`):

* every candidate the attack evaluates is *offered*: the model view the libraries call offers each full batch it
  sees (:class:`attacks.adapters.LogitsView`), our own loops offer their iterates (with the indices of the
  samples still attacked), and the base offers what the attack finally returns;
* a candidate counts for budget ``eps`` only if it lies in that budget (``check_budget``'s tolerance) and in
  [0, 1]; a candidate found at a small budget is therefore also kept for every larger one;
* "fools" is decided by the deterministic no-grad forward in the evaluation's gate mode (``Target.logits``), never
  by a library's flag or a surrogate's logits. Per sample the first fooling candidate is kept (across iterates,
  restarts and losses); until one is found, the candidate with the lowest deployed margin
  ``z_y - max_{j != y} z_j``;
* samples that the deployed model already misclassifies are not robust whatever happens: they are marked fooled
  (with the clean image) from the start, so that loops need not attack them. In the stochastic ``random`` gate
  mode nothing is decided up front. So are the samples an earlier attack of the run's cascade already fooled at a
  budget (``Target.settled``, :mod:`attacks.runner.cascade`): the runner carries that attack's row over for them.

For transfer (examples crafted on one model, scored on another) the first iterate that fools the *source* model
is a poor choice: it sits on the source's decision boundary and rarely transfers. There ``keep_first=False``
keeps per sample the candidate with the lowest source margin (the most confident misclassification) and nothing
is dropped early.

The runner still re-scores every returned example with its own forward; this class only decides which candidate
is returned.

Non-finite values (:class:`NonFinite` counts them per sample, :meth:`attacks.base.Attack.__call__` logs them):

* a candidate with a NaN or inf pixel (what a step along a NaN input gradient makes) is never kept: it is no image;
* a candidate on which the deployed forward's logits hold a NaN or an inf does not fool (no class was predicted);
  with ``keep_first`` it is kept, the first one per sample, in place of any candidate that does not fool, but a
  candidate that fools with finite logits replaces it and only that ends the sample's search. The scorer then
  records such a sample as ``nonfinite`` (never robust, never a success: :mod:`attacks.records`). Without
  ``keep_first`` (transfer) it is never kept: it carries no margin to transfer;
* a sample whose clean logits are non-finite is never clean-correct: like a misclassified one it is marked fooled
  (not attacked) from the start;
* input gradients: every candidate that reaches :meth:`BestAdversarial.offer` still attached to the autograd graph
  (the model view's input, the native loops' iterates) gets a hook that notes samples whose input gradient holds a
  NaN or an inf.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch

from attacks.checks import budget_limit, sample_norms
from robustness.core.norms import per_sample


class Scored(Protocol):
    """What a tracker needs of the model under attack (:class:`attacks.base.Target` is one): the evaluation's gate
    mode, its deterministic deployed forward, and the samples an earlier attack of the cascade settled per budget.
    A protocol, so this module does not import the attack base that imports it."""

    gate_mode: str
    settled: dict[float, torch.Tensor] | None

    def logits(self, x: torch.Tensor) -> torch.Tensor: ...


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """Bool [B]: rows of ``t`` [B, ...] whose values are all finite (no NaN, no +-inf)."""
    t = t.detach()
    return torch.isfinite(t.flatten(1)).all(1) if t.dim() > 1 else torch.isfinite(t)


class NonFinite:
    """What non-finite values one attack call met, per sample of its batch [B] (bool tensors):

    ``gradient``: an input gradient with a NaN or an inf; ``image``: a candidate with a NaN or inf pixel, rejected;
    ``logits``: a candidate on which the deployed forward's logits were non-finite (the sample's clean logits
    included)."""

    KINDS = ("gradient", "image", "logits")

    def __init__(self, batch_size: int, device: torch.device | str | None = None):
        self.batch_size = batch_size
        for kind in self.KINDS:
            setattr(self, kind, torch.zeros(batch_size, dtype=torch.bool, device=device))

    def note(self, kind: str, bad: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Mark the samples ``index`` (all, if None) where ``bad`` [len(index)] is True."""
        seen = getattr(self, kind)
        bad = bad.to(seen.device)
        if index is None:
            seen |= bad
        elif bad.any():
            seen[index.to(seen.device)[bad]] = True

    def watch_gradient(self, x: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Note the samples whose gradient with respect to ``x`` (when one is computed) is non-finite."""
        if not (x.requires_grad and torch.is_grad_enabled()):
            return

        def hook(grad: torch.Tensor) -> None:
            self.note("gradient", ~finite_rows(grad), index)

        x.register_hook(hook)

    def counts(self) -> dict[str, int]:
        """Samples affected per kind."""
        return {kind: int(getattr(self, kind).sum()) for kind in self.KINDS}

    def describe(self) -> str:
        """One phrase with the counts, '' when nothing non-finite was met."""
        c, n = self.counts(), self.batch_size
        parts = []
        if c["gradient"]:
            parts.append(f"non-finite input gradients for {c['gradient']} of {n} samples")
        if c["image"]:
            parts.append(f"candidate examples with non-finite pixels for {c['image']} of {n} samples, rejected (the "
                         f"clean image or another candidate stands for them)")
        if c["logits"]:
            parts.append(f"non-finite logits of the deployed forward for {c['logits']} of {n} samples (recorded as "
                         f"nonfinite where no finite example was kept)")
        return "; ".join(parts)


def deployed_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per sample (negative: misclassified, up to ties), float64."""
    z = logits.detach().double()
    true = z.gather(1, y.view(-1, 1)).squeeze(1)
    other = z.scatter(1, y.view(-1, 1), -math.inf).amax(1)
    return true - other


class BestAdversarial:
    """Per sample and budget: the first candidate that fools the deployed forward, else the lowest-margin one.

    ``x`` [B, C, H, W] clean images, ``y`` [B] labels of the attacked head, ``eps`` the (positive) budgets in
    ``norm``. ``best(k)`` is the chosen batch for ``eps[k]`` (the clean image where no candidate fitted).
    ``nonfinite``: where the non-finite values the candidates meet are counted (a fresh :class:`NonFinite` if None).
    """

    def __init__(self, target: Scored, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float], norm: str,
                 keep_first: bool = True, nonfinite: NonFinite | None = None):
        self.target = target
        #: what non-finite values the candidates met (shared with the attack call that logs it)
        self.nonfinite = nonfinite if nonfinite is not None else NonFinite(x.shape[0], x.device)
        self.keep_first = keep_first
        self.x, self.y = x.detach(), y
        self.eps = [float(e) for e in eps]
        self.norm = norm
        self.limits = [budget_limit(e, norm) for e in self.eps]
        self.batch_size = x.shape[0]
        self._best = [self.x.clone() for _ in self.eps]
        self._margin = [torch.full((self.batch_size,), math.inf, dtype=torch.float64, device=x.device)
                        for _ in self.eps]
        self._fooled = [torch.zeros(self.batch_size, dtype=torch.bool, device=x.device) for _ in self.eps]
        self.deterministic = target.gate_mode != "random"
        if self.deterministic and keep_first:
            logits = target.logits(self.x)
            broken = ~finite_rows(logits)
            self.nonfinite.note("logits", broken)
            wrong = (logits.argmax(1) != y) | broken  # never clean-correct: nothing to attack
            for fooled in self._fooled:
                fooled |= wrong
        if keep_first and target.settled:  # fooled by an earlier attack of the cascade: not attacked again
            for e, fooled in zip(self.eps, self._fooled):
                done = target.settled.get(e)
                if done is not None:
                    fooled |= done.to(fooled.device)

    def offer(self, candidate: torch.Tensor, logits: torch.Tensor | None = None,
              index: torch.Tensor | None = None) -> None:
        """Consider ``candidate`` (the full batch, or the samples ``index`` of it) for every budget it fits.

        ``logits``: the deployed forward's logits on ``candidate`` when the caller has them (they must be exactly
        the deterministic forward's); otherwise they are computed here.
        """
        if index is None and candidate.shape != self.x.shape:
            return  # a library evaluating a subset: it returns its best of those itself
        if index is not None and candidate.shape[0] != index.numel():
            return
        self.nonfinite.watch_gradient(candidate, index)
        with torch.no_grad():
            candidate = candidate.detach()
            if index is None:
                index = torch.arange(self.batch_size, device=candidate.device)
            if logits is None:
                logits = self.target.logits(candidate)
            y = self.y.index_select(0, index)
            flat = candidate.flatten(1)
            pixels = finite_rows(flat)
            self.nonfinite.note("image", ~pixels, index)
            valid = pixels & (flat.amin(1) >= 0) & (flat.amax(1) <= 1)
            finite = finite_rows(logits)
            self.nonfinite.note("logits", valid & ~finite, index)
            # non-finite logits never fool; with keep_first they rank below every fooling candidate and above every
            # other one (margin -inf: kept once, replaced only by a candidate that fools); without it, never kept
            margin = torch.where(finite, deployed_margin(logits, y), -math.inf if self.keep_first else math.inf)
            wrong = finite & (logits.argmax(1) != y)
            norms = sample_norms(candidate.double() - self.x.index_select(0, index).double(), self.norm)
            for k, limit in enumerate(self.limits):
                lower = margin < self._margin[k].index_select(0, index)
                if self.keep_first:
                    take = valid & (norms <= limit) & ~self._fooled[k].index_select(0, index) & (wrong | lower)
                else:
                    take = valid & (norms <= limit) & lower
                if not take.any():
                    continue
                rows = index[take]
                self._best[k][rows] = candidate[take].to(self.x.dtype)
                self._margin[k][rows] = margin[take]
                self._fooled[k][rows] = wrong[take] & self.keep_first

    def fooled(self, k: int) -> torch.Tensor:
        """Bool [B]: samples already fooled (or misclassified clean) at budget ``eps[k]`` (never, without
        ``keep_first``: every sample is attacked to the end)."""
        return self._fooled[k].clone()

    def pending(self, eps: float) -> torch.Tensor:
        """Indices of the samples still to attack at budget ``eps`` (not yet fooled there, by this attack at this
        or a smaller budget, and not misclassified clean)."""
        return (~self._fooled[self.budget_index(eps)]).nonzero().squeeze(1)

    def best(self, k: int) -> torch.Tensor:
        """The chosen batch at budget ``eps[k]``."""
        return self._best[k].clone()

    def budget_index(self, eps: float) -> int:
        """Position of budget ``eps`` in this tracker's list."""
        return self.eps.index(float(eps))


def within_budgets(x: torch.Tensor, best: torch.Tensor, found: torch.Tensor, eps: Sequence[float],
                   norm: str) -> list[torch.Tensor]:
    """For a minimal-perturbation attack: at each budget the found example if its norm fits, else the clean one
    (always the clean one for an example with a non-finite pixel)."""
    found = found & finite_rows(best)
    norms = sample_norms(best - x, norm)
    out = []
    for e in eps:
        ok = per_sample(found & (norms <= float(e)), x)
        out.append(torch.where(ok, best, x))
    return out
