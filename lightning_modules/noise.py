"""Gaussian noise augmentation, consistency regularization and SmoothAdv for randomized smoothing.

Cohen, Rosenfeld & Kolter (2019), "Certified Adversarial Robustness via Randomized Smoothing",
Section 3.3: the base classifier of a smoothed classifier is trained on x + N(0, sigma^2 I) so that
it classifies noisy copies well. Jeong & Shin (2020), "Consistency Regularization for Certified
Robustness of Smoothed Classifiers" (NeurIPS; arXiv 2006.04062): draw m noisy copies per image
and penalise their disagreement (the consistency loss L_con), which raises the average certified
radius. The form here is the default of the authors' code (github.com/jh-jeong/
smoothing-consistency, ``consistency_loss(..., loss="default")``), which reproduces the paper.
Salman et al. (2019), "Provably Robust Deep Learning via Adversarially Trained Smoothed
Classifiers" (NeurIPS), Sec. 3-4: SmoothAdv trains on noisy copies of adversarial examples of the
smoothed classifier (:func:`robust.smoothadv.smoothadv_attack`).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_modules.backbones import SmallCNN
from lightning_modules.standard import BackboneFactory, StandardClassifier, _adam
from robust._attack_core import float_logits
from robust.attacks import check_ball
from robust.checks import SettingError, check_int, check_real, check_unused_at_default
from robust.sharding import image_seed
from robust.smoothadv import smoothadv_attack

_OWNER = "NoiseAugmentedClassifier"


def consistency_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """KL and entropy terms of the L_con of Jeong & Shin (2020) for ``m`` noisy copies of a batch.

    With p_i = softmax(logits[i]) and p_hat = (1/m) sum_i p_i (the estimate of the smoothed
    classifier's class probabilities), returns per image

    * ``kl = (1/m) sum_i KL(p_hat || p_i)`` (the consistency term, weighted by lambda), and
    * ``entropy = H(p_hat) = -sum_c p_hat_c log p_hat_c`` (weighted by eta; minimised, so it makes
      the averaged prediction confident).

    Gradients flow through p_hat as in the authors' code (it is not detached).

    Computed in at least float32: in bfloat16 the KL of nearby distributions is mostly rounding
    (negative for many images).

    Args:
        logits: ``(m, B, num_classes)`` logits of the m noisy copies of B images.

    Returns:
        ``(kl, entropy)``, each of shape ``(B,)``, at least float32.
    """
    m = logits.shape[0]
    log_p = float_logits(logits).log_softmax(dim=-1)
    log_p_hat = torch.logsumexp(log_p, dim=0) - math.log(m)  # log of the mean of the softmaxes
    p_hat = log_p_hat.exp()
    kl = (p_hat * (log_p_hat - log_p)).sum(dim=-1).mean(dim=0)
    entropy = -(p_hat * log_p_hat).sum(dim=-1)
    return kl, entropy


SMOOTHADV_DEFAULTS = {
    "smoothadv_steps": 1,
    "smoothadv_step_size": None,
    "smoothadv_warmup_epochs": 0,
}
"""SmoothAdv's settings and their defaults: other values take effect only with smoothadv_eps > 0."""

NOISY_VAL_DEFAULTS = {"noisy_val_samples": 4, "noisy_val_seed": 0}
"""Noisy validation's settings and defaults: other values act only with noisy_val_images > 0."""
NOISY_VAL_BATCH_IMAGES = 128
"""Images per batch of the noisy validation (times ``noisy_val_samples`` copies per forward)."""


class NoiseAugmentedClassifier(StandardClassifier):
    """Classifier trained on Gaussian-noisy images: the base classifier for randomized smoothing.

    Each training image x becomes ``num_noise_samples`` copies x + sigma * z, z ~ N(0, I), in pixel
    space and without clipping (the same noise as :class:`robust.smoothing.Smooth` certifies with);
    the model's first layer normalizes afterwards. The loss (Jeong & Shin 2020: cross-entropy plus
    their consistency loss L_con) is

        (1/m) sum_i CE(f(x + delta_i), y) + lambda (1/m) sum_i KL(p_hat || p_i) + eta H(p_hat),

    averaged over the batch; with m = 1 and lambda = eta = 0 it is the plain Gaussian augmentation
    of Cohen et al. (2019). Validation and test measure clean accuracy as in the base class.

    **Noisy validation**: with ``noisy_val_images > 0``, every validation epoch (not the sanity
    check) also logs ``val/noisy_acc``, the accuracy of the base classifier on
    ``noisy_val_samples`` noisy copies x + sigma * z of each of the first ``noisy_val_images``
    validation images: the accuracy that the smoothed classifier's predictions and certificates
    rest on, where clean ``val/acc`` can prefer an epoch that is worse under noise. Monitor it
    (``--checkpoint.monitor val/noisy_acc``; the noise configs do) to keep the best checkpoint for
    certification. Image ``i``'s noise comes from its own generator seeded by
    :func:`robust.sharding.image_seed` ``(noisy_val_seed, "noise_sigma<sigma>", i)``, and each
    process evaluates every N-th image, so each image counts once and the number is the same for
    any batch size and process count on a CPU (on a GPU, kernels chosen by batch shape may round
    differently and rarely flip a near-tie). It honours ``limit_val_batches`` as robust
    validation does.

    **SmoothAdv** (Salman et al. 2019, Sec. 3-4, their "SmoothAdv_PGD"; on with
    ``smoothadv_eps > 0``): the m noises delta_i are drawn first, x is replaced by the adversarial
    x' of the soft smoothed classifier found by :func:`robust.smoothadv.smoothadv_attack` (L2 PGD
    of ``smoothadv_steps`` steps on ``-log((1/m) sum_i softmax(f(x' + delta_i))_y)`` with these
    same m noises at every step, within ``||x' - x||_2 <= eps``, in eval mode), and the loss above
    is taken on the m noisy copies x' + delta_i (the authors' ``--train-multi-noise``); the
    consistency terms add to it (Jeong & Shin 2020 report SmoothAdv with them). The eps grows
    linearly over ``smoothadv_warmup_epochs`` W as in the authors' ``train_pgd.py``: epoch e
    (0-based) uses ``eps * min(1, (e + 1) / W)``, so epoch 0 already attacks with ``eps / W``.
    Logs ``train/smoothadv_eps`` then.

    Args:
        backbone: See :class:`~lightning_modules.standard.StandardClassifier`.
        num_classes: See the base class.
        in_channels: See the base class.
        image_size: See the base class.
        mean: See the base class.
        std: See the base class.
        optimizer: See the base class.
        lr_scheduler: See the base class.
        sigma: Noise standard deviation in pixel units ([0, 1] images), > 0; certify with the same.
        num_noise_samples: Noisy copies m per image in each step, >= 1 (the batch grows m times);
            also SmoothAdv's m (the paper's m_train, 1 to 8).
        consistency_weight: lambda >= 0 of the KL consistency term (needs m >= 2; Jeong & Shin
            use m = 2 and lambda in 5..20).
        entropy_weight: eta >= 0 of the entropy term (Jeong & Shin use 0.5).
        smoothadv_eps: L2 radius eps >= 0 of SmoothAdv (0: off; Salman et al. train with 0.25 to
            2.0 on CIFAR-10). With 0, the three settings below must keep their defaults.
        smoothadv_steps: PGD steps of SmoothAdv, >= 1 (the paper: 1 to 10).
        smoothadv_step_size: PGD step length > 0; None: ``2 * eps / steps`` (the authors' code).
        smoothadv_warmup_epochs: Epochs W >= 0 over which SmoothAdv's eps grows linearly (0 or 1:
            the full eps from the start; the authors warm up over 10 epochs on CIFAR-10).
        noisy_val_images: Validation images of ``val/noisy_acc``, >= 0 (0: off, and the two
            settings below must keep their defaults).
        noisy_val_samples: Noisy copies of each of them, >= 1.
        noisy_val_seed: Seed of their noise, >= 0.

    Examples:
        >>> from lightning_modules.backbones import LeNet
        >>> model = NoiseAugmentedClassifier(LeNet, sigma=0.5, noisy_val_images=200)
        >>> model.add_noise(torch.zeros(3, 1, 28, 28)).shape  # m = 1 noisy copy per image
        torch.Size([3, 1, 28, 28])
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
        sigma: float = 0.25,
        num_noise_samples: int = 1,
        consistency_weight: float = 0.0,
        entropy_weight: float = 0.0,
        smoothadv_eps: float = 0.0,
        smoothadv_steps: int = 1,
        smoothadv_step_size: float | None = None,
        smoothadv_warmup_epochs: int = 0,
        noisy_val_images: int = 500,
        noisy_val_samples: int = 4,
        noisy_val_seed: int = 0,
    ) -> None:
        sigma = check_real("sigma", sigma, low=0, owner=_OWNER)
        num_noise_samples = check_int(
            "num_noise_samples", num_noise_samples, minimum=1, owner=_OWNER
        )
        consistency_weight = check_real(
            "consistency_weight", consistency_weight, low=0, low_inclusive=True, owner=_OWNER
        )
        entropy_weight = check_real(
            "entropy_weight", entropy_weight, low=0, low_inclusive=True, owner=_OWNER
        )
        if consistency_weight > 0 and num_noise_samples < 2:
            raise SettingError(
                f"{_OWNER} num_noise_samples must be >= 2 when consistency_weight > 0 (the KL term "
                f"between noisy copies is 0 for one copy); got num_noise_samples={num_noise_samples}"
            )
        smoothadv_eps = check_real(
            "smoothadv_eps", smoothadv_eps, low=0, low_inclusive=True, owner=_OWNER
        )
        smoothadv_steps = check_int("smoothadv_steps", smoothadv_steps, minimum=1, owner=_OWNER)
        if smoothadv_step_size is not None:
            smoothadv_step_size = check_real(
                "smoothadv_step_size", smoothadv_step_size, low=0, owner=_OWNER
            )
        smoothadv_warmup_epochs = check_int(
            "smoothadv_warmup_epochs", smoothadv_warmup_epochs, minimum=0, owner=_OWNER
        )
        if smoothadv_eps == 0:
            check_unused_at_default(
                {
                    "smoothadv_steps": smoothadv_steps,
                    "smoothadv_step_size": smoothadv_step_size,
                    "smoothadv_warmup_epochs": smoothadv_warmup_epochs,
                },
                SMOOTHADV_DEFAULTS,
                enabled_by="smoothadv_eps > 0 (SmoothAdv on)",
                disabled="smoothadv_eps=0",
                owner=_OWNER,
            )
        noisy_val_images = check_int("noisy_val_images", noisy_val_images, minimum=0, owner=_OWNER)
        noisy_val_samples = check_int(
            "noisy_val_samples", noisy_val_samples, minimum=1, owner=_OWNER
        )
        noisy_val_seed = check_int("noisy_val_seed", noisy_val_seed, minimum=0, owner=_OWNER)
        if noisy_val_images == 0:
            check_unused_at_default(
                {"noisy_val_samples": noisy_val_samples, "noisy_val_seed": noisy_val_seed},
                NOISY_VAL_DEFAULTS,
                enabled_by="noisy_val_images > 0 (noisy validation on)",
                disabled="noisy_val_images=0",
                owner=_OWNER,
            )
        super().__init__(
            backbone, num_classes, in_channels, image_size, mean, std, optimizer, lr_scheduler
        )
        # an L2 ball holding every image of this size, refused now rather than after training
        check_ball(smoothadv_eps, "2", f"{_OWNER} smoothadv", torch.zeros(1, *self.image_shape))
        self.sigma = sigma
        self.num_noise_samples = num_noise_samples
        self.consistency_weight = consistency_weight
        self.entropy_weight = entropy_weight
        self.smoothadv_eps = smoothadv_eps
        self.smoothadv_steps = smoothadv_steps
        self.smoothadv_step_size = smoothadv_step_size
        self.smoothadv_warmup_epochs = smoothadv_warmup_epochs
        self.noisy_val_images = noisy_val_images
        self.noisy_val_samples = noisy_val_samples
        self.noisy_val_seed = noisy_val_seed

    def first_full_strength_epoch(self) -> tuple[str, int] | None:
        """Epoch ``W - 1`` is the first at SmoothAdv's full eps."""
        if self.smoothadv_eps == 0 or self.smoothadv_warmup_epochs <= 1:
            return None
        return "smoothadv_warmup_epochs", self.smoothadv_warmup_epochs - 1

    def smoothadv_eps_at_epoch(self, epoch: int) -> float:
        """SmoothAdv's eps in (0-based) ``epoch``: ``smoothadv_eps * min(1, (epoch + 1) / W)``."""
        if self.smoothadv_warmup_epochs == 0 or epoch + 1 >= self.smoothadv_warmup_epochs:
            return self.smoothadv_eps
        return self.smoothadv_eps * (epoch + 1) / self.smoothadv_warmup_epochs

    def add_noise(self, x: Tensor) -> Tensor:
        """``m`` noisy copies ``x + sigma * z`` stacked copy-major: shape ``(m * B, C, H, W)``."""
        copies = x.repeat(self.num_noise_samples, *([1] * (x.dim() - 1)))
        return copies + self.sigma * torch.randn_like(copies)

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cross-entropy on noisy copies plus the consistency terms of Jeong & Shin (2020).

        With SmoothAdv on, the copies are of the adversarial images (see the class docstring).

        Returns:
            The loss, the logits of all ``m * B`` noisy copies and their (repeated) targets.
        """
        m, batch = self.num_noise_samples, x.shape[0]
        eps = self.smoothadv_eps_at_epoch(self.current_epoch) if self.smoothadv_eps > 0 else 0.0
        if eps > 0:
            noise = self.sigma * torch.randn((m, *x.shape), dtype=x.dtype, device=x.device)
            x_adv = smoothadv_attack(
                self,
                x,
                y,
                sigma=self.sigma,
                eps=eps,
                steps=self.smoothadv_steps,
                num_noise_samples=m,
                step_size=self.smoothadv_step_size,
                noise=noise,
            )
            noisy = (x_adv.unsqueeze(0) + noise).flatten(0, 1)
        else:
            noisy = self.add_noise(x)
        if self.smoothadv_eps > 0 and self._trainer is not None:
            self.log("train/smoothadv_eps", eps, on_step=False, on_epoch=True, sync_dist=True)
        logits = self(noisy)
        targets = y.repeat(m)
        # = mean over copies of the per-copy mean CE
        loss = F.cross_entropy(float_logits(logits), targets)
        if self.consistency_weight > 0 or self.entropy_weight > 0:
            kl, entropy = consistency_terms(logits.view(m, batch, -1))
            loss = loss + self.consistency_weight * kl.mean() + self.entropy_weight * entropy.mean()
            if self._trainer is not None:
                self.log("train/consistency_kl", kl.mean().detach())
                self.log("train/entropy", entropy.mean().detach())
        return loss, logits, targets

    # Noisy validation ---------------------------------------------------------------------------

    def on_validation_epoch_end(self) -> None:
        """Log ``val/noisy_acc`` (if ``noisy_val_images > 0``; not in the sanity check)."""
        if self.noisy_val_images == 0 or self._trainer is None or self.trainer.sanity_checking:
            return
        self.log("val/noisy_acc", self.noisy_validation_accuracy(), sync_dist=True)

    def noisy_validation_accuracy(self) -> float:
        """Accuracy on seeded noisy copies of the first validation images, on all processes."""
        key, copies = f"noise_sigma{self.sigma:g}", self.noisy_val_samples

        def rows_of(indices: list[int], x: Tensor, y: Tensor) -> Tensor:
            noise = torch.stack(
                [
                    torch.randn(
                        (copies, *x.shape[1:]),
                        generator=torch.Generator(device=x.device).manual_seed(
                            image_seed(self.noisy_val_seed, key, i)
                        ),
                        device=x.device,
                    )
                    for i in indices
                ]
            )  # (B, copies, C, H, W)
            noisy = (x.unsqueeze(1) + self.sigma * noise).to(x.dtype).flatten(0, 1)
            with torch.no_grad():
                predictions = self(noisy).argmax(dim=1).view(len(indices), copies)
            correct = (predictions == y.unsqueeze(1)).sum(dim=1)
            return torch.stack([torch.as_tensor(indices, device=x.device), correct], dim=1)

        table = self.exact_validation_rows(
            self.noisy_val_images, NOISY_VAL_BATCH_IMAGES, 2, rows_of
        )
        if len(table) == 0:
            return math.nan
        return (table[:, 1].sum() / (len(table) * copies)).item()
