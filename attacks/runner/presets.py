"""Named attack presets (AutoAttack / RobustBench style): an ``[attack]`` table under a name.

A preset fixes *what* is run (attacks, routing gradients, backends); the config file and the flags still choose
the data, budgets and device, and override the preset where they set the same key (``--preset autoattack --eps
4/255``). The preset's name is stored in the manifest's config so that a run says how it was made.
"""
from __future__ import annotations

from typing import Any

from robustness.core.errors import UnknownNameError

PRESETS: dict[str, dict[str, Any]] = {
    # torchattacks' AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square 5000) on every model; gated models with
    # the naive routing gradient and the sharpened-BPDA surrogate (the surrogate of highest fidelity by design).
    "autoattack": {"attacks": ["autoattack"], "backends": ["torchattacks"], "cross_check": False,
                   "gate_grads": ["none", "sharp"]},
    # The suite at full strength: PGD 50 x 5 restarts x (CE, margin), APGD-CE/DLR 100 steps, DDN for the L2
    # budgets, Square 5000 queries, the path attack, every routing gradient but EOT.
    "full": {"attacks": ["fgsm", "pgd", "apgd", "ddn", "square", "path", "slowdown"],
             "backends": ["native", "torchattacks", "foolbox"], "cross_check": False,
             "gate_grads": ["none", "ste", "bpda", "sharp"]},
}


def preset_table(name: str) -> dict[str, Any]:
    """A copy of preset ``name``'s ``[attack]`` table; UnknownNameError listing the presets."""
    if name not in PRESETS:
        raise UnknownNameError("attack preset", name, sorted(PRESETS))
    return {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[name].items()}
