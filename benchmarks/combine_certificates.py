r"""Join the TSVs of one certification split across machines (``first_image``) into one TSV.

A long certification (all 10,000 test images at n = 100,000) can run in parts: one machine
certifies images 0-6,949 and stops, another starts at ``first_image = 6950``. Noise is seeded
per image, so on the same device type each part's rows are those the whole run would give, up to
the float rounding of the machine; CPU and CUDA generators draw different noise from the same
seeds, so parts of both kinds are certificates of the same classifier from independent draws (a
note says so). This script checks that the parts certify the same thing, joins them and says what
differs:

* the settings that define the certificate must be in every part's ``.json`` sidecar and equal:
  sigma, seed, noise scheme and block, autocast (a bf16 part certifies another classifier), n0,
  n, alpha, the model's and the test set's SHA-256;
* every row is checked (``robust.certificates.read_certificates``): consistent fields, a radius
  no larger than sigma, n and alpha can certify;
* the numerics may differ (TF32 on a GPU, IEEE float32 on a CPU): they are listed per part;
* no image may be certified by two parts, and the parts must select images the same way (the same
  ``skip``) and together hold every selected image from 0 to the last (``--images N``: to N-1)
  with no gap, or the joined file's ACR would weigh the parts unevenly and hide the missing
  images; ``--allow-gaps`` joins them anyway and says how many are missing.

    python benchmarks/combine_certificates.py \
        docs/gpu_h200_paper/certify_consistency_0.5_paper_tf32.tsv \
        docs/cpu_consistency_split/certify_consistency_0.5_paper_from6950.tsv \
        --images 10000 --out docs/cpu_consistency_split/certify_consistency_0.5_paper_all.tsv

A part given as ``PATH@A-B`` contributes only its images ``A..B-1`` (the sidecar records the
range): a machine that went on past the split point keeps its extra rows in its own file.

It writes the joined TSV, its sidecar (the shared settings and the parts) and prints the
certified accuracy and ACR of the whole. A refusal is one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`

from robust.certificates import (  # noqa: E402
    CertifiedImage,
    atomic_write,
    read_certificates,
    summarize,
    write_tsv,
)
from robust.checks import SettingError  # noqa: E402

DEFINING = (
    *("sigma", "seed", "noise_block", "noise_scheme", "autocast", "n0", "n", "alpha"),
    *("model_sha256", "dataset_sha256"),
)
"""Settings that decide what a row certifies: equal in every part."""
NUMERICS = ("device_type", "gpu", "tf32", "cudnn_benchmark", "compile", "channels_last")
"""Settings that change only float rounding: recorded per part."""
RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def combine(
    paths: Sequence[Path],
    images: int | None = None,
    allow_gaps: bool = False,
    ranges: Sequence[tuple[int, int] | None] | None = None,
) -> tuple[list[CertifiedImage], dict[str, Any]]:
    """The rows of all parts in index order, and the joined sidecar.

    Args:
        paths: The parts' TSVs, each with its ``.json`` sidecar.
        images: Require the selected images of ``0..images-1`` exactly (None: up to the last).
        allow_gaps: Join parts that miss selected images (the sidecar counts them as ``gaps``).
        ranges: Per part, ``(A, B)`` to take only its images ``A..B-1``, or None for all.

    Raises:
        SettingError: A part without its sidecar, or whose sidecar lacks a defining setting; a
            bad row or a radius beyond the sidecar's cap; parts whose defining settings differ;
            an image in two parts; parts of different ``skip``; a selected image missing (unless
            ``allow_gaps``) or, with ``images``, beyond ``images - 1``.

    Examples:
        >>> import json, tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> settings = dict.fromkeys(DEFINING, "x") | {"sigma": 0.25, "n": 1000, "alpha": 0.001}
        >>> from robust.statistics import certifiable_neighbours
        >>> radius = float(certifiable_neighbours([0.5], 0.25, 1000, 0.001)[1][0])  # one CERTIFY gives
        >>> for name, first in (("a", 0), ("b", 2)):
        ...     write_tsv(folder / f"{name}.tsv", [CertifiedImage(i, 1, 1, radius, 1, 0.1)
        ...                                        for i in range(first, first + 2)])
        ...     _ = (folder / f"{name}.tsv.json").write_text(json.dumps(settings))
        >>> rows, settings = combine([folder / "a.tsv", folder / "b.tsv"], images=4)
        >>> [row.idx for row in rows], settings["sigma"]
        ([0, 1, 2, 3], 0.25)
    """
    by_index: dict[int, tuple[CertifiedImage, Path]] = {}
    parts, first_settings, skips = [], None, {}
    for path, taken in zip(paths, ranges or [None] * len(paths), strict=True):
        rows, torn, settings = read_certificates(path, required=DEFINING)
        if torn:
            raise SettingError(f"{path} ends in a torn line: resume that part first")
        held = len(rows)
        if taken is not None:
            rows = [row for row in rows if taken[0] <= row.idx < taken[1]]
        if first_settings is None:
            first_settings = settings
        differ = [
            f"{key}={first_settings.get(key)!r} in {paths[0]}, {settings.get(key)!r} here"
            for key in DEFINING
            if settings.get(key) != first_settings.get(key)
        ]
        if differ:
            raise SettingError(f"{path} certifies something else: {'; '.join(differ)}")
        skips[path] = settings.get("skip", 1)
        if type(skips[path]) is not int or skips[path] < 1:
            raise SettingError(f"{path}: skip must be a positive integer; got {skips[path]!r}")
        for row in rows:
            if row.idx in by_index:
                raise SettingError(
                    f"image {row.idx} is certified in both {by_index[row.idx][1]} and {path}"
                )
            by_index[row.idx] = (row, path)
        indices = [row.idx for row in rows]
        parts.append(
            {
                "path": str(path),
                "images": len(rows),
                "first": min(indices, default=None),
                "last": max(indices, default=None),
                **{key: settings.get(key) for key in NUMERICS},
            }
        )
        if taken is not None:  # the part's other rows stay in its own file
            parts[-1] |= {"range": list(taken), "left_out": held - len(rows)}
    if not by_index:
        raise SettingError("the parts hold no rows")
    if len(set(skips.values())) > 1:
        listed = ", ".join(f"skip={skip!r} in {path}" for path, skip in skips.items())
        raise SettingError(f"the parts select images differently: {listed}")
    skip = next(iter(skips.values()))
    end = images if images is not None else max(by_index) + 1
    selected = set(range(0, end, skip))
    missing = sorted(selected - set(by_index))
    extra = sorted(set(by_index) - selected)
    which = f"every {skip}th image" if skip > 1 else "every image"
    if extra:
        raise SettingError(
            f"the parts hold {len(extra)} images that {which} of 0..{end - 1} does not select "
            f"(first {extra[:3]})"
        )
    if missing and not allow_gaps:
        raise SettingError(
            f"the parts miss {len(missing)} of the {len(selected)} selected images of "
            f"0..{end - 1} ({which}; first {missing[:3]}): their joined ACR would hide them; "
            "certify them, or pass --allow-gaps to join what there is"
        )
    rows = [by_index[i][0] for i in sorted(by_index)]
    assert first_settings is not None
    joined = {key: first_settings.get(key) for key in DEFINING}
    joined |= {"data": first_settings.get("data"), "model": first_settings.get("model")}
    if first_settings.get("num_classes") is not None:  # rows read back are checked against it
        joined["num_classes"] = first_settings["num_classes"]
    joined |= {"skip": skip, "first_image": 0, "max_images": None, "image_range": end}
    return rows, joined | {"gaps": len(missing), "parts": parts}


def part_and_range(given: str) -> tuple[Path, tuple[int, int] | None]:
    """``PATH`` or ``PATH@A-B`` (only images ``A..B-1``) as the path and the range.

    Examples:
        >>> part_and_range("cpu.tsv@0-3800"), part_and_range("gpu.tsv")
        ((PosixPath('cpu.tsv'), (0, 3800)), (PosixPath('gpu.tsv'), None))
    """
    match = re.fullmatch(r"(.+)@(\d+)-(\d+)", given)
    if match is None or Path(given).is_file():
        return Path(given), None
    return Path(match[1]), (int(match[2]), int(match[3]))


def check_output(out: Path, parts: Sequence[Path]) -> None:
    """Refuse an ``--out`` that cannot be written, or that would overwrite an input.

    Raises:
        SettingError: ``out`` (or its sidecar) is a folder or one of the inputs, or the nearest
            existing folder above it is no folder or not writable.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> check_output(folder / "new" / "joined.tsv", [folder / "a.tsv"])
        >>> try:
        ...     check_output(folder, [folder / "a.tsv"])
        ... except SettingError as err:
        ...     print(str(err).split(";")[0].endswith("is a folder"))
        True
    """
    sidecar = out.with_name(out.name + ".json")
    if out.resolve() in {path.resolve() for path in parts}:
        raise SettingError(f"--out {out} is one of the parts")
    if {out.resolve(), sidecar.resolve()} & {
        path.with_name(path.name + ".json").resolve() for path in parts
    }:
        raise SettingError(f"--out {out} would overwrite the settings file of one of the parts")
    for target in (out, sidecar):
        if target.is_dir():
            raise SettingError(
                f"--out {out}: {target} is a folder; --out takes the path of the joined TSV "
                "(a file, written with its .json sidecar)"
            )
    above = next(folder for folder in out.parents if os.path.lexists(folder))
    if not above.is_dir():
        raise SettingError(
            f"--out {out}: {above} is not a folder, so nothing can be written under it"
        )
    if not os.access(above, os.W_OK | os.X_OK):
        raise SettingError(f"--out {out}: the folder {above} is not writable")


def write_output(out: Path, rows: Sequence[CertifiedImage], settings: dict[str, Any]) -> None:
    """Write the joined TSV and its sidecar; ``SettingError`` (nothing half-written) if it fails.

    The sidecar is written first and removed again if the TSV cannot be: a TSV never stands
    beside another run's sidecar.
    """
    sidecar = out.with_name(out.name + ".json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(sidecar, json.dumps(settings, indent=2) + "\n")
        try:
            write_tsv(out, rows)
        except OSError:
            sidecar.unlink(missing_ok=True)
            raise
    except OSError as err:
        raise SettingError(
            f"--out {out} cannot be written ({err.strerror or err}); give a path in a writable folder"
        ) from None


def main(argv: list[str] | None = None) -> None:
    """Join the parts named on the command line; print the whole's summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "parts",
        nargs="+",
        help="TSVs, each with its .json sidecar; PATH@A-B takes only its images A..B-1",
    )
    parser.add_argument("--out", type=Path, required=True, help="the joined TSV")
    parser.add_argument("--images", type=int, default=None, help="require images 0..N-1")
    parser.add_argument(
        "--allow-gaps", action="store_true", help="join parts that miss selected images"
    )
    args = parser.parse_args(argv)
    if args.images is not None and args.images < 1:
        parser.exit(2, "error: --images takes an integer >= 1\n")
    paths, ranges = [], []
    for given in args.parts:
        path, taken = part_and_range(given)
        if taken is not None and not taken[0] < taken[1]:
            parser.exit(2, f"error: {given}: the range A-B of PATH@A-B needs A < B\n")
        if not path.is_file():
            parser.exit(2, f"error: {path} is not a file\n")
        paths.append(path)
        ranges.append(taken)
    args.parts = paths
    try:
        check_output(args.out, args.parts)
        rows, settings = combine(args.parts, args.images, args.allow_gaps, ranges)
        write_output(args.out, rows, settings)
    except SettingError as err:
        parser.exit(2, f"error: {err}\n")
    summary = summarize(rows, RADII)
    accuracy = " / ".join(f"{100 * summary[f'certified_acc@{r:g}']:.2f}" for r in RADII)
    print(f"{len(rows)} images from {len(args.parts)} parts -> {args.out}")
    for part in settings["parts"]:
        numerics = ", ".join(f"{k}={part[k]}" for k in NUMERICS if part[k] is not None)
        taken = (
            f" of its images {part['range'][0]}-{part['range'][1] - 1}" if "range" in part else ""
        )
        print(
            f"  {part['path']}: {part['images']} images {part['first']}-{part['last']}{taken} "
            f"({numerics})"
        )
    print(f"certified accuracy at r = {' / '.join(f'{r:g}' for r in RADII)}: {accuracy}%")
    print(f"ACR {summary['acr']:.4f}, abstained {100 * summary['abstain_rate']:.2f}%")
    devices = sorted({str(part["device_type"]) for part in settings["parts"]})
    if len(devices) > 1:
        print(
            f"note: the parts ran on {' and '.join(devices)}, whose generators draw different "
            "noise from the same seeds: valid certificates from independent draws, not the rows "
            "one device would give"
        )
    if settings["gaps"]:
        print(
            f"note: {settings['gaps']} selected images of 0..{settings['image_range'] - 1} are "
            "in no part (--allow-gaps): these figures are of the images present only"
        )


if __name__ == "__main__":
    main()
