"""Checks of settings: one clear ``SettingError`` naming the setting and its allowed values.

Every public class and function of the project validates its arguments with these helpers, so a
bad value fails at configuration time with one line such as
``Certification alpha must be a number in (0, 1); got 1.5``, and the command line turns that line
into ``error: ...`` with exit status 2 (see ``cli.py``).

Examples:
    >>> check_int("n", 100, minimum=1, owner="Certification")
    100
    >>> check_real("alpha", 1.5, low=0, high=1, owner="Certification")
    Traceback (most recent call last):
        ...
    robust.checks.SettingError: Certification alpha must be a number in (0, 1); got 1.5
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable
from typing import NoReturn

__all__ = [
    "SettingError",
    "check_choice",
    "check_int",
    "check_real",
    "check_unused_at_default",
    "refuse",
]


class SettingError(ValueError):
    """A setting or an input file was refused; the message names it and its allowed values.

    A ``ValueError``, so callers that catch those keep working; the command line reports it as one
    ``error:`` line with exit status 2 instead of a traceback.

    Examples:
        >>> try:
        ...     check_int("n", 0, minimum=1, owner="Smooth")
        ... except SettingError as err:
        ...     print(err)
        Smooth n must be an integer >= 1; got 0
    """


def refuse(message: str) -> NoReturn:
    """Refuse with one clear message: ``cli.main`` prints it as ``error: ...`` and exits with 2."""
    raise SettingError(message)


def _name(name: str, owner: str | None) -> str:
    return f"{owner} {name}" if owner else name


def check_int(
    name: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    owner: str | None = None,
) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) within the bounds.

    Args:
        name: Setting name used in the message.
        value: The value to check.
        minimum: Smallest allowed value (inclusive), or None.
        maximum: Largest allowed value (inclusive), or None.
        owner: Class or component that owns the setting, prefixed to the name.

    Raises:
        SettingError: Naming the setting, the allowed range and the value given.

    Examples:
        >>> check_int("steps", 40, minimum=1)
        40
        >>> check_int("steps", True, minimum=1)
        Traceback (most recent call last):
            ...
        robust.checks.SettingError: steps must be an integer >= 1; got True
    """
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        if minimum is not None and maximum is not None:
            allowed = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            allowed = f"an integer >= {minimum}"
        elif maximum is not None:
            allowed = f"an integer <= {maximum}"
        else:
            allowed = "an integer"
        raise SettingError(f"{_name(name, owner)} must be {allowed}; got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
    owner: str | None = None,
) -> float:
    """Return ``value`` as a ``float`` if it is a finite real number (not a bool) within the bounds.

    Args:
        name: Setting name used in the message.
        value: The value to check.
        low: Lower bound, or None for no bound.
        high: Upper bound, or None for no bound.
        low_inclusive: Whether ``low`` itself is allowed.
        high_inclusive: Whether ``high`` itself is allowed.
        owner: Class or component that owns the setting, prefixed to the name.

    Raises:
        SettingError: Naming the setting, the allowed interval and the value given.

    Examples:
        >>> check_real("sigma", 0.25, low=0)
        0.25
        >>> check_real("eps", -1, low=0, low_inclusive=True)
        Traceback (most recent call last):
            ...
        robust.checks.SettingError: eps must be a number >= 0; got -1
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if ok else math.nan  # type: ignore[arg-type]
    ok = ok and math.isfinite(number)
    if ok and low is not None:
        ok = number >= low if low_inclusive else number > low
    if ok and high is not None:
        ok = number <= high if high_inclusive else number < high
    if not ok:
        raise SettingError(
            f"{_name(name, owner)} must be {_interval(low, high, low_inclusive, high_inclusive)}; "
            f"got {value!r}"
        )
    return number


def _interval(low: float | None, high: float | None, low_in: bool, high_in: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
    if low is not None:
        return f"a number {'>=' if low_in else '>'} {low:g}"
    if high is not None:
        return f"a number {'<=' if high_in else '<'} {high:g}"
    return "a finite number"


def check_choice(name: str, value: object, choices: Iterable[object], *, owner: str | None = None):
    """Return ``value`` if it is one of ``choices``.

    Raises:
        SettingError: Naming the setting, the allowed values and the value given.

    Examples:
        >>> check_choice("autocast", "bf16", [None, "bf16", "fp16"])
        'bf16'
    """
    allowed = list(choices)
    if value not in allowed:
        listed = ", ".join(repr(c) for c in allowed)
        raise SettingError(f"{_name(name, owner)} must be one of {listed}; got {value!r}")
    return value


def check_radii(name: str, values: object, *, owner: str | None = None, zero: bool = True):
    """Return a sorted list of distinct radii: numbers >= 0 (> 0 when ``zero`` is False).

    Each radius names its metrics (``certified_acc@0.25``) as ``f"{r:g}"``: two radii that print
    alike (equal to 6 significant digits) would log under one name, so they are refused.

    Examples:
        >>> check_radii("radii", [0.5, 0.25, 0.5])
        [0.25, 0.5]
    """
    if isinstance(values, str | bytes) or not isinstance(values, Iterable) or not values:
        bound = ">= 0" if zero else "> 0"
        raise SettingError(
            f"{_name(name, owner)} must be a non-empty list of numbers {bound}; got {values!r}"
        )
    radii = sorted({check_real(name, r, low=0, low_inclusive=zero, owner=owner) for r in values})
    for low, high in itertools.pairwise(radii):
        if f"{low:g}" == f"{high:g}":
            raise SettingError(
                f"{_name(name, owner)} holds {low!r} and {high!r}, which name the same metrics "
                f"(@{low:g}); give radii that differ within 6 significant digits"
            )
    return radii


def check_unused_at_default(
    settings: dict[str, object],
    defaults: dict[str, object],
    *,
    enabled_by: str,
    disabled: str,
    owner: str,
) -> None:
    """Refuse a setting that differs from its default while the feature it tunes is off.

    Such a value would be accepted and then ignored, a silent wrong result.

    Args:
        settings: The given values by name.
        defaults: Each name's default.
        enabled_by: The condition that turns the feature on, named in the message.
        disabled: The setting's value that turns it off (``"eps=0"``).
        owner: Who owns the settings.

    Raises:
        SettingError: Naming the first such setting, its default and ``enabled_by``.

    Examples:
        >>> on = {"enabled_by": "eps > 0", "disabled": "eps=0", "owner": "M"}
        >>> check_unused_at_default({"steps": 2}, {"steps": 2}, **on)
        >>> check_unused_at_default({"steps": 5}, {"steps": 2}, **on)
        Traceback (most recent call last):
            ...
        robust.checks.SettingError: M steps applies only with eps > 0; got steps=5 with eps=0: \
turn it on, or leave steps at its default 2
    """
    for name, value in settings.items():
        default = defaults[name]
        if value != default:
            raise SettingError(
                f"{owner} {name} applies only with {enabled_by}; got {name}={value!r} with "
                f"{disabled}: turn it on, or leave {name} at its default {default!r}"
            )
