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

from robustness.analysis import path_distances  # noqa: E402
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


def _eps_ticks(ax, eps: Sequence[float]) -> None:
    eps = sorted(set(float(e) for e in eps))
    ax.set_xticks(eps)
    ax.set_xticklabels([format_eps(e) for e in eps], rotation=45 if len(eps) > 5 else 0, fontsize=8)


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
        _eps_ticks(ax, sub["eps"])
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
        ax.set_xticklabels([format_eps(e) for e in eps], fontsize=8)
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
    ax.set_xticklabels([format_eps(e) for e in eps], fontsize=8)
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
    ax.set_xticklabels([format_eps(e) for e in eps], fontsize=8)
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
    ax.set_xticklabels([format_eps(e) for e in s["eps"]], fontsize=8)
    ax.set_xlabel("eps")
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(title or "Success with vs without path change (95% Wilson)"), fontsize=9)
    return _png(fig)


def plot_compute_vs_robust(points: pd.DataFrame, title: str = "") -> bytes | None:
    """Scatter of compute saved (%) against robust accuracy (%), one labelled point per variant (``points`` has
    ``variant``, ``compute_saved``, ``robust_acc``); None without a finite point."""
    if points is None or points.empty:
        return None
    p = points[np.isfinite(points["compute_saved"].astype(float)) & np.isfinite(points["robust_acc"].astype(float))]
    if p.empty:
        return None
    fig, axes = _figure(1)
    ax = axes[0]
    ax.scatter(100 * p["compute_saved"], 100 * p["robust_acc"], s=40)
    for _, r in p.iterrows():
        ax.annotate(str(r["variant"]), (100 * r["compute_saved"], 100 * r["robust_acc"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("compute saved vs all blocks executed (%)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_xlim(min(-5.0, 100 * p["compute_saved"].min() - 5), max(50.0, 100 * p["compute_saved"].max() + 10))
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(_title(title or "Compute saved vs robust accuracy"), fontsize=9)
    return _png(fig)
