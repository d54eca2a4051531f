"""Auto-PGD (APGD-CE and APGD-T) of Croce & Hein 2020, in the L-inf and L2 balls, in pixel space.

Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML), Algorithm 1 and Sec. 3: projected gradient ascent with momentum
``alpha = 0.75`` whose step size starts at ``2 eps`` and is halved, per image, at checkpoints
``w_j = ceil(p_j N)`` (``p_0 = 0``, ``p_1 = 0.22``,
``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) when

1. the objective grew in fewer than ``rho (w_j - w_{j-1})`` of the steps since the last checkpoint,
   or
2. the step size was not halved at the last checkpoint and the best objective has not improved
   since then;

a halved run restarts from its best point. APGD-CE maximises the cross-entropy, APGD-T the targeted
DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` towards each of the classes ranked 2nd to
``n_target_classes + 1``-th by the clean logits, in turn. Both start at a random point of the
sphere (L2) or of the cube's surface (L-inf) of radius eps, as the authors' code does.

Every run is batched, per image, with no host-device synchronisation inside its steps; only images
still classified correctly are attacked again (restarts, further target classes). Conventions are
those of :mod:`robust.attacks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from robust._attack_core import (
    Forward,
    Generators,
    as_inputs,
    canonical_norm,
    check_ball,
    check_bool,
    check_eps,
    check_fraction,
    check_generators,
    draw,
    float_logits,
    into_ball,
    linf_bounds,
    margin,
    others_minus_true,
    prepared,
    project_l2,
    subset,
    unit_l2,
    view,
)
from robust.checks import SettingError, check_int

__all__ = ["DEFAULT_TARGET_CLASSES", "apgd", "apgd_checkpoints", "apgd_t", "check_target_classes"]

MOMENTUM = 0.75
"""Weight of the new gradient step against the previous update (``alpha`` of the paper)."""
DEFAULT_TARGET_CLASSES = 9
"""APGD-T's target classes in AutoAttack (at most ``C - 1`` are used when none are given)."""
MIN_CLASSES = 4
"""The DLR loss takes the 1st, 3rd and 4th largest logits."""


def check_target_classes(
    n_target_classes: int | None, num_classes: int, owner: str = "apgd_t"
) -> int:
    """The target classes APGD-T uses on a model of ``num_classes`` classes.

    ``None`` takes AutoAttack's 9, at most ``num_classes - 1``; a given number must be one of the
    other classes' counts, so an attack never runs fewer targets than its settings (and metric key)
    say.

    Args:
        n_target_classes: The setting (``None``: the default).
        num_classes: The model's output size.
        owner: Who owns the setting, named in the message.

    Raises:
        SettingError: For a model of fewer than 4 classes, or ``n_target_classes`` outside
            ``[1, num_classes - 1]``.

    Examples:
        >>> check_target_classes(None, 5), check_target_classes(3, 10)
        (4, 3)
        >>> try:
        ...     check_target_classes(50, 10, owner="AttackSpec")
        ... except SettingError as err:
        ...     print(str(err).split(" (")[0])
        AttackSpec n_target_classes must be an integer in [1, 9] for a model of 10 classes
    """
    if num_classes < MIN_CLASSES:
        raise SettingError(
            f"{owner} needs at least {MIN_CLASSES} classes for the DLR loss of APGD-T; "
            f"the model has {num_classes}"
        )
    if n_target_classes is None:
        return min(DEFAULT_TARGET_CLASSES, num_classes - 1)
    if not 1 <= n_target_classes <= num_classes - 1:
        raise SettingError(
            f"{owner} n_target_classes must be an integer in [1, {num_classes - 1}] for a model "
            f"of {num_classes} classes (APGD-T targets the other classes); got {n_target_classes}"
        )
    return n_target_classes


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which the step size may be halved: the authors' whole-number windows.

    The first window is ``max(int(0.22 N), 1)`` iterations, each next one ``max(int(0.03 N), 1)``
    shorter, down to ``max(int(0.06 N), 1)``, as in fra31/auto-attack's ``autopgd_base.py`` (and
    torchattacks'). At N = 100 these are the paper's ``w_j = ceil(p_j N)`` (``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``); at other N that formula checks less
    often (N = 10: 3, 5, 6, ... against 2, 3, 4, ...), and its short runs fooled fewer images.

    Args:
        steps: Number of iterations ``N``.

    Returns:
        Increasing iteration counts in ``[1, steps]``.

    Examples:
        >>> apgd_checkpoints(100)
        [22, 41, 57, 70, 80, 87, 93, 99]
        >>> apgd_checkpoints(10)
        [2, 3, 4, 5, 6, 7, 8, 9, 10]
    """
    steps = check_int("steps", steps, minimum=1, owner="apgd_checkpoints")
    window, shortest, shrink = (max(int(share * steps), 1) for share in (0.22, 0.06, 0.03))
    points = [window]
    while points[-1] + max(window - shrink, shortest) <= steps:
        window = max(window - shrink, shortest)
        points.append(points[-1] + window)
    return points


def _checked(
    owner: str, eps: float, norm: str | float, steps: int, restarts: int, rho: float
) -> tuple[float, str, int, int, float]:
    eps, norm = check_eps(eps, owner), canonical_norm(norm, owner)
    check_ball(eps, norm, owner)
    return (
        eps,
        norm,
        check_int("steps", steps, minimum=1, owner=owner),
        check_int("restarts", restarts, minimum=1, owner=owner),
        check_fraction("rho", rho, owner),
    )


def apgd(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str | float,
    *,
    steps: int = 100,
    restarts: int = 1,
    rho: float = 0.75,
    random_start: bool = True,
    generator: Generators = None,
    channels_last: bool | None = None,
) -> Tensor:
    r"""APGD-CE: Auto-PGD on the cross-entropy (Croce & Hein 2020, Algorithm 1).

    'Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks' [https://arxiv.org/abs/2003.01690]. Step size, momentum and checkpoints are those of
    the paper (see :mod:`robust.apgd`); the step direction is that of the cross-entropy, taken from
    ``LSE_{j != y} z_j - z_y`` so that very confident images keep an exact gradient. Images that
    the model already misclassifies are returned unchanged; each restart attacks only the images
    not yet misclassified. Per image the result is the last misclassified iterate found, else the
    iterate of highest cross-entropy over all restarts.

    Distance Measure: L2 or Linf.

    Shape:
        - x: :math:`(B, ...)` in [0, 1].
        - y: :math:`(B,)` int64 labels.
        - output: :math:`(B, ...)`, same dtype/device as ``x``, detached.

    Args:
        model: Classifier returning ``(B, C)`` logits.
        x: Clean inputs.
        y: True labels.
        eps: Radius of the ball (>= 0; 0 returns ``x``).
        norm: ``"2"`` or ``"inf"`` (aliases accepted).
        steps: Iterations per run ``N`` (>= 1; 100 in AutoAttack).
        restarts: Runs from independent random starts (>= 1).
        rho: Fraction of increasing steps below which the step size is halved (0.75).
        random_start: Start at a random point at distance eps (else at ``x``).
        generator: RNG for the random starts, or one per sample.
        channels_last: Run the model with channels-last weights (a private copy); default on for
            float32 images on CPUs. The same attack up to float rounding.

    Returns:
        Adversarial inputs in [0, 1] with ``||x_adv - x||_norm <= eps``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
        >>> x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
        >>> x_adv = apgd(model, x, y, 0.1, "inf", steps=10, generator=torch.Generator().manual_seed(0))
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6) and x_adv.shape == x.shape
        True
    """
    eps, norm, steps, restarts, rho = _checked("apgd", eps, norm, steps, restarts, rho)
    random_start = check_bool("random_start", random_start, owner="apgd")
    check_generators(generator, len(x))
    if eps == 0:
        return x.detach().clone()
    with prepared(model, x, channels_last) as forward:
        x, y = as_inputs(x, y)
        return run_apgd_ce(forward, x, y, eps, norm, steps, restarts, rho, random_start, generator)


def apgd_t(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str | float,
    *,
    steps: int = 100,
    restarts: int = 1,
    n_target_classes: int | None = None,
    rho: float = 0.75,
    random_start: bool = True,
    generator: Generators = None,
    channels_last: bool | None = None,
) -> Tensor:
    r"""APGD-T: Auto-PGD on the targeted DLR loss, over the top target classes (Croce & Hein 2020).

    'Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
    attacks' [https://arxiv.org/abs/2003.01690], Sec. 4 and 5: for ``k = 2, ...,
    n_target_classes + 1`` the target ``t`` is the class with the k-th largest clean logit, and
    APGD (see :func:`apgd`) maximises
    :math:`\mathrm{DLR}_t(z) = -\frac{z_y - z_t}{z_{\pi_1} - (z_{\pi_3} + z_{\pi_4})/2}`
    (``pi`` sorts the logits in decreasing order) on the images not yet misclassified. The step
    direction is the DLR gradient; the attack is untargeted in its goal: any misclassification
    counts. Per image the result is the last misclassified iterate found, else the iterate of
    smallest margin ``z_y - max_{j != y} z_j`` over all runs. Needs at least 4 classes.

    Distance Measure: L2 or Linf.

    Shape:
        - x: :math:`(B, ...)` in [0, 1].
        - y: :math:`(B,)` int64 labels.
        - output: :math:`(B, ...)`, same dtype/device as ``x``, detached.

    Args:
        model: Classifier returning ``(B, C)`` logits, ``C >= 4``.
        x: Clean inputs.
        y: True labels.
        eps: Radius of the ball (>= 0; 0 returns ``x``).
        norm: ``"2"`` or ``"inf"`` (aliases accepted).
        steps: Iterations per run (>= 1; 100 in AutoAttack).
        restarts: Runs per target class (>= 1).
        n_target_classes: Number of target classes, in ``[1, C - 1]``; None: 9 as in AutoAttack,
            at most ``C - 1``.
        rho: Fraction of increasing steps below which the step size is halved (0.75).
        random_start: Start at a random point at distance eps (else at ``x``).
        generator: RNG for the random starts, or one per sample.
        channels_last: Run the model with channels-last weights (a private copy); default on for
            float32 images on CPUs.

    Returns:
        Adversarial inputs in [0, 1] with ``||x_adv - x||_norm <= eps``.

    Raises:
        SettingError: For a bad setting; when the model's output shows fewer than 4 classes or
            fewer than ``n_target_classes + 1``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
        >>> x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
        >>> x_adv = apgd_t(model, x, y, 0.5, "2", steps=5, n_target_classes=2)
        >>> bool((x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-6)
        True
    """
    eps, norm, steps, restarts, rho = _checked("apgd_t", eps, norm, steps, restarts, rho)
    if n_target_classes is not None:
        n_target_classes = check_int(
            "n_target_classes", n_target_classes, minimum=1, owner="apgd_t"
        )
    random_start = check_bool("random_start", random_start, owner="apgd_t")
    check_generators(generator, len(x))
    if eps == 0:
        return x.detach().clone()
    with prepared(model, x, channels_last) as forward:
        x, y = as_inputs(x, y)
        return run_apgd_t(
            forward,
            x,
            y,
            eps,
            norm,
            steps,
            restarts,
            n_target_classes,
            rho,
            random_start,
            generator,
            strict=True,
        )


# ------------------------------------------------------------------------------------ drivers


def run_apgd_ce(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str,
    steps: int,
    restarts: int,
    rho: float,
    random_start: bool,
    generator: Generators,
) -> Tensor:
    """APGD-CE inside :func:`~robust._attack_core.prepared` (validated settings, eps > 0)."""
    with torch.no_grad():
        logits = float_logits(forward(x))
    robust = logits.argmax(dim=1) == y
    x_adv = x.clone()
    best = torch.full((len(x),), -math.inf, dtype=logits.dtype, device=x.device)
    for _ in range(restarts):
        index = robust.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        gens = subset(generator, index.tolist())
        result = _Apgd(forward, x[index], y[index], eps, norm, steps, rho, _ce_objective)(
            _start(x[index], eps, norm, random_start, gens)
        )
        fooled = result.fooled
        # a fooled image takes its adversarial point; the others their highest-loss point
        take = fooled | (result.loss_best > best[index])
        point = torch.where(view(fooled, result.x_best), result.x_found, result.x_best)
        x_adv[index] = torch.where(view(take, point), point, x_adv[index])
        best[index] = torch.where(take, result.loss_best, best[index])
        robust[index] = ~fooled
    return into_ball(x, x_adv, eps, norm)


def run_apgd_t(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str,
    steps: int,
    restarts: int,
    n_target_classes: int | None,
    rho: float,
    random_start: bool,
    generator: Generators,
    *,
    strict: bool = False,
) -> Tensor:
    """APGD-T inside :func:`~robust._attack_core.prepared` (validated settings, eps > 0).

    ``strict``: refuse ``n_target_classes > C - 1`` (:func:`check_target_classes`); else (AutoAttack's
    resolved default) at most ``C - 1`` target classes are used.
    """
    with torch.no_grad():
        logits = forward(x)
    classes = logits.shape[1]
    if not strict and n_target_classes is not None:
        n_target_classes = min(n_target_classes, max(classes - 1, 1))
    n_target_classes = check_target_classes(n_target_classes, classes)
    ranking = logits.argsort(dim=1, descending=True)
    robust = logits.argmax(dim=1) == y
    x_adv = x.clone()
    best = torch.full((len(x),), math.inf, dtype=float_logits(logits).dtype, device=x.device)
    for k in range(1, n_target_classes + 1):
        for _ in range(restarts):
            index = robust.nonzero().squeeze(1)
            if index.numel() == 0:
                return into_ball(x, x_adv, eps, norm)
            gens = subset(generator, index.tolist())
            x_i, y_i = x[index], y[index]
            labels = torch.stack([y_i, ranking[index, k]], dim=1)
            result = _Apgd(
                forward, x_i, y_i, eps, norm, steps, rho, _dlr_targeted_objective, labels
            )(_start(x_i, eps, norm, random_start, gens))
            with torch.no_grad():
                gap = margin(forward(result.x_best), y_i)
            fooled = result.fooled
            take = fooled | (gap < best[index])
            point = torch.where(view(fooled, result.x_best), result.x_found, result.x_best)
            x_adv[index] = torch.where(view(take, point), point, x_adv[index])
            best[index] = torch.where(fooled, -math.inf, torch.minimum(gap, best[index]))
            robust[index] = ~fooled
    return into_ball(x, x_adv, eps, norm)


def _start(x: Tensor, eps: float, norm: str, random_start: bool, generator: Generators) -> Tensor:
    """AutoAttack's start: ``x`` plus eps times a random direction normalised in the attack's norm.

    L-inf: ``t ~ U[-1, 1]^d`` scaled to ``||t||_inf = 1`` (a point of the cube's surface); L2:
    a Gaussian direction on the sphere. Clipped to [0, 1].
    """
    if not random_start:
        return x.clone()
    if norm == "inf":
        t = draw(generator, len(x), x.shape[1:], x).mul_(2.0).sub_(1.0)
        scale = t.flatten(1).abs().amax(dim=1).clamp_min_(torch.finfo(t.dtype).tiny)
    else:
        t = draw(generator, len(x), x.shape[1:], x, kind="randn")
        scale = torch.linalg.vector_norm(t.flatten(1), dim=1).clamp_min_(torch.finfo(t.dtype).tiny)
    return into_ball(x, t.mul_(view(eps / scale, t)).add_(x).clamp_(0.0, 1.0), eps, norm)


# --------------------------------------------------------------------------------- objectives


def _ce_objective(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy values (B,) and the summed loss whose gradient gives the step direction."""
    step = others_minus_true(float_logits(logits), y)
    return torch.nn.functional.softplus(step.detach()), step.sum()


def _dlr_targeted_objective(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Targeted DLR values for ``labels = [y, target]`` (B, 2), and the loss for the gradient.

    The loss sums each sample's DLR times its detached denominator: a positive factor, so the
    direction is unchanged, that makes every sample's logit gradient O(1) whatever the scale of
    the logits.
    """
    logits = float_logits(logits)
    top = logits.topk(4, dim=1).values
    scale = top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12
    pair = logits.gather(1, labels)
    value = (pair[:, 1] - pair[:, 0]) / scale
    return value.detach(), (value * scale.detach()).sum()


class _Result:
    """One APGD run: best point and value, whether misclassified, last misclassified iterate."""

    def __init__(self, x_best: Tensor, loss_best: Tensor, fooled: Tensor, x_found: Tensor) -> None:
        self.x_best, self.loss_best, self.fooled, self.x_found = x_best, loss_best, fooled, x_found


class _Apgd:
    """One APGD run of ``steps`` iterations on a batch, every decision per image on the device."""

    def __init__(
        self,
        forward: Forward,
        x: Tensor,
        y: Tensor,
        eps: float,
        norm: str,
        steps: int,
        rho: float,
        objective: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
        labels: Tensor | None = None,
    ) -> None:
        self.forward, self.x, self.y, self.eps, self.norm = forward, x, y, eps, norm
        self.steps, self.rho, self.objective = steps, rho, objective
        self.labels = y if labels is None else labels  # what the objective gets, sliced with x
        self.checkpoints = apgd_checkpoints(steps)
        if norm == "inf":
            self.lo, self.hi = linf_bounds(x, eps)  # rounded inwards in bf16/fp16

    def evaluate(self, x_adv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Objective values (B,), input gradient and predicted classes at ``x_adv``."""
        value, grad, logits = self.forward.gradient(x_adv, self.labels, self.objective)
        return value, grad, logits.argmax(dim=1)

    def project(self, x_adv: Tensor) -> Tensor:
        """Onto the eps-ball around ``x`` and [0, 1] (in place)."""
        if self.norm == "inf":
            return x_adv.clamp_(self.lo, self.hi)
        return project_l2(self.x, x_adv, self.eps)

    def ascent(self, x_adv: Tensor, grad: Tensor, step: Tensor) -> Tensor:
        """``z = P(x_adv + step * s(grad))`` with ``s`` the sign (L-inf) or unit L2 direction."""
        direction = grad.sign() if self.norm == "inf" else unit_l2(grad)
        return self.project(direction.mul_(view(step, grad)).add_(x_adv))

    def __call__(self, x_adv: Tensor) -> _Result:
        y, steps = self.y, self.steps
        value, grad, predicted = self.evaluate(x_adv)
        with torch.no_grad():
            fooled = predicted != y
            x_found = x_adv.clone()
            x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), value.clone()
            step = torch.full_like(value, 2.0 * self.eps)
            increases = torch.zeros_like(value)
            previous = value
            best_at_check = value.clone()
            halved_at_check = torch.zeros_like(fooled)
            x_old = x_adv
            last_check, checkpoints = 0, set(self.checkpoints)
        for i in range(steps):
            with torch.no_grad():
                z = self.ascent(x_adv, grad, step)
                if i == 0:
                    x_new = z
                else:  # x + a (z - x) + (1 - a) (x - x_old)
                    x_new = z.sub_(x_adv).mul_(MOMENTUM)
                    x_new.add_(x_adv - x_old, alpha=1.0 - MOMENTUM).add_(x_adv)
                    x_new = self.project(x_new)
                x_old, x_adv = x_adv, x_new
            value, grad, predicted = self.evaluate(x_adv)
            with torch.no_grad():
                miscl = predicted != y
                x_found = torch.where(view(miscl, x_adv), x_adv, x_found)
                fooled |= miscl
                increases += value > previous
                previous = value
                better = value > loss_best
                x_best = torch.where(view(better, x_adv), x_adv, x_best)
                grad_best = torch.where(view(better, grad), grad, grad_best)
                loss_best = torch.where(better, value, loss_best)
                if i + 1 in checkpoints:
                    window = i + 1 - last_check
                    last_check = i + 1
                    halve = increases < self.rho * window
                    halve |= ~halved_at_check & (loss_best <= best_at_check)
                    step = torch.where(halve, 0.5 * step, step)
                    x_adv = torch.where(view(halve, x_adv), x_best, x_adv)
                    grad = torch.where(view(halve, grad), grad_best, grad)
                    halved_at_check = halve
                    best_at_check = loss_best.clone()
                    increases.zero_()
        return _Result(x_best, loss_best, fooled, x_found)
