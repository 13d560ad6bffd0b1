"""What a run and a comparison conclude, built on :mod:`robustness.analysis` (measurements), :mod:`robustness.sanity`
(masking checks) and :mod:`robustness.results` (a run's results, loaded once).

- :mod:`~robustness.findings.run`: one run's analysis, computed once per process (sanity verdicts, worst case,
  minimal distances, curves, gate statistics, headline).
- :mod:`~robustness.findings.headline`: what a run's report opens with.
- :mod:`~robustness.findings.variant`: one side of a comparison, a (run, gate mode) pair.
- :mod:`~robustness.findings.compare`: the skip vs no-skip comparison; its guards in
  :mod:`~robustness.findings.comparability`, its fixed-eps fallback in :mod:`~robustness.findings.fixed_eps`, its
  verdict line in :mod:`~robustness.findings.compare_text`.
- :mod:`~robustness.findings.seeds`: the comparison pooled over training seeds.
- :mod:`~robustness.findings.answer`: the one-sentence answer ``run`` and ``compare`` end with.

Import each from its module: this package re-exports nothing, so importing one finding loads only what it needs.
"""
