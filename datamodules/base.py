"""Shared data-module behaviour: settings, seeded stratified splits and data loaders."""

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset


class DataNotFoundError(FileNotFoundError):
    """Dataset files are missing and could not be downloaded; the message says what to do."""


def stratified_split(labels: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Split indices into parts with the given fractions, class by class, deterministically.

    Every class is shuffled with a generator seeded by ``seed`` and cut in the same proportions,
    so each part has the class balance of the whole. The last part takes the remainder.

    Args:
        labels: Integer labels ``(N,)``.
        fractions: Fractions of all parts but the last, each in (0, 1), summing to less than 1.
        seed: Seed of the shuffle.

    Returns:
        One sorted index tensor per part (``len(fractions) + 1`` parts), disjoint and covering all.
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
    return [torch.sort(torch.cat(part)).values for part in parts]


class ImageDataModule(LightningDataModule):
    """Base of every data module: float images in [0, 1] ``(C, H, W)`` and integer labels.

    Subclasses set ``num_classes``, ``in_channels``, ``image_size``, ``mean`` and ``std`` (known
    right after ``__init__`` so the CLI can link them into the model) and fill ``train_set``,
    ``val_set`` and ``test_set`` in :meth:`setup`.

    Args:
        batch_size: Images per batch, at least 1.
        num_workers: Data-loading worker processes, at least 0.
        val_fraction: Fraction of the training images held out for validation, in (0, 1).
        seed: Seed of the train/validation split (and of the test split where one is made).
    """

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self, batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.1, seed: int = 0
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data batch_size must be a positive integer, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data num_workers must be 0 or more, got {num_workers}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data val_fraction must be in (0, 1), got {val_fraction}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def split_train_val(self, dataset: Dataset, labels: Tensor) -> tuple[Subset, Subset]:
        """Stratified, seeded split of a training set into training and validation subsets."""
        val_idx, train_idx = stratified_split(labels, [self.val_fraction], self.seed)
        return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a data loader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:  # noqa: D102 (Lightning hook)
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader(self.test_set, shuffle=False)
