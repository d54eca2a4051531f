"""Adversarial training: PGD-AT, FGSM(-RS) with GradAlign, TRADES; robust validation accuracy."""

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.backbones import SmallCNN
from lightning_modules.standard import BackboneFactory, StandardClassifier, _adam
from robust._attack_core import float_logits
from robust.attacks import AttackSpec, attack, check_ball
from robust.checks import SettingError, check_choice, check_int, check_real, check_unused_at_default
from robust.modes import eval_mode
from robust.sharding import image_seed
from robust.trades import trades_loss, trades_perturb

__all__ = [
    "METHODS",
    "SEED_ATTACK",
    "AdversarialClassifier",
    "RobustOverfittingWarning",
    "grad_align_penalty",
]

SEED_ATTACK = AttackSpec(method="fgm", norm="2", eps=5.0)
METHODS = ("at", "trades")
TRADES_ATTACKS = ("pgd", "fgm")  # the attacks whose steps TRADES's KL maximization takes
TRADES_BETA = 6.0
"""Default TRADES beta (= 1/lambda): Zhang et al. (2019), Table 5 (their MNIST script uses 1.0)."""
ROBUST_VAL_STEPS = 10
"""PGD steps of the default robust validation attack (Rice, Wong & Kolter 2020 validate with PGD-10)."""

Generators = torch.Generator | Sequence[torch.Generator] | None
_OWNER = "AdversarialClassifier"


ROBUST_VAL_DEFAULTS = {
    "robust_val_attack": None,
    "robust_val_seed": 0,
    "robust_val_batch_size": 256,
    "robust_val_collapse": 0.2,
    "stop_on_collapse": False,
}
"""The robust validation's settings and defaults: other values act only with robust_val_images > 0."""


class RobustOverfittingWarning(UserWarning):
    """Robust validation accuracy fell far below its best: catastrophic or robust overfitting."""


def _as_spec(value: AttackSpec | Mapping[str, Any], name: str = "attack") -> AttackSpec:
    """The attack as an :class:`AttackSpec` (a mapping, e.g. from a checkpoint, is converted)."""
    if isinstance(value, AttackSpec):
        return value
    if isinstance(value, Mapping):
        return AttackSpec(**value)
    raise SettingError(
        f"{_OWNER} {name} must be an AttackSpec or a mapping such as "
        f"{{method: fgm, norm: '2', eps: 5.0}}; got {value!r}"
    )


def _uniform_ball(x: Tensor, eps: float, norm: str, generator: Generators) -> Tensor:
    """``eta`` uniform in the eps-ball (L-inf cube or L2 ball), shaped like ``x``."""
    if isinstance(generator, Sequence):
        if len(generator) != len(x):
            raise SettingError(
                f"grad_align_penalty generator must be one generator or one per image; got "
                f"{len(generator)} for {len(x)} images"
            )
        return torch.cat(
            [_uniform_ball(x[i : i + 1], eps, norm, g) for i, g in enumerate(generator)]
        )
    kwargs = {"generator": generator, "dtype": x.dtype, "device": x.device}
    if norm == "inf":
        return (torch.rand(x.shape, **kwargs) * 2 - 1) * eps
    direction = torch.randn(x.shape, **kwargs)
    radius = torch.rand(len(x), **kwargs).pow(1.0 / x[0].numel()) * eps
    scale = radius / torch.linalg.vector_norm(direction.flatten(1), dim=1).clamp_min(1e-30)
    return direction * scale.view(-1, *([1] * (x.dim() - 1)))


def grad_align_penalty(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "inf",
    generator: Generators = None,
) -> Tensor:
    r"""GradAlign: ``1 - cos(grad_x L(x), grad_x L(x + eta))`` averaged over the batch.

    Andriushchenko & Flammarion (2020), "Understanding and Improving Fast Adversarial Training",
    NeurIPS, Sec. 5: with :math:`\eta` uniform in the eps-ball (L-inf cube, or L2 ball), the
    regularizer is :math:`\mathbb{E}[1 - \cos(\nabla_x \ell(x, y), \nabla_x \ell(x+\eta, y))]`,
    differentiable in the model's parameters through the second gradient (double backprop; the
    first is a constant, as in the authors' code). Images whose gradient is exactly zero at
    either point are left out of the mean (as the authors do). ``x + eta`` is not clipped to
    [0, 1], as in the paper and the authors' ``get_input_grad``: the regularizer compares
    gradients over the whole eps-cube (clipping would drop half of it at MNIST's many pixels of
    exactly 0 or 1); the attack's own points stay in [0, 1]. The gradients are taken with the
    model in eval mode (no dropout, batch-norm running statistics; submodule modes restored), so
    both see the same function.

    Args:
        model: Classifier mapping ``(B, ...)`` images in [0, 1] to ``(B, C)`` logits.
        x: Clean images ``(B, ...)`` in [0, 1].
        y: Labels ``(B,)``.
        eps: Radius of the ball, >= 0.
        norm: ``"inf"`` or ``"2"``.
        generator: RNG of ``eta``: one, one per image, or None (global RNG).

    Returns:
        A scalar in [0, 2] (0 where no image has nonzero gradients), differentiable.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> linear = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # two classes: fixed direction
        >>> x, y = torch.rand(6, 1, 2, 2), torch.tensor([0, 1, 0, 1, 0, 1])
        >>> bool(grad_align_penalty(linear, x, y, eps=0.3).abs() < 1e-6)
        True
    """
    eps = check_real("eps", eps, low=0, low_inclusive=True, owner="grad_align_penalty")
    norm = check_choice("norm", str(norm), ("2", "inf"), owner="grad_align_penalty")
    mode = eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
    with mode, torch.enable_grad():
        x = x.detach()
        clean = x.clone().requires_grad_(True)
        (g1,) = torch.autograd.grad(_summed_ce(model, clean, y), clean)
        noisy = (x + _uniform_ball(x, eps, norm, generator)).requires_grad_(True)
        (g2,) = torch.autograd.grad(_summed_ce(model, noisy, y), noisy, create_graph=True)
    g1, g2 = g1.detach().flatten(1).float(), g2.flatten(1).float()
    n1 = torch.linalg.vector_norm(g1, dim=1)
    n2 = torch.linalg.vector_norm(g2, dim=1)
    ok = (n1 > 0) & (n2 > 0)
    ones = torch.ones_like(n1)
    cos = (g1 * g2).sum(dim=1) / (torch.where(ok, n1, ones) * torch.where(ok, n2, ones))
    return torch.where(ok, 1.0 - cos, torch.zeros_like(cos)).sum() / ok.sum().clamp_min(1)


def _summed_ce(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy (per-image gradients independent of the batch) in >= float32."""
    logits = model(x)
    return F.cross_entropy(float_logits(logits), y, reduction="sum")


class AdversarialClassifier(StandardClassifier):
    """Classifier trained on adversarial images: PGD-AT, FGSM(-RS) with GradAlign, or TRADES.

    ``method`` selects the training objective; ``attack`` is the attack it uses:

    * ``method: at`` (default): each training batch ``(x, y)`` of size ``B`` has its first
      ``k = round(perturbed_fraction * B)`` images replaced by ``attack(model, x[:k], y[:k])`` and
      the loss is the mean cross-entropy over the mixed batch (Kurakin, Goodfellow & Bengio 2017,
      Eq. (1) with lambda = 1; ``perturbed_fraction: 0.5`` is the equal mix of Goodfellow, Shlens
      & Szegedy 2015, Eq. (6), and the default here; ``1.0`` is Madry et al. 2018, Eq. (2.1)).

      - **PGD-AT** (Madry et al. 2018): ``attack: {method: pgd, norm: inf, eps: 0.3, steps: 10}``,
        ``perturbed_fraction: 1.0`` (``configs/mnist/pgd_at.yaml``).
      - **FGSM-RS** ("Fast is better than free", Wong, Rice & Kolter 2020, Alg. 3: uniform start,
        step 1.25 eps): ``attack: {method: fgm, norm: inf, eps: 0.3, random_start: true}``,
        optionally with **GradAlign** (Andriushchenko & Flammarion 2020): ``grad_align_weight``
        lambda adds ``lambda * (1 - cos(grad at x, grad at x + eta))`` (see
        :func:`grad_align_penalty`) against catastrophic overfitting
        (``configs/mnist/fgsm_rs.yaml``).
      - The seed's FGM, L2, eps 5 on half of each batch is the default.

    * ``method: trades`` (Zhang et al. 2019, ICML, Eq. (5)): the loss is
      ``CE(f(x), y) + beta * KL(f(x) || f(x'))`` with ``x'`` from the KL maximization of
      :func:`robust.trades.trades_perturb` started at ``x + 0.001 N(0, I)``; ``attack`` gives its
      norm, eps, steps and step size (its start is TRADES' own, so ``random_start`` must be left
      unset and ``restarts`` at 1); the whole batch is used (``perturbed_fraction`` 1).

    The attacks take input gradients only, in eval mode, so they leave no parameter gradients, do
    not update batch-norm statistics and use no dropout; under ``precision=bf16-mixed`` they run
    inside the training step's autocast. Random starts use the global RNG (``seed_everything``).

    **Robust validation** (Rice, Wong & Kolter 2020, "Overfitting in adversarially robust deep
    learning"): with ``robust_val_images > 0``, every validation epoch (not the sanity check)
    attacks the first ``robust_val_images`` images of the validation set with
    ``robust_val_attack`` (default PGD-10 at the training attack's norm and full eps) and logs
    ``val/robust_acc``, the fraction classified correctly both clean and attacked. It is exact
    and deterministic: each process attacks every N-th image (no padding, no duplicates), rows
    are gathered (:mod:`robust.sharding`), and image ``i``'s random start comes from its own
    generator seeded by :func:`callbacks.perturbed_accuracy.image_seed`
    ``(robust_val_seed, key, i)``, as PerturbedAccuracy seeds it (so ``val/robust_acc`` equals its
    ``val/perturbed_acc/<key>`` for the same attack and seed). It honours the
    trainer's ``limit_val_batches`` (under ``fast_dev_run``: 2 images). Monitor it with
    ``--checkpoint.monitor val/robust_acc --checkpoint.mode max`` (the early stopping of Rice et
    al.). When it falls more than ``robust_val_collapse`` below its best epoch during ``fit``, a
    :class:`RobustOverfittingWarning` names both numbers (catastrophic overfitting of one-step
    training, Wong et al. 2020) and, with ``stop_on_collapse``, training stops.

    Besides ``train/loss`` and ``train/acc`` it logs, per epoch, ``train/adv_acc`` (perturbed
    images), ``train/clean_acc`` (unperturbed ones; for TRADES the clean batch), ``train/eps``
    (the warm-up's current eps), ``train/kl`` (TRADES) and ``train/grad_align`` (GradAlign's
    ``1 - cos``).

    Args:
        backbone: See :class:`~lightning_modules.standard.StandardClassifier`.
        num_classes: See :class:`~lightning_modules.standard.StandardClassifier`.
        in_channels: See :class:`~lightning_modules.standard.StandardClassifier`.
        image_size: See :class:`~lightning_modules.standard.StandardClassifier`.
        mean: See :class:`~lightning_modules.standard.StandardClassifier`.
        std: See :class:`~lightning_modules.standard.StandardClassifier`.
        optimizer: See :class:`~lightning_modules.standard.StandardClassifier`.
        lr_scheduler: See :class:`~lightning_modules.standard.StandardClassifier`.
        attack: The training attack (untargeted); for TRADES its inner maximization. Default: the
            seed's FGM, L2, eps 5.
        perturbed_fraction: Fraction of each batch that is perturbed, in [0, 1] (``at``);
            None: 0.5 for ``at``, 1 for ``trades`` (which takes no other value).
        eps_warmup_epochs: ``W >= 0``; epoch ``e`` (0-based) trains with
            ``eps * min(1, e / W)``: clean in epoch 0, growing linearly, the full eps from
            epoch ``W`` on. 0 disables the warm-up. An explicit ``step_size`` of the spec is kept
            as is; leave it unset to scale it with eps.
        method: ``"at"`` (adversarial training on the attack's images) or ``"trades"``.
        beta: TRADES weight of the KL term, >= 0 (None: 6.0, Zhang et al. 2019, Table 5);
            ``trades`` only.
        grad_align_weight: GradAlign lambda >= 0 (0: off; Andriushchenko & Flammarion use 0.2
            for CIFAR-10 at eps 8/255); ``at`` only. ``eta`` is drawn in the ball of the current
            (warmed-up) eps and norm of ``attack``.
        robust_val_images: Validation images attacked each validation epoch for
            ``val/robust_acc``, >= 0 (0: off, and the ``robust_val_*`` and ``stop_on_collapse``
            settings below must keep their defaults). The first ones of the (unshuffled) set.
        robust_val_attack: Attack of the robust validation (untargeted); None: PGD-10 at the
            norm and eps of ``attack`` (step ``2.5 * eps / 10``, random start).
        robust_val_seed: Seed of the robust validation's per-image random starts, >= 0.
        robust_val_batch_size: Images per robust validation batch on each process, >= 1 (the
            result does not depend on it).
        robust_val_collapse: Warn when ``val/robust_acc`` is more than this below its best, in
            [0, 1].
        stop_on_collapse: Also stop training then (the best checkpoint by ``val/robust_acc``
            stays the pre-collapse one).
    """

    def __init__(
        self,
        backbone: BackboneFactory = SmallCNN,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: tuple[int, int] = (28, 28),
        mean: Sequence[float] = (0.1307,),
        std: Sequence[float] = (0.3081,),
        optimizer: OptimizerCallable = _adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        attack: AttackSpec = SEED_ATTACK,
        perturbed_fraction: float | None = None,
        eps_warmup_epochs: int = 0,
        method: str = "at",
        beta: float | None = None,
        grad_align_weight: float = 0.0,
        robust_val_images: int = 0,
        robust_val_attack: AttackSpec | None = None,
        robust_val_seed: int = 0,
        robust_val_batch_size: int = 256,
        robust_val_collapse: float = 0.2,
        stop_on_collapse: bool = False,
    ) -> None:
        method = check_choice("method", method, METHODS, owner=_OWNER)
        spec = _as_spec(attack)
        if spec.targeted:
            raise SettingError(f"{_OWNER} attack.targeted must be False for adversarial training")
        if perturbed_fraction is None:
            perturbed_fraction = 1.0 if method == "trades" else 0.5
        perturbed_fraction = check_real(
            "perturbed_fraction",
            perturbed_fraction,
            low=0,
            high=1,
            low_inclusive=True,
            high_inclusive=True,
            owner=_OWNER,
        )
        eps_warmup_epochs = check_int(
            "eps_warmup_epochs", eps_warmup_epochs, minimum=0, owner=_OWNER
        )
        grad_align_weight = check_real(
            "grad_align_weight", grad_align_weight, low=0, low_inclusive=True, owner=_OWNER
        )
        if method == "trades":
            beta = TRADES_BETA if beta is None else beta
            beta = check_real("beta", beta, low=0, low_inclusive=True, owner=_OWNER)
            if perturbed_fraction != 1.0:
                raise SettingError(
                    f"{_OWNER} perturbed_fraction must be 1 (or unset) for method 'trades' (the "
                    f"TRADES loss uses the whole batch); got {perturbed_fraction!r}"
                )
            if spec.method not in TRADES_ATTACKS:
                raise SettingError(
                    f"{_OWNER} attack.method must be one of {', '.join(TRADES_ATTACKS)} for "
                    "method 'trades' (its inner maximization is gradient ascent on the KL "
                    f"term, with the attack's steps and step size); got {spec.method!r}"
                )
            if spec.random_start is not None or spec.restarts != 1:
                raise SettingError(
                    f"{_OWNER} attack.random_start must be unset and attack.restarts 1 for method "
                    "'trades' (its inner maximization starts at x + 0.001 N(0, I)); got "
                    f"random_start={spec.random_start!r}, restarts={spec.restarts!r}"
                )
            if grad_align_weight > 0:
                raise SettingError(
                    f"{_OWNER} grad_align_weight must be 0 for method 'trades' (GradAlign "
                    f"regularizes method 'at'); got {grad_align_weight!r}"
                )
        elif beta is not None:
            raise SettingError(
                f"{_OWNER} beta must be unset (None) for method 'at' (it weights the TRADES KL "
                f"term); got {beta!r}"
            )
        robust_val_images = check_int(
            "robust_val_images", robust_val_images, minimum=0, owner=_OWNER
        )
        if robust_val_attack is None:
            val_spec = AttackSpec("pgd", spec.norm, spec.eps, steps=ROBUST_VAL_STEPS)
        else:
            val_spec = _as_spec(robust_val_attack, "robust_val_attack")
            if val_spec.targeted:
                raise SettingError(f"{_OWNER} robust_val_attack.targeted must be False")
        robust_val_seed = check_int("robust_val_seed", robust_val_seed, minimum=0, owner=_OWNER)
        robust_val_batch_size = check_int(
            "robust_val_batch_size", robust_val_batch_size, minimum=1, owner=_OWNER
        )
        robust_val_collapse = check_real(
            "robust_val_collapse",
            robust_val_collapse,
            low=0,
            high=1,
            low_inclusive=True,
            high_inclusive=True,
            owner=_OWNER,
        )
        if not isinstance(stop_on_collapse, bool):
            raise SettingError(
                f"{_OWNER} stop_on_collapse must be true or false; got {stop_on_collapse!r}"
            )
        if robust_val_images == 0:
            check_unused_at_default(
                {
                    "robust_val_attack": robust_val_attack,
                    "robust_val_seed": robust_val_seed,
                    "robust_val_batch_size": robust_val_batch_size,
                    "robust_val_collapse": robust_val_collapse,
                    "stop_on_collapse": stop_on_collapse,
                },
                ROBUST_VAL_DEFAULTS,
                enabled_by="robust_val_images > 0 (robust validation on)",
                disabled="robust_val_images=0",
                owner=_OWNER,
            )
        super().__init__(
            backbone, num_classes, in_channels, image_size, mean, std, optimizer, lr_scheduler
        )
        spec.check_num_classes(num_classes, owner=f"{_OWNER} attack")
        # a ball holding every image of this size, refused now rather than at the first step
        image = torch.zeros(1, *self.image_shape)
        check_ball(spec.eps, spec.norm, f"{_OWNER} attack", image)
        if robust_val_images:
            val_spec.check_num_classes(num_classes, owner=f"{_OWNER} robust_val_attack")
            check_ball(val_spec.eps, val_spec.norm, f"{_OWNER} robust_val_attack", image)
        # Plain values in the checkpoint, so it loads with torch.load(weights_only=True).
        self.hparams["attack"] = dataclasses.asdict(spec)
        if robust_val_attack is not None:
            self.hparams["robust_val_attack"] = dataclasses.asdict(val_spec)
        self.attack = spec
        self.method = method
        self.beta = beta
        self.perturbed_fraction = perturbed_fraction
        self.eps_warmup_epochs = eps_warmup_epochs
        self.grad_align_weight = grad_align_weight
        self.robust_val_images = robust_val_images
        self.robust_val_attack = val_spec
        self.robust_val_seed = robust_val_seed
        self.robust_val_batch_size = robust_val_batch_size
        self.robust_val_collapse = robust_val_collapse
        self.stop_on_collapse = stop_on_collapse
        self.robust_val_best: tuple[float, int] | None = None  # (accuracy, epoch) during fit
        self._collapse_warned = False
        self.train_adv_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_clean_acc = MulticlassAccuracy(num_classes, average="micro")

    # Training -----------------------------------------------------------------------------------

    def num_perturbed(self, batch_size: int) -> int:
        """Number of perturbed images in a batch: ``perturbed_fraction * batch_size``, rounded half up."""
        return min(batch_size, math.floor(self.perturbed_fraction * batch_size + 0.5))

    def first_full_strength_epoch(self) -> tuple[str, int] | None:
        """Epoch ``W`` is the first at the full eps (``eps * e / W`` before it)."""
        if self.eps_warmup_epochs == 0 or self.attack.eps == 0:
            return None
        return "eps_warmup_epochs", self.eps_warmup_epochs

    def attack_at_epoch(self, epoch: int) -> AttackSpec:
        """The training attack of (0-based) ``epoch``, with eps scaled by the warm-up."""
        if self.eps_warmup_epochs == 0 or epoch >= self.eps_warmup_epochs:
            return self.attack
        return dataclasses.replace(
            self.attack, eps=self.attack.eps * epoch / self.eps_warmup_epochs
        )

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The loss of ``method`` on one batch (see the class docstring)."""
        spec = self.attack_at_epoch(self.current_epoch)
        self.log("train/eps", float(spec.eps), on_step=False, on_epoch=True, sync_dist=True)
        if self.method == "trades":
            return self._trades_loss(x, y, spec)
        return self._at_loss(x, y, spec)

    def _at_loss(self, x: Tensor, y: Tensor, spec: AttackSpec) -> tuple[Tensor, Tensor, Tensor]:
        """Mean cross-entropy on the batch with its first ``num_perturbed`` images attacked."""
        k = self.num_perturbed(len(x))
        clean = x
        if k > 0 and spec.eps > 0:
            x = torch.cat([attack(self, x[:k], y[:k], spec), x[k:]])
        logits = self(x)
        loss = F.cross_entropy(float_logits(logits), y)
        if self.grad_align_weight > 0 and spec.eps > 0:
            penalty = grad_align_penalty(self, clean, y, spec.eps, spec.norm)
            loss = loss + self.grad_align_weight * penalty
            self.log(
                "train/grad_align", penalty.detach(), on_step=False, on_epoch=True, sync_dist=True
            )
        detached = logits.detach()
        k = k if spec.eps > 0 else 0  # a warm-up epoch at eps 0 attacked none: all are clean
        if k > 0:
            self.train_adv_acc(detached[:k], y[:k])
            self.log("train/adv_acc", self.train_adv_acc, on_step=False, on_epoch=True)
        if k < len(x):
            self.train_clean_acc(detached[k:], y[k:])
            self.log("train/clean_acc", self.train_clean_acc, on_step=False, on_epoch=True)
        return loss, logits, y

    def _trades_loss(self, x: Tensor, y: Tensor, spec: AttackSpec) -> tuple[Tensor, Tensor, Tensor]:
        """TRADES: ``CE(f(x), y) + beta KL(f(x) || f(x'))`` (Zhang et al. 2019, Eq. (5))."""
        logits = self(x)
        if spec.eps > 0:
            x_adv = trades_perturb(
                self,
                x,
                eps=spec.eps,
                norm=spec.norm,
                steps=spec.resolved_steps,
                step_size=spec.resolved_step_size,
            )
            logits_adv = self(x_adv)
            loss, _, kl = trades_loss(logits, logits_adv, y, self.beta)
        else:  # x' = x: the KL term is 0
            logits_adv = logits
            loss, kl = F.cross_entropy(float_logits(logits), y), torch.zeros((), device=x.device)
        if spec.eps > 0:  # a warm-up epoch at eps 0 has no adversarial accuracy
            self.train_adv_acc(logits_adv.detach(), y)
            self.log("train/adv_acc", self.train_adv_acc, on_step=False, on_epoch=True)
        self.train_clean_acc(logits.detach(), y)
        self.log("train/clean_acc", self.train_clean_acc, on_step=False, on_epoch=True)
        self.log("train/kl", kl.detach(), on_step=False, on_epoch=True, sync_dist=True)
        return loss, logits, y

    # Robust validation --------------------------------------------------------------------------

    def on_validation_epoch_end(self) -> None:
        """Log ``val/robust_acc`` (if ``robust_val_images > 0``) and watch for its collapse."""
        if self.robust_val_images == 0 or self._trainer is None or self.trainer.sanity_checking:
            return
        accuracy = self.robust_validation_accuracy()
        self.log("val/robust_acc", accuracy, sync_dist=True)
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._watch_collapse(accuracy)

    def robust_validation_accuracy(self) -> float:
        """Accuracy under ``robust_val_attack`` on the first validation images, on all processes."""
        spec = self.robust_val_attack

        def rows_of(indices: list[int], x: Tensor, y: Tensor) -> Tensor:
            generators = None
            if spec.resolved_random_start:
                generators = [
                    torch.Generator(device=x.device).manual_seed(
                        image_seed(self.robust_val_seed, spec.key, i)
                    )
                    for i in indices
                ]
            with torch.no_grad():
                clean = self(x).argmax(dim=1)
            x_adv = attack(self, x, y, spec, generator=generators)
            with torch.no_grad():
                adversarial = self(x_adv).argmax(dim=1)
            index = torch.as_tensor(indices, device=x.device)
            return torch.stack([index, y, clean, adversarial], dim=1)

        table = self.exact_validation_rows(
            self.robust_val_images, self.robust_val_batch_size, 4, rows_of
        )
        if len(table) == 0:
            return math.nan
        robust = (table[:, 2] == table[:, 1]) & (table[:, 3] == table[:, 1])
        return robust.double().mean().item()

    def _watch_collapse(self, accuracy: float) -> None:
        epoch = self.current_epoch
        if self.robust_val_best is None or accuracy > self.robust_val_best[0]:
            self.robust_val_best = (accuracy, epoch)
            self._collapse_warned = False
            return
        best, best_epoch = self.robust_val_best
        if best - accuracy <= self.robust_val_collapse:
            return
        if not self._collapse_warned:
            one_step = self.method == "at" and self.attack.resolved_steps == 1
            cause = (
                "catastrophic overfitting of one-step adversarial training (Wong, Rice & Kolter "
                "2020; try grad_align_weight, a smaller step or PGD)"
                if one_step
                else "robust overfitting (Rice, Wong & Kolter 2020)"
            )
            rank_zero_warn(
                f"val/robust_acc ({self.robust_val_attack.key}) fell to {accuracy:.4f} in epoch "
                f"{epoch} from its best {best:.4f} in epoch {best_epoch}, a drop of "
                f"{best - accuracy:.4f} > robust_val_collapse={self.robust_val_collapse}: "
                f"{cause}; monitor val/robust_acc to keep the best checkpoint"
                + ("; stopping (stop_on_collapse)" if self.stop_on_collapse else ""),
                category=RobustOverfittingWarning,
            )
            self._collapse_warned = True
        if self.stop_on_collapse:
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102 (Lightning hook)
        super().on_save_checkpoint(checkpoint)
        if self.robust_val_best is not None:
            checkpoint["robust_val_best"] = [float(v) for v in self.robust_val_best]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # noqa: D102 (Lightning hook)
        super().on_load_checkpoint(checkpoint)
        best = checkpoint.get("robust_val_best")
        if best is not None:
            self.robust_val_best = (float(best[0]), int(best[1]))
