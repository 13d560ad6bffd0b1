"""The comparison's guards: did a pair's two variants train healthily and see the same samples?

:func:`_health` reads a variant's clean accuracy (fine head, on its white-box samples), chance level and final
training test accuracy into a :class:`robustness.analysis.verdict.Health`; :func:`_same_samples` says why two
variants did not see the same samples (different attacked images, different training or attack data); and
:func:`_health_checks` turns each judged pair into the ``training health`` and ``same samples`` checks the
comparison page shows. The rule that refuses a pair is :mod:`robustness.analysis.verdict`'s; the comparison itself
is :func:`robustness.findings.compare.compare_runs`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from robustness.analysis.selection import whitebox
from robustness.findings.variant import Variant
from robustness.analysis.verdict import (CHANCE_ALPHA, MAX_CLEAN_GAP, NEAR_CHANCE_FACTOR, Health, PairVerdict,
                                         chance_level_reasons, chance_p, health_reasons, join_reasons,
                                         paired_count_reason)
from robustness.core.errors import DataError
from robustness.data.base import DatasetInfo
from robustness.sanity import Check

#: Name of the sanity check that reports each pair's training health on the comparison page.
HEALTH_CHECK = "training health"
#: Name of the check that reports whether each pair saw the same samples.
SAMPLES_CHECK = "same samples"


def _fine_clean(v: Variant) -> tuple[float | None, int]:
    """The fine head's clean accuracy on the variant's white-box samples (None without fine-head rows) and how
    many samples it counts."""
    wb = whitebox(v.records)
    wb = wb[wb["target"] == "fine"].drop_duplicates("sample")
    return (float(wb["clean_correct"].astype(bool).mean()) if len(wb) else None), len(wb)


def _health(v: Variant, clean: float) -> Health:
    fine, n = _fine_clean(v)
    return Health(label=v.label, clean=float(clean), clean_fine=fine,
                  final_fine=v.run.final_test_accuracy.get("fine"),
                  chance=v.run.chance_accuracy if fine is not None else None, run=v.run.name,
                  n=n if fine is not None else None)


#: Keys of the attack manifests' ``data`` entry (where the attacked samples came from) that name the data itself
#: (not where it lies on disk or how it was handed over).
DATA_SOURCE_KEYS: tuple[str, ...] = ("dataset", "data_options", "shape", "sha256")


def _short(value: Any, limit: int = 60) -> str:
    """A value as a reason shows it, cut to ``limit`` characters."""
    text = str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _info_differences(da: Any, db: Any) -> list[str]:
    """What differs between two manifests' ``dataset`` entries (:meth:`DatasetInfo.differences`: classes, label
    map, normalisation, image size, channels; the name is compared on its own), [] when either is not a complete
    dataset info."""
    try:
        ia, ib = DatasetInfo.from_dict(dict(da)), DatasetInfo.from_dict(dict(db))
    except (DataError, TypeError, ValueError):
        return []
    return [d for d in ia.differences(ib) if not d.startswith("dataset differs")]


def _differences(da: Any, db: Any, keys: Sequence[str] | None = None) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) for the keys both dicts give (``keys``: only those) whose values differ."""
    if not isinstance(da, Mapping) or not isinstance(db, Mapping):
        return []
    shared = [k for k in (keys if keys is not None else da) if k in da and k in db]
    return [(k, da[k], db[k]) for k in shared if da[k] is not None and db[k] is not None and da[k] != db[k]]


def _same_samples(a: Variant, b: Variant) -> list[str]:
    """Why ``a`` and ``b`` did not see the same samples: different attacked images (the subsets' sha256 when both
    runs recorded one, else their (dataset, seed, n); either way a different number of attacked samples ``n``)
    or different data (the runs' ``config.json`` dataset / data_options: trained on; the attack manifests'
    ``data`` entry (dataset, data_options) and ``dataset`` entry (classes, normalisation, image size):
    attacked on)."""
    if a.run is b.run:
        return []
    reasons = []
    na, nb = a.run.manifest.get("n"), b.run.manifest.get("n")
    counts = f"{na} vs {nb} attacked samples" if na is not None and nb is not None and na != nb else ""
    ha, hb = a.run.subset.get("sha256"), b.run.subset.get("sha256")
    if ha and hb:
        if ha != hb:
            reasons.append(f"{a.label} and {b.label} were attacked on different images ("
                           + (f"{counts}; " if counts else "") + f"subset sha256 {str(ha)[:12]} vs {str(hb)[:12]})")
        elif counts:
            reasons.append(f"{a.label} and {b.label} were attacked on different sample sets ({counts})")
    said: set[tuple[str, str]] = set()  # (a's value, b's value) pairs a reason already names
    if not (ha and hb):
        sa, sb = (a.run.dataset_name, a.run.seed, a.run.n), (b.run.dataset_name, b.run.seed, b.run.n)
        if sa != sb:
            reasons.append(f"{a.label} and {b.label} were attacked on different evaluation sets (dataset, seed, n "
                           f"{sa} vs {sb})")
            said.add((_short(sa[0]), _short(sb[0])))

    def clause(diffs: Sequence[tuple[str, Any, Any]]) -> str:
        fresh = []
        for k, va, vb in diffs:
            if (_short(va), _short(vb)) not in said:
                said.add((_short(va), _short(vb)))
                fresh.append(f"{k} {_short(va)} vs {_short(vb)}")
        return "; ".join(fresh)

    trained = clause(_differences(a.run.config, b.run.config, ("dataset", "data_options")))
    if trained:
        reasons.append(f"{a.label} and {b.label} were trained on different data ({trained})")
    names = ([("dataset", a.run.dataset_name, b.run.dataset_name)]
             if a.run.dataset_name and b.run.dataset_name and a.run.dataset_name != b.run.dataset_name else [])
    attacked = [x for x in (clause(names + _differences(a.run.manifest.get("data"), b.run.manifest.get("data"),
                                                          DATA_SOURCE_KEYS)),
                            *_info_differences(a.run.manifest.get("dataset"), b.run.manifest.get("dataset"))) if x]
    if attacked:
        reasons.append(f"{a.label} and {b.label} were attacked on different data ({'; '.join(attacked)})")
    return reasons


def _pct(x: float | None) -> str:
    return "unknown" if x is None or np.isnan(x) else f"{100 * x:.1f}%"


def _pg(p: float | None) -> str:
    return "unknown" if p is None else f"{p:.2g}"


def _health_checks(judged: Sequence[tuple[PairVerdict, tuple[Health, Health], int | None, Sequence[str]]]
                   ) -> list[Check]:
    """Per judged pair (verdict, health, samples correct on both, the :func:`_same_samples` reasons): ``training
    health`` (fail when confounded by clean accuracy or a side is at chance level) and ``same samples`` (fail when
    the pair has too few paired samples or saw different images or data), each with the numbers."""
    checks = []
    for v, (ha, hb), n, samples in judged:
        chance = ha.chance if ha.chance is not None else hb.chance
        finals = [f"{h.run} {_pct(h.final_fine)}" for h in (ha, hb) if h.final_fine is not None]
        known = [h for h in (ha, hb) if chance_p(h) is not None]
        numbers = (f"clean accuracy on the attacked samples {ha.label} {_pct(ha.clean)} vs {hb.label} "
                   f"{_pct(hb.clean)} (gap {100 * abs(ha.clean - hb.clean):.1f} points, at most "
                   f"{100 * MAX_CLEAN_GAP:g} allowed); chance {_pct(chance)}"
                   + (f" (near chance below {NEAR_CHANCE_FACTOR:g} x chance = {_pct(NEAR_CHANCE_FACTOR * chance)})"
                      if chance is not None else " (near-chance test skipped)")
                   + (f"; above chance by a one-sided binomial test (at chance unless p < {CHANCE_ALPHA:g}): "
                      + ", ".join(f"{h.label} p={_pg(chance_p(h))}" for h in known) if known else "")
                   + (f"; final training test accuracy {', '.join(dict.fromkeys(finals))}" if finals else ""))
        bad = health_reasons(ha, hb)
        at_chance = chance_level_reasons(ha, hb)
        said = (("not comparable: " + join_reasons(at_chance) + ". " if at_chance else "")
                + ("confounded: " + "; ".join(bad) + ". " if bad else ""))
        checks.append(Check(HEALTH_CHECK, "fail" if bad or at_chance else "pass",
                            f"{v.a} vs {v.b}: " + said + numbers[0].upper() + numbers[1:] + "."))
        size = f"{n} samples correct on both" if n is not None else "samples correct on both not counted"
        few = paired_count_reason(v.a, v.b, n)
        apart = [*samples, *([few] if few else [])]
        checks.append(Check(SAMPLES_CHECK, "fail" if apart else "pass",
                            f"{v.a} vs {v.b}: " + (f"not comparable: {join_reasons(apart)}." if apart
                                                   else f"the same attacked samples, {size}.")))
    return checks
