"""Gradient attacks in pixel space [0, 1]: FGM (FGSM) and PGD under the L2 and L-infinity norms.

Plain PyTorch, batched, with no host-device synchronisation inside the attack loop. Conventions
shared by every function here:

* ``x`` is a float batch ``(B, ...)`` in ``[0, 1]`` (the model normalises internally); ``y`` holds
  int64 labels ``(B,)``; the result has the dtype, device and shape of ``x`` and is detached.
* The loss is the cross-entropy on logits promoted to at least float32, each sample's divided by the
  L1 norm of its logit gradient and summed over the batch: steps depend only on the gradient's
  direction, which this leaves unchanged, while each sample's gradient is independent of the batch
  size and does not underflow under bf16/fp16 autocast. Gradients are taken w.r.t. the input only
  (``torch.autograd.grad``), so the model's parameter ``.grad`` fields are never touched.
* The model runs in eval mode during the attack; each submodule's previous mode is restored after.
* Safe inside ``torch.inference_mode()`` (e.g. Lightning's test loop): the attack runs under
  ``torch.inference_mode(False)`` and ``torch.enable_grad()`` on a fresh iterate and cloned labels.
* Every iterate is projected onto the eps-ball around ``x`` and then clipped to ``[0, 1]`` (clipping
  moves each coordinate towards ``x``, so it never leaves the ball).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust.modes import eval_mode

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One RNG for the batch, one per sample (batch-size independent starts), or the global RNG."""

__all__ = ["METHODS", "NORMS", "AttackSpec", "attack", "fgm", "pgd"]

METHODS = ("fgm", "pgd")
NORMS = ("2", "inf")

_NORM_ALIASES = {"2": "2", "2.0": "2", "l2": "2", "inf": "inf", "linf": "inf", "infinity": "inf"}


def _canonical_norm(norm: str | float) -> str:
    """Return ``"2"`` or ``"inf"`` for 2, "2", "l2", "L2", inf, "inf", "linf", "Linf", "l_inf"."""
    key = str(norm).strip().lower().replace("_", "").replace(" ", "")
    if key in _NORM_ALIASES:
        return _NORM_ALIASES[key]
    raise ValueError(f"norm must be one of {NORMS} (aliases: 2, 'l2', inf, 'linf'), got {norm!r}")


def _check(eps: float, steps: int, step_size: float | None, restarts: int) -> None:
    """Raise one ValueError naming the first invalid numeric setting."""
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if step_size is not None and not (
        isinstance(step_size, numbers.Real) and math.isfinite(step_size) and step_size > 0
    ):
        raise ValueError(
            f"step_size must be a finite number > 0 (or None for the default), got {step_size!r}"
        )
    if isinstance(restarts, bool) or not isinstance(restarts, numbers.Integral) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")


@dataclass(frozen=True)
class AttackSpec:
    """Configuration of one attack, e.g. from YAML via jsonargparse.

    ``None`` fields take method-dependent defaults, exposed as the ``resolved_*`` properties (kept
    as properties, not rewritten fields, so ``dataclasses.replace(spec, eps=...)`` re-derives them):

    * ``fgm``: 1 step of size ``eps``; with ``random_start`` the step is ``1.25 * eps`` (Wong, Rice
      & Kolter 2020, "Fast is better than free", Alg. 3).
    * ``pgd``: 40 steps of size ``2.5 * eps / steps`` from a random start (Madry et al. 2018,
      Sec. 2 and their released code).

    Attributes:
        method: "fgm" (one gradient step; FGSM for the L-inf norm) or "pgd".
        norm: "2" or "inf" (also 2, .inf, "l2", "linf", "Linf", ...; stored as "2" or "inf").
        eps: Radius of the perturbation ball, in [0, 1] pixel units.
        steps: Number of gradient steps (fgm: must be 1).
        step_size: Step length per iteration (L2: Euclidean length; L-inf: per-pixel change).
        random_start: Start uniformly inside the eps-ball instead of at ``x``.
        restarts: Independent random starts; the worst case per sample is kept. Needs random_start.
        targeted: If True, ``y`` holds target labels and the attack minimises their loss.
        name: Metric key; default derived from the settings (see ``key``).
    """

    method: str = "fgm"
    norm: str | float = "2"
    eps: float = 5.0
    steps: int | None = None
    step_size: float | None = None
    random_start: bool | None = None
    restarts: int = 1
    targeted: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        """Canonicalise ``method``/``norm``; raise one ValueError naming a bad setting."""
        method = str(self.method).strip().lower()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "norm", _canonical_norm(self.norm))
        if method == "fgm" and self.steps not in (None, 1):
            raise ValueError(f"steps must be 1 (or None) for method='fgm', got {self.steps!r}")
        _check(self.eps, self.resolved_steps, self.step_size, self.restarts)
        if self.restarts > 1 and not self.resolved_random_start:
            raise ValueError(
                "restarts > 1 requires random_start=True (restarts would be identical)"
            )
        if self.name is not None and not self.name:
            raise ValueError("name must be a non-empty string or None (derived from the settings)")

    @property
    def resolved_steps(self) -> int:
        """Number of gradient steps: ``steps`` or the method default (fgm 1, pgd 40)."""
        if self.steps is not None:
            return self.steps
        return 1 if self.method == "fgm" else 40

    @property
    def resolved_random_start(self) -> bool:
        """Whether to start at a random point of the ball (default: fgm False, pgd True)."""
        if self.random_start is not None:
            return self.random_start
        return self.method == "pgd"

    @property
    def resolved_step_size(self) -> float:
        """Step length: ``step_size`` or the method default (see class docstring)."""
        if self.step_size is not None:
            return self.step_size
        return _default_step_size(
            self.method, self.eps, self.resolved_steps, self.resolved_random_start
        )

    @property
    def key(self) -> str:
        """Metric key: ``name``, else e.g. ``fgm_l2_eps5``, ``pgd40_linf_eps0.3``.

        Non-default choices add suffixes: ``rand`` (fgm with random start), ``norand`` (pgd
        without), ``r<restarts>``, ``tgt`` (targeted), e.g. ``pgd10_l2_eps1_r5``.
        """
        if self.name is not None:
            return self.name
        method = "fgm" if self.method == "fgm" else f"pgd{self.resolved_steps}"
        parts = [method, f"l{self.norm}", f"eps{self.eps:g}"]
        if self.resolved_random_start != (self.method == "pgd"):
            parts.append("rand" if self.resolved_random_start else "norand")
        if self.restarts > 1:
            parts.append(f"r{self.restarts}")
        if self.targeted:
            parts.append("tgt")
        return "_".join(parts)


def _default_step_size(method: str, eps: float, steps: int, random_start: bool) -> float:
    if method == "fgm":
        return 1.25 * eps if random_start else eps
    return 2.5 * eps / steps


def attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    spec: AttackSpec,
    generator: Generators = None,
) -> Tensor:
    """Run the attack described by ``spec`` (see :func:`fgm` and :func:`pgd` for the semantics).

    Args:
        model: Classifier mapping ``(B, ...)`` inputs in [0, 1] to ``(B, C)`` logits.
        x: Clean inputs of shape ``(B, ...)`` in [0, 1].
        y: Labels ``(B,)``; target labels if ``spec.targeted``.
        spec: Attack configuration.
        generator: RNG for the random start (on ``x``'s device), or one per sample.

    Returns:
        Adversarial inputs, detached, same shape/dtype/device as ``x``.
    """
    common = {
        "step_size": spec.resolved_step_size,
        "random_start": spec.resolved_random_start,
        "targeted": spec.targeted,
        "generator": generator,
    }
    if spec.method == "fgm" and spec.restarts == 1:
        return fgm(model, x, y, spec.eps, spec.norm, **common)
    # fgm with restarts is pgd with one step.
    return pgd(
        model,
        x,
        y,
        spec.eps,
        spec.norm,
        steps=spec.resolved_steps,
        restarts=spec.restarts,
        **common,
    )


def fgm(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str | float,
    *,
    step_size: float | None = None,
    random_start: bool = False,
    targeted: bool = False,
    generator: Generators = None,
) -> Tensor:
    r"""Fast Gradient Method: one normalised gradient step, projected onto the eps-ball and clipped.

    Goodfellow, Shlens & Szegedy 2015, "Explaining and Harnessing Adversarial Examples", Eq. (3)
    (L-inf, FGSM: :math:`\delta = \epsilon\,\mathrm{sign}(\nabla_x L)`); L2 variant
    :math:`\delta = \epsilon\,\nabla_x L / \|\nabla_x L\|_2` per sample (as ART's
    ``FastGradientMethod(norm=2)``). With ``random_start``: uniform start in the ball, a step of
    ``1.25 * eps``, projection (Wong, Rice & Kolter 2020, "Fast is better than free", Alg. 3).
    A zero gradient gives a zero step (no NaN).

    Distance Measure: L2 or Linf.

    Shape:
        - x: :math:`(B, ...)` in [0, 1].
        - y: :math:`(B,)` int64 labels (target labels if ``targeted``).
        - output: :math:`(B, ...)`, same dtype/device as ``x``, detached.

    Args:
        model: Classifier returning ``(B, C)`` logits.
        x: Clean inputs.
        y: Labels (or targets).
        eps: Radius of the ball (>= 0).
        norm: ``"2"`` or ``"inf"`` (aliases accepted).
        step_size: Step length; default ``eps`` (``1.25 * eps`` with a random start).
        random_start: Start uniformly inside the ball.
        targeted: Minimise the loss of ``y`` instead of maximising it.
        generator: RNG for the random start, or one per sample.

    Returns:
        Adversarial inputs in [0, 1] with ``||x_adv - x||_norm <= eps``.
    """
    norm = _canonical_norm(norm)
    _check(eps, 1, step_size, 1)
    if step_size is None:
        step_size = _default_step_size("fgm", eps, 1, random_start)
    return _run(model, x, y, eps, norm, 1, step_size, random_start, 1, targeted, generator)


def pgd(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str | float,
    *,
    steps: int = 40,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    generator: Generators = None,
) -> Tensor:
    r"""Projected Gradient Descent (ascent on the loss) in the L2 or L-inf ball.

    Madry, Makelov, Schmidt, Tsipras & Vladu 2018, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", Eq. (2):
    :math:`x^{t+1} = \Pi_{B_\epsilon(x)}(x^t + \alpha\,s(\nabla_x L))` with
    :math:`s = \mathrm{sign}` (L-inf) or :math:`s(g) = g/\|g\|_2` per sample (L2), then clipping
    to [0, 1]. The L2 projection scales :math:`\delta` by :math:`\min(1, \epsilon/\|\delta\|_2)`;
    the L-inf projection clips each coordinate to :math:`[-\epsilon, \epsilon]`. With
    ``restarts > 1`` the attack runs from independent random starts and keeps, per sample, the
    worst case: a successful example (misclassified, or target hit) first, else the highest loss
    (lowest target loss if ``targeted``). The first restart consumes the generator exactly like
    ``restarts=1``, so more restarts are never weaker for the same seed.

    Distance Measure: L2 or Linf.

    Shape:
        - x: :math:`(B, ...)` in [0, 1].
        - y: :math:`(B,)` int64 labels (target labels if ``targeted``).
        - output: :math:`(B, ...)`, same dtype/device as ``x``, detached.

    Args:
        model: Classifier returning ``(B, C)`` logits.
        x: Clean inputs.
        y: Labels (or targets).
        eps: Radius of the ball (>= 0).
        norm: ``"2"`` or ``"inf"`` (aliases accepted).
        steps: Number of gradient steps (>= 1).
        step_size: Step length; default ``2.5 * eps / steps`` (Madry et al. 2018).
        random_start: Start uniformly inside the ball (L-inf: uniform cube; L2: uniform ball).
        restarts: Number of independent runs (>= 1).
        targeted: Minimise the loss of ``y`` instead of maximising it.
        generator: RNG for the random starts, or one per sample.

    Returns:
        Adversarial inputs in [0, 1] with ``||x_adv - x||_norm <= eps``.
    """
    norm = _canonical_norm(norm)
    _check(eps, steps, step_size, restarts)
    if step_size is None:
        step_size = _default_step_size("pgd", eps, steps, random_start)
    return _run(
        model, x, y, eps, norm, steps, step_size, random_start, restarts, targeted, generator
    )


def _view(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector ``(B,)`` to broadcast against ``like`` ``(B, ...)``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _norm2(v: Tensor) -> Tensor:
    """Per-sample Euclidean norm ``(B,)`` of ``v`` ``(B, ...)``."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1)


def _norm2_wide(v: Tensor) -> Tensor:
    """Per-sample Euclidean norm ``(B,)`` accumulated in float64, returned in ``v``'s dtype."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1, dtype=torch.float64).to(v.dtype)


def _random_start(x: Tensor, eps: float, norm: str, generator: Generators) -> Tensor:
    """Uniform sample from the eps-ball around ``x`` (not yet clipped to [0, 1]).

    With one generator per sample, sample ``i`` is drawn from ``generator[i]`` alone, exactly as a
    one-image call would draw it: the result does not depend on the batch it is in.

    L-inf: ``U[-eps, eps]^d``. L2: Gaussian direction normalised to the unit sphere, radius
    ``eps * U^(1/d)`` (uniform in the ball's volume; Muller 1959).
    """
    if isinstance(generator, Sequence):
        if len(generator) != len(x):
            raise ValueError(
                f"generator: {len(generator)} generators for a batch of {len(x)} images"
            )
        return torch.cat(
            [_random_start(x[i : i + 1], eps, norm, g) for i, g in enumerate(generator)]
        )
    if norm == "inf":
        return torch.empty_like(x).uniform_(-eps, eps, generator=generator).add_(x)
    d = x[0].numel()
    tiny = torch.finfo(x.dtype).tiny
    delta = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    radius = torch.rand(x.shape[0], generator=generator, dtype=x.dtype, device=x.device).pow_(
        1.0 / d
    )
    scale = radius.mul_(eps).div_(_norm2(delta).clamp_min_(tiny))
    return delta.mul_(_view(scale, x)).add_(x)


def _loss(
    model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, reduction: str
) -> tuple[Tensor, Tensor]:
    """Cross-entropy on logits promoted to >= float32, and the logits."""
    logits = model(x)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, y, reduction=reduction), logits


def _step_loss(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy whose per-sample logit gradients have unit L1 norm.

    The logit gradient of CE is softmax - onehot, whose L1 norm is 2 (1 - p_y) = 2 sum_{j != y} p_j,
    computed as a ratio of log-sum-exps so that it stays exact when p_y rounds to 1. Each sample's
    loss is divided by that (detached) number. Steps use the sign (L-inf) or the normalized
    gradient (L2), which a positive per-sample factor does not change, but the backward pass then
    carries O(1) values: under fp16 a confident sample's 1 - p_y of 1e-9 would otherwise underflow
    to a zero gradient and a zero step.
    """
    loss, logits = _loss(model, x, y, "none")
    with torch.no_grad():
        others = logits.scatter(1, y.unsqueeze(1), -math.inf)
        log_rest = torch.logsumexp(others, dim=1) - torch.logsumexp(logits, dim=1)
        # 1 / (2 sum_{j != y} p_j), capped at e^80 so a loss that is exactly 0 never meets inf
        scale = log_rest.neg_().clamp_max_(80.0).exp_().mul_(0.5)
    return (loss * scale).sum()


def _run(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str,
    steps: int,
    step_size: float,
    random_start: bool,
    restarts: int,
    targeted: bool,
    generator: Generators,
) -> Tensor:
    """Shared driver: eval mode, inference-mode escape, restarts with per-sample worst case."""
    mode = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with mode, torch.inference_mode(False), torch.enable_grad():
        # x only feeds out-of-place ops (never autograd), so an inference tensor is fine; y is
        # saved for backward by the loss and must be a normal tensor.
        x = x.detach()
        y = y.detach().clone()
        run = _Run(x, eps, norm, steps, step_size, random_start, targeted)
        best = best_obj = best_ok = None
        for _ in range(restarts):
            x_adv = run(model, y, generator)
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                loss, logits = _loss(model, x_adv, y, "none")
                hit = logits.argmax(dim=1) == y
                ok = hit if targeted else ~hit
                obj = -loss if targeted else loss
            if best is None:
                best, best_obj, best_ok = x_adv, obj, ok
                continue
            better = (ok & ~best_ok) | ((ok == best_ok) & (obj > best_obj))
            best = torch.where(_view(better, x), x_adv, best)
            best_obj = torch.where(better, obj, best_obj)
            best_ok = best_ok | ok
        return best


class _Run:
    """One (random-start) run of ``steps`` projected steps; all updates in place on one buffer.

    The projection is skipped when it cannot act (one step of length <= eps from ``x`` itself,
    i.e. plain FGM), which saves its kernels; clipping to [0, 1] always runs.
    """

    def __init__(
        self,
        x: Tensor,
        eps: float,
        norm: str,
        steps: int,
        step_size: float,
        random_start: bool,
        targeted: bool,
    ) -> None:
        self.x, self.eps, self.norm, self.steps, self.random_start = (
            x,
            eps,
            norm,
            steps,
            random_start,
        )
        self.alpha = -step_size if targeted else step_size  # targeted: descend on the target loss
        self.tiny = torch.finfo(x.dtype).tiny
        self.project = random_start or steps > 1 or step_size > eps
        # L-inf: the box ball ∩ [0, 1], so projection and clipping are one clamp per step.
        self.lo = self.hi = None
        if norm == "inf" and self.project:
            self.lo = (x - eps).clamp_(min=0.0)
            self.hi = (x + eps).clamp_(max=1.0)

    def __call__(
        self, model: Callable[[Tensor], Tensor], y: Tensor, generator: Generators
    ) -> Tensor:
        x, eps, tiny = self.x, self.eps, self.tiny
        if self.random_start:
            x_adv = _random_start(x, eps, self.norm, generator).clamp_(0.0, 1.0)
        else:
            x_adv = x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(_step_loss(model, x_adv, y), x_adv)
            x_adv.requires_grad_(False)
            with torch.no_grad():
                if self.norm == "inf":
                    x_adv.add_(grad.sign_(), alpha=self.alpha)
                    if self.project:
                        x_adv.clamp_(self.lo, self.hi)
                    else:
                        x_adv.clamp_(0.0, 1.0)
                    continue
                # The norm accumulates in float64, so tiny gradients (whose float32 squares would
                # underflow) keep an exact direction; a zero gradient gives a zero step, never NaN.
                gnorm = _norm2_wide(grad).clamp_min_(tiny)
                x_adv.addcdiv_(grad, _view(gnorm, grad), value=self.alpha)
                if self.project:
                    delta = x_adv.sub_(x)
                    factor = (eps / _norm2(delta).clamp_min_(tiny)).clamp_max_(1.0)
                    x_adv = delta.mul_(_view(factor, delta)).add_(x)
                x_adv.clamp_(0.0, 1.0)
        return x_adv.detach()
