"""TRADES (Zhang et al. 2019): the KL inner maximization and the surrogate loss, in pixel space.

Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan (2019), "Theoretically Principled Trade-off between
Robustness and Accuracy", ICML, Eq. (5) and Alg. 1: the model is trained on

    CE(f(x), y) + beta * max_{x' in B(x, eps)} KL(f(x) || f(x')),

where f(.) are the softmax probabilities and beta = 1/lambda trades accuracy for robustness. The
inner maximum is approximated by projected steps on the KL from a small Gaussian start
``x + 0.001 * N(0, I)`` (the authors' code; the KL and its gradient vanish at ``x' = x``).

Conventions are those of :mod:`robust.attacks`: images in [0, 1], detached results clipped to
[0, 1] and inside the eps-ball, gradients w.r.t. the input only, the model in eval mode during the
maximization (submodule modes restored), safe inside ``torch.inference_mode()``, and one RNG per
sample optional so that a sample's result does not depend on the batch it is in.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    >>> x_adv = trades_perturb(model, x, eps=0.1, norm="inf", steps=5)
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-7)
    True
    >>> loss, ce, kl = trades_loss(model(x), model(x_adv), y, beta=6.0)
    >>> bool(torch.isclose(loss, ce + 6.0 * kl))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robust._attack_core import clip_then_project_l2, float_logits, into_ball
from robust.checks import SettingError, check_int, check_real
from robust.modes import eval_mode

__all__ = ["START_STD", "kl_divergence", "trades_loss", "trades_perturb"]

Generators = torch.Generator | Sequence[torch.Generator] | None

START_STD = 0.001
"""Standard deviation of the Gaussian start of the inner maximization (the authors' code)."""

_NORMS = {"2": "2", "l2": "2", "2.0": "2", "inf": "inf", "linf": "inf", "infinity": "inf"}


def _norm_name(norm: str | float) -> str:
    key = str(norm).strip().lower().replace("_", "").replace(" ", "")
    if key not in _NORMS:
        raise SettingError(f"trades_perturb norm must be one of '2', 'inf'; got {norm!r}")
    return _NORMS[key]


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    r"""Per-sample :math:`\mathrm{KL}(p \,\|\, q) = \sum_c p_c (\log p_c - \log q_c)` from logits.

    Computed from log-softmaxes in at least float32 (exact where a probability underflows).

    Args:
        logits_p: ``(B, C)`` logits of the reference distribution p (TRADES: the clean image).
        logits_q: ``(B, C)`` logits of q (TRADES: the perturbed image).

    Returns:
        ``(B,)`` KL divergences, >= 0.

    Examples:
        >>> import torch
        >>> p = torch.tensor([[0.0, 0.0]])
        >>> q = torch.tensor([[torch.log(torch.tensor(3.0)), 0.0]])  # q = (3/4, 1/4)
        >>> round(kl_divergence(p, q).item(), 6)  # 0.5 log(2/3) + 0.5 log(2)
        0.143841
    """
    log_p = float_logits(logits_p).log_softmax(dim=1)
    log_q = float_logits(logits_q).to(log_p.dtype).log_softmax(dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def trades_loss(
    logits_clean: Tensor, logits_adv: Tensor, y: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The TRADES objective of Zhang et al. (2019), Eq. (5), averaged over the batch.

    ``CE(f(x), y) + beta * KL(f(x) || f(x'))``; gradients flow through both the clean and the
    perturbed logits (the clean distribution is not detached, as in the authors' code).

    Args:
        logits_clean: ``(B, C)`` logits of the clean images.
        logits_adv: ``(B, C)`` logits of the perturbed images from :func:`trades_perturb`.
        y: ``(B,)`` int64 labels.
        beta: Weight of the KL term, >= 0 (the paper's 1/lambda; 6 in its MNIST and CIFAR-10
            comparison, Table 5).

    Returns:
        ``(loss, cross_entropy, kl)``, each a scalar (batch means).

    Examples:
        >>> import torch
        >>> logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
        >>> loss, ce, kl = trades_loss(logits, logits, y, beta=6.0)  # x' = x: no KL
        >>> float(kl), bool(torch.isclose(loss, ce))
        (0.0, True)
    """
    beta = check_real("beta", beta, low=0, low_inclusive=True, owner="TRADES")
    ce = F.cross_entropy(float_logits(logits_clean), y)
    kl = kl_divergence(logits_clean, logits_adv).mean()
    return ce + beta * kl, ce, kl


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _randn(shape: Sequence[int], like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=like.dtype, device=like.device)


def _gaussian(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like ``x``; sample ``i`` from ``generator[i]`` if a list."""
    if isinstance(generator, Sequence):
        if len(generator) != len(x):
            raise SettingError(
                f"trades_perturb generator must be one generator or one per image; got "
                f"{len(generator)} generators for {len(x)} images"
            )
        return torch.cat([_randn((1, *x.shape[1:]), x, g) for g in generator])
    return _randn(x.shape, x, generator)


def _random_rows(grad: Tensor, rows: Tensor, generator: Generators) -> Tensor:
    """``grad`` with the rows where ``rows`` is True replaced by standard normal noise.

    With one generator per sample, only the replaced rows' generators are drawn from, so a sample's
    random numbers never depend on the other samples of the batch.
    """
    if isinstance(generator, Sequence):
        grad = grad.clone()
        for i in torch.nonzero(rows).flatten().tolist():
            grad[i] = _randn(grad.shape[1:], grad, generator[i])
        return grad
    return torch.where(_view(rows, grad), _randn(grad.shape, grad, generator), grad)


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Into the eps-ball around ``x`` and [0, 1] (in place where possible), as the authors' code.

    L-inf: project, then clip; L2: clip, then scale the step into the ball
    (:func:`robust._attack_core.clip_then_project_l2`). In bfloat16 or float16 the result is moved
    back where rounding took it outside the ball (:func:`robust._attack_core.into_ball`).
    """
    if norm == "inf":
        projected = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
        return into_ball(x, projected, eps, norm)
    return clip_then_project_l2(x, x_adv, eps)


def trades_perturb(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    eps: float,
    norm: str | float = "inf",
    steps: int = 10,
    step_size: float | None = None,
    start_std: float = START_STD,
    generator: Generators = None,
) -> Tensor:
    r"""The inner maximization of TRADES: projected steps ascending ``KL(f(x) || f(x'))``.

    Zhang et al. (2019), Alg. 1: start at
    :math:`x' = x + \texttt{start\_std}\cdot\xi`, :math:`\xi \sim N(0, I)`, then ``steps`` times
    :math:`x' \leftarrow \Pi_{B(x,\epsilon) \cap [0,1]^d}(x' + \alpha\, s(\nabla_{x'}
    \mathrm{KL}(f(x) \| f(x'))))` with :math:`s = \mathrm{sign}` (L-inf) or :math:`s(g) = g /
    \|g\|_2` per sample (L2; the L2 step clipped to [0, 1] first, then scaled into the ball, in
    the authors' order). ``f(x)`` is computed once (fixed target). The objective is the sum of
    per-sample KLs, so each sample's step does not depend on the batch. A sample whose gradient is
    exactly zero (possible in low precision, where ``x'`` may round to ``x``) steps along a random
    direction drawn from its generator instead, as the authors' L2 code does.

    Args:
        model: Classifier mapping ``(B, ...)`` images in [0, 1] to ``(B, C)`` logits.
        x: Clean images ``(B, ...)`` in [0, 1].
        eps: Radius of the ball, >= 0 (0 returns ``x``).
        norm: ``"inf"`` or ``"2"`` (aliases 2, "l2", "linf").
        steps: Number of steps, >= 1 (the authors: 40 for MNIST, 10 for CIFAR-10).
        step_size: Step length, > 0; default ``2.5 * eps / steps`` (as :func:`robust.attacks.pgd`;
            the authors use 0.01 for MNIST at eps 0.3 with 40 steps).
        start_std: Standard deviation of the Gaussian start, >= 0.
        generator: RNG for the start (on ``x``'s device), one per sample, or None (global RNG).

    Returns:
        Perturbed images, detached, same shape/dtype/device as ``x``, in [0, 1] and within eps.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(2, 1, 2, 2)
        >>> x_adv = trades_perturb(model, x, eps=0.5, norm="2", steps=3)
        >>> bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all())
        True
    """
    owner = "trades_perturb"
    norm = _norm_name(norm)
    eps = check_real("eps", eps, low=0, low_inclusive=True, owner=owner)
    steps = check_int("steps", steps, minimum=1, owner=owner)
    if step_size is not None:
        step_size = check_real("step_size", step_size, low=0, owner=owner)
    start_std = check_real("start_std", start_std, low=0, low_inclusive=True, owner=owner)
    if step_size is None:
        step_size = 2.5 * eps / steps
    mode = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with mode, torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()  # a normal tensor even when x was made in inference mode
        if eps == 0:
            return x
        with torch.no_grad():
            target = model(x).detach()
        x_adv = _project(x + start_std * _gaussian(x, generator), x, eps, norm)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            kl = kl_divergence(target, model(x_adv)).sum()
            (grad,) = torch.autograd.grad(kl, x_adv)
            x_adv = x_adv.detach()
            with torch.no_grad():
                grad = grad.to(x.dtype)
                zero = grad.flatten(1).abs().amax(dim=1) == 0
                if bool(zero.any()):
                    grad = _random_rows(grad, zero, generator)
                if norm == "inf":
                    step = grad.sign()
                else:
                    gnorm = torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=torch.float64)
                    step = grad / _view(
                        gnorm.to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny), grad
                    )
                x_adv = _project(x_adv + step_size * step, x, eps, norm)
        return x_adv.detach()
