"""A small convolution, its bias, a 2x2 max-pool and a ReLU in one GPU kernel (Triton).

LeNet's first block (conv 1->20 5x5, max-pool 2, ReLU) is where a float32 forward pass on a GPU
spends most of its time for little arithmetic: on an H200 at batch 50,000 cuDNN's convolution
took 3.3 ms for 12% of the FLOPs (a generic implicit-GEMM kernel for one input channel), and its
output (2.3 GB) is written, read by the bias, written, read by the pool, written and read by the
ReLU (``docs/gpu_h200_consistency/bench.json``). This kernel reads the images once and writes
only the pooled, rectified values (a quarter of the convolution's output): each program takes a
block of pooled positions, computes the four convolution outputs of each 2x2 window for every
output channel as outer products of image values and weights (float32 multiply-adds, never
TF32), keeps their maximum, adds the bias and rectifies.

The values equal PyTorch's up to the rounding of the convolution's sums, whose order differs
from cuDNN's (the same classifier up to float rounding, as ``channels_last`` or ``compile``);
max-pooling and ReLU commute exactly, and NaN propagates as in PyTorch. The kernel runs for CUDA
inputs without gradients in float32, and in bfloat16 or float16 (under autocast, or a model in
that dtype) as PyTorch's CUDA layers compute: operands rounded to the dtype, float32 sums rounded
to the dtype, the bias added and rounded again (``output.add_(bias)``; half the bytes written);
everything else, and any layer whose settings changed since the rewrite, runs the original
modules. The first call of each fused layer in each dtype on a GPU checks the kernel against the
original modules on the first rows and refuses (an error, never a silent other classifier) if
they disagree beyond float rounding, or in bf16/fp16 round otherwise.

Under ``TRITON_INTERPRET``-style interpretation (:func:`interpreted_kernel`) the same kernel runs
on CPU tensors, which is how the tests check it without a GPU.
"""

from __future__ import annotations  # the kernel's ``tl.constexpr`` annotations stay unevaluated

import math

import torch
from torch import nn

try:  # part of PyTorch's CUDA wheels; without it the layers run as written
    import triton.language as tl
except ImportError:  # pragma: no cover
    tl = None

from robust.pairwise_pool import is_plain_2x2_max_pool
from robust.pool_first import _is_relu, has_hooks, rewrite_sequentials

__all__ = [
    "FusedConvPool",
    "autotuning_record",
    "conv_pool",
    "fuse_conv_pool",
    "fusion_available",
    "interpreted_kernel",
]

MAX_TAPS = 75
"""Largest C_in * K * K fused: the loop over taps is unrolled (3 RGB channels of 5x5 at most)."""

MAX_CHANNELS = 64
"""Largest C_out fused: every program holds all output channels of its positions."""

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the kernel computes in (float32 sums; the output rounded to the dtype)."""

BLOCK = 64
"""Pooled positions per program of the interpreted kernel (the compiled one is autotuned)."""


def _conv_pool_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    total,
    c_in: tl.constexpr,
    height: tl.constexpr,
    width: tl.constexpr,
    k: tl.constexpr,
    c_out: tl.constexpr,
    c_pad: tl.constexpr,
    hp: tl.constexpr,
    wp: tl.constexpr,
    has_bias: tl.constexpr,
    relu: tl.constexpr,
    block: tl.constexpr,
    interpreted: tl.constexpr,
):
    """y[b, c, i, j] = relu(max over the 2x2 window at (2i, 2j) of conv(x)[b, c] + bias[c]).

    ``w_ptr`` holds the weights as (taps, c_pad), zero beyond ``c_out``: a tap's weights for
    all channels are one contiguous, unmasked (vectorizable) load. Tiles are (channels,
    positions), positions the fast dimension, and the loop over taps is outermost: each tap's
    weights serve the four outputs of every window (four accumulators): a thread issues 2.7 to
    16 multiply-adds per load, by configuration (PTX for sm_90; with the window's outputs in the
    outer loop it was about one, and an unrolled loop over taps spilled registers).
    """
    p = tl.program_id(0).to(tl.int64) * block + tl.arange(0, block)  # pooled positions (b, i, j)
    valid = p < total
    image = p // (hp * wp)
    i = (p % (hp * wp)) // wp
    j = p % wp
    c = tl.arange(0, c_pad)  # output channels, padded to a power of two
    corner = x_ptr + image * (c_in * height * width) + (2 * i) * width + 2 * j
    top_left = tl.full((c_pad, block), 0.0, tl.float32)  # the window's four convolution outputs
    top_right = tl.full((c_pad, block), 0.0, tl.float32)
    bottom_left = tl.full((c_pad, block), 0.0, tl.float32)
    bottom_right = tl.full((c_pad, block), 0.0, tl.float32)
    for tap in range(c_in * k * k):
        ci, kh, kw = tap // (k * k), (tap % (k * k)) // k, tap % k
        wv = tl.load(w_ptr + tap * c_pad + c)[:, None]
        x = corner + (ci * height * width + kh * width + kw)  # bf16/fp16 widen exactly
        top_left += wv * tl.load(x, mask=valid, other=0.0).to(tl.float32)[None, :]
        top_right += wv * tl.load(x + 1, mask=valid, other=0.0).to(tl.float32)[None, :]
        bottom_left += wv * tl.load(x + width, mask=valid, other=0.0).to(tl.float32)[None, :]
        bottom_right += wv * tl.load(x + width + 1, mask=valid, other=0.0).to(tl.float32)[None, :]
    # NaN wins, as in PyTorch's max-pool and ReLU
    top = tl.maximum(top_left, top_right, propagate_nan=tl.PropagateNan.ALL)
    bottom = tl.maximum(bottom_left, bottom_right, propagate_nan=tl.PropagateNan.ALL)
    best = tl.maximum(top, bottom, propagate_nan=tl.PropagateNan.ALL)
    c_valid = c < c_out
    out_type = y_ptr.dtype.element_ty
    if has_bias:  # after the maximum: the same values (rounding is monotone)
        if out_type != tl.float32:
            # PyTorch's CUDA convolution in bf16/fp16 rounds its sums to the dtype, then adds
            # the bias (``output.add_(bias)``) and rounds again: the same two roundings here
            if interpreted and out_type == tl.bfloat16:  # see the store below
                bits = best.to(tl.uint32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
                best = tl.where(best != best, best, bits.to(tl.float32, bitcast=True))
            else:
                best = best.to(out_type).to(tl.float32)
        best = best + tl.load(b_ptr + c, mask=c_valid, other=0.0)[:, None]
    if relu:
        best = tl.maximum(best, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if interpreted and out_type == tl.bfloat16:
        # Triton's interpreter converts to bfloat16 by truncating (and flushes subnormals):
        # rounded to nearest even on the bits, the top half kept, NaN kept; compiled kernels
        # convert with cvt.rn (the same rounding; on the bits, registers spill)
        bits = best.to(tl.uint32, bitcast=True)
        bits = tl.where(best != best, 0x7FC0, (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16)
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = best.to(out_type)  # round to nearest even (or float32 itself)
    out = image[None, :] * (c_out * hp * wp) + c[:, None] * (hp * wp) + (i * wp + j)[None, :]
    tl.store(y_ptr + out, rounded, mask=c_valid[:, None] & valid[None, :])


def fusion_available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device``: a CUDA device, with Triton installed.

    Elsewhere a fused layer would only run its layers as written, and on CPUs lose the rewrites
    that apply to the layers themselves (``robust.pairwise_pool``), so it is not made there.
    """
    return device.type == "cuda" and tl is not None


_COMPILED = None


def compiled_kernel():
    """The kernel compiled for GPUs by ``triton.jit``, its block size and warps autotuned (once).

    The autotuner times each configuration at the first call (a fraction of a second) and keeps
    the fastest for the layer's shape.
    """
    global _COMPILED
    if _COMPILED is None:
        import triton

        configs = [
            triton.Config({"block": block}, num_warps=warps)
            for block in (64, 128, 256)
            for warps in (4, 8)
        ]
        key = ["c_in", "height", "width", "k", "c_out"]
        _COMPILED = triton.autotune(configs=configs, key=key)(triton.jit(_conv_pool_kernel))
    return _COMPILED


_TUNED: dict[str, dict] = {}
"""The autotuner's choice and timings per tuned launch (dtype and shape), noted at that launch:
Triton keeps only the latest tuning's timings, whatever its dtype."""


def _config_name(config) -> str:
    return f"block {config.kwargs['block']}, {config.num_warps} warps"


def _note_tuning(tuner, key: str) -> None:
    """Note what ``tuner`` chose and measured for ``key`` at the launch that tuned it."""
    if key in _TUNED or getattr(tuner, "best_config", None) is None:
        return
    timings = getattr(tuner, "configs_timings", None) or {}
    _TUNED[key] = {
        "best": _config_name(tuner.best_config),
        "ms": {_config_name(c): [float(t) for t in times] for c, times in timings.items()},
    }


def autotuning_record() -> dict | None:
    """What the autotuner chose and measured, per dtype and shape, for benchmark records.

    Triton's code for this kernel differs between releases (3.6 spills registers in some
    configurations that 3.8 compiles without spills), so the choice is recorded, not assumed.
    None before the first tuned launch (launches inside ``torch.compile``'d code are not noted).
    """
    if not _TUNED:
        return None
    import triton

    return {"triton": triton.__version__, "tuned": {k: dict(v) for k, v in _TUNED.items()}}


def interpreted_kernel():
    """The same kernel run by Triton's interpreter on CPU tensors (slow; for tests)."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(_conv_pool_kernel)


def _is_interpreted(kernel) -> bool:
    """Whether ``kernel`` is run by Triton's interpreter (:func:`interpreted_kernel`)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def conv_pool(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    kernel=None,
) -> torch.Tensor:
    """``relu(max_pool2d(conv2d(x, weight, bias), 2))`` (ReLU optional) in one kernel launch.

    The sums are float32 whatever the dtypes (bfloat16 and float16 operands widen exactly). In
    bfloat16/float16 they are rounded to ``x``'s dtype before the bias is added and again after,
    to nearest even, as PyTorch's CUDA convolution followed by its ``output.add_(bias)``.

    Args:
        x: (N, C_in, H, W) float32, bfloat16 or float16 images (any memory layout; read as
            contiguous).
        weight: (C_out, C_in, K, K), stride-1 convolution without padding; its values are used
            as they are (a bfloat16 convolution's weights come rounded already).
        bias: (C_out,) or None.
        relu: Rectify the pooled values.
        kernel: The Triton kernel to launch; default :func:`compiled_kernel` (CUDA).

    Returns:
        (N, C_out, (H - K + 1) // 2, (W - K + 1) // 2), contiguous, ``x``'s dtype.

    Examples:
        >>> x, w = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 3, 3)
        >>> y = conv_pool(x, w, None, True, kernel=interpreted_kernel())
        >>> reference = torch.relu(torch.max_pool2d(torch.conv2d(x, w), 2))
        >>> y.shape, torch.allclose(y, reference, atol=1e-5)
        (torch.Size([2, 3, 3, 3]), True)
    """
    x = x.contiguous()
    n, c_in, height, width = x.shape
    c_out, _, k, _ = weight.shape
    hp, wp = (height - k + 1) // 2, (width - k + 1) // 2
    c_pad = max(2, 1 << (c_out - 1).bit_length())
    by_tap = weight.new_zeros((c_in * k * k, c_pad), dtype=torch.float32)  # (taps, channels)
    by_tap[:, :c_out] = weight.reshape(c_out, -1).t()
    bias = bias.float() if bias is not None else None
    y = torch.empty((n, c_out, hp, wp), device=x.device, dtype=x.dtype)
    total = n * hp * wp
    if total == 0:
        return y
    tuned = kernel is None  # the autotuner chooses the block size
    kernel = compiled_kernel() if tuned else kernel
    block = {} if tuned else {"block": BLOCK}

    def grid(meta: dict) -> tuple[int]:
        return (math.ceil(total / meta["block"]),)

    kernel[grid if tuned else grid(block)](
        x,
        by_tap,
        bias if bias is not None else by_tap,  # not read without a bias
        y,
        total,
        c_in=c_in,
        height=height,
        width=width,
        k=k,
        c_out=c_out,
        c_pad=c_pad,
        hp=hp,
        wp=wp,
        has_bias=bias is not None,
        relu=relu,
        interpreted=not tuned and _is_interpreted(kernel),
        **block,
    )
    if tuned and not torch.compiler.is_compiling():
        shape = f"{c_in}x{height}x{width}, {k}x{k} to {c_out}"
        _note_tuning(kernel, f"{str(x.dtype).removeprefix('torch.')} {shape}")
    return y


def _fusable_conv(module: nn.Module | None) -> bool:
    """An exact ``nn.Conv2d`` the kernel computes: stride 1, no padding, square, small, no hooks."""
    return (
        type(module) is nn.Conv2d
        and not has_hooks(module)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.kernel_size[0] == module.kernel_size[1]
        and module.in_channels * module.kernel_size[0] ** 2 <= MAX_TAPS
        and module.out_channels <= MAX_CHANNELS
    )


class FusedConvPool(nn.Module):
    """``conv``, ``pool`` and (optionally) a ReLU computed by :func:`conv_pool` where it can.

    The source modules are referenced, not registered, and read at each call: a layer changed
    in place so that the kernel no longer computes it runs the modules themselves.

    Attributes:
        kernel: The Triton kernel launched (``None``: :func:`compiled_kernel`, for CUDA).
        checked: The dtypes in which the kernel was checked against the modules (at its first
            call in each).

    Examples:
        >>> conv, pool = nn.Conv2d(1, 4, 3), nn.MaxPool2d(2)
        >>> x = torch.randn(2, 1, 8, 8)  # a CPU tensor: the modules themselves run
        >>> torch.equal(FusedConvPool(conv, pool, relu=False)(x), pool(conv(x)))
        True
    """

    def __init__(self, conv: nn.Conv2d, pool: nn.MaxPool2d, relu: bool) -> None:
        super().__init__()
        self._source = (conv, pool)  # a tuple: not submodules
        self.relu = relu
        self.kernel = None
        self.checked: set[torch.dtype] = set()

    def _unfused(self, x: torch.Tensor) -> torch.Tensor:
        conv, pool = self._source
        y = pool(conv(x))
        return torch.relu(y) if self.relu else y

    def _kernel_runs_on(self, x: torch.Tensor) -> bool:
        """Whether the compiled kernel can take ``x``: a CUDA tensor, with Triton installed."""
        return tl is not None and x.is_cuda

    def _computed_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The dtype PyTorch's layers would compute ``x`` in, where the kernel computes them.

        Under autocast that is autocast's dtype (which its convolution casts float32 operands
        to); otherwise ``x``'s, the parameters' too. None where the kernel does not apply: a
        layer no longer fusable, float64, mixed dtypes (PyTorch's own error then), gradients.
        """
        conv, pool = self._source
        operands = [x, conv.weight] + ([conv.bias] if conv.bias is not None else [])
        if (
            x.dim() != 4
            or not (_fusable_conv(conv) and is_plain_2x2_max_pool(pool))
            or (torch.is_grad_enabled() and any(t.requires_grad for t in operands))
        ):
            return None
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            casts = all(t.dtype in KERNEL_DTYPES for t in operands)  # not float64 ones
            return dtype if casts and dtype in KERNEL_DTYPES else None
        same = all(t.dtype == x.dtype for t in operands)
        return x.dtype if same and x.dtype in KERNEL_DTYPES else None

    def _operands(self, x: torch.Tensor, dtype: torch.dtype) -> tuple:
        """``x``, the weights and the bias as PyTorch's convolution in ``dtype`` takes them."""
        conv, _ = self._source
        bias = conv.bias.to(dtype) if conv.bias is not None else None
        return x.to(dtype), conv.weight.to(dtype), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled (and rectified) convolution of ``x``."""
        dtype = self._computed_dtype(x) if self._kernel_runs_on(x) else None
        if dtype is None:
            return self._unfused(x)
        operands = self._operands(x, dtype)
        y = conv_pool(*operands, self.relu, kernel=self.kernel)
        if dtype not in self.checked:
            self.check(operands[0], y)
        return y

    def check(self, x: torch.Tensor, y: torch.Tensor, rows: int = 256) -> None:
        """Compare the kernel's values ``y`` of images ``x`` with the modules' (first ``rows``).

        The reference is PyTorch's CUDA sequence computed in float64 (whatever TF32 or cuDNN
        settings are in force): the operands rounded to ``y``'s dtype, the convolution's sums
        (in bf16/fp16 rounded to the dtype, then the bias added and rounded again, as
        ``output.add_(bias)`` does), pooled, rectified. A float32 sum of T products, in any
        order, lies within ``T * eps / 2 * sum(|products|)`` of the exact sum, so the sums'
        tolerance is twice that bound, from the convolution of ``|x|`` with ``|w|``, plus the
        bias's rounding; in bf16/fp16 each rounding may then land one unit away. A kernel that
        rounds otherwise (truncating, say) stays within those units, so in bf16/fp16 nine in
        ten nonzero values must also be exactly the reference's.

        Raises:
            RuntimeError: If they differ by more, or in where NaN is.
        """
        low = y.dtype != torch.float32
        x, weight, bias = self._operands(x[:rows], y.dtype)
        conv, _ = self._source
        with torch.no_grad():  # in float64: exact enough, and free of TF32 and cuDNN's choices
            x64, weight = x.double(), weight.double()
            bias = bias.double() if bias is not None else None
            sums = torch.max_pool2d(conv._conv_forward(x64, weight, None), 2)
            sums = sums.to(y.dtype).double() if low and bias is not None else sums
            expected = sums + bias.view(1, -1, 1, 1) if bias is not None else sums
            expected = torch.relu(expected) if self.relu else expected
            magnitude = conv._conv_forward(x64.abs(), weight.abs(), None)
        got = y[:rows].double()
        if not got.numel():
            return
        taps = conv.in_channels * conv.kernel_size[0] ** 2
        eps = torch.finfo(torch.float32).eps
        largest_bias = bias.abs().max().item() if bias is not None else 0.0
        largest_sum = magnitude.nan_to_num(posinf=0.0).max().item()
        tolerance = taps * eps * (largest_sum + largest_bias) + eps
        if low:  # a unit of each rounding to the output's dtype (an infinite value: exactly)
            units = (sums.abs() + expected.abs()) if bias is not None else expected.abs()
            tolerance = tolerance + torch.finfo(y.dtype).eps * units.nan_to_num(posinf=0.0)
        expected = expected.to(y.dtype).double()  # where the output overflows, so do the layers
        same_nan = torch.equal(got.isnan(), expected.isnan())
        error = torch.where(got == expected, 0.0, got - expected).nan_to_num().abs()
        dtype = str(y.dtype).removeprefix("torch.")
        if not same_nan or (error > tolerance).any():
            raise RuntimeError(
                f"the fused convolution-pool kernel disagrees with PyTorch's layers by "
                f"{error.max().item():.3g} in {dtype} (rounding allows "
                f"{torch.as_tensor(tolerance).max().item():.3g}): not used; certify without "
                "fused_conv_pool"
            )
        nonzero = (expected != 0) & ~expected.isnan()
        if low and nonzero.sum() >= 100:
            exact = (got[nonzero] == expected[nonzero]).double().mean().item()
            if exact < 0.9:
                raise RuntimeError(
                    f"the fused convolution-pool kernel rounds otherwise than PyTorch's layers "
                    f"in {dtype}: {exact:.0%} of its values are theirs exactly (to nearest even: "
                    "all but a few): not used; certify without fused_conv_pool"
                )
        self.checked.add(y.dtype)


def _fuse(modules: list[nn.Module | None]) -> list[nn.Module | None]:
    """Each conv -> max-pool (-> ReLU) or conv -> ReLU -> max-pool run fused; Identity fills in."""
    modules, i = list(modules), 0
    while i + 1 < len(modules):
        conv, second = modules[i], modules[i + 1]
        third = modules[i + 2] if i + 2 < len(modules) else None
        if _fusable_conv(conv) and is_plain_2x2_max_pool(second):
            relu = _is_relu(third)
            span = 3 if relu else 2
            pool = second
        elif _fusable_conv(conv) and _is_relu(second) and is_plain_2x2_max_pool(third):
            relu, span, pool = True, 3, third  # relu(pool(v)) == pool(relu(v)) exactly
        else:
            i += 1
            continue
        modules[i] = FusedConvPool(conv, pool, relu).train(conv.training)
        for k in range(i + 1, i + span):
            modules[k] = nn.Identity()
        i += span
    return modules


def fuse_conv_pool(model: nn.Module) -> nn.Module:
    """``model`` with each small conv -> 2x2 max-pool (with its ReLU) of its sequentials fused.

    Args:
        model: Any module; only plain ``nn.Sequential`` containers (nested ones included) change.

    Returns:
        ``model`` itself when nothing is fused; else a new ``nn.Sequential`` that computes
        ``model(x)``'s values up to the rounding of the convolutions' sums.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        >>> [type(m).__name__ for m in fuse_conv_pool(net)]
        ['FusedConvPool', 'Identity', 'Identity', 'Flatten']
        >>> x = torch.randn(2, 1, 28, 28)
        >>> torch.equal(fuse_conv_pool(net)(x), net(x))  # on CPUs the modules themselves run
        True
    """
    fused = rewrite_sequentials(model, _fuse)
    if fused is not model and tl is not None:
        # the autotuned kernel object made now, not inside a forward that torch.compile traces
        compiled_kernel()
    return fused
