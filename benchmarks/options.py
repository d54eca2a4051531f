"""Checks of the benchmark scripts' options, shared by ``benchmarks/*.py``.

A bad option is refused before any measurement with one ``error:`` line naming the option and its
allowed values, exit status 2 (as ``cli.py`` reports a ``SettingError``), not a traceback.

Examples:
    >>> check_device("cpu")
    device(type='cpu')
    >>> try:
    ...     check_device("banana")
    ... except SettingError as err:
    ...     print(err)
    --device must be cpu, cuda or cuda:N; got 'banana'
"""

from __future__ import annotations

import sys
from typing import NoReturn

import torch

from robust.checks import SettingError

__all__ = ["check_device", "refuse"]


def check_device(text: str, option: str = "--device") -> torch.device:
    """The torch device ``text`` names, if it is a CPU or a CUDA device this machine has.

    Args:
        text: The option's value, e.g. ``"cuda:1"``.
        option: The option, named in messages.

    Raises:
        SettingError: Naming the option and the allowed values.
    """
    allowed = "cpu, cuda or cuda:N"
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise SettingError(f"{option} must be {allowed}; got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise SettingError(f"{option} must be {allowed}; got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SettingError(f"{option} {text}: this machine has no CUDA device; use cpu")
        if device.index is not None and device.index >= count:
            raise SettingError(
                f"{option} must be cpu or cuda:N with N in [0, {count - 1}] here; got {text!r}"
            )
    return device


def refuse(err: SettingError) -> NoReturn:
    """Print ``err`` as one ``error:`` line and exit with status 2 (argparse's)."""
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)
