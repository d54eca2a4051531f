"""Attacks in pixel space [0, 1]: FGM (FGSM), PGD, APGD-CE, APGD-T, Square and AutoAttack.

Plain PyTorch, batched, with no host-device synchronisation inside an attack's steps. Conventions
shared by every attack here (and by :mod:`robust.apgd`, :mod:`robust.square`,
:mod:`robust.autoattack`, whose functions this module re-exports):

* ``x`` is a float batch ``(B, ...)`` in ``[0, 1]`` (the model normalises internally); ``y`` holds
  int64 labels ``(B,)``; the result has the dtype, device and shape of ``x``, is detached and
  clipped to ``[0, 1]``. ``eps = 0`` returns ``x`` unchanged (no attack).
* Gradient steps follow the cross-entropy's direction, computed from logits promoted to at least
  float32 as the gradient of ``LSE_{j != y}(z_j) - z_y`` (the same direction without the
  cancellation of ``softmax - onehot`` when ``p_y`` rounds to 1): each sample's logit gradient is
  O(1), independent of the batch size, and does not underflow under bf16/fp16 autocast. Gradients
  are taken w.r.t. the input only (``torch.autograd.grad``), so parameter ``.grad`` fields are
  never touched.
* The model runs in eval mode during the attack; each submodule's previous mode is restored after.
  On CPUs, float32 images go through a channels-last copy of the model's 4-D weights, in slices
  of as many images as keep the largest activation on the heap (``channels_last=None``; about
  1.5x faster for a LeNet, the same attack up to float rounding); the caller's model is never
  changed.
* Safe inside ``torch.inference_mode()`` (e.g. Lightning's test loop): the attack runs under
  ``torch.inference_mode(False)`` and ``torch.enable_grad()`` on fresh iterates and cloned labels.
* Random choices come from ``generator``: one ``torch.Generator`` for the batch, one per image
  (then image ``i``'s result depends on ``generator[i]`` alone, not on the batch it is in), or
  None for the global RNG. Restarts keep each image's worst case.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robust._attack_core import (
    NORMS,
    Forward,
    Generators,
    as_inputs,
    canonical_norm,
    check_ball,
    check_eps,
    check_generators,
    cross_entropy,
    into_ball,
    linf_bounds,
    norm2,
    norm2_wide,
    others_minus_true,
    prepared,
    project_l2,
    view,
)
from robust.apgd import apgd, apgd_checkpoints, apgd_t, check_target_classes
from robust.autoattack import STAGES, autoattack
from robust.checks import SettingError, check_int, check_real
from robust.modes import eval_mode
from robust.square import square, square_p

__all__ = [
    "METHODS",
    "NORMS",
    "STAGES",
    "AttackSpec",
    "Generators",
    "apgd",
    "apgd_checkpoints",
    "apgd_t",
    "attack",
    "autoattack",
    "fgm",
    "pgd",
    "square",
    "square_p",
]

METHODS = ("fgm", "pgd", "apgd-ce", "apgd-t", "square", "autoattack")

# Settings each method takes besides method, norm, eps, restarts and name (None means "default").
_SETTINGS = {
    "fgm": ("steps", "step_size", "random_start", "targeted"),
    "pgd": ("steps", "step_size", "random_start", "targeted"),
    "apgd-ce": ("steps", "random_start", "rho"),
    "apgd-t": ("steps", "random_start", "rho", "n_target_classes"),
    "square": ("random_start", "n_queries", "p_init"),
    "autoattack": ("steps", "random_start", "rho", "n_target_classes", "n_queries", "p_init"),
}
_DEFAULT_STEPS = {
    "fgm": 1,
    "pgd": 40,
    "apgd-ce": 100,
    "apgd-t": 100,
    "square": 0,
    "autoattack": 100,
}
_DEFAULTS = {"n_target_classes": 9, "n_queries": 5000, "p_init": 0.8, "rho": 0.75}


@dataclass(frozen=True)
class AttackSpec:
    """Configuration of one attack, e.g. from YAML via jsonargparse.

    ``None`` fields take method-dependent defaults, exposed as the ``resolved_*`` properties (kept
    as properties, not rewritten fields, so ``dataclasses.replace(spec, eps=...)`` re-derives them):

    * ``fgm``: 1 step of size ``eps``; with ``random_start`` the step is ``1.25 * eps`` (Wong, Rice
      & Kolter 2020, "Fast is better than free", Alg. 3).
    * ``pgd``: 40 steps of size ``2.5 * eps / steps`` from a random start (Madry et al. 2018,
      Sec. 2 and their released code).
    * ``apgd-ce``, ``apgd-t``: 100 iterations, ``rho = 0.75``, random start; ``apgd-t`` over
      ``n_target_classes = 9`` target classes (Croce & Hein 2020; :mod:`robust.apgd`).
    * ``square``: ``n_queries = 5000``, ``p_init = 0.8`` (Andriushchenko et al. 2020;
      :mod:`robust.square`).
    * ``autoattack``: APGD-CE, APGD-T and Square with the settings above, the standard version of
      Croce & Hein 2020 without FAB-T (:mod:`robust.autoattack`).

    The same ``eps`` conventions hold for every method: the radius in pixel units of the L2 or
    L-inf ball (e.g. 0.3 L-inf or 2.0 L2 on MNIST, 8/255 L-inf or 0.5 L2 on CIFAR-10).

    Attributes:
        method: One of "fgm" (FGSM for the L-inf norm), "pgd", "apgd-ce", "apgd-t", "square",
            "autoattack" (underscores work too: "apgd_ce").
        norm: "2" or "inf" (also 2, .inf, "l2", "linf", "Linf", ...; stored as "2" or "inf").
        eps: Radius of the perturbation ball, in [0, 1] pixel units; 0 means no attack.
        steps: Gradient steps (fgm: 1; pgd, apgd-*, autoattack: >= 1; not for square).
        step_size: Step length per iteration of fgm and pgd (L2: Euclidean length; L-inf:
            per-pixel change); APGD chooses its own.
        random_start: fgm, pgd, apgd-*: start at a random point of the eps-ball (APGD: at distance
            eps) instead of at ``x``. square and autoattack are random by construction (True).
        restarts: Independent runs; the worst case per image is kept (needs random_start).
            apgd-t: runs per target class; autoattack: runs of each of its attacks.
        targeted: fgm, pgd: ``y`` holds target labels and the attack minimises their loss.
        name: Metric key; default derived from the settings (see ``key``).
        n_target_classes: apgd-t, autoattack: target classes of APGD-T, at most ``C - 1`` for a
            model of ``C`` classes (refused otherwise: :meth:`check_num_classes`); default 9, at
            most ``C - 1`` used.
        n_queries: square, autoattack: query budget per image and run of Square (default 5000).
        p_init: square, autoattack: initial fraction of pixels of Square's windows (default 0.8).
        rho: apgd-*, autoattack: APGD's step-size halving threshold (default 0.75).

    Raises:
        SettingError: On construction, one line naming the first invalid setting and its allowed
            values (an unknown method or norm, ``eps < 0``, ``steps < 1``, ``n_queries < 1``, a
            setting the method does not take, ...).

    Examples:
        >>> AttackSpec(method="pgd", norm="Linf", eps=0.3).key
        'pgd40_linf_eps0.3'
        >>> spec = AttackSpec(method="autoattack", norm="inf", eps=0.3)
        >>> spec.key, spec.resolved_steps, spec.resolved_n_queries
        ('autoattack_linf_eps0.3', 100, 5000)
        >>> AttackSpec(method="square", norm=2, eps=2.0, n_queries=1000).key
        'square_l2_eps2_q1000'
        >>> AttackSpec(method="square", n_queries=0)
        Traceback (most recent call last):
            ...
        robust.checks.SettingError: AttackSpec n_queries must be an integer >= 1; got 0
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
    n_target_classes: int | None = None
    n_queries: int | None = None
    p_init: float | None = None
    rho: float | None = None

    def __post_init__(self) -> None:
        """Canonicalise ``method``/``norm``; raise one SettingError naming a bad setting."""
        owner = "AttackSpec"
        method = str(self.method).strip().lower().replace("_", "-")
        if method not in METHODS:
            listed = ", ".join(repr(m) for m in METHODS)
            raise SettingError(f"{owner} method must be one of {listed}; got {self.method!r}")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "norm", canonical_norm(self.norm, owner))
        check_eps(self.eps, owner)
        check_ball(self.eps, self.norm, owner)
        takes = _SETTINGS[method]
        for setting in ("steps", "step_size", "random_start", "n_target_classes", "n_queries"):
            value = getattr(self, setting)
            if value is not None and setting not in takes:
                users = ", ".join(repr(m) for m, s in _SETTINGS.items() if setting in s)
                raise SettingError(
                    f"{owner} {setting} applies to method {users} only; got {setting}={value!r} "
                    f"with method {method!r} (leave it None)"
                )
        for setting in ("p_init", "rho"):
            value = getattr(self, setting)
            if value is not None and setting not in takes:
                users = ", ".join(repr(m) for m, s in _SETTINGS.items() if setting in s)
                raise SettingError(
                    f"{owner} {setting} applies to method {users} only; got {setting}={value!r} "
                    f"with method {method!r} (leave it None)"
                )
        if self.targeted is not False and "targeted" not in takes:
            raise SettingError(
                f"{owner} targeted applies to method 'fgm', 'pgd' only; got targeted="
                f"{self.targeted!r} with method {method!r} (apgd-t is untargeted in its goal)"
            )
        if method == "fgm" and self.steps not in (None, 1):
            raise SettingError(
                f"{owner} steps must be 1 (or None) for method 'fgm'; got {self.steps!r}"
            )
        if self.steps is not None:
            check_int("steps", self.steps, minimum=1, owner=owner)
        if self.step_size is not None:
            check_real("step_size", self.step_size, low=0, owner=owner)
        if self.random_start not in (None, True, False):
            raise SettingError(
                f"{owner} random_start must be None, True or False; got {self.random_start!r}"
            )
        if method in ("square", "autoattack") and self.random_start is False:
            raise SettingError(
                f"{owner} random_start must be None or True for method {method!r} (it is random "
                "by construction); got False"
            )
        check_int("restarts", self.restarts, minimum=1, owner=owner)
        if self.restarts > 1 and not self.resolved_random_start:
            raise SettingError(
                f"{owner} restarts must be 1 when random_start is False (every run would start "
                f"at x and be identical); got restarts={self.restarts}"
            )
        if self.targeted not in (True, False):
            raise SettingError(f"{owner} targeted must be True or False; got {self.targeted!r}")
        if self.n_target_classes is not None:
            check_int("n_target_classes", self.n_target_classes, minimum=1, owner=owner)
        if self.n_queries is not None:
            check_int("n_queries", self.n_queries, minimum=1, owner=owner)
        for setting in ("p_init", "rho"):
            value = getattr(self, setting)
            if value is not None:
                check_real(setting, value, low=0, high=1, high_inclusive=True, owner=owner)
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise SettingError(
                f"{owner} name must be a non-empty string or None (derived from the settings); "
                f"got {self.name!r}"
            )

    def check_num_classes(self, num_classes: int, owner: str = "AttackSpec") -> None:
        """Refuse settings a model of ``num_classes`` classes cannot honour.

        APGD-T (``apgd-t``, ``autoattack``) needs at least 4 classes, and a given
        ``n_target_classes`` must be in ``[1, num_classes - 1]``: fewer targets than the setting
        (and the metric key, ``t<n>``) say would be run. The default (None) uses at most
        ``num_classes - 1``. Other methods take any number of classes.

        Args:
            num_classes: The model's output size.
            owner: Who owns the spec, named in the message (e.g. ``PerturbedAccuracy attack <key>``).

        Raises:
            SettingError: Naming the setting and the allowed range.

        Examples:
            >>> AttackSpec("apgd-t", "inf", 0.3, n_target_classes=5).check_num_classes(10)
            >>> AttackSpec("apgd-t", "inf", 0.3, n_target_classes=50).check_num_classes(10)
            Traceback (most recent call last):
                ...
            robust.checks.SettingError: AttackSpec n_target_classes must be an integer in [1, 9] \
for a model of 10 classes (APGD-T targets the other classes); got 50
        """
        if self.method in ("apgd-t", "autoattack"):
            check_target_classes(self.n_target_classes, num_classes, owner)

    @property
    def resolved_steps(self) -> int:
        """Gradient steps: ``steps`` or the method default (fgm 1, pgd 40, apgd-*/autoattack 100).

        square takes no gradient steps: 0.
        """
        if self.steps is not None:
            return self.steps
        return _DEFAULT_STEPS[self.method]

    @property
    def resolved_random_start(self) -> bool:
        """Whether the attack draws random numbers (default: fgm False, every other method True).

        When True, pass one generator per image for results that do not depend on the batch.
        """
        if self.random_start is not None:
            return self.random_start
        return self.method != "fgm"

    @property
    def resolved_step_size(self) -> float | None:
        """Step length of fgm/pgd (see class docstring); APGD's initial ``2 * eps``; square None."""
        if self.step_size is not None:
            return self.step_size
        if self.method in ("fgm", "pgd"):
            return _default_step_size(
                self.method, self.eps, self.resolved_steps, self.resolved_random_start
            )
        return None if self.method == "square" else 2.0 * self.eps

    @property
    def resolved_n_target_classes(self) -> int | None:
        """APGD-T's target classes (default 9), or None for methods without APGD-T."""
        return self._resolved("n_target_classes")

    @property
    def resolved_n_queries(self) -> int | None:
        """Square's query budget (default 5000), or None for methods without Square."""
        return self._resolved("n_queries")

    @property
    def resolved_p_init(self) -> float | None:
        """Square's initial window fraction (default 0.8), or None for methods without Square."""
        return self._resolved("p_init")

    @property
    def resolved_rho(self) -> float | None:
        """APGD's halving threshold (default 0.75), or None for methods without APGD."""
        return self._resolved("rho")

    def _resolved(self, setting: str):
        if setting not in _SETTINGS[self.method]:
            return None
        value = getattr(self, setting)
        return _DEFAULTS[setting] if value is None else value

    @property
    def key(self) -> str:
        """Metric key: ``name``, else derived from the settings.

        E.g. ``fgm_l2_eps5``, ``pgd40_linf_eps0.3``, ``apgd-ce_linf_eps0.3``, ``square_l2_eps2``,
        ``autoattack_linf_eps0.3``. Non-default choices add suffixes: ``rand`` (fgm with random
        start), ``norand`` (pgd or apgd without), ``r<restarts>``, ``tgt`` (targeted),
        ``t<n_target_classes>``, ``q<n_queries>``, ``p<p_init>``, ``rho<rho>``, ``a<step_size>``
        (fgm or pgd with a step other than the default); APGD's and AutoAttack's steps follow
        the method name when not 100 (``apgd-ce50``), e.g. ``pgd10_l2_eps1_r5``. Numbers are
        written as ``:g`` where that is exact, else in full (``eps0.03137254901960784`` for 8/255),
        so different settings never share a key.
        """
        if self.name is not None:
            return self.name
        method = self.method
        if method == "pgd" or (method != "fgm" and self.resolved_steps != _DEFAULT_STEPS[method]):
            method = f"{method}{self.resolved_steps}"
        parts = [method, f"l{self.norm}", f"eps{_exact(self.eps)}"]
        if self.resolved_random_start != (self.method != "fgm"):
            parts.append("rand" if self.resolved_random_start else "norand")
        if self.restarts > 1:
            parts.append(f"r{self.restarts}")
        if self.targeted:
            parts.append("tgt")
        for setting, letter in (("n_target_classes", "t"), ("n_queries", "q"), ("p_init", "p")):
            value = self._resolved(setting)
            if value is not None and value != _DEFAULTS[setting]:
                parts.append(f"{letter}{_exact(value)}")
        rho = self.resolved_rho
        if rho is not None and rho != _DEFAULTS["rho"]:
            parts.append(f"rho{_exact(rho)}")
        if self.step_size is not None and "step_size" in _SETTINGS[self.method]:
            default = _default_step_size(
                self.method, self.eps, self.resolved_steps, self.resolved_random_start
            )
            if not math.isclose(self.step_size, default, rel_tol=1e-12):
                parts.append(f"a{_exact(self.step_size)}")
        return "_".join(parts)


def _exact(value: float) -> str:
    """``value`` as ``:g`` where that reads back as the same number, else in full.

    Examples:
        >>> _exact(0.3), _exact(5.0), _exact(8 / 255), _exact(1234567)
        ('0.3', '5', '0.03137254901960784', '1234567')
    """
    if isinstance(value, int):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


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
    *,
    stages: dict[str, Tensor] | None = None,
    channels_last: bool | None = None,
) -> Tensor:
    """Run the attack described by ``spec``.

    See :func:`fgm`, :func:`pgd`, :func:`apgd`, :func:`apgd_t`, :func:`square` and
    :func:`autoattack` for the semantics.

    Args:
        model: Classifier mapping ``(B, ...)`` inputs in [0, 1] to ``(B, C)`` logits.
        x: Clean inputs of shape ``(B, ...)`` in [0, 1].
        y: Labels ``(B,)``; target labels if ``spec.targeted``.
        spec: Attack configuration; ``eps == 0`` returns ``x`` unchanged.
        generator: RNG for the random choices (on ``x``'s device), or one per sample; needed for
            reproducible results whenever ``spec.resolved_random_start``.
        stages: If given, filled with boolean masks ``(B,)``: ``"clean"`` (correct on ``x``), then
            for autoattack ``"apgd-ce"``, ``"apgd-t"``, ``"square"`` (still robust after each of its
            attacks), for other methods ``spec.method`` (correct on the result). For targeted
            attacks the masks say whether the prediction equals ``y``.
        channels_last: Run the model with channels-last weights (a private copy); default on for
            float32 images on CPUs.

    Returns:
        Adversarial inputs, detached, same shape/dtype/device as ``x``.

    Raises:
        SettingError: For APGD-T (``apgd-t``, ``autoattack``) on a model of fewer than 4 classes
            or of fewer than ``n_target_classes + 1`` (:meth:`AttackSpec.check_num_classes`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 2])
        >>> spec = AttackSpec(method="pgd", norm="inf", eps=0.1, steps=5)
        >>> x_adv = attack(model, x, y, spec, generator=torch.Generator().manual_seed(0))
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
        >>> torch.equal(attack(model, x, y, AttackSpec(method="apgd-ce", eps=0)), x)
        True
    """
    if not isinstance(spec, AttackSpec):
        raise TypeError(f"spec must be an AttackSpec; got {type(spec).__name__}")
    check_generators(generator, len(x))
    method, eps, norm = spec.method, spec.eps, spec.norm
    check_ball(eps, norm, "AttackSpec", x)
    if method in ("apgd-t", "autoattack") and eps > 0 and len(x):
        spec.check_num_classes(_num_classes(model, x[:1]))
    if method == "autoattack":
        return autoattack(
            model,
            x,
            y,
            eps,
            norm,
            steps=spec.resolved_steps,
            restarts=spec.restarts,
            n_target_classes=spec.n_target_classes,  # None: 9, at most C - 1
            n_queries=spec.resolved_n_queries,
            p_init=spec.resolved_p_init,
            rho=spec.resolved_rho,
            generator=generator,
            stages=stages,
            channels_last=channels_last,
        )
    if stages is not None:
        stages["clean"] = _correct(model, x, y)
    if eps == 0:
        x_adv = x.detach().clone()
    elif method in ("fgm", "pgd"):
        common = {
            "step_size": spec.resolved_step_size,
            "random_start": spec.resolved_random_start,
            "targeted": spec.targeted,
            "generator": generator,
            "channels_last": channels_last,
        }
        if method == "fgm" and spec.restarts == 1:
            x_adv = fgm(model, x, y, eps, norm, **common)
        else:  # fgm with restarts is pgd with one step
            x_adv = pgd(
                model, x, y, eps, norm, steps=spec.resolved_steps, restarts=spec.restarts, **common
            )
    elif method == "square":
        x_adv = square(
            model,
            x,
            y,
            eps,
            norm,
            n_queries=spec.resolved_n_queries,
            p_init=spec.resolved_p_init,
            restarts=spec.restarts,
            generator=generator,
            channels_last=channels_last,
        )
    else:
        apgd_kwargs = {
            "steps": spec.resolved_steps,
            "restarts": spec.restarts,
            "rho": spec.resolved_rho,
            "random_start": spec.resolved_random_start,
            "generator": generator,
            "channels_last": channels_last,
        }
        if method == "apgd-ce":
            x_adv = apgd(model, x, y, eps, norm, **apgd_kwargs)
        else:
            x_adv = apgd_t(
                model,
                x,
                y,
                eps,
                norm,
                n_target_classes=spec.n_target_classes,  # None: at most C - 1 of the default
                **apgd_kwargs,
            )
    if stages is not None:
        # untargeted: still correct (and correct to begin with); targeted: the target is hit
        hit = _correct(model, x_adv, y)
        stages[method] = hit if spec.targeted else hit & stages["clean"]
    return x_adv


def _num_classes(model: Callable[[Tensor], Tensor], x: Tensor) -> int:
    """The model's output size, from one forward pass (in eval mode) of ``x``."""
    mode = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with mode, torch.no_grad():
        return int(model(x).shape[-1])


def _correct(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Whether the model (in eval mode) predicts ``y`` on ``x``: bool ``(B,)``."""
    mode = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with mode, torch.no_grad():
        return model(x).argmax(dim=1) == y


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
    channels_last: bool | None = None,
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
        eps: Radius of the ball (>= 0; 0 returns ``x``).
        norm: ``"2"`` or ``"inf"`` (aliases accepted).
        step_size: Step length; default ``eps`` (``1.25 * eps`` with a random start).
        random_start: Start uniformly inside the ball.
        targeted: Minimise the loss of ``y`` instead of maximising it.
        generator: RNG for the random start, or one per sample.
        channels_last: Run the model with channels-last weights (a private copy); default on for
            float32 images on CPUs.

    Returns:
        Adversarial inputs in [0, 1] with ``||x_adv - x||_norm <= eps`` (bf16 or fp16 inputs too:
        coordinates that rounding took outside move back, :func:`~robust._attack_core.into_ball`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> x, y = torch.full((1, 1, 2, 2), 0.5), torch.tensor([0])
        >>> delta = fgm(model, x, y, 0.1, "inf") - x
        >>> torch.allclose(delta.abs(), torch.full_like(x, 0.1))
        True
    """
    eps, norm, step_size = _checked("fgm", eps, norm, 1, step_size, 1)
    if step_size is None:
        step_size = _default_step_size("fgm", eps, 1, random_start)
    return _run(
        model, x, y, eps, norm, 1, step_size, random_start, 1, targeted, generator, channels_last
    )


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
    channels_last: bool | None = None,
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
        eps: Radius of the ball (>= 0; 0 returns ``x``).
        norm: ``"2"`` or ``"inf"`` (aliases accepted).
        steps: Number of gradient steps (>= 1).
        step_size: Step length; default ``2.5 * eps / steps`` (Madry et al. 2018).
        random_start: Start uniformly inside the ball (L-inf: uniform cube; L2: uniform ball).
        restarts: Number of independent runs (>= 1).
        targeted: Minimise the loss of ``y`` instead of maximising it.
        generator: RNG for the random starts, or one per sample.
        channels_last: Run the model with channels-last weights (a private copy); default on for
            float32 images on CPUs.

    Returns:
        Adversarial inputs in [0, 1] with ``||x_adv - x||_norm <= eps`` (bf16 or fp16 inputs too:
        coordinates that rounding took outside move back, :func:`~robust._attack_core.into_ball`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> x, y = torch.rand(2, 1, 4, 4), torch.tensor([0, 2])
        >>> x_adv = pgd(model, x, y, 1.0, "2", steps=10, generator=torch.Generator().manual_seed(0))
        >>> bool((x_adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5)
        True
    """
    eps, norm, step_size = _checked("pgd", eps, norm, steps, step_size, restarts)
    if step_size is None:
        step_size = _default_step_size("pgd", eps, steps, random_start)
    return _run(
        model,
        x,
        y,
        eps,
        norm,
        steps,
        step_size,
        random_start,
        restarts,
        targeted,
        generator,
        channels_last,
    )


def _checked(
    owner: str, eps: float, norm: str | float, steps: int, step_size: float | None, restarts: int
) -> tuple[float, str, float | None]:
    """Validated eps, canonical norm and step size of fgm/pgd (one SettingError otherwise)."""
    eps = check_eps(eps, owner)
    norm = canonical_norm(norm, owner)
    check_ball(eps, norm, owner)
    check_int("steps", steps, minimum=1, owner=owner)
    if step_size is not None:
        step_size = check_real("step_size", step_size, low=0, owner=owner)
    check_int("restarts", restarts, minimum=1, owner=owner)
    return eps, norm, step_size


def _random_start(x: Tensor, eps: float, norm: str, generator: Generators) -> Tensor:
    """Uniform sample from the eps-ball around ``x`` (not yet clipped to [0, 1]).

    With one generator per sample, sample ``i`` is drawn from ``generator[i]`` alone, exactly as a
    one-image call would draw it: the result does not depend on the batch it is in.

    L-inf: ``U[-eps, eps]^d``. L2: Gaussian direction normalised to the unit sphere, radius
    ``eps * U^(1/d)`` (uniform in the ball's volume; Muller 1959).
    """
    if len(x) == 0:
        return x.clone()
    if isinstance(generator, Sequence):
        check_generators(generator, len(x))
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
    scale = radius.mul_(eps).div_(norm2(delta).clamp_min_(tiny))
    return delta.mul_(view(scale, x)).add_(x)


def _step_objective(logits: Tensor, y: Tensor) -> tuple[None, Tensor]:
    """No values; the loss of :func:`_step_loss` for fgm/pgd steps."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return None, others_minus_true(logits, y).sum() * 0.5


def _step_loss(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Summed ``(LSE_{j != y}(z_j) - z_y) / 2``: per-sample logit gradients of unit L1 norm.

    Its gradient has the direction of the cross-entropy's (which is an increasing function of it),
    with logit-gradient entries ``q_j / 2`` (``q`` the softmax over the classes other than ``y``)
    and ``-1/2`` at ``y``, all O(1): no cancellation when ``p_y`` rounds to 1 in float32 (where
    autograd's ``softmax - onehot`` loses the ``y`` entry and flips signs of the input gradient),
    and no underflow of a confident sample's gradient under fp16. Steps use the sign (L-inf) or
    the normalised gradient (L2), which the per-sample scale does not change.
    """
    return _step_objective(model(x), y)[1]


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
    channels_last: bool | None,
) -> Tensor:
    """Shared driver of fgm/pgd: restarts with the per-sample worst case."""
    check_generators(generator, len(x))
    if eps == 0:
        return x.detach().clone()
    with prepared(model, x, channels_last) as forward:
        x, y = as_inputs(x, y)
        run = _Run(x, eps, norm, steps, step_size, random_start, targeted)
        best = best_obj = best_ok = None
        for _ in range(restarts):
            x_adv = run(forward, y, generator)  # inside the ball, also in bf16/fp16
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                logits = forward(x_adv)
                loss = cross_entropy(logits, y)
                hit = logits.argmax(dim=1) == y
                ok = hit if targeted else ~hit
                obj = -loss if targeted else loss
            if best is None:
                best, best_obj, best_ok = x_adv, obj, ok
                continue
            better = (ok & ~best_ok) | ((ok == best_ok) & (obj > best_obj))
            best = torch.where(view(better, x), x_adv, best)
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
        self.x, self.eps, self.norm, self.steps = x, eps, norm, steps
        self.random_start = random_start
        self.alpha = -step_size if targeted else step_size  # targeted: descend on the target loss
        self.tiny = torch.finfo(x.dtype).tiny
        self.project = random_start or steps > 1 or step_size > eps
        # L-inf: the box ball ∩ [0, 1], so projection and clipping are one clamp per step.
        self.lo = self.hi = None
        if norm == "inf" and self.project:
            self.lo, self.hi = linf_bounds(x, eps)  # rounded inwards in bf16/fp16

    def __call__(self, model: Forward, y: Tensor, generator: Generators) -> Tensor:
        x, eps, tiny = self.x, self.eps, self.tiny
        if self.random_start:
            x_adv = _random_start(x, eps, self.norm, generator).clamp_(0.0, 1.0)
            x_adv = into_ball(x, x_adv, eps, self.norm)  # bf16/fp16: rounded back inside
        else:
            x_adv = x.clone()
        for _ in range(self.steps):
            _, grad, _ = model.gradient(x_adv, y, _step_objective)
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
                gnorm = norm2_wide(grad).clamp_min_(tiny)
                x_adv.addcdiv_(grad, view(gnorm, grad), value=self.alpha)
                if self.project:  # onto the ball and [0, 1] (bf16/fp16: rounding kept inside)
                    x_adv = project_l2(x, x_adv, eps)
                else:
                    x_adv.clamp_(0.0, 1.0)
        # a step not projected (one step of at most eps) can round outside too
        return into_ball(x, x_adv, eps, self.norm).detach()
