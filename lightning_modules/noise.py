"""Gaussian noise augmentation (with optional consistency regularization) for randomized smoothing.

Cohen, Rosenfeld & Kolter (2019), "Certified Adversarial Robustness via Randomized Smoothing",
Section 3.3: the base classifier of a smoothed classifier is trained on x + N(0, sigma^2 I) so that
it classifies noisy copies well. Jeong & Shin (2020), "Consistency Regularization for Certified
Robustness of Smoothed Classifiers" (NeurIPS; arXiv 2006.04062): draw m noisy copies per image
and penalise their disagreement (the consistency loss L_con), which raises the average certified
radius. The form here is the default of the authors' code (github.com/jh-jeong/
smoothing-consistency, ``consistency_loss(..., loss="default")``), which reproduces the paper.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_modules.backbones import SmallCNN
from lightning_modules.standard import BackboneFactory, StandardClassifier, _adam


def consistency_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """KL and entropy terms of the L_con of Jeong & Shin (2020) for ``m`` noisy copies of a batch.

    With p_i = softmax(logits[i]) and p_hat = (1/m) sum_i p_i (the estimate of the smoothed
    classifier's class probabilities), returns per image

    * ``kl = (1/m) sum_i KL(p_hat || p_i)`` (the consistency term, weighted by lambda), and
    * ``entropy = H(p_hat) = -sum_c p_hat_c log p_hat_c`` (weighted by eta; minimised, so it makes
      the averaged prediction confident).

    Gradients flow through p_hat as in the authors' code (it is not detached).

    Args:
        logits: ``(m, B, num_classes)`` logits of the m noisy copies of B images.

    Returns:
        ``(kl, entropy)``, each of shape ``(B,)``.
    """
    m = logits.shape[0]
    log_p = logits.log_softmax(dim=-1)
    log_p_hat = torch.logsumexp(log_p, dim=0) - math.log(m)  # log of the mean of the softmaxes
    p_hat = log_p_hat.exp()
    kl = (p_hat * (log_p_hat - log_p)).sum(dim=-1).mean(dim=0)
    entropy = -(p_hat * log_p_hat).sum(dim=-1)
    return kl, entropy


class NoiseAugmentedClassifier(StandardClassifier):
    """Classifier trained on Gaussian-noisy images: the base classifier for randomized smoothing.

    Each training image x becomes ``num_noise_samples`` copies x + sigma * z, z ~ N(0, I), in pixel
    space and without clipping (the same noise as :class:`robust.smoothing.Smooth` certifies with);
    the model's first layer normalizes afterwards. The loss (Jeong & Shin 2020: cross-entropy plus
    their consistency loss L_con) is

        (1/m) sum_i CE(f(x + delta_i), y) + lambda (1/m) sum_i KL(p_hat || p_i) + eta H(p_hat),

    averaged over the batch; with m = 1 and lambda = eta = 0 it is the plain Gaussian augmentation
    of Cohen et al. (2019). Validation and test measure clean accuracy as in the base class.

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
        num_noise_samples: Noisy copies m per image in each step, >= 1 (the batch grows m times).
        consistency_weight: lambda >= 0 of the KL consistency term (needs m >= 2; Jeong & Shin
            use m = 2 and lambda in 5..20).
        entropy_weight: eta >= 0 of the entropy term (Jeong & Shin use 0.5).
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
    ) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, int | float):
            raise ValueError(f"model sigma must be a positive finite number, got {sigma!r}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"model sigma must be a positive finite number, got {sigma!r}")
        if (
            isinstance(num_noise_samples, bool)
            or not isinstance(num_noise_samples, int)
            or num_noise_samples < 1
        ):
            raise ValueError(
                f"model num_noise_samples must be an integer >= 1, got {num_noise_samples!r}"
            )
        for name, weight in (
            ("consistency_weight", consistency_weight),
            ("entropy_weight", entropy_weight),
        ):
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise ValueError(f"model {name} must be a finite number >= 0, got {weight!r}")
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"model {name} must be a finite number >= 0, got {weight!r}")
        if consistency_weight > 0 and num_noise_samples < 2:
            raise ValueError(
                "model consistency_weight > 0 needs num_noise_samples >= 2 (the KL term between "
                f"noisy copies is 0 for one copy), got num_noise_samples={num_noise_samples}"
            )
        super().__init__(
            backbone, num_classes, in_channels, image_size, mean, std, optimizer, lr_scheduler
        )
        self.sigma = float(sigma)
        self.num_noise_samples = num_noise_samples
        self.consistency_weight = float(consistency_weight)
        self.entropy_weight = float(entropy_weight)

    def add_noise(self, x: Tensor) -> Tensor:
        """``m`` noisy copies ``x + sigma * z`` stacked copy-major: shape ``(m * B, C, H, W)``."""
        copies = x.repeat(self.num_noise_samples, *([1] * (x.dim() - 1)))
        return copies + self.sigma * torch.randn_like(copies)

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cross-entropy on noisy copies plus the consistency terms of Jeong & Shin (2020).

        Returns:
            The loss, the logits of all ``m * B`` noisy copies and their (repeated) targets.
        """
        m, batch = self.num_noise_samples, x.shape[0]
        logits = self(self.add_noise(x))
        targets = y.repeat(m)
        loss = F.cross_entropy(logits, targets)  # = mean over copies of the per-copy mean CE
        if self.consistency_weight > 0 or self.entropy_weight > 0:
            kl, entropy = consistency_terms(logits.view(m, batch, -1))
            loss = loss + self.consistency_weight * kl.mean() + self.entropy_weight * entropy.mean()
            if self._trainer is not None:
                self.log("train/consistency_kl", kl.mean().detach())
                self.log("train/entropy", entropy.mean().detach())
        return loss, logits, targets
