"""Compare certification TSVs image by image: ACR on the images they share, with a paired error.

A model certified on a subset of the test set (on a CPU, every k-th image) is compared with
reference models certified on all of it. On the shared images the ACR difference of the two is a
mean of per-image differences, so its standard error is small (the images' difficulty cancels).
Adding it to the reference's ACR on all images estimates the subset model's ACR there; that is
an estimate, printed as one, not a measurement.

    python benchmarks/paired_acr.py docs/cpu_smoothadv30/certify_smoothadv_0.25.tsv \
        docs/gpu_h200/certify_noise_sigma0.25_n100000.tsv --every 10 20

``--every K`` restricts the subset TSV to the images whose index is a multiple of K (the nested
subsets of a run resumed with a smaller ``skip`` each time), one table per K.

Every TSV needs its ``.json`` sidecar: its rows are checked against the sigma, n and alpha there
(``robust.certificates.read_certificates``), so a radius no certification could give is refused.
A file without rows, or a K that selects none of the subset's images, is refused too: one
``error:`` line, exit status 2. So are files whose sidecars name different test sets
(``dataset_sha256``). Files of different sigma, n or alpha (which cap the radii differently) are
compared, and a note under the table names the differences.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`

from robust.certificates import CertifiedImage, read_certificates, summarize  # noqa: E402
from robust.checks import SettingError  # noqa: E402

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
Z95 = 1.959963984540054


COMPARED = ("sigma", "n", "alpha")
"""Sidecar settings that change what a radius means: differences are noted under the table."""


def rows_by_index(path: Path) -> dict[int, CertifiedImage]:
    """The TSV's rows by dataset index, checked against its sidecar; a torn last line dropped.

    Raises:
        SettingError: A missing or incomplete sidecar, a bad row, a radius beyond what the
            sidecar's sigma, n and alpha can certify (:func:`read_certificates`), or no rows.
    """
    return certified(path)[0]


def certified(path: Path) -> tuple[dict[int, CertifiedImage], dict]:
    """:func:`rows_by_index` and the sidecar's settings."""
    rows, _, settings = read_certificates(path)
    if not rows:
        raise SettingError(f"{path} holds no certification rows (only its header)")
    return {row.idx: row for row in rows}, settings


def check_same_data(subset: tuple[Path, dict], reference: tuple[Path, dict]) -> list[str]:
    """Refuse files of different test sets; the differing sigma, n and alpha, as notes.

    Raises:
        SettingError: Both sidecars name a test set (``dataset_sha256``) and they differ.

    Examples:
        >>> a, b = (Path("a.tsv"), {"sigma": 0.25, "n": 100}), (Path("b.tsv"), {"sigma": 0.5, "n": 100})
        >>> check_same_data(a, b)
        ['b.tsv has sigma=0.5 (a.tsv: 0.25)']
    """
    (mine, ours), (theirs, other) = subset, reference
    known = ours.get("dataset_sha256") and other.get("dataset_sha256")
    if known and ours["dataset_sha256"] != other["dataset_sha256"]:
        raise SettingError(
            f"{mine} and {theirs} certify different test sets (dataset_sha256 "
            f"{str(ours['dataset_sha256'])[:12]}... and {str(other['dataset_sha256'])[:12]}...)"
        )
    return [
        f"{theirs.name} has {key}={other.get(key)!r} ({mine.name}: {ours.get(key)!r})"
        for key in COMPARED
        if other.get(key) != ours.get(key)
    ]


def nested_subsets(
    rows: dict[int, CertifiedImage], every: Sequence[int], name: str
) -> dict[int, dict[int, CertifiedImage]]:
    """The rows whose index is a multiple of K, for each K of ``every``.

    Raises:
        SettingError: If a K is not an integer >= 1 or selects none of the rows.

    Examples:
        >>> rows = {i: CertifiedImage(i, 0, 0, 0.5, 1, 0.0) for i in (0, 3, 6)}
        >>> {k: sorted(subset) for k, subset in nested_subsets(rows, [1, 2], "s.tsv").items()}
        {1: [0, 3, 6], 2: [0, 6]}
        >>> try:
        ...     nested_subsets({3: rows[3]}, [2], "s.tsv")
        ... except SettingError as err:
        ...     print(str(err).split(";")[0])
        --every 2 selects none of the 1 images of s.tsv (indices 3-3)
    """
    subsets = {}
    for k in every:
        if type(k) is not int or k < 1:
            raise SettingError(f"--every takes integers >= 1; got {k!r}")
        subsets[k] = {i: row for i, row in rows.items() if i % k == 0}
        if not subsets[k]:
            raise SettingError(
                f"--every {k} selects none of the {len(rows)} images of {name} (indices "
                f"{min(rows)}-{max(rows)}); --every takes integers >= 1 that divide some of its "
                "indices, e.g. 1"
            )
    return subsets


def paired(
    subset: dict[int, CertifiedImage], reference: dict[int, CertifiedImage]
) -> dict[str, float]:
    """ACR of both on the shared images, their paired difference, and the estimate on all.

    The shared images are taken as two strata: the prefix of the reference's images that are all
    shared (a resumed run's contiguous block), whose mean difference is exact, and the rest, a
    sample of its images (every k-th). The difference on all images weights each stratum by its
    size, and its standard error comes from the sampled stratum alone (where fewer than 2 shared
    images lie beyond the prefix, all shared images are the sample instead). An unweighted mean would
    count the prefix's images k times over, and the test set's images are not in random order
    of difficulty (MNIST's reference ACR differs by 0.02 between its halves). So the sample must
    be every k-th image of the rest, one lattice (``uniform_sample``); otherwise (a first block
    only, or parts sampled at different densities) the estimate on all and its SE are NaN.

    Examples:
        >>> a = {i: CertifiedImage(i, 0, 0, 0.5, 1, 0.0) for i in (0, 2)}
        >>> b = {i: CertifiedImage(i, 0, 0, 0.25 * (i % 2 + 1), 1, 0.0) for i in range(4)}
        >>> result = paired(a, b)
        >>> result["difference"], result["reference_all"], result["estimate_all"]
        (0.25, 0.375, 0.625)
        >>> prefix = {i: CertifiedImage(i, 0, 0, 0.5, 1, 0.0) for i in (0, 1, 2, 4, 6)}
        >>> result = paired(prefix, {i: CertifiedImage(i, 0, 0, 0.1 * i, 1, 0.0) for i in range(8)})
        >>> result["exact_images"], round(result["estimate_all"], 4)  # 0-2 exact, 4 and 6 for 3-7
        (3.0, 0.5)
    """
    shared = sorted(set(subset) & set(reference))
    if not shared:
        raise SettingError("the TSVs share no image")
    relabelled = [i for i in shared if subset[i].label != reference[i].label]
    if relabelled:
        raise SettingError(
            f"image {relabelled[0]} has label {subset[relabelled[0]].label} in one TSV and "
            f"{reference[relabelled[0]].label} in the other: they certify different data"
        )
    mine = np.array([subset[i].radius * subset[i].correct for i in shared])
    theirs = np.array([reference[i].radius * reference[i].correct for i in shared])
    difference = mine - theirs
    # the exact stratum: the reference's first images, as far as every one of them is shared
    order = sorted(reference)
    exact = next((j for j, i in enumerate(order) if i not in subset), len(order))
    if exact < len(order) and len(shared) - exact < 2:
        # nothing (or one image) samples the rest, e.g. an interrupted run of the first images:
        # then all shared images are taken as the sample of the whole (no exact stratum)
        exact = 0
    in_prefix = np.array([i < order[exact] if exact < len(order) else True for i in shared])
    sampled = difference[~in_prefix]
    total, rest = len(order), len(order) - exact
    uniform = is_lattice_sample([i for i in shared if exact < len(order) and i >= order[exact]],
                                order[exact:])  # fmt: skip
    weighted = difference[in_prefix].sum() + rest * (sampled.mean() if len(sampled) else 0.0)
    if not uniform:
        weighted, standard_error = math.nan, math.nan
    elif len(sampled) > 1:
        standard_error = float(rest / total * sampled.std(ddof=1) / math.sqrt(len(sampled)))
    else:
        standard_error = 0.0 if rest == 0 else math.nan
    reference_all = float(np.mean([r.radius * r.correct for r in reference.values()]))
    return {
        "images": float(len(shared)),
        "exact_images": float(exact),
        "uniform_sample": uniform,
        "acr_subset": float(mine.mean()),
        "acr_reference": float(theirs.mean()),
        "difference": float(difference.mean()),
        "difference_all": float(weighted / total),
        "standard_error": standard_error,
        "reference_all": reference_all,
        "reference_images": float(total),
        "estimate_all": reference_all + float(weighted / total),
    }


def is_lattice_sample(sample: Sequence[int], population: Sequence[int]) -> bool:
    """Whether ``sample`` is every k-th index of ``population`` (one k, one offset), or all of it.

    Examples:
        >>> is_lattice_sample([5, 10, 15], range(3, 18)), is_lattice_sample([5, 10], range(3, 18))
        (True, False)
        >>> is_lattice_sample([4, 6, 8, 18], range(3, 20))  # denser at first: not one lattice
        False
    """
    sample = sorted(sample)
    if len(sample) < 2:
        return len(sample) == len(population)
    step = sample[1] - sample[0]
    return sample == [i for i in population if i % step == sample[0] % step]


def report(subset_path: Path, reference_paths: Sequence[Path], every: Sequence[int]) -> str:
    """Markdown tables: per K, the subset's certified accuracy and the paired comparisons."""
    rows, settings = certified(subset_path)
    subsets = nested_subsets(rows, every, subset_path.name)
    references, notes = {}, []
    for path in reference_paths:
        references[path], their_settings = certified(path)
        notes += check_same_data((subset_path, settings), (path, their_settings))
    lines = []
    for k, subset in subsets.items():
        summary = summarize(list(subset.values()), RADII)
        accuracy = " / ".join(f"{100 * summary[f'certified_acc@{r:g}']:.2f}" for r in RADII)
        lines += [
            f"## test images with index % {k} == 0: {len(subset)} of {subset_path.name}",
            "",
            f"certified accuracy at r = {' / '.join(f'{r:g}' for r in RADII)}: {accuracy}%; "
            f"ACR {summary['acr']:.4f}",
            "",
            "| reference | shared images (first ones all) | ACR ours | ACR reference "
            "| difference on them | difference on all (SE) | reference ACR on all "
            "| estimate on all (95%) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for path, reference in references.items():
            p = paired(subset, reference)
            half = Z95 * p["standard_error"]
            on_all = (
                (
                    f"{p['difference_all']:+.4f} ({p['standard_error']:.4f})",
                    f"{p['estimate_all']:.4f} +- {half:.4f}",
                )
                if p["uniform_sample"]
                else ("none: not every k-th image of the rest", "none")
            )
            lines.append(
                f"| {path.name} | {p['images']:.0f} ({p['exact_images']:.0f}) | "
                f"{p['acr_subset']:.4f} | {p['acr_reference']:.4f} | {p['difference']:+.4f} | "
                f"{on_all[0]} | {p['reference_all']:.4f} on {p['reference_images']:.0f} | "
                f"{on_all[1]} |"
            )
        lines += [
            "",
            "The difference on all images weights the first images (all shared: exact) and the"
            " sample of the rest by their sizes; its SE is the sample's.",
            "",
        ]
    lines += [f"note: {note}; its radii are capped and scaled differently" for note in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the tables for the TSVs on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("subset", type=Path, help="TSV of the model certified on a subset")
    parser.add_argument("references", type=Path, nargs="+", help="TSVs certified on all images")
    parser.add_argument("--every", type=int, nargs="+", default=[1], help="nested subsets")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.every):
        parser.exit(2, "error: --every takes integers >= 1\n")
    for path in (args.subset, *args.references):
        if not path.is_file():
            parser.exit(2, f"error: {path} is not a file\n")
    try:
        print(report(args.subset, args.references, args.every))
    except SettingError as err:  # a TSV that does not parse or is empty, TSVs that cannot pair
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
