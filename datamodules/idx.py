"""IDX files (the MNIST format): writing, checking, MD5 sums with a cache, and safe replacement.

Everything here is written so that a failure leaves no partial file: new contents go to a hidden
temporary file in the same folder and are moved into place with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import secrets
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

IDX_UBYTE = 0x08
"""IDX type code of unsigned bytes, the only type MNIST-format files use."""

MD5_CACHE_NAME = ".md5-verified.json"
"""File beside the data files that records the MD5 sums already checked (size, mtime, md5)."""


def report(message: str) -> None:
    """Tell the user what the data modules are doing: one line on stderr."""
    print(f"[datamodules] {message}", file=sys.stderr, flush=True)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of an unsigned-byte array: big-endian magic ``0x0800 | ndim``, dims, data.

    Images ``(N, 28, 28)`` get magic 2051, labels ``(N,)`` magic 2049, as in the official files.

    Raises:
        ValueError: The array is not ``uint8`` or has no dimensions.
    """
    if array.dtype != np.uint8 or array.ndim < 1:
        raise ValueError(f"IDX needs a uint8 array of rank >= 1, got {array.dtype} {array.shape}")
    header = struct.pack(">I", (IDX_UBYTE << 8) | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def idx_problem(path: Path, ndim: int) -> str | None:
    """Why ``path`` is not a complete unsigned-byte IDX file of rank ``ndim``, or None if it is.

    Reads only the header and the file size, so truncated, empty or foreign files are caught
    before torchvision's reader fails on them with an assertion deep inside.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            header = file.read(4 + 4 * ndim)
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as err:
        return f"{path} cannot be read ({err.strerror or err})"
    if size == 0:
        return f"{path} is empty"
    if len(header) < 4 + 4 * ndim:
        return f"{path} is truncated: {size} bytes, shorter than an IDX header"
    magic = struct.unpack(">I", header[:4])[0]
    if magic != (IDX_UBYTE << 8) | ndim:
        return (
            f"{path} is not an IDX file of unsigned bytes and rank {ndim} "
            f"(magic {magic}, expected {(IDX_UBYTE << 8) | ndim})"
        )
    dims = struct.unpack(f">{ndim}I", header[4:])
    expected = declared_size(header)
    if size != expected:
        state = "truncated" if size < expected else "too long"
        return f"{path} is {state}: {size} bytes, its header {dims} needs {expected}"
    return None


def idx_length(path: Path) -> int:
    """The first dimension (number of items) in an IDX file's header (the file must be valid)."""
    with path.open("rb") as file:
        return struct.unpack(">I", file.read(8)[4:])[0]


def idx_shape(path: Path, ndim: int) -> tuple[int, ...]:
    """The dimensions in the header of an IDX file of rank ``ndim`` (the file must be valid)."""
    with path.open("rb") as file:
        return struct.unpack(f">{ndim}I", file.read(4 + 4 * ndim)[4:])


def label_problem(path: Path, num_classes: int) -> str | None:
    """Why the labels of a valid rank-1 IDX file are not all in ``[0, num_classes)``, or None.

    Reads the labels (one byte each: 60 kB for MNIST's training set), so a label the model has
    no output for is refused here, not met as an ``IndexError`` in the first training step.
    """
    labels = np.fromfile(path, dtype=np.uint8, offset=8)
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size == 0:
        return None
    return (
        f"{path} holds label {labels[bad[0]]} (item {bad[0]}; {bad.size} such labels), "
        f"but labels must be in [0, {num_classes}) for {num_classes} classes"
    )


def file_md5(path: Path) -> str:
    """MD5 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()  # ctime too: os.utime can set a file's mtime back, not its ctime
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def md5_problems(folder: Path, expected: Mapping[str, str]) -> dict[str, str]:
    """Check files in ``folder`` against ``expected`` MD5 sums, hashing each file only once.

    A file whose size, modification and change times and inode match the cache
    (``MD5_CACHE_NAME`` in the folder) from an earlier successful check is not read again; a file
    written or replaced since (even with its mtime set back) is hashed anew. Bits that rot on disk
    without a write are not seen until the cache is deleted. The cache is written atomically,
    and a folder that cannot be written only loses the caching.

    Returns:
        ``{name: problem}`` for each file that is missing or differs; empty when all match.
    """
    cache_path = folder / MD5_CACHE_NAME
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    problems: dict[str, str] = {}
    changed = False
    for name, md5 in expected.items():
        path = folder / name
        try:
            stamp = _stamp(path)
        except OSError:
            problems[name] = f"{path} is missing"
            continue
        if cache.get(name) == [*stamp, md5]:
            continue
        actual = file_md5(path)
        if actual != md5:
            problems[name] = f"{path} has MD5 {actual}, not the official {md5} (corrupted?)"
            if name in cache:
                del cache[name]
                changed = True
            continue
        cache[name] = [*stamp, md5]
        changed = True
        report(f"{path}: MD5 {md5} matches the official file")
    if changed:
        with contextlib.suppress(OSError):
            write_atomically(cache_path, json.dumps(cache, indent=1).encode())
    return problems


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A hidden temporary file in ``path``'s folder, removed unless it was moved into place."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


def _write_file(path: Path, data: bytes) -> None:
    """Write bytes to a file (one place, so tests can make it fail like a full disk)."""
    with path.open("wb") as file:
        file.write(data)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (no partial file)."""
    with _temporary_beside(path) as temporary:
        _write_file(temporary, data)
        os.replace(temporary, path)


def write_all_atomically(files: Mapping[Path, bytes]) -> None:
    """Write several files; none is moved into place until all were written in full."""
    with contextlib.ExitStack() as stack:
        temporaries = {}
        for path, data in files.items():
            temporary = stack.enter_context(_temporary_beside(path))
            _write_file(temporary, data)
            temporaries[path] = temporary
        for path, temporary in temporaries.items():
            os.replace(temporary, path)


def declared_size(head: bytes) -> int | None:
    """The file size the unsigned-byte IDX header at the start of ``head`` declares, else None.

    Examples:
        >>> declared_size(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28))
        1584
        >>> declared_size(b"PK")
    """
    if len(head) < 4 or head[:3] != bytes([0, 0, IDX_UBYTE]):
        return None
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        return None
    return 4 + 4 * ndim + math.prod(struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim]))


def extract_gz(
    source: Path, target: Path, check: Callable[[Path], str | None], max_bytes: int
) -> str | None:
    """Decompress ``source`` into ``target`` if the result passes ``check``; None, or why not.

    The result is moved into place only if the whole stream decompressed and ``check`` (given the
    decompressed temporary file) returned None, so a truncated or corrupt ``.gz`` never leaves a
    partial or wrong ``target`` and never replaces one. Decompression stops once the output passes
    the size its IDX header declares (or after the first MiB without one), and a header that
    declares more than ``max_bytes`` (the largest file the caller can use) is refused after the
    first MiB, so a small ``.gz`` of gigabytes of padding fills no disk, whatever its header says.
    """
    try:
        with _temporary_beside(target) as temporary:
            with gzip.open(source, "rb") as compressed, temporary.open("wb") as out:
                limit, written = None, 0
                for block in iter(lambda: compressed.read(1 << 20), b""):
                    if written == 0:
                        limit = declared_size(block)  # None: no IDX header, one block is enough
                        if limit is not None and limit > max_bytes:
                            return (
                                f"{source} declares a file of {limit} bytes, more than the "
                                f"{max_bytes} this data can have; it was not decompressed"
                            )
                    out.write(block)
                    written += len(block)
                    if limit is None or written > limit:
                        break  # a header-less or overlong stream: check says so (no bomb)
            problem = check(temporary)
            if problem is not None:
                return f"{source} does not hold a valid copy: {problem}"
            os.replace(temporary, target)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        return f"{source} cannot be decompressed ({type(err).__name__}: {err})"
    return None
