"""Randomized-smoothing certification of the evaluation set as a Lightning callback.

At the end of ``trainer.test`` (and, optionally, on validation with a smaller n) the callback runs
CERTIFY (Cohen, Rosenfeld & Kolter 2019, Algorithm 1, via :class:`robust.smoothing.Smooth`) on the
module's pixel-space classifier and logs certified accuracy over a radius grid and the average
certified radius (ACR; Zhai et al. 2020). Test rows go to a TSV in locuslab/smoothing's format
(:mod:`robust.certificates`), flushed as they come, with their settings in ``<tsv>.json``.

Exact on N processes and resumable: see :mod:`callbacks.evaluation` for the sharding; every
image's noise is seeded by (seed, dataset index). Restarted with the same ``output`` after an
interruption, the callback keeps the complete rows already written (a torn last line is redone),
certifies the rest and ends with the rows of an uninterrupted run. A file written with other
settings, another model or other images is refused.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from scipy.stats import norm
from torch import Tensor, nn

from callbacks.evaluation import EvaluationCallback
from robust.certificates import (
    HEADER,
    CertifiedImage,
    atomic_write,
    check_settings,
    images_fingerprint,
    model_fingerprint,
    read_settings,
    read_tsv,
    summarize,
    write_tsv,
)
from robust.checks import SettingError, check_choice, check_int, check_real
from robust.report import plot_certified_curves
from robust.sharding import evaluation_dataset
from robust.smoothing import DEFAULT_NOISE_BLOCK, MAX_BLOCKS, NOISE_SCHEME, Smooth
from robust.statistics import smallest_useful_n

__all__ = ["Certification"]

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Settings a resumed TSV must share with the run that wrote it: they determine every row.
CHECKED_SETTINGS = (
    "sigma",
    "n0",
    "n",
    "alpha",
    "seed",
    "noise_block",
    "autocast",
    "tf32",
    "noise_scheme",
    "device_type",
    "gpu",
    "model_sha256",
    "dataset_sha256",
)
# Under ``fast_dev_run`` the callback certifies 2 images with at most these n0, n.
FAST_DEV_N0, FAST_DEV_N = 16, 64
# Images per round ~ this many forward batches' worth of noisy samples (then rows are written): on
# a GPU a forward batch takes milliseconds, so a round holds many of them.
ROUND_FORWARDS = {"cpu": 4, "cuda": 50}
# Defaults per device type: forward batch size (a sweep on CPU is flat above 1,000; a GPU needs
# large batches to fill it) and the memory layout (channels_last: about 2x faster on CPUs).
DEFAULT_BATCH_SIZE = {"cpu": 1000, "cuda": 50_000}


class Certification(EvaluationCallback):
    """Certify the evaluation set with randomized smoothing; log, write a TSV, plot, resume.

    Logged (the same value on every process; ``certify/`` after testing, ``val_certify/`` after
    validation): ``certified_acc@<r>`` for each radius in ``radii``, ``acr``, ``correct_certified``,
    ``abstain_rate`` and ``num_images``. After testing, rank 0 also writes ``output`` (TSV) and its
    settings ``output + ".json"``, a PNG of certified accuracy against radius next to it, and the
    same figure to TensorBoard. Validation certification only logs (no files, no resume). Under
    ``fast_dev_run`` it certifies 2 images with n0 <= 16, n <= 64 and writes no files.

    Attributes:
        results: Rows of the last test certification (selected images, dataset-index order).
        summary: Its summary, see :func:`robust.certificates.summarize`.
        val_results: Rows of the last validation certification.
        val_summary: Its summary.
        output_path: The TSV of the last test certification (``None`` under ``fast_dev_run``).

    Args:
        sigma: Noise standard deviation in pixel units, > 0; ``None`` takes the module's ``sigma``
            (e.g. :class:`~lightning_modules.noise.NoiseAugmentedClassifier`). Overrides the
            module's sigma when given: one config can certify any model at one sigma.
        n0: Selection samples per image (>= 1); Cohen et al. use 100.
        n: Estimation samples per image (>= 1); Cohen et al. use 100,000.
        alpha: Failure probability of each certificate, in (0, 1); Cohen et al. use 0.001.
        batch_size: Noisy samples per forward pass (>= 1); does not change the results. ``None``:
            1,000 on CPUs, 50,000 on GPUs.
        max_images: Certify at most this many images (>= 1; ``None``: all selected).
        skip: Certify every ``skip``-th image, as locuslab's ``--skip``.
        seed: Base seed of the noise (>= 0); image i's noise is seeded by (seed, i).
        every_n_val_epochs: Also certify the validation set every k epochs (0: never).
        val_n: n for validation certification (>= 1).
        output: TSV path; default ``<trainer.log_dir>/certify_test.tsv``. Give the same path to
            resume an interrupted run.
        radii: Radii (>= 0) at which certified accuracy is logged.
        autocast: ``None`` (full precision), ``"bf16"`` or ``"fp16"``: run the classifier under
            autocast (the certificate holds for the classifier as evaluated).
        channels_last: Run the classifier in channels-last memory format: the same classifier up to
            float rounding, about twice as fast on CPUs. ``None`` (default): on for CPUs only.
        compile: ``torch.compile`` the classifier for certification (static shapes: the last
            forward batch is padded, and the padding is not counted).
        cuda_graph: Replay the fixed-shape forward pass as a CUDA graph (CUDA only). Off by
            default: for LeNet on an H200 it was 5% slower than the eager forward.
        tf32: Allow TF32 matrix products and convolutions on CUDA (off: IEEE float32, the
            classifier whose certificate is claimed; on: the certificate is for the TF32 one).
        stop_after: Stop after this many newly certified test images (>= 0), as if interrupted.
        noise_block: Samples per independently seeded noise block (see ``Smooth``).

    Raises:
        SettingError: At construction, for a setting outside its allowed values (named); at test
            start, when ``output`` holds rows written with other settings, model or images.

    Examples:
        >>> Certification(sigma=0.25, n0=100, n=10_000, alpha=0.001, skip=20).n
        10000
    """

    width = len(HEADER)

    def __init__(
        self,
        sigma: float | None = None,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        batch_size: int | None = None,
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
        cuda_graph: bool | None = None,
        tf32: bool = False,
        stop_after: int | None = None,
        noise_block: int = DEFAULT_NOISE_BLOCK,
    ) -> None:
        owner = "Certification"
        super().__init__(
            every_n_val_epochs=every_n_val_epochs,
            batch_size=1 if batch_size is None else batch_size,
            max_images=max_images,
            skip=skip,
        )
        self.forward_batch = None if batch_size is None else self.batch_size
        self.sigma = None if sigma is None else check_real("sigma", sigma, low=0, owner=owner)
        self.alpha = check_real("alpha", alpha, low=0, high=1, owner=owner)
        self.n0 = check_int("n0", n0, minimum=1, owner=owner)
        self.n = check_int("n", n, minimum=1, owner=owner)
        self.val_n = check_int("val_n", val_n, minimum=1, owner=owner)
        self.seed = check_int("seed", seed, minimum=0, owner=owner)
        self.noise_block = check_int("noise_block", noise_block, minimum=1, owner=owner)
        self.stop_after = (
            None
            if stop_after is None
            else check_int("stop_after", stop_after, minimum=0, owner=owner)
        )
        if isinstance(radii, str) or not radii:
            raise SettingError(
                f"Certification radii must be a non-empty list of numbers >= 0; got {radii!r}"
            )
        self.radii = sorted(
            {check_real("radii", r, low=0, low_inclusive=True, owner=owner) for r in radii}
        )
        self.autocast = check_choice("autocast", autocast, [None, *AUTOCAST], owner=owner)
        self.channels_last = check_choice(
            "channels_last", channels_last, [None, True, False], owner=owner
        )
        self.compile = check_choice("compile", compile, [True, False], owner=owner)
        self.cuda_graph = check_choice("cuda_graph", cuda_graph, [None, True, False], owner=owner)
        self.tf32 = check_choice("tf32", tf32, [True, False], owner=owner)
        for name, value in (("n", self.n), ("n0", self.n0), ("val_n", self.val_n)):
            if value > MAX_BLOCKS * self.noise_block:
                raise SettingError(
                    f"{owner} {name} must be <= {MAX_BLOCKS * self.noise_block} (MAX_BLOCKS x "
                    f"noise_block, so that every noise block has its own seed); got {value}: "
                    "raise noise_block"
                )
        self.output = output
        useful = smallest_useful_n(self.alpha)
        for name, value, used in (("n", n, True), ("val_n", val_n, every_n_val_epochs > 0)):
            if used and value < useful:
                warnings.warn(
                    f"Certification {name}={value} can never certify a radius at alpha={alpha}: "
                    f"every image will abstain; the smallest useful {name} is {useful}",
                    UserWarning,
                    stacklevel=2,
                )
        self.results: list[CertifiedImage] = []
        self.summary: dict[str, float] = {}
        self.val_results: list[CertifiedImage] = []
        self.val_summary: dict[str, float] = {}
        self.output_path: Path | None = None
        self._existing: dict[int, CertifiedImage] = {}
        self._file_order: list[int] = []
        self._writer: Any = None
        self._smooth: Smooth | None = None
        self._started = 0.0
        self._samples = 0

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
                loaded = (self._open_output(output, settings, trainer), None)
            except ValueError as err:
                loaded = ([], str(err))
            except OSError as err:  # every rank must reach the broadcast, or the others hang in it
                loaded = ([], f"Certification output {output}: {type(err).__name__}: {err}")
        rows, error = trainer.strategy.broadcast(loaded, src=0)
        if error is not None:
            raise SettingError(error)
        self._existing = {row.idx: row for row in rows}
        self._file_order = [row.idx for row in rows]

    # ------------------------------------------------------------------ settings and files
    def _sigma(self, pl_module: LightningModule) -> float:
        if self.sigma is not None:
            return self.sigma
        sigma = getattr(pl_module, "sigma", None)
        if not isinstance(sigma, int | float) or isinstance(sigma, bool) or not sigma > 0:
            raise SettingError(
                "Certification sigma is not set and the module has no positive `sigma` "
                f"({type(pl_module).__name__}); give Certification(sigma=...)"
            )
        return float(sigma)

    def _channels_last(self, pl_module: LightningModule) -> bool:
        if self.channels_last is None:
            return pl_module.device.type == "cpu"
        return self.channels_last

    def _forward_batch(self, pl_module: LightningModule) -> int:
        if self.forward_batch is not None:
            return self.forward_batch
        return DEFAULT_BATCH_SIZE.get(pl_module.device.type, 1000)

    def _cuda_graph(self, pl_module: LightningModule) -> bool:
        # Off unless asked for: on an H200 the captured forward was 5% slower than eager LeNet.
        return bool(self.cuda_graph) and pl_module.device.type == "cuda"

    def _settings(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        dataset = evaluation_dataset(trainer, "test")
        datamodule = getattr(trainer, "datamodule", None)
        identity = getattr(datamodule, "identity", None)
        return {
            "sigma": self._sigma(pl_module),
            "n0": self.n0,
            "n": self.n,
            "alpha": self.alpha,
            "seed": self.seed,
            "noise_block": self.noise_block,
            "autocast": self.autocast,
            "tf32": self.tf32,
            "noise_scheme": NOISE_SCHEME,
            "device_type": pl_module.device.type,
            "gpu": _gpu_name(pl_module.device),
            "model_sha256": model_fingerprint(_base_classifier(pl_module)),
            "dataset_sha256": images_fingerprint(
                (i, *_image_label(dataset[i]))
                for i in range(len(dataset))  # type: ignore[arg-type]
            ),
            # Not checked (they do not change any row): for the record.
            "data": identity() if callable(identity) else None,
            "num_classes": _num_classes(pl_module),
            "channels_last": self._channels_last(pl_module),
            "compile": self.compile,
            "cuda_graph": self._cuda_graph(pl_module),
            "skip": self.skip,
            "max_images": self.max_images,
            "batch_size": self._forward_batch(pl_module),
            "model": type(pl_module).__name__,
        }

    def _open_output(
        self, path: Path, settings: dict[str, Any], trainer: Trainer
    ) -> list[CertifiedImage]:
        """Rank 0: check an existing TSV against ``settings`` and return its rows, or start one."""
        sidecar = path.with_name(path.name + ".json")
        if path.is_file() and path.stat().st_size > 0:
            if not sidecar.is_file():
                raise SettingError(
                    f"Certification output {path} exists without its settings file {sidecar}, so "
                    "it cannot be resumed safely; move it away or give another output path"
                )
            stored = read_settings(sidecar)
            check_settings(stored, settings, CHECKED_SETTINGS, f"Certification output {path}")
            size = len(evaluation_dataset(trainer, "test"))  # type: ignore[arg-type]
            rows, torn = read_tsv(path, num_classes=settings["num_classes"], indices=range(size))
            if torn:  # drop the cut line; its image is certified again
                write_tsv(path, rows)
            return rows
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(sidecar, json.dumps(settings, indent=2) + "\n")
        write_tsv(path, [])
        return []

    def _make_smooth(self, pl_module: LightningModule) -> Smooth:
        return Smooth(
            _base_classifier(pl_module),
            _num_classes(pl_module),
            self._sigma(pl_module),
            batch_size=self._forward_batch(pl_module),
            seed=self.seed,
            noise_block=self.noise_block,
            autocast_dtype=AUTOCAST[self.autocast] if self.autocast else None,
            channels_last=self._channels_last(pl_module),
            compile=self.compile,
            cuda_graph=self._cuda_graph(pl_module),
            tf32=self.tf32,
            device=pl_module.device,
        )

    # ------------------------------------------------------------------ evaluation hooks
    def _n(self, trainer: Trainer, stage: str) -> tuple[int, int]:
        n0, n = self.n0, self.n if stage == "test" else self.val_n
        if trainer.fast_dev_run:
            n0, n = min(n0, FAST_DEV_N0), min(n, FAST_DEV_N)
        return n0, n

    def metric_prefix(self, stage: str) -> str:  # noqa: D102
        return "certify" if stage == "test" else "val_certify"

    def images_per_round(self, stage: str) -> int:  # noqa: D102
        assert self._smooth is not None
        n0, n = self.n0, self.n if stage == "test" else self.val_n
        forwards = ROUND_FORWARDS.get(self._smooth.device.type, 4)
        return max(1, math.ceil(forwards * self._smooth.batch_size / (n0 + n)))

    def pending(
        self, trainer: Trainer, pl_module: LightningModule, stage: str, selected: list[int]
    ) -> list[int]:
        """Selected images without a row yet (test; up to ``stop_after``), and open the writer."""
        self._smooth = self._make_smooth(pl_module)
        self._started, self._samples = time.perf_counter(), 0
        if stage != "test":
            return selected
        dataset = evaluation_dataset(trainer, stage)
        for idx in (i for i in selected if i in self._existing):
            label = int(_image_label(dataset[idx])[1])
            if self._existing[idx].label != label:
                raise SettingError(
                    f"Certification output {self.output_path}: row {idx} has label "
                    f"{self._existing[idx].label} but the dataset's image {idx} has label {label}; "
                    "the file was written for other data: give another output path"
                )
        todo = [i for i in selected if i not in self._existing]
        if self.stop_after is not None:
            todo = todo[: self.stop_after]
        if self.output_path is not None and trainer.is_global_zero:
            self._writer = self.output_path.open("a")
        return todo

    def evaluate_batch(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        indices: list[int],
        images: Tensor,
        labels: Tensor,
    ) -> Tensor:
        assert self._smooth is not None
        n0, n = self._n(trainer, stage)
        start = time.perf_counter()
        certificates = self._smooth.certify_batch(images, indices, n0, n, self.alpha)
        seconds = round((time.perf_counter() - start) / len(indices), 6)  # TSV precision
        self._samples += len(indices) * (n0 + n)
        rows = [
            [c.index, int(y), c.prediction, c.radius, float(c.prediction == int(y)), seconds]
            for c, y in zip(certificates, labels.tolist(), strict=True)
        ]
        return torch.tensor(rows, dtype=torch.float64)

    def on_rows(self, trainer: Trainer, stage: str, rows: Tensor) -> None:
        """Rank 0 appends each round's rows to the TSV and flushes them."""
        if self._writer is not None and len(rows):
            self._writer.write("".join(_row(r).to_line() for r in rows))
            self._writer.flush()

    def progress_bar(self, trainer: Trainer, stage: str, total: int) -> Any:
        """The base's bar, showing noisy samples per second as it goes."""
        bar = super().progress_bar(trainer, stage, total)
        if bar is None:
            return None
        update = bar.update

        def update_with_rate(count: int) -> None:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            bar.set_postfix_str(f"{self._samples * trainer.world_size / elapsed:,.0f} samples/s")
            update(count)

        bar.update = update_with_rate
        return bar

    def finish(  # noqa: D102
        self, trainer: Trainer, pl_module: LightningModule, stage: str, rows: Tensor
    ) -> dict[str, float]:
        testing = stage == "test"
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        new = {row.idx: row for row in map(_row, rows)}
        existing = self._existing if testing else {}
        done = {**existing, **new}
        dataset = evaluation_dataset(trainer, stage)
        selected = self.select(trainer, stage, len(dataset))  # type: ignore[arg-type]
        results = [done[i] for i in selected if i in done]
        summary = summarize(results, self.radii)
        path = self.output_path if testing and trainer.is_global_zero else None
        if path is not None:
            self._finish_file(path, done)
        if testing:
            self.results, self.summary = results, summary
        else:
            self.val_results, self.val_summary = results, summary
        if trainer.is_global_zero and results:
            self._draw(trainer, pl_module, stage, results, summary, path)
        return summary

    def _finish_file(self, path: Path, done: dict[int, CertifiedImage]) -> None:
        """Rank 0: rewrite the TSV in dataset-index order if resuming left it out of order."""
        order = self._file_order + [i for i in sorted(done) if i not in self._existing]
        if order != sorted(order):
            write_tsv(path, (done[i] for i in sorted(done)))
        self._existing, self._file_order = done, sorted(done)

    def _draw(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        results: list[CertifiedImage],
        summary: dict[str, float],
        path: Path | None,
    ) -> None:
        """Rank 0: PNG next to the TSV and a TensorBoard figure of certified accuracy vs radius."""
        n0, n = self._n(trainer, stage)
        sigma = self._sigma(pl_module)
        title = (
            f"sigma={sigma:g}, n0={n0}, n={n}, alpha={self.alpha:g}, {len(results)} images, "
            f"ACR={summary['acr']:.3f}"
        )
        cap = sigma * float(norm.ppf(self.alpha ** (1.0 / n)))
        curve = ([r.radius for r in results], [r.correct for r in results])
        figure = plot_certified_curves(
            {"": curve}, marks=self.radii, cap=cap if cap > 0 else None, title=title
        )
        if path is not None:
            figure.savefig(path.with_suffix(".png"), dpi=120)
        self.add_figure(trainer, f"{self.metric_prefix(stage)}/certified_accuracy", figure)


def _base_classifier(pl_module: LightningModule) -> nn.Module:
    """The pixel-space classifier: ``pl_module.model`` when there is one, else the module."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def _num_classes(pl_module: LightningModule) -> int:
    num_classes = getattr(pl_module, "num_classes", None)
    if isinstance(num_classes, int) and num_classes >= 2:
        return num_classes
    raise SettingError(
        f"Certification needs the module's `num_classes` (an int >= 2); "
        f"{type(pl_module).__name__} has {num_classes!r}"
    )


def _gpu_name(device: torch.device) -> str | None:
    """The GPU model (its noise differs from another model's for large blocks), or None."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _image_label(item: Any) -> tuple[Tensor, int]:
    return torch.as_tensor(item[0]), int(item[1])


def _row(row: Tensor) -> CertifiedImage:
    idx, label, predict, radius, correct, seconds = row.tolist()
    return CertifiedImage(int(idx), int(label), int(predict), float(radius), int(correct), seconds)
