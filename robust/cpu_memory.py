"""Keep freed CPU memory in the process, so large per-batch tensors reuse it (glibc's malloc).

PyTorch has no caching allocator on CPUs: every activation of a forward pass comes from ``malloc``.
glibc serves a request above its mmap threshold with freshly mapped pages, and gives the top of
the heap back to the system once more than its trim threshold is free. Both thresholds adapt at
run time, so whether a forward pass of tens of MiB of activations reuses its memory or page-faults
through new zeroed pages on every call depends on what the process happened to free before. For
certification on 2 CPU cores (LeNet, batch 400, channels-last) that swung the rate between 12.7k
and 16.9k samples/s from one run to the next, and 24.2k with both thresholds fixed
(``benchmarks/certify.py``; README, "Benchmarks").

:func:`retain_freed_memory` fixes them: requests up to 32 MiB (glibc's largest mmap threshold on
64-bit systems) come from the heap, and up to 2 GiB of freed heap stays with the process. The cost
is that the process keeps its peak heap until it exits. ``robust`` and ``robust-compare`` call it
at start-up; code that uses :mod:`robust` directly may call it once, itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
"""Bytes: requests up to this size come from the heap (glibc's largest value on 64-bit)."""
TRIM_THRESHOLD = 2**31 - 1
"""Bytes of free heap the process keeps (the largest value ``mallopt``'s ``int`` takes)."""


@functools.cache
def retain_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once; later calls do nothing).

    Returns:
        True when both were set (glibc), False where the C library has no ``mallopt`` or refused
        (then nothing changed).

    Examples:
        >>> isinstance(retain_freed_memory(), bool)
        True
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
