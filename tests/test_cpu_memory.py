"""retain_freed_memory: large tensors come from the kept heap, not from fresh mappings."""

import ctypes
import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from robust.cpu_memory import retain_freed_memory

PROBE = """
import ctypes, ctypes.util, json, sys
import torch
fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
          "fordblks", "keepcost")
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in fields]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Info
applied = None
if sys.argv[1] == "retain":
    from robust.cpu_memory import retain_freed_memory
    applied = retain_freed_memory()
def mapped():
    return libc.mallinfo2().hblks
before = mapped()
tensor = torch.empty(5 * 2**20)  # 20 MiB of float32
during = mapped()
heap = libc.mallinfo2().arena
del tensor
print(json.dumps({"applied": applied, "new_mappings": during - before,
                  "heap_given_back": heap - libc.mallinfo2().arena}))
"""


def glibc_has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")
    except OSError:
        return False


def probe(mode: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not glibc_has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_a_large_tensor_comes_from_the_kept_heap_only_after_retain_freed_memory():
    fresh = probe("default")  # control: glibc's start-up threshold maps 20 MiB afresh
    assert fresh["new_mappings"] == 1
    kept = probe("retain")
    assert kept == {"applied": True, "new_mappings": 0, "heap_given_back": 0}


def test_retain_freed_memory_is_applied_once_and_says_whether_it_was(monkeypatch):
    first = retain_freed_memory()
    assert isinstance(first, bool)

    def second_call(*args, **kwargs):
        raise AssertionError("mallopt reached a second time")

    # a later call returns the first answer without touching the C library again
    monkeypatch.setattr(ctypes, "CDLL", second_call)
    assert retain_freed_memory() is first
