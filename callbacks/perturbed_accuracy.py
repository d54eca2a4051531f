"""Accuracy under attack at test time (and every k validation epochs), exact on any process count."""

import math
import numbers
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor, nn

import robust.attacks as attack_lib
from callbacks.distributed import batches, evaluation_dataset, gather_rows, rounds, shard
from robust.attacks import AttackSpec
from robust.modes import eval_mode

__all__ = ["GradientMaskingWarning", "PerturbedAccuracy", "image_seed"]


class GradientMaskingWarning(UserWarning):
    """A one-step attack is much weaker than PGD: the robustness may be gradient masking."""


def image_seed(seed: int, key: str, index: int) -> int:
    """Seed of one image's random start, from (callback seed, attack key, dataset index).

    Mixed by NumPy's ``SeedSequence`` so nearby indices give unrelated streams; independent of
    the batch size, the process count and the order of the attacks.
    """
    words = [seed, zlib.crc32(key.encode()), index]
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def _norms(delta: Tensor, norm: str) -> Tensor:
    """Per-image L2 or L-inf norm ``(B,)`` of ``delta`` ``(B, ...)``, in float64."""
    order = 2 if norm == "2" else math.inf
    return torch.linalg.vector_norm(delta.flatten(1).double(), ord=order, dim=1)


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


class PerturbedAccuracy(Callback):
    """Log the accuracy under each attack, and the perturbations' mean norm, on the evaluation set.

    At the end of ``trainer.test`` (and every ``every_n_val_epochs`` validation epochs, never
    during the sanity check) the callback walks the test (validation) dataset itself: each
    process attacks the images ``rank, rank + world_size, ...`` (no padding), one row per image
    is gathered to every process (:mod:`callbacks.distributed`), and every process logs the same
    ``{stage}/perturbed_acc/<key>`` (fraction of images classified correctly after the attack;
    images already misclassified count as errors) and ``{stage}/perturbation_norm/<key>`` (mean
    norm, in the attack's norm, of ``x_adv - x``). The numbers depend neither on the process count
    nor on the batch size: image ``i``'s random start is drawn from its own generator seeded by
    :func:`image_seed` ``(seed, key, i)``. The images are those the trainer evaluates
    (``limit_test_batches``/``limit_val_batches`` and ``fast_dev_run`` are honoured), at most
    ``max_images``, taken from the start of the (unshuffled) dataset. The model runs in eval
    mode under the trainer's precision (autocast for ``bf16-mixed``); the attacks leave
    inference mode themselves.

    Results are also kept in ``results[stage][key]`` (``accuracy``, ``norm``,
    ``clean_accuracy``, ``num_images``, ``attack``). A :class:`GradientMaskingWarning` is issued
    when the accuracy under an FGM attack exceeds that under a PGD attack with the same norm and
    eps by more than ``masking_gap``: a one-step attack should not be much weaker than an
    iterated one unless the loss surface hides its gradient (Athalye, Carlini & Wagner 2018,
    "Obfuscated Gradients Give a False Sense of Security", Sec. 3.1 and 5). With a
    TensorBoardLogger, process 0 adds, per attack, a figure of its first ``num_image_grid``
    images: clean (true and predicted label) above adversarial (predicted label).

    Args:
        attacks: Untargeted attacks with distinct keys, e.g. from YAML
            ``[{method: fgm, norm: "2", eps: 5.0}, {method: pgd, norm: "2", eps: 5.0}]``.
        every_n_val_epochs: Also evaluate after every n-th validation epoch of ``fit`` (and in
            ``trainer.validate``); 0 never evaluates during validation.
        batch_size: Images per attack batch on each process (results do not depend on it).
        max_images: Evaluate at most this many images (None: all the trainer evaluates).
        seed: Seed of the random starts, >= 0.
        num_image_grid: Images per attack in the TensorBoard figure; 0 adds no figure.
        masking_gap: Accuracy gap FGM - PGD, in [0, 1], above which to warn.
    """

    def __init__(
        self,
        attacks: list[AttackSpec],
        every_n_val_epochs: int = 0,
        batch_size: int = 256,
        max_images: int | None = None,
        seed: int = 0,
        num_image_grid: int = 16,
        masking_gap: float = 0.3,
    ) -> None:
        super().__init__()
        if (
            isinstance(attacks, str | AttackSpec)
            or not isinstance(attacks, Sequence)
            or not attacks
            or not all(isinstance(a, AttackSpec) for a in attacks)
        ):
            raise ValueError(f"attacks must be a non-empty list of AttackSpec, got {attacks!r}")
        keys = [a.key for a in attacks]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        if duplicates:
            raise ValueError(f"attacks must have distinct keys (set name), repeated: {duplicates}")
        targeted = [a.key for a in attacks if a.targeted]
        if targeted:
            raise ValueError(f"attacks must be untargeted (targeted=False), got {targeted}")
        if not _is_int(every_n_val_epochs, 0):
            raise ValueError(
                f"every_n_val_epochs must be an integer >= 0 (0: never during validation), "
                f"got {every_n_val_epochs!r}"
            )
        if not _is_int(batch_size, 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if max_images is not None and not _is_int(max_images, 1):
            raise ValueError(f"max_images must be an integer >= 1 or None, got {max_images!r}")
        if not _is_int(seed, 0):
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if not _is_int(num_image_grid, 0):
            raise ValueError(f"num_image_grid must be an integer >= 0, got {num_image_grid!r}")
        if not (
            isinstance(masking_gap, numbers.Real)
            and not isinstance(masking_gap, bool)
            and 0.0 <= masking_gap <= 1.0
        ):
            raise ValueError(f"masking_gap must be a number in [0, 1], got {masking_gap!r}")
        self.attacks = list(attacks)
        self.every_n_val_epochs = every_n_val_epochs
        self.batch_size = batch_size
        self.max_images = max_images
        self.seed = seed
        self.num_image_grid = num_image_grid
        self.masking_gap = float(masking_gap)
        self.results: dict[str, dict[str, dict]] = {}

    # Lightning hooks -------------------------------------------------------------------------

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attack the test set and log ``test/perturbed_acc/<key>``."""
        self.evaluate(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Every ``every_n_val_epochs``-th epoch, attack the validation set and log ``val/...``."""
        if trainer.sanity_checking or self.every_n_val_epochs == 0:
            return
        standalone = trainer.state.fn == TrainerFn.VALIDATING
        if standalone or (trainer.current_epoch + 1) % self.every_n_val_epochs == 0:
            self.evaluate(trainer, pl_module, "val")

    # Evaluation -------------------------------------------------------------------------------

    def num_images(self, trainer: Trainer, stage: str, dataset_size: int) -> int:
        """Images to evaluate: those the trainer's ``limit_*_batches`` cover, at most ``max_images``."""
        limit = trainer.limit_test_batches if stage == "test" else trainer.limit_val_batches
        total = dataset_size
        if isinstance(limit, float):
            total = int(dataset_size * limit)
        elif isinstance(limit, int):
            loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
            if isinstance(loaders, Sequence):
                loaders = loaders[0] if loaders else None
            loader_batch = getattr(loaders, "batch_size", None)
            if loader_batch:
                total = min(dataset_size, limit * loader_batch * trainer.world_size)
        if self.max_images is not None:
            total = min(total, self.max_images)
        return total

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, spec: AttackSpec, indices) -> Tensor:
        if not spec.resolved_random_start:
            return attack_lib.attack(model, x, y, spec)
        generators = [
            torch.Generator(device=x.device).manual_seed(image_seed(self.seed, spec.key, i))
            for i in indices
        ]
        return attack_lib.attack(model, x, y, spec, generator=generators)

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> dict:
        """Attack the ``stage`` set, log and store the results; returns ``results[stage]``."""
        dataset = evaluation_dataset(trainer, stage)
        total = self.num_images(trainer, stage, len(dataset))
        mine = shard(range(total), trainer.global_rank, trainer.world_size)
        num_rounds = rounds(total, self.batch_size, trainer.world_size)
        device = pl_module.device
        width = 3 + 2 * len(self.attacks)  # index, label, clean prediction, (prediction, norm)*
        rows: list[Tensor] = []
        examples: dict[str, list[Tensor]] = {"x": [], "y": [], "clean": []}
        for spec in self.attacks:
            examples[spec.key], examples[f"{spec.key}/predicted"] = [], []
        wanted = self.num_image_grid if trainer.is_global_zero and _tensorboards(trainer) else 0
        with eval_mode(pl_module), trainer.precision_plugin.forward_context():
            for indices, x, y in batches(dataset, mine, self.batch_size, num_rounds):
                if not indices:
                    continue
                x = trainer.precision_plugin.convert_input(x.to(device))  # e.g. bf16-true weights
                y = y.to(device)
                with torch.no_grad():
                    clean = pl_module(x).argmax(dim=1)
                columns = [torch.as_tensor(indices, device=device), y, clean]
                keep = max(0, min(len(x), wanted - sum(len(e) for e in examples["x"])))
                if keep:
                    examples["x"].append(x[:keep].cpu())
                    examples["y"].append(y[:keep].cpu())
                    examples["clean"].append(clean[:keep].cpu())
                for spec in self.attacks:
                    x_adv = self._attack(pl_module, x, y, spec, indices)
                    with torch.no_grad():
                        predicted = pl_module(x_adv).argmax(dim=1)
                    columns += [predicted, _norms(x_adv - x, spec.norm)]
                    if keep:
                        examples[spec.key].append(x_adv[:keep].cpu())
                        examples[f"{spec.key}/predicted"].append(predicted[:keep].cpu())
                rows.append(torch.stack([c.double() for c in columns], dim=1).cpu())
        local = torch.cat(rows) if rows else torch.zeros(0, width, dtype=torch.float64)
        table = gather_rows(trainer, local, device=device)
        results = self._summarise(table)
        self.results[stage] = results
        for key, result in results.items():
            pl_module.log(f"{stage}/perturbed_acc/{key}", result["accuracy"], sync_dist=False)
            pl_module.log(f"{stage}/perturbation_norm/{key}", result["norm"], sync_dist=False)
        self._warn_if_masking(results)
        if wanted and examples["x"]:
            self._add_figures(trainer, stage, examples)
        return results

    def _summarise(self, table: Tensor) -> dict[str, dict]:
        labels, clean = table[:, 1], table[:, 2]
        count = len(table)
        clean_accuracy = (clean == labels).double().mean().item() if count else math.nan
        results = {}
        for j, spec in enumerate(self.attacks):
            predicted, norm = table[:, 3 + 2 * j], table[:, 4 + 2 * j]
            # robust: right on the clean image and on the adversarial one (an attack that happens to
            # land a misclassified image on its true class does not make it robust)
            robust = (predicted == labels) & (clean == labels)
            results[spec.key] = {
                "accuracy": robust.double().mean().item() if count else math.nan,
                "norm": norm.mean().item() if count else math.nan,
                "clean_accuracy": clean_accuracy,
                "num_images": count,
                "attack": spec,
            }
        return results

    def _warn_if_masking(self, results: dict[str, dict]) -> None:
        for one in self.attacks:
            if one.method != "fgm":
                continue
            for multi in self.attacks:
                if multi.method != "pgd" or (multi.norm, multi.eps) != (one.norm, one.eps):
                    continue
                gap = results[one.key]["accuracy"] - results[multi.key]["accuracy"]
                if gap > self.masking_gap:
                    rank_zero_warn(
                        f"accuracy under {one.key} ({results[one.key]['accuracy']:.4f}) exceeds "
                        f"accuracy under {multi.key} ({results[multi.key]['accuracy']:.4f}) by "
                        f"{gap:.4f} > masking_gap={self.masking_gap}: the robustness to the "
                        "one-step attack may be gradient masking; trust the multi-step number",
                        category=GradientMaskingWarning,
                    )

    def _add_figures(self, trainer: Trainer, stage: str, examples: dict[str, list[Tensor]]) -> None:
        x, y, clean = (torch.cat(examples[name]) for name in ("x", "y", "clean"))
        for spec in self.attacks:
            result = self.results[stage][spec.key]
            figure = example_figure(
                x,
                torch.cat(examples[spec.key]),
                y,
                clean,
                torch.cat(examples[f"{spec.key}/predicted"]),
                title=f"{spec.key}: accuracy {result['accuracy']:.3f} "
                f"(clean {result['clean_accuracy']:.3f}) on {result['num_images']} images",
            )
            for logger in _tensorboards(trainer):
                logger.experiment.add_figure(
                    f"{stage}/adversarial_examples/{spec.key}",
                    figure,
                    global_step=trainer.global_step,
                    close=False,
                )


def _tensorboards(trainer: Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def example_figure(
    x: Tensor, x_adv: Tensor, y: Tensor, clean: Tensor, predicted: Tensor, title: str = ""
) -> Figure:
    """Figure with clean images (true/predicted label) above their adversarial versions.

    Args:
        x: Clean images ``(n, C, H, W)`` in [0, 1] (C is 1 or 3).
        x_adv: Adversarial images ``(n, C, H, W)``.
        y: True labels ``(n,)``.
        clean: Predictions on ``x`` ``(n,)``.
        predicted: Predictions on ``x_adv`` ``(n,)``.
        title: Figure title.
    """
    n = len(x)
    figure = Figure(figsize=(1.2 * n + 0.6, 3.0), layout="constrained")
    axes = figure.subplots(2, n, squeeze=False)
    for i in range(n):
        for row, (image, label) in enumerate(((x[i], clean[i]), (x_adv[i], predicted[i]))):
            ax = axes[row, i]
            picture = image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy()
            gray = picture.shape[2] == 1
            ax.imshow(
                picture[..., 0] if gray else picture, cmap="gray" if gray else None, vmin=0, vmax=1
            )
            ax.set_xticks([])
            ax.set_yticks([])
            caption = f"y={int(y[i])} pred={int(label)}" if row == 0 else f"pred={int(label)}"
            ax.set_title(caption, fontsize=8, color="black" if int(label) == int(y[i]) else "red")
        axes[0, 0].set_ylabel("clean", fontsize=8)
        axes[1, 0].set_ylabel("attacked", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    return figure
