"""Randomized-smoothing certification of the evaluation set as a Lightning callback.

At the end of ``trainer.test`` (and, optionally, every k validation epochs with a smaller n) the
callback runs CERTIFY (Cohen, Rosenfeld & Kolter 2019, Algorithm 1, via
:class:`robust.smoothing.Smooth`) on the module's pixel-space classifier for every ``skip``-th
evaluation image, and logs certified accuracy over a radius grid and the average certified radius
(ACR; Zhai et al. 2020, "MACER": the mean radius, counting 0 for wrong or abstained images).

Per image it writes one row ``idx label predict radius correct time`` of a tab-separated file in
the format of locuslab/smoothing's ``certify.py`` (header line, rows in dataset-index order,
flushed as they come), with the settings that determine the rows in a sidecar ``<tsv>.json``.

Exact on N processes: dataset indices are sharded by rank without padding
(:mod:`callbacks.distributed`), every image's noise is seeded by (seed, dataset index), rows are
gathered round by round and only rank 0 writes, so the rows do not depend on the number of
processes or on ``batch_size``. Resumable: restarted with the same ``output`` after an
interruption, the callback keeps the complete rows already written (a torn last line is dropped
and redone), certifies the rest and ends with the rows of an uninterrupted run; a file written
with other settings is refused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from scipy.stats import norm
from torch import Tensor, nn
from tqdm.auto import tqdm

from callbacks.distributed import batches, evaluation_dataset, gather_rows, rounds, shard
from robust.smoothing import ABSTAIN, DEFAULT_NOISE_BLOCK, Smooth
from robust.statistics import smallest_useful_n

__all__ = [
    "HEADER",
    "Certification",
    "CertifiedImage",
    "plot_certified_accuracy",
    "read_tsv",
    "summarize",
]

HEADER = ("idx", "label", "predict", "radius", "correct", "time")
"""Columns of the TSV, as written by locuslab/smoothing's ``certify.py``."""

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST.update({"float16": torch.float16})
# Settings a resumed TSV must share with the run that wrote it: they determine every row.
CHECKED_SETTINGS = (
    "sigma",
    "n0",
    "n",
    "alpha",
    "seed",
    "noise_block",
    "autocast",
    "channels_last",
    "device_type",
    "model_sha256",
)
# Under ``fast_dev_run`` the callback still runs, on this many images with at most these n0, n.
FAST_DEV_IMAGES, FAST_DEV_N0, FAST_DEV_N = 2, 16, 64
# Images per round ~ this many forward batches' worth of noisy samples (then rows are written).
ROUND_FORWARDS = 4


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
    """

    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: float

    def to_line(self) -> str:
        """The row as one TSV line (radius written exactly: ``repr`` round-trips a float)."""
        elapsed = str(datetime.timedelta(seconds=self.time))
        fields = (self.idx, self.label, self.predict, repr(self.radius), self.correct, elapsed)
        return "\t".join(map(str, fields)) + "\n"

    @classmethod
    def from_line(cls, line: str) -> CertifiedImage:
        """Parse a TSV line; ``ValueError`` if it is not a complete row."""
        fields = line.rstrip("\n").split("\t")
        if len(fields) != len(HEADER):
            raise ValueError(f"expected {len(HEADER)} tab-separated fields, got {len(fields)}")
        idx, label, predict, correct = (int(fields[k]) for k in (0, 1, 2, 4))
        radius = float(fields[3])
        if idx < 0 or correct not in (0, 1) or not math.isfinite(radius) or radius < 0:
            raise ValueError("field out of range")
        return cls(idx, label, predict, radius, correct, _parse_seconds(fields[5]))

    def same_certificate(self, other: CertifiedImage) -> bool:
        """Equal in every column but the time."""
        return asdict(self) | {"time": 0.0} == asdict(other) | {"time": 0.0}


def _parse_seconds(text: str) -> float:
    """Seconds in ``str(datetime.timedelta)`` text (``[D day[s], ]H:MM:SS[.ffffff]``) or number."""
    match = re.fullmatch(r"(?:(-?\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d+)?)", text.strip())
    if match is None:
        return float(text)
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def read_tsv(path: str | Path) -> tuple[list[CertifiedImage], bool]:
    """Rows of a certification TSV, and whether its end was torn (an incomplete last line).

    A last line without its newline, or whose fields do not parse, is a row cut by an interruption:
    it is left out and reported as torn. Any other malformed line, a wrong header or a repeated
    index raises ``ValueError``.
    """
    text = Path(path).read_text()
    lines = text.split("\n")
    torn = lines.pop() != ""  # text after the last newline is an unfinished line
    if not lines:
        return [], torn
    if tuple(lines[0].split("\t")) != HEADER:
        raise ValueError(f"{path} is not a certification TSV: its header is not {' '.join(HEADER)}")
    rows: list[CertifiedImage] = []
    seen: set[int] = set()
    for number, line in enumerate(lines[1:], start=2):
        try:
            row = CertifiedImage.from_line(line)
        except ValueError as err:
            if number == len(lines):  # the last complete line: a row cut short
                torn = True
                break
            raise ValueError(f"{path} line {number} is not a certification row: {err}") from None
        if row.idx in seen:
            raise ValueError(f"{path} line {number} repeats dataset index {row.idx}")
        seen.add(row.idx)
        rows.append(row)
    return rows, torn


def summarize(rows: Sequence[CertifiedImage], radii: Sequence[float]) -> dict[str, float]:
    """Certified accuracy at each radius, ACR, count certified-and-correct and abstain rate.

    Certified accuracy at r is the fraction of images certified correct with radius >= r (Cohen
    et al. 2019, Section 4); ACR is the mean of ``radius * correct`` (Zhai et al. 2020, MACER).

    Returns:
        ``{"certified_acc@<r>": ..., "acr": ..., "correct_certified": ..., "abstain_rate": ...,
        "num_images": ...}``; empty when there are no rows.
    """
    if not rows:
        return {}
    radius = np.array([row.radius for row in rows], dtype=np.float64)
    correct = np.array([row.correct for row in rows], dtype=bool)
    summary = {f"certified_acc@{r:g}": float(np.mean(correct & (radius >= r))) for r in radii}
    summary["acr"] = float(np.mean(np.where(correct, radius, 0.0)))
    summary["correct_certified"] = float(correct.sum())
    summary["abstain_rate"] = float(np.mean([row.predict == ABSTAIN for row in rows]))
    summary["num_images"] = float(len(rows))
    return summary


def plot_certified_accuracy(
    rows: Sequence[CertifiedImage],
    radii: Sequence[float],
    title: str = "",
    cap: float | None = None,
) -> Any:
    """Certified accuracy against L2 radius (a ``matplotlib.figure.Figure``), grid points marked.

    ``cap``, when given, is drawn as a dotted line: the largest radius n samples can certify,
    sigma * Phi^-1(alpha ** (1 / n)) (the Clopper-Pearson bound when all n samples agree).
    """
    from matplotlib.figure import Figure

    radius = np.array([row.radius for row in rows], dtype=np.float64)
    correct = np.array([row.correct for row in rows], dtype=bool)
    top = max([*radii, *radius.tolist(), cap or 0.0, 1e-3]) * 1.05
    grid = np.linspace(0.0, top, 400)
    curve = [(correct & (radius >= r)).mean() if len(rows) else 0.0 for r in grid]
    marks = [(correct & (radius >= r)).mean() if len(rows) else 0.0 for r in radii]
    figure = Figure(figsize=(5.5, 3.8), layout="constrained")
    axes = figure.add_subplot()
    if cap is not None:
        axes.axvline(
            cap, color="grey", linestyle=":", label=f"largest certifiable radius {cap:.3g}"
        )
        axes.legend(loc="upper right", fontsize=8)
    axes.plot(grid, curve, color="tab:blue")
    axes.scatter(list(radii), marks, color="tab:blue", s=14, zorder=3)
    axes.set(xlabel="L2 radius (pixels in [0, 1])", ylabel="certified accuracy", ylim=(0, 1.02))
    axes.set_xlim(0, top)
    axes.grid(alpha=0.3)
    axes.set_title(title, fontsize=9)
    return figure


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, values): the classifier of the rows."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _check_number(name: str, value: object, *, minimum: float, integer: bool) -> None:
    kind = "an integer" if integer else "a number"
    wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else int | float)
    if wrong_type or not math.isfinite(value) or value < minimum:
        raise ValueError(f"Certification {name} must be {kind} >= {minimum:g}, got {value!r}")


class Certification(Callback):
    """Certify the evaluation set with randomized smoothing; log, write a TSV, plot, resume.

    Logged (the same value on every process; ``certify/`` after testing, ``val_certify/`` after
    validation): ``certified_acc@<r>`` for each radius in ``radii``, ``acr``, ``correct_certified``,
    ``abstain_rate`` and ``num_images``. After testing, rank 0 also writes ``output`` (TSV) and its
    settings ``output + ".json"``, a PNG of certified accuracy against radius next to it, and the
    same figure to TensorBoard. Validation certification only logs (no files, no resume).

    Under ``fast_dev_run`` it certifies 2 images with n0 <= 16, n <= 64 and writes no files
    (Lightning writes no logs or checkpoints then either). The number of evaluated batches
    (``limit_test_batches``) does not limit it: ``skip`` and ``max_images`` choose the images.

    Attributes:
        results: Rows of the last test certification (selected images, dataset-index order).
        summary: Its summary, see :func:`summarize`.
        val_results: Rows of the last validation certification.
        val_summary: Its summary.
        output_path: The TSV of the last test certification (``None`` under ``fast_dev_run``).

    Args:
        sigma: Noise standard deviation in pixel units, > 0; ``None`` takes the module's ``sigma``
            (e.g. :class:`~lightning_modules.noise.NoiseAugmentedClassifier`), so one callback
            config serves models trained with several sigmas.
        n0: Selection samples per image (>= 1); Cohen et al. use 100.
        n: Estimation samples per image (>= 1); Cohen et al. use 100,000.
        alpha: Failure probability of each certificate, in (0, 1); Cohen et al. use 0.001.
        batch_size: Noisy samples per forward pass (>= 1); does not change the results.
        max_images: Certify at most this many images (>= 1; ``None``: all selected).
        skip: Certify every ``skip``-th dataset index (>= 1), as locuslab's ``--skip``.
        seed: Base seed of the noise (>= 0); image i's noise is seeded by (seed, i).
        every_n_val_epochs: Also certify after every k-th validation epoch (0: never).
        val_n: n for validation certification (>= 1).
        output: TSV path; default ``<trainer.log_dir>/certify_test.tsv``. Give the same path to
            resume an interrupted run.
        radii: Radii (>= 0) at which certified accuracy is logged.
        autocast: ``None`` (full precision), ``"bf16"`` or ``"fp16"``: run the classifier under
            autocast (the certificate holds for the classifier as evaluated).
        channels_last: Run the classifier in channels-last memory format: the same classifier up to
            float rounding, about twice as fast on CPUs; for images of several channels the noise
            is drawn in another order. ``None`` (default): on for CPUs, off otherwise.
        compile: ``torch.compile`` the classifier for certification.
        stop_after: Stop after this many newly certified test images (>= 0), as if interrupted.
        noise_block: Samples per independently seeded noise block (see ``Smooth``; part of the
            noise seed).

    Raises:
        ValueError: At construction, for a setting outside its allowed values (named); at test
            start, when ``output`` holds rows written with other settings.
    """

    def __init__(
        self,
        sigma: float | None = None,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        batch_size: int = 1000,
        max_images: int | None = None,
        skip: int = 1,
        seed: int = 0,
        every_n_val_epochs: int = 0,
        val_n: int = 1000,
        output: str | None = None,
        radii: Sequence[float] = DEFAULT_RADII,
        autocast: str | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        stop_after: int | None = None,
        noise_block: int = DEFAULT_NOISE_BLOCK,
    ) -> None:
        super().__init__()
        if sigma is not None:
            if isinstance(sigma, bool) or not isinstance(sigma, int | float):
                raise ValueError(f"Certification sigma must be a number > 0, got {sigma!r}")
            if not (math.isfinite(sigma) and sigma > 0):
                raise ValueError(f"Certification sigma must be a number > 0, got {sigma!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
            raise ValueError(
                f"Certification alpha must be in the open interval (0, 1), got {alpha!r}"
            )
        for name, value in (("n0", n0), ("n", n), ("batch_size", batch_size), ("skip", skip)):
            _check_number(name, value, minimum=1, integer=True)
        _check_number("val_n", val_n, minimum=1, integer=True)
        _check_number("noise_block", noise_block, minimum=1, integer=True)
        _check_number("seed", seed, minimum=0, integer=True)
        _check_number("every_n_val_epochs", every_n_val_epochs, minimum=0, integer=True)
        if max_images is not None:
            _check_number("max_images", max_images, minimum=1, integer=True)
        if stop_after is not None:
            _check_number("stop_after", stop_after, minimum=0, integer=True)
        radii = [float(r) for r in radii]
        if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
            raise ValueError(
                f"Certification radii must be a non-empty list of numbers >= 0, got {radii}"
            )
        if autocast is not None and autocast not in AUTOCAST:
            raise ValueError(
                f"Certification autocast must be None, 'bf16' or 'fp16', got {autocast!r}"
            )
        useful = smallest_useful_n(alpha)
        for name, value, used in (("n", n, True), ("val_n", val_n, every_n_val_epochs > 0)):
            if used and value < useful:
                warnings.warn(
                    f"Certification {name}={value} can never certify a radius at alpha={alpha}: "
                    f"every image will abstain; the smallest useful {name} is {useful}",
                    UserWarning,
                    stacklevel=2,
                )
        self.sigma = None if sigma is None else float(sigma)
        self.n0, self.n, self.alpha, self.batch_size = n0, n, float(alpha), batch_size
        self.max_images, self.skip, self.seed = max_images, skip, seed
        self.every_n_val_epochs, self.val_n = every_n_val_epochs, val_n
        self.output = output
        self.radii = sorted(set(radii))
        self.autocast = None if autocast is None else ("bf16" if "b" in autocast else "fp16")
        self.channels_last, self.compile = channels_last, compile
        self.stop_after, self.noise_block = stop_after, noise_block
        self.results: list[CertifiedImage] = []
        self.summary: dict[str, float] = {}
        self.val_results: list[CertifiedImage] = []
        self.val_summary: dict[str, float] = {}
        self.output_path: Path | None = None
        self._existing: dict[int, CertifiedImage] = {}
        self._file_order: list[int] = []
        self._val_epochs = 0
        self._compiled: tuple[nn.Module, nn.Module] | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve the output, check its settings and load the rows already there (resume)."""
        self._existing, self._file_order, self.output_path = {}, [], None
        if trainer.fast_dev_run:
            return
        # trainer.log_dir is a collective: every process asks for it.
        output = Path(self.output) if self.output else Path(trainer.log_dir) / "certify_test.tsv"
        self.output_path = output
        loaded: tuple[list[CertifiedImage], str | None] = ([], None)
        if trainer.is_global_zero:
            try:
                settings = self._settings(trainer, pl_module)
                loaded = (self._open_output(output, settings), None)
            except ValueError as err:
                loaded = ([], str(err))
            except OSError as err:  # every rank must reach the broadcast, or the others hang in it
                loaded = ([], f"Certification output {output}: {type(err).__name__}: {err}")
        rows, error = trainer.strategy.broadcast(loaded, src=0)
        if error is not None:
            raise ValueError(error)
        self._existing = {row.idx: row for row in rows}
        self._file_order = [row.idx for row in rows]

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Certify the test set and log ``certify/*``."""
        self.results, self.summary = self._certify(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Certify with ``val_n`` every ``every_n_val_epochs``-th validation epoch."""
        if self.every_n_val_epochs == 0 or trainer.sanity_checking:
            return
        self._val_epochs += 1
        if self._val_epochs % self.every_n_val_epochs == 0:
            self.val_results, self.val_summary = self._certify(trainer, pl_module, "val")

    # ------------------------------------------------------------------ certification
    def _sigma(self, pl_module: LightningModule) -> float:
        if self.sigma is not None:
            return self.sigma
        sigma = getattr(pl_module, "sigma", None)
        if not isinstance(sigma, int | float) or isinstance(sigma, bool) or not sigma > 0:
            raise ValueError(
                "Certification sigma is not set and the module has no positive `sigma` "
                f"({type(pl_module).__name__}); give Certification(sigma=...)"
            )
        return float(sigma)

    def _channels_last(self, pl_module: LightningModule) -> bool:
        """``channels_last``, or by default on for CPUs (about 2x faster there, same classifier)."""
        if self.channels_last is None:
            return pl_module.device.type == "cpu"
        return self.channels_last

    def _settings(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        base = _base_classifier(pl_module)
        return {
            "sigma": self._sigma(pl_module),
            "n0": self.n0,
            "n": self.n,
            "alpha": self.alpha,
            "seed": self.seed,
            "noise_block": self.noise_block,
            "autocast": self.autocast,
            "channels_last": self._channels_last(pl_module),
            "device_type": pl_module.device.type,
            "model_sha256": model_fingerprint(base),
            # Not checked (they do not change any row): for the record.
            "skip": self.skip,
            "max_images": self.max_images,
            "batch_size": self.batch_size,
            "model": type(pl_module).__name__,
        }

    def _open_output(self, path: Path, settings: dict[str, Any]) -> list[CertifiedImage]:
        """Rank 0: check an existing TSV against ``settings`` and return its rows, or start one."""
        sidecar = path.with_name(path.name + ".json")
        if path.is_file() and path.stat().st_size > 0:
            if not sidecar.is_file():
                raise ValueError(
                    f"Certification output {path} exists without its settings file {sidecar}, so "
                    "it cannot be resumed safely; move it away or give another output path"
                )
            try:
                stored = json.loads(sidecar.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"Certification settings file {sidecar} is not JSON: {err}"
                ) from None
            differ = [
                f"{key}={stored.get(key)!r} there, {settings[key]!r} now"
                for key in CHECKED_SETTINGS
                if stored.get(key) != settings[key]
            ]
            if differ:
                raise ValueError(
                    f"Certification output {path} was written with other settings ("
                    + "; ".join(differ)
                    + "); its rows cannot be mixed with these: give another output path or "
                    "delete the file and its .json"
                )
            rows, torn = read_tsv(path)
            if torn:  # drop the cut line; its image is certified again
                _atomic_write(path, "\t".join(HEADER) + "\n" + "".join(r.to_line() for r in rows))
            return rows
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(sidecar, json.dumps(settings, indent=2) + "\n")
        _atomic_write(path, "\t".join(HEADER) + "\n")
        return []

    def _smooth(self, pl_module: LightningModule, sigma: float) -> Smooth:
        base = _base_classifier(pl_module)
        if self.compile:
            if self._compiled is None or self._compiled[0] is not base:
                self._compiled = (base, torch.compile(base))
            base = self._compiled[1]
        return Smooth(
            base,
            _num_classes(pl_module),
            sigma,
            batch_size=self.batch_size,
            seed=self.seed,
            noise_block=self.noise_block,
            autocast_dtype=AUTOCAST[self.autocast] if self.autocast else None,
            channels_last=self._channels_last(pl_module),
            device=pl_module.device,
        )

    def _certify(
        self, trainer: Trainer, pl_module: LightningModule, stage: str
    ) -> tuple[list[CertifiedImage], dict[str, float]]:
        """Certify the selected images of ``stage`` on all processes; log and (test) write rows."""
        testing = stage == "test"
        n0, n, limit = self.n0, self.n if testing else self.val_n, self.max_images
        if trainer.fast_dev_run:
            n0, n = min(n0, FAST_DEV_N0), min(n, FAST_DEV_N)
            limit = min(limit or FAST_DEV_IMAGES, FAST_DEV_IMAGES)
        sigma = self._sigma(pl_module)
        dataset = evaluation_dataset(trainer, stage)
        selected = list(range(0, len(dataset), self.skip))[:limit]  # type: ignore[arg-type]
        existing = self._existing if testing else {}
        for idx in (i for i in selected if i in existing):
            if existing[idx].label != int(dataset[idx][1]):
                raise ValueError(
                    f"Certification output {self.output_path}: row {idx} has label "
                    f"{existing[idx].label} but the dataset's image {idx} has label "
                    f"{int(dataset[idx][1])}; the file was written for other data (another split, "
                    "seed or dataset): give another output path"
                )
        todo = [i for i in selected if i not in existing]
        if testing and self.stop_after is not None:
            todo = todo[: self.stop_after]
        smooth = self._smooth(pl_module, sigma)
        per_round = max(1, math.ceil(ROUND_FORWARDS * self.batch_size / (n0 + n)))
        mine = shard(todo, trainer.global_rank, trainer.world_size)
        num_rounds = rounds(len(todo), per_round, trainer.world_size)
        path = self.output_path if testing and trainer.is_global_zero else None
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        bar = tqdm(total=len(todo), desc=f"certify {stage}", unit="img", disable=not show)
        new: list[CertifiedImage] = []
        writer = path.open("a") if path is not None else None
        try:
            for indices, images, labels in batches(dataset, mine, per_round, num_rounds):
                local = self._certify_round(smooth, indices, images, labels, n0, n)
                gathered = gather_rows(trainer, local, device=pl_module.device)
                rows = [_row_from_tensor(row) for row in gathered]
                new.extend(rows)
                if writer is not None:  # rank 0 only; no collective in here
                    writer.write("".join(row.to_line() for row in rows))
                    writer.flush()
                bar.update(len(rows))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        done = {**existing, **{row.idx: row for row in new}}
        if path is not None:
            self._finish_file(path, done)
        results = [done[i] for i in selected if i in done]
        summary = summarize(results, self.radii)
        prefix = "certify" if testing else "val_certify"
        for name, value in summary.items():
            pl_module.log(f"{prefix}/{name}", value, sync_dist=False, rank_zero_only=False)
        if trainer.is_global_zero and results:
            self._draw(trainer, results, summary, sigma, n0, n, prefix, path)
        return results, summary

    def _certify_round(
        self,
        smooth: Smooth,
        indices: list[int],
        images: Tensor,
        labels: Tensor,
        n0: int,
        n: int,
    ) -> Tensor:
        """Rows ``(k, 6)`` float64 of this process's images of one round."""
        if not indices:
            return torch.empty(0, len(HEADER), dtype=torch.float64)
        start = time.perf_counter()
        certificates = smooth.certify_batch(images, indices, n0, n, self.alpha)
        seconds = round((time.perf_counter() - start) / len(indices), 6)  # TSV precision
        rows = [
            [c.index, int(y), c.prediction, c.radius, float(c.prediction == int(y)), seconds]
            for c, y in zip(certificates, labels.tolist(), strict=True)
        ]
        return torch.tensor(rows, dtype=torch.float64)

    def _finish_file(self, path: Path, done: dict[int, CertifiedImage]) -> None:
        """Rank 0: rewrite the TSV in dataset-index order if resuming left it out of order."""
        order = self._file_order + [i for i in sorted(done) if i not in self._existing]
        if order != sorted(order):
            rows = "".join(done[i].to_line() for i in sorted(done))
            _atomic_write(path, "\t".join(HEADER) + "\n" + rows)
        self._existing, self._file_order = done, sorted(done)

    def _draw(
        self,
        trainer: Trainer,
        results: list[CertifiedImage],
        summary: dict[str, float],
        sigma: float,
        n0: int,
        n: int,
        prefix: str,
        path: Path | None,
    ) -> None:
        """Rank 0: PNG next to the TSV and a TensorBoard figure of certified accuracy vs radius."""
        title = (
            f"sigma={sigma:g}, n0={n0}, n={n}, alpha={self.alpha:g}, {len(results)} images, "
            f"ACR={summary['acr']:.3f}"
        )
        cap = sigma * float(norm.ppf(self.alpha ** (1.0 / n)))
        figure = plot_certified_accuracy(results, self.radii, title, cap if cap > 0 else None)
        if path is not None:
            figure.savefig(path.with_suffix(".png"), dpi=120)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(
                    f"{prefix}/certified_accuracy", figure, global_step=trainer.global_step
                )


def _base_classifier(pl_module: LightningModule) -> nn.Module:
    """The pixel-space classifier: ``pl_module.model`` when there is one, else the module."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def _num_classes(pl_module: LightningModule) -> int:
    num_classes = getattr(pl_module, "num_classes", None)
    if isinstance(num_classes, int) and num_classes >= 2:
        return num_classes
    raise ValueError(
        f"Certification needs the module's `num_classes` (an int >= 2); "
        f"{type(pl_module).__name__} has {num_classes!r}"
    )


def _row_from_tensor(row: Tensor) -> CertifiedImage:
    idx, label, predict, radius, correct, seconds = row.tolist()
    return CertifiedImage(int(idx), int(label), int(predict), float(radius), int(correct), seconds)
