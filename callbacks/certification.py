"""Randomized-smoothing certification of the evaluation set as a Lightning callback.

CERTIFY (Cohen, Rosenfeld & Kolter 2019, Algorithm 1, :class:`robust.smoothing.Smooth`) of the
module's pixel-space classifier at the end of ``trainer.test`` (and, optionally, on validation
with a smaller n). Test rows go to a TSV in locuslab/smoothing's format (:mod:`robust.certificates`)
as they come, settings in ``<tsv>.json``. Exact on N processes (:mod:`callbacks.evaluation`).
Resumable: run again with the same ``output`` and its rows are kept, a torn last line is redone,
and a file of other settings, model or images is refused.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from callbacks.evaluation import (
    EvaluationCallback,
    base_classifier,
    module_num_classes,
    module_sigma,
)
from robust.certificates import (
    HEADER,
    CertificateFile,
    CertifiedImage,
    dataset_fingerprint,
    model_fingerprint,
    summarize,
)
from robust.checks import SettingError, check_choice, check_int, check_radii, check_real
from robust.report import certification_figure
from robust.sharding import evaluation_dataset
from robust.smoothing import (
    DEFAULT_NOISE_BLOCK,
    DETERMINING_SETTINGS,
    Smooth,
    check_num_samples,
)
from robust.statistics import warn_if_useless_n

__all__ = ["Certification"]

DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Settings a resumed TSV must share with the run that wrote it: they determine every row.
CHECKED_SETTINGS = (*DETERMINING_SETTINGS, "n0", "n", "alpha", "model_sha256", "dataset_sha256")
FAST_DEV_N0, FAST_DEV_N = 16, 64  # at most these under ``fast_dev_run``
# A round (rows are written after each) ~ this many forward batches; a GPU batch takes milliseconds.
ROUND_FORWARDS = {"cpu": 4, "cuda": 50}
# Forward batch per device (2 CPU cores, LeNet: 26k samples/s at 200-700, 16k at 1,000+; README).
DEFAULT_BATCH_SIZE = {"cpu": 400, "cuda": 50_000}


class Certification(EvaluationCallback):
    """Certify the evaluation set with randomized smoothing; log, write a TSV, plot, resume.

    Logged on every process (``certify/`` after testing, ``val_certify/`` after validation):
    ``certified_acc@<r>`` for each radius, ``acr``, ``correct_certified``, ``abstain_rate``,
    ``num_images`` and ``selected_images`` (more than ``num_images`` when ``stop_after`` stopped
    the run early). After testing, rank 0 also writes ``output``, its ``.json`` settings, a PNG of
    certified accuracy against radius (also sent to TensorBoard). Validation writes no files.
    Under ``fast_dev_run``: 2 images, n0 <= 16, n <= 64, no files.

    Attributes:
        results: Rows of the last test certification (selected images, dataset-index order).
        summary: Their summary (:func:`robust.certificates.summarize`).
        val_results, val_summary: The same for the last validation certification.
        output_path: The TSV of the last test certification (``None`` under ``fast_dev_run``).

    Args:
        sigma: Noise level in pixel units, > 0; ``None`` takes the module's ``sigma``. When given
            it overrides the module's: one config certifies any model at one sigma.
        n0: Selection samples per image (>= 1); Cohen et al. use 100.
        n: Estimation samples per image (>= 1); Cohen et al. use 100,000.
        alpha: Failure probability of each certificate, in (0, 1); Cohen et al. use 0.001.
        batch_size: Noisy samples per forward pass (does not change the results); ``None``:
            400 on CPUs, 50,000 on GPUs.
        max_images: Certify at most this many images.
        skip: Certify every ``skip``-th image, as locuslab's ``--skip``.
        first_image: The first dataset index certified (0: from the start); splits one
            certification across machines, each writing its own TSV.
        seed: Base seed of the noise (>= 0); image i's noise is seeded by (seed, i).
        every_n_val_epochs: Also certify the validation set every k epochs (0: never).
        val_n: n of validation certification.
        output: TSV path; default ``<trainer.log_dir>/certify_test.tsv``. The same path resumes.
        radii: Radii (>= 0) at which certified accuracy is logged.
        autocast: ``None``, ``"bf16"`` or ``"fp16"``: certify the classifier under autocast.
        channels_last: Channels-last forward passes (the same classifier up to rounding, about
            twice as fast on CPUs); ``None``: on for CPUs only.
        compile: ``torch.compile`` the forward pass (static shapes; padding is not counted).
        cuda_graph: Replay the forward as a CUDA graph (CUDA only; 5% slower than eager, H200).
        tf32: Allow TF32 on CUDA (off: the IEEE float32 classifier is certified).
        cudnn_benchmark: Let cuDNN time its convolution algorithms and keep the fastest (CUDA
            only; the same classifier up to float rounding; no gain for LeNet on an H200).
        pool_first: ReLU after max-pooling (exactly the same function; see ``Smooth``);
            ``None``: with channels-last forward passes.
        bias_after_pool: Add each convolution's bias after the max-pool that follows it (the
            same values; see ``Smooth``); a GPU lever, off by default until measured.
        fused_conv_pool: Run small convolutions with their 2x2 max-pool and ReLU as one Triton
            kernel on CUDA (the same classifier up to rounding; see ``Smooth``); off by default.
        stop_after: Stop after this many (>= 1) newly certified test images, as if interrupted.
        noise_block: Samples per independently seeded noise block (see ``Smooth``).

    Raises:
        SettingError: For a setting outside its allowed values; at setup, when ``sigma`` is
            unset and the module has none, or no image is selected (e.g. ``first_image`` past
            the evaluated images); at test start, when ``output`` holds rows of other settings,
            another model or other images.

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
        first_image: int = 0,
        seed: int = 0,
        every_n_val_epochs: int = 0,
        val_n: int = 1000,
        output: str | None = None,
        radii: Sequence[float] = DEFAULT_RADII,
        autocast: str | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        cuda_graph: bool = False,
        tf32: bool = False,
        cudnn_benchmark: bool = False,
        pool_first: bool | None = None,
        bias_after_pool: bool = False,
        fused_conv_pool: bool = False,
        stop_after: int | None = None,
        noise_block: int = DEFAULT_NOISE_BLOCK,
    ) -> None:
        owner = "Certification"
        batch = 1 if batch_size is None else batch_size  # images per evaluate_batch call
        super().__init__(
            every_n_val_epochs=every_n_val_epochs,
            batch_size=batch,
            max_images=max_images,
            skip=skip,
            first_image=first_image,
        )
        self.forward_batch = None if batch_size is None else self.batch_size
        self.sigma = None if sigma is None else check_real("sigma", sigma, low=0, owner=owner)
        self.alpha = check_real("alpha", alpha, low=0, high=1, owner=owner)
        counts = {"n0": (n0, 1), "n": (n, 1), "val_n": (val_n, 1), "seed": (seed, 0)}
        for name, (value, minimum) in {**counts, "noise_block": (noise_block, 1)}.items():
            setattr(self, name, check_int(name, value, minimum=minimum, owner=owner))
        for name in ("n0", "n", "val_n") if every_n_val_epochs else ("n0", "n"):
            check_num_samples(name, getattr(self, name), self.noise_block, owner=owner)
        if stop_after is not None:
            check_int("stop_after", stop_after, minimum=1, owner=owner)
        self.stop_after = stop_after
        self.radii = check_radii("radii", radii, owner=owner)
        choices = {
            "autocast": (autocast, [None, *AUTOCAST]),
            "channels_last": (channels_last, [None, True, False]),
            "compile": (compile, [True, False]),
            "cuda_graph": (cuda_graph, [True, False]),
            "tf32": (tf32, [True, False]),
            "cudnn_benchmark": (cudnn_benchmark, [True, False]),
            "pool_first": (pool_first, [None, True, False]),
            "bias_after_pool": (bias_after_pool, [True, False]),
            "fused_conv_pool": (fused_conv_pool, [True, False]),
        }
        for name, (value, allowed) in choices.items():
            setattr(self, name, check_choice(name, value, allowed, owner=owner))
        for name, value in (("n", n), ("val_n", val_n if every_n_val_epochs else None)):
            warn_if_useless_n(name, value, self.alpha, owner)
        if output is not None and str(output).endswith(("/", os.sep)):  # Path drops the slash
            raise SettingError(
                f"{owner} output {output} names a folder; give the path of a .tsv file, e.g. "
                f"{Path(output) / 'certify.tsv'}"
            )
        self.output = output
        self.results: list[CertifiedImage] = []
        self.summary: dict[str, float] = {}
        self.val_results: list[CertifiedImage] = []
        self.val_summary: dict[str, float] = {}
        self.output_path: Path | None = None
        self._existing: dict[int, CertifiedImage] = {}
        self._file: CertificateFile | None = None
        self._smooth: Smooth | None = None
        self._started, self._samples, self._world_size = 0.0, 0, 1

    # ------------------------------------------------------------------ files and settings
    def check(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse a module without ``num_classes`` or, with ``sigma`` unset, a positive ``sigma``."""
        module_num_classes(pl_module, "Certification")
        module_sigma(pl_module, self.sigma, "Certification")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve the output, check its settings and load the rows already there (resume)."""
        super().on_test_start(trainer, pl_module)  # an empty selection is refused first
        self._file, self._existing, self.output_path = None, {}, None
        if trainer.fast_dev_run:
            return
        # trainer.log_dir is a collective: every process asks for it.
        output = Path(self.output) if self.output else Path(trainer.log_dir) / "certify_test.tsv"
        self.output_path = output

        def open_file() -> CertificateFile:
            settings, labels = self._settings(trainer, pl_module)
            return CertificateFile(
                output,
                settings,
                CHECKED_SETTINGS,
                num_classes=settings["num_classes"],
                labels=labels,
            )

        file = self.on_rank_zero(trainer, open_file, f"Certification output {output}")
        rows = list(file.rows.values()) if file is not None else []
        self._existing = {row.idx: row for row in trainer.strategy.broadcast(rows, src=0)}
        self._file = file if trainer.is_global_zero else None

    def _settings(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[dict[str, Any], list[int]]:
        """The settings (what determines the rows first, then the record) and the test labels."""
        identity = getattr(getattr(trainer, "datamodule", None), "identity", None)
        dataset = evaluation_dataset(trainer, "test")
        dataset_sha256, labels = dataset_fingerprint(dataset)
        settings = {
            **self._make_smooth(pl_module).settings,
            **{
                k: getattr(self, k)
                for k in ("n0", "n", "alpha", "skip", "first_image", "max_images")
            },
            "image_range": self.evaluated_range(trainer, "test", len(dataset)),  # type: ignore[arg-type]
            "dataset_size": len(dataset),  # type: ignore[arg-type]
            "model_sha256": model_fingerprint(base_classifier(pl_module)),
            "dataset_sha256": dataset_sha256,
            "data": identity() if callable(identity) else None,
            "model": type(pl_module).__name__,
        }
        return settings, labels

    def _make_smooth(self, pl_module: LightningModule) -> Smooth:
        """The smoothed classifier, with this device's defaults for unset speed options."""
        device = pl_module.device
        on_cpu = device.type == "cpu"
        return Smooth(
            base_classifier(pl_module),
            module_num_classes(pl_module, "Certification"),
            module_sigma(pl_module, self.sigma, "Certification"),
            batch_size=self.forward_batch or DEFAULT_BATCH_SIZE.get(device.type, 1000),
            autocast_dtype=AUTOCAST.get(self.autocast or ""),
            channels_last=on_cpu if self.channels_last is None else self.channels_last,
            **{k: getattr(self, k) for k in ("seed", "noise_block", "compile", "tf32")},
            **{k: getattr(self, k) for k in ("cuda_graph", "cudnn_benchmark")},  # CUDA only
            pool_first=self.pool_first,
            bias_after_pool=self.bias_after_pool,
            fused_conv_pool=self.fused_conv_pool,
            device=device,
        )

    # ------------------------------------------------------------------ evaluation hooks
    def _n(self, trainer: Trainer, stage: str) -> tuple[int, int]:
        n0, n = self.n0, self.n if stage == "test" else self.val_n
        return (min(n0, FAST_DEV_N0), min(n, FAST_DEV_N)) if trainer.fast_dev_run else (n0, n)

    def metric_prefix(self, stage: str) -> str:  # noqa: D102
        return "certify" if stage == "test" else "val_certify"

    def claimed_outputs(self, stage: str) -> frozenset[str]:  # noqa: D102
        return frozenset({f"{self.metric_prefix(stage)}/num_images"})

    def images_per_round(self, stage: str) -> int:  # noqa: D102
        assert self._smooth is not None
        forwards = ROUND_FORWARDS.get(self._smooth.device.type, 4)
        samples = self.n0 + (self.n if stage == "test" else self.val_n)
        return max(1, math.ceil(forwards * self._smooth.batch_size / samples))

    def pending(  # noqa: D102
        self, trainer: Trainer, pl_module: LightningModule, stage: str, selected: list[int]
    ) -> list[int]:
        self._smooth = self._make_smooth(pl_module)
        self._started, self._samples, self._world_size = time.perf_counter(), 0, trainer.world_size
        if stage != "test":
            return selected
        return [i for i in selected if i not in self._existing][: self.stop_after]

    def evaluate_batch(  # noqa: D102
        self, trainer: Trainer, pl_module: LightningModule, stage: str, indices, images, labels
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
        if self._file is not None and stage == "test" and len(rows):
            self._file.append(map(CertifiedImage.from_numbers, rows.tolist()))

    def saved_rows_note(self, stage: str) -> str:
        """Where an interrupted certification's rows are, and how it resumes."""
        if self._file is not None and stage == "test":
            if self.output:
                return f"{self.output_path} keeps every row so far; the same command resumes"
            # the default path is in the logger's folder, which the next run numbers anew
            return (
                f"{self.output_path} keeps every row so far; to resume from them, run the same "
                f"command with --trainer.callbacks.output {self.output_path}"
            )
        return super().saved_rows_note(stage)

    @property
    def samples_this_run(self) -> int:
        """Noisy samples evaluated by all processes since the last evaluation began (not resumed rows).

        Examples:
            >>> Certification(sigma=0.25).samples_this_run
            0
        """
        return getattr(self, "_samples", 0) * getattr(self, "_world_size", 1)

    def rate(self) -> str:
        """Noisy samples per second of all processes, for the progress bar."""
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        return f"{self._samples * self._world_size / elapsed:,.0f} samples/s"

    def finish(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        rows: Tensor,
        partial: bool = False,
    ) -> dict[str, float]:
        testing = stage == "test"
        new = {row.idx: row for row in map(CertifiedImage.from_numbers, rows.tolist())}
        done = {**(self._existing if testing else {}), **new}
        dataset = evaluation_dataset(trainer, stage)
        selected = self.select(trainer, stage, len(dataset))  # type: ignore[arg-type]
        results = [done[i] for i in selected if i in done]
        summary = summarize(results, self.radii)
        if testing and self._file is not None:
            self._file.close()  # in dataset-index order
        if testing:
            self._existing, self.results, self.summary = done, results, summary
        elif partial:  # a part of the validation images: nothing of it is kept or drawn
            self.val_results, self.val_summary = [], {}
        else:
            self.val_results, self.val_summary = results, summary
        if trainer.is_global_zero and results and not partial:
            n0, n = self._n(trainer, stage)
            sigma = module_sigma(pl_module, self.sigma, "Certification")
            radius, correct = zip(*((r.radius, r.correct) for r in results), strict=True)
            figure = certification_figure(
                radius, correct, self.radii, sigma=sigma, n0=n0, n=n, alpha=self.alpha
            )
            if testing and self.output_path is not None:
                figure.savefig(self.output_path.with_suffix(".png"), dpi=120)
            self.add_figure(trainer, f"{self.metric_prefix(stage)}/certified_accuracy", figure)
        # fewer than selected: stopped early (stop_after); the next run resumes the rest
        return {**(summary or {"num_images": 0.0}), "selected_images": float(len(selected))}
