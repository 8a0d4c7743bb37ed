"""What a person reads: the metrics table (CSV, Markdown, terminal), PNG plots, one HTML page."""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path

import numpy as np

from guardprob.evaluation.analysis import Analysis

COLUMNS = ("micro_f1", "macro_f1", "hamming", "micro_roc_auc", "macro_roc_auc", "micro_pr_auc", "macro_pr_auc", "brier", "ece")
BINARY = ("binary_f1", "binary_roc_auc", "binary_pr_auc", "binary_brier")
SHORT = {
    "micro_f1": "uF1", "macro_f1": "MF1", "hamming": "Hamm", "micro_roc_auc": "uAUC", "macro_roc_auc": "MAUC",
    "micro_pr_auc": "uAP", "macro_pr_auc": "MAP", "brier": "Brier", "ece": "ECE", "binary_f1": "bin F1",
    "binary_roc_auc": "bin AUC", "binary_pr_auc": "bin AP", "binary_brier": "bin Brier",
}


def table_rows(analysis: Analysis) -> list[dict]:
    """One row per estimator and stage (before: raw at 0.5; after: fitted on the dev part)."""
    rows = []
    for name, r in analysis.results.items():
        for stage, m in (("raw", r.before), ("fitted", r.after)):
            row = {"estimator": name, "stage": stage, **m.row()}
            if r.binary is not None:
                row.update(r.binary.row())
            rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    return ["estimator", "stage", *COLUMNS, *(c for c in BINARY if any(c in r for r in rows))]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown(rows: list[dict]) -> str:
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, float("nan"))) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = _columns(rows)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    table = Table(title=title, title_justify="left", padding=(0, 1))
    for c in cols:
        table.add_column(SHORT.get(c, c), justify="left" if c in ("estimator", "stage") else "right")
    for r in rows:
        table.add_row(*(_fmt(r.get(c, float("nan"))) for c in cols))
    console.print(table)
    console.print("stage raw: raw scores at 0.5 (selection: top-1); fitted: calibrated scores, dev-fitted thresholds (selection: dev-fitted switch). u = micro, M = macro, AP = PR-AUC.")


# -- plots --------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(analysis: Analysis, path: Path) -> Path:
    """Reliability diagrams of every category score pooled, before and after calibration."""
    from sklearn.calibration import calibration_curve

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    y = analysis.y_test.ravel()
    for ax, attr, title in ((axes[0], "test_raw", "raw scores"), (axes[1], "test_calibrated", "after dev-part calibration")):
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        for name, r in analysis.results.items():
            p = np.clip(getattr(r, attr).ravel(), 0, 1)
            if 0 < y.sum() < y.size:
                frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
                ax.plot(mean, frac, marker="o", ms=3, label=name)
        ax.set(title=f"Reliability ({title})", xlabel="predicted probability", xlim=(0, 1), ylim=(0, 1))
    axes[0].set_ylabel("fraction positive")
    _legend(axes[1], loc="upper left")
    return _save(fig, plt, path)


def plot_curves(analysis: Analysis, path: Path, kind: str) -> Path:
    """Micro-averaged ROC or precision-recall curves, one line per estimator (test part)."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    y = analysis.y_test.ravel()
    for name, r in analysis.results.items():
        s = r.test_raw.ravel()
        if not 0 < y.sum() < y.size:
            continue
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.2f})")
        else:
            precision, recall, _ = precision_recall_curve(y, s)
            ax.step(recall, precision, where="post", label=f"{name} (AP {r.before.micro_pr_auc:.2f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.set(title="ROC, micro-averaged over categories", xlabel="false positive rate", ylabel="true positive rate")
    else:
        ax.set(title="Precision-recall, micro-averaged", xlabel="recall", ylabel="precision")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    _legend(ax, loc="lower right" if kind == "roc" else "lower left")
    return _save(fig, plt, path)


def plot_f1(analysis: Analysis, path: Path) -> Path:
    """Per-category F1 on the test part with the dev-fitted thresholds, one bar per estimator."""
    plt = _pyplot()
    ids = analysis.ids
    names = list(analysis.results)
    fig, ax = plt.subplots(figsize=(min(16, max(8, 0.9 * len(ids))), 4.8))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(ids))
    for i, name in enumerate(names):
        f1 = [analysis.results[name].after.per_category[cid]["f1"] for cid in ids]
        ax.bar(x + i * width - 0.4 + width / 2, f1, width, label=name)
    support = [int(analysis.y_test[:, j].sum()) for j in range(len(ids))]
    ax.set_xticks(x, [f"{cid}\n(n={n})" for cid, n in zip(ids, support)], fontsize=8)
    ax.set(title="Per-category F1 (test part, dev-fitted thresholds)", ylabel="F1", ylim=(0, 1.05))
    _legend(ax, fontsize=7, ncol=min(len(names), 5), loc="upper right")
    return _save(fig, plt, path)


def _legend(ax, fontsize: int = 8, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, **kwargs)
    else:
        ax.text(0.5, 0.5, "no positive and negative labels\nin the test part", ha="center", va="center", transform=ax.transAxes)


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_overview(plots: dict[str, Path], path: Path, title: str) -> Path:
    """The four plots on one page (for a README or a slide)."""
    import matplotlib.image as mpimg

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(16, 10), gridspec_kw={"width_ratios": [1.3, 1]})
    for ax, key in zip(axes.ravel(), ("reliability", "roc", "f1", "pr")):
        ax.imshow(mpimg.imread(plots[key]))
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, plt, path)


def write_plots(analysis: Analysis, out: Path, title: str = "guardprob eval") -> dict[str, Path]:
    plots = {
        "reliability": plot_reliability(analysis, out / "reliability.png"),
        "roc": plot_curves(analysis, out / "roc.png", "roc"),
        "pr": plot_curves(analysis, out / "pr.png", "pr"),
        "f1": plot_f1(analysis, out / "f1_per_category.png"),
    }
    plots["overview"] = plot_overview(plots, out / "overview.png", title)
    return plots


def write_html(rows: list[dict], analysis: Analysis, plots: dict[str, Path], path: Path, title: str, summary: list[str]) -> Path:
    cols = _columns(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, float('nan'))))}</td>" for c in cols) + "</tr>" for r in rows)
    images = "".join(
        f'<figure><img src="{p.name}" alt="{html.escape(k)}"><figcaption>{html.escape(k)}</figcaption></figure>' for k, p in plots.items()
    )
    items = "".join(f"<li>{html.escape(s)}</li>" for s in [*summary, *analysis.notes])
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}
figure{{display:inline-block;margin:1em}}img{{max-width:560px}}</style></head>
<body><h1>{html.escape(title)}</h1><ul>{items}</ul>
<h2>Test-part metrics</h2><p>raw: raw scores at threshold 0.5 (selection baselines: always top-1);
fitted: calibrators, thresholds and switch thresholds fitted on the development part.</p>
<table><tr>{head}</tr>{body}</table><h2>Plots</h2>{images}</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path
