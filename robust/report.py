"""Figures and the comparison report: certified-accuracy curves, attack bars, example grids, tables.

Framework-free (NumPy and matplotlib's object API, no pyplot state): it turns the numbers that the
evaluation callbacks logged and the per-image certification TSVs (locuslab/smoothing format) into
``report.md`` and PNG figures.
"""

import json
import math
import re
import shutil
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from robust.autoattack import STAGES as AUTOATTACK_STAGES
from robust.certificates import certified_accuracy, summarize
from robust.checks import SettingError, check_int, check_real
from robust.statistics import largest_certified_radius


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


def certification_figure(
    radius: Sequence[float],
    correct: Sequence[int],
    radii: Sequence[float],
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
) -> Figure:
    """Certified accuracy against radius of one certification run, titled with its settings.

    The dotted line is the largest radius n samples can certify, sigma * Phi^-1(alpha ** (1 / n))
    (the Clopper-Pearson bound when all n samples agree).

    Examples:
        >>> figure = certification_figure([0.3], [1], [0.0], sigma=0.25, n0=100, n=1000, alpha=0.001)
        >>> figure.axes[0].get_title()
        'sigma=0.25, n0=100, n=1000, alpha=0.001, 1 images, ACR=0.300'
    """
    acr = (
        float(np.mean(np.where(np.asarray(correct, dtype=bool), radius, 0.0))) if len(radius) else 0
    )
    title = f"sigma={sigma:g}, n0={n0}, n={n}, alpha={alpha:g}, {len(radius)} images, ACR={acr:.3f}"
    cap = largest_certified_radius(sigma, n, alpha)
    return plot_certified_curves(
        {"": (radius, correct)}, marks=radii, cap=cap if cap > 0 else None, title=title
    )


def plot_attack_bars(accuracies: Mapping[str, Mapping[str, float]]) -> Figure:
    """Grouped bars: accuracy (clean and under each attack) for each model.

    Examples:
        >>> figure = plot_attack_bars({"lenet": {"clean": 0.99, "pgd40_linf_eps0.3": 0.9}})
        >>> [label.get_text() for label in figure.axes[0].get_xticklabels()]
        ['clean', 'pgd40_linf_eps0.3']
    """
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
    """A GitHub Markdown table; floats shown with 4 decimals.

    Examples:
        >>> print(markdown_table(["model", "acc"], [["lenet", 0.99], ["cnn", float("nan")]]))
        | model | acc |
        | --- | --- |
        | lenet | 0.9900 |
        | cnn | n/a |
    """

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if np.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# The seed experiment's numbers (its table; correct_certified is out of 10,000 test images).
SEED_NUMBERS = {
    "standard": {
        "fgm_l2_eps5": 0.097,
        "fgm_linf_eps0.3": 0.027,
        "correct_certified": 974,
        "acr": 2.07,
    },
    "adversarial": {
        "clean": 0.9653,
        "fgm_l2_eps5": 0.9459,
        "correct_certified": 1870,
        "acr": 0.83,
    },
    "noise": {"correct_certified": 7684, "acr": 0.94},
}

# Published full-MNIST reference rows: (model, what, number, source).
PUBLISHED = [
    (
        "LeNet, Gaussian sigma 0.25",
        "certified acc @0/0.25/0.5/0.75",
        "99.2 / 98.5 / 96.7 / 93.1%",
        "jh-jeong/smoothing-consistency logs, mean of 5 seeds",
    ),
    ("LeNet, Gaussian sigma 0.25", "ACR (n = 100,000, alpha = 0.001)", "0.911", "same"),
    ("LeNet, consistency sigma 0.25", "ACR", "0.928", "Jeong & Shin 2020"),
    ("LeNet, Gaussian / consistency sigma 0.5", "ACR", "1.558 / 1.655", "Jeong & Shin 2020"),
    ("LeNet, SmoothAdv sigma 0.25", "ACR", "0.932", "Salman et al. 2019, via Jeong & Shin 2020"),
    (
        "Madry et al. PGD-trained CNN",
        "AutoAttack L-inf 0.3 (with FAB-T)",
        "88.5%",
        "fra31/auto-attack README",
    ),
    ("TRADES CNN", "AutoAttack L-inf 0.3 (with FAB-T)", "92.8%", "fra31/auto-attack README"),
]

REPORT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
MAX_EXAMPLE_COLUMNS = 32
"""Example images drawn per model at most (a column each; ``num_image_grid`` may ask for more)."""
REPORT_RUN = "comparison"
"""The report's TensorBoard run, ``<output_dir>/tensorboard/comparison``: not a training's name."""
REPORT_FILES = re.compile(r"report\.md|tensorboard|certified_accuracy\.png|attack_accuracy\.png"
                          r"|examples_.*\.png")  # fmt: skip
"""What the report writes in ``<output_dir>`` beside the trainings' folders: not their names."""


def _fraction(count: float, total: int) -> str:
    return f"{count:.0f} of {total} ({100 * count / total:.1f}%)" if total else "n/a"


# Attack columns, strongest first: AutoAttack is the headline, one-step attacks come last.
ATTACK_ORDER = ("autoattack", "square", "apgd-t", "apgd-ce", "pgd", "fgm")
ATTACK_KEY = re.compile(
    r"(?P<method>[a-z-]+?)\d*_(?P<ball>(?:l2|linf)_eps[0-9.e+-]+)(?P<options>(?:_[a-z0-9.+-]+)*)"
)
"""An :attr:`~robust.attacks.AttackSpec.key`: method (steps), ball, then options (``_r5``,
``_q1000``, ``_rand``, ``_tgt``, ...), which are not part of the ball."""
MASKING_GAP = 0.3  # as PerturbedAccuracy's default masking_gap


def _attack_rank(key: str) -> tuple[int, str]:
    match = ATTACK_KEY.fullmatch(key)
    method = match["method"] if match else ""
    return (ATTACK_ORDER.index(method) if method in ATTACK_ORDER else len(ATTACK_ORDER), key)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def _example_files(results: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """A distinct example-figure file per model.

    From its training name (a plain folder name), else its label; a number is added where two
    would coincide ("noise 0.25" and "noise/0.25").

    Examples:
        >>> files = _example_files({"noise 0.25": {}, "noise/0.25": {}, "std": {"name": "standard"}})
        >>> list(files.values())
        ['examples_noise_0.25.png', 'examples_noise_0.25_2.png', 'examples_standard.png']
    """
    files: dict[str, str] = {}
    for label, result in results.items():
        stem = _slug(str(result.get("name") or label))
        file, number = f"examples_{stem}.png", 1
        while file in files.values():
            number += 1
            file = f"examples_{stem}_{number}.png"
        files[label] = file
    return files


BOUND_STANDARD_ERRORS = 3.0
"""How many standard errors certified accuracy may exceed 1 - misclassified-after-attack by."""


def bound_findings(
    certified: Mapping[str, tuple[Sequence[float], Sequence[int]]],
    attacked: Mapping[str, Mapping[str, float]],
    sigmas: Mapping[str, float] | None = None,
) -> list[str]:
    """Sentences naming each model whose certified accuracy exceeds what the attack leaves.

    No image certified correct at radius r can be misclassified by the smoothed classifier after
    an attack of radius r (Cohen et al. 2019, Theorem 1, up to each certificate's failure
    probability alpha), so certified accuracy at r is at most ``1 - smoothed_misclassified@r``.
    The two may be estimated on different images; a gap beyond :data:`BOUND_STANDARD_ERRORS`
    standard errors of their difference (plus one image) is a bug in the attack, the
    certification or the bookkeeping, never robustness.

    Args:
        certified: Model to ``(radii, correct)`` of its certified images.
        attacked: Model to its test metrics (``test/smoothed_misclassified@<r>``,
            ``test/smoothed_num_images`` and ``test/smoothed_sigma`` are read).
        sigmas: Model to the sigma it was certified at: a model attacked at another sigma (another
            smoothed classifier) is not compared.

    Examples:
        >>> rows = ([0.6, 0.6, 0.6, 0.6], [1, 1, 1, 1])  # 4 of 4 certified at 0.5
        >>> metrics = {"test/smoothed_misclassified@0.5": 1.0, "test/smoothed_num_images": 4}
        >>> bound_findings({"m": rows}, {"m": metrics})[0][:60]
        'm: certified accuracy 100.0% at radius 0.5, but the attack m'
        >>> bound_findings({"m": rows}, {"m": {**metrics, "test/smoothed_misclassified@0.5": 0}})
        []
    """
    findings = []
    for model, (radii, correct) in certified.items():
        metrics = attacked.get(model, {})
        n_attacked = metrics.get("test/smoothed_num_images", 0)
        if not len(radii) or not n_attacked:
            continue
        attacked_sigma = metrics.get("test/smoothed_sigma")
        certified_sigma = (sigmas or {}).get(model)
        if None not in (attacked_sigma, certified_sigma) and not math.isclose(
            attacked_sigma,
            certified_sigma,
            rel_tol=1e-6,  # logged metrics are float32
        ):
            continue  # two smoothed classifiers: no bound between them
        for key, misclassified in sorted(metrics.items()):
            if not key.startswith("test/smoothed_misclassified@") or math.isnan(misclassified):
                continue
            r = float(key.split("@", 1)[1])
            cert = float(certified_accuracy(radii, correct, [r])[0])
            bound = 1.0 - misclassified
            error = math.sqrt(cert * (1 - cert) / len(radii) + bound * (1 - bound) / n_attacked)
            allowed = BOUND_STANDARD_ERRORS * error + 1 / min(len(radii), n_attacked)
            if cert - bound > allowed:
                findings.append(
                    f"{model}: certified accuracy {100 * cert:.1f}% at radius {r:g}, but the"
                    f" attack misclassified {100 * misclassified:.1f}% there (on {len(radii)}"
                    f" and {n_attacked:.0f} images): a certificate cannot hold where an attack"
                    " succeeds, so the attack, the certification or their images are wrong"
                )
    return findings


def masking_findings(
    accuracies: Mapping[str, Mapping[str, float]],
    counts: Mapping[str, Mapping[str, float]] | None = None,
) -> list[str]:
    """Sentences naming each model whose one-step (FGM) accuracy exceeds a stronger attack's by far.

    A one-step attack far weaker than PGD or AutoAttack at the same ball is the signature of
    gradient masking (Athalye, Carlini and Wagner 2018): the one-step number is not robustness.

    Attacks compare when their balls (norm and eps) are equal, whatever their options (restarts,
    queries, random start); targeted attacks, whose accuracy means something else, are left out.
    ``counts`` (model to attack key to images evaluated) names the image counts of the two where
    they differ (the gap is then partly sampling error).

    Examples:
        >>> masking_findings({"m": {"fgm_l2_eps5": 0.78, "pgd40_l2_eps5": 0.0}})[0][:44]
        'm: 78.0% under fgm_l2_eps5 but 0.0% under pg'
        >>> masking_findings({"m": {"fgm_l2_eps5": 0.5, "pgd40_l2_eps5": 0.4, "pgd_linf_eps0.3": 0}})
        []
        >>> masking_findings({"m": {"fgm_linf_eps0.3_rand": 0.9, "pgd40_linf_eps0.3_r5": 0.0}})[0][-18:]
        '(gradient masking)'
        >>> numbers = {"m": {"fgm_l2_eps5": 500, "pgd40_l2_eps5": 100}}
        >>> masking_findings({"m": {"fgm_l2_eps5": 0.78, "pgd40_l2_eps5": 0.0}}, numbers)[0][-23:]
        '(on 500 and 100 images)'
    """
    findings = []
    for model, accuracy in accuracies.items():
        for weak, weak_acc in accuracy.items():
            match = ATTACK_KEY.fullmatch(weak)
            if not match or match["method"] != "fgm" or "_tgt_" in f"{match['options']}_":
                continue
            stronger = {
                key: acc
                for key, acc in accuracy.items()
                if (m := ATTACK_KEY.fullmatch(key)) and m["method"] != "fgm"
                if m["ball"] == match["ball"] and "_tgt_" not in f"{m['options']}_"
                if not np.isnan(acc)
            }
            if stronger and weak_acc - min(stronger.values()) > MASKING_GAP:
                best = min(stronger, key=stronger.__getitem__)
                images = (counts or {}).get(model, {})
                sizes = (images.get(weak), images.get(best))
                differ = None not in sizes and sizes[0] != sizes[1]
                findings.append(
                    f"{model}: {100 * weak_acc:.1f}% under {weak} but {100 * stronger[best]:.1f}%"
                    f" under {best}: the one-step attack overstates robustness (gradient masking)"
                    + (f" (on {sizes[0]:.0f} and {sizes[1]:.0f} images)" if differ else "")
                )
    return findings


def _seed_beside_ours(
    results: Mapping[str, Mapping],
    accuracies: Mapping[str, Mapping[str, float]],
    certified: Mapping[str, tuple[Mapping[str, float], int]],
) -> str:
    """The seed's table with our model of the same training name beside each of its numbers."""
    columns = {"clean": "clean", "fgm_l2_eps5": "FGM L2 5", "fgm_linf_eps0.3": "FGM L-inf 0.3"}
    header = ["model"]
    for title in [*columns.values(), "correct_certified", "ACR"]:
        header += [f"{title}: seed", f"{title}: ours"]
    rows = []
    for seed_name, numbers in SEED_NUMBERS.items():
        ours = next((k for k, r in results.items() if r.get("name", k) == seed_name), None)
        row: list[object] = [ours or seed_name]
        for key in columns:
            mine = accuracies.get(ours, {}).get(key, float("nan")) if ours else float("nan")
            row += [numbers.get(key, float("nan")), mine]
        summary, count = certified.get(ours, ({}, 0)) if ours else ({}, 0)
        seed_count = numbers.get("correct_certified")
        row += [_fraction(seed_count, 10000) if seed_count is not None else "n/a"]
        row += [_fraction(summary.get("correct_certified", 0), count)]
        row += [numbers.get("acr", float("nan")), summary.get("acr", float("nan"))]
        rows.append(row)
    return markdown_table(header, rows)


def _image_counts(metrics_of: Mapping[str, Mapping[str, float]], name: str) -> str:
    """The image count logged under ``name``: one number, or each model's where they differ.

    Examples:
        >>> _image_counts({"a": {"n": 500.0}, "b": {"n": 500.0}}, "n")
        '500'
        >>> _image_counts({"a": {"n": 500.0}, "b": {"n": 50.0}, "c": {}}, "n")
        '500 (a), 50 (b)'
    """
    found = {
        model: int(value)
        for model, metrics in metrics_of.items()
        if isinstance(value := metrics.get(name), int | float) and math.isfinite(value)
    }
    if len(set(found.values())) <= 1:
        return f"{next(iter(found.values()))}" if found else ""
    return ", ".join(f"{count} ({model})" for model, count in found.items())


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _check_certified_count(
    name: str, tsv: Path, count: int, torn: bool, recorded: float | None
) -> None:
    """Refuse a TSV that no longer holds what its certification recorded (changed since).

    Raises:
        SettingError: When its last line is torn or its selected rows are not the
            ``certify/num_images`` the evaluation logged, naming what to delete to redo it.
    """
    if torn:
        problem = "its last line is torn"
    elif recorded is not None and recorded != count:
        problem = (
            f"it holds {count} rows of its selection where the evaluation certified {recorded:g}"
        )
    else:
        return
    raise SettingError(
        f"{name}: {tsv} changed after its certification finished ({problem}); delete it, its "
        f".json and {name}'s metrics.json to certify again"
    )


def _check_certified_summary(
    name: str, tsv: Path, rows: Sequence, metrics: Mapping[str, float]
) -> None:
    """Refuse a TSV whose rows no longer give the numbers its certification logged.

    The count of certified-and-correct images and the counts at each logged radius must be
    equal, the ACR equal to float32 rounding (Lightning logs float32): a row edited after the
    run (another radius, a prediction made correct) would change the report's numbers.

    Raises:
        SettingError: Naming the first number that differs, and what to delete to redo it.
    """
    count, summary = len(rows), summarize(rows, [])
    radius = [row.radius for row in rows]
    correct = [row.correct for row in rows]
    differing = []
    logged = metrics.get("certify/correct_certified")
    here = summary.get("correct_certified", 0.0)  # no rows: an empty summary
    if logged is not None and math.isfinite(logged) and round(logged) != here:
        differing.append(f"correct_certified {here:g}, logged {logged:g}")
    for key, value in metrics.items():
        if not key.startswith("certify/certified_acc@") or not math.isfinite(value):
            continue
        try:
            at = float(key.split("@", 1)[1])
        except ValueError:
            continue
        # the name holds the radius to 6 digits (:g): a row within that rounding may count
        fewest, most = (
            round(float(a) * count)
            for a in certified_accuracy(radius, correct, [at * (1 + 5e-6), at * (1 - 5e-6)])
        )
        if not fewest <= round(value * count) <= most:
            differing.append(f"{key.split('/', 1)[1]} {fewest} of {count}, logged {value:g}")
    acr = metrics.get("certify/acr")
    here = summary.get("acr", math.nan)
    if (
        acr is not None
        and math.isfinite(acr)
        and count
        and not math.isclose(here, acr, rel_tol=1e-6, abs_tol=1e-6)
    ):
        differing.append(f"ACR {here:.6g}, logged {acr:.6g}")
    if differing:
        raise SettingError(
            f"{name}: {tsv} changed after its certification finished (its rows give "
            f"{differing[0]}); delete it, its .json and {name}'s metrics.json to certify again"
        )


def _certification_sentence(
    settings: Mapping[str, Mapping], certified: Mapping[str, tuple[Mapping[str, float], int]]
) -> str:
    """Which certification each model's numbers come from (its TSV's settings)."""
    described: dict[str, list[str]] = {}
    for name, stored in settings.items():
        try:  # the sidecar is a file we read: checked before use
            sigma = check_real("sigma", stored.get("sigma"), low=0)
            n = check_int("n", stored.get("n"), minimum=1)
            alpha = check_real("alpha", stored.get("alpha"), low=0, high=1)
            skip = check_int("skip", stored.get("skip", 1), minimum=1)
            first = check_int("first_image", stored.get("first_image", 0), minimum=0)
            limit, end = stored.get("max_images"), stored.get("image_range")
            limit = None if limit is None else check_int("max_images", limit, minimum=1)
            end = None if end is None else check_int("image_range", end, minimum=1)
            size = stored.get("dataset_size")
            size = None if size is None else check_int("dataset_size", size, minimum=1)
        except SettingError as err:
            described.setdefault(f"unknown settings ({err})", []).append(name)
            continue
        # the whole selection (a part of a split run, a batch limit), as selected_rows reads it
        subset = f"every {_ordinal(skip)} test image" if skip > 1 else "the test images"
        subset += f" from index {first:,}" if first else ""
        # a batch limit's range, when the sidecar says it is short of the whole test set
        subset += f" of the first {end:,}" if end is not None and size and end < size else ""
        subset += f" (at most {limit:,})" if limit is not None else ""
        subset = "" if subset == "the test images" else f"{subset}, "
        cap = largest_certified_radius(sigma, n, alpha)
        limit = f"no radius above {cap:.3g}" if cap > 0 else "only radius 0"
        text = (
            f"sigma {sigma:g}, n0 {stored.get('n0')}, n {n:,}, alpha {alpha:g} ({limit} can be"
            f" certified), on {subset}{certified[name][1]} images"
        )
        described.setdefault(text, []).append(name)
    parts = [f"{text} ({', '.join(names)})" for text, names in described.items()]
    return "Certification: " + "; ".join(parts) + "."


MAX_EXAMPLE_BYTES = 1 << 30
"""The most an examples file's array may declare (1 GiB): more is not a file we wrote."""


def _small_array(archive: zipfile.ZipFile, name: str) -> bool:
    """Whether the member ``name`` is a ``.npy`` array whose header declares a sane size.

    Read before the data, so a header declaring petabytes is refused without allocating.
    """
    if not name.endswith(".npy"):
        return False
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    with archive.open(name) as member:
        reader = readers.get(np.lib.format.read_magic(member))
        if reader is None:  # numpy's savez writes version 1.0 (2.0 for huge headers)
            return False
        shape, _, dtype = reader(member)
    return math.prod(shape) * dtype.itemsize <= MAX_EXAMPLE_BYTES


def read_examples(
    path: Path,
) -> tuple[np.ndarray, dict[str, np.ndarray], list[int], dict[str, list[int]]] | None:
    """``adversarial_examples.npz`` (clean images, attacked images, labels, predictions), checked.

    A file we read back: numbers only (no pickles), at least one image, images of one shape with
    1 or 3 channels, one integer label each, and integer predictions of the clean images and of
    every attack's. Returns None for anything else. At most :data:`MAX_EXAMPLE_COLUMNS` images
    are kept (the figure's width).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if not all(_small_array(data.zip, name) for name in data.zip.namelist()):
                return None  # a member that is no array, or declares more than a figure holds
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    if not all(isinstance(v, np.ndarray) for v in arrays.values()):
        return None
    clean, labels = arrays.get("clean"), arrays.get("labels")
    if clean is None or labels is None or clean.ndim != 4 or labels.shape != clean.shape[:1]:
        return None
    adversarial = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("adv/")}
    predictions = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("pred/")}
    arrays_ok = all(v.shape == clean.shape for v in adversarial.values()) and all(
        v.shape == labels.shape for v in predictions.values()
    )
    numeric = all(v.dtype.kind in "biuf" for v in arrays.values())
    integers = all(v.dtype.kind in "iu" for v in (labels, *predictions.values()))
    predicted = set(predictions) >= {"clean", *adversarial}  # a title for every image
    if not (arrays_ok and numeric and integers and predicted) or len(clean) == 0:
        return None
    if clean.shape[1] not in (1, 3):  # gray or RGB: what the figure can draw
        return None
    k = MAX_EXAMPLE_COLUMNS
    return (
        clean[:k],
        {name: images[:k] for name, images in adversarial.items()},
        labels[:k].tolist(),
        {key: value[:k].tolist() for key, value in predictions.items()},
    )


def certificates_path(result: Mapping) -> Path:
    """The certification TSV of one evaluation: its ``certificates`` entry, else the default.

    Examples:
        >>> certificates_path({"log_dir": "runs/x"})
        PosixPath('runs/x/certify_test.tsv')
        >>> certificates_path({"log_dir": "runs/x", "certificates": "/data/own.tsv"})
        PosixPath('/data/own.tsv')
    """
    named = result.get("certificates")
    if isinstance(named, str) and named:
        return Path(named)
    return Path(result.get("log_dir") or "") / "certify_test.tsv"


def write_report(
    out: Path, results: Mapping[str, Mapping], settings: Mapping, reference: str = "embedded"
) -> Path:
    """``report.md``, its PNG figures and the TensorBoard ``comparison`` run of a comparison.

    Args:
        out: The comparison's folder.
        results: Model label to ``{"metrics": logged test metrics, "log_dir": the test run's log
            directory (holding ``certify_test.tsv`` and ``adversarial_examples.npz``),
            "certificates": the certification TSV where it is not the log directory's (optional),
            "train_time_s": ..., "name": the training's name (matched with the seed's rows)}``.
        settings: The comparison's settings, written at the end of the report.
        reference: ``"embedded"`` (5,000 digits) or ``"full"`` (official MNIST): which reference
            rows to show.

    Returns:
        The path of ``report.md``.

    Examples:
        >>> import tempfile
        >>> metrics = {"test/acc": 0.98, "test/perturbed_acc/pgd40_linf_eps0.3": 0.9}
        >>> report = write_report(Path(tempfile.mkdtemp()), {"lenet": {"metrics": metrics}}, {})
        >>> report.read_text().splitlines()[2].split(" | ")[:3]
        ['| model', 'clean acc', 'acc pgd40_linf_eps0.3']
    """
    from torch.utils.tensorboard import SummaryWriter

    from robust.certificates import read_certificates, selected_rows

    metrics_of = {name: r["metrics"] for name, r in results.items()}
    logged = {
        k.split("/", 2)[2]
        for m in metrics_of.values()
        for k in m
        if k.startswith("test/perturbed_acc/")
    }
    attack_keys = sorted((k for k in logged if "/after_" not in k), key=_attack_rank)
    staged = sorted({k.split("/after_")[0] for k in logged if "/after_" in k}, key=_attack_rank)
    # images per attack, per model (a training's own args may evaluate other images)
    counts: dict[str, list[str]] = {}
    for key in attack_keys:
        described = _image_counts(metrics_of, f"test/perturbed_num_images/{key}")
        if described:
            counts.setdefault(described, []).append(key)
    smoothed_count = _image_counts(metrics_of, "test/smoothed_num_images")
    if smoothed_count:
        counts.setdefault(smoothed_count, []).append("SmoothAdv on g")
    smoothed_keys = sorted(
        {
            k.split("/", 1)[1]
            for m in metrics_of.values()
            for k in m
            if k.startswith("test/smoothed_robust_acc@")
        }
    )
    curves, accuracies, table = {}, {}, []
    certified: dict[str, tuple[dict[str, float], int]] = {}
    certify_settings: dict[str, dict] = {}
    for name, result in results.items():
        metrics = result["metrics"]
        tsv = certificates_path(result)
        rows = []
        if tsv.is_file():  # a file we read: each row checked against the sidecar's settings
            rows, torn, certify_settings[name] = read_certificates(tsv)
            try:  # a TSV resumed by runs with other selections: the latest run's images only
                rows = selected_rows(rows, certify_settings[name])
            except SettingError as err:
                raise SettingError(f"settings file {tsv}.json: {err}") from None
            _check_certified_count(name, tsv, len(rows), torn, metrics.get("certify/num_images"))
            _check_certified_summary(name, tsv, rows, metrics)
        summary = summarize(rows, REPORT_RADII)
        certified[name] = (summary, len(rows))
        if rows:  # a model not certified has no curve (not a flat line at 0)
            curves[name] = ([r.radius for r in rows], [r.correct for r in rows])
        accuracies[name] = {"clean": metrics.get("test/acc", float("nan"))}
        accuracies[name] |= {
            k: metrics.get(f"test/perturbed_acc/{k}", float("nan")) for k in attack_keys
        }
        table.append(
            [
                name,
                *accuracies[name].values(),
                *(metrics.get(f"test/{k}", float("nan")) for k in smoothed_keys),
                _fraction(summary.get("correct_certified", 0), len(rows)),
                summary.get("acr", float("nan")),
                *(summary.get(f"certified_acc@{r:g}", float("nan")) for r in REPORT_RADII),
                f"{result.get('train_time_s', float('nan')):.0f}",
            ]
        )
    stage_rows = [
        [
            name,
            *(
                metrics_of[name].get(f"test/perturbed_acc/{k}/after_{stage}", float("nan"))
                for k in staged
                for stage in AUTOATTACK_STAGES[1:]
            ),
        ]
        for name in results
    ]
    stage_header = [
        "model",
        *(f"{k} after {stage}" for k in staged for stage in AUTOATTACK_STAGES[1:]),
    ]
    header = ["model", "clean acc", *(f"acc {k}" for k in attack_keys)]
    header += [f"g under SmoothAdv {k.split('@')[1]}" for k in smoothed_keys]
    header += [
        "correct_certified",
        "ACR",
        *(f"cert acc @{r:g}" for r in REPORT_RADII),
        "train time (s)",
    ]

    # a figure only for what was evaluated: no empty curves, no bars of clean accuracy alone
    figures = {}
    if any(radius for radius, _ in curves.values()):
        figures["certified_accuracy.png"] = plot_certified_curves(curves, marks=REPORT_RADII)
    if attack_keys:
        figures["attack_accuracy.png"] = plot_attack_bars(accuracies)
    example_files = _example_files(results)
    for name, result in results.items():
        path = Path(result.get("log_dir") or "") / "adversarial_examples.npz"
        if not path.is_file():
            continue
        examples = read_examples(path)
        if examples is None:
            print(f"[report] {name}: no example images; {path} is not an examples file we wrote")
            continue
        clean, adversarial, labels, predictions = examples
        figures[example_files[name]] = plot_example_grid(
            clean, adversarial, labels, predictions, title=name
        )
    board = out / "tensorboard" / REPORT_RUN
    if board.is_dir():  # written whole each time: an earlier run's models would stay beside these
        shutil.rmtree(board)
    writer = SummaryWriter(str(board))
    for filename, figure in figures.items():
        figure.savefig(out / filename, dpi=120)
        writer.add_figure(f"comparison/{filename.removesuffix('.png')}", figure)
    for row in table:
        for column, value in zip(header[1:], row[1:], strict=True):
            if isinstance(value, float):
                writer.add_scalar(f"comparison/{column}/{row[0]}", value)
    writer.close()

    evaluated = "; ".join(f"{', '.join(keys)} on {n}" for n, keys in counts.items())
    masking = masking_findings(
        {name: {k: v for k, v in acc.items() if k != "clean"} for name, acc in accuracies.items()},
        {
            name: {
                k: metrics[f"test/perturbed_num_images/{k}"]
                for k in attack_keys
                if f"test/perturbed_num_images/{k}" in metrics
            }
            for name, metrics in metrics_of.items()
        },
    )
    violated = bound_findings(
        curves, metrics_of, {name: s["sigma"] for name, s in certify_settings.items()}
    )
    for line in violated:
        print(f"[report] {line}")
    lines = [
        "# Robustness comparison",
        "",
        markdown_table(header, table),
        "",
        "Accuracies are fractions of the evaluated test images; under an attack, an image counts as"
        " robust only when it is classified correctly both clean and attacked. `g under SmoothAdv r`"
        " is the smoothed classifier's PREDICT after SmoothAdv's L2 attack at radius r (abstaining"
        " counts as wrong). Certified accuracy at r can exceed it only through abstentions (an"
        " attack can push an image certified just beyond r to a near-tie where PREDICT abstains,"
        " g unchanged); it can never exceed, beyond the certificates' failure probability, the"
        " share of images on which PREDICT names no wrong class after the attack (1 -"
        " `smoothed_misclassified@r`, in TensorBoard). Both hold image by image: where the attack"
        " and the certification evaluated different images (the counts below), the columns are"
        " two estimates and compare only within their sampling error. `correct_certified` counts"
        " the certified"
        " images that randomized smoothing certifies with the correct class; ACR is the average"
        " certified L2 radius (0 for wrong or abstained images); `cert acc @r` is the fraction"
        " certified correct at radius r.",
        "",
        *([f"Test images per attack: {evaluated}.", ""] if evaluated else []),
        *([_certification_sentence(certify_settings, certified), ""] if certify_settings else []),
        *(
            [
                "**Certified beyond what the attack leaves** (a bug, not robustness):",
                "",
                *(f"- {line}" for line in violated),
                "",
            ]
            if violated
            else []
        ),
        *(
            [
                "**Gradient masking** (one-step attacks far weaker than iterative ones at the same"
                " ball):",
                "",
                *(f"- {line}" for line in masking),
                "",
            ]
            if masking
            else []
        ),
        *(
            [
                "## AutoAttack, stage by stage",
                "",
                "Robust accuracy after each of its attacks.",
                "",
                markdown_table(stage_header, stage_rows),
                "",
            ]
            if staged
            else []
        ),
        *(
            line
            for filename, alt in (
                ("certified_accuracy.png", "certified accuracy"),
                ("attack_accuracy.png", "accuracy under attack"),
            )
            if filename in figures
            for line in (f"![{alt}]({filename})", "")
        ),
        *(
            f"![{name} examples]({example_files[name]})"
            for name in results
            if example_files[name] in figures
        ),
        "",
        "## The seed experiment's table beside ours",
        "",
        "The seed trained on the official 60,000 digits and certified all 10,000 test images"
        " (its noise model with its own settings); ours are the rows above with the same training"
        " name.",
        "",
        _seed_beside_ours(results, accuracies, certified),
        "",
    ]
    if reference == "full":
        lines += [
            "## Published full-MNIST results, for reference",
            "",
            markdown_table(
                ["model", "measure", "published", "source"], [list(p) for p in PUBLISHED]
            ),
            "",
            "They differ from ours in training length (the published LeNets train for 90 epochs;"
            " ours for the epochs in the settings below) and, where the certification line above"
            " names a subset or n < 100,000, in the images certified and the largest certifiable"
            " radius.",
            "",
        ]
    lines += ["## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
