"""Comparison report: certified-accuracy curves, attack bars, example grids and a Markdown table.

Framework-free (NumPy and matplotlib's object API, no pyplot state): it turns the numbers that the
evaluation callbacks logged and the per-image certification TSVs (locuslab/smoothing format) into
``report.md`` and PNG figures.
"""

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def certified_accuracy(
    radius: np.ndarray, correct: np.ndarray, grid: Sequence[float]
) -> np.ndarray:
    """Fraction of images certified correct with radius at least r, for each r of ``grid``.

    Cohen et al. (2019), Section 4: abstentions have radius 0 and are never correct.
    """
    if len(radius) == 0:
        return np.zeros(len(grid))
    hit = np.asarray(correct, dtype=bool)[None, :] & (
        np.asarray(radius)[None, :] >= np.asarray(grid)[:, None]
    )
    return hit.mean(axis=1)


def plot_certified_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """Certified accuracy against L2 radius, one line per model.

    Args:
        curves: Model name to ``(radius, correct)`` arrays with one entry per certified image.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    top = max((float(np.max(r, initial=0.0)) for r, _ in curves.values()), default=0.0)
    grid = np.linspace(0.0, max(top * 1.05, 0.5), 200)
    for name, (radius, correct) in curves.items():
        label = f"{name} ({len(radius)} images)"
        ax.plot(grid, certified_accuracy(radius, correct, grid), label=label)
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
