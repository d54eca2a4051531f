"""Accuracy under attack at test time (and on validation), exact on any process count.

Each image's random parts (random starts, Square's proposals) come from its own generator seeded
by (seed, attack key, dataset index), so the numbers depend neither on the batch size nor on the
number of processes (see :mod:`callbacks.evaluation` for the sharding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

import robust.attacks as attack_lib
from callbacks.evaluation import EvaluationCallback
from robust.attacks import AttackSpec, check_ball
from robust.autoattack import STAGES
from robust.checks import SettingError, check_int, check_real
from robust.modes import eval_mode
from robust.report import plot_example_grid
from robust.sharding import evaluation_dataset, gather_rows, image_seed

__all__ = ["GradientMaskingWarning", "PerturbedAccuracy", "image_seed"]

ONE_STEP = ("fgm",)
AUTOATTACK_STAGES = tuple(stage for stage in STAGES if stage != "clean")
GRADIENT_FREE = ("square",)


class GradientMaskingWarning(UserWarning):
    """Evidence that the model's robustness to gradient attacks may be gradient masking.

    Examples:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warnings.warn("FGM 78% but PGD-40 0% at L2 5", GradientMaskingWarning)
        >>> caught[0].category.__name__
        'GradientMaskingWarning'
    """


def _norms(delta: Tensor, norm: str) -> Tensor:
    """Per-image L2 or L-inf norm ``(B,)`` of ``delta`` ``(B, ...)``, in float64."""
    order = 2 if norm == "2" else math.inf
    return torch.linalg.vector_norm(delta.flatten(1).double(), ord=order, dim=1)


class PerturbedAccuracy(EvaluationCallback):
    """Log the accuracy under each attack, and the perturbations' mean norm, on the evaluation set.

    Logged on every process (same values): ``{stage}/perturbed_acc/<key>``, the fraction of images
    classified correctly both clean and after the attack (an attack that happens to move a
    misclassified image onto its label does not make it robust), and
    ``{stage}/perturbation_norm/<key>``, the mean norm of ``x_adv - x`` in the attack's norm, and
    ``{stage}/perturbed_num_images/<key>``, the number of images attacked. The
    model runs in eval mode under the trainer's precision; the attacks leave inference mode
    themselves, so this works inside ``trainer.test`` with the default ``inference_mode=True``.

    For an ``autoattack`` spec, the robust accuracy after each of its attacks is logged too, as
    ``{stage}/perturbed_acc/<key>/after_<apgd-ce|apgd-t|square>``.

    A :class:`GradientMaskingWarning` names the evidence when a one-step attack (FGM) leaves the
    model more than ``masking_gap`` more accurate than an iterative attack with the same norm and
    eps, or a gradient-free attack (Square) beats a gradient attack by more than ``masking_gap``
    (Athalye, Carlini & Wagner 2018, Sec. 3.1; Croce & Hein 2020).

    Examples of the ``num_image_grid`` images (spread evenly over the evaluated images, gathered
    from all processes) go to TensorBoard as figures and, after testing, to
    ``<log_dir>/adversarial_examples.npz`` when the trainer has a logger (arrays ``indices``,
    ``labels``, ``clean``,
    ``pred/clean``, ``adv/<key>``, ``pred/<key>``).

    Results are also kept in ``results[stage][key]`` (``accuracy``, ``norm``, ``clean_accuracy``,
    ``num_images``, ``attack``).

    Args:
        attacks: Untargeted attacks with distinct keys, e.g. from YAML
            ``[{method: fgm, norm: "2", eps: 5.0}, {method: pgd, norm: "2", eps: 5.0}]``.
        every_n_val_epochs: See :class:`~callbacks.evaluation.EvaluationCallback`.
        batch_size: Images per attack batch on each process (results do not depend on it).
        max_images: Evaluate at most this many images (None: all the trainer evaluates).
        skip: Evaluate every ``skip``-th image.
        first_image: The first dataset index evaluated (0: from the start); see
            :class:`~callbacks.evaluation.EvaluationCallback`.
        seed: Seed of the random parts of the attacks, >= 0.
        num_image_grid: Example images per attack; 0: none.
        masking_gap: Accuracy gap, in [0, 1], above which to warn of gradient masking.

    Examples:
        >>> callback = PerturbedAccuracy([AttackSpec("pgd", "inf", 0.3, steps=40)])
        >>> [spec.key for spec in callback.attacks]
        ['pgd40_linf_eps0.3']
    """

    def __init__(
        self,
        attacks: list[AttackSpec],
        every_n_val_epochs: int = 0,
        batch_size: int = 256,
        max_images: int | None = None,
        skip: int = 1,
        first_image: int = 0,
        seed: int = 0,
        num_image_grid: int = 16,
        masking_gap: float = 0.3,
    ) -> None:
        super().__init__(
            every_n_val_epochs=every_n_val_epochs,
            batch_size=batch_size,
            max_images=max_images,
            skip=skip,
            first_image=first_image,
        )
        owner = "PerturbedAccuracy"
        if (
            isinstance(attacks, str | AttackSpec)
            or not isinstance(attacks, Sequence)
            or not attacks
            or not all(isinstance(a, AttackSpec) for a in attacks)
        ):
            raise SettingError(
                f"{owner} attacks must be a non-empty list of AttackSpec; got {attacks!r}"
            )
        keys = [a.key for a in attacks]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise SettingError(
                f"{owner} attacks must have distinct keys (set name); repeated: {duplicates}"
            )
        targeted = [a.key for a in attacks if a.targeted]
        if targeted:
            raise SettingError(
                f"{owner} attacks must be untargeted (targeted=False); got {targeted}"
            )
        self.attacks = list(attacks)
        self.seed = check_int("seed", seed, minimum=0, owner=owner)
        self.num_image_grid = check_int("num_image_grid", num_image_grid, minimum=0, owner=owner)
        self.masking_gap = check_real(
            "masking_gap",
            masking_gap,
            low=0,
            high=1,
            low_inclusive=True,
            high_inclusive=True,
            owner=owner,
        )
        # index, label, clean prediction, (prediction, norm) per attack, then AutoAttack's masks
        self._staged = [spec for spec in self.attacks if spec.method == "autoattack"]
        self.width = 3 + 2 * len(self.attacks) + len(AUTOATTACK_STAGES) * len(self._staged)
        self.results: dict[str, dict[str, dict]] = {}
        self._examples: list[int] = []
        self._example_rows: list[Tensor] = []

    # ------------------------------------------------------------------ evaluation hooks
    def check(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse attacks the module's ``num_classes`` or images cannot honour.

        APGD-T's targets need classes; an L2 eps beyond the diameter of the module's
        ``image_shape`` holds every image. A module without them is checked by the attack itself,
        at its first batch.
        """
        num_classes = getattr(pl_module, "num_classes", None)
        shape = getattr(pl_module, "image_shape", None)
        for spec in self.attacks:
            owner = f"PerturbedAccuracy attack {spec.key}"
            if isinstance(num_classes, int) and not isinstance(num_classes, bool):
                spec.check_num_classes(num_classes, owner=owner)
            if isinstance(shape, tuple):
                check_ball(spec.eps, spec.norm, owner, torch.zeros(1, *shape))

    def pending(  # noqa: D102
        self, trainer: Trainer, pl_module: LightningModule, stage: str, selected: list[int]
    ) -> list[int]:
        count = min(self.num_image_grid, len(selected))
        spots = np.linspace(0, len(selected) - 1, count).round().astype(int) if count else []
        self._examples = sorted({selected[i] for i in spots})
        self._example_rows = []
        return selected

    def attack(
        self,
        model: LightningModule,
        x: Tensor,
        y: Tensor,
        spec: AttackSpec,
        indices: list[int],
        stages: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """``spec``'s attack on a batch, each image's random parts seeded by :func:`image_seed`."""
        if not spec.resolved_random_start:
            return attack_lib.attack(model, x, y, spec, stages=stages)
        generators = [
            torch.Generator(device=x.device).manual_seed(image_seed(self.seed, spec.key, i))
            for i in indices
        ]
        return attack_lib.attack(model, x, y, spec, generator=generators, stages=stages)

    def evaluate_batch(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        indices: list[int],
        images: Tensor,
        labels: Tensor,
    ) -> Tensor:
        device = images.device
        with eval_mode(pl_module), trainer.precision_plugin.forward_context():
            x = trainer.precision_plugin.convert_input(images)  # e.g. bf16-true weights
            with torch.no_grad():
                clean = pl_module(x).argmax(dim=1)
            columns = [torch.as_tensor(indices, device=device), labels, clean]
            shown = [k for k, i in enumerate(indices) if i in self._examples]
            example = [torch.as_tensor(indices)[shown], labels[shown].cpu(), clean[shown].cpu()]
            pixels = [x[shown].flatten(1).cpu()]
            staged: list[Tensor] = []
            for spec in self.attacks:
                masks: dict[str, Tensor] | None = {} if spec in self._staged else None
                x_adv = self.attack(pl_module, x, labels, spec, indices, stages=masks)
                with torch.no_grad():
                    predicted = pl_module(x_adv).argmax(dim=1)
                # widened before subtracting: a bf16 difference rounds (up to half an ulp past eps)
                columns += [predicted, _norms(x_adv.double() - x.double(), spec.norm)]
                if masks is not None:
                    staged += [masks[stage] for stage in AUTOATTACK_STAGES]
                example.append(predicted[shown].cpu())
                pixels.append(x_adv[shown].flatten(1).cpu())
        if shown:
            numbers = torch.stack([c.double() for c in example], dim=1)
            self._example_rows.append(torch.cat([numbers, *(p.double() for p in pixels)], dim=1))
        return torch.stack([c.double() for c in columns + staged], dim=1)

    logged_names = ("perturbed_acc/", "perturbation_norm/", "perturbed_num_images/")

    def claimed_outputs(self, stage: str) -> frozenset[str]:  # noqa: D102
        claimed = {f"{self.metric_prefix(stage)}/perturbed_acc/{spec.key}" for spec in self.attacks}
        if stage == "test" and self.num_image_grid:
            claimed.add("<log_dir>/adversarial_examples.npz")
        return frozenset(claimed)

    def finish(  # noqa: D102
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        rows: Tensor,
        partial: bool = False,
    ) -> dict[str, float]:
        results = self.summarise(rows)
        if partial:  # no numbers of a part: neither kept, drawn nor warned about
            self.results.pop(stage, None)
        else:
            self.results[stage] = results
            self._warn_if_masking(results)
            self._save_examples(trainer, pl_module, stage, results)
        metrics: dict[str, float] = {}
        for key, result in results.items():
            metrics[f"perturbed_acc/{key}"] = result["accuracy"]
            metrics[f"perturbation_norm/{key}"] = result["norm"]
            metrics[f"perturbed_num_images/{key}"] = float(result["num_images"])
            for stage, accuracy in result.get("stages", {}).items():
                metrics[f"perturbed_acc/{key}/after_{stage}"] = accuracy
        return metrics

    def summarise(self, table: Tensor) -> dict[str, dict]:
        """Per-attack results of a gathered table (rows: index, label, clean, (pred, norm)*)."""
        labels, clean = table[:, 1], table[:, 2]
        count = len(table)
        clean_accuracy = (clean == labels).double().mean().item() if count else math.nan
        results = {}
        column = 3 + 2 * len(self.attacks)
        stage_columns = {}
        for spec in self._staged:
            stage_columns[spec.key] = dict(
                zip(AUTOATTACK_STAGES, range(column, column + 3), strict=True)
            )
            column += len(AUTOATTACK_STAGES)
        for j, spec in enumerate(self.attacks):
            predicted, norm = table[:, 3 + 2 * j], table[:, 4 + 2 * j]
            robust = (predicted == labels) & (clean == labels)
            results[spec.key] = {
                "accuracy": robust.double().mean().item() if count else math.nan,
                "norm": norm.mean().item() if count else math.nan,
                "clean_accuracy": clean_accuracy,
                "num_images": count,
                "attack": spec,
            }
            if spec.key in stage_columns:  # AutoAttack: robust accuracy after each of its attacks
                results[spec.key]["stages"] = {
                    stage: table[:, k].double().mean().item() if count else math.nan
                    for stage, k in stage_columns[spec.key].items()
                }
        return results

    # ------------------------------------------------------------------ masking and examples
    def _warn_if_masking(self, results: dict[str, dict]) -> None:
        for weak in self.attacks:
            for strong in self.attacks:
                if weak is strong or (weak.norm, weak.eps) != (strong.norm, strong.eps):
                    continue
                one_step = weak.method in ONE_STEP and strong.method not in ONE_STEP
                free_wins = strong.method in GRADIENT_FREE and weak.method not in GRADIENT_FREE
                if not (one_step or free_wins):
                    continue
                a, b = results[weak.key]["accuracy"], results[strong.key]["accuracy"]
                if a - b > self.masking_gap:
                    why = (
                        "a one-step attack is much weaker than an iterative one"
                        if one_step
                        else "a gradient-free attack beats a gradient attack"
                    )
                    rank_zero_warn(
                        f"accuracy under {weak.key} ({a:.4f}) exceeds accuracy under "
                        f"{strong.key} ({b:.4f}) by {a - b:.4f} > masking_gap={self.masking_gap}: "
                        f"{why}, evidence of gradient masking; trust the lower number",
                        category=GradientMaskingWarning,
                    )

    def _save_examples(
        self, trainer: Trainer, pl_module: LightningModule, stage: str, results: dict[str, dict]
    ) -> None:
        """Gather the example rows (a collective), then rank 0 draws and (test) saves them."""
        if not self.num_image_grid:
            return
        fields = 3 + len(self.attacks)
        local = torch.cat(self._example_rows) if self._example_rows else None
        if local is None:
            pixels = 0
            if self._examples:  # another process holds them; the width must match
                pixels = int(np.prod(_image_shape(trainer, stage))) * (1 + len(self.attacks))
            local = torch.zeros(0, fields + pixels, dtype=torch.float64)
        rows = gather_rows(trainer, local, device=pl_module.device)
        saving = stage == "test" and trainer.loggers and not trainer.fast_dev_run
        log_dir = trainer.log_dir if saving else None  # a collective: every process asks
        if not trainer.is_global_zero or not len(rows):
            return
        shape = _image_shape(trainer, stage)
        size = int(np.prod(shape))
        images = rows[:, fields:].reshape(len(rows), 1 + len(self.attacks), *shape).float()
        arrays = {
            "indices": rows[:, 0].long().numpy(),
            "labels": rows[:, 1].long().numpy(),
            "clean": images[:, 0].numpy(),
            "pred/clean": rows[:, 2].long().numpy(),
        }
        for j, spec in enumerate(self.attacks):
            arrays[f"adv/{spec.key}"] = images[:, 1 + j].numpy()
            arrays[f"pred/{spec.key}"] = rows[:, 3 + j].long().numpy()
        assert size == arrays["clean"][0].size
        if log_dir is not None:
            path = Path(log_dir) / "adversarial_examples.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **arrays)
        for spec in self.attacks:
            result = results[spec.key]
            figure = plot_example_grid(
                arrays["clean"],
                {spec.key: arrays[f"adv/{spec.key}"]},
                arrays["labels"].tolist(),
                {
                    "clean": arrays["pred/clean"].tolist(),
                    spec.key: arrays[f"pred/{spec.key}"].tolist(),
                },
                title=f"{spec.key}: accuracy {result['accuracy']:.3f} "
                f"(clean {result['clean_accuracy']:.3f}) on {result['num_images']} images",
            )
            self.add_figure(trainer, f"{stage}/adversarial_examples/{spec.key}", figure)


def _image_shape(trainer: Trainer, stage: str) -> tuple[int, ...]:
    return tuple(torch.as_tensor(evaluation_dataset(trainer, stage)[0][0]).shape)
