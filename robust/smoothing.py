"""Randomized smoothing: certified L2 robustness of a smoothed classifier.

Cohen, Rosenfeld & Kolter (2019), "Certified Adversarial Robustness via Randomized Smoothing"
(arXiv 1902.02918). The smoothed classifier is g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0,
sigma^2 I). If the top class has probability p_A >= pA_bar > 1/2, g is constant on the L2 ball of
radius R = sigma * Phi^-1(pA_bar) around x (Theorem 1 with pB_bar = 1 - pA_bar). ``Smooth``
implements the Monte Carlo algorithms PREDICT and CERTIFY (Algorithm 1 / Section 3.2.2).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

from robust.modes import eval_mode
from robust.statistics import binomial_pvalue, clopper_pearson_lower, smallest_useful_n

__all__ = [
    "ABSTAIN",
    "Certificate",
    "Smooth",
    "binomial_pvalue",
    "clopper_pearson_lower",
    "smallest_useful_n",
]

ABSTAIN = -1
"""Class returned when the smoothed classifier abstains."""

# Independent noise streams per image: the estimation samples must never be the selection samples.
SELECTION_STREAM = 0
ESTIMATION_STREAM = 1
PREDICTION_STREAM = 2

# Large enough that per-block launches are negligible even for tiny models on a GPU; blocks that
# straddle forward batches are drawn into a scratch buffer of noise_block samples.
DEFAULT_NOISE_BLOCK = 1000


@dataclass(frozen=True)
class Certificate:
    """Result of CERTIFY for one image.

    Attributes:
        index: Dataset index of the image (it also seeds the image's noise).
        prediction: Certified class, or ``ABSTAIN``.
        radius: Certified L2 radius sigma * Phi^-1(p_a_lower); 0.0 when abstaining.
        p_a_lower: One-sided (1 - alpha) Clopper-Pearson lower bound on p_A.
        count_a: n_A, the count of ``top_class`` among the n estimation samples.
        top_class: c_A hat, the argmax of the n0 selection counts (kept when abstaining).
        n0: Number of selection samples.
        n: Number of estimation samples.
        alpha: Failure probability of the certificate.
    """

    index: int
    prediction: int
    radius: float
    p_a_lower: float
    count_a: int
    top_class: int
    n0: int
    n: int
    alpha: float

    @property
    def abstained(self) -> bool:
        """Whether CERTIFY abstained."""
        return self.prediction == ABSTAIN


def _infer_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _block_seeds(seed: int, index: int, stream: int, num_blocks: int) -> np.ndarray:
    """Seeds of noise blocks 0..num_blocks-1 of one (seed, dataset index, stream).

    Block b's seed is the b-th 64-bit output of a Philox counter-based generator keyed by
    ``SeedSequence([seed, index, stream])``: a function of (seed, index, stream, b) alone, and
    cheap to compute for all blocks of an image at once.
    """
    bits = np.random.Philox(np.random.SeedSequence([seed, index, stream]))
    return bits.random_raw(num_blocks)


class Smooth:
    """Smoothed classifier g of Cohen et al. (2019) around a base classifier f, with PREDICT/CERTIFY.

    Noise is added in pixel space, x + N(0, sigma^2 I), with NO clipping to [0, 1]: the certificate
    (Theorem 1) is about exactly this Gaussian. The base classifier maps [0, 1] images to logits and
    contains its own input normalization.

    Speed: noisy copies of several images are packed into one forward batch (and a large n fills
    whole batches); noise is drawn into a preallocated buffer on the model's device; class counts
    are accumulated on the device with ``index_add_`` (``torch.bincount`` would sync on CUDA); the
    counts cross to the host once per ``certify_batch``/``predict_batch`` call.

    Reproducibility: the noise of an image comes in fixed blocks of ``noise_block`` samples, each
    drawn by a generator seeded from (seed, dataset index, stream, block); streams are selection,
    estimation and prediction. Because ``torch.randn`` output is not invariant to how a draw is
    split into calls, the block size is fixed and independent of ``batch_size``, so results do not
    depend on the batch size, the order or packing of images, or the number of processes. They do
    depend on the device type (CPU and CUDA generators differ), ``noise_block`` and
    ``channels_last`` (which draws the i.i.d. noise in NHWC order).

    Forward options: ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs f under autocast. The
    certificate is a statement about the base classifier *as evaluated*, so bf16 changes f but the
    guarantee holds for that f (noise is drawn and added in full precision; the cast is part of f).
    ``channels_last`` (and a ``torch.compile``d base classifier) evaluate the same f up to float
    rounding.

    Args:
        base_classifier: Module mapping a batch of [0, 1] images to logits of ``num_classes``.
        num_classes: Number of classes (>= 2).
        sigma: Noise standard deviation in pixel units (> 0).
        batch_size: Noisy samples per forward pass (>= 1).
        seed: Non-negative base seed of all noise.
        noise_block: Samples per independently seeded noise block (>= 1). Part of the seed:
            changing it changes the noise.
        autocast_dtype: ``None`` (full precision), ``torch.bfloat16`` or ``torch.float16``.
        channels_last: Convert the base classifier (in place) and the noise buffer to channels-last
            memory format; needs image inputs of shape (C, H, W).
        device: Device of the forward passes; default: that of the base classifier's parameters.

    Raises:
        ValueError: For any setting outside its allowed values (named in the message).
    """

    def __init__(
        self,
        base_classifier: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        batch_size: int = 1000,
        seed: int = 0,
        noise_block: int = DEFAULT_NOISE_BLOCK,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(base_classifier, nn.Module):
            raise ValueError(
                f"base_classifier must be a torch.nn.Module; got {type(base_classifier).__name__}"
            )
        _check_int("num_classes", num_classes, minimum=2)
        if (
            isinstance(sigma, bool)
            or not isinstance(sigma, numbers.Real)
            or not (math.isfinite(sigma) and sigma > 0)
        ):
            raise ValueError(f"sigma must be a positive finite float; got {sigma!r}")
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("seed", seed, minimum=0)
        _check_int("noise_block", noise_block, minimum=1)
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                "autocast_dtype must be one of None, torch.bfloat16, torch.float16; "
                f"got {autocast_dtype!r}"
            )
        self.base_classifier = base_classifier
        self.num_classes = int(num_classes)
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.noise_block = int(noise_block)
        self.autocast_dtype = autocast_dtype
        self.channels_last = bool(channels_last)
        inferred_device, self.dtype = _infer_device_dtype(base_classifier)
        self.device = torch.device(device) if device is not None else inferred_device
        if self.channels_last:
            # Outside inference mode, or the converted weights would be inference tensors and the
            # model could never be trained or attacked again (Lightning tests in inference mode).
            with torch.inference_mode(False), torch.no_grad():
                base_classifier.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------------ CERTIFY
    def certify(
        self, x: torch.Tensor, n0: int, n: int, alpha: float, index: int
    ) -> tuple[int, float]:
        """CERTIFY (Cohen et al. 2019, Algorithm 1) for one image.

        With probability at least 1 - alpha over the noise, the returned class is g(x) and g is
        constant on the L2 ball of the returned radius around x.

        Args:
            x: One image, shape (C, H, W) (any per-sample shape the classifier accepts).
            n0: Number of selection samples used to guess the top class.
            n: Number of fresh estimation samples used to lower-bound p_A.
            alpha: Failure probability in (0, 1).
            index: Dataset index of x; seeds its noise.

        Returns:
            (prediction, radius); (``ABSTAIN``, 0.0) when the bound on p_A is below 1/2.
        """
        cert = self.certify_batch(x.unsqueeze(0), [index], n0, n, alpha)[0]
        return cert.prediction, cert.radius

    def certify_batch(
        self,
        images: torch.Tensor,
        indices: Sequence[int] | torch.Tensor | np.ndarray,
        n0: int,
        n: int,
        alpha: float,
    ) -> list[Certificate]:
        """CERTIFY for several images, sharing forward batches between them.

        For each image, n0 selection samples choose c_A hat (argmax of counts); a FRESH, independent
        set of n estimation samples gives n_A; p_A_lower = Clopper-Pearson lower bound of (n_A, n);
        the image is certified with radius sigma * Phi^-1(p_A_lower) unless p_A_lower < 1/2
        (abstain, radius 0). ``smallest_useful_n(alpha)`` is the least n that can certify.

        Args:
            images: Batch of images, shape (B, C, H, W).
            indices: Dataset index of each image (B non-negative ints); seeds the noise.
            n0: Number of selection samples per image (>= 1).
            n: Number of estimation samples per image (>= 1).
            alpha: Failure probability of each certificate, in (0, 1).

        Returns:
            One ``Certificate`` per image, in input order.
        """
        _check_int("n0", n0, minimum=1)
        _check_int("n", n, minimum=1)
        _check_alpha(alpha)
        index_list = self._check_batch(images, indices)
        counts = self._sample_counts(
            images, index_list, [(SELECTION_STREAM, n0), (ESTIMATION_STREAM, n)]
        )
        top = counts[:, 0, :].argmax(axis=1)
        count_a = counts[:, 1, :][np.arange(len(index_list)), top]
        p_lower = np.atleast_1d(clopper_pearson_lower(count_a, n, alpha))
        certificates = []
        for i, index in enumerate(index_list):
            p = float(p_lower[i])
            abstain = p < 0.5
            certificates.append(
                Certificate(
                    index=index,
                    prediction=ABSTAIN if abstain else int(top[i]),
                    radius=0.0 if abstain else self.sigma * float(norm.ppf(p)),
                    p_a_lower=p,
                    count_a=int(count_a[i]),
                    top_class=int(top[i]),
                    n0=int(n0),
                    n=int(n),
                    alpha=float(alpha),
                )
            )
        return certificates

    # ------------------------------------------------------------------ PREDICT
    def predict(self, x: torch.Tensor, n: int, alpha: float, index: int) -> int:
        """PREDICT (Cohen et al. 2019, Algorithm 1) for one image.

        With probability at least 1 - alpha the result is g(x) or ``ABSTAIN``.

        Args:
            x: One image, shape (C, H, W).
            n: Number of noise samples (>= 1).
            alpha: Level of the binomial test of the top two counts, in (0, 1).
            index: Dataset index of x; seeds its noise.

        Returns:
            The predicted class or ``ABSTAIN``.
        """
        return self.predict_batch(x.unsqueeze(0), [index], n, alpha)[0]

    def predict_batch(
        self,
        images: torch.Tensor,
        indices: Sequence[int] | torch.Tensor | np.ndarray,
        n: int,
        alpha: float,
    ) -> list[int]:
        """PREDICT for several images: the top class unless binomial_pvalue(top two) > alpha.

        Args:
            images: Batch of images, shape (B, C, H, W).
            indices: Dataset index of each image (B non-negative ints); seeds the noise.
            n: Number of noise samples per image (>= 1).
            alpha: Level of the test, in (0, 1).

        Returns:
            One class (or ``ABSTAIN``) per image, in input order.
        """
        _check_int("n", n, minimum=1)
        _check_alpha(alpha)
        index_list = self._check_batch(images, indices)
        counts = self._sample_counts(images, index_list, [(PREDICTION_STREAM, n)])[:, 0, :]
        order = np.argsort(-counts, axis=1, kind="stable")
        predictions = []
        for i in range(len(index_list)):
            first, second = order[i, 0], order[i, 1]
            p_value = binomial_pvalue(int(counts[i, first]), int(counts[i, second]))
            predictions.append(int(first) if p_value <= alpha else ABSTAIN)
        return predictions

    # ------------------------------------------------------------------ sampling
    def _check_batch(
        self, images: torch.Tensor, indices: Sequence[int] | torch.Tensor | np.ndarray
    ) -> list[int]:
        if not isinstance(images, torch.Tensor) or images.dim() < 2:
            raise ValueError("images must be a tensor of shape (B, *sample_shape)")
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        index_list = [int(i) for i in np.asarray(indices).reshape(-1)]
        if len(index_list) != images.shape[0]:
            raise ValueError(
                f"indices must have one entry per image; got {len(index_list)} for "
                f"{images.shape[0]} images"
            )
        if any(i < 0 for i in index_list):
            raise ValueError("indices must be non-negative dataset indices")
        if self.channels_last and images.dim() != 4:
            raise ValueError("channels_last=True needs images of shape (B, C, H, W)")
        return index_list

    def _new_buffer(self, rows: int, sample_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Allocate a noise buffer; return (forward view, contiguous view that noise is drawn in)."""
        if self.channels_last:
            c, h, w = sample_shape
            draw = torch.empty((rows, h, w, c), device=self.device, dtype=self.dtype)
            return draw.permute(0, 3, 1, 2), draw
        buffer = torch.empty((rows, *sample_shape), device=self.device, dtype=self.dtype)
        return buffer, buffer

    def _chunks(
        self, num_images: int, indices: list[int], streams: list[tuple[int, int]]
    ) -> Iterator[tuple[int, int, int]]:
        """Yield (bucket, seed, rows) per noise block; bucket = image slot * len(streams) + k."""
        block = self.noise_block
        for slot in range(num_images):
            for k, (stream, num) in enumerate(streams):
                num_blocks = math.ceil(num / block)
                seeds = _block_seeds(self.seed, indices[slot], stream, num_blocks).tolist()
                for b, seed in enumerate(seeds):
                    yield slot * len(streams) + k, seed, min(block, num - b * block)

    @torch.inference_mode()
    def _sample_counts(
        self, images: torch.Tensor, indices: list[int], streams: list[tuple[int, int]]
    ) -> np.ndarray:
        """Count f's predictions on noisy copies; returns int64 counts of shape (B, S, classes)."""
        num_images, num_streams, classes = len(indices), len(streams), self.num_classes
        x = images.to(device=self.device, dtype=self.dtype)
        sample_shape = x.shape[1:]
        capacity = self.batch_size
        buffer, buffer_draw = self._new_buffer(capacity, sample_shape)
        scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        # On CUDA a broadcast add (x over the batch) runs several times slower than a dense one,
        # so long runs of one image add a dense copy of it (bitwise the same result).
        dense: torch.Tensor | None = None  # one image repeated over the batch
        dense_slot = -1
        generator = torch.Generator(device=self.device)
        ones = torch.ones(capacity, dtype=torch.int64, device=self.device)
        counts = torch.zeros(
            num_images * num_streams * classes, dtype=torch.int64, device=self.device
        )
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        # Runs of rows in the current forward batch: [bucket, rows, holds raw noise (x not added)].
        segments: list[list[int]] = []
        fill = 0

        def add_image(slot: int, noise: torch.Tensor, out: torch.Tensor) -> None:
            """Write x[slot] + sigma * noise into out (pixel space, no clipping)."""
            nonlocal dense, dense_slot
            image = x[slot]
            if self.device.type == "cuda" and out.shape[0] >= capacity // 4:
                if dense is None:
                    dense = torch.empty_like(buffer)
                if dense_slot != slot:
                    dense.copy_(image.expand_as(buffer))
                    dense_slot = slot
                image = dense[: out.shape[0]]
            torch.add(image, noise, alpha=self.sigma, out=out)

        def flush() -> None:
            nonlocal fill
            start = 0
            for bucket, rows, raw in segments:  # one op per run of raw rows of one image
                if raw:
                    view = buffer[start : start + rows]
                    add_image(bucket // num_streams, view, view)
                start += rows
            with autocast:
                logits = self.base_classifier(buffer[:fill])
            if logits.shape != (fill, classes):
                raise ValueError(
                    f"base_classifier must return logits of shape (batch, num_classes={classes}); "
                    f"got {tuple(logits.shape)}"
                )
            # Key = bucket * classes + class. index_add_ rather than torch.bincount: on CUDA,
            # bincount reads the maximum key back to the host, a sync per forward batch.
            offsets = np.repeat(
                np.array([s[0] for s in segments]) * classes, [s[1] for s in segments]
            )
            keys = logits.argmax(dim=1) + torch.from_numpy(offsets).to(
                self.device, non_blocking=True
            )
            counts.index_add_(0, keys, ones[:fill])
            segments.clear()
            fill = 0

        def record(bucket: int, rows: int, raw: bool) -> None:
            nonlocal fill
            if segments and segments[-1][0] == bucket and segments[-1][2] == raw:
                segments[-1][1] += rows
            else:
                segments.append([bucket, rows, raw])
            fill += rows
            if fill == capacity:
                flush()

        with eval_mode(self.base_classifier):
            for bucket, seed, rows in self._chunks(num_images, indices, streams):
                generator.manual_seed(seed)
                if fill + rows <= capacity:  # the whole block fits: draw it in place
                    target = buffer_draw[fill : fill + rows]
                    torch.randn(target.shape, out=target, generator=generator)
                    record(bucket, rows, raw=True)
                    continue
                # The block straddles forward batches: draw it whole into scratch, then write
                # x + sigma * z piece by piece (scratch is reused by the next straddling block).
                if scratch is None:
                    scratch = self._new_buffer(self.noise_block, sample_shape)
                target = scratch[1][:rows]
                torch.randn(target.shape, out=target, generator=generator)
                done = 0
                while done < rows:
                    take = min(capacity - fill, rows - done)
                    piece = buffer[fill : fill + take]
                    add_image(bucket // num_streams, scratch[0][done : done + take], piece)
                    done += take
                    record(bucket, take, raw=False)
            if fill:
                flush()
        return counts.view(num_images, num_streams, classes).cpu().numpy()


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a float in the open interval (0, 1); got {alpha!r}")
