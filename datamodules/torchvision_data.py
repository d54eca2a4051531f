"""torchvision's MNIST, FashionMNIST and CIFAR-10 on disk, with a clear error when files are missing."""

from pathlib import Path

import torch
from torchvision import datasets, transforms

from datamodules.base import DataNotFoundError, ImageDataModule


class TorchvisionDataModule(ImageDataModule):
    """A torchvision classification dataset read from ``data_dir`` (downloaded there if asked).

    The official training set is split (stratified, seeded) into training and validation; the
    official test set is the test split. Images come out as float tensors in [0, 1].

    Args:
        data_dir: Folder that holds (or will hold) the dataset's files.
        download: Download the files when they are missing.
        **kwargs: See :class:`~datamodules.base.ImageDataModule`.
    """

    dataset_class: type[datasets.VisionDataset]
    expected_files: tuple[str, ...]

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, val_fraction, seed)
        self.data_dir = Path(data_dir)
        self.download = download
        if not download and not self._files_present():
            raise self._not_found("download is off (set data.init_args.download: true to fetch)")

    def _files_present(self) -> bool:
        return all((self.data_dir / name).is_file() for name in self.expected_files)

    def _not_found(self, reason: str) -> DataNotFoundError:
        expected = ", ".join(str(self.data_dir / name) for name in self.expected_files)
        return DataNotFoundError(
            f"{self.dataset_class.__name__} files not found: expected {expected}; {reason}. "
            "Put the files there, or train on the embedded MNIST digits that need no network: "
            "--data datamodules.EmbeddedMNISTDataModule"
        )

    def _dataset(self, train: bool) -> datasets.VisionDataset:
        return self.dataset_class(
            str(self.data_dir), train=train, transform=transforms.ToTensor(), download=False
        )

    def prepare_data(self) -> None:
        """Download the files if they are missing and ``download`` is on (rank 0 only)."""
        if self._files_present():
            return
        try:
            for train in (True, False):
                self.dataset_class(str(self.data_dir), train=train, download=True)
        except Exception as err:  # urllib, socket and checksum errors all mean "no data here"
            reason = f"the download failed ({type(err).__name__}: {str(err).splitlines()[0]})"
            raise self._not_found(reason) from None
        if not self._files_present():
            raise self._not_found("the download did not produce them")

    def setup(self, stage: str | None = None) -> None:
        """Read the files and make the seeded stratified train/validation split (once)."""
        if self.train_set is not None:
            return
        if not self._files_present():
            raise self._not_found("run prepare_data with download on first")
        full_train = self._dataset(train=True)
        labels = torch.as_tensor(full_train.targets)
        self.train_set, self.val_set = self.split_train_val(full_train, labels)
        self.test_set = self._dataset(train=False)


_MNIST_RAW = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class MNISTDataModule(TorchvisionDataModule):
    """Full MNIST (60,000 training, 10,000 test digits) in ``<data_dir>/MNIST/raw``."""

    dataset_class = datasets.MNIST
    expected_files = tuple(f"MNIST/raw/{name}" for name in _MNIST_RAW)
    num_classes = 10
    in_channels = 1
    image_size = (28, 28)
    mean = (0.1307,)
    std = (0.3081,)


class FashionMNISTDataModule(TorchvisionDataModule):
    """Fashion-MNIST (Xiao et al. 2017) in ``<data_dir>/FashionMNIST/raw``."""

    dataset_class = datasets.FashionMNIST
    expected_files = tuple(f"FashionMNIST/raw/{name}" for name in _MNIST_RAW)
    num_classes = 10
    in_channels = 1
    image_size = (28, 28)
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (Krizhevsky 2009) python batches in ``<data_dir>/cifar-10-batches-py``."""

    dataset_class = datasets.CIFAR10
    expected_files = tuple(
        f"cifar-10-batches-py/{name}"
        for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
    )
    num_classes = 10
    in_channels = 3
    image_size = (32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
