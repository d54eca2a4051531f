"""SmoothAdv (Salman et al. 2019): PGD against the soft smoothed classifier, in pixel space.

Salman, Yang, Li, Zhang, Zhang, Razenshteyn & Bubeck (2019), "Provably Robust Deep Learning via
Adversarially Trained Smoothed Classifiers", NeurIPS, Sec. 3-4 and their SmoothAdv_PGD. The soft
smoothed classifier is ``G(x)_c = E_delta[softmax(f(x + delta))_c]`` with ``delta ~ N(0, sigma^2 I)``;
its adversarial example in the L2 ball of radius eps maximises

    -log( (1/m) sum_{i=1..m} softmax(f(x' + delta_i))_y )       (Sec. 3)

with m Monte Carlo noise samples drawn once and kept across the PGD steps (as in the authors'
``PGD_L2._attack_mutlinoise``). Training then fits f on the m noisy copies ``x' + delta_i``.

Conventions are those of :mod:`robust.attacks`: images in [0, 1]; the result is detached, clipped
to [0, 1] and within eps of ``x`` (the noisy copies themselves are not clipped, like the noise
:class:`robust.smoothing.Smooth` certifies with); gradients w.r.t. the input only; the model in
eval mode during the attack (submodule modes restored); safe inside ``torch.inference_mode()``;
with one generator per image, an image's noise and result do not depend on the batch it is in.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    >>> x_adv = smoothadv_attack(
    ...     model, x, y, sigma=0.25, eps=0.5, steps=4, num_noise_samples=8
    ... )
    >>> bool(((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-6).all())
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from robust._attack_core import clip_then_project_l2, cross_entropy
from robust.checks import SettingError, check_int, check_real
from robust.modes import eval_mode

__all__ = ["gaussian_noise", "smoothadv_attack", "soft_smoothed_log_prob"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def gaussian_noise(
    x: Tensor, sigma: float, num_samples: int, generator: Generators = None
) -> Tensor:
    """``num_samples`` draws of ``N(0, sigma^2 I)`` noise for each image of ``x``.

    Args:
        x: Images ``(B, ...)`` (only their shape, dtype and device are used).
        sigma: Noise standard deviation in pixel units, > 0.
        num_samples: Draws per image m, >= 1.
        generator: One RNG for the batch, one per image (image ``i``'s m draws come from
            ``generator[i]`` alone, so they do not depend on the batch), or None (global RNG).

    Returns:
        Noise of shape ``(m, B, ...)`` (copy-major, like ``x.repeat(m, ...)`` viewed as m blocks).

    Examples:
        >>> import torch
        >>> x = torch.zeros(3, 1, 2, 2)
        >>> gens = [torch.Generator().manual_seed(i) for i in range(3)]
        >>> noise = gaussian_noise(x, 0.5, 4, gens)
        >>> noise.shape
        torch.Size([4, 3, 1, 2, 2])
        >>> alone = gaussian_noise(x[1:2], 0.5, 4, [torch.Generator().manual_seed(1)])
        >>> torch.equal(noise[:, 1:2], alone)
        True
    """
    sigma = check_real("sigma", sigma, low=0, owner="gaussian_noise")
    num_samples = check_int("num_samples", num_samples, minimum=1, owner="gaussian_noise")
    kwargs = {"dtype": x.dtype, "device": x.device}
    if isinstance(generator, Sequence):
        if len(generator) != len(x):
            raise SettingError(
                f"gaussian_noise generator must be one generator or one per image; got "
                f"{len(generator)} generators for {len(x)} images"
            )
        noise = torch.stack(
            [torch.randn((num_samples, *x.shape[1:]), generator=g, **kwargs) for g in generator],
            dim=1,
        )
    else:
        noise = torch.randn((num_samples, *x.shape), generator=generator, **kwargs)
    return noise.mul_(sigma)


def soft_smoothed_log_prob(
    model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, noise: Tensor
) -> Tensor:
    """Log of the Monte Carlo soft smoothed probability of class ``y``, per image.

    ``log((1/m) sum_i softmax(f(x + noise_i))_y)`` (Salman et al. 2019, Sec. 3), computed as a
    log-sum-exp over the copies of ``log p_y = -softplus(LSE_{j != y} z_j - z_y)`` in at least
    float32, so its value and its gradient's direction stay exact when the probability rounds to
    1 (log-softmax's gradient loses its ``1 - p_y`` there). The m noisy copies go through the
    model as one batch.

    Args:
        model: Classifier mapping ``(N, ...)`` inputs to ``(N, C)`` logits.
        x: Images ``(B, ...)``.
        y: Labels ``(B,)``.
        noise: Additive noise ``(m, B, ...)``, e.g. from :func:`gaussian_noise`.

    Returns:
        ``(B,)`` log-probabilities (differentiable w.r.t. ``x`` and the model).

    Examples:
        >>> import torch
        >>> model = lambda v: torch.zeros(len(v), 4)  # uniform over 4 classes
        >>> x, y = torch.zeros(2, 3), torch.tensor([0, 3])
        >>> soft_smoothed_log_prob(model, x, y, torch.randn(5, 2, 3)).exp()
        tensor([0.2500, 0.2500])
    """
    m, batch = noise.shape[0], x.shape[0]
    if noise.shape[1:] != x.shape:
        raise SettingError(
            f"soft_smoothed_log_prob noise must have shape (m, *x.shape) = (m, "
            f"{', '.join(map(str, x.shape))}); got {tuple(noise.shape)}"
        )
    logits = model((x.unsqueeze(0) + noise).flatten(0, 1))
    # log p_y = -softplus(LSE_{j != y} z_j - z_y): log_softmax's gradient lost its y entry
    # 1 - p_y once p_y rounded to 1, and the attack stepped the wrong way or not at all
    log_p_y = -cross_entropy(logits, y.repeat(m)).view(m, batch)
    return torch.logsumexp(log_p_y, dim=0) - math.log(m)


def smoothadv_attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    sigma: float,
    eps: float,
    steps: int,
    num_noise_samples: int,
    step_size: float | None = None,
    noise: Tensor | None = None,
    generator: Generators = None,
) -> Tensor:
    r"""SmoothAdv_PGD: L2 PGD on the soft smoothed classifier's cross-entropy.

    Salman et al. (2019), SmoothAdv_PGD with the multi-noise objective of Sec. 3: draw
    :math:`\delta_1..\delta_m \sim N(0, \sigma^2 I)` once, start at :math:`x' = x`, then ``steps``
    times :math:`x' \leftarrow \Pi_{B_2(x,\epsilon)}(\mathrm{clip}_{[0,1]}(x' + \alpha\, g /
    \|g\|_2))` with :math:`g = -\nabla_{x'} \log \frac1m \sum_i
    \mathrm{softmax}(f(x'+\delta_i))_y`, per image (a zero gradient gives a zero step): clipped,
    then scaled into the ball, in the authors' order
    (:func:`robust._attack_core.clip_then_project_l2`). The objective is summed over images, so
    each image's steps do not depend on the batch.

    Args:
        model: Classifier mapping ``(N, ...)`` images to ``(N, C)`` logits.
        x: Clean images ``(B, ...)`` in [0, 1].
        y: Labels ``(B,)`` (int64).
        sigma: Noise standard deviation of the smoothed classifier, > 0.
        eps: L2 radius of the attack, >= 0 (0 returns ``x``).
        steps: PGD steps, >= 1 (the paper trains with 1 to 10).
        num_noise_samples: Noise samples m per step, >= 1 (the paper's m_train: 1 to 8).
        step_size: Step length, > 0; default ``2 * eps / steps`` (the authors' code).
        noise: The m noise samples ``(m, B, ...)`` to use (already times sigma), e.g. to train on
            the same noisy copies; drawn with :func:`gaussian_noise` when None.
        generator: RNG of the noise when ``noise`` is None: one, one per image, or None.

    Returns:
        Adversarial images, detached, same shape/dtype/device as ``x``, in [0, 1], with
        ``||x_adv - x||_2 <= eps`` (in bfloat16 and float16 too: :func:`robust._attack_core.into_ball`).

    Examples:
        >>> import torch
        >>> w = torch.tensor([[1.0, -2.0]])  # class 1 iff x_0 - 2 x_1 > 0
        >>> model = lambda v: torch.cat([torch.zeros(len(v), 1), v @ w.T], dim=1)
        >>> x, y = torch.tensor([[0.5, 0.2]]), torch.tensor([1])
        >>> x_adv = smoothadv_attack(
        ...     model, x, y, sigma=0.25, eps=0.1, steps=5, num_noise_samples=4
        ... )
        >>> delta = (x_adv - x)[0] / 0.1  # the optimal direction is -w / ||w||
        >>> [round(v, 4) for v in delta.tolist()]
        [-0.4472, 0.8944]
    """
    owner = "smoothadv_attack"
    sigma = check_real("sigma", sigma, low=0, owner=owner)
    eps = check_real("eps", eps, low=0, low_inclusive=True, owner=owner)
    steps = check_int("steps", steps, minimum=1, owner=owner)
    m = check_int("num_noise_samples", num_noise_samples, minimum=1, owner=owner)
    if step_size is not None:
        step_size = check_real("step_size", step_size, low=0, owner=owner)
    if noise is not None and generator is not None:
        raise SettingError(f"{owner} takes noise or a generator to draw it, not both")
    if noise is not None and (noise.shape[0] != m or noise.shape[1:] != x.shape):
        raise SettingError(
            f"{owner} noise must have shape (num_noise_samples, *x.shape) = ({m}, "
            f"{', '.join(map(str, x.shape))}); got {tuple(noise.shape)}"
        )
    if step_size is None:
        step_size = 2.0 * eps / steps
    mode = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with mode, torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()  # normal tensors even when made in inference mode
        y = y.detach().clone()
        if eps == 0:
            return x
        noise = gaussian_noise(x, sigma, m, generator) if noise is None else noise.detach().clone()
        tiny = torch.finfo(x.dtype).tiny
        x_adv = x.clone()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = -soft_smoothed_log_prob(model, x_adv, y, noise).sum()
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            with torch.no_grad():
                grad = grad.to(x.dtype)
                gnorm = torch.linalg.vector_norm(grad.flatten(1), dim=1, dtype=torch.float64)
                x_adv += step_size * grad / _view(gnorm.to(x.dtype).clamp_min(tiny), grad)
                x_adv = clip_then_project_l2(x, x_adv, eps)  # the authors' order: clip, then scale
        return x_adv


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))
