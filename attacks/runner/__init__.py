"""Attack a trained run: configuration, the plan of evaluations, scoring into records, the resumable run.

* :mod:`attacks.runner.config`: :class:`AttackConfig` (general options and per-attack parameters);
* :mod:`attacks.runner.plan`: :class:`EvalPlan`, :func:`plan_evaluations`;
* :mod:`attacks.runner.scoring`: :class:`Batch`, :class:`Scorer` (adversarial batches -> records);
* :mod:`attacks.runner.subject`: :func:`load_run_checkpoint`, :func:`load_eval_data` (what is attacked);
* :mod:`attacks.runner.provenance`: the layout, the manifest (:data:`MANIFEST_SCHEMA`), fingerprints, resume checks;
* :mod:`attacks.runner.probes`: the first-batch probes the manifest records;
* :mod:`attacks.runner.run`: :func:`run_attacks` (resume, torchrun).
"""
from attacks.runner.config import ATTACK_ALIASES, LIBRARY_BACKENDS, RETIRED_OPTIONS, AttackConfig
from attacks.runner.plan import EvalPlan, plan_evaluations
from attacks.runner.provenance import MANIFEST_SCHEMA
from attacks.runner.run import AttackResult, run_attacks
from attacks.runner.scoring import Batch, Scorer, bit_strings
from attacks.runner.subject import check_transferable, load_eval_data, load_run_checkpoint

__all__ = ["ATTACK_ALIASES", "RETIRED_OPTIONS", "LIBRARY_BACKENDS", "AttackConfig", "EvalPlan", "plan_evaluations",
           "MANIFEST_SCHEMA", "AttackResult", "check_transferable", "load_eval_data", "load_run_checkpoint",
           "run_attacks", "Batch", "Scorer", "bit_strings"]
