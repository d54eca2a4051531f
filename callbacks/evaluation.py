"""One base for the evaluation callbacks: when to run, which images, shard, batch, gather, log.

Lightning's DistributedSampler pads the evaluation set with repeated images so every process gets
the same number of batches; metrics computed on those batches count some images twice. The
evaluation callbacks instead walk the dataset themselves: each process takes the selected dataset
indices ``rank, rank + world_size, ...`` (no padding, no duplicates), computes one row of numbers
per image, and :func:`gather_rows` collects the rows of all processes, sorted by dataset index.
Every process calls the collectives the same number of times, so nothing deadlocks, and the
numbers do not depend on the number of processes.

A subclass (:class:`~callbacks.PerturbedAccuracy`, :class:`~callbacks.Certification`,
:class:`~callbacks.SmoothedAttack`) gives only its per-batch rows (:meth:`evaluate_batch`) and
their summary (:meth:`finish`); this base owns the rest, with one meaning for each setting:

* ``every_n_val_epochs``: evaluate the validation set after every k-th epoch of ``fit``
  (``(epoch + 1) % k == 0``) and in every standalone ``trainer.validate``; 0: never on validation.
  Never during the sanity check. Always at the end of ``trainer.test``.
* Which images: those the trainer evaluates (``limit_test_batches``/``limit_val_batches`` as a
  fraction or a number of loader batches), the multiples of ``skip`` among them from dataset index
  ``first_image`` on, then at most ``max_images``. Under ``fast_dev_run``, at most 2 images.

Settings that depend on the module or the data (a sigma the module lacks, an empty selection, an
attack the model's classes cannot honour) are refused in Lightning's ``setup`` hook, which runs on
every callback before any loop, so no callback (and no clean test loop) works before a refusal;
the selection is checked again at the start of each evaluation loop, when its data loader is known.
"""

from __future__ import annotations

import math
import signal
import sys
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from robust.certificates import selected_indices
from robust.checks import SettingError, check_int
from robust.sharding import (
    FAST_DEV_IMAGES,
    batches,
    evaluated_images,
    evaluation_dataset,
    gather_rows,
    rounds,
    shard,
)

__all__ = ["EvaluationCallback", "base_classifier", "module_num_classes", "module_sigma"]


class EvaluationCallback(Callback):
    """Base of the evaluation callbacks: schedule, image selection, sharding, gathering, logging.

    Subclasses implement :meth:`evaluate_batch` (rows of one batch of this process's images) and
    :meth:`finish` (the metrics of all gathered rows), and may override :meth:`pending` (which
    selected images still need work, e.g. after a resume), :meth:`on_rows` (rank 0 sees every
    gathered round, e.g. to append to a file) and :meth:`images_per_round`.

    Args:
        every_n_val_epochs: Evaluate the validation set after every k-th epoch (and in a standalone
            ``trainer.validate``); 0: never during validation.
        batch_size: Images per round on each process (results do not depend on it).
        max_images: Evaluate at most this many images (None: all selected).
        skip: Evaluate every ``skip``-th image of those the trainer evaluates.
        first_image: The first dataset index evaluated (0: from the start). Splits one evaluation
            across machines: ``first_image=6950`` does the images a run stopped at 6,950 left
            (the same multiples of ``skip`` the whole run selects).

    Examples:
        >>> class Count(EvaluationCallback):
        ...     width = 2
        ...     def evaluate_batch(self, trainer, pl_module, stage, indices, x, y):
        ...         return torch.tensor([[i, 1.0] for i in indices], dtype=torch.float64)
        ...     def finish(self, trainer, pl_module, stage, rows, partial=False):
        ...         return {"images": float(len(rows))}
        >>> Count(batch_size=8).skip
        1
    """

    width: int = 1
    """Columns of a row (column 0 is the dataset index)."""

    def __init__(
        self,
        *,
        every_n_val_epochs: int = 0,
        batch_size: int = 256,
        max_images: int | None = None,
        skip: int = 1,
        first_image: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.every_n_val_epochs = check_int(
            "every_n_val_epochs", every_n_val_epochs, minimum=0, owner=owner
        )
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.max_images = (
            None
            if max_images is None
            else check_int("max_images", max_images, minimum=1, owner=owner)
        )
        self.skip = check_int("skip", skip, minimum=1, owner=owner)
        self.first_image = check_int("first_image", first_image, minimum=0, owner=owner)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse module- and data-dependent settings before any callback or loop works.

        Lightning calls ``setup`` on every callback before the first loop starts, so one bad
        callback is refused before the others (or the clean test loop) spend any time.

        Raises:
            SettingError: From :meth:`check` or :meth:`check_selection`.
        """
        evaluated_stages = self._stages(trainer, stage)
        if not evaluated_stages:  # say so: its settings go unchecked, and it logs nothing
            warnings.warn(
                f"{type(self).__name__} evaluates nothing in {getattr(stage, 'value', stage)}: "
                "it runs in test, and in "
                f"validation when every_n_val_epochs > 0 (it is {self.every_n_val_epochs})",
                UserWarning,
                stacklevel=2,
            )
        for evaluated in evaluated_stages:
            self.check(trainer, pl_module, evaluated)
            self.check_selection(trainer, evaluated, self._setup_dataset(trainer, evaluated))
        self.check_outputs_are_own(trainer, stage)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse an empty selection of the test images (their loader is known now)."""
        self.check_selection(trainer, "test")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse an empty selection of the validation images when they will be evaluated."""
        if self.every_n_val_epochs:
            self.check_selection(trainer, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate the test set."""
        self.run(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate the validation set when the schedule says so (see the module docstring)."""
        if self.evaluates_validation(trainer):
            self.run(trainer, pl_module, "val")

    def evaluates_validation(self, trainer: Trainer) -> bool:
        """Whether the validation now ending is one this callback evaluates (and logs).

        Every ``every_n_val_epochs``-th epoch's, and a standalone ``validate``'s; never the
        sanity check's.
        """
        if trainer.sanity_checking or self.every_n_val_epochs == 0:
            return False
        standalone = trainer.state.fn == TrainerFn.VALIDATING
        return standalone or (trainer.current_epoch + 1) % self.every_n_val_epochs == 0

    # ------------------------------------------------------------------ to override
    def evaluate_batch(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        indices: list[int],
        images: Tensor,
        labels: Tensor,
    ) -> Tensor:
        """Rows ``(len(indices), width)`` for a batch of this process's images (on its device)."""
        raise NotImplementedError

    def finish(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        stage: str,
        rows: Tensor,
        partial: bool = False,
    ) -> dict[str, float]:
        """Metrics (logged as ``<prefix>/<name>``) of all gathered rows of the selected images.

        ``partial``: the evaluation was stopped (SIGTERM during ``fit``) before all the selected
        images were done. The metrics' names are what counts (their values are logged as NaN);
        nothing else may keep or show numbers of the part (results, warnings, figures, files).
        """
        raise NotImplementedError

    def pending(
        self, trainer: Trainer, pl_module: LightningModule, stage: str, selected: list[int]
    ) -> list[int]:
        """The selected images that still need :meth:`evaluate_batch` (default: all)."""
        return selected

    def on_rows(self, trainer: Trainer, stage: str, rows: Tensor) -> None:
        """Called on every process with each round's gathered rows (default: nothing)."""

    def images_per_round(self, stage: str) -> int:
        """Images per round and process (default ``batch_size``)."""
        return self.batch_size

    def metric_prefix(self, stage: str) -> str:
        """Prefix of the logged metrics of ``stage`` (default: the stage name)."""
        return stage

    logged_names: tuple[str, ...] = ("",)
    """How the names this callback logs begin after ``<prefix>/`` (``""``: every name there). A
    callback whose prefix is the stage's own (``val``, shared with the module's ``val/acc``) must
    narrow it, so that :meth:`logs` does not claim the module's metrics."""

    def logs(self, key: str, stage: str) -> bool:
        """Whether ``key`` is one of the metrics this callback logs when it evaluates ``stage``.

        Examples:
            >>> from callbacks import PerturbedAccuracy
            >>> from robust.attacks import AttackSpec
            >>> callback = PerturbedAccuracy([AttackSpec("fgm", "2", 1.0)])
            >>> callback.logs("val/perturbed_acc/fgm_l2_eps1", "val"), callback.logs("val/acc", "val")
            (True, False)
        """
        prefix = f"{self.metric_prefix(stage)}/"
        return key.startswith(prefix) and key[len(prefix) :].startswith(self.logged_names)

    def claimed_outputs(self, stage: str) -> frozenset[str]:
        """Metric names (prefix included) and files that evaluating ``stage`` always writes.

        No two evaluation callbacks of one trainer may claim the same one
        (:meth:`check_outputs_are_own`): Lightning would log the mean of their values, and a
        file would hold the last one's. Default: none.
        """
        return frozenset()

    def check(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse settings the module cannot honour, before any work (default: none).

        Called from ``setup`` for each stage this callback will evaluate (``"test"``, ``"val"``).

        Raises:
            SettingError: Naming the setting and its allowed values.
        """

    # ------------------------------------------------------------------ checks
    def check_outputs_are_own(self, trainer: Trainer, fn: str) -> None:
        """Refuse another evaluation callback of the trainer that writes one of this one's outputs.

        Raises:
            SettingError: Naming both callbacks and the metric or file they share.
        """
        for other in trainer.callbacks:
            if other is self or not isinstance(other, EvaluationCallback):
                continue
            for stage in set(self._stages(trainer, fn)) & set(other._stages(trainer, fn)):
                shared = sorted(self.claimed_outputs(stage) & other.claimed_outputs(stage))
                if shared:
                    raise SettingError(
                        f"two evaluation callbacks ({type(self).__name__}, "
                        f"{type(other).__name__}) would both write {shared[0]} in {stage}: "
                        "Lightning would log the mean of the two, and a file would keep only "
                        "one; keep one of them (a PerturbedAccuracy takes a list of attacks)"
                    )

    def _stages(self, trainer: Trainer, fn: str) -> list[str]:
        """The stages this callback evaluates in the trainer function ``fn`` (fit, test, ...)."""
        if fn == "test":
            return ["test"]
        if fn in ("fit", "validate") and self.every_n_val_epochs and trainer.limit_val_batches:
            return ["val"]
        return []

    @staticmethod
    def _setup_dataset(trainer: Trainer, stage: str) -> Any:
        """The data module's set of ``stage`` when that module supplies this run's data, else None.

        Data loaders given to ``trainer.test(dataloaders=...)`` are only known when the loop
        starts; then :meth:`check_selection` runs from ``on_test_start``/``on_validation_start``.
        """
        datamodule = getattr(trainer, "datamodule", None)
        loop = trainer.test_loop if stage == "test" else trainer.fit_loop.epoch_loop.val_loop
        if trainer.state.fn == TrainerFn.VALIDATING:
            loop = trainer.validate_loop
        source = getattr(getattr(loop, "_data_source", None), "instance", None)
        if datamodule is None or source is not datamodule:
            return None
        return getattr(datamodule, f"{stage}_set", None)

    def check_selection(self, trainer: Trainer, stage: str, dataset: Any = None) -> None:
        """Refuse settings that select none of the images the trainer evaluates.

        Args:
            trainer: The trainer.
            stage: ``"test"`` or ``"val"``.
            dataset: The evaluated dataset; None: the running loop's (nothing is checked when
                there is none yet).

        Raises:
            SettingError: Naming ``first_image``, ``skip``, ``max_images`` and the image count.
        """
        limit = trainer.limit_test_batches if stage == "test" else trainer.limit_val_batches
        if not limit:
            return  # the loop does not run
        if dataset is None:
            try:
                dataset = evaluation_dataset(trainer, stage)
            except RuntimeError:
                return
        try:
            size = len(dataset)
        except TypeError:
            return  # an iterable dataset: Lightning itself refuses it for evaluation
        if self.select(trainer, stage, size):
            return
        end = self.evaluated_range(trainer, stage, size)
        owner = type(self).__name__
        counted = f"{end} {stage} images the trainer evaluates (of {size} in the data set)"
        if end > 0:
            last = (end - 1) // self.skip * self.skip
            allowed = f"first_image must be <= {last}, the last multiple of skip below {end}"
        else:
            allowed = f"the trainer evaluates none (limit_{stage}_batches={limit})"
        raise SettingError(
            f"{owner} selects none of the {counted}: first_image={self.first_image}, "
            f"skip={self.skip}, max_images={self.max_images}; {allowed}"
        )

    # ------------------------------------------------------------------ machinery
    def select(self, trainer: Trainer, stage: str, dataset_size: int) -> list[int]:
        """Dataset indices to evaluate (:func:`~robust.certificates.selected_indices`)."""
        end = self.evaluated_range(trainer, stage, dataset_size)
        selected = list(selected_indices(end, self.skip, self.first_image, self.max_images))
        if trainer.fast_dev_run:
            selected = selected[:FAST_DEV_IMAGES]
        return selected

    def evaluated_range(self, trainer: Trainer, stage: str, dataset_size: int) -> int:
        """How many of the first dataset images the trainer evaluates (its batch limit applied).

        :func:`robust.sharding.evaluated_images`: the images of the whole batches Lightning runs.
        """
        return evaluated_images(trainer, stage, dataset_size)

    def run(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, float]:
        """Evaluate the selected images of ``stage`` on all processes; log and return the metrics."""
        dataset = evaluation_dataset(trainer, stage)
        selected = self.select(trainer, stage, len(dataset))  # type: ignore[arg-type]
        todo = self.pending(trainer, pl_module, stage, selected)
        per_round = self.images_per_round(stage)
        mine = shard(todo, trainer.global_rank, trainer.world_size)
        num_rounds = rounds(len(todo), per_round, trainer.world_size)
        device = pl_module.device
        parts: list[Tensor] = []
        stopped = False
        bar = self.progress_bar(trainer, stage, len(todo))
        try:
            for indices, images, labels in batches(dataset, mine, per_round, num_rounds):
                if indices:
                    local = self.evaluate_batch(
                        trainer, pl_module, stage, indices, images.to(device), labels.to(device)
                    )
                else:
                    local = torch.zeros(0, self.width, dtype=torch.float64)
                gathered = gather_rows(trainer, local.detach().double().cpu(), device=device)
                self.on_rows(trainer, stage, gathered)
                parts.append(gathered)
                if bar is not None:
                    bar.update(len(gathered))
                stopped = self.stop_on_sigterm(trainer, stage, sum(map(len, parts)), len(todo))
                if stopped:
                    break
        finally:
            if bar is not None:
                bar.close()
        rows = torch.cat(parts) if parts else torch.zeros(0, self.width, dtype=torch.float64)
        metrics = self.finish(trainer, pl_module, stage, rows, partial=stopped)
        if stopped:  # a part of the images: no number of this epoch stands for all of them
            metrics = dict.fromkeys(metrics, math.nan)
        prefix = self.metric_prefix(stage)
        for name, value in metrics.items():
            pl_module.log(f"{prefix}/{name}", float(value), sync_dist=False, rank_zero_only=False)
        return metrics

    def stop_on_sigterm(self, trainer: Trainer, stage: str, done: int, total: int) -> bool:
        """Stop after a round, its rows saved, once any process has received SIGTERM.

        Lightning's handler only notes the signal (``trainer.received_sigterm``), and its loops
        act on it between batches; this evaluation runs after the last batch, so a ``kill`` or a
        scheduler's notice used to be ignored until every image was done. All processes decide
        together (:meth:`~lightning.pytorch.strategies.Strategy.reduce_boolean_decision`), so
        none waits for another in the next round.

        During ``fit`` the evaluation of the validation set only stops (returns True; its
        metrics are then NaN): raising there would lose the epoch just trained, whose
        checkpoints Lightning saves after the validation; its fit loop then stops, on every
        process (the signal is noted on those that did not receive it).

        Returns:
            Whether to stop (False: go on).

        Raises:
            SIGTERMException: Outside ``fit``, with exit status 143 (128 + SIGTERM).
        """
        if not trainer.strategy.reduce_boolean_decision(bool(trainer.received_sigterm), all=False):
            return False
        fitting = stage == "val" and trainer.state.fn == TrainerFn.FITTING
        if fitting:
            kept = (
                f"this epoch's {self.metric_prefix(stage)}/ metrics are NaN; the epoch's "
                "checkpoints are saved, then training stops"
            )
        else:
            kept = self.saved_rows_note(stage)
        if trainer.is_global_zero:
            print(
                f"{type(self).__name__}: stopped by SIGTERM after {done} of {total} {stage} "
                f"images; {kept}",
                file=sys.stderr,
                flush=True,
            )
        if fitting:
            connector = getattr(trainer, "_signal_connector", None)
            if hasattr(connector, "received_sigterm"):
                # Lightning's fit loop stops only the processes that received the signal
                # themselves: mark it on every process, so that all of them stop together
                connector.received_sigterm = True
                return True
        raise SIGTERMException(128 + signal.SIGTERM)

    def saved_rows_note(self, stage: str) -> str:
        """What an interrupted evaluation keeps (default: nothing, there is no output file)."""
        return "nothing of it is saved (this callback writes no file)"

    def rate(self) -> str | None:
        """Extra text for the progress bar, e.g. a throughput (default: none)."""
        return None

    def progress_bar(self, trainer: Trainer, stage: str, total: int) -> Any:
        """A tqdm bar on rank 0 when the trainer shows progress, else None; shows :meth:`rate`."""
        if not (trainer.is_global_zero and trainer.progress_bar_callback is not None and total):
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"{type(self).__name__} {stage}", unit="img", leave=False)
        update = bar.update

        def update_with_rate(count: int) -> None:
            text = self.rate()
            if text:
                bar.set_postfix_str(text)
            update(count)

        bar.update = update_with_rate
        return bar

    @staticmethod
    def on_rank_zero(trainer: Trainer, work: Any, owner: str) -> Any:
        """Run ``work()`` on rank 0 and give its result to every process.

        A refusal (``ValueError``, ``TypeError``) or an I/O error on rank 0 is raised on every
        process as one ``SettingError``. Any other exception is raised as itself on rank 0 (its
        traceback is a defect's) and as a ``RuntimeError`` naming it on the others. Every rank
        reaches the broadcast either way, so none waits in it for a rank that failed.
        """
        outcome: tuple[Any, str | None, bool] = (None, None, False)
        failure: Exception | None = None
        if trainer.is_global_zero:
            try:
                outcome = (work(), None, False)
            except (ValueError, TypeError) as err:  # TypeError: settings that are not JSON
                outcome = (None, str(err), False)
            except OSError as err:
                outcome = (None, f"{owner}: {type(err).__name__}: {err}", False)
            except Exception as err:
                failure = err
                outcome = (None, f"{owner} failed on rank 0: {type(err).__name__}: {err}", True)
        result, error, unexpected = trainer.strategy.broadcast(outcome, src=0)
        if failure is not None:
            raise failure
        if unexpected:
            raise RuntimeError(error)
        if error is not None:
            raise SettingError(error)
        return result

    @staticmethod
    def tensorboards(trainer: Trainer) -> list[TensorBoardLogger]:
        """The trainer's TensorBoard loggers."""
        return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def add_figure(self, trainer: Trainer, tag: str, figure: Any) -> None:
        """Rank 0: add a matplotlib figure to every TensorBoard logger."""
        if not trainer.is_global_zero:
            return
        for logger in self.tensorboards(trainer):
            logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)


def base_classifier(pl_module: LightningModule) -> nn.Module:
    """The pixel-space classifier: ``pl_module.model`` when there is one, else the module.

    Examples:
        >>> from lightning.pytorch import LightningModule
        >>> from torch import nn
        >>> module = LightningModule()
        >>> module.model = nn.Linear(2, 2)
        >>> base_classifier(module) is module.model
        True
    """
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def module_num_classes(pl_module: LightningModule, owner: str) -> int:
    """The module's ``num_classes``; ``SettingError`` naming ``owner`` when it has none.

    Examples:
        >>> from lightning.pytorch import LightningModule
        >>> module = LightningModule()
        >>> module.num_classes = 10
        >>> module_num_classes(module, "Certification")
        10
    """
    num_classes = getattr(pl_module, "num_classes", None)
    if isinstance(num_classes, int) and num_classes >= 2:
        return num_classes
    raise SettingError(
        f"{owner} needs the module's `num_classes` (an int >= 2); "
        f"{type(pl_module).__name__} has {num_classes!r}"
    )


def module_sigma(pl_module: LightningModule, sigma: float | None, owner: str) -> float:
    """``sigma`` when given, else the module's positive ``sigma`` (a noise-trained model's).

    Examples:
        >>> from lightning.pytorch import LightningModule
        >>> module = LightningModule()
        >>> module.sigma = 0.25
        >>> module_sigma(module, None, "Certification"), module_sigma(module, 0.5, "Certification")
        (0.25, 0.5)
    """
    if sigma is not None:
        return sigma
    value = getattr(pl_module, "sigma", None)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise SettingError(
            f"{owner} sigma is not set and the module has no positive `sigma` "
            f"({type(pl_module).__name__}); give {owner}(sigma=...)"
        )
    return float(value)
