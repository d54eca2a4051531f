r"""Certification results on disk: the TSV rows of locuslab/smoothing, checked, written and summarized.

One row per certified image, ``idx label predict radius correct time`` tab-separated under a header
line, as locuslab/smoothing's ``certify.py`` writes them, so their analysis scripts read our files
and :func:`read_tsv` reads theirs. The settings that determine the rows live in a sidecar
``<tsv>.json``; the readers of finished files (:func:`read_certificates`: the report, joining,
paired ACR) require it and refuse radii the settings cannot give, so locuslab's files, written
without one and with 3-digit radii, are read only by :func:`read_tsv`.

Files are untrusted until checked: :func:`read_tsv` refuses a row whose fields are inconsistent
(``correct`` that does not match ``predict == label``, a radius on an abstention, a label outside
the classes, an index outside the certified set) with a ``SettingError`` naming the line, and
:func:`check_settings` refuses a file written with other settings, another model or other images.

Examples:
    >>> row = CertifiedImage(idx=3, label=7, predict=7, radius=0.5, correct=1, time=0.25)
    >>> row.to_line()
    '3\t7\t7\t0.5\t1\t0:00:00.250000\n'
    >>> CertifiedImage.from_line(row.to_line()) == row
    True
    >>> summarize([row], radii=[0.0, 1.0])["certified_acc@1"]
    0.0
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import pickle
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robust.checks import SettingError, check_int, check_real
from robust.statistics import largest_certified_radius, nearest_certifiable_radius

__all__ = [
    "ABSTAIN",
    "CERTIFICATE_SETTINGS",
    "HEADER",
    "SELECTION_SETTINGS",
    "CertificateFile",
    "CertifiedImage",
    "atomic_write",
    "certified_accuracy",
    "check_radius_cap",
    "check_settings",
    "dataset_fingerprint",
    "model_fingerprint",
    "open_resumable",
    "read_certificates",
    "read_settings",
    "read_tsv",
    "selected_indices",
    "selected_rows",
    "summarize",
    "write_tsv",
]

SELECTION_SETTINGS = ("skip", "first_image", "max_images", "image_range")
"""The settings that say which images a run certified; a resumed file's sidecar gets the latest."""
RESUMED_KEY = "resumed_with"
"""Sidecar list of the resumed runs whose speed settings differ: rows already there, settings."""

MAX_SECONDS = float(datetime.timedelta.max.days * 86_400)
"""The longest time a row can hold (whole days of a ``datetime.timedelta``, as the TSV writes it)."""
MAX_SAMPLES = 10**12
"""The largest n a sidecar may name (far beyond any run; the radius lattice is exact up to it)."""
LATTICE_TOLERANCE = 1e-9
"""Distance a radius may lie from the nearest one its settings give, relative to the larger of the
radius and sigma: float noise. Neighbouring counts of n = 100,000 lie some 1e-5 sigma apart, so
a radius of other settings is refused; for n beyond some 10**9 neighbours blur within it."""
CERTIFICATE_SETTINGS = ("sigma", "n", "alpha")
"""The sidecar settings that bound a file's radii: :func:`read_certificates` requires them."""

ABSTAIN = -1
"""``predict`` of a row whose certification abstained."""

HEADER = ("idx", "label", "predict", "radius", "correct", "time")
"""Columns of the TSV, as written by locuslab/smoothing's ``certify.py``."""


@dataclass(frozen=True)
class CertifiedImage:
    """One TSV row: the certificate of one image.

    Attributes:
        idx: Dataset index of the image (also seeds its noise).
        label: True class.
        predict: Certified class, or ``ABSTAIN`` (-1).
        radius: Certified L2 radius in pixel units; 0.0 when abstaining.
        correct: 1 if ``predict == label`` else 0.
        time: Seconds spent certifying the image (its share of its round).

    Examples:
        >>> CertifiedImage(0, 1, ABSTAIN, 0.0, 0, 0.1).abstained
        True
    """

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float

    @property
    def abstained(self) -> bool:
        """Whether the certification abstained."""
        return self.predict == ABSTAIN

    def to_line(self) -> str:
        """The row as one TSV line (radius written exactly: ``repr`` round-trips a float)."""
        elapsed = str(datetime.timedelta(seconds=self.time))
        fields = (self.idx, self.label, self.predict, repr(self.radius), self.correct, elapsed)
        return "\t".join(map(str, fields)) + "\n"

    @classmethod
    def from_line(cls, line: str, num_classes: int | None = None) -> CertifiedImage:
        r"""Parse and check one TSV line.

        Args:
            line: One line of the file (its newline optional).
            num_classes: When given, labels must be in ``[0, num_classes)`` and predictions too
                (or ``ABSTAIN``).

        Raises:
            ValueError: Naming the first field that is malformed or inconsistent.

        Examples:
            >>> CertifiedImage.from_line("0\t1\t2\t0.5\t1\t0:00:01")
            Traceback (most recent call last):
                ...
            ValueError: correct=1 but predict 2 != label 1
        """
        fields = line.rstrip("\n").split("\t")
        if len(fields) != len(HEADER):
            raise ValueError(f"expected {len(HEADER)} tab-separated fields, got {len(fields)}")
        idx, label, predict, correct = (_integer(fields[k], HEADER[k]) for k in (0, 1, 2, 4))
        radius = float(fields[3])
        row = cls(idx, label, predict, radius, correct, _parse_seconds(fields[5]))
        row.check(num_classes)
        return row

    def check(self, num_classes: int | None = None) -> None:
        """Raise ``ValueError`` naming the first inconsistent field of this row."""
        if self.idx < 0:
            raise ValueError(f"idx {self.idx} is negative")
        if self.label < 0 or (num_classes is not None and self.label >= num_classes):
            raise ValueError(f"label {self.label} is not a class in [0, {num_classes})")
        if self.predict < ABSTAIN or (num_classes is not None and self.predict >= num_classes):
            raise ValueError(f"predict {self.predict} is neither a class nor {ABSTAIN} (abstain)")
        if not math.isfinite(self.radius) or self.radius < 0:
            raise ValueError(f"radius {self.radius} is not a finite number >= 0")
        if self.abstained and self.radius != 0:
            raise ValueError(f"radius {self.radius} on an abstention (predict {ABSTAIN})")
        if self.correct != int(self.predict == self.label):
            raise ValueError(
                f"correct={self.correct} but predict {self.predict} "
                f"{'==' if self.predict == self.label else '!='} label {self.label}"
            )
        if not math.isfinite(self.time) or not 0 <= self.time <= MAX_SECONDS:
            raise ValueError(f"time {self.time} is not a duration (0 to {MAX_SECONDS:.0f} s)")

    @classmethod
    def from_numbers(cls, row: Sequence[float]) -> CertifiedImage:
        """The row from its six numbers (e.g. a gathered float64 tensor row)."""
        idx, label, predict, radius, correct, seconds = (float(v) for v in row)
        return cls(int(idx), int(label), int(predict), radius, int(correct), seconds)

    def same_certificate(self, other: CertifiedImage) -> bool:
        """Equal in every column but the time."""
        return asdict(self) | {"time": 0.0} == asdict(other) | {"time": 0.0}


def _integer(text: str, name: str) -> int:
    if not re.fullmatch(r"-?\d+", text.strip()):
        raise ValueError(f"{name} {text!r} is not an integer")
    return int(text)


def _parse_seconds(text: str) -> float:
    """Seconds in ``str(datetime.timedelta)`` text (``[D day[s], ]H:MM:SS[.ffffff]``) or number."""
    match = re.fullmatch(r"(?:(-?\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d+)?)", text.strip())
    if match is None:
        return float(text)
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def read_tsv(
    path: str | Path,
    *,
    num_classes: int | None = None,
    indices: Container[int] | None = None,
) -> tuple[list[CertifiedImage], bool]:
    """Rows of a certification TSV, and whether its end was torn (an incomplete last line).

    A last line without its newline, or a last line whose fields do not parse, is a row cut by an
    interruption: it is left out and reported as torn. Any other bad line raises.

    Args:
        path: The TSV file.
        num_classes: When given, labels and predictions must be classes in ``[0, num_classes)``.
        indices: When given, every row's ``idx`` must be in it (the images being certified).

    Returns:
        ``(rows, torn)``.

    Raises:
        SettingError: For a wrong header, a malformed or inconsistent row (naming the line), a
            repeated index or an index outside ``indices``.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "c.tsv"
        >>> write_tsv(path, [CertifiedImage(0, 1, 1, 0.3, 1, 0.1)])
        >>> read_tsv(path)[0][0].radius
        0.3
    """
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError:
        raise SettingError(f"{path} is not a certification TSV: it is not UTF-8 text") from None
    lines = text.split("\n")
    torn = lines.pop() != ""  # text after the last newline is an unfinished line
    if not lines:
        return [], torn
    if tuple(lines[0].split("\t")) != HEADER:
        raise SettingError(
            f"{path} is not a certification TSV: its header is not {' '.join(HEADER)}"
        )
    rows: list[CertifiedImage] = []
    seen: set[int] = set()
    for number, line in enumerate(lines[1:], start=2):
        try:
            row = CertifiedImage.from_line(line, num_classes)
        except ValueError as err:
            cut = len(line.split("\t")) < len(HEADER) or line.endswith("\t")
            if number == len(lines) and cut:  # the last complete line: a row cut short
                torn = True
                break
            raise SettingError(
                f"{path} line {number} is not a valid certification row: {err}"
            ) from None
        if row.idx in seen:
            raise SettingError(f"{path} line {number} repeats dataset index {row.idx}")
        if indices is not None and row.idx not in indices:
            raise SettingError(
                f"{path} line {number} has dataset index {row.idx}, which is not among the "
                "images being certified"
            )
        seen.add(row.idx)
        rows.append(row)
    return rows, torn


def write_tsv(path: str | Path, rows: Iterable[CertifiedImage]) -> None:
    """Write a whole TSV (header and rows) atomically: a reader sees the old file or the new one.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "c.tsv"
        >>> write_tsv(path, [CertifiedImage(0, 1, 1, 0.5, 1, 0.1)])
        >>> path.read_text().split()[:6]
        ['idx', 'label', 'predict', 'radius', 'correct', 'time']
    """
    atomic_write(Path(path), "\t".join(HEADER) + "\n" + "".join(row.to_line() for row in rows))


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never half a file).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "notes.txt"
        >>> atomic_write(path, "done")
        >>> path.read_text()
        'done'
    """
    temporary = path.with_name(path.name + ".tmp")
    try:
        with temporary.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:  # a failed write leaves no half-written temporary behind
        if temporary.is_file():
            temporary.unlink()
        raise


def certified_accuracy(
    radius: np.ndarray | Sequence[float], correct: np.ndarray | Sequence[int], grid: Sequence[float]
) -> np.ndarray:
    """Fraction of images certified correct with radius at least r, for each r of ``grid``.

    Cohen et al. (2019), Section 4: an abstention has radius 0 and is never correct.

    Examples:
        >>> certified_accuracy([0.2, 0.8, 0.0], [1, 1, 0], [0.0, 0.5]).tolist()
        [0.6666666666666666, 0.3333333333333333]
    """
    radius = np.asarray(radius, dtype=np.float64)
    if len(radius) == 0:
        return np.zeros(len(grid))
    correct = np.asarray(correct, dtype=bool)
    return (correct[None, :] & (radius[None, :] >= np.asarray(grid)[:, None])).mean(axis=1)


def summarize(rows: Sequence[CertifiedImage], radii: Sequence[float]) -> dict[str, float]:
    """Certified accuracy at each radius, ACR, count certified-and-correct and abstain rate.

    ACR is the mean of ``radius * correct`` (Zhai et al. 2020, MACER).

    Returns:
        ``{"certified_acc@<r>": ..., "acr": ..., "correct_certified": ..., "abstain_rate": ...,
        "num_images": ...}``; empty when there are no rows.

    Examples:
        >>> rows = [CertifiedImage(0, 1, 1, 0.4, 1, 0.0), CertifiedImage(1, 2, -1, 0.0, 0, 0.0)]
        >>> summary = summarize(rows, [0.0, 0.25])
        >>> summary["acr"], summary["abstain_rate"], summary["certified_acc@0.25"]
        (0.2, 0.5, 0.5)
    """
    if not rows:
        return {}
    radius = np.array([row.radius for row in rows], dtype=np.float64)
    correct = np.array([row.correct for row in rows], dtype=bool)
    accuracy = certified_accuracy(radius, correct, radii)
    summary = {f"certified_acc@{r:g}": float(a) for r, a in zip(radii, accuracy, strict=True)}
    summary["acr"] = float(np.mean(np.where(correct, radius, 0.0)))
    summary["correct_certified"] = float(correct.sum())
    summary["abstain_rate"] = float(np.mean([row.abstained for row in rows]))
    summary["num_images"] = float(len(rows))
    return summary


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, values): the classifier of the rows.

    Examples:
        >>> model_fingerprint(nn.Linear(2, 2)) == model_fingerprint(nn.Linear(2, 2))
        False
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):  # a module's get_extra_state(): any object
            digest.update(
                f"{name}:{type(tensor).__qualname__}:{extra_state_text(tensor)};".encode()
            )
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def extra_state_text(state: Any) -> str:
    """A module's extra state (``get_extra_state``) as text for :func:`model_fingerprint`.

    Its pickle where it has one (equal states give equal bytes), else its ``repr``.

    Examples:
        >>> extra_state_text({"scale": 2}) == extra_state_text({"scale": 2})
        True
    """
    try:
        return pickle.dumps(state, protocol=4).hex()
    except Exception:  # an object that cannot be pickled: its repr is the best we have
        return repr(state)


def dataset_fingerprint(dataset: Any) -> tuple[str, list[int]]:
    """SHA-256 of a map-style dataset of ``(image, label)`` items, and its labels, in one pass.

    The hash covers every index, label, shape and pixel: which images a file's rows are about.

    Examples:
        >>> images = [(torch.zeros(1, 2, 2), 3), (torch.ones(1, 2, 2), 4)]
        >>> digest, labels = dataset_fingerprint(images)
        >>> labels, digest == dataset_fingerprint([images[0], (torch.ones(1, 2, 2), 5)])[0]
        ([3, 4], False)
    """
    digest, labels = hashlib.sha256(), []
    for index in range(len(dataset)):
        image, label = dataset[index]
        image = torch.as_tensor(image)
        data = image.detach().cpu().to(torch.float32).contiguous().reshape(-1)
        digest.update(f"{index}:{int(label)}:{tuple(image.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
        labels.append(int(label))
    return digest.hexdigest(), labels


def selected_indices(
    end: int, skip: int = 1, first_image: int = 0, max_images: int | None = None
) -> range:
    """The dataset indices an evaluation selects.

    Of ``[0, end)``, the multiples of ``skip`` from ``first_image`` on, at most ``max_images``.
    Multiples of ``skip`` whatever ``first_image`` is, so the parts of a run split across machines
    select exactly the images the whole run would.

    Examples:
        >>> list(selected_indices(100, skip=20, first_image=30))
        [40, 60, 80]
        >>> list(selected_indices(10, skip=2, max_images=3))
        [0, 2, 4]
    """
    start = -(-first_image // skip) * skip  # the first multiple of skip >= first_image
    selected = range(start, max(start, end), skip)
    return selected if max_images is None else selected[:max_images]


def selected_rows(
    rows: Iterable[CertifiedImage], settings: Mapping[str, Any]
) -> list[CertifiedImage]:
    """The rows of the images a run with ``settings`` selected (:func:`selected_indices`).

    Of the first ``image_range`` images (the trainer's batch limit), every ``skip``-th from
    ``first_image`` on, at most ``max_images``. A TSV resumed by runs with other selections
    (nested subsets, say every 10th image and then every 5th) holds rows of all of them; the
    latest run's metrics, and a report of them, use only its own selection. The settings are the
    sidecar's (:func:`read_settings`), whose :data:`SELECTION_SETTINGS` are checked here (None or
    absent: no limit; ``skip`` 1; ``first_image`` 0).

    Raises:
        SettingError: If one of them is not a positive integer (``first_image``: >= 0) or None.

    Examples:
        >>> rows = [CertifiedImage(i, 0, 0, 0.1, 1, 0.0) for i in range(10)]
        >>> [r.idx for r in selected_rows(rows, {"skip": 3, "max_images": 3})]
        [0, 3, 6]
        >>> [r.idx for r in selected_rows(rows, {"skip": 2, "image_range": 5})]
        [0, 2, 4]
        >>> [r.idx for r in selected_rows(rows, {"skip": 2, "first_image": 5})]
        [6, 8]
    """
    rows = list(rows)
    skip, first = settings.get("skip", 1), settings.get("first_image", 0)
    limit, image_range = settings.get("max_images"), settings.get("image_range")
    for name, value in (("skip", skip), ("max_images", limit), ("image_range", image_range)):
        if value is not None and (type(value) is not int or value < 1):
            raise SettingError(f"{name} must be a positive integer, got {value!r}")
    if type(first) is not int or first < 0:
        raise SettingError(f"first_image must be an integer >= 0, got {first!r}")
    end = image_range if image_range is not None else max((r.idx + 1 for r in rows), default=0)
    wanted = selected_indices(end, skip, first, limit)  # a range: membership is arithmetic
    return [row for row in rows if row.idx in wanted]


def read_settings(path: Path) -> dict[str, Any]:
    """The settings sidecar of a TSV (``<tsv>.json``); ``SettingError`` if missing or not JSON.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "c.tsv.json"
        >>> _ = path.write_text(json.dumps({"n": 100}))
        >>> read_settings(path)
        {'n': 100}
    """
    if not path.is_file():
        raise SettingError(
            f"settings file {path} is missing, so the rows beside it cannot be resumed safely; "
            "move the TSV away or give another output path"
        )
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SettingError(f"settings file {path} is not JSON: {err}") from None
    if not isinstance(stored, dict):
        raise SettingError(f"settings file {path} does not hold a JSON object")
    return stored


def check_settings(
    stored: Mapping[str, Any], current: Mapping[str, Any], keys: Iterable[str], where: str
) -> None:
    """Refuse (``SettingError``) when ``stored`` and ``current`` differ in any of ``keys``.

    Examples:
        >>> try:
        ...     check_settings({"n": 10}, {"n": 100}, ["n"], "c.tsv")
        ... except SettingError as err:
        ...     print(str(err)[:59])
        c.tsv was written with other settings (n=10 there, 100 now)
    """
    differ = [
        f"{key}={stored.get(key)!r} there, {current[key]!r} now"
        for key in keys
        if stored.get(key) != current[key]
    ]
    if differ:
        raise SettingError(
            f"{where} was written with other settings ({'; '.join(differ)}); its rows cannot be "
            "mixed with these: give another output path or delete the file and its .json"
        )


def _radius_cap(settings: Mapping[str, Any]) -> float:
    """The largest radius the settings' (sigma, n, alpha) can certify, a hair above; inf without."""
    try:
        cap = largest_certified_radius(settings["sigma"], settings["n"], settings["alpha"])
    except (KeyError, TypeError, SettingError):
        return math.inf
    return max(cap, 0.0) * (1 + 1e-9)  # below 0 when n is too small: only radius 0 is possible


def check_radius_cap(
    rows: Iterable[CertifiedImage], settings: Mapping[str, Any], where: str, remedy: str = ""
) -> None:
    """Refuse a row whose radius ``settings`` cannot give: beyond their largest, or off their lattice.

    The cap is ``sigma * Phi^-1(alpha ** (1 / n))`` (all n samples on the top class, see
    :func:`robust.statistics.largest_certified_radius`). Below it, CERTIFY gives only the radii
    of whole counts k of n (:func:`robust.statistics.nearest_certifiable_radius`), so a row
    certified at another sigma or n is refused too, within :data:`LATTICE_TOLERANCE`. Settings
    without sigma, n and alpha bound nothing (:func:`read_certificates` requires them).

    Args:
        rows: The rows to check.
        settings: The sidecar's (or the run's) settings.
        where: The file, named in the message.
        remedy: Appended to the message (e.g. ``": give another output path"``).

    Raises:
        SettingError: Naming the first row beyond the cap, the cap and the settings.

    Examples:
        >>> settings = {"sigma": 0.25, "n": 1000, "alpha": 0.001}
        >>> check_radius_cap([CertifiedImage(0, 1, 1, 0.5011494758808173, 1, 0.0)], settings, "c")
        >>> for radius in (99.0, 0.5):
        ...     try:
        ...         check_radius_cap([CertifiedImage(0, 1, 1, radius, 1, 0.0)], settings, "c")
        ...     except SettingError as err:
        ...         print(str(err).split(", the largest")[0].split(" (the nearest")[0])
        c: row 0 has radius 99, beyond 0.615816
        c: row 0 has radius 0.5, which sigma 0.25, n 1000 and alpha 0.001 cannot give
    """
    cap = _radius_cap(settings)
    rows = list(rows)
    for row in rows:
        if row.radius > cap:
            raise SettingError(
                f"{where}: row {row.idx} has radius {row.radius:g}, beyond {cap:.6g}, the largest "
                f"that sigma {settings['sigma']}, n {settings['n']} and alpha "
                f"{settings['alpha']} can certify; the file is corrupt or was written "
                f"otherwise{remedy}"
            )
    if math.isinf(cap):
        return
    certified = [row for row in rows if not row.abstained]
    radii = np.array([row.radius for row in certified], dtype=np.float64)
    nearest = nearest_certifiable_radius(radii, settings["sigma"], settings["n"], settings["alpha"])
    off = np.abs(nearest - radii) > LATTICE_TOLERANCE * np.maximum(radii, settings["sigma"])
    if np.any(off):
        row = certified[int(np.argmax(off))]
        closest = float(nearest[int(np.argmax(off))])
        raise SettingError(
            f"{where}: row {row.idx} has radius {row.radius!r}, which sigma "
            f"{settings['sigma']}, n {settings['n']} and alpha {settings['alpha']} cannot give "
            f"(the nearest they can: {closest!r}); the row was certified otherwise or the file "
            f"is corrupt{remedy}"
        )


def read_certificates(
    path: str | Path, required: Iterable[str] = ()
) -> tuple[list[CertifiedImage], bool, dict[str, Any]]:
    """Rows of a certification TSV checked against its sidecar, whether it was torn, the sidecar.

    For reading a finished file (joining, comparing): the sidecar ``<tsv>.json`` must hold a
    valid sigma, n and alpha (:data:`CERTIFICATE_SETTINGS`) and the ``required`` keys; every row
    is checked by :func:`read_tsv` (against ``num_classes`` when the sidecar has it) and its
    radius against the largest those settings can certify (:func:`check_radius_cap`).

    Args:
        path: The TSV.
        required: Further keys the sidecar must hold (their values may be null).

    Returns:
        ``(rows, torn, settings)``.

    Raises:
        SettingError: A missing or incomplete sidecar, a bad setting in it, a bad row.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "c.tsv"
        >>> write_tsv(path, [CertifiedImage(0, 1, 1, 0.5011494758808173, 1, 0.1)])
        >>> sidecar = path.with_name("c.tsv.json")
        >>> _ = sidecar.write_text('{"sigma": 0.25, "n": 1000, "alpha": 0.001}')
        >>> rows, torn, settings = read_certificates(path)
        >>> rows[0].radius, torn, settings["n"]  # 991 of 1,000 samples on class 1
        (0.5011494758808173, False, 1000)
        >>> _ = sidecar.write_text('{"sigma": 0.25, "n": 1000}')
        >>> try:
        ...     read_certificates(path)
        ... except SettingError as err:
        ...     print(str(err).split(", which")[0].split(" lacks ")[1])
        alpha
    """
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        raise SettingError(
            f"{path} has no settings file {sidecar}: its rows cannot be checked without the "
            f"{', '.join(CERTIFICATE_SETTINGS)} it records"
        )
    settings = read_settings(sidecar)
    keys = list(dict.fromkeys((*CERTIFICATE_SETTINGS, *required)))
    missing = [key for key in keys if key not in settings]
    if missing:
        raise SettingError(
            f"settings file {sidecar} lacks {', '.join(missing)}, which the rows of {path} need; "
            f"it must hold {', '.join(keys)}"
        )
    num_classes = settings.get("num_classes")
    try:
        check_real("sigma", settings["sigma"], low=0)
        check_int("n", settings["n"], minimum=1, maximum=MAX_SAMPLES)
        check_real("alpha", settings["alpha"], low=0, high=1)
        if num_classes is not None:
            check_int("num_classes", num_classes, minimum=2)
    except SettingError as err:
        raise SettingError(f"settings file {sidecar}: {err}") from None
    rows, torn = read_tsv(path, num_classes=num_classes)
    check_radius_cap(rows, settings, str(path))
    return rows, torn, settings


def open_resumable(
    path: Path,
    settings: Mapping[str, Any],
    checked: Iterable[str],
    *,
    num_classes: int,
    labels: Sequence[int],
    owner: str = "Certification",
) -> list[CertifiedImage]:
    """The rows of a TSV to resume, checked against ``settings``; or a new file with its sidecar.

    A file with rows written with other values of the ``checked`` settings, without its sidecar,
    with a bad row, or with a row whose label is not the dataset's is refused; a torn last line is
    dropped (its image is certified again). A file without rows starts afresh with this run's
    settings (a run that stopped before its first row, e.g. a mode that failed, leaves no
    settings behind for the rows of the next). A resumed file's sidecar then holds this run's
    :data:`SELECTION_SETTINGS`, which say the images the latest run selected (see
    :func:`selected_rows`); its other settings stay those of the run that created the file, and
    a run that resumes it with other values of settings that do not determine the rows (speed
    options such as ``batch_size`` or ``compile``) appends them to its ``resumed_with`` list,
    with the number of rows already there: each row's time has its settings on record.

    Args:
        path: The TSV; its settings are in ``<path>.json``.
        settings: The settings of this run (written to the sidecar of a new file).
        checked: The settings that must match the sidecar's.
        num_classes: Classes of the dataset (labels and predictions are checked against it).
        labels: The dataset's labels, by index (each row's index and label are checked).
        owner: Named in messages.

    Raises:
        SettingError: For any refusal, naming the file and the reason.

    Examples:
        >>> import tempfile
        >>> path, settings = Path(tempfile.mkdtemp()) / "c.tsv", {"n": 10}
        >>> open_resumable(path, settings, ["n"], num_classes=3, labels=[0, 1])  # a new file
        []
        >>> write_tsv(path, [CertifiedImage(1, 1, 1, 0.3, 1, 0.0)])
        >>> [row.idx for row in open_resumable(path, settings, ["n"], num_classes=3, labels=[0, 1])]
        [1]
    """
    if path.exists() and not path.is_file():  # refused before its sidecar is written
        raise SettingError(
            f"{owner} output {path} is a folder (or not a file); give the path of a .tsv file, "
            f"e.g. {path / 'certify.tsv'}"
        )
    sidecar = path.with_name(path.name + ".json")
    rows: list[CertifiedImage] = []
    if path.is_file() and path.stat().st_size > 0:
        rows, torn = read_tsv(path, num_classes=num_classes, indices=range(len(labels)))
    if rows:
        if not sidecar.is_file():
            raise SettingError(
                f"{owner} output {path} exists without its settings file {sidecar}, so it cannot "
                "be resumed safely; move it away or give another output path"
            )
        stored = read_settings(sidecar)
        check_settings(stored, settings, checked, f"{owner} output {path}")
        check_radius_cap(rows, settings, f"{owner} output {path}", ": give another output path")
        for row in rows:
            if row.label != int(labels[row.idx]):
                raise SettingError(
                    f"{owner} output {path}: row {row.idx} has label {row.label} but the "
                    f"dataset's image {row.idx} has label {int(labels[row.idx])}; the file was "
                    "written for other data: give another output path"
                )
        if torn:
            write_tsv(path, rows)
        selection = {k: settings[k] for k in SELECTION_SETTINGS if k in settings}
        updated = stored | selection  # the latest run's images
        # settings that do not determine the rows (speed options): this run's, where they differ
        others = set(checked) | set(SELECTION_SETTINGS) | {RESUMED_KEY}
        changed = {k: v for k, v in settings.items() if k not in others and stored.get(k) != v}
        if changed:
            runs = stored.get(RESUMED_KEY) if isinstance(stored.get(RESUMED_KEY), list) else []
            updated[RESUMED_KEY] = [*runs, {"rows_before": len(rows), "settings": changed}]
        if updated != stored:
            atomic_write(sidecar, json.dumps(updated, indent=2) + "\n")
        return rows
    # a new file, or one without rows (a run that stopped before its first): nothing to resume,
    # so this run's settings are the file's
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(sidecar, json.dumps(dict(settings), indent=2) + "\n")
    write_tsv(path, [])
    return []


class CertificateFile:
    """A certification TSV being written: resumed rows, appended rounds, index order at the end.

    Args:
        path: The TSV (its settings in ``<path>.json``).
        settings: This run's settings; ``checked`` of them must equal those of a file resumed.
        checked: The settings that determine the rows.
        num_classes: Classes of the dataset.
        labels: The dataset's labels, by index.
        owner: Named in messages.

    Raises:
        SettingError: When an existing file cannot be resumed (see :func:`open_resumable`).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "c.tsv"
        >>> file = CertificateFile(path, {"n": 10}, ["n"], num_classes=3, labels=[2, 0, 0, 0, 1])
        >>> file.append([CertifiedImage(4, 1, 1, 0.2, 1, 0.0), CertifiedImage(0, 2, -1, 0.0, 0, 0.0)])
        >>> file.close()
        >>> [row.idx for row in read_tsv(path)[0]]
        [0, 4]
    """

    def __init__(
        self,
        path: Path,
        settings: Mapping[str, Any],
        checked: Iterable[str],
        *,
        num_classes: int,
        labels: Sequence[int],
        owner: str = "Certification",
    ) -> None:
        self.path = path
        rows = open_resumable(
            path, settings, checked, num_classes=num_classes, labels=labels, owner=owner
        )
        self.rows = {row.idx: row for row in rows}
        self._order = [row.idx for row in rows]
        self._handle: Any = None

    def append(self, rows: Iterable[CertifiedImage]) -> None:
        """Append rows to the file and flush them (an interruption keeps them)."""
        rows = list(rows)
        if self._handle is None:
            self._handle = self.path.open("a")
        self._handle.write("".join(row.to_line() for row in rows))
        self._handle.flush()
        for row in rows:
            self.rows[row.idx] = row
            self._order.append(row.idx)

    def close(self) -> None:
        """Close the file, rewritten in dataset-index order if resuming left it out of order."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._order != sorted(self._order):
            write_tsv(self.path, (self.rows[i] for i in sorted(self.rows)))
            self._order = sorted(self.rows)
