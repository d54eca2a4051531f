"""Standard (clean) training: the base LightningModule that the robust trainings extend."""

import importlib
import inspect
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.backbones import Normalize, SmallCNN
from robust._attack_core import float_logits
from robust.checks import SettingError
from robust.modes import eval_mode
from robust.sharding import (
    FAST_DEV_IMAGES,
    batches,
    evaluated_images,
    evaluation_dataset,
    gather_rows,
    image_seed,
    rounds,
    sampler_padding,
    shard,
)

TRAINING_RNG_KEY = "training_rng_of_process"
"""Key of :func:`robust.sharding.image_seed` that derives process ``r``'s training RNG seed."""

DATA_IDENTITY_KEY = "data_identity"
"""Checkpoint entry holding the training data module's ``identity()``."""

BackboneFactory = Callable[[int, int], nn.Module]
RowFunction = Callable[[list[int], Tensor, Tensor], Tensor]
"""``(dataset indices, images, labels) -> (B, k)`` result rows of one batch of images."""


def _adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def import_path(value: object) -> str | None:
    """``module.qualname`` of a class or function that another process imports back as ``value``.

    None for a lambda, a class defined in a function, or one of a script run as ``__main__``.

    Examples:
        >>> import_path(torch.nn.Linear), import_path(lambda: 0)
        ('torch.nn.modules.linear.Linear', None)
    """
    module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(name, str) or "<" in name:
        return None
    if module == "__main__":
        return None
    try:
        found: Any = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}.{name}" if found is value else None


FACTORY_SETTINGS = ("backbone", "optimizer", "lr_scheduler")
"""The settings of :class:`StandardClassifier` that take a class or function (a factory)."""


def saved_as_the_cli_saves(hparams: dict, module_class: type) -> None:
    """Rewrite a Python-built module's hyperparameters as Lightning's CLI saves them (in place).

    A class (the backbone) or function (the optimizer factory) in a checkpoint is a pickled
    reference that ``torch.load(weights_only=True)``, torch's default, refuses; the CLI stores
    their import paths and the instantiator that rebuilds the module from them. With the same
    here, ``load_from_checkpoint`` loads a checkpoint of a module built in Python as one of the
    CLI's. Left as it is when the module's class or a factory has no import path (a lambda, a
    partial, a class of ``__main__``) or another setting holds a class or function (whose
    rebuilding would depend on its annotation).
    """
    if "_instantiator" in hparams:  # built by the CLI
        return
    class_path = import_path(module_class)
    if class_path is None:
        return
    paths = {}
    for name, value in hparams.items():
        if name in FACTORY_SETTINGS and value is None:
            continue
        factory = isinstance(value, type) or inspect.isfunction(value)
        if name in FACTORY_SETTINGS and factory and (path := import_path(value)) is not None:
            paths[name] = {"class_path": path, "init_args": {}} if isinstance(value, type) else path
        elif name in FACTORY_SETTINGS or callable(value):
            return
    hparams.update(paths)
    hparams["_class_path"] = class_path
    hparams["_instantiator"] = "lightning.pytorch.cli.instantiate_module"


class WeightedMean(Metric):
    """``sum(weight * value) / sum(weight)`` over batches and processes, NaN kept.

    torchmetrics' ``MeanMetric`` drops NaN values by default (a batch whose loss diverged would
    vanish from the mean) and, told not to, ignores the weights (torchmetrics 1.9).

    Examples:
        >>> mean = WeightedMean()
        >>> mean.update(torch.tensor(2.0), 3)
        >>> mean.update(torch.tensor(float("nan")), 0)  # weighs nothing
        >>> mean.update(torch.tensor(6.0), 1)
        >>> mean.compute().item()
        3.0
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: int) -> None:
        """Add ``value`` (a scalar) with ``weight`` >= 0 (0: nothing, whatever the value)."""
        if weight:
            self.total += value.detach().float() * weight
            self.weight += weight

    def compute(self) -> Tensor:
        """The weighted mean (NaN where a counted value was NaN, or nothing was counted)."""
        return self.total / self.weight


def plateau_mode_problem(scheduler: ReduceLROnPlateau, monitor: str, mode: str) -> str | None:
    """Why a ``ReduceLROnPlateau`` following ``monitor`` (better when ``mode``) is wrong, or None.

    Examples:
        >>> plateau = ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1)], lr=0.1))  # mode min
        >>> plateau_mode_problem(plateau, "val/acc", "max")
        'would lower the learning rate while val/acc, its monitor, rises; set its mode to max'
    """
    if scheduler.mode == mode:
        return None
    moves = "rises" if mode == "max" else "falls"
    return (
        f"would lower the learning rate while {monitor}, its monitor, {moves}; "
        f"set its mode to {mode}"
    )


def validation_evaluation_of(trainer: Any, key: str) -> Any | None:
    """The evaluation callback that logs the validation metric ``key`` on its own schedule.

    Such a callback (``every_n_val_epochs`` > 0 and ``logs(key, stage)``, e.g.
    :class:`callbacks.PerturbedAccuracy`) logs only every ``every_n_val_epochs`` epochs, and
    Lightning's ``callback_metrics`` keep an earlier epoch's value in between: whatever follows
    ``key`` (a checkpoint, a plateau scheduler) must act on its epochs only. None: no such
    callback (the module's own ``val/acc`` and the like). Duck-typed, so that the modules do not
    import the callbacks.

    Examples:
        >>> from types import SimpleNamespace
        >>> logs = lambda key, stage: key.startswith(f"{stage}/perturbed_acc/")
        >>> every_2 = SimpleNamespace(every_n_val_epochs=2, logs=logs)
        >>> trainer = SimpleNamespace(callbacks=[every_2])
        >>> validation_evaluation_of(trainer, "val/perturbed_acc/fgm") is every_2
        True
        >>> validation_evaluation_of(trainer, "val/acc") is None
        True
    """
    for callback in getattr(trainer, "callbacks", None) or []:
        every = getattr(callback, "every_n_val_epochs", None)
        logs = getattr(callback, "logs", None)
        scheduled = isinstance(every, int) and not isinstance(every, bool) and every > 0
        if scheduled and callable(logs) and logs(key, "val"):
            return callback
    return None


class StandardClassifier(LightningModule):
    """Image classifier trained on clean images with cross-entropy.

    The network is ``Normalize(mean, std)`` followed by the injected backbone, so it maps pixel-space
    images in [0, 1] to logits. Subclasses change only :meth:`training_loss` (what the model is
    trained on); evaluation, metrics, optimizers and prediction are shared.

    Args:
        backbone: Builds the backbone as ``backbone(in_channels, num_classes)``; in YAML a
            ``class_path`` such as ``lightning_modules.backbones.LeNet`` with optional ``init_args``.
        num_classes: Number of classes (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        image_size: Image height and width (linked from the data module); the backbone is checked
            against it at construction so a mismatch fails before training.
        mean: Per-channel normalization mean (linked from the data module).
        std: Per-channel normalization std (linked from the data module).
        optimizer: Optimizer factory; Adam with lr 1e-3 by default.
        lr_scheduler: Optional LR scheduler factory.

    Under DDP every process starts with the same global RNG (``seed_everything``); at the start of
    ``fit`` process ``r > 0`` reseeds it from ``(initial seed, r)`` (:meth:`on_fit_start`), so the
    processes draw different training noise and random starts. One process is left as it was.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        saved_as_the_cli_saves(self.hparams, type(self))
        self.num_classes = num_classes
        self.image_shape = (in_channels, *image_size)
        self.model = nn.Sequential(Normalize(mean, std), backbone(in_channels, num_classes))
        self._check_backbone_takes_images()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # Lightning's own sync_dist mean floors its integer count of images when the processes
        # evaluate unequal numbers (Lightning-AI/pytorch-lightning#21859)
        self.val_loss, self.test_loss = WeightedMean(), WeightedMean()

    def _check_backbone_takes_images(self) -> None:
        """Fail at configuration time when the backbone cannot take the data's images."""
        # the built module's class: the factory may be a wrapper (LightningCLI's, a partial)
        name = type(self.model[1]).__name__
        shape = "x".join(map(str, self.image_shape))
        try:
            # eval mode for the check only: each submodule's own mode (a frozen one) restored
            with torch.no_grad(), eval_mode(self.model):
                out = self.model(torch.zeros(1, *self.image_shape))
        except RuntimeError as err:
            raise ValueError(
                f"backbone {name} cannot take images of shape {shape} (channels x height x width) "
                f"given by the data module: {str(err).splitlines()[0]}"
            ) from None
        if out.shape != (1, self.num_classes):
            raise ValueError(
                f"backbone {name} returned shape {tuple(out.shape)} for one {shape} image; "
                f"expected (1, {self.num_classes}) logits"
            )

    def on_fit_start(self) -> None:
        """Refuse a warm-up the run never finishes; give each DDP process its own RNG stream.

        Raises:
            SettingError: When ``trainer.max_epochs`` ends the run before the first epoch at full
                strength (:meth:`first_full_strength_epoch`); not in a ``fast_dev_run``.
        """
        trainer = self.trainer
        warmup = self.first_full_strength_epoch()
        max_epochs = trainer.max_epochs
        if warmup and not trainer.fast_dev_run and max_epochs is not None and max_epochs >= 0:
            setting, first = warmup
            if max_epochs <= first:
                raise SettingError(
                    f"model {setting} {getattr(self, setting)} leaves no epoch at full strength "
                    f"in trainer.max_epochs {max_epochs}: it begins with epoch {first + 1} "
                    f"(counting from 1); set trainer.max_epochs >= {first + 1} or a shorter "
                    f"{setting}"
                )
        self._fit_seed = torch.initial_seed()  # seed_everything's, before any reseeding here
        if trainer.global_rank > 0:
            seed = image_seed(self._fit_seed, TRAINING_RNG_KEY, trainer.global_rank)
            torch.manual_seed(seed)

    def on_train_epoch_start(self) -> None:
        """Seed each process's RNG (CPU and CUDA) from (seed, epoch, rank) alone for the epoch.

        The training noise, attacks' random starts and a loader's shuffle without a sampler of
        its own draw from it; a run resumed at epoch E (``fit --ckpt_path last``, which seeds
        afresh) then draws what an uninterrupted run draws there, not epoch 0's numbers again.
        """
        seed = getattr(self, "_fit_seed", None)
        if seed is None:  # the hooks called by hand, without fit
            seed = self._fit_seed = torch.initial_seed()
        epoch = self.trainer.current_epoch
        torch.manual_seed(image_seed(seed, f"{TRAINING_RNG_KEY}@epoch{epoch}", self.global_rank))

    def first_full_strength_epoch(self) -> tuple[str, int] | None:
        """``(warm-up setting, first 0-based epoch trained at full strength)``, None without one."""
        return None

    whole_sequentials = ("model",)
    """``forward`` only calls ``self.model(x)``: the attacks may run a rewritten copy of it
    (:func:`robust.pool_first.sequential_replacements`). A subclass with its own ``forward``
    does not inherit this."""

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` for pixel-space images ``(B, C, H, W)`` in [0, 1]."""
        return self.model(x)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record which images the model was trained on (the data module's ``identity()``).

        The CLI compares it with the data of a later ``test``, ``validate`` or resumed ``fit``,
        so a model is not evaluated on images it may have been trained on without a word.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        identity = getattr(datamodule, "identity", None)
        if callable(identity):
            # JSON values (lists, not tuples): what the CLI compares it with
            checkpoint[DATA_IDENTITY_KEY] = json.loads(json.dumps(identity()))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """In ``load_from_checkpoint``, keep the import paths this module was rebuilt from.

        Lightning's CLI instantiator hands ``__init__`` jsonargparse's factories (partials),
        which a checkpoint saved from the reloaded module would pickle; its hyperparameters
        become the checkpoint's, so that checkpoint loads with ``weights_only=True`` too. (A
        trainer's resume, with a trainer attached, changes nothing.)
        """
        saved = checkpoint.get("hyper_parameters")
        rebuilt = isinstance(saved, dict) and "_instantiator" in saved
        if rebuilt and self._trainer is None and "_instantiator" not in self.hparams:
            self.hparams.clear()
            self.hparams.update(saved)

    def training_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Loss to minimise on one training batch.

        Returns:
            The loss, the logits the training accuracy is measured on, and their targets.
        """
        logits = self(x)
        return F.cross_entropy(float_logits(logits), y), logits, y

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Train on one batch and log ``train/loss`` and ``train/acc``."""
        x, y = batch[0], batch[1]
        loss, logits, targets = self.training_loss(x, y)
        self.train_acc(logits.detach(), targets)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch: Sequence[Tensor], batch_idx: int, stage: str) -> None:
        """Clean accuracy and mean loss of one evaluation batch, the sampler's repeats left out."""
        accuracy, mean_loss = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_loss")
        x, y = batch[0], batch[1]
        logits = self(x)
        padded = sampler_padding(self._trainer, stage, batch_idx, len(y)) if self._trainer else None
        repeats = 0 if padded is None else int(padded.sum())
        # the distributed sampler's repeats are left out: each image counts once, as on one process
        counted = len(y) - repeats
        if 0 < repeats < len(y):
            keep = ~padded.to(y.device)
            logits, y = logits[keep], y[keep]
        if counted:
            accuracy.update(logits, y)
        # updated on every process and batch (their epoch-end reduction is a collective call); a
        # batch of repeats only weighs nothing in the mean
        mean_loss.update(F.cross_entropy(float_logits(logits), y), weight=counted)
        self.log(f"{stage}/loss", mean_loss)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Log clean ``val/loss`` and ``val/acc`` (on N processes, each image once)."""
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Log clean ``test/loss`` and ``test/acc`` (on N processes, each image once)."""
        self._evaluate(batch, batch_idx, "test")

    def predict_step(self, batch: Sequence[Tensor] | Tensor, batch_idx: int) -> Tensor:
        """Predicted classes ``(B,)`` for a batch of images (with or without labels)."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).argmax(dim=1)

    # Exact validation on a fixed set of images (robust and noisy validation) -------------------

    def validation_image_count(self, requested: int) -> int:
        """How many of the first ``requested`` validation images an exact validation evaluates.

        Like the evaluation callbacks (:mod:`callbacks.evaluation`): of the whole batches that
        ``limit_val_batches`` lets Lightning run (:func:`robust.sharding.evaluated_images`); under
        ``fast_dev_run`` at most 2 images.
        """
        trainer = self.trainer
        dataset = evaluation_dataset(trainer, "val")
        total = min(requested, evaluated_images(trainer, "val", len(dataset)))  # type: ignore[arg-type]
        return min(total, FAST_DEV_IMAGES) if trainer.fast_dev_run else total

    def exact_validation_rows(
        self, requested: int, batch_size: int, width: int, rows_of: RowFunction
    ) -> Tensor:
        """Rows of ``rows_of`` for the first ``requested`` validation images, each image once.

        Each process evaluates every N-th image (no padding, no repeats) in eval mode under the
        trainer's precision, and the rows of all processes are gathered
        (:func:`robust.sharding.gather_rows`), so the result depends neither on ``batch_size`` nor
        on the number of processes when ``rows_of`` seeds its random parts per image.

        Args:
            requested: Images wanted (fewer where :meth:`validation_image_count` says so).
            batch_size: Images per batch on each process.
            width: Columns of each row (a process with no images sends ``(0, width)``).
            rows_of: Called as ``rows_of(indices, images, labels)`` (images in [0, 1] on the
                module's device and in the precision's input dtype); returns ``(B, width)`` rows
                whose column 0 is the dataset index.

        Returns:
            ``(images, width)`` float64 rows on the CPU, the same on every process, sorted by index.
        """
        trainer = self.trainer
        dataset = evaluation_dataset(trainer, "val")
        total = self.validation_image_count(requested)
        mine = shard(range(total), trainer.global_rank, trainer.world_size)
        num_rounds = rounds(total, batch_size, trainer.world_size)
        parts: list[Tensor] = []
        with eval_mode(self), trainer.precision_plugin.forward_context():
            for indices, x, y in batches(dataset, mine, batch_size, num_rounds):
                if indices:
                    x = trainer.precision_plugin.convert_input(x.to(self.device))
                    parts.append(rows_of(indices, x, y.to(self.device)).double().cpu())
        local = torch.cat(parts) if parts else torch.zeros(0, width, dtype=torch.float64)
        return gather_rows(trainer, local, device=self.device)

    def configure_optimizers(self):  # noqa: D102 (Lightning hook)
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            return {"optimizer": optimizer, "lr_scheduler": self._plateau_schedule(scheduler)}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler}}

    def _plateau_schedule(self, scheduler: ReduceLROnPlateau) -> dict[str, Any]:
        """``ReduceLROnPlateau`` on the metric that picks the best checkpoint, when it is logged.

        The checkpoint's ``monitor`` (``val/acc``, ``val/noisy_acc``, ``val/robust_acc``; else
        ``val/acc``), stepped every ``check_val_every_n_epoch`` epochs (Lightning stopped the
        run at the first epoch without validation), or, for an evaluation callback's metric,
        in the epochs that callback evaluates too (:func:`validation_evaluation_of`); its
        ``mode`` must be the checkpoint's (``min`` on an accuracy cut the rate while the model
        improved).

        Raises:
            SettingError: The scheduler's mode is not the monitored metric's.
        """
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached yet (the CLI's check of the settings)
            trainer = None
        checkpoint = getattr(trainer, "checkpoint_callback", None)
        monitor = getattr(checkpoint, "monitor", None)
        mode = checkpoint.mode if monitor else "max"
        monitor = monitor or "val/acc"
        problem = plateau_mode_problem(scheduler, monitor, mode)
        if trainer is not None and problem:  # the CLI refuses it up front too
            raise SettingError(f"model lr_scheduler ReduceLROnPlateau {problem}")
        every = getattr(trainer, "check_val_every_n_epoch", None)
        frequency = every if isinstance(every, int) and every >= 1 else 1
        evaluation = validation_evaluation_of(trainer, monitor)
        if evaluation is not None:  # logged in the epochs of both schedules
            frequency = math.lcm(frequency, evaluation.every_n_val_epochs)
        return {"scheduler": scheduler, "monitor": monitor, "frequency": frequency}
