"""Pieces shared by every attack in :mod:`robust.attacks` (private; import from there).

* :func:`prepared`: the context every attack runs in (eval mode with each submodule's mode restored,
  outside ``torch.inference_mode``, gradients on) and the forward pass it uses (optionally through a
  channels-last copy of the model's 4-D weights, leaving the caller's model untouched).
* Per-sample randomness (:func:`draw`, :func:`subset`): with one generator per image, image ``i``
  consumes ``generator[i]`` alone, exactly as a one-image call would, so results do not depend on
  the batch an image is in.
* Losses computed from logits promoted to at least float32: :func:`cross_entropy` (exact even when
  ``p_y`` rounds to 1), :func:`margin` and :func:`others_minus_true` (the cancellation-free step
  direction of the cross-entropy).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.checks import SettingError, check_choice, check_real
from robust.cpu_memory import MMAP_THRESHOLD
from robust.modes import eval_mode
from robust.pool_first import (
    children_replaced,
    rewrite_sequentials,
    sequential_replacements,
    swap_relu_pool,
)

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One RNG for the batch, one per sample (batch-size independent results), or the global RNG."""

NORMS = ("2", "inf")

_NORM_ALIASES = {"2": "2", "2.0": "2", "l2": "2", "inf": "inf", "linf": "inf", "infinity": "inf"}


def canonical_norm(norm: str | float, owner: str | None = None) -> str:
    """Return ``"2"`` or ``"inf"`` for 2, "2", "l2", "L2", inf, "inf", "linf", "Linf", "l_inf"."""
    key = str(norm).strip().lower().replace("_", "").replace(" ", "")
    if key in _NORM_ALIASES:
        return _NORM_ALIASES[key]
    prefix = f"{owner} norm" if owner else "norm"
    raise SettingError(
        f"{prefix} must be one of '2', 'inf' (aliases 2, 'l2', 'L2', inf, 'linf', 'Linf'); "
        f"got {norm!r}"
    )


def check_eps(eps: object, owner: str | None = None) -> float:
    """``eps`` as a float: a finite number >= 0 (0 means no attack)."""
    return check_real("eps", eps, low=0, low_inclusive=True, owner=owner)


def check_ball(eps: float, norm: str, owner: str | None = None, x: Tensor | None = None) -> None:
    """Refuse an eps beyond the diameter of the pixel cube [0, 1]^d: a ball holding every image.

    L-inf: eps > 1 (an eps on the 0-255 scale, or L2's default of 5.0 given to an L-inf attack);
    L2, where ``x`` gives d: eps > sqrt(d). Such an "attack" may return any image at all.

    Raises:
        SettingError: Naming eps, the norm and the largest meaningful value.

    Examples:
        >>> check_ball(0.3, "inf"); check_ball(5.0, "2", x=torch.zeros(1, 1, 28, 28))
        >>> try:
        ...     check_ball(76.5, "inf", "pgd")
        ... except SettingError as err:
        ...     print(str(err).split(":")[0])
        pgd eps for norm inf must be <= 1 (pixels lie in [0, 1])
    """
    prefix = f"{owner} eps" if owner else "eps"
    if norm == "inf" and eps > 1:
        raise SettingError(
            f"{prefix} for norm inf must be <= 1 (pixels lie in [0, 1]): a larger ball holds "
            f"every image; got {eps:g} (on the 0-255 scale? divide by 255)"
        )
    if norm == "2" and x is not None and x.dim() > 1:
        pixels = math.prod(x.shape[1:])  # of one image, also in an empty batch
        diameter = math.sqrt(pixels)
        if eps > diameter:
            raise SettingError(
                f"{prefix} for norm 2 must be <= {diameter:.4g}, the diameter of [0, 1]^"
                f"{pixels}: a larger ball holds every image; got {eps:g}"
            )


def check_fraction(name: str, value: object, owner: str | None = None) -> float:
    """A number in (0, 1] (``p_init``, ``rho``)."""
    return check_real(name, value, low=0, high=1, high_inclusive=True, owner=owner)


def check_bool(name: str, value: object, owner: str | None = None) -> bool:
    """``value`` if it is True or False."""
    return check_choice(name, value, [True, False], owner=owner)


# ---------------------------------------------------------------------------- shapes and norms


def view(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector ``(B,)`` to broadcast against ``like`` ``(B, ...)``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def norm2(v: Tensor) -> Tensor:
    """Per-sample Euclidean norm ``(B,)`` of ``v`` ``(B, ...)``."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1)


def norm2_wide(v: Tensor) -> Tensor:
    """Per-sample Euclidean norm ``(B,)`` accumulated in float64, returned in ``v``'s dtype."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1, dtype=torch.float64).to(v.dtype)


def project_l2(x: Tensor, x_adv: Tensor, eps: float) -> Tensor:
    """Project ``x_adv`` (in place) onto the L2 ball of radius ``eps`` around ``x``, clip to [0, 1].

    Clipping moves every coordinate towards ``x`` (which lies in [0, 1]), so it never leaves the ball.
    """
    tiny = torch.finfo(x_adv.dtype).tiny
    delta = x_adv.sub_(x)
    factor = (eps / norm2(delta).clamp_min_(tiny)).clamp_max_(1.0)
    return into_ball(x, delta.mul_(view(factor, delta)).add_(x).clamp_(0.0, 1.0), eps, "2")


def clip_then_project_l2(x: Tensor, x_adv: Tensor, eps: float) -> Tensor:
    """Clip ``x_adv`` (in place) to [0, 1], then scale its step from ``x`` into the eps L2 ball.

    The order of the training attacks' reference code (Zhang et al.'s TRADES, Salman et al.'s
    SmoothAdv, as ``delta.clamp_(0, 1).sub_(x).renorm_(2, 0, eps)``): the whole radius goes to
    coordinates that can still move, where :func:`project_l2` first spends part of it on
    coordinates the clip then discards (most MNIST pixels are 0 or 1). The scaled point lies
    between ``x`` and the clipped one, so it stays in [0, 1] (clipped again against rounding).

    Examples:
        >>> x = torch.tensor([[0.0, 0.5]])
        >>> clip_then_project_l2(x, torch.tensor([[-1.0, 1.5]]), 0.5).tolist()  # -1 clipped away
        [[0.0, 1.0]]
        >>> project_l2(x, torch.tensor([[-1.0, 1.5]]), 0.5)  # part of the radius lost to the clip
        tensor([[0.0000, 0.8536]])
    """
    tiny = torch.finfo(x_adv.dtype).tiny
    delta = x_adv.clamp_(0.0, 1.0).sub_(x)
    factor = (eps / norm2(delta).clamp_min_(tiny)).clamp_max_(1.0)
    return into_ball(x, delta.mul_(view(factor, delta)).add_(x).clamp_(0.0, 1.0), eps, "2")


def into_ball(x: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    """``x_adv`` with the coordinates that its dtype's rounding took out of the ball moved back.

    In bfloat16 or float16 a point ``x + delta`` with ``||delta|| <= eps`` rounds to the dtype
    (an ulp near 1 is 2^-8 in bfloat16) and can land outside the ball: a robust accuracy "at eps
    0.3" would be one at up to 0.302. L-inf: each coordinate beyond eps goes to the last
    representable value inside, in one step. L2: in each image outside, the coordinates whose
    move one representable value towards ``x`` (``torch.nextafter``) gives up the least squared
    norm move, just enough to cover the excess, repeated until the image is inside, so it stays
    as far out as the dtype allows (moving every coordinate of a CIFAR-sized image cost 20% of
    the radius). No coordinate passes ``x``, so points stay in [0, 1]; the bound holds exactly
    (in float64). Float32 and float64 points are returned as they are: their own rounding is the
    tolerance of the bound, as everywhere.

    Args:
        x: Clean inputs ``(B, ...)`` in [0, 1].
        x_adv: Adversarial inputs in [0, 1], of the same shape and dtype (not modified).
        eps: Radius.
        norm: ``"2"`` or ``"inf"``.

    Returns:
        ``x_adv`` itself (float32 or wider, or every point inside), else a corrected copy.

    Raises:
        ValueError: If ``x`` and ``x_adv`` differ in dtype.

    Examples:
        >>> x = torch.full((1, 2), 0.5, dtype=torch.bfloat16)
        >>> x_adv = (x.float() + 0.3).to(torch.bfloat16)  # 0.8 rounds to 0.80078125
        >>> float(x_adv[0, 0] - x[0, 0]) > 0.3, float(into_ball(x, x_adv, 0.3, "inf")[0, 0])
        (True, 0.796875)
    """
    if x_adv.dtype != x.dtype:
        raise ValueError(f"into_ball needs one dtype; got {x.dtype} and {x_adv.dtype}")
    if torch.finfo(x_adv.dtype).bits >= 32:
        return x_adv
    wide_x = x.double()
    while True:  # one pass, in practice; each moves a coordinate towards x, so it ends
        delta = x_adv.double() - wide_x  # exact: two bf16/fp16 values in [0, 1]
        if norm == "inf":
            outside = delta.abs() > eps
            if not outside.any():  # one host sync
                return x_adv
            # the representable value nearest the boundary, or the next one towards x if that
            # is beyond it (a bound computed in the dtype, eps rounded first, can be many
            # values away)
            edge = (wide_x + delta.clamp(-eps, eps)).to(x_adv.dtype)
            beyond = (edge.double() - wide_x).abs() > eps
            edge = torch.where(beyond, torch.nextafter(edge, x), edge)
            return torch.where(outside, edge, x_adv)
        outside = (norm2(delta) > eps).nonzero().squeeze(1)
        if outside.numel() == 0:  # one host sync per pass
            return x_adv
        # in the images outside: the coordinates whose move gives up the least norm first,
        # until their savings cover the excess
        part, base = x_adv[outside], wide_x[outside]
        inward = torch.nextafter(part, x[outside])
        gap = delta[outside].flatten(1)
        saving = gap.square() - (inward.double() - base).flatten(1).square()
        # ranked by float32 keys (only the order is needed), over all coordinates: ranking only
        # the few hundred smallest moved some coordinates again in later passes and weakened
        # bf16 PGD-L2 (2.7 points more robust images on a 3x32x32 CNN)
        keys = saving.float().masked_fill_(saving <= 0, math.inf)  # a coordinate at x: no move
        order = keys.argsort(dim=1)
        ordered = saving.gather(1, order)
        excess = gap.square().sum(dim=1) - eps**2
        chosen = (ordered.cumsum(dim=1) - ordered < excess[:, None]) & (ordered > 0)
        move = torch.zeros_like(gap, dtype=torch.bool).scatter_(1, order, chosen).view_as(part)
        x_adv = x_adv.clone()
        x_adv[outside] = torch.where(move, inward, part)


def linf_bounds(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The box ``[max(0, x - eps), min(1, x + eps)]`` in ``x``'s dtype, rounded inwards.

    Clamping an iterate to these bounds is exact, so L-inf iterates stay inside the ball even in
    bfloat16 or float16 (:func:`into_ball`; in float32 and wider they are the plain bounds).

    Examples:
        >>> lo, hi = linf_bounds(torch.tensor([0.1, 0.5]), 0.3)
        >>> lo.tolist(), [round(v, 6) for v in hi.tolist()]
        ([0.0, 0.19999998807907104], [0.4, 0.8])
    """
    lo = into_ball(x, (x - eps).clamp_(min=0.0), eps, "inf")
    hi = into_ball(x, (x + eps).clamp_(max=1.0), eps, "inf")
    return lo, hi


def unit_l2(g: Tensor) -> Tensor:
    """``g`` divided per sample by its L2 norm (float64 accumulation); a zero ``g`` stays zero."""
    return g / view(norm2_wide(g).clamp_min_(torch.finfo(g.dtype).tiny), g)


# --------------------------------------------------------------------------------- randomness


def check_generators(generator: Generators, n: int) -> None:
    """Refuse a list of generators whose length is not the batch size."""
    if isinstance(generator, Sequence) and len(generator) != n:
        raise ValueError(f"generator: {len(generator)} generators for a batch of {n} images")


def subset(generator: Generators, index: Sequence[int]) -> Generators:
    """The generators of the images ``index`` (a shared generator or None stays as it is)."""
    if isinstance(generator, Sequence):
        return [generator[i] for i in index]
    return generator


def draw(
    generator: Generators,
    n: int,
    shape: Sequence[int],
    like: Tensor,
    kind: str = "rand",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``n`` samples of ``shape`` (``rand``: U[0, 1), ``randn``: N(0, 1)) on ``like``'s device.

    With one generator per image, sample ``i`` comes from ``generator[i]`` alone.
    """
    fn = torch.rand if kind == "rand" else torch.randn
    dtype = like.dtype if dtype is None else dtype
    if isinstance(generator, Sequence):
        if len(generator) != n:
            raise ValueError(f"generator: {len(generator)} generators for a batch of {n} images")
        if n == 0:
            return torch.empty(0, *shape, dtype=dtype, device=like.device)
        return torch.stack(
            [fn(*shape, generator=g, dtype=dtype, device=like.device) for g in generator]
        )
    return fn(n, *shape, generator=generator, dtype=dtype, device=like.device)


# ------------------------------------------------------------------------------------- losses


def float_logits(logits: Tensor) -> Tensor:
    """Logits promoted to at least float32 (bf16/fp16 autocast outputs are widened)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def others_minus_true(logits: Tensor, y: Tensor) -> Tensor:
    """``LSE_{j != y}(z_j) - z_y`` per sample: the cross-entropy's step direction without cancellation.

    ``CE = softplus(LSE_{j != y}(z_j) - z_y)`` is an increasing function of it, so the two have
    gradients of the same direction; but autograd's CE gradient ``softmax - onehot`` loses its
    ``y`` entry ``p_y - 1`` to cancellation once ``p_y`` rounds to 1, while this one's logit
    gradient is exactly ``(q_j)_{j != y}`` and ``-1`` at ``y`` (``q`` the softmax over the other
    classes): every entry O(1), the L1 norm exactly 2.
    """
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, y.unsqueeze(1), -math.inf)
    return torch.logsumexp(others, dim=1) - true


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy ``softplus(LSE_{j != y} z_j - z_y)``: accurate down to 1e-38 or so.

    ``F.cross_entropy`` computes ``LSE(z) - z_y`` and so returns exactly 0 for confident samples in
    float32; this form keeps their tiny losses comparable (used to pick the worst restart).
    """
    return F.softplus(others_minus_true(float_logits(logits), y))


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j`` per sample (float32 or wider): <= 0 exactly when misclassified.

    An exact tie is resolved as ``argmax`` resolves it (the first of the tied classes wins): a
    tie that ``argmax`` counts as correct gets the smallest positive margin, so an attack that
    stops at margin <= 0 never stops on an image the verdict still counts as robust.

    Examples:
        >>> import torch
        >>> tie = torch.tensor([[1.0, 1.0, 0.0]])
        >>> bool(margin(tie, torch.tensor([0])) > 0), bool(margin(tie, torch.tensor([1])) <= 0)
        (True, True)
    """
    logits = float_logits(logits)
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    gap = true - logits.scatter(1, y.unsqueeze(1), -math.inf).amax(dim=1)
    wins_tie = (gap == 0) & (logits.argmax(dim=1) == y)
    return gap.masked_fill(wins_tie, torch.finfo(gap.dtype).tiny)


def input_grad(loss: Tensor, x: Tensor) -> Tensor:
    """Gradient of ``loss`` w.r.t. ``x`` only (zeros where the loss does not depend on ``x``)."""
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


# ------------------------------------------------------------------------------------ context


CPU_CHUNK: int | None = None
"""Images per forward/backward pass on CPUs in the fast layout: None picks them by
:func:`cpu_slice_images`; 0 runs whole batches; a number fixes it (``benchmarks/attacks.py
--cpu-chunk``)."""


UNMEASURED_CPU_SLICE = 128
"""Images per slice on CPUs for a model whose activations cannot be measured (compiled, or not a
module)."""


def cpu_slice_images(largest_activation_bytes: int) -> int:
    """Images per slice on CPUs: the largest power of two whose largest activation fits the heap.

    PyTorch has no caching allocator on CPUs: a tensor above glibc's mmap threshold (32 MiB under
    :func:`robust.cpu_memory.retain_freed_memory`) is freshly mapped and page-faulted on every
    pass, one below it reuses freed heap. So a slice is as many images as keep the model's largest
    activation (or its gradient, of the same size) at or under 32 MiB, a power of two for the
    kernels' blocking, at least 1. On 2 AMD EPYC cores (``benchmarks/attacks.py``, PGD-40 and
    APGD-CE): LeNet on MNIST (45 KiB in its first convolution per image) gets 512, about 10%
    faster than slices of 128 at batches of 256 and 512; SmallCNN (144 KiB) gets 128, 10-25%
    faster than 256 or 512 at a batch of 512.

    Args:
        largest_activation_bytes: Bytes per image of the model's largest intermediate tensor.

    Returns:
        Images per slice.

    Examples:
        >>> cpu_slice_images(20 * 24 * 24 * 4), cpu_slice_images(64 * 24 * 24 * 4)
        (512, 128)
        >>> cpu_slice_images(64 * 2**20)
        1
    """
    fits = MMAP_THRESHOLD // max(int(largest_activation_bytes), 1)
    return 1 << (fits.bit_length() - 1) if fits >= 1 else 1


@contextlib.contextmanager
def largest_outputs(model: nn.Module) -> Iterator[list[int]]:
    """Record, while open, the bytes of every tensor a leaf module of ``model`` outputs.

    Yields the list the forward hooks append to; the hooks are removed on exit.
    """
    sizes: list[int] = []

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor):
            sizes.append(output.numel() * output.element_size())

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        yield sizes
    finally:
        for handle in handles:
            handle.remove()


def _default_channels_last(model: object, x: Tensor) -> bool:
    """Channels-last weights by default for float32 4-D images on CPUs (faster there)."""
    return x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32


class Forward:
    """The model as the attacks call it: logits, and per-sample input gradients of an objective.

    With ``channels_last``, parameters are replaced, for the duration of each call, by detached
    tensors, 4-D ones by channels-last copies (:func:`torch.func.functional_call`; the caller's
    parameters are never changed, and no parameter gradient is built). With ``sliced``, batches
    are evaluated in slices of ``chunk`` images (:data:`CPU_CHUNK`, else
    :func:`cpu_slice_images` of the largest activation, which the first call measures with
    forward hooks: no extra call, so a model that counts its queries sees none; that call, and
    models whose layers hooks cannot see, use :data:`UNMEASURED_CPU_SLICE`). Each sample's result
    does not depend on its slice, up to float rounding. With ``channels_last``, modules also run
    with ReLU after max-pooling (:mod:`robust.pool_first`: the same function; on 2 CPU cores 6-8%
    faster in that layout and 5-9% slower in the contiguous one, where max-pooling rectified
    values is the cheaper order), also in the network of a module that declares calling it whole
    (``whole_sequentials``, as the project's LightningModules do), swapped in for each call
    (:func:`robust.pool_first.sequential_replacements`; 7% faster PGD on a LeNet classifier
    module).
    Compiled (``_orig_mod``) and non-module callables are called as they are.
    """

    def __init__(
        self, model: Callable[[Tensor], Tensor], channels_last: bool, sliced: bool = False
    ) -> None:
        self.model = model
        self.chunk: int | None = None  # images per slice; None: whole batches
        self.measure = False  # measure the largest activation in the next call
        self.weights: dict[str, Tensor] = {}
        self.replacements: list[tuple[nn.Module, str, nn.Module]] = []
        if channels_last and isinstance(model, nn.Module) and not hasattr(model, "_orig_mod"):
            # ReLU after max-pooling: the same function, faster in the channels-last layout;
            # networks held by other modules (a LightningModule's) swapped in during each call
            self.model = rewrite_sequentials(model, swap_relu_pool)
            self.replacements = sequential_replacements(model, swap_relu_pool)
            # clone, not contiguous(): a weight with one input channel counts as contiguous in
            # both formats, yet only explicit channels-last strides make convolutions use it
            self.weights = {
                name: p.detach().clone(memory_format=torch.channels_last)
                if p.dim() == 4
                else p.detach()
                for name, p in model.named_parameters()
            }
        if sliced and CPU_CHUNK is not None:
            self.chunk = CPU_CHUNK or None
        elif sliced:
            self.chunk = UNMEASURED_CPU_SLICE
            self.measure = isinstance(self.model, nn.Module) and not hasattr(
                self.model, "_orig_mod"
            )

    def _call(self, x: Tensor) -> Tensor:
        with children_replaced(self.replacements):
            if not self.measure or not len(x):
                return self._plain_call(x)
            self.measure = False
            with largest_outputs(self.model) as sizes:
                out = self._plain_call(x)
        per_image = max([x.numel() * x.element_size(), *sizes]) // len(x)
        self.chunk = cpu_slice_images(per_image)
        return out

    def _plain_call(self, x: Tensor) -> Tensor:
        if self.weights:
            return torch.func.functional_call(self.model, self.weights, (x,))
        return self.model(x)

    def _slices(self, n: int) -> list[slice]:
        if self.chunk is None or n <= self.chunk:
            return [slice(0, n)]
        return [slice(s, s + self.chunk) for s in range(0, n, self.chunk)]

    def __call__(self, x: Tensor) -> Tensor:
        """Logits ``(B, C)`` of ``x``."""
        parts = [self._call(x[s]) for s in self._slices(len(x))]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def gradient(
        self,
        x: Tensor,
        y: Tensor,
        objective: Callable[[Tensor, Tensor], tuple[Tensor | None, Tensor]],
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        """Objective values, the input gradient of the summed loss, and the detached logits.

        ``objective(logits, y)`` returns per-sample values (or None) and a scalar loss that sums
        per-sample terms, so slices can be differentiated one by one.
        """
        values, grads, logits = [], [], []
        for s in self._slices(len(x)):
            piece = x[s].detach().requires_grad_(True)
            out = self._call(piece)
            value, loss = objective(out, y[s])
            grads.append(input_grad(loss, piece))
            values.append(value)
            logits.append(out.detach())
        if len(grads) == 1:
            return values[0], grads[0], logits[0]
        value = None if values[0] is None else torch.cat(values)
        return value, torch.cat(grads), torch.cat(logits)


@contextlib.contextmanager
def prepared(
    model: Callable[[Tensor], Tensor], x: Tensor, channels_last: bool | None
) -> Iterator[Forward]:
    """Eval mode (modes restored after), no inference mode, gradients on; yields the forward pass.

    ``channels_last`` None picks it for float32 4-D images on CPUs, where batches then also run
    in slices of :func:`cpu_slice_images` images (or :data:`CPU_CHUNK`, where set).
    """
    if channels_last is None:
        channels_last = _default_channels_last(model, x)
    mode = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with mode, torch.inference_mode(False), torch.enable_grad():
        yield Forward(model, channels_last, sliced=channels_last and x.device.type == "cpu")


def as_inputs(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Detached ``x`` (it only feeds out-of-place ops) and a normal-tensor copy of ``y``.

    Must be called inside :func:`prepared`: ``y`` is saved for backward by the losses, which an
    inference tensor cannot be.
    """
    return x.detach(), y.detach().clone()
