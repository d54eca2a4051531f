"""Shared data-module behaviour: settings, seeded stratified splits and data loaders."""

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from robust.checks import SettingError, check_int, check_real
from robust.sharding import image_seed

SHUFFLE_KEY = "training_order"
"""Key of :func:`robust.sharding.image_seed` that derives an epoch's training order."""
WORKER_SEED_KEY = "training_loader_workers"
"""Key of :func:`robust.sharding.image_seed` that derives the loader workers' base seed."""


def training_seed() -> int:
    """The run's seed as Lightning records it (``seed_everything`` sets ``PL_GLOBAL_SEED``), else 0.

    The seed Lightning's ``DistributedSampler`` shuffles with, too.
    """
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(size)`` drawn afresh for each epoch from (seed, epoch) alone.

    PyTorch's ``RandomSampler`` draws from the process's RNG, which a resumed ``fit`` seeds
    afresh: a run resumed at epoch E replayed epoch 0's order (and E + 1 epoch 1's). This one
    reads the epoch when it is iterated, so epoch E has the same order resumed or not.

    Args:
        size: Number of indices.
        seed: The run's seed.
        epoch: Called at each iteration: the epoch it is for.

    Examples:
        >>> epoch = 0
        >>> order = EpochShuffle(5, seed=0, epoch=lambda: epoch)
        >>> first = list(order)
        >>> sorted(first), first == list(order)
        ([0, 1, 2, 3, 4], True)
        >>> epoch = 1
        >>> list(order) != first
        True
    """

    def __init__(self, size: int, seed: int, epoch: Callable[[], int]) -> None:
        self.size, self.seed, self.epoch = size, seed, epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        seed = image_seed(self.seed, SHUFFLE_KEY, self.epoch())
        yield from torch.randperm(self.size, generator=torch.Generator().manual_seed(seed)).tolist()


SPLIT_METHOD = "stratified_split/1"
"""Name and version of the split algorithm, part of every identity: change it with the algorithm."""

INTERLEAVED_SPLIT_METHOD = "stratified_split/2"
"""The split with each part's classes interleaved (``interleave=True``), for files ordered by
class: there version 1's sorted indices made every prefix of a part one or two classes."""

MAX_SEED = 2**32 - 1
"""Largest split seed: ``torch.Generator.manual_seed`` takes up to 2**64 - 1, but the CPU
generator (Mersenne Twister) keeps only the low 32 bits, so 0 and 2**32 would give the same split."""


class DataNotFoundError(FileNotFoundError):
    """Dataset files are missing and could not be downloaded; the message says what to do."""


def stratified_split(
    labels: Tensor, fractions: Sequence[float], seed: int, interleave: bool = False
) -> list[Tensor]:
    """Split indices into parts with the given fractions, class by class, deterministically.

    Every class is shuffled with a generator seeded by ``seed`` and cut in the same proportions,
    so each part has the class balance of the whole. The last part takes the remainder. Each part
    is in index order, or, with ``interleave``, with the classes interleaved in rounds (each
    class's first image, then each class's second, ..., the classes in a random order within a
    round), so that its first images are balanced and every k-th is a random draw: evaluations
    limited to a prefix (``max_images``, ``limit_test_batches``, robust validation's first
    images) or a stride (``skip``) then see every class even when the file is ordered by class.

    Args:
        labels: Integer labels ``(N,)``.
        fractions: Fractions of all parts but the last, each in (0, 1), summing to less than 1.
        seed: Seed of the shuffle, in [0, :data:`MAX_SEED`].
        interleave: Order each part by class rank (:data:`INTERLEAVED_SPLIT_METHOD`), not index.

    Returns:
        One index tensor per part (``len(fractions) + 1`` parts), disjoint and covering all.
        :func:`split_sizes` gives their sizes without shuffling.

    Examples:
        >>> labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 2)  # ordered by class
        >>> first, rest = stratified_split(labels, [0.5], seed=0)
        >>> labels[first].tolist()
        [0, 0, 1, 1, 2]
        >>> first, rest = stratified_split(labels, [0.5], seed=0, interleave=True)
        >>> sorted(labels[first][:3].tolist()), sorted(labels[rest][:3].tolist())
        ([0, 1, 2], [0, 1, 2])
    """
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for cls in torch.unique(labels):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for part, fraction in zip(parts, fractions, strict=False):
            count = round(fraction * len(members))
            part.append(members[start : start + count])
            start += count
        parts[-1].append(members[start:])
    if interleave:
        return [_interleaved(part, generator) for part in parts]
    return [torch.sort(torch.cat(part)).values for part in parts]


def _interleaved(per_class: list[Tensor], generator: torch.Generator) -> Tensor:
    """The classes' indices in rounds: each class's first, then each class's second, ...

    The classes come in a random order within a round: prefixes are balanced, and every k-th
    image is a random draw (a fixed class order would alias with k: every 5th of 10 classes would
    be 2 classes).
    """
    ranks = torch.cat([torch.arange(len(members)) for members in per_class])
    ties = torch.rand(len(ranks), generator=generator, dtype=torch.float64)
    order = torch.argsort(ranks.double() + ties)
    return torch.cat(per_class)[order]


def split_sizes(class_sizes: Sequence[int], fractions: Sequence[float]) -> list[int]:
    """Sizes of the parts :func:`stratified_split` makes from classes of these sizes.

    The same arithmetic as the split (each class cut with ``round(fraction * size)``, the last
    part taking the remainder), without labels or shuffling, so settings can be checked early.

    Examples:
        >>> split_sizes([500] * 10, [0.1, 0.1])
        [500, 500, 4000]
        >>> split_sizes([500] * 10, [0.0001, 0.1])
        [0, 500, 4500]
    """
    sizes = [0] * (len(fractions) + 1)
    for size in class_sizes:
        start = 0
        for part, fraction in enumerate(fractions):
            count = min(round(fraction * size), size - start)  # what the slice holds
            sizes[part] += count
            start += count
        sizes[-1] += size - start
    return sizes


def smallest_fraction(largest_class: int) -> float:
    """The smallest fraction of 3 significant digits that gives ``largest_class`` one image.

    ``round(fraction * largest_class)`` must reach 1 (``round(0.5)`` is 0), so the bound
    ``0.5 / largest_class`` itself is not enough; it is rounded up to 3 digits and checked with
    the split's own float arithmetic.

    Examples:
        >>> smallest_fraction(500)
        0.00101
        >>> smallest_fraction(6000)
        8.34e-05
    """
    exponent = math.floor(math.log10(0.5 / largest_class)) - 2
    steps = max(1, math.ceil(0.5 / largest_class / 10.0**exponent) - 1)  # float noise: from below
    while round(float(f"{steps}e{exponent}") * largest_class) < 1:
        steps += 1
    return float(f"{steps}e{exponent}")


def check_split_sizes(
    owner: str,
    class_sizes: Sequence[int],
    fractions: Sequence[tuple[str, float, str]],
    rest: str,
    images: str,
) -> None:
    """Refuse fractions that leave a part of :func:`stratified_split` without images.

    Args:
        owner: The data module's class name, prefixed to the setting.
        class_sizes: Number of images of each class in the set that is split.
        fractions: ``(setting, fraction, part name)`` for each part but the last, in split order.
        rest: Name of the last part (the remainder), e.g. ``"training"``.
        images: What is split, for the message, e.g. ``"the 5000 images"``.

    Raises:
        SettingError: Naming the setting, the smallest allowed value (or, where the remainder
            is empty, the fractions to lower) and the part that would be empty.
    """
    sizes = split_sizes(class_sizes, [fraction for _, fraction, _ in fractions])
    largest = max(class_sizes, default=0)
    where = f"{images} ({largest} in the largest class)"
    if largest == 0:
        raise SettingError(f"{owner}: {images} hold no images, so every split would be empty")
    for (setting, fraction, part), size in zip(fractions, sizes, strict=False):
        if size == 0 and round(fraction * largest) < 1:
            raise SettingError(
                f"{owner} {setting} must be at least {smallest_fraction(largest):g} for {where}; "
                f"got {fraction!r}, which leaves the {part} set empty"
            )
    if 0 in sizes:
        part = ([name for _, _, name in fractions] + [rest])[sizes.index(0)]
        settings = " + ".join(setting for setting, _, _ in fractions)
        values = " + ".join(repr(fraction) for _, fraction, _ in fractions)
        raise SettingError(
            f"{owner} {settings} must leave images in every split of {where}; got {values}, "
            f"which leaves the {part} set empty: lower {settings}"
        )


class ImageDataModule(LightningDataModule):
    """Base of every data module: float images in [0, 1] ``(C, H, W)`` and integer labels.

    Subclasses set ``dataset_name``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``
    and ``std`` (known right after ``__init__`` so the CLI can link them into the model) and fill
    ``train_set``, ``val_set`` and ``test_set`` in :meth:`setup`.

    Args:
        batch_size: Images per batch, at least 1.
        num_workers: Data-loading worker processes, at least 0.
        val_fraction: Fraction of the training images held out for validation, in (0, 1).
        seed: Seed of the train/validation split (and of the test split where one is made), in
            [0, 2**32 - 1] (the seeds that give different CPU random streams).

    Raises:
        SettingError: A setting is out of range. Fractions that leave a split without images are
            refused once the class sizes are known (in ``setup`` at the latest).
    """

    dataset_name: str
    interleave_classes: bool = False
    """Interleave the classes in each split part: for files ordered by class."""
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self, batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.1, seed: int = 0
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.batch_size = check_int("batch_size", batch_size, minimum=1, owner=owner)
        self.num_workers = check_int("num_workers", num_workers, minimum=0, owner=owner)
        self.val_fraction = check_real("val_fraction", val_fraction, low=0, high=1, owner=owner)
        self.seed = check_int("seed", seed, minimum=0, maximum=MAX_SEED, owner=owner)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def identity(self) -> dict[str, object]:
        """Which images the training, validation and test sets hold, as a JSON-serializable dict.

        Equal identities mean the same images in the same splits wherever the files are stored:
        the class, the dataset, the split method, seed and fractions are part of it; ``data_dir``,
        batch size and workers are not. Results (e.g. certification files) record it so that
        results on other images are never mixed with them.
        """
        return {
            "data_module": type(self).__name__,
            "dataset": self.dataset_name,
            "split_method": INTERLEAVED_SPLIT_METHOD if self.interleave_classes else SPLIT_METHOD,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
        }

    def split_train_val(self, dataset: Dataset, labels: Tensor) -> tuple[Subset, Subset]:
        """Stratified, seeded split of a training set into training and validation subsets.

        Raises:
            SettingError: ``val_fraction`` leaves the validation or the training subset empty.
        """
        check_split_sizes(
            type(self).__name__,
            torch.unique(labels, return_counts=True)[1].tolist(),
            [("val_fraction", self.val_fraction, "validation")],
            "training",
            f"the {len(labels)} training images",
        )
        val_idx, train_idx = stratified_split(
            labels, [self.val_fraction], self.seed, interleave=self.interleave_classes
        )
        return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())

    def _training_epoch(self) -> int:
        """The epoch the attached trainer is in (0 without one), read as the loader iterates."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def _loader(self, dataset: Dataset | None, shuffle: bool, **order: Any) -> DataLoader:
        """A loader of ``dataset``; ``order``: a ``sampler`` and ``generator`` of its own."""
        if dataset is None:
            raise RuntimeError("call setup() before asking for a data loader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **order,
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches in an order drawn from (seed, epoch) alone (:class:`EpochShuffle`).

        On several processes Lightning's ``DistributedSampler`` shuffles (it draws from seed plus
        epoch too). The workers' seeds come from (seed, the epoch the loader is made in).
        """
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            return self._loader(self.train_set, shuffle=True)
        seed = training_seed()
        workers = image_seed(seed, WORKER_SEED_KEY, self._training_epoch())
        size = len(self.train_set) if self.train_set is not None else 0
        return self._loader(
            self.train_set,
            shuffle=False,
            sampler=EpochShuffle(size, seed, self._training_epoch),
            generator=torch.Generator().manual_seed(workers),
        )

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader(self.test_set, shuffle=False)
