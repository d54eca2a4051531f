"""Empirical robustness of the smoothed classifier: SmoothAdv's attack, judged by PREDICT.

Salman et al. (2019), "Provably Robust Deep Learning via Adversarially Trained Smoothed
Classifiers", Sec. 4.2: attack the soft smoothed classifier with PGD in L2 (m noise samples per
step, expectation over transformation; :func:`robust.smoothadv.smoothadv_attack`), then classify
the adversarial image with the smoothed classifier g's PREDICT (Cohen et al. 2019, Algorithm 1),
counting an abstention as wrong; ``compare`` puts it beside certified accuracy.

What a certificate promises is that g does not change on the ball, so an image certified correct
at radius r is never *misclassified* by PREDICT after an attack of radius r (beyond the
certificates' and PREDICT's failure probabilities): certified accuracy at r can never exceed
``1 - smoothed_misclassified@r``, and an attack that beats that is a bug. It can exceed the
abstention-as-wrong ``smoothed_robust_acc@r``: an attack may push an image certified just beyond
r to a near-tie where PREDICT (with its smaller n) abstains although g has not changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from callbacks.evaluation import (
    EvaluationCallback,
    base_classifier,
    module_num_classes,
    module_sigma,
)
from robust._attack_core import check_ball
from robust.checks import check_int, check_radii, check_real
from robust.sharding import image_seed
from robust.smoothadv import smoothadv_attack
from robust.smoothing import ABSTAIN, DEFAULT_NOISE_BLOCK, Smooth, check_num_samples

__all__ = ["SmoothedAttack"]

DEFAULT_RADII = (0.25, 0.5, 0.75, 1.0)


class SmoothedAttack(EvaluationCallback):
    """Accuracy of the smoothed classifier g under SmoothAdv's L2 attack at each radius.

    For every selected image and radius r: ``x_adv = smoothadv_attack(f, x, y, sigma, eps=r)``
    (``steps`` PGD steps on the soft smoothed classifier with ``num_noise_samples`` noise samples
    per step), then ``PREDICT(x_adv)`` with ``n`` samples at level ``alpha``. Logged on every
    process (``{stage}/`` prefix): ``smoothed_acc@0`` (PREDICT on the clean image),
    ``smoothed_robust_acc@<r>`` (right on the clean image and on ``x_adv``; abstaining is wrong),
    ``smoothed_abstain@<r>`` and ``smoothed_misclassified@<r>`` (PREDICT names a wrong class on
    ``x_adv``: what no certificate at r allows). The attack's noise of image i comes from a
    generator seeded by (seed, radius, i), PREDICT's from ``Smooth``'s per-index streams, so the
    numbers depend neither on the batch size nor on the process count.

    Args:
        sigma: Noise level of g, > 0; ``None`` takes the module's ``sigma``.
        radii: L2 radii (> 0) of the attack, pixel units.
        steps: PGD steps (>= 1); Salman et al. evaluate with 20 (and m up to 128).
        num_noise_samples: Noise samples m per step (>= 1).
        n: PREDICT's samples per image (>= 1).
        alpha: PREDICT's test level, in (0, 1).
        batch_size: Images per round on each process.
        max_images: Attack at most this many images.
        skip: Attack every ``skip``-th image.
        first_image: The first dataset index attacked (0: from the start); see
            :class:`~callbacks.evaluation.EvaluationCallback`.
        every_n_val_epochs: See :class:`~callbacks.evaluation.EvaluationCallback`.
        seed: Seed of the attack's and PREDICT's noise, >= 0.
        predict_batch_size: Noisy samples per forward pass of PREDICT.
        noise_block: Samples per independently seeded noise block of PREDICT (see ``Smooth``);
            ``n`` may be at most ``MAX_BLOCKS * noise_block``.

    Raises:
        SettingError: For a setting outside its allowed values; at setup, when ``sigma`` is unset
            and the module has none, the module has no ``num_classes``, or no image is selected.

    Examples:
        >>> SmoothedAttack(sigma=0.25, radii=[0.5], steps=10, num_noise_samples=16).radii
        [0.5]
    """

    def __init__(
        self,
        sigma: float | None = None,
        radii: Sequence[float] = DEFAULT_RADII,
        steps: int = 20,
        num_noise_samples: int = 32,
        n: int = 1000,
        alpha: float = 0.001,
        batch_size: int = 64,
        max_images: int | None = None,
        skip: int = 1,
        first_image: int = 0,
        every_n_val_epochs: int = 0,
        seed: int = 0,
        predict_batch_size: int = 1000,
        noise_block: int = DEFAULT_NOISE_BLOCK,
    ) -> None:
        super().__init__(
            every_n_val_epochs=every_n_val_epochs,
            batch_size=batch_size,
            max_images=max_images,
            skip=skip,
            first_image=first_image,
        )
        owner = "SmoothedAttack"
        self.sigma = None if sigma is None else check_real("sigma", sigma, low=0, owner=owner)
        self.radii = check_radii("radii", radii, owner=owner, zero=False)
        self.steps = check_int("steps", steps, minimum=1, owner=owner)
        self.num_noise_samples = check_int(
            "num_noise_samples", num_noise_samples, minimum=1, owner=owner
        )
        self.noise_block = check_int("noise_block", noise_block, minimum=1, owner=owner)
        self.n = check_num_samples("n", n, self.noise_block, owner=owner)
        self.alpha = check_real("alpha", alpha, low=0, high=1, owner=owner)
        self.seed = check_int("seed", seed, minimum=0, owner=owner)
        self.predict_batch_size = check_int(
            "predict_batch_size", predict_batch_size, minimum=1, owner=owner
        )
        self.width = 3 + len(self.radii)  # index, label, PREDICT(clean), PREDICT(x_adv at r)*
        self.results: dict[str, dict[str, float]] = {}

    def check(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse a module that cannot be attacked with these settings.

        Without ``num_classes``; with ``sigma`` unset, without a positive ``sigma``; with radii
        (the attack's L2 eps) beyond the diameter of its ``image_shape``.
        """
        module_num_classes(pl_module, "SmoothedAttack")
        module_sigma(pl_module, self.sigma, "SmoothedAttack")
        shape = getattr(pl_module, "image_shape", None)
        if isinstance(shape, tuple):
            check_ball(max(self.radii), "2", "SmoothedAttack radii", torch.zeros(1, *shape))

    def evaluate_batch(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        indices: list[int],
        images: Tensor,
        labels: Tensor,
    ) -> Tensor:
        sigma = module_sigma(pl_module, self.sigma, "SmoothedAttack")
        base = base_classifier(pl_module)
        smooth = Smooth(
            base,
            module_num_classes(pl_module, "SmoothedAttack"),
            sigma,
            batch_size=self.predict_batch_size,
            seed=self.seed,
            noise_block=self.noise_block,
            device=images.device,
        )
        # the attack's iterates in the noise's dtype, cast to the model's as PREDICT casts its
        # noisy images (bf16-true, 64-true: the dataset's float32 images are not the model's)
        images = images.to(smooth.noise_dtype)
        attacked = base
        if smooth.model_dtype != images.dtype:
            attacked = lambda v: base(v.to(smooth.model_dtype))  # noqa: E731
        columns = [torch.as_tensor(indices, dtype=torch.float64), labels.double().cpu()]
        clean = smooth.predict_batch(images, indices, self.n, self.alpha)
        columns.append(torch.tensor(clean, dtype=torch.float64))
        for r in self.radii:
            generators = [
                torch.Generator(device=images.device).manual_seed(
                    image_seed(self.seed, f"smoothadv_r{r:g}", i)
                )
                for i in indices
            ]
            x_adv = smoothadv_attack(
                attacked,
                images,
                labels,
                sigma=sigma,
                eps=r,
                steps=self.steps,
                num_noise_samples=self.num_noise_samples,
                generator=generators,
            )
            predicted = smooth.predict_batch(x_adv, indices, self.n, self.alpha)
            columns.append(torch.tensor(predicted, dtype=torch.float64))
        return torch.stack(columns, dim=1)

    logged_names = ("smoothed_",)

    def claimed_outputs(self, stage: str) -> frozenset[str]:  # noqa: D102
        return frozenset({f"{self.metric_prefix(stage)}/smoothed_num_images"})

    def finish(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        rows: Tensor,
        partial: bool = False,
    ) -> dict[str, float]:
        count = len(rows)
        labels, clean = rows[:, 1], rows[:, 2]
        right = clean == labels

        def mean(mask: Tensor) -> float:
            return mask.double().mean().item() if count else math.nan

        metrics = {"smoothed_acc@0": mean(right)}
        for j, r in enumerate(self.radii):
            predicted = rows[:, 3 + j]
            metrics[f"smoothed_robust_acc@{r:g}"] = mean(right & (predicted == labels))
            metrics[f"smoothed_abstain@{r:g}"] = mean(predicted == ABSTAIN)
            metrics[f"smoothed_misclassified@{r:g}"] = mean(
                (predicted != labels) & (predicted != ABSTAIN)
            )
        metrics["smoothed_num_images"] = float(count)
        # which smoothed classifier was attacked: the report compares it only with a
        # certification of the same one
        metrics["smoothed_sigma"] = module_sigma(pl_module, self.sigma, "SmoothedAttack")
        if partial:  # no numbers of a part are kept
            self.results.pop(stage, None)
        else:
            self.results[stage] = metrics
            self.rows = rows
        return metrics
