"""Comparison report: certified-accuracy curves, attack bars, example grids and a Markdown table.

Framework-free (NumPy and matplotlib's object API, no pyplot state): it turns the numbers that the
evaluation callbacks logged and the per-image certification TSVs (locuslab/smoothing format) into
``report.md`` and PNG figures.
"""

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def read_certify_tsv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a certification TSV (``idx label predict radius correct time``) as numbers."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file, delimiter="\t")
        return [
            {k: float(v) for k, v in row.items() if k != "time"}
            for row in reader
            if row.get("correct") not in (None, "")
        ]


def certified_accuracy(rows: Sequence[Mapping[str, float]], radii: Sequence[float]) -> np.ndarray:
    """Fraction of images certified correct with radius at least r, for each r (Cohen et al. Fig. 1).

    An image counts at radius r when its prediction is correct and its certified radius >= r
    (abstentions have radius 0 and are never correct).
    """
    if not rows:
        return np.zeros(len(radii))
    radius = np.array([row["radius"] for row in rows])
    correct = np.array([row["correct"] for row in rows]) > 0
    return np.array([float(np.mean(correct & (radius >= r))) for r in radii])


def average_certified_radius(rows: Sequence[Mapping[str, float]]) -> float:
    """Mean certified radius, counting 0 for wrong or abstained images (Zhai et al. 2020)."""
    if not rows:
        return 0.0
    return float(np.mean([row["radius"] * (row["correct"] > 0) for row in rows]))


def plot_certified_curves(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> Figure:
    """Certified accuracy against L2 radius, one line per model."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    top = max(
        (max((r["radius"] for r in rows), default=0.0) for rows in curves.values()), default=0
    )
    grid = np.linspace(0.0, max(top * 1.05, 0.5), 200)
    for name, rows in curves.items():
        ax.plot(grid, certified_accuracy(rows, grid), label=f"{name} (n={len(rows)})")
    ax.set_xlabel("L2 radius (pixel space, [0, 1] images)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_attack_bars(accuracies: Mapping[str, Mapping[str, float]]) -> Figure:
    """Grouped bars: accuracy (clean and under each attack) for each model."""
    models = list(accuracies)
    columns = list(dict.fromkeys(k for acc in accuracies.values() for k in acc))
    fig = Figure(figsize=(max(6, 1.3 * len(columns) * len(models) / 2), 4))
    ax = fig.subplots()
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(columns))
    for i, model in enumerate(models):
        values = [accuracies[model].get(c, np.nan) for c in columns]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=model)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, columns, rotation=20, ha="right")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_example_grid(
    clean: np.ndarray,
    adversarial: Mapping[str, np.ndarray],
    labels: Sequence[int],
    predictions: Mapping[str, Sequence[int]],
) -> Figure:
    """Rows: clean images then each attack's adversarial images, titled true/predicted label.

    Args:
        clean: Images ``(k, C, H, W)`` in [0, 1].
        adversarial: Attack name to adversarial images of the same shape.
        labels: True labels of the k images.
        predictions: Row name ("clean" and each attack) to the model's predicted labels.
    """
    rows = {"clean": clean, **adversarial}
    k = len(clean)
    fig = Figure(figsize=(1.2 * k, 1.35 * len(rows)))
    axes = fig.subplots(len(rows), k, squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(k):
            ax = axes[r][c]
            image = np.transpose(images[c], (1, 2, 0))
            ax.imshow(
                image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1
            )
            pred = predictions[name][c]
            color = "green" if pred == labels[c] else "red"
            ax.set_title(f"{labels[c]}→{pred}", fontsize=7, color=color)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    return fig


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; floats shown with 4 decimals."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if np.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
