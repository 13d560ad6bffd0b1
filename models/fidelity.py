"""Is the adapted model the researcher's model? Fidelity to its own forward, and randomness at test time.

An adapter (:mod:`models.protocol`) is code a researcher writes once and rarely checks: a gate left out (a
downsampling block run always), a skip path taken as the identity where the network uses its projection, a tuple
output read the wrong way. Each gives a model that trains, attacks and reports without an error and is not the
network the paper describes. :func:`check_model` compares the adapted hard-gated forward, the deployed one the
suite attacks, with the module's own ``forward`` on the same images, and runs the deployed forward several times
to see whether it is random (ConvNet-AIG samples Gumbel noise at test time; so does test-time dropout).

Pitfalls: the two forwards are compared under the same seed of torch's generator (:func:`_same_draws`), so a
randomised model whose adapter draws its noise in the same order is still compared exactly; a model whose own
``forward`` draws in another order than its gated form cannot be told apart from an unfaithful one, and its check
says so. The randomness test draws outside any seed the suite sets (consecutive forwards): a model seeded once per
evaluation is still found random, and never silently made deterministic.

A random model is then scored as such (:meth:`models.protocol._Adapted.vote`): every prediction is the majority
over ``draws`` forwards and gradients are those of the mean probability over the same draws (EOT over the model's
own randomness).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn

from models.network import CoarseFineNet
from models.protocol import GatedNet, ScoreGated, StaticNet, _Adapted, _logits_pair
from robustness.core.errors import ConfigError
from robustness.core.runtime import generator_kept

log = logging.getLogger(__name__)

#: Largest logit difference (relative to the logits' scale, at least 1) that still counts as the same forward:
#: sub-batch execution and the masked reference round differently, a dropped gate moves logits by far more.
TOLERANCE = 1e-3
#: Forwards of the same batch that decide whether a model is random.
PROBE_DRAWS = 4
#: Forwards a random model's every prediction is the majority of.
VOTE_DRAWS = 8


@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_model` found. ``agreement`` / ``max_logit_diff`` are None when the module has no
    ``forward`` of its own to compare with (``note`` says so); ``disagreement`` is the share of inputs whose
    prediction is not the same in every one of ``probe_draws`` forwards (0 for a deterministic model)."""

    model: str
    kind: str
    n: int
    agreement: float | None
    max_logit_diff: float | None
    tolerance: float
    stochastic: bool
    disagreement: float
    probe_draws: int
    note: str = ""

    @property
    def faithful(self) -> bool | None:
        """Whether the adapted forward reproduces the module's own (None: nothing to compare with)."""
        if self.max_logit_diff is None:
            return None
        return self.max_logit_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "faithful": self.faithful}

    def lines(self) -> list[str]:
        """The check for a person: what was compared and what was found, one line each."""
        out = [f"model {self.model!r}: {self.kind}"]
        if self.faithful is None:
            out.append(f"fidelity: not checked ({self.note})")
        else:
            out.append(f"fidelity: the adapted deployed forward agrees with the model's own forward on "
                       f"{100 * self.agreement:.1f}% of {self.n} predictions, max logit difference "
                       f"{self.max_logit_diff:.3g} (tolerance {self.tolerance:g}): "
                       f"{'faithful' if self.faithful else 'NOT FAITHFUL'}")
        if self.stochastic:
            out.append(f"randomness: RANDOM at test time: {100 * self.disagreement:.1f}% of {self.n} clean "
                       f"predictions change between {self.probe_draws} forwards of the same images")
        else:
            out.append(f"randomness: deterministic ({self.probe_draws} forwards of {self.n} images agree)")
        return out

    def unfaithful_line(self, hint: bool = True) -> str:
        """Why the model is refused, in one line; ``hint``: with how to fix it or go on anyway."""
        why = self.note or "a gate left out, a block always run, a skip path that is not the network's?"
        line = (f"model {self.model!r} is not the network its own forward computes: the adapted deployed forward "
                f"agrees on {100 * self.agreement:.1f}% of {self.n} predictions, max logit difference "
                f"{self.max_logit_diff:.3g} > {self.tolerance:g} ({why})")
        return line + ("; fix the adapter, or pass --allow-unfaithful (allow_unfaithful=True) to attack it anyway"
                       if hint else "")


def kind_of(model: CoarseFineNet) -> str:
    if isinstance(model, ScoreGated):
        return f"score-gated ({model.n_gates} gates: {', '.join(model.gate_names)})"
    if isinstance(model, GatedNet):
        return f"gated, general protocol ({model.n_gates} gates: {', '.join(model.gate_names)})"
    if isinstance(model, StaticNet):
        return "static (no gates)"
    return f"a suite model ({model.n_gates} gates)" if model.is_gated else "a static suite model"


def check_model(model: CoarseFineNet, x: torch.Tensor, *, tolerance: float = TOLERANCE,
                probe_draws: int = PROBE_DRAWS, seed: int = 0) -> ModelCheck:
    """Compare ``model``'s deployed forward on images ``x`` ([0, 1]) with its module's own forward, and run it
    ``probe_draws`` times to see whether it is random (module docstring). Runs in eval mode, without gradients;
    torch's generator is left as it was."""
    if x.shape[0] == 0:
        raise ConfigError("the model check needs at least one image")
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), generator_kept(x), _single_draw(model):
            agreement, gap, note = _fidelity(model, x, seed)
            stochastic, disagreement = _randomness(model, x, probe_draws)
    finally:
        model.train(was)
    if stochastic and gap is not None and gap > tolerance:
        note = "it is random: its own forward may draw its noise in another order than its gated form"
    return ModelCheck(model.model_name, kind_of(model), int(x.shape[0]), agreement, gap, tolerance, stochastic,
                      disagreement, probe_draws, note)


def _fidelity(model: CoarseFineNet, x: torch.Tensor, seed: int) -> tuple[float | None, float | None, str]:
    if not isinstance(model, _Adapted):
        return None, None, "a suite model: its deployed forward is its own"
    net = model.net
    if type(net).forward is nn.Module.forward:
        return None, None, f"{type(net).__name__} has no forward of its own to compare with"
    with _same_draws(seed, x):
        ours = model(x).fine
    with _same_draws(seed, x):
        theirs = _logits_pair(net(model.normalize(x)), f"model {model.model_name!r}", model.outputs)[0]
    if theirs.shape != ours.shape:
        raise ConfigError(f"model {model.model_name!r}: its own forward returns logits of shape "
                          f"{tuple(theirs.shape)}, the adapted one {tuple(ours.shape)}")
    ours, theirs = ours.float(), theirs.float()
    # a non-finite logit both forwards give in the same place is the same forward (the records flag it later)
    same = (ours == theirs) | (ours.isnan() & theirs.isnan())
    diff = torch.where(same, torch.zeros_like(ours), (ours - theirs).abs()).nan_to_num(nan=math.inf)
    finite = theirs[theirs.isfinite()]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    gap = float(diff.max()) / scale
    agreement = float((ours.argmax(1) == theirs.argmax(1)).float().mean())
    return agreement, gap, ""


def _randomness(model: CoarseFineNet, x: torch.Tensor, draws: int) -> tuple[bool, float]:
    outs = [model(x) for _ in range(max(draws, 2))]
    logits = torch.stack([o.fine.float() for o in outs])
    paths = torch.stack([o.path.float() for o in outs])
    preds = logits.argmax(2)
    varies = (logits - logits[0]).abs().amax(dim=(0, 2)) > 1e-6 * max(1.0, float(logits.abs().max()))
    varies |= (paths != paths[0]).any(0).any(1) if paths.shape[2] else torch.zeros_like(varies)
    disagreement = float((preds != preds[0]).any(0).float().mean())
    return bool(varies.any()), disagreement


@contextmanager
def _same_draws(seed: int, x: torch.Tensor) -> Iterator[None]:
    torch.manual_seed(seed)
    if x.is_cuda:
        torch.cuda.manual_seed_all(seed)
    yield


@contextmanager
def _single_draw(model: CoarseFineNet) -> Iterator[None]:
    """One forward per call while checking, whatever the model was set to vote over."""
    draws = getattr(model, "draws", 1)
    if draws != 1:
        model.draws = 1
    try:
        yield
    finally:
        if draws != 1:
            model.draws = draws


def verify(model: CoarseFineNet, x: torch.Tensor, *, allow_unfaithful: bool = False,
           draws: int = VOTE_DRAWS) -> ModelCheck:
    """:func:`check_model` as ``attack --model-file`` and ``evaluate`` run it on their first images: an unfaithful
    adapter is a ConfigError unless ``allow_unfaithful`` (then a warning); a random model is set to vote over
    ``draws`` forwards (:meth:`models.protocol._Adapted.vote`), logged, and the check goes to the manifest."""
    check = check_model(model, x)
    if check.faithful is False:
        if not allow_unfaithful:
            raise ConfigError(check.unfaithful_line())
        log.warning("%s; attacking it anyway (--allow-unfaithful)", check.unfaithful_line(hint=False))
    if check.stochastic:
        if not isinstance(model, _Adapted):
            raise ConfigError(f"model {model.model_name!r} is random at test time, which the suite's own models "
                              f"never are: a bug in it")
        model.draws = draws
        log.warning("model %r is random at test time (%.1f%% of %d clean predictions change between %d forwards): "
                    "every prediction is the majority over %d draws and the attacks' gradients the mean over them "
                    "(EOT)", model.model_name, 100 * check.disagreement, check.n, check.probe_draws, draws)
    return check
