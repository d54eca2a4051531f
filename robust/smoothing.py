"""Randomized smoothing: certified L2 robustness of a smoothed classifier.

Cohen, Rosenfeld & Kolter (2019), "Certified Adversarial Robustness via Randomized Smoothing"
(arXiv 1902.02918). The smoothed classifier is g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0,
sigma^2 I). If the top class has probability p_A >= pA_bar > 1/2, g is constant on the L2 ball of
radius R = sigma * Phi^-1(pA_bar) around x (Theorem 1 with pB_bar = 1 - pA_bar). ``Smooth``
implements the Monte Carlo algorithms PREDICT and CERTIFY (Algorithm 1 / Section 3.2.2).

Examples:
    >>> import torch
    >>> from torch import nn
    >>> always_one = nn.Linear(4, 2)  # f(x) = 1 for every x: logits (0, 1)
    >>> _ = nn.init.zeros_(always_one.weight), always_one.bias.data.copy_(torch.tensor([0.0, 1.0]))
    >>> smooth = Smooth(nn.Sequential(nn.Flatten(), always_one), num_classes=2, sigma=0.5)
    >>> prediction, radius = smooth.certify(torch.zeros(1, 2, 2), n0=10, n=100, alpha=0.01, index=0)
    >>> prediction, round(radius, 4)  # sigma * Phi^-1(alpha ** (1 / n)): all n samples say 1
    (1, 0.8477)
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import norm
from torch import nn

import robust.fused_conv_pool as fusion
from robust.bias_after_pool import bias_after_pool
from robust.checks import SettingError, check_choice, check_int, check_real
from robust.modes import eval_mode
from robust.pairwise_pool import pairwise_max_pool
from robust.pool_first import HOOK_ATTRIBUTES, pool_before_relu
from robust.statistics import binomial_pvalue, clopper_pearson_lower, smallest_useful_n

__all__ = [
    "ABSTAIN",
    "DEFAULT_NOISE_BLOCK",
    "DETERMINING_SETTINGS",
    "MAX_BLOCKS",
    "MAX_INDEX",
    "NOISE_SCHEME",
    "Certificate",
    "Smooth",
    "binomial_pvalue",
    "block_seeds",
    "check_num_samples",
    "clopper_pearson_lower",
    "smallest_useful_n",
]

ABSTAIN = -1
"""Class returned when the smoothed classifier abstains."""

# Independent noise streams per image: the estimation samples must never be the selection samples.
SELECTION_STREAM = 0
ESTIMATION_STREAM = 1
PREDICTION_STREAM = 2
NUM_STREAMS = 3

DEFAULT_NOISE_BLOCK = 1000
"""Noisy samples per independently seeded noise block (part of the seed of all noise)."""

MAX_BLOCKS = 1024
"""Noise blocks per (image, stream) that keep block seeds distinct: n <= MAX_BLOCKS * noise_block."""

MAX_INDEX = 2**32 // (NUM_STREAMS * MAX_BLOCKS) - 1
"""Largest dataset index whose block seeds stay distinct (1,398,100; ImageNet's train set fits)."""

NOISE_SCHEME = "block-seeds-fmix32/nchw/float32"
# The keys of ``Smooth.settings`` that determine its certificates (beyond n0, n, alpha, model).
DETERMINING_SETTINGS = (
    *("sigma", "seed", "noise_block", "autocast", "tf32", "noise_scheme", "device_type", "gpu"),
)
"""Names how the noise is made (seeds, order, precision); record it next to saved certificates."""

_MASK32 = 0xFFFFFFFF


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

    Examples:
        >>> cert = Certificate(3, ABSTAIN, 0.0, 0.41, 480, 2, 100, 1000, 0.001)
        >>> cert.abstained
        True
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
        """Whether CERTIFY abstained.

        Examples:
            >>> Certificate(0, 4, 0.3, 0.9, 95, 4, 100, 100, 0.001).abstained
            False
        """
        return self.prediction == ABSTAIN


# ---------------------------------------------------------------------------- seeded noise blocks


def check_num_samples(name: str, value: object, noise_block: int, owner: str | None = None) -> int:
    """A number of noise samples per image: an integer in [1, MAX_BLOCKS * noise_block].

    Beyond it, block seeds would repeat (see :func:`block_seeds`).

    Raises:
        SettingError: Naming the setting, the limit and how to raise it.

    Examples:
        >>> check_num_samples("n", 100_000, 1000)
        100000
    """
    try:
        return check_int(name, value, minimum=1, maximum=MAX_BLOCKS * noise_block, owner=owner)
    except SettingError as err:
        raise SettingError(
            f"{err} (at most MAX_BLOCKS={MAX_BLOCKS} noise blocks of noise_block={noise_block} "
            "samples keep the noise seeds distinct; raise noise_block for more samples)"
        ) from None


def _seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys derived from the base seed (any non-negative int) by NumPy's SeedSequence."""
    k0, k1 = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int(k0), int(k1)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer: a bijection of [0, 2**32) (every step is invertible)."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(_MASK32)
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(_MASK32)
    return h ^ (h >> np.uint64(16))


def block_seeds(
    seed: int, index: int | Sequence[int] | np.ndarray, stream: int, num_blocks: int
) -> np.ndarray:
    """Generator seeds of noise blocks 0..num_blocks-1 of one (base seed, dataset index, stream).

    PyTorch's CPU generator keeps only the low 32 bits of a seed (``manual_seed(s)`` equals
    ``manual_seed(s + 2**32)``), so 64-bit seeds drawn at random would collide: about 131 pairs
    among the 1.01M blocks of 10,000 images at n = 100,000. Instead every block gets a distinct
    32-bit seed by construction:

    1. key = (index * NUM_STREAMS + stream) * MAX_BLOCKS + block, a mixed-radix number that is
       injective for index <= MAX_INDEX, stream < NUM_STREAMS and block < MAX_BLOCKS, and < 2**32;
    2. seed32 = fmix32((key + k0) mod 2**32) XOR k1 with (k0, k1) derived from the base seed: a
       composition of bijections of the 32-bit integers, so distinct keys keep distinct seeds.

    Within one run (one base seed) no two blocks share a seed, on any device: CUDA's Philox takes
    the same seeds (as its 64-bit key, offset 0). Runs with different base seeds use unrelated
    permutations of the same 2**32 seeds, so a block of one run equals some block of another run
    only by chance (probability about blocks / 2**32 per block).

    Args:
        seed: Non-negative base seed of the run.
        index: Dataset index of the image, in [0, MAX_INDEX]; or a 1-D array of them.
        stream: Noise stream (0 selection, 1 estimation, 2 prediction).
        num_blocks: Number of blocks, in [0, MAX_BLOCKS].

    Returns:
        uint32 array of ``num_blocks`` seeds; of shape (len(index), num_blocks) for an array.

    Raises:
        SettingError: For an index, stream or block count outside the collision-free ranges.

    Examples:
        >>> block_seeds(0, index=7, stream=1, num_blocks=3).tolist()
        [3526622783, 2447370486, 3089093485]
        >>> block_seeds(0, index=[7, 8], stream=1, num_blocks=2).tolist()
        [[3526622783, 2447370486], [3491389806, 67446996]]
    """
    seed = check_int("seed", seed, minimum=0)
    indices = np.asarray(index)
    valid = indices.ndim <= 1 and (
        indices.size == 0
        or (
            np.issubdtype(indices.dtype, np.integer)
            and 0 <= indices.min() <= indices.max() <= MAX_INDEX
        )
    )
    if not valid:
        raise SettingError(f"index must be integers in [0, {MAX_INDEX}]; got {index!r}")
    stream = check_int("stream", stream, minimum=0, maximum=NUM_STREAMS - 1)
    num_blocks = check_int("num_blocks", num_blocks, minimum=0, maximum=MAX_BLOCKS)
    k0, k1 = _seed_keys(seed)
    first = (indices.astype(np.uint64) * NUM_STREAMS + np.uint64(stream)) * np.uint64(MAX_BLOCKS)
    key = first[..., None] + np.arange(num_blocks, dtype=np.uint64)
    mixed = _fmix32((key + np.uint64(k0)) & np.uint64(_MASK32)) ^ np.uint64(k1)
    return mixed.astype(np.uint32)


def _noise_blocks(
    seed: int, indices: Sequence[int], streams: Sequence[tuple[int, int]], noise_block: int
) -> Iterator[tuple[int, int]]:
    """(block seed, rows) of every noise block of a call, in the order of the rows they fill.

    The rows of a call are laid out image by image and, within an image, stream by stream:
    image slot i owns rows [i * per_image, (i + 1) * per_image) with per_image = sum of the
    streams' sample counts, its first ``streams[0][1]`` rows in stream ``streams[0][0]``.
    """
    for index in indices:  # each image's rows are contiguous ...
        for stream, num in streams:  # ... the selection rows first, then the estimation rows
            seeds = block_seeds(seed, index, stream, math.ceil(num / noise_block)).tolist()
            for block, block_seed in enumerate(seeds):  # block b holds samples b * noise_block..
                yield block_seed, min(noise_block, num - block * noise_block)


# ---------------------------------------------------------------------------- forward batches


@dataclass
class _Buffers:
    """Device buffers of the forward batches, reused across calls (static for compile/graphs).

    noise: ``batch_size + threads * noise_block`` rows of N(0, I) noise (``Smooth.noise_threads``);
        a forward batch is B rows starting at a multiple of B (a CUDA graph's are ``noise[:B]``).
    images: The call's images, padded with zeros to a power-of-two capacity.
    rows: Global row number of each row of the current forward batch.
    layout: [rows per image, first row of the second stream within an image, streams * classes].
    ones: Count increments.
    """

    noise: torch.Tensor
    images: torch.Tensor
    rows: torch.Tensor
    layout: torch.Tensor
    ones: torch.Tensor


def _channels_last_copy(model: nn.Module) -> nn.Module:
    """A private channels-last copy of ``model`` in eval mode; the caller's module is untouched.

    Made outside inference mode so that it is an ordinary module (Lightning tests run in
    inference mode), with its parameters frozen: only Smooth evaluates it.
    """
    with torch.inference_mode(False), torch.no_grad():
        private = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return private.eval().requires_grad_(False)


def _structure(model: nn.Module) -> tuple:
    """Every submodule and its hooks, in order: changes when the caller swaps a module or hooks one."""
    return tuple(
        (id(m), *(tuple(getattr(m, h, ())) for h in HOOK_ATTRIBUTES)) for m in model.modules()
    )


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def _infer_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for _, tensor in _tensors(model):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


class Smooth:
    """Smoothed classifier g of Cohen et al. (2019) around a base classifier f, with PREDICT/CERTIFY.

    Noise is added in pixel space, x + N(0, sigma^2 I), with NO clipping to [0, 1]: the certificate
    (Theorem 1) is about exactly this Gaussian. The base classifier maps [0, 1] images to logits and
    contains its own input normalization.

    **Precision.** The noise is drawn and added in float32 (float64 for a float64 model), whatever
    the model's dtype, so x + sigma * z is Gaussian to float32 rounding; it is then cast to the
    model's dtype (e.g. bfloat16 under ``precision="bf16-true"``). The certificate is about the
    classifier *as evaluated*: the cast, ``autocast_dtype`` and ``tf32`` are part of f, and
    Theorem 1 holds for that f. ``tf32=False`` (default) makes "fp32" mean IEEE float32 in
    cuDNN convolutions and CUDA matmuls (PyTorch's own default lets cuDNN use TF32);
    ``tf32=True`` allows TF32 there, a slightly different f. Neither matters on CPUs.

    **Noise.** Each image's noise comes in blocks of ``noise_block`` samples drawn by a generator
    seeded with ``block_seeds(seed, dataset index, stream, block)``, always in NCHW order; the
    streams are selection, estimation and prediction. Block seeds are distinct by construction for
    dataset indices <= ``MAX_INDEX`` and n, n0 <= ``MAX_BLOCKS * noise_block`` (larger values are
    refused). Because ``torch.randn`` output is not invariant to how a draw is split, the block
    size is fixed and independent of ``batch_size``, so results do not depend on the batch size,
    the order or packing of images, the number of processes, ``channels_last``, ``compile`` or
    ``cuda_graph`` (beyond float rounding of f). They do depend on the device type (CPU and CUDA
    generators differ) and, on CUDA, on the GPU model for blocks of more than about a million
    values (PyTorch sizes its random-number grid by the number of multiprocessors).

    **Speed.** Noisy copies of several images are packed into forward batches of ``batch_size``;
    class counts stay on the device (``index_add_``; ``torch.bincount`` would sync on CUDA) and
    cross to the host once per call; nothing inside the loop synchronizes. Options: ``autocast``
    (bf16/fp16 forward), ``channels_last`` (a private channels-last copy of the model, refreshed
    from the caller's weights at each call, so the caller's module is never converted),
    ``compile`` (``torch.compile`` of the per-batch step with static shapes: the last batch is
    padded to ``batch_size`` and its padded rows are not counted) and ``cuda_graph`` (one CUDA
    graph of the per-batch step, replayed; CUDA only, ignored elsewhere) and ``cudnn_benchmark``
    (cuDNN times its convolution algorithms once per batch shape and keeps the fastest; CUDA only;
    on an H200 it gave LeNet's forward no gain over cuDNN's own choice). Rule for the batch
    size on a GPU: the largest that fits in memory, a multiple of ``noise_block``, so that one
    forward pass takes milliseconds (e.g. 50,000 for LeNet, 1,000 for a CIFAR ResNet-18) and the
    per-block host work (about 10-20 us per block) stays small; ``benchmarks/certify.py --sweep``
    measures it. On a CPU, the largest whose activations stay below the 32 MiB that
    :mod:`robust.cpu_memory` keeps: LeNet on 2 cores certifies 26k-27k samples/s at 200-700 and
    16k-17k at 1,000 or more (the README's table).

    Args:
        base_classifier: Module mapping a batch of [0, 1] images to logits of ``num_classes``.
        num_classes: Number of classes (>= 2).
        sigma: Noise standard deviation in pixel units (> 0).
        batch_size: Noisy samples per forward pass (>= 1); default of every call.
        seed: Non-negative base seed of all noise.
        noise_block: Samples per independently seeded noise block (>= 1). Part of the seed:
            changing it changes the noise.
        autocast_dtype: ``None`` (the model's own precision), ``torch.bfloat16`` or
            ``torch.float16``: run f under autocast.
        channels_last: Evaluate a private channels-last copy of f; needs (C, H, W) images.
        compile: ``torch.compile`` the per-batch step (static shapes).
        cuda_graph: Capture the per-batch step in a CUDA graph (CUDA devices only).
        tf32: Allow TF32 in cuDNN convolutions and CUDA matmuls during certification.
        cudnn_benchmark: Let cuDNN pick its fastest convolution algorithms by timing them
            (``torch.backends.cudnn.benchmark`` during certification; CUDA only).
        pool_first: Evaluate f with ReLU after max-pooling (``robust.pool_first``: the same
            function); ``None``: with ``channels_last``, where it measured faster (1.06-1.07x
            for LeNet's forward on 2 CPU cores; 0.91-0.95x in the contiguous layout there).
        bias_after_pool: Evaluate f with each convolution's bias added after the max-pool that
            follows it (``robust.bias_after_pool``: the same values, bit for bit where the
            convolution adds its bias separately, as cuDNN's does; rounding apart on CPUs);
            applies after ``pool_first`` has brought a ReLU behind its pool. Off by default:
            a GPU lever (the bias adds took 2.3 of LeNet's 15.0 ms on an H200), not yet timed.
        fused_conv_pool: Evaluate each small convolution with its 2x2 max-pool and ReLU (LeNet's
            first block) as one Triton kernel on CUDA, in float32 or in autocast's bf16/fp16
            (``robust.fused_conv_pool``: the same classifier up to the rounding of the
            convolution's sums, float32 in every mode; checked against PyTorch's layers at its
            first call); elsewhere the layers run as written. Off by default: a GPU lever not
            yet timed.
        pairwise_pool: Evaluate f with its plain 2x2 (and adaptive) max-pools as two
            elementwise maxima (``robust.pairwise_pool``: the same values, without the CPU
            pooling kernel's indices); ``None``: on CPUs, where LeNet's channels-last forward
            ran 1.12x faster on 2 cores (its certification 1.46-1.70x in the contiguous layout).
        noise_threads: Noise blocks drawn at once on a CPU, each by its own thread (>= 1; the
            noise is the same); ``None``: ``min(torch.get_num_threads(), 8)``; always 1 on GPUs. One
            thread draws about 540k samples/s, which would cap certification on many cores;
            on 2 cores two threads measured 0.96-1.03x (the forward keeps both cores busy).
        device: Device of the forward passes; default: that of the base classifier's parameters.

    Raises:
        SettingError: For any setting outside its allowed values (named in the message).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> smooth = Smooth(model, num_classes=3, sigma=0.25, batch_size=500)
        >>> certificates = smooth.certify_batch(torch.rand(2, 1, 4, 4), [0, 1], 10, 200, 0.01)
        >>> [c.index for c in certificates]
        [0, 1]
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
        compile: bool = False,
        cuda_graph: bool = False,
        tf32: bool = False,
        cudnn_benchmark: bool = False,
        pool_first: bool | None = None,
        bias_after_pool: bool = False,
        fused_conv_pool: bool = False,
        pairwise_pool: bool | None = None,
        noise_threads: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(base_classifier, nn.Module):
            raise SettingError(
                f"Smooth base_classifier must be a torch.nn.Module; got "
                f"{type(base_classifier).__name__}"
            )
        owner = "Smooth"
        self.base_classifier = base_classifier
        self.num_classes = check_int("num_classes", num_classes, minimum=2, owner=owner)
        self.sigma = check_real("sigma", sigma, low=0, owner=owner)
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.seed = check_int("seed", seed, minimum=0, owner=owner)
        self.noise_block = check_int("noise_block", noise_block, minimum=1, owner=owner)
        self.autocast_dtype = check_choice(
            "autocast_dtype", autocast_dtype, [None, torch.bfloat16, torch.float16], owner=owner
        )
        flags = {"channels_last": channels_last, "compile": compile, "cuda_graph": cuda_graph}
        for name, value in (*flags.items(), ("tf32", tf32), ("cudnn_benchmark", cudnn_benchmark)):
            check_choice(name, value, [False, True], owner=owner)
        self.channels_last, self.compile, self.cuda_graph = channels_last, compile, cuda_graph
        self.tf32, self.cudnn_benchmark = tf32, cudnn_benchmark
        check_choice("pool_first", pool_first, [None, False, True], owner=owner)
        self.pool_first = channels_last if pool_first is None else pool_first
        self.bias_after_pool = check_choice(
            "bias_after_pool", bias_after_pool, [False, True], owner=owner
        )
        self.fused_conv_pool = check_choice(
            "fused_conv_pool", fused_conv_pool, [False, True], owner=owner
        )
        check_choice("pairwise_pool", pairwise_pool, [None, False, True], owner=owner)
        self.noise_threads = noise_threads
        if noise_threads is not None:
            self.noise_threads = check_int("noise_threads", noise_threads, minimum=1, owner=owner)
        inferred_device, self.model_dtype = _infer_device_dtype(base_classifier)
        self.device = torch.device(device) if device is not None else inferred_device
        cuda_only = {"cuda_graph": cuda_graph, "tf32": tf32, "cudnn_benchmark": cudnn_benchmark}
        if self.device.type != "cuda" and any(cuda_only.values()):
            # off, and recorded off: a CPU certificate is never labelled TF32
            asked = [name for name, value in cuda_only.items() if value]
            verb, pronoun = ("apply", "they are") if len(asked) > 1 else ("applies", "it is")
            warnings.warn(
                f"{owner} {', '.join(asked)} {verb} on CUDA devices only; on "
                f"{self.device.type} {pronoun} off (the IEEE float32 classifier is certified)",
                UserWarning,
                stacklevel=2,
            )
            self.cuda_graph = self.tf32 = self.cudnn_benchmark = False
        self.pairwise_pool = self.device.type == "cpu" if pairwise_pool is None else pairwise_pool
        if channels_last and cuda_graph and self.device.type == "cuda":
            # Measured on an H200 (torch 2.11): capturing the channels-last forward ended in
            # "illegal memory access"; refuse it rather than risk a corrupt count.
            raise SettingError(
                f"{owner} channels_last=True with cuda_graph=True is not supported on CUDA "
                "(the captured graph crashed on an H200); set one of them to False"
            )
        # Noise in float32 (float64 for float64 models), never in the model's bf16/fp16.
        self.noise_dtype = torch.promote_types(torch.float32, self.model_dtype)
        # the module evaluated: a private channels-last copy or the caller's, with ReLU after
        # max-pooling under pool_first and pairwise 2x2 max-pools under pairwise_pool (the same
        # function)
        self._copy = _channels_last_copy(base_classifier) if channels_last else None
        self._model = self._view(base_classifier if self._copy is None else self._copy)
        self._structure = _structure(base_classifier)
        self._buffers: _Buffers | None = None
        self._compiled: Callable[..., torch.Tensor] | None = None
        self._graph: tuple[tuple, torch.cuda.CUDAGraph, torch.Tensor] | None = None

    @property
    def static_shapes(self) -> bool:
        """Whether every forward batch has exactly ``batch_size`` rows (compile or CUDA graphs).

        Examples:
            >>> Smooth(nn.Linear(4, 2), 2, 0.5, compile=True).static_shapes
            True
        """
        return self.compile or self._use_graph

    @property
    def settings(self) -> dict[str, Any]:
        """What determines this classifier's certificates, then its speed options (JSON-able).

        The keys in ``DETERMINING_SETTINGS`` fix every certificate up to float rounding (for given
        n0, n, alpha and model); the speed options (``channels_last`` to ``batch_size``) do not
        and are kept for the record. A resumed TSV is checked against the first group.

        Examples:
            >>> Smooth(nn.Linear(4, 2), 2, 0.5).settings["noise_scheme"] == NOISE_SCHEME
            True
        """
        autocast = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast_dtype)
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return {
            **{k: getattr(self, k) for k in ("sigma", "num_classes", "seed", "noise_block")},
            **{"autocast": autocast, "tf32": self.tf32, "noise_scheme": NOISE_SCHEME},
            **{"device_type": self.device.type, "gpu": gpu},
            **{k: getattr(self, k) for k in ("channels_last", "compile", "cuda_graph")},
            "cudnn_benchmark": self.cudnn_benchmark,
            "pool_first": self.pool_first,
            "bias_after_pool": self.bias_after_pool,
            "fused_conv_pool": self.fused_conv_pool,
            "pairwise_pool": self.pairwise_pool,
            "noise_threads": self._threads(),
            "batch_size": self.batch_size,
        }

    @property
    def _use_graph(self) -> bool:
        return self.cuda_graph and self.device.type == "cuda"

    # ------------------------------------------------------------------ CERTIFY
    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        *,
        index: int,
        batch_size: int | None = None,
    ) -> tuple[int, float]:
        """CERTIFY (Cohen et al. 2019, Algorithm 1) for one image.

        With probability at least 1 - alpha over the noise, the returned class is g(x) and g is
        constant on the L2 ball of the returned radius around x. ``index`` and ``batch_size`` are
        keyword-only: locuslab's ``certify(x, n0, n, alpha, batch_size)`` raises a TypeError here
        instead of silently seeding the noise with the batch size.

        Args:
            x: One image, shape (C, H, W) (any per-sample shape the classifier accepts).
            n0: Number of selection samples used to guess the top class.
            n: Number of fresh estimation samples used to lower-bound p_A.
            alpha: Failure probability in (0, 1).
            index: Dataset index of x; seeds its noise (required: images given one index
                would share their noise, and their certificates' errors).
            batch_size: Noisy samples per forward pass; ``None``: the instance's.

        Returns:
            (prediction, radius); (``ABSTAIN``, 0.0) when the bound on p_A is below 1/2.

        Examples:
            >>> smooth = Smooth(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 2, sigma=0.5)
            >>> smooth.certify(torch.zeros(1, 2, 2), 10, 5, 0.001, index=3)  # n too small: abstain
            (-1, 0.0)
        """
        cert = self.certify_batch(x.unsqueeze(0), [index], n0, n, alpha, batch_size=batch_size)
        return cert[0].prediction, cert[0].radius

    def certify_batch(
        self,
        images: torch.Tensor,
        indices: Sequence[int] | torch.Tensor | np.ndarray,
        n0: int,
        n: int,
        alpha: float,
        *,
        batch_size: int | None = None,
    ) -> list[Certificate]:
        """CERTIFY for several images, sharing forward batches between them.

        ``smallest_useful_n(alpha)`` is the least n that can certify.

        Args:
            images: Batch of images, shape (B, C, H, W).
            indices: Dataset index of each image (B ints in [0, MAX_INDEX]); seeds the noise.
            n0: Number of selection samples per image, in [1, MAX_BLOCKS * noise_block].
            n: Number of estimation samples per image, in [1, MAX_BLOCKS * noise_block].
            alpha: Failure probability of each certificate, in (0, 1).
            batch_size: Noisy samples per forward pass; ``None``: the instance's.

        Returns:
            One ``Certificate`` per image, in input order.

        Examples:
            >>> smooth = Smooth(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 2, sigma=0.5)
            >>> cert = smooth.certify_batch(torch.zeros(1, 1, 2, 2), [5], 10, 100, 0.01)[0]
            >>> cert.index, cert.n0, cert.n, cert.count_a <= 100
            (5, 10, 100, True)
        """
        n0, n = self._check_num("n0", n0), self._check_num("n", n)
        alpha = check_real("alpha", alpha, low=0, high=1)
        indices = self._check_batch(images, indices)
        streams = [(SELECTION_STREAM, n0), (ESTIMATION_STREAM, n)]
        # draw n0 + n samples of f(x + eps) per image: two independent noise streams
        counts = self._sample_counts(images, indices, streams, batch_size)
        # use the n0 selection samples to take a guess at the top class c_A
        top = counts[:, 0, :].argmax(axis=1)
        # count c_A among the n fresh estimation samples
        count_a = counts[:, 1, :][np.arange(len(indices)), top]
        # one-sided (1 - alpha) lower confidence bound on p_A
        p_lower = np.atleast_1d(clopper_pearson_lower(count_a, n, alpha))
        certificates = []
        for i, index in enumerate(indices):
            p = float(p_lower[i])
            # abstain unless p_A > 1/2 is certain at level alpha; else R = sigma * Phi^-1(p_A)
            abstain = not p > 0.5  # p = 1/2 exactly allows a tie (Cohen et al., Algorithm 1)
            certificates.append(
                Certificate(
                    index=index,
                    prediction=ABSTAIN if abstain else int(top[i]),
                    radius=0.0 if abstain else self.sigma * float(norm.ppf(p)),
                    p_a_lower=p,
                    count_a=int(count_a[i]),
                    top_class=int(top[i]),
                    n0=n0,
                    n=n,
                    alpha=alpha,
                )
            )
        return certificates

    # ------------------------------------------------------------------ PREDICT
    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        *,
        index: int,
        batch_size: int | None = None,
    ) -> int:
        """PREDICT (Cohen et al. 2019, Algorithm 1) for one image.

        With probability at least 1 - alpha the result is g(x) or ``ABSTAIN``.

        Args:
            x: One image, shape (C, H, W).
            n: Number of noise samples, in [1, MAX_BLOCKS * noise_block].
            alpha: Level of the binomial test of the top two counts, in (0, 1).
            index: Dataset index of x; seeds its noise (required, as for :meth:`certify`).
            batch_size: Noisy samples per forward pass; ``None``: the instance's.

        Returns:
            The predicted class or ``ABSTAIN``.

        Examples:
            >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # logits (0, x[0]):
            >>> _ = nn.init.zeros_(model[1].weight), nn.init.zeros_(model[1].bias)
            >>> model[1].weight.data[1, 0] = 1.0  # x = 0 is on the decision boundary
            >>> Smooth(model, 2, sigma=0.5).predict(torch.zeros(1, 2, 2), 100, 0.001, index=0)
            -1
        """
        predictions = self.predict_batch(x.unsqueeze(0), [index], n, alpha, batch_size=batch_size)
        return predictions[0]

    def predict_batch(
        self,
        images: torch.Tensor,
        indices: Sequence[int] | torch.Tensor | np.ndarray,
        n: int,
        alpha: float,
        *,
        batch_size: int | None = None,
    ) -> list[int]:
        """PREDICT for several images: the top class unless binomial_pvalue(top two) > alpha.

        Args:
            images: Batch of images, shape (B, C, H, W).
            indices: Dataset index of each image (B ints in [0, MAX_INDEX]); seeds the noise.
            n: Number of noise samples per image, in [1, MAX_BLOCKS * noise_block].
            alpha: Level of the test, in (0, 1).
            batch_size: Noisy samples per forward pass; ``None``: the instance's.

        Returns:
            One class (or ``ABSTAIN``) per image, in input order.

        Examples:
            >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
            >>> _ = nn.init.zeros_(model[1].weight), model[1].bias.data.copy_(torch.tensor([1., 0]))
            >>> Smooth(model, 2, sigma=0.5).predict_batch(torch.zeros(3, 1, 2, 2), [0, 1, 2], 50, 0.01)
            [0, 0, 0]
        """
        n = self._check_num("n", n)
        alpha = check_real("alpha", alpha, low=0, high=1)
        indices = self._check_batch(images, indices)
        # draw n samples of f(x + eps) per image
        counts = self._sample_counts(images, indices, [(PREDICTION_STREAM, n)], batch_size)[:, 0]
        # the top two classes
        order = np.argsort(-counts, axis=1, kind="stable")
        predictions = []
        for i in range(len(indices)):
            first, second = order[i, 0], order[i, 1]
            # return the top class only if a two-sided binomial test rejects p = 1/2 at alpha
            p_value = binomial_pvalue(int(counts[i, first]), int(counts[i, second]))
            predictions.append(int(first) if p_value <= alpha else ABSTAIN)
        return predictions

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def noisy_inputs(
        self, x: torch.Tensor, num: int, *, index: int = 0, stream: int = SELECTION_STREAM
    ) -> torch.Tensor:
        """The noisy copies x + sigma * z that a call with n = ``num`` classifies, before f's cast.

        Exactly the noise that CERTIFY/PREDICT classify with that many samples (same blocks,
        seeds and arithmetic), in ``noise_dtype``: for looking at, and for checking that it is
        Gaussian. The last block is drawn at its own size, and PyTorch's CPU generator fills a
        tensor whose element count is not a multiple of 16 differently from the start of a longer
        one, so the copies of a smaller ``num`` need not be the first ones of a larger (they are
        for 28 x 28 images: 784 values).

        Args:
            x: One image, shape (C, H, W).
            num: Number of samples, in [1, MAX_BLOCKS * noise_block].
            index: Dataset index of x.
            stream: 0 selection, 1 estimation, 2 prediction.

        Returns:
            Tensor of shape (num, C, H, W) on ``device``.

        Examples:
            >>> smooth = Smooth(nn.Flatten(), 2, sigma=0.5)
            >>> noisy = smooth.noisy_inputs(torch.zeros(1, 2, 2), 3, index=4)
            >>> noisy.shape, noisy.dtype
            (torch.Size([3, 1, 2, 2]), torch.float32)
        """
        num = self._check_num("num", num)
        check_int("stream", stream, minimum=0, maximum=NUM_STREAMS - 1)
        self._check_batch(x.unsqueeze(0), [index])
        image = x.to(device=self.device, dtype=self.noise_dtype).unsqueeze(0)
        noise = torch.empty((num, *x.shape), device=self.device, dtype=self.noise_dtype)
        generator = torch.Generator(device=self.device)
        start = 0
        for block_seed, rows in _noise_blocks(
            self.seed, [index], [(stream, num)], self.noise_block
        ):
            generator.manual_seed(block_seed)
            block = noise[start : start + rows]
            torch.randn(block.shape, generator=generator, out=block)
            start += rows
        rows_of = torch.zeros(num, dtype=torch.int64, device=self.device)
        return self._noisy(image, rows_of, noise)

    # ------------------------------------------------------------------ checks
    def _check_num(self, name: str, value: object) -> int:
        return check_num_samples(name, value, self.noise_block)

    def _check_batch(
        self, images: torch.Tensor, indices: Sequence[int] | torch.Tensor | np.ndarray
    ) -> list[int]:
        if not isinstance(images, torch.Tensor) or images.dim() < 2:
            raise SettingError("images must be a tensor of shape (B, *sample_shape)")
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        index_list = [int(i) for i in np.asarray(indices).reshape(-1)]
        if len(index_list) != images.shape[0]:
            raise SettingError(
                f"indices must have one entry per image; got {len(index_list)} for "
                f"{images.shape[0]} images"
            )
        bad = [i for i in index_list if not 0 <= i <= MAX_INDEX]
        if bad:
            raise SettingError(
                f"indices must be dataset indices in [0, {MAX_INDEX}] (the range whose noise "
                f"seeds are distinct); got {bad[0]}"
            )
        if self.channels_last and images.dim() != 4:
            raise SettingError("channels_last=True needs images of shape (B, C, H, W)")
        return index_list

    # ------------------------------------------------------------------ sampling
    @torch.inference_mode()
    def _sample_counts(
        self,
        images: torch.Tensor,
        indices: list[int],
        streams: list[tuple[int, int]],
        batch_size: int | None,
    ) -> np.ndarray:
        """Count f's classes on the noisy copies: int64 array (images, streams, classes).

        Noise blocks fill the rows of the call in order (see ``_noise_blocks``), drawn in waves
        of ``threads`` consecutive blocks at once; every ``batch_size`` rows make one forward
        batch. A wave's rows are classified batch by batch where they were drawn, and its last
        rows, too few for a batch, are carried to the front of the buffer for the next wave.
        """
        size = self.batch_size
        if batch_size is not None:
            size = check_int("batch_size", batch_size, minimum=1)
        per_image, threads = sum(num for _, num in streams), self._threads()
        buffers = self._prepare(images, size, per_image, streams[0][1], len(streams), threads)
        counts = torch.zeros(
            len(indices) * len(streams) * self.num_classes, dtype=torch.int64, device=self.device
        )
        generators = [torch.Generator(device=self.device) for _ in range(threads)]
        blocks = _noise_blocks(self.seed, indices, streams, self.noise_block)
        noise, fill = buffers.noise, 0
        with self._evaluating(), _thread_pool(threads) as pool:
            step = self._step(buffers, size)
            # a wave of up to `threads` consecutive blocks, drawn at once, one thread each
            while wave := list(itertools.islice(blocks, threads)):
                # each block's rows follow the previous ones, the next free rows of the buffer
                targets = []
                for _, rows in wave:
                    targets.append(noise[fill : fill + rows])
                    fill += rows
                seeds = [block_seed for block_seed, _ in wave]
                _draw_blocks(pool, generators, seeds, targets)
                start = 0
                while fill - start >= size:
                    # a full forward batch: classify x + sigma * z and count on the device
                    counts.index_add_(0, step(size, start), buffers.ones)
                    start += size
                if start:
                    # carry the rest (< size rows, so below `start`: no overlap) to the front
                    noise[: fill - start].copy_(noise[start:fill])
                    fill -= start
            if fill:
                # the last, partial batch (padded to full size for static shapes; not counted)
                counts.index_add_(0, step(fill, 0), buffers.ones[:fill])
        # the counts cross to the host once per call
        return counts.view(len(indices), len(streams), self.num_classes).cpu().numpy()

    def _prepare(
        self,
        images: torch.Tensor,
        size: int,
        per_image: int,
        first: int,
        num_streams: int,
        threads: int,
    ) -> _Buffers:
        """Buffers for this call (reallocated only when a shape grows), holding its images."""
        shape = tuple(images.shape[1:])
        capacity = 1 << max(0, images.shape[0] - 1).bit_length()
        old = self._buffers
        noise_rows = size + threads * self.noise_block
        if (
            old is None
            or old.noise.shape != (noise_rows, *shape)
            or old.rows.shape[0] != size
            or old.images.shape[0] < capacity
        ):
            options = {"device": self.device, "dtype": self.noise_dtype}
            try:
                noise = torch.zeros((noise_rows, *shape), **options)
            except (RuntimeError, MemoryError) as err:  # CPU and CUDA allocators alike
                gib = noise_rows * math.prod(shape) * self.noise_dtype.itemsize / 2**30
                raise SettingError(
                    f"Smooth noise_block {self.noise_block} and batch_size {size} need a noise "
                    f"buffer of {noise_rows:,} samples ({gib:,.1f} GiB), which the "
                    f"{self.device.type} cannot allocate; lower noise_block (the noise depends "
                    "on it) or batch_size"
                ) from err
            self._buffers = _Buffers(
                noise=noise,
                images=torch.zeros((capacity, *shape), **options),
                rows=torch.empty(size, dtype=torch.int64, device=self.device),
                layout=torch.zeros(3, dtype=torch.int64, device=self.device),
                ones=torch.ones(size, dtype=torch.int64, device=self.device),
            )
        buffers = self._buffers
        buffers.images[: images.shape[0]].copy_(images)
        torch.arange(size, out=buffers.rows)
        # fill_ with host numbers launches kernels but never waits for the device
        second = first if num_streams > 1 else per_image  # no second stream: never reached
        buffers.layout[0].fill_(per_image)
        buffers.layout[1].fill_(second)
        buffers.layout[2].fill_(num_streams * self.num_classes)
        return buffers

    def _noisy(self, images: torch.Tensor, rows: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noisy rows x + sigma * z (pixel space, no clipping), in ``noise_dtype``."""
        return torch.add(images.index_select(0, rows), noise, alpha=self.sigma)

    def _batch_keys(
        self, images: torch.Tensor, noise: torch.Tensor, rows: torch.Tensor, layout: torch.Tensor
    ) -> torch.Tensor:
        """Count keys (slot * streams + stream) * classes + f(x + sigma * z) of one forward batch.

        Row r of the call belongs to image slot r // per_image and, within it, to the second
        stream when r % per_image >= layout[1]. Padded rows get some valid image and are not
        counted. This is the step that ``compile`` compiles and ``cuda_graph`` captures.
        """
        per_image, second, stride = layout[0], layout[1], layout[2]
        slot = torch.div(rows, per_image, rounding_mode="floor").clamp_(max=images.shape[0] - 1)
        stream = (rows - slot * per_image).ge(second).long()
        # the cast to f's dtype comes after the Gaussian noise is added: it is part of f
        inputs = self._noisy(images, slot, noise).to(self.model_dtype)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self._model(inputs)
        if logits.shape != (noise.shape[0], self.num_classes):
            raise SettingError(
                f"base_classifier must return logits of shape (batch, num_classes="
                f"{self.num_classes}); got {tuple(logits.shape)}"
            )
        return slot * stride + stream * self.num_classes + logits.argmax(dim=1)

    def _step(self, buffers: _Buffers, size: int) -> Callable[[int, int], torch.Tensor]:
        """``step(valid, start)``: count keys of the next forward batch's first ``valid`` rows.

        The batch's noise is ``noise[start : start + size]`` (``start`` a multiple of ``size``);
        a CUDA graph reads ``noise[:size]``, so its batch is first copied there.
        """
        function, eager_first = self._batch_keys, False
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self._batch_keys, dynamic=False)
                # one eager batch before the first compiled one (its keys dropped): layers that
                # check themselves at their first call (the fused kernel reads its check back to
                # the host) do it outside the trace, which they would split for good
                eager_first = True
            function = self._compiled
        static = self.static_shapes
        graph = None
        if self._use_graph:
            graph = self._captured(function, buffers, size, eager_first)

        def step(valid: int, start: int) -> torch.Tensor:
            nonlocal eager_first
            rows = valid if not static else size
            if graph is not None:
                if start:  # start >= size: the two ranges do not overlap
                    buffers.noise[:size].copy_(buffers.noise[start : start + size])
                keys = graph()
            else:
                noise = buffers.noise[start : start + rows]
                args = (buffers.images, noise, buffers.rows[:rows], buffers.layout)
                if eager_first:  # on the first batch's own noise
                    self._batch_keys(*args)
                    eager_first = False
                keys = function(*args)
            buffers.rows.add_(size)  # the next batch's global row numbers
            return keys[:valid]

        return step

    def _captured(
        self,
        function: Callable[..., torch.Tensor],
        buffers: _Buffers,
        size: int,
        eager_first: bool = False,
    ) -> Callable[[], torch.Tensor]:
        """A CUDA graph of ``function`` on the static buffers (captured again if they moved).

        ``eager_first``: one call of the uncompiled step before the warm-up (see :meth:`_step`).
        """
        args = (buffers.images, buffers.noise[:size], buffers.rows, buffers.layout)
        # the evaluated module's tensors: those of the model it views (rewritten modules such
        # as ``bias_after_pool``'s read the convolution's weight without registering it)
        source = self.base_classifier if self._copy is None else self._copy
        key = tuple(t.data_ptr() for t in args) + tuple(t.data_ptr() for _, t in _tensors(source))
        if self._graph is None or self._graph[0] != key:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                if eager_first:
                    self._batch_keys(*args)
                for _ in range(3):  # warm up: cuDNN autotuning, compilation, lazy init
                    function(*args)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                keys = function(*args)
            self._graph = (key, graph, keys)
        _, graph, keys = self._graph

        def replay() -> torch.Tensor:
            graph.replay()
            return keys

        return replay

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode (caller's modes restored), refreshed private copy, TF32 and cuDNN flags as set."""
        with contextlib.ExitStack() as stack:
            if self._copy is None:
                stack.enter_context(eval_mode(self.base_classifier))
                structure = _structure(self.base_classifier)
                if structure != self._structure:  # the caller swapped a module or added a hook
                    self._model, self._structure = self._view(self.base_classifier), structure
                    self._graph = self._compiled = None
            else:
                self._refresh_copy()
            if self.device.type == "cuda":
                stack.enter_context(_tf32(self.tf32))
                stack.enter_context(_cudnn_benchmark(self.cudnn_benchmark))
            yield

    def _threads(self) -> int:
        """Noise blocks drawn at once: on CPUs ``noise_threads``, else up to 8; 1 elsewhere."""
        if self.device.type != "cpu":
            return 1  # GPU kernels run asynchronously; other threads would use another stream
        if self.noise_threads is not None:
            return self.noise_threads
        return min(torch.get_num_threads(), 8)

    def _view(self, module: nn.Module) -> nn.Module:
        """``module`` rewritten under ``pool_first``, the fusion, the biases and pairwise pools."""
        module = pool_before_relu(module) if self.pool_first else module
        fuse = self.fused_conv_pool and fusion.fusion_available(self.device)
        module = fusion.fuse_conv_pool(module) if fuse else module
        module = bias_after_pool(module) if self.bias_after_pool else module
        return pairwise_max_pool(module) if self.pairwise_pool else module

    def _refresh_copy(self) -> None:
        """Copy the caller's current weights into the private channels-last copy (in place)."""
        mine, theirs = _tensors(self._copy), _tensors(self.base_classifier)
        same = len(mine) == len(theirs) and all(
            a == b and x.shape == y.shape and x.dtype == y.dtype
            for (a, x), (b, y) in zip(mine, theirs, strict=True)
        )
        structure = _structure(self.base_classifier)
        if not same or structure != self._structure:
            # the caller changed the module's structure (or its hooks): copy it again
            self._copy = _channels_last_copy(self.base_classifier)
            self._model, self._structure = self._view(self._copy), structure
            self._graph = self._compiled = None
            return
        for (_, dst), (_, src) in zip(mine, theirs, strict=True):
            dst.copy_(src)


@torch.inference_mode()  # thread-local: the pool's threads enter it themselves
def _draw_block(generator: torch.Generator, block_seed: int, block: torch.Tensor) -> None:
    """Fill ``block`` with z ~ N(0, I) from ``generator`` seeded by the block's own seed."""
    # the block's noise depends on (seed, index, stream, block) only, whichever thread draws it
    generator.manual_seed(block_seed)
    torch.randn(block.shape, generator=generator, out=block)


def _draw_blocks(
    pool: ThreadPoolExecutor | None,
    generators: list[torch.Generator],
    seeds: list[int],
    blocks: list[torch.Tensor],
) -> None:
    """Draw each block with its own generator: in the pool's threads, or here for one block."""
    if pool is None or len(blocks) == 1:
        for generator, block_seed, block in zip(generators, seeds, blocks, strict=False):
            _draw_block(generator, block_seed, block)
        return
    calls = zip(generators, seeds, blocks, strict=False)
    for future in [pool.submit(_draw_block, *call) for call in calls]:
        future.result()  # wait for all; re-raises a thread's error


@contextlib.contextmanager
def _thread_pool(threads: int) -> Iterator[ThreadPoolExecutor | None]:
    """Threads that draw noise blocks at once (``torch.randn`` releases the GIL); None for one."""
    if threads == 1:
        yield None
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="smooth-noise") as pool:
        yield pool


@contextlib.contextmanager
def _tf32(allow: bool) -> Iterator[None]:
    """Allow or forbid TF32 in cuDNN convolutions and CUDA matmuls; restore the previous flags."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """Set ``torch.backends.cudnn.benchmark``; restore the previous value."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
