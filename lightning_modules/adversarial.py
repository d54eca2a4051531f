"""Adversarial training: fit the classifier on images perturbed by a gradient attack."""

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.backbones import SmallCNN
from lightning_modules.standard import BackboneFactory, StandardClassifier, _adam
from robust.attacks import AttackSpec, attack

SEED_ATTACK = AttackSpec(method="fgm", norm="2", eps=5.0)


def _as_spec(value: AttackSpec | Mapping[str, Any]) -> AttackSpec:
    """The attack as an :class:`AttackSpec` (a mapping, e.g. from a checkpoint, is converted)."""
    if isinstance(value, AttackSpec):
        return value
    if isinstance(value, Mapping):
        return AttackSpec(**value)
    raise ValueError(
        f"attack must be an AttackSpec or a mapping such as "
        f"{{method: fgm, norm: '2', eps: 5.0}}, got {value!r}"
    )


class AdversarialClassifier(StandardClassifier):
    """Classifier trained on a batch mixing clean and adversarially perturbed images.

    Each training batch ``(x, y)`` of size ``B`` has its first ``k = round(perturbed_fraction * B)``
    images replaced by ``attack(model, x[:k], y[:k], spec)`` and the loss is the mean
    cross-entropy over the mixed batch, i.e. Kurakin, Goodfellow & Bengio 2017, "Adversarial
    Machine Learning at Scale", Eq. (1) with ``lambda = 1`` (``perturbed_fraction = 0.5`` is the
    equal mix of Goodfellow, Shlens & Szegedy 2015, Eq. (6); ``1.0`` is Madry et al. 2018, Eq.
    (2.1)). The attack is any :class:`~robust.attacks.AttackSpec`: FGM/FGSM (the seed's FGM L2,
    eps 5), FGSM with random start ("Fast is better than free", Wong, Rice & Kolter 2020,
    ``{method: fgm, norm: inf, eps: 0.3, random_start: true}``) or PGD (Madry et al. 2018,
    ``{method: pgd, norm: inf, eps: 0.3, steps: 7}``). Random starts use the global RNG (seeded
    by ``seed_everything``).

    The attack takes input gradients only (``torch.autograd.grad``), in eval mode, so it leaves
    no parameter gradients, does not update batch-norm statistics and uses no dropout; under
    ``precision=bf16-mixed`` it runs inside the same autocast as the training step.

    Besides ``train/loss`` and ``train/acc`` (mixed batch) it logs, per epoch, ``train/adv_acc``
    (perturbed images), ``train/clean_acc`` (the batch's unperturbed images; not logged when
    ``perturbed_fraction`` is 1) and ``train/eps`` (the warm-up's current eps).

    Args:
        backbone: See :class:`~lightning_modules.standard.StandardClassifier`.
        num_classes: See :class:`~lightning_modules.standard.StandardClassifier`.
        in_channels: See :class:`~lightning_modules.standard.StandardClassifier`.
        image_size: See :class:`~lightning_modules.standard.StandardClassifier`.
        mean: See :class:`~lightning_modules.standard.StandardClassifier`.
        std: See :class:`~lightning_modules.standard.StandardClassifier`.
        optimizer: See :class:`~lightning_modules.standard.StandardClassifier`.
        lr_scheduler: See :class:`~lightning_modules.standard.StandardClassifier`.
        attack: The training attack; untargeted. Default: the seed's FGM, L2, eps 5.
        perturbed_fraction: Fraction of each batch that is perturbed, in [0, 1].
        eps_warmup_epochs: ``W >= 0``; epoch ``e`` (0-based) trains with
            ``eps * min(1, e / W)``: clean in epoch 0, growing linearly, the full eps from
            epoch ``W`` on. 0 disables the warm-up. An explicit ``step_size`` of the spec is kept
            as is; leave it unset to scale it with eps.
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
        perturbed_fraction: float = 0.5,
        eps_warmup_epochs: int = 0,
    ) -> None:
        spec = _as_spec(attack)
        if spec.targeted:
            raise ValueError("attack.targeted must be False for adversarial training")
        if not (
            isinstance(perturbed_fraction, numbers.Real)
            and not isinstance(perturbed_fraction, bool)
            and 0.0 <= perturbed_fraction <= 1.0
        ):
            raise ValueError(f"perturbed_fraction must be in [0, 1], got {perturbed_fraction!r}")
        if (
            isinstance(eps_warmup_epochs, bool)
            or not isinstance(eps_warmup_epochs, numbers.Integral)
            or eps_warmup_epochs < 0
        ):
            raise ValueError(
                f"eps_warmup_epochs must be an integer >= 0 (0: no warm-up), "
                f"got {eps_warmup_epochs!r}"
            )
        super().__init__(
            backbone, num_classes, in_channels, image_size, mean, std, optimizer, lr_scheduler
        )
        # Plain values in the checkpoint, so it loads with torch.load(weights_only=True).
        self.hparams["attack"] = dataclasses.asdict(spec)
        self.attack = spec
        self.perturbed_fraction = float(perturbed_fraction)
        self.eps_warmup_epochs = int(eps_warmup_epochs)
        self.train_adv_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_clean_acc = MulticlassAccuracy(num_classes, average="micro")

    def num_perturbed(self, batch_size: int) -> int:
        """Number of perturbed images in a batch: ``perturbed_fraction * batch_size``, rounded half up."""
        return min(batch_size, math.floor(self.perturbed_fraction * batch_size + 0.5))

    def attack_at_epoch(self, epoch: int) -> AttackSpec:
        """The training attack of (0-based) ``epoch``, with eps scaled by the warm-up."""
        if self.eps_warmup_epochs == 0 or epoch >= self.eps_warmup_epochs:
            return self.attack
        return dataclasses.replace(
            self.attack, eps=self.attack.eps * epoch / self.eps_warmup_epochs
        )

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean cross-entropy on the batch with its first ``num_perturbed`` images attacked."""
        k = self.num_perturbed(len(x))
        spec = self.attack_at_epoch(self.current_epoch)
        if k > 0 and spec.eps > 0:
            x = torch.cat([attack(self, x[:k], y[:k], spec), x[k:]])
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        detached = logits.detach()
        if k > 0:
            self.train_adv_acc(detached[:k], y[:k])
            self.log("train/adv_acc", self.train_adv_acc, on_step=False, on_epoch=True)
        if k < len(x):
            self.train_clean_acc(detached[k:], y[k:])
            self.log("train/clean_acc", self.train_clean_acc, on_step=False, on_epoch=True)
        self.log("train/eps", float(spec.eps), on_step=False, on_epoch=True)
        return loss, logits, y
