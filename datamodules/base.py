"""Shared data-module behaviour: settings, seeded stratified splits and data loaders."""

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from robust.checks import check_int, check_real

SPLIT_METHOD = "stratified_split/1"
"""Name and version of the split algorithm, part of every identity: change it with the algorithm."""


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

    Subclasses set ``dataset_name``, ``num_classes``, ``in_channels``, ``image_size``, ``mean``
    and ``std`` (known right after ``__init__`` so the CLI can link them into the model) and fill
    ``train_set``, ``val_set`` and ``test_set`` in :meth:`setup`.

    Args:
        batch_size: Images per batch, at least 1.
        num_workers: Data-loading worker processes, at least 0.
        val_fraction: Fraction of the training images held out for validation, in (0, 1).
        seed: Seed of the train/validation split (and of the test split where one is made), >= 0.
    """

    dataset_name: str
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
        self.seed = check_int("seed", seed, minimum=0, owner=owner)
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
            "split_method": SPLIT_METHOD,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
        }

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
