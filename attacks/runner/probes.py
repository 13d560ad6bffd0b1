"""The probes a run takes on its first batch's clean images before it attacks, recorded in the manifest
(:mod:`attacks.runner.provenance`): the share of samples whose input gradient is exactly zero, how often the
attacker's surrogate network predicts what the deployed one does, and the temperatures of the ``sharp`` routing
gradient (calibrated once, so that every batch, resumed or sharded, attacks the same surrogate).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from attacks.checks import zero_gradient_share
from attacks.runner.config import AttackConfig, dedupe
from attacks.runner.plan import EvalPlan
from models.network import CoarseFineNet
from models.surrogates import calibrate_temperature, surrogate_fidelity
from robustness.core.runtime import derive_seed, seed_everything
from robustness.data import CoarseFineDataset


def _zero_gradient_shares(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig,
                          plans: Sequence[EvalPlan]) -> dict[str, float]:
    """Share of zero input gradients on the first batch, per (gate_mode, gate_grad) of the white-box plans."""
    x, y = _first_batch(model, data, config)
    shares: dict[str, float] = {}
    combos = dedupe([(p.gate_mode, p.gate_grad) for p in plans if not p.source_run])
    if not model.is_gated:
        combos = dedupe([(mode, "none") for mode, _ in combos])
    for mode, grad in combos:
        seed_everything(derive_seed(config.seed, "zero-grad", mode, grad))
        shares[f"{mode}/{grad}"] = zero_gradient_share(model, x, y, mode, grad, config.target, config.eot_samples)
    return shares


def _first_batch(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig):
    x, fine, coarse = data.batch(slice(0, config.batch_size))
    device = next(model.parameters()).device
    return x.to(device), (fine if config.target == "fine" else coarse).to(device)


def sharp_temperature(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig) -> torch.Tensor | None:
    """Temperatures of the ``sharp`` routing gradient, calibrated once on the first batch's clean images (so that
    every batch, resumed or sharded, attacks the same surrogate); None for a model without gates."""
    if not model.is_gated:
        return None
    return calibrate_temperature(model, _first_batch(model, data, config)[0])


def _surrogate_fidelities(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig,
                          plans: Sequence[EvalPlan], temperature: torch.Tensor | None) -> dict[str, float]:
    """Per (gate_mode, gate_grad) of the white-box plans: how often the surrogate predicts what the deployed
    model does on the first batch (the attacker's gradient is only as good as its surrogate)."""
    if not model.is_gated:
        return {}
    x, _ = _first_batch(model, data, config)
    out: dict[str, float] = {}
    for mode, grad in dedupe([(p.gate_mode, p.gate_grad) for p in plans if not p.source_run]):
        if mode != "hard":
            continue
        seed_everything(derive_seed(config.seed, "fidelity", mode, grad))
        out[f"{mode}/{grad}"] = surrogate_fidelity(model, x, config.target, grad, temperature)
    return out


def first_batch_probes(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig,
                       plans: Sequence[EvalPlan], temperature: torch.Tensor | None, finished: bool,
                       kept: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's ``zero_grad_share``, ``surrogate_fidelity`` and ``sharp_temperature``: taken now, or, for a
    resume with every shard written (``finished``), those of ``kept`` (the manifest whose records this invocation
    keeps); the shares of ``kept``'s other gate settings stay."""
    if finished:
        probes = {key: (kept or {}).get(key) for key in
                  ("zero_grad_share", "surrogate_fidelity", "sharp_temperature")}
    else:
        probes = {"zero_grad_share": _zero_gradient_shares(model, data, config, plans),
                  "surrogate_fidelity": _surrogate_fidelities(model, data, config, plans, temperature),
                  "sharp_temperature": None if temperature is None else temperature.tolist()}
    if kept:
        for key in ("zero_grad_share", "surrogate_fidelity"):
            probes[key] = {**(kept.get(key) or {}), **(probes[key] or {})}
    return probes
