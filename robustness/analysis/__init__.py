"""Analysis of attack records: pure functions from records (``attacks.records`` contract) to frames and intervals.

- :mod:`~robustness.analysis.stats`: Wilson and bootstrap intervals, association with success, paired differences.
- :mod:`~robustness.analysis.selection`: white-box rows, rows that count for accuracy, the figures' attack family.
- :mod:`~robustness.analysis.summary`: the per-evaluation summary, one registered function per metric.
- :mod:`~robustness.analysis.metrics`: gate-path distances, block rates, robust accuracy and worst case, compute
  saved.
- :mod:`~robustness.analysis.transfer`: the transfer matrix.
- :mod:`~robustness.analysis.pivot`: a report's scope (deployed gate mode, head), the attack x eps pivot of robust
  accuracy and the compute attacks' table.
- :mod:`~robustness.analysis.distances`: minimal distances and robustness curves.
- :mod:`~robustness.analysis.verdict`: the one rule that turns an effect and its test into a finding.

What a run or a comparison concludes (a run's analysis, the headline, the comparison) reads the sanity checks too,
which build on this package: it lives one floor up, in :mod:`robustness.findings`.
"""
from robustness.analysis.metrics import (
    WORST_KEYS,
    block_rates,
    compute_saved,
    hamming_distance,
    is_gated,
    jaccard_distance,
    path_distances,
    path_matrix,
    robust_accuracy_table,
    worst_case_accuracy,
)
from robustness.analysis.pivot import (
    COMPUTE_COLUMNS,
    PIVOT_COLUMNS,
    WORST_ROW,
    accuracy_pivot,
    compute_attack_table,
    headline_scope,
    scoped,
)
from robustness.analysis.selection import (
    DEPLOYED_MODE,
    accuracy_rows,
    deployed_mode,
    primary_evaluation,
    select,
    strongest_per_sample,
    whitebox,
)
from robustness.analysis.stats import (
    PAIR_KEYS,
    Interval,
    association,
    auroc,
    bootstrap,
    bootstrap_many,
    bootstrap_mean,
    paired_difference,
    pointbiserial,
    wilson_interval,
)
from robustness.analysis.summary import (
    SUMMARY_COLUMNS,
    Evaluation,
    register_metric,
    summarize,
    summarize_group,
    unregister_metric,
)
from robustness.analysis.transfer import TRANSFER_KEYS, transfer_matrix

__all__ = [
    "COMPUTE_COLUMNS", "DEPLOYED_MODE", "PIVOT_COLUMNS", "WORST_ROW", "accuracy_pivot", "compute_attack_table",
    "deployed_mode", "headline_scope", "scoped",
    "PAIR_KEYS", "SUMMARY_COLUMNS", "TRANSFER_KEYS", "WORST_KEYS", "Evaluation", "Interval", "accuracy_rows",
    "association", "auroc", "block_rates", "bootstrap", "bootstrap_many", "bootstrap_mean", "compute_saved",
    "hamming_distance", "is_gated", "jaccard_distance", "paired_difference", "path_distances", "path_matrix",
    "pointbiserial", "primary_evaluation", "register_metric", "robust_accuracy_table", "select",
    "strongest_per_sample", "summarize", "summarize_group", "transfer_matrix", "unregister_metric", "whitebox",
    "wilson_interval", "worst_case_accuracy",
]
