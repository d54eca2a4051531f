"""Comparison report: certified-accuracy curves, attack bars, example grids and a Markdown table.

Framework-free (NumPy and matplotlib's object API, no pyplot state): it turns the numbers that the
evaluation callbacks logged and the per-image certification TSVs (locuslab/smoothing format) into
``report.md`` and PNG figures.
"""

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from robust.certificates import certified_accuracy


def plot_certified_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[int]]],
    *,
    marks: Sequence[float] = (),
    cap: float | None = None,
    title: str = "",
) -> Figure:
    """Certified accuracy against L2 radius, one line per model (Cohen et al. 2019, Figure 1).

    Args:
        curves: Model name (``""`` for an unlabelled single curve) to ``(radius, correct)`` with
            one entry per certified image.
        marks: Radii at which each curve is marked with a dot (the logged grid).
        cap: The largest radius n samples can certify, sigma * Phi^-1(alpha ** (1 / n)), drawn
            as a dotted line when given.
        title: Figure title.

    Examples:
        >>> figure = plot_certified_curves({"noise": ([0.3, 0.0], [1, 0])}, marks=[0.0, 0.25])
        >>> figure.axes[0].get_ylabel()
        'certified accuracy'
    """
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    top = max(
        [*marks, cap or 0.0, 0.5, *(float(np.max(r, initial=0.0)) for r, _ in curves.values())]
    )
    grid = np.linspace(0.0, top * 1.05, 400)
    for name, (radius, correct) in curves.items():
        label = f"{name} ({len(radius)} images)" if name else None
        (line,) = axes.plot(grid, certified_accuracy(radius, correct, grid), label=label)
        if marks:
            values = certified_accuracy(radius, correct, marks)
            axes.scatter(list(marks), values, color=line.get_color(), s=14, zorder=3)
    if cap is not None:
        axes.axvline(
            cap, color="grey", linestyle=":", label=f"largest certifiable radius {cap:.3g}"
        )
    if any(curves) or cap is not None:
        axes.legend(loc="upper right", fontsize=8)
    axes.set(xlabel="L2 radius (pixels in [0, 1])", ylabel="certified accuracy", ylim=(0, 1.02))
    axes.set_xlim(0, top * 1.05)
    axes.grid(alpha=0.3)
    if title:
        axes.set_title(title, fontsize=9)
    return figure


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
    title: str = "",
) -> Figure:
    """Rows: clean images then each attack's adversarial images, titled true/predicted label.

    Args:
        clean: Images ``(k, C, H, W)`` in [0, 1].
        adversarial: Attack name to adversarial images of the same shape.
        labels: True labels of the k images.
        predictions: Row name ("clean" and each attack) to the model's predicted labels.
        title: Figure title.

    Examples:
        >>> images = np.zeros((2, 1, 4, 4))
        >>> figure = plot_example_grid(images, {"fgm": images}, [1, 2], {"clean": [1, 2], "fgm": [1, 0]})
        >>> [ax.get_title() for ax in figure.axes][-1]
        '2→0'
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
    if title:
        fig.suptitle(title, fontsize=9)
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
