"""``dsn-robust attack RUN_DIR``: attack a trained run and write per-sample records into it.

An ``[attack]`` table of ``--config FILE`` supplies defaults (any :class:`attacks.runner.AttackConfig` field, and
``[attack.<name>]`` subtables of per-attack parameters); flags override it, ``--set ATTACK.KEY=VALUE`` sets one
attack parameter. Ends with a short table: clean accuracy, robust accuracy per attack and eps, worst case.

Defaults: without ``--config``, ``attack`` measures what ``dsn-robust run`` measures: the ``[attack]`` table of the
config ``run`` reads by default (``configs/quickstart.toml``, :func:`attacks.runner.config.default_attack_table`) is the
one owner of the default evaluation, less :data:`EXECUTION_KEYS` (its CPU, one thread and two workers suit the
quickstart's laptop; an attack keeps ``auto``, torch's threads and one process). Where that file is not there (an
installed package without the source tree) :class:`AttackConfig`'s own defaults apply, with a warning.

``--resume`` continues the stored records with the settings they were made with: the manifest's ``config`` (its
``transfer_configs[<source>]`` with ``--transfer-from``) is the base; ``--config`` and flags may restate it, add
evaluations (:data:`PLAN_KEYS`: more attacks, budgets, routing gradients ...) and set the parameters of attacks
that have not run, but not change how the stored evaluations ran (seed, n, the subset rule and seed, batch size,
steps, an attack's parameters: one line naming each difference, ``--force`` as the fix); :data:`EXECUTION_KEYS`
may change. The attacked images are the stored rule's (``--subset``, ``--subset-seed``; also for the first
``--transfer-from`` into attacked records, :func:`keep_stored_subset`); the runner refuses a resume on other images
than the records were made on (the test data changed) and a resume of records older than the recorded subset.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from attacks.base import COMPUTE, attack_class, attack_kind, backends_for, known_attacks, known_backends
from attacks.records import accuracy_rows, carried, worst_case
from attacks.runner import ATTACK_ALIASES, AttackConfig, AttackResult, load_run_checkpoint, run_attacks
from attacks.runner.config import EXECUTION_KEYS, STEPS_KINDS, default_attack_table, stored_table
from attacks.runner.presets import PRESETS, preset_table
from robustness.analysis.distances import median_distance
from robustness.findings.headline import ModelCheckSummary
from robustness.core.config import load_config_file, overridden, parse_dotted
from robustness.core.errors import ConfigError
from robustness.core.errors import RunDirError
from robustness.core.rundir import RunDir
from models.routing import GRAD_MODES, routing_gradient
from robustness.core.vocab import ATTACK_GATE_MODES, HEADS, NORMS, format_distance, format_eps
from robustness.data import DatasetInfo
from robustness.data.subset import SUBSET_RULES
from robustness.app.eps_grid import attack_runs, check_auto

__all__ = ["register", "run", "run_attacks", "config_from_args", "parse_setting", "summary_table"]

log = logging.getLogger(__name__)


def _own_steps() -> str:
    """``pgd 50, apgd-ce 100, ...``: the default ``steps`` of every registered attack ``--steps`` sets, read from
    the registry (the help text never drifts from the defaults)."""
    seen: dict[str, int] = {}
    for name in known_attacks():
        for backend in backends_for(name):
            cls = attack_class(name, backend)
            steps = getattr(cls.Params(), "steps", None) if cls.kind in STEPS_KINDS else None
            if steps is not None and name not in seen:
                seen[name] = int(steps)
    return ", ".join(f"{name} {steps}" for name, steps in seen.items())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack",
                       description="Attack the model of RUN_DIR and write per-sample records to "
                                   "RUN_DIR/attacks/. Flags override --preset, which overrides the [attack] table "
                                   "of --config. Without --config, attack measures what `dsn-robust run` does: the "
                                   "[attack] table of configs/quickstart.toml (less device, threads, workers); the "
                                   "defaults below are those of keys that table does not set. --resume continues "
                                   "with the settings stored in the run.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory")
    aliases = "; ".join(f"{a} = {' and '.join(m)}" for a, m in ATTACK_ALIASES.items())
    p.add_argument("--attacks", help=f"comma list of {','.join(known_attacks() + list(ATTACK_ALIASES))} "
                                     f"({aliases}; every registered attack, plug-ins included)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a named set of attacks: autoattack (torchattacks' AutoAttack, routing gradients none and "
                        "sharp), full (the suite at full strength)")
    p.add_argument("--eps", help="comma list of budgets in [0,1] pixel units, e.g. 1/255,2/255,4/255,8/255, or "
                                 "auto: first the minimal-perturbation attacks, then a grid at the 25/50/75%% "
                                 "quantiles of the model's minimal distances")
    p.add_argument("--norm", choices=list(NORMS), help="threat model (default linf)")
    p.add_argument("--cw-eps", dest="cw_eps", help="L2 budgets at which the minimal-norm attacks (DDN, CW) are "
                                                   "scored when --norm is linf (default 0.25,0.5,1.0; also inf)")
    p.add_argument("--backend", help=f"comma list, in order of preference, of {','.join(known_backends())} (each "
                                     "attack runs in the first that has it; default all three), or both (both "
                                     "libraries, each attack in every one that has it)")
    p.add_argument("--gate-mode", dest="gate_modes", help=f"comma list of {','.join(ATTACK_GATE_MODES)} (default hard)")
    p.add_argument("--gate-grad", dest="gate_grads",
                   help="comma list of routing gradients (what the attacker differentiates through hard gates; "
                        "every registered one, plug-ins included): "
                        + "; ".join(f"{g} = {routing_gradient(g).summary}" for g in GRAD_MODES).replace("%", "%%"))
    p.add_argument("--target", choices=list(HEADS), help="head under attack (default fine)")
    p.add_argument("--n", type=int, help="number of test samples")
    p.add_argument("--subset", choices=list(SUBSET_RULES),
                   help="which n test images: stratified (default: as equal per fine class as the test split "
                        "allows, drawn with --subset-seed; the same images for every model and seed compared) or "
                        "first (the first n test images, as published \"first n\" evaluations such as "
                        "RobustBench's do); the manifest records the indices and a hash of the images; --resume "
                        "keeps the stored rule")
    p.add_argument("--subset-seed", dest="subset_seed", type=int, metavar="N",
                   help="seed of the stratified selection (default 0); not --seed, which seeds the attacks: keep "
                        "it for every model and training seed of a comparison")
    p.add_argument("--batch-size", dest="batch_size", type=_batch_size_arg,
                   help="images per batch, or auto: the largest batch that fits on a GPU (80%% of its free memory, "
                        "measured), equal batches of at most 128 on a CPU; a resumed run keeps the size its records "
                        "were made with")
    p.add_argument("--device", help="auto, cpu or cuda (default auto)")
    p.add_argument("--seed", type=int, help="seed of the attacks' random choices (default 0; the images': "
                                            "--subset-seed)")
    p.add_argument("--steps", type=int, help="iterations of every iterative and compute attack (default: each its "
                                             f"own: {_own_steps()})")
    p.add_argument("--restarts", type=int, metavar="N", help="PGD restarts per loss (the same as --set "
                                                               "pgd.restarts=N)")
    p.add_argument("--threads", type=int, help="torch CPU threads while attacking (default 0: torch's default; 1 is "
                                               "many times faster for small models on a busy CPU)")
    p.add_argument("--workers", type=int, help="processes that share the batches on a CPU (default 1; needs at "
                                               "least that many batches: lower --batch-size)")
    p.add_argument("--eot-samples", dest="eot_samples", type=int, help="gate draws per EOT forward (default 8)")
    p.add_argument("--set", dest="set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="one parameter of one attack, e.g. pgd.restarts=5 or pgd.losses=[\"ce\"] (VALUE is read "
                        "as TOML; repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run's attack records with the settings they were made with: flags and "
                        "--config may restate them or add evaluations (attacks, budgets, routing gradients) but "
                        "not change how the stored ones ran; --device, --threads, --workers may change")
    p.add_argument("--force", action="store_true", help="delete the run's attack records first")
    p.add_argument("--transfer-from", dest="transfer_from", metavar="OTHER_RUN",
                   help="craft the examples on OTHER_RUN's model, score them on RUN_DIR's")
    p.add_argument("--model-file", dest="model_file", metavar="FILE.py[:FUNCTION]",
                   help="attack your own architecture: FUNCTION (default build) of FILE.py, or an entry point of "
                        "the group dsn_robustness.models, builds the torch.nn.Module (a plain classifier or a gated "
                        "model, see the README); needs --weights and --dataset; RUN_DIR receives the records")
    p.add_argument("--weights", metavar="W.pt", help="with --model-file: the module's state_dict (read with "
                                                     "weights_only=True)")
    p.add_argument("--dataset", help="with --model-file: the dataset whose test split is attacked "
                                     "(see `dsn-robust datasets`)")
    p.add_argument("--data-root", dest="data_root", metavar="DIR", help="with --model-file: the dataset's folder")
    p.add_argument("--allow-unfaithful", dest="allow_unfaithful", action="store_true",
                   help="with --model-file: attack the model even when its adapted forward does not reproduce its "
                        "own forward (see `dsn-robust check-model`); the report says so")
    p.add_argument("--config", help="TOML file whose [attack] table supplies defaults (default: the [attack] "
                                    "table `dsn-robust run` uses, configs/quickstart.toml, less device, threads "
                                    "and workers)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(handler=run)


def _batch_size_arg(text: str) -> int | str:
    """``--batch-size``: a number as an int, anything else as given (AttackConfig accepts ``auto`` and turns the
    rest into a one-line ConfigError)."""
    try:
        return int(text)
    except ValueError:
        return text


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, subtables (``[attack.<name>]``) merged key by key."""
    out = dict(base)
    for key, value in top.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_from_args(args: argparse.Namespace, stored: dict[str, Any] | None = None) -> AttackConfig:
    """The AttackConfig of the [attack] table of ``args.config`` (without one:
    :func:`attacks.runner.config.default_attack_table`; on top of ``stored``, a manifest's config, when given) with
    the flags given on top."""
    path = getattr(args, "config", None)
    table = load_config_file(path).get("attack", {}) if path else {} if stored is not None else default_attack_table()
    if stored is not None:
        table = _merged(stored_table(stored), table)
    if getattr(args, "preset", None):
        table = {**table, **preset_table(args.preset), "preset": args.preset}
    base = AttackConfig.from_table(table, where=f"[attack] in {args.config}" if getattr(args, "config", None)
                                   else "attack config")
    backend = getattr(args, "backend", None)
    flags = {name: getattr(args, name, None) for name in
             ("attacks", "eps", "norm", "cw_eps", "gate_modes", "gate_grads", "target", "n", "subset", "subset_seed",
              "batch_size", "device", "seed", "steps", "eot_samples", "threads", "workers")}
    flags["backends"] = backend
    settings = [parse_setting(text) for text in getattr(args, "set", None) or []]
    restarts = getattr(args, "restarts", None)
    if restarts is not None:  # --restarts N is --set pgd.restarts=N
        if any(key == "restarts" and "pgd" in ATTACK_ALIASES.get(attack, [attack]) for attack, key, _ in settings):
            raise ConfigError("--set pgd.restarts and --restarts both set pgd's restarts; keep one")
        settings.append(("pgd", "restarts", restarts))
    if settings:
        params = {name: dict(values) for name, values in base.params.items()}
        for attack, key, value in settings:
            for name in ATTACK_ALIASES.get(attack, [attack]):
                params.setdefault(name, {})[key] = value
        flags["params"] = params
    try:
        return overridden(base, **flags)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def stored_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """With ``--resume``, the config the run's records were made with (None: nothing stored to continue)."""
    if not getattr(args, "resume", False):
        return None
    manifest = RunDir.at(args.run_dir).read_manifest() or {}
    if args.transfer_from:
        return (manifest.get("transfer_configs") or {}).get(RunDir.at(args.transfer_from).name)
    return manifest.get("config")


#: Settings that choose which evaluations run, not how one runs: on --resume they may change, adding evaluations
#: beside the stored ones (each evaluation's shards carry its own fingerprint, so an evaluation that ran before and
#: is asked for with other budgets or parameters is still refused by the runner)
PLAN_KEYS = ("attacks", "eps", "cw_eps", "distance_norms", "backends", "cross_check", "gate_modes", "gate_grads",
             "norm", "target", "preset", "minimal_check", "cascade")


def resume_config(args: argparse.Namespace) -> AttackConfig | None:
    """The config ``--resume`` continues (the stored one; RunDirError naming every setting the flags or
    ``--config`` change), or None when there is nothing stored."""
    stored = stored_config(args)
    if stored is None:
        return None
    before = AttackConfig.from_table(stored_table(stored), where=f"the stored attack config of {args.run_dir}")
    config = config_from_args(args, stored)
    old, new = _flat(before.to_dict()), _flat(config.to_dict())
    ran = set(before.attacks)
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in dict.fromkeys([*old, *new])
               if old.get(k) != new.get(k) and k not in EXECUTION_KEYS and k not in PLAN_KEYS
               and (k.partition(".")[0] in ran or "." not in k)]
    if changed:
        raise RunDirError(f"{args.run_dir}: --resume continues its records with their stored settings, and these "
                          f"differ: {', '.join(changed)}; drop those flags to continue, or pass --force to start "
                          f"over")
    return config


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested ``params`` as dotted keys (``pgd.steps``), so a difference names the parameter."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = key if prefix in ("", "params") else f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name))
        else:
            out[name] = value
    return out


def keep_stored_subset(args: argparse.Namespace, config: AttackConfig) -> AttackConfig:
    """With ``--resume`` and nothing stored to continue (the first ``--transfer-from`` into attacked records):
    ``config`` on the images the run's records were made on (its manifest's subset rule and seed) unless a flag or
    ``--config`` chooses them (the runner refuses other images)."""
    if not getattr(args, "resume", False):
        return config
    subset = (RunDir.at(args.run_dir).read_manifest() or {}).get("subset")
    if not isinstance(subset, dict) or subset.get("rule") not in SUBSET_RULES:
        return config
    table = load_config_file(args.config).get("attack", {}) if getattr(args, "config", None) else {}
    keep = {}
    if getattr(args, "subset", None) is None and "subset" not in table:
        keep["subset"] = subset["rule"]
    if getattr(args, "subset_seed", None) is None and "subset_seed" not in table and subset.get("seed") is not None:
        keep["subset_seed"] = subset["seed"]
    return dataclasses.replace(config, **keep) if keep else config


def run(args: argparse.Namespace) -> int:
    config = resume_config(args) or keep_stored_subset(args, config_from_args(args))
    if args.model_file or args.weights or args.dataset or args.data_root:
        print(summary_table(_attack_model_file(args, config)))
        return 0
    if config.eps_auto:
        if args.transfer_from:
            raise ConfigError("--eps auto chooses the grid from this run's own minimal distances; with "
                              "--transfer-from give the budgets (e.g. the grid its white-box run chose)")
        check_auto(config, load_run_checkpoint(RunDir.at(args.run_dir)).build_model().is_gated)
        name = Path(args.run_dir).name
        _, results = attack_runs({name: Path(args.run_dir)}, {name: config}, name, resume=args.resume,
                                 force=args.force, progress=args.progress)
        result = results[name]
    else:
        result = run_attacks(args.run_dir, config, resume=args.resume, transfer_from=args.transfer_from,
                             progress=args.progress, force=args.force)
    print(summary_table(result))
    return 0


def _attack_model_file(args: argparse.Namespace, config: AttackConfig) -> AttackResult:
    """``--model-file``: build the user's module from its file (or entry point) with ``--weights``, and attack it
    on ``--dataset``'s test split through the Python API's code path (:func:`robustness.app.api.run_evaluation`)."""
    from models.model_file import build_from_spec
    from robustness.app.api import run_evaluation
    from robustness.data import load_dataset

    if not args.model_file:
        raise ConfigError("--weights, --dataset and --data-root go with --model-file; a trained run is attacked on "
                          "the test data it was trained on")
    if args.transfer_from:
        raise ConfigError("--transfer-from attacks a trained run; with --model-file craft on that run instead")
    if not args.weights or not args.dataset:
        raise ConfigError("--model-file needs --weights W.pt (the module's state_dict) and --dataset NAME (the "
                          "test data to attack it on)")
    test = load_dataset(args.dataset, "test", root=args.data_root)
    model = build_from_spec(args.model_file, args.weights, derived=dataset_options(test.info))
    results = run_evaluation(model, test, config, out=args.run_dir, resume=args.resume, force=args.force,
                             progress=args.progress, allow_unfaithful=args.allow_unfaithful)
    return AttackResult(results.run_dir, results.manifest, results.records)


def dataset_options(info: DatasetInfo) -> dict[str, Any]:
    """What a model file's factory may ask of the data it is attacked on (``num_classes``, ``image_size``, ...)."""
    return {"num_classes": info.num_fine, "num_fine": info.num_fine, "num_coarse": info.num_coarse,
            "image_size": info.image_size, "in_channels": info.channels}


def parse_setting(text: str) -> tuple[str, str, Any]:
    """``"pgd.restarts=5"`` -> ``("pgd", "restarts", 5)``: the grammar and the value of ``run``'s ``--set``
    (:func:`robustness.core.config.parse_dotted`), its first part an attack name."""
    (attack, *key), value = parse_dotted(text, "ATTACK.KEY", "pgd.restarts=5")
    return attack.lower(), ".".join(key), value


def summary_table(result: AttackResult) -> str:
    """Clean accuracy, robust accuracy (%) per evaluation and eps, and the worst case per eps, as plain text; the
    minimal distances are the run's analysis's (:func:`robustness.findings.run.analyse`)."""
    from robustness.findings.run import analyse
    from robustness.results import RunResults

    df = result.records
    if df.empty:
        return "no attack records"
    found = analyse(RunResults(result.run_dir, result.run_dir.name, df, result.manifest or {}))
    check = ModelCheckSummary.of((result.manifest or {}).get("model_check") or {})
    lines = [check.warning] if check and check.warning else []
    for (mode, target, source), g in df.groupby(["gate_mode", "target", "source_run"], sort=False, observed=True):
        clean = g.drop_duplicates("sample")["clean_correct"].mean()
        where = f"{target} head, gates {mode}" + (f", crafted on {source}" if source else "")
        lines.append(f"{result.run_dir.name}: clean accuracy {100 * clean:.1f}% ({where}, n={g['sample'].nunique()})")
        for norm, h in g.groupby("norm", sort=False, observed=True):
            table = (h.groupby(["attack", "backend", "gate_grad", "eps"], observed=True)["robust"].mean()
                     .mul(100).unstack("eps"))
            table.columns = [format_eps(e, str(norm)) for e in table.columns]
            table.index.names = ["attack", "backend", "grad"]
            note = (" (attack cascade: each attack ran on what the attacks before it in the menu left robust, so its "
                    "number includes their finds)" if carried(h).any() else "")
            lines.append(f"robust accuracy (%), {norm} budgets{note}:")
            lines.append(table.to_string(float_format=lambda v: f"{v:.1f}", na_rep="-"))
        rows = accuracy_rows(g)
        if not rows.empty:
            worst = worst_case(rows)
            acc = worst.groupby(["norm", "eps"], observed=True)["robust"].mean().mul(100)
            cells = ", ".join(f"{norm} {format_eps(e, str(norm))}: {v:.1f}%" for (norm, e), v in acc.items())
            lines.append(f"worst case over attacks: {cells}")
        keys = {"gate_mode": mode, "target": target}
        dist, by_grad = found.minimal_in(**keys), found.minimal_in(True, **keys)
        if source:  # minimal distances are white-box only: a group crafted on another run has none
            dist, by_grad = dist.iloc[:0], by_grad.iloc[:0]
        for (norm, grad), d in by_grad.groupby(["norm", "gate_grad"]):
            lines.append(f"median minimal {norm} distance ({grad}): "
                         f"{format_distance(median_distance(d, n_boot=0).estimate, str(norm))}")
        for norm, d in dist.groupby("norm"):
            lines.append(f"median minimal {norm} distance, minimum over routing gradients: "
                         f"{format_distance(median_distance(d, n_boot=0).estimate, str(norm))} "
                         f"({int(d['found'].sum())} of {int(d['clean_correct'].sum())} clean-correct samples fooled)")
        for name in [a for a in g["attack"].unique() if attack_kind(str(a)) == COMPUTE]:
            slow = g[g["attack"] == name]
            means = slow.groupby("eps", observed=True)[["adv_macs", "clean_macs"]].mean()
            ratio = means["adv_macs"] / means["clean_macs"].clip(lower=1e-12)
            lines.append(f"{name}, mean MACs attacked/clean: "
                         + ", ".join(f"x{v:.3f} at {format_eps(e, str(slow['norm'].iloc[0]))}"
                                    for e, v in ratio.items()))
        lines.append("")
    return "\n".join(lines).rstrip()
