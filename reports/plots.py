"""Matplotlib figures (Agg, no display) returned as PNG bytes.

Every function returns ``None`` when its figure does not apply (no gated paths, no matching rows); the report
then says why instead of showing a figure.
"""
from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before anything touches a backend; we never open a window

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from robustness.analysis import path_distances  # noqa: E402
from robustness.core.norms import norm_for  # noqa: E402
from robustness.core.vocab import format_eps  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_DPI = 100


def _figure(n_panels: int = 1, width: float = 5.0, height: float = 3.6, max_cols: int = 3) -> tuple[Figure, list]:
    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _title(text: str, width: int = 60) -> str:
    return "\n".join(textwrap.wrap(text, width)) if text else ""


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})
    return buf.getvalue()


def _eps_label(eps: float, norm: str = "linf") -> str:
    """A budget in its norm's units (``format_eps``): L-inf as k/255, L2 (or a norm this version does not know) as
    a plain decimal (an L2 budget is no fraction of 255)."""
    return format_eps(eps, norm)


def _labels(frame: pd.DataFrame, eps: Sequence[float]) -> list[str]:
    """Tick labels of ``eps`` in the units of ``frame``'s norm (/255 for L-inf)."""
    norms = set(frame["norm"].astype(str)) if "norm" in frame.columns else set()
    return [_eps_label(e, norms.pop() if len(norms) == 1 else "linf") for e in eps]


def _eps_ticks(ax, eps: Sequence[float], norm: str = "linf") -> None:
    eps = sorted(set(float(e) for e in eps))
    ax.set_xticks(eps)
    ax.set_xticklabels([_eps_label(e, norm) for e in eps], rotation=45 if len(eps) > 5 else 0, fontsize=8)


def plot_accuracy_curves(table: pd.DataFrame, line: str = "label", panel: str = "panel",
                         highlight: str | None = "worst case", title: str = "Robust accuracy vs eps") -> bytes | None:
    """Robust accuracy against eps: one panel per ``panel`` value, one line per ``line`` value.

    ``table`` needs ``eps`` and ``robust_acc`` (optionally ``robust_acc_low``/``_high`` drawn as a band); rows with
    infinite eps are left out. The line named ``highlight`` is drawn thick and black.
    """
    if table is None or table.empty:
        return None
    table = table[np.isfinite(table["eps"].astype(float))]
    if table.empty:
        return None
    panels = list(dict.fromkeys(table[panel]))
    fig, axes = _figure(len(panels), width=4.6)
    for ax, name in zip(axes, panels):
        sub = table[table[panel] == name]
        for label, g in sub.groupby(line, sort=True):
            g = g.sort_values("eps")
            strong = label == highlight
            (ln,) = ax.plot(g["eps"], 100 * g["robust_acc"], marker="o", ms=3, label=str(label),
                            color="black" if strong else None, lw=2.5 if strong else 1.2, ls="--" if strong else "-")
            if "robust_acc_low" in g and g["robust_acc_low"].notna().all():
                ax.fill_between(g["eps"], 100 * g["robust_acc_low"], 100 * g["robust_acc_high"], alpha=0.1,
                                color=ln.get_color(), lw=0)
        norms = set(sub["norm"].astype(str)) if "norm" in sub.columns else {"linf"}
        _eps_ticks(ax, sub["eps"], norms.pop() if len(norms) == 1 else "linf")
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel("eps")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def plot_flip_heatmap(rates: pd.DataFrame, title: str = "") -> bytes | None:
    """Per-block flip rates 0->1 and 1->0 as block x eps heatmaps (``rates`` from ``analysis.block_rates`` for one
    evaluation family); None when there are no gated blocks."""
    if rates is None or rates.empty:
        return None
    eps = sorted(rates["eps"].astype(float).unique())
    blocks = rates.sort_values("block_index").drop_duplicates("block_index")["block"].tolist()
    fig, axes = _figure(2, width=max(3.5, 0.9 * len(eps) + 2.5), height=max(2.5, 0.45 * len(blocks) + 1.5))
    panels = (("flip_01", "0→1 (skipped → executed)"), ("flip_10", "1→0 (executed → skipped)"))
    for ax, (col, name) in zip(axes, panels):
        grid = rates.pivot_table(index="block_index", columns="eps", values=col, aggfunc="mean")
        grid = grid.reindex(columns=eps)
        values = 100 * grid.to_numpy(float)
        ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=max(1.0, np.nanmax(values)))
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * max(1.0, np.nanmax(values)) else "black")
        ax.set_xticks(range(len(eps)))
        ax.set_xticklabels(_labels(rates, eps), fontsize=8)
        ax.set_yticks(range(len(blocks)))
        ax.set_yticklabels(blocks, fontsize=8)
        ax.set_xlabel("eps")
        ax.set_title(f"flip {name} (% of samples)", fontsize=9)
    if title:
        fig.suptitle(_title(title, 90), fontsize=10)
    return _png(fig)


def plot_hamming_by_success(records: pd.DataFrame, title: str = "") -> bytes | None:
    """Hamming distance between clean and adversarial paths of initially-correct samples, split by attack success,
    per eps (box plots); None for ungated records."""
    rec = records[records["clean_correct"].astype(bool) & (records["eps"] > 0)] if len(records) else records
    if rec.empty or not (rec["clean_path"].str.len() > 0).any():
        return None
    rec = rec.assign(hamming_=path_distances(rec["clean_path"], rec["adv_path"])["hamming"].to_numpy())
    eps = sorted(rec["eps"].astype(float).unique())
    fig, axes = _figure(1, width=max(5.0, 1.1 * len(eps) + 2))
    ax = axes[0]
    for k, (flag, color, name) in enumerate(((True, "tab:red", "success"), (False, "tab:blue", "failure"))):
        data = [rec[(rec["eps"] == e) & (rec["success"].astype(bool) == flag)]["hamming_"].to_numpy() for e in eps]
        pos = np.arange(len(eps)) + (k - 0.5) * 0.35
        keep = [i for i, d in enumerate(data) if len(d)]
        if keep:
            bp = ax.boxplot([data[i] for i in keep], positions=pos[keep], widths=0.3, patch_artist=True,
                            showfliers=False)
            for box in bp["boxes"]:
                box.set(facecolor=color, alpha=0.45)
            ax.plot(pos[keep], [np.mean(data[i]) for i in keep], "D", color=color, ms=4, label=f"{name} (mean)")
    ax.set_xticks(range(len(eps)))
    ax.set_xticklabels(_labels(rec, eps), fontsize=8)
    ax.set_xlabel("eps")
    ax.set_ylabel("Hamming distance (gates flipped)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(_title(title or "Path change by attack outcome (initially-correct samples)"), fontsize=9)
    return _png(fig)


def plot_macs(records: pd.DataFrame, slowdown: pd.DataFrame | None = None, full_macs: float | None = None,
              title: str = "") -> bytes | None:
    """Mean MACs on clean inputs, on the attacked inputs, and under the slowdown attack, per eps (bars, millions);
    None for ungated records."""
    rec = records[records["eps"] > 0] if len(records) else records
    if rec.empty or not (rec["clean_path"].str.len() > 0).any():
        return None
    eps = sorted(rec["eps"].astype(float).unique())
    series: dict[str, list[float]] = {
        "clean": [rec[rec["eps"] == e]["clean_macs"].mean() for e in eps],
        "attacked": [rec[rec["eps"] == e]["adv_macs"].mean() for e in eps],
    }
    if slowdown is not None and len(slowdown):
        series["slowdown attack"] = [slowdown[slowdown["eps"] == e]["adv_macs"].mean() for e in eps]
    fig, axes = _figure(1, width=max(5.0, 1.2 * len(eps) + 2))
    ax = axes[0]
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        x = np.arange(len(eps)) + (k - (len(series) - 1) / 2) * width
        ax.bar(x, np.asarray(values, float) / 1e6, width=width, label=name)
    if full_macs:
        ax.axhline(full_macs / 1e6, color="black", ls="--", lw=1, label="all blocks executed")
    ax.set_xticks(range(len(eps)))
    ax.set_xticklabels(_labels(rec, eps), fontsize=8)
    ax.set_xlabel("eps")
    ax.set_ylabel("mean MACs per sample (millions)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(_title(title or "Compute on clean vs attacked inputs"), fontsize=9)
    return _png(fig)


def plot_success_by_path_change(summary: pd.DataFrame, title: str = "") -> bytes | None:
    """P(success | path changed) and P(success | path unchanged) per eps with Wilson error bars (``summary`` rows of
    one evaluation family from ``analysis.summarize``); None when both are undefined everywhere."""
    if summary is None or summary.empty or not summary["gated"].astype(bool).any():
        return None
    s = summary[summary["eps"] > 0].sort_values("eps")
    cols = ("p_success_changed", "p_success_unchanged")
    if s.empty or s[list(cols)].isna().all().all():
        return None
    fig, axes = _figure(1, width=max(5.0, 1.1 * len(s) + 2))
    ax = axes[0]
    x = np.arange(len(s))
    for k, (col, name, color) in enumerate(zip(cols, ("path changed", "path unchanged"), ("tab:red", "tab:blue"))):
        p = s[col].to_numpy(float)
        err = np.vstack([p - s[f"{col}_low"].to_numpy(float), s[f"{col}_high"].to_numpy(float) - p])
        ax.errorbar(x + (k - 0.5) * 0.2, 100 * p, yerr=100 * np.nan_to_num(err), fmt="o", capsize=4, color=color,
                    label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(_labels(s, s["eps"]), fontsize=8)
    ax.set_xlabel("eps")
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(title or "Success with vs without path change (95% Wilson)"), fontsize=9)
    return _png(fig)


def _label_column(desired: Sequence[float], gap: float) -> np.ndarray:
    """Positions (axes fraction, same order as ``desired``) for labels stacked in a column: each as close to its
    desired height as it can be while neighbours stay ``gap`` apart (top-down, deterministic); a column pushed below
    the axes (centres closer than ``gap / 2`` to 0) is shifted up as far as its top label allows."""
    d = np.asarray(desired, float)
    order = np.argsort(-d, kind="stable")  # top to bottom
    pos = np.empty(len(d))
    for rank, i in enumerate(order):
        pos[i] = d[i] if rank == 0 else min(d[i], pos[order[rank - 1]] - gap)
    bottom, top = pos[order[-1]], pos[order[0]]
    if bottom < gap / 2:  # pushed below the axes: shift up, but not out of the top unless the column is too tall
        pos += min(gap / 2 - bottom, max(0.0, 1.0 - gap / 2 - top))
    return pos


def _compute_vs_robust_figure(points: pd.DataFrame, title: str = "") -> Figure | None:
    p = points[np.isfinite(points["compute_saved"].astype(float)) & np.isfinite(points["robust_acc"].astype(float))]
    if p.empty:
        return None
    fig, axes = _figure(1, width=6.4)
    ax = axes[0]
    x, y = 100 * p["compute_saved"].to_numpy(float), 100 * p["robust_acc"].to_numpy(float)
    ax.scatter(x, y, s=40, zorder=3)
    ax.set_xlabel("compute saved vs all blocks executed (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_xlim(min(-5.0, x.min() - 5), max(50.0, x.max() + 10))
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(_title(title or "Compute saved vs robust accuracy"), fontsize=9)
    # Labels sit in a column right of the axes, ordered like their points' heights, with leader lines: points of
    # nearly equal compute and accuracy (common: a model in two gate modes) would otherwise print on top of each
    # other. Label height is measured with the renderer, after a first layout pass. Labels and leader lines are
    # separate artists, so a label's window extent is its text alone.
    labels = [ax.text(1.05, 0.5, str(v), transform=ax.transAxes, fontsize=8, va="center", ha="left", clip_on=False,
                      gid="point-label") for v in p["variant"]]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes_px = ax.get_window_extent(renderer).height
    gap = 1.35 * max(t.get_window_extent(renderer).height for t in labels) / axes_px
    desired = ax.transAxes.inverted().transform(ax.transData.transform(np.column_stack([x, y])))[:, 1]
    for t, ypos, xi, yi in zip(labels, _label_column(desired, gap), x, y):
        t.set_position((1.05, float(ypos)))
        ax.annotate("", (xi, yi), xytext=(1.045, float(ypos)), textcoords="axes fraction", annotation_clip=False,
                    gid="leader-line", arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.7, "shrinkA": 0,
                                                   "shrinkB": 3})
    return fig


def plot_compute_vs_robust(points: pd.DataFrame, title: str = "") -> bytes | None:
    """Scatter of compute saved (%) against robust accuracy (%), one labelled point per variant (``points`` has
    ``variant``, ``compute_saved``, ``robust_acc``); labels never overlap (a column beside the axes with leader
    lines); None without a finite point."""
    if points is None or points.empty:
        return None
    fig = _compute_vs_robust_figure(points, title)
    return _png(fig) if fig is not None else None


def plot_compute_attacks(table: pd.DataFrame) -> bytes | None:
    """Mean MACs on clean inputs, under each compute attack, and with every block executed, per eps (one panel per
    compute attack; ``table`` from ``analysis.compute_attack_table``); None when empty."""
    if table is None or table.empty:
        return None
    attacks = list(dict.fromkeys(table["attack"]))
    n_eps = table.groupby("attack")["eps"].nunique().max()
    fig, axes = _figure(len(attacks), width=max(4.6, 0.9 * n_eps + 2.5))
    for ax, attack in zip(axes, attacks):
        t = table[table["attack"] == attack].sort_values("eps")
        x = np.arange(len(t))
        ax.bar(x - 0.2, t["clean_macs"] / 1e6, width=0.4, label="clean", color="tab:blue")
        ax.bar(x + 0.2, t["adv_macs"] / 1e6, width=0.4, label=f"under {attack}", color="tab:red")
        full = t["full_macs"].to_numpy(float)
        if np.isfinite(full).any():
            ax.axhline(np.nanmax(full) / 1e6, color="black", ls="--", lw=1, label="every block executed")
        for xi, share, top in zip(x, t["taken_back"].to_numpy(float), t["adv_macs"].to_numpy(float) / 1e6):
            if np.isfinite(share):
                ax.annotate(f"{100 * share:.0f}%", (xi + 0.2, top), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([_eps_label(e, str(t["norm"].iloc[0])) for e in t["eps"]], fontsize=8)
        ax.set_xlabel(f"eps ({t['norm'].iloc[0]})")
        ax.set_ylabel("mean MACs per sample (millions)")
        low = np.nanmin(t[["clean_macs", "adv_macs"]].to_numpy(float)) / 1e6
        ax.set_ylim(0.85 * low, 1.04 * max(np.nanmax(full) if np.isfinite(full).any() else 0,
                                           t["adv_macs"].max()) / 1e6)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
        ax.set_title(f"{attack}: share of saved compute taken back (labels)", fontsize=9)
    return _png(fig)


#: Training-curve panels: title, y label, and the metrics.csv columns each draws (those present are drawn).
TRAINING_PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Accuracy", "accuracy (%)", ("test_acc_fine", "test_acc_coarse", "train_acc_fine", "train_acc_coarse")),
    ("Skip rate per branch", "blocks skipped (%)", ("skip_coarse", "skip_fine")),
    ("Compute saved", "MACs saved (%)", ("macs_saved", "gated_macs_saved")),
)


def plot_training_curves(metrics: pd.DataFrame | None, gated: bool = True) -> bytes | None:
    """Training curves per epoch from ``metrics.csv``: accuracy, skip rate per branch and MACs saved (the last two
    only for a gated model); a panel draws the columns it finds. None when no panel has a column."""
    if metrics is None or metrics.empty:
        return None
    x = metrics["epoch"] if "epoch" in metrics.columns else pd.Series(np.arange(1, len(metrics) + 1))
    panels = [(name, ylabel, [c for c in cols if c in metrics.columns and metrics[c].notna().any()])
              for k, (name, ylabel, cols) in enumerate(TRAINING_PANELS) if gated or k == 0]
    panels = [p for p in panels if p[2]]
    if not panels:
        return None
    fig, axes = _figure(len(panels), width=4.2, height=3.2)
    for ax, (name, ylabel, cols) in zip(axes, panels):
        for c in cols:
            test = c.startswith("test_")
            ax.plot(x, 100 * metrics[c].astype(float), marker="o", ms=2.5, lw=1.4 if test else 1.0,
                    ls="-" if test or not c.startswith("train_") else ":", label=c)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Training curves (metrics.csv)", fontsize=10)
    return _png(fig)


def plot_transfer_heatmap(matrix: pd.DataFrame) -> bytes | None:
    """Transfer success as source run x target run heatmaps, one panel per (attack, norm, eps, head) at finite eps
    (``matrix`` from ``analysis.transfer_matrix``); the diagonal is the target's own white-box attack (outlined).
    A cell is the share of the target's clean-correct samples the source's examples fool, annotated in percent;
    None without transfer rows."""
    if matrix is None or matrix.empty or matrix["whitebox"].astype(bool).all():
        return None
    m = matrix[np.isfinite(matrix["eps"].astype(float))].copy()
    if m.empty:
        return None
    several = m.groupby("run")["gate_mode"].nunique()
    m["col"] = [f"{r} ({g})" if several.get(r, 1) > 1 else str(r) for r, g in zip(m["run"], m["gate_mode"])]
    order = list(dict.fromkeys([*m["source_run"], *m["run"]]))
    rows = [r for r in order if r in set(m["source_run"])]
    cols = sorted(set(m["col"]), key=lambda c: (order.index(c.split(" (")[0]), c))
    panel_keys = ["attack", "norm", "eps", "target"]
    panels = list(m.groupby(panel_keys, sort=True).groups)
    fig, axes = _figure(len(panels), width=max(3.2, 0.9 * len(cols) + 2.0), height=max(2.6, 0.55 * len(rows) + 1.6),
                        max_cols=4)
    for ax, key in zip(axes, panels):
        sub = m[(m[panel_keys] == pd.Series(dict(zip(panel_keys, key)))).all(axis=1)]
        grid = sub.pivot_table(index="source_run", columns="col", values="success_rate", aggfunc="mean")
        grid = grid.reindex(index=rows, columns=cols)
        values = 100 * grid.to_numpy(float)
        ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="Reds", vmin=0, vmax=100)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.0f}%" if np.isfinite(v) else "–", ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(v) and v > 60 else "black")
            if rows[i] == cols[j].split(" (")[0]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, fontsize=8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=8)
        ax.set_xlabel("target (attacked)")
        ax.set_ylabel("source (crafted on)")
        attack, norm, eps, target = key
        ax.set_title(f"{attack}, {norm} eps={_eps_label(eps, norm)}, {target} head", fontsize=9)
    fig.suptitle("Transfer: attack success on the target's clean-correct samples (outlined: white-box)", fontsize=10)
    return _png(fig)


def plot_robustness_curves(curves: pd.DataFrame, fixed: pd.DataFrame | None = None,
                           title: str = "Robustness curves") -> bytes | None:
    """Robust accuracy as a step function of eps per variant (``robustness.analysis.distances.robustness_curve``
    rows with a ``variant`` column), with its pointwise 95% band, and the fixed-eps worst case of each variant as
    points (``fixed``: variant, eps, robust_acc); L-inf eps in units of 1/255. A variant named ``any`` (the minimum
    over routing gradients) is drawn thick and black."""
    if curves is None or curves.empty:
        return None
    norm = str(curves["norm"].iloc[0])
    axis = norm_for(norm)
    scale, unit = axis.axis_scale, axis.axis_label
    fig, axes = _figure(1, width=7.5, height=4.4)
    ax = axes[0]
    colors = {}
    for variant, g in curves.groupby("variant", sort=False):
        g = g.sort_values("eps")
        strong = variant == "any"  # the per-sample minimum over routing gradients: the number to trust
        (ln,) = ax.step(g["eps"] * scale, 100 * g["robust_acc"], where="post", lw=2.4 if strong else 1.4,
                        label=str(variant), color="black" if strong else None)
        colors[variant] = ln.get_color()
        ax.fill_between(g["eps"] * scale, 100 * g["robust_acc_low"], 100 * g["robust_acc_high"], step="post",
                        alpha=0.12, color=ln.get_color(), lw=0)
    if fixed is not None and len(fixed):
        for variant, g in fixed.groupby("variant", sort=False):
            if variant in colors:
                ax.plot(g["eps"] * scale, 100 * g["robust_acc"], "D", ms=5, mfc="white", color=colors[variant])
        ax.plot([], [], "D", ms=5, mfc="white", color="grey", label="fixed-eps worst case")
    ax.set_xlabel(unit)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(title), fontsize=10)
    return _png(fig)
