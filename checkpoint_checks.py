"""Checks of checkpoint files: a checkpoint is untrusted until checked.

A ``ckpt_path`` may name any file, so nothing in it is used before it is checked:

- it is loaded with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`), so a pickle that
  would run code is refused before anything runs, and only local files are read
  (:func:`local_checkpoint_path`);
- its structure: a non-empty ``state_dict`` of named tensors without NaN, hyperparameters as a
  mapping (:func:`check_checkpoint_structure`);
- the Lightning version that wrote it (:data:`LIGHTNING_VERSIONS`,
  :func:`check_lightning_version`);
- the import paths its hyperparameters name, which jsonargparse would import
  (:data:`IMPORTABLE_FROM_CHECKPOINTS`, :func:`check_import_paths`);
- the state ``fit`` resumes from: epoch, step, optimizer, scheduler, loop and callback states
  (:func:`check_resumable`, :func:`check_optimizer_state`, :func:`check_loop_states`,
  :func:`check_callback_states`), and, once the settings are built, that they fit them
  (:func:`check_loop_state_fits`, :func:`check_optimizers_fit`, :func:`check_weights_fit_model`);
- the normalization buffers, which must be the data's mean and std (:func:`check_normalization`).

Each refusal is a :class:`robust.checks.SettingError` naming the file and the entry; the command
line (``cli.py``) reports it as one ``error: ...`` line with exit status 2.
:func:`check_checkpoint` runs the checks that need no built trainer; ``cli.RobustCLI`` runs the
rest before the subcommand.
"""

from __future__ import annotations

import importlib
import math
import numbers
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch
import yaml
from packaging.version import InvalidVersion, Version

from lightning_modules.backbones import Normalize
from robust.checks import refuse


def _load_failure(err: Exception) -> tuple[bool, str]:
    """Whether a failed safe load refused Python objects, and the line that says what failed."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = next((line for line in lines if "GLOBAL" in line), None)
    if refused is not None:
        return True, refused.removeprefix("WeightsUnpickler error: ").split(" Please use ")[0]
    boilerplate = (
        "Weights only load failed",
        "Check the documentation",
        "Please file",
        "(1)",
        "(2)",
    )
    useful = [line for line in lines if not line.startswith(boilerplate)]
    detail = (useful or lines or [""])[-1]
    return False, f"{type(err).__name__}: {detail[:200]}"


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``, refusing anything unsafe or broken.

    ``weights_only=True`` unpickles tensors and plain values only, so a file whose pickle would
    run code (a ``__reduce__`` calling ``os.system``) is refused before anything runs. A class
    that our checkpoints legitimately hold would go through
    ``torch.serialization.add_safe_globals``; today none does (hyperparameters are plain values,
    attacks are stored as dicts).

    Raises:
        SettingError: Naming the file and why it was refused.
    """
    if Path(path).is_dir():
        refuse(
            f"ckpt_path {path!r} is a folder; give a .ckpt file written by fit (checkpoints "
            "sharded into folders are not read)"
        )
    if not Path(path).is_file():
        refuse(f"ckpt_path {path!r} does not exist (give a .ckpt file written by fit, or 'last')")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # mmap needs the zip format; older checkpoints are plain pickles
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        unsafe, detail = _load_failure(err)
        if unsafe:
            refuse(
                f"ckpt_path {path!r} was refused: loading it would call Python code that a safe "
                f"load (torch.load weights_only=True) does not allow ({detail}); only load "
                "checkpoints you trust, written by this project's fit"
            )
        refuse(f"ckpt_path {path!r} is not a checkpoint torch can read ({detail})")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        refuse(f"ckpt_path {path!r} is not a Lightning checkpoint (it has no 'state_dict')")
    check_checkpoint_structure(path, checkpoint)
    return checkpoint


# What Lightning reads from a checkpoint to resume fit, and the type each must have.
RESUME_ENTRIES = {
    "epoch": int,
    "global_step": int,
    "loops": dict,
    "callbacks": dict,
    "optimizer_states": list,
    "lr_schedulers": list,
}


CHECKPOINT_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""The floating-point dtypes a checkpoint's weights may have (those a model trains in)."""


def check_checkpoint_structure(path: str, checkpoint: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose entries Lightning would trip over, or whose tensors hold NaN.

    Also refused: a Lightning version outside :data:`LIGHTNING_VERSIONS` and hyperparameters
    naming code outside :data:`IMPORTABLE_FROM_CHECKPOINTS`. (Infinite values are legitimate in
    some buffers, such as masks; parameters and the normalization buffers are checked against
    the built model, :func:`check_weights_fit_model`.)

    Raises:
        SettingError: Naming the file and the first entry that is wrong.
    """
    state = checkpoint["state_dict"]
    if not isinstance(state, Mapping) or not state:
        refuse(f"ckpt_path {path!r}: 'state_dict' must be a non-empty mapping of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            refuse(f"ckpt_path {path!r}: state_dict entry {key!r} is not a named tensor")
        if value.layout != torch.strided:
            refuse(
                f"ckpt_path {path!r}: state_dict entry {key!r} is a {value.layout} tensor; "
                "checkpoints written by fit hold dense (torch.strided) tensors"
            )
        if value.device.type != "cpu":  # read with map_location="cpu": a meta tensor stays
            refuse(
                f"ckpt_path {path!r}: state_dict entry {key!r} is a tensor on "
                f"{value.device.type}; checkpoints written by fit hold tensors with values"
            )
        if value.is_floating_point() and value.dtype not in CHECKPOINT_FLOAT_DTYPES:
            refuse(
                f"ckpt_path {path!r}: state_dict entry {key!r} is {value.dtype}; checkpoints "
                f"written by fit hold {', '.join(map(str, CHECKPOINT_FLOAT_DTYPES))}"
            )
        if value.is_floating_point() and bool(torch.isnan(value).any()):
            refuse(f"ckpt_path {path!r}: the weights {key!r} hold NaN values")
    check_lightning_version(path, checkpoint.get("pytorch-lightning_version"))
    hparams = checkpoint.get("hyper_parameters")
    if hparams is not None and not isinstance(hparams, Mapping):
        refuse(
            f"ckpt_path {path!r}: 'hyper_parameters' must be a mapping of settings; "
            f"got a {type(hparams).__name__}"
        )
    if hparams and not all(isinstance(name, str) for name in hparams):
        odd = next(name for name in hparams if not isinstance(name, str))
        refuse(
            f"ckpt_path {path!r}: 'hyper_parameters' has a key {odd!r} of type "
            f"{type(odd).__name__}; settings are named by strings"
        )
    if hparams:
        check_import_paths(path, hparams)
    best = checkpoint.get("robust_val_best")
    if best is not None and not _is_robust_best(best):
        refuse(
            f"ckpt_path {path!r}: 'robust_val_best' is {_short(best)}; it must be [accuracy in "
            "[0, 1], epoch >= 0], as AdversarialClassifier writes it"
        )


def _is_robust_best(value: Any) -> bool:
    """``[accuracy, epoch]`` of the best robust validation (:class:`AdversarialClassifier`).

    Examples:
        >>> _is_robust_best([0.9, 3.0]), _is_robust_best([2.0, 0]), _is_robust_best("xy")
        (True, False, False)
    """
    if not isinstance(value, list | tuple) or len(value) != 2:
        return False
    accuracy, epoch = value
    return (
        _is_number(accuracy)
        and _is_number(epoch)
        and 0 <= float(accuracy) <= 1
        and float(epoch) >= 0
        and float(epoch).is_integer()
    )


# The Lightning versions whose checkpoints are read: those this project runs with (pyproject:
# lightning>=2.4,<3), so those its fit can have written. Lightning "migrates" older ones by
# reaching for entries that a checkpoint of ours never had.
LIGHTNING_VERSIONS = ((2, 4), 2)  # oldest release, and the one major version


def check_lightning_version(path: str, version: Any) -> None:
    """Refuse a ``pytorch-lightning_version`` that is not a Lightning 2.x from 2.4 on.

    Raises:
        SettingError: Naming the file, the version found and the versions read.
    """
    if not isinstance(version, str):
        refuse(f"ckpt_path {path!r} is not a Lightning checkpoint (no 'pytorch-lightning_version')")
    try:
        parsed: Version | None = Version(version)
    except InvalidVersion:
        parsed = None
    oldest, major = LIGHTNING_VERSIONS
    if parsed is None or parsed.major != major or parsed.release < oldest:
        refuse(
            f"ckpt_path {path!r}: its 'pytorch-lightning_version' is {version!r}; checkpoints "
            f"written by Lightning {'.'.join(map(str, oldest))} or a later {major}.x are read "
            "(the versions this project's fit runs with)"
        )


# Packages whose classes and functions a checkpoint's hyperparameters may name: jsonargparse
# imports what they name (``optimizer: this.x`` would import ``this`` and run its code).
IMPORTABLE_FROM_CHECKPOINTS = (
    "torch.optim",
    "lightning_modules",
    "datamodules",
    "callbacks",
    "robust",
)


def _import_paths(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """``(dotted name, where)`` for each string in ``value`` that jsonargparse could import.

    That is a string of dot-separated identifiers with at least one dot (jsonargparse's
    ``import_object``), also inside a string that YAML reads as a mapping or list.
    """
    if isinstance(value, str):
        parts = value.split(".")
        if len(parts) > 1 and all(part.isidentifier() for part in parts):
            yield value, where
            return
        if value.lstrip()[:1] in {"{", "[", "-"} or ":" in value:
            try:
                loaded = yaml.safe_load(value)
            except yaml.YAMLError:
                return
            if isinstance(loaded, Mapping | list):
                yield from _import_paths(loaded, where)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _import_paths(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _import_paths(item, f"{where}[{i}]")


def check_import_paths(path: str, hparams: Mapping[str, Any]) -> None:
    """Refuse hyperparameters naming code outside :data:`IMPORTABLE_FROM_CHECKPOINTS`.

    Runs before anything parses the hyperparameters, so nothing a checkpoint names is imported
    before it is checked. (``_instantiator`` is dropped by Lightning unread.)

    Raises:
        SettingError: Naming the file, the entry and the packages allowed.
    """
    for key, value in hparams.items():
        if key == "_instantiator":
            continue
        for name, where in _import_paths(value, f"hyper_parameters.{key}"):
            home = name if not _importable(name) else _home_outside(name)
            if home is not None:
                leads = "" if home == name else f", which is {home!r}"
                refuse(
                    f"ckpt_path {path!r}: {where} names {name!r}{leads}; a checkpoint may only "
                    f"name classes and functions of {', '.join(IMPORTABLE_FROM_CHECKPOINTS)} "
                    "(nothing else is imported from a checkpoint)"
                )


def _importable(name: str) -> bool:
    """Whether the dotted ``name`` lies, by its text, in :data:`IMPORTABLE_FROM_CHECKPOINTS`."""
    return any(
        name == package or name.startswith(package + ".") for package in IMPORTABLE_FROM_CHECKPOINTS
    )


def _home_outside(name: str) -> str | None:
    """Where ``name`` leads when that is outside the allowed packages, else None.

    ``datamodules.idx.os.system`` starts like one of ours but is ``os.system`` (an importer
    that falls back to attributes would find it): the module part is imported (it is ours)
    and each attribute after it must belong to the allowed packages too.

    Examples:
        >>> _home_outside("datamodules.idx.os.system"), _home_outside("torch.optim.Adam")
        ('os', None)
    """
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            home = obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", "")
            if obj is None or not isinstance(home, str):
                return None  # not there: the settings' parser says so
            if not _importable(home):
                return home
        return None
    return None


def _is_score(value: Any) -> bool:
    """A monitored score as ModelCheckpoint stores it: a real number or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not bool(torch.isnan(value).any())
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def _is_score_or_none(value: Any) -> bool:
    return value is None or _is_score(value)


def _is_path_or_none(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_scores_by_path(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and _is_score(v) for k, v in value.items()
    )


# What ModelCheckpoint.load_state_dict (and ours) reads, and what each entry must be.
CHECKPOINT_CALLBACK_STATE = {
    "monitor": (_is_path_or_none, "a metric name or null"),
    "best_model_score": (_is_score_or_none, "a number (not NaN) or null"),
    "best_model_path": (lambda v: isinstance(v, str), "a path"),
    "current_score": (_is_score_or_none, "a number (not NaN) or null"),
    "dirpath": (_is_path_or_none, "a folder or null"),
    "best_k_models": (_is_scores_by_path, "a mapping of checkpoint paths to numbers"),
    "kth_best_model_path": (lambda v: isinstance(v, str), "a path"),
    "kth_value": (_is_score, "a number (not NaN)"),
    "last_model_path": (lambda v: isinstance(v, str), "a path"),
}
_REQUIRED_CALLBACK_STATE = ("best_model_path", "best_model_score")


def check_callback_states(path: str, states: Any) -> None:
    """Refuse callback states that Lightning would hand to a callback's ``load_state_dict`` broken.

    Each state must be a mapping; a checkpoint callback's (``ModelCheckpoint`` or ours) must hold
    the entries ``ModelCheckpoint.load_state_dict`` reads, of the types it expects.

    Raises:
        SettingError: Naming the file, the callback and the entry.
    """
    if states is None:
        return
    if not isinstance(states, Mapping):
        refuse(f"ckpt_path {path!r}: 'callbacks' must be a mapping; got a {type(states).__name__}")
    for key, state in states.items():
        if not isinstance(state, Mapping):
            refuse(
                f"ckpt_path {path!r}: the state of callback {key!r} is a "
                f"{type(state).__name__}, not a mapping"
            )
        # Lightning keys a callback's state by its class name: ModelCheckpoint, or its subclass
        # cli.BestAndLastCheckpoint (named, not imported: cli.py imports this module).
        if str(key).split("{")[0] not in {"ModelCheckpoint", "BestAndLastCheckpoint"}:
            continue
        for entry in _REQUIRED_CALLBACK_STATE:
            if entry not in state:
                refuse(f"ckpt_path {path!r}: the state of callback {key!r} lacks {entry!r}")
        for entry, (valid, allowed) in CHECKPOINT_CALLBACK_STATE.items():
            if entry in state and not valid(state[entry]):
                refuse(
                    f"ckpt_path {path!r}: the state of callback {key!r} has {entry!r} = "
                    f"{_short(state[entry])}; it must be {allowed}"
                )


def _short(value: Any) -> str:
    """``repr`` of a value from a file, at most 80 characters (tensors by dtype and shape)."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_resumable(path: str, checkpoint: Mapping[str, Any]) -> None:
    """Refuse to resume ``fit`` from a checkpoint without the training state Lightning restores.

    A weights-only file (or one with an empty optimizer state) would silently restart the
    optimizer; resuming needs the whole state that ``fit`` saved.

    Raises:
        SettingError: Naming the file and the missing or malformed entry.
    """
    for key, kind in RESUME_ENTRIES.items():
        value = checkpoint.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            refuse(
                f"ckpt_path {path!r} cannot resume fit: its {key!r} is "
                f"{'missing' if value is None else 'a ' + type(value).__name__}, not a "
                f"{kind.__name__} (resume from a last.ckpt or best-*.ckpt written by fit)"
            )
    if not checkpoint["optimizer_states"]:
        refuse(f"ckpt_path {path!r} cannot resume fit: it holds no optimizer state")
    for index, state in enumerate(checkpoint["optimizer_states"]):
        check_optimizer_state(path, f"optimizer_states[{index}]", state)
    for index, state in enumerate(checkpoint["lr_schedulers"]):
        if not isinstance(state, Mapping):
            refuse(
                f"ckpt_path {path!r} cannot resume fit: its lr_schedulers[{index}] is a "
                f"{type(state).__name__}, not a mapping"
            )


def _numbers(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """``(where, x)`` for each tensor and float nested in mappings and sequences of ``value``."""
    if isinstance(value, torch.Tensor | float):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _numbers(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{where}[{i}]")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_optimizer_state(path: str, where: str, state: Any) -> None:
    """Refuse an optimizer state that torch would not load, or that would train wrongly.

    It must be a mapping with a mapping ``state`` (per parameter: a mapping of finite values,
    with a ``step`` and second moments >= 0) and a non-empty list ``param_groups`` of mappings
    whose ``params`` are lists of distinct integers and whose numbers are finite, with ``lr`` >= 0
    (a negative one ascends the loss) and ``momentum`` and ``betas`` in [0, 1] (NaN moments or
    settings train to NaN weights, a negative second moment to NaN steps).

    Raises:
        SettingError: Naming the file and the entry.
    """

    def bad(problem: str) -> NoReturn:
        refuse(
            f"ckpt_path {path!r} cannot resume fit: {where} {problem} (resume from a last.ckpt "
            "or best-*.ckpt written by fit)"
        )

    if not isinstance(state, Mapping):
        bad(f"is a {type(state).__name__}, not a mapping")
    per_parameter, groups = state.get("state"), state.get("param_groups")
    if not isinstance(per_parameter, Mapping):
        bad(f"has 'state' = {_short(per_parameter)}; it must be a mapping of parameter states")
    if not isinstance(groups, list) or not groups:
        bad(f"has 'param_groups' = {_short(groups)}; it must be a non-empty list of mappings")
    seen: set[int] = set()
    for g, group in enumerate(groups):
        if not isinstance(group, Mapping):
            bad(f"has param_groups[{g}] = {_short(group)}; it must be a mapping")
        params = group.get("params")
        if not isinstance(params, list) or not all(_is_index(p) for p in params):
            bad(
                f"has param_groups[{g}]['params'] = {_short(params)}; it must be a list of integers"
            )
        if seen & set(params) or len(set(params)) != len(params):
            bad(f"names a parameter twice in param_groups[{g}]['params']")
        seen |= set(params)
        for setting, value in group.items():
            if setting == "params" or isinstance(value, bool):
                continue
            low, high = GROUP_RANGES.get(setting, (-math.inf, math.inf))
            for name, number in _numbers(value, f"param_groups[{g}] {setting}"):
                if not _within(number, low, high):
                    allowed = (
                        "finite"
                        if low == -math.inf
                        else f"a finite number >= {low:g}"
                        if high == math.inf
                        else f"in [{low:g}, {high:g}]"
                    )
                    bad(f"has {name} = {_short(number)}; it must be {allowed}")
            if setting == "lr" and not _is_number(value):
                bad(f"has param_groups[{g}] lr = {_short(value)}; it must be a finite number >= 0")
    for key, moments in per_parameter.items():
        if not isinstance(moments, Mapping):
            bad(f"has 'state' entry {key!r} = {_short(moments)}; it must be a mapping")
        for name, value in _numbers(moments, f"'state'[{key!r}]"):
            if not _within(value, -math.inf, math.inf):
                bad(f"holds NaN or infinite values in {name}")
        for entry in NON_NEGATIVE_STATE & set(moments):
            for name, value in _numbers(moments[entry], f"'state'[{key!r}][{entry!r}]"):
                if not _within(value, 0.0, math.inf):
                    bad(f"holds negative values in {name}; it must be >= 0")


GROUP_RANGES = {
    "lr": (0.0, math.inf),
    "initial_lr": (0.0, math.inf),
    "momentum": (0.0, 1.0),
    "betas": (0.0, 1.0),
    "dampening": (0.0, 1.0),
    "weight_decay": (0.0, math.inf),
    "eps": (0.0, math.inf),
}
"""Ranges of the optimizer settings torch's optimizers take (any other number: finite)."""

NON_NEGATIVE_STATE = frozenset(
    {"step", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"}
)
"""Per-parameter optimizer state that is a count or a mean of squares."""

SHAPED_STATE = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "sum", "acc_delta"}
)
"""Per-parameter optimizer state shaped like its parameter."""


def _is_number(value: Any) -> bool:
    value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _within(value: Any, low: float, high: float) -> bool:
    """Whether a float or every element of a floating tensor is finite and in [low, high]."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            value = value.double()
        return bool((torch.isfinite(value) & (value >= low) & (value <= high)).all())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return math.isfinite(value) and low <= value <= high
    return True


def check_loop_state_fits(path: str, name: str, stored: Any, expected: Mapping[str, Any]) -> None:
    """Refuse a loop state whose progress entries differ in shape from the loop Lightning built.

    Entries of the built loop that the checkpoint lacks at the top level are skipped (as
    Lightning does); below, each mapping must hold the built one's entries, counters as integers
    >= 0 and flags as booleans.

    Raises:
        SettingError: Naming the file and the first entry that is wrong.
    """
    if not isinstance(stored, Mapping):
        refuse(
            f"ckpt_path {path!r}: it has no loop state 'loops.{name}' (it must be a mapping, "
            "as fit writes it)"
        )
    for key, value in expected.items():
        if key in stored:
            problem = _structure_problem(value, stored[key], f"loops.{name}.{key}")
            if problem:
                refuse(f"ckpt_path {path!r}: {problem} (as this Lightning writes it)")


def _structure_problem(expected: Any, value: Any, where: str) -> str | None:
    """What in ``value`` differs from ``expected`` in kind (mappings, flags, counters), or None."""
    if isinstance(expected, Mapping):
        if not isinstance(value, Mapping):
            return f"{where} is {_short(value)}; it must be a mapping"
        for key, item in expected.items():
            if key not in value:
                return f"{where} lacks {key!r}"
            problem = _structure_problem(item, value[key], f"{where}.{key}")
            if problem:
                return problem
    elif isinstance(expected, bool):
        if not isinstance(value, bool):
            return f"{where} is {_short(value)}; it must be true or false"
    elif _is_index(expected) and not (_is_index(value) and value >= 0):
        return f"{where} is {_short(value)}; it must be an integer >= 0"
    return None


def check_optimizers_fit(
    path: str,
    checkpoint: Mapping[str, Any],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
) -> None:
    """Refuse optimizer and scheduler states that do not match what the settings build.

    Lightning pairs them by position and drops the extra ones, so a different count silently
    restarts (or forgets) a state; torch refuses other parameter groups with a traceback.

    Raises:
        SettingError: Naming the file and what differs.
    """
    tip = "use the optimizer settings the checkpoint was trained with"
    states = checkpoint["optimizer_states"]
    if len(states) != len(optimizers):
        refuse(
            f"ckpt_path {path!r} cannot resume fit: it holds {len(states)} optimizer states "
            f"but the settings build {len(optimizers)}; {tip}"
        )
    for index, (state, optimizer) in enumerate(zip(states, optimizers, strict=True)):
        stored = [len(group["params"]) for group in state["param_groups"]]
        built = [len(group["params"]) for group in optimizer.param_groups]
        if stored != built:
            refuse(
                f"ckpt_path {path!r} cannot resume fit: optimizer_states[{index}] has parameter "
                f"groups of {stored} parameters but {type(optimizer).__name__} here has {built}; "
                f"{tip}"
            )
        where = f"ckpt_path {path!r} cannot resume fit: optimizer_states[{index}]"
        for g, (saved, group) in enumerate(
            zip(state["param_groups"], optimizer.param_groups, strict=True)
        ):
            for setting in sorted(set(group) - SCHEDULED_SETTINGS - {"params"}):
                if setting in saved and not _same_setting(saved[setting], group[setting]):
                    refuse(
                        f"{where} has param_groups[{g}] {setting} = {_short(saved[setting])} but "
                        f"{type(optimizer).__name__} here has {_short(group[setting])}; torch "
                        f"would train on with the checkpoint's; {tip}"
                    )
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        for key, moments in state["state"].items():
            if not _is_index(key) or not 0 <= key < len(parameters):
                refuse(f"{where} has a state for parameter {key!r}, which {tip[4:]} do not have")
            shape = tuple(parameters[key].shape)
            for entry in SHAPED_STATE & set(moments):
                value = moments[entry]
                if isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
                    refuse(
                        f"{where} has 'state'[{key}][{entry!r}] of shape {tuple(value.shape)} "
                        f"for a parameter of shape {shape}; {tip}"
                    )
    stored_schedulers = checkpoint["lr_schedulers"]
    if len(stored_schedulers) != len(schedulers):
        refuse(
            f"ckpt_path {path!r} cannot resume fit: it holds {len(stored_schedulers)} "
            f"lr_scheduler states but the settings build {len(schedulers)}; use the "
            "lr_scheduler settings the checkpoint was trained with"
        )


SCHEDULED_SETTINGS = frozenset(
    {"lr", "initial_lr", "momentum", "betas", "max_lr", "min_lr", "base_lr",
     "base_momentum", "max_momentum"}
)  # fmt: skip
"""Optimizer settings that learning-rate schedulers change as training goes (OneCycleLR cycles
momentum and betas): a resumed run takes the checkpoint's."""


def _same_setting(saved: Any, built: Any) -> bool:
    """Whether a stored optimizer setting equals the built one (tuples and lists alike)."""
    if isinstance(saved, list | tuple) and isinstance(built, list | tuple):
        return len(saved) == len(built) and all(map(_same_setting, saved, built))
    if _is_number(saved) and _is_number(built):
        return float(saved) == float(built)
    return type(saved) is type(built) and saved == built


def check_weights_fit_model(path: str, state: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Refuse weights the built model would not load, or parameters that are not finite.

    Missing, extra or reshaped tensors are named (the first three of each kind).

    Raises:
        SettingError: Naming the file and the first few tensors that disagree.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    reshaped = [
        f"{key} {tuple(state[key].shape)} (the model's is {tuple(value.shape)})"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    for problem, keys in (("lacks", missing), ("has extra", extra), ("has reshaped", reshaped)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            refuse(
                f"ckpt_path {path!r} does not fit the model the settings build "
                f"({type(model).__name__}): it {problem} weights {', '.join(keys[:3])}{more}; "
                "use the config (model class and backbone) the checkpoint was trained with"
            )
    loaded = dict(state)  # the values as load_state_dict copies them: in the model's dtypes
    for key, built in model.state_dict().items():
        value = state[key]
        if value.is_floating_point() != built.is_floating_point() or value.is_complex():
            # loading would cast integers into float weights (or drop fractions) without a word
            refuse(
                f"ckpt_path {path!r}: the weights {key!r} are {value.dtype}, but the model's "
                f"are {built.dtype}; use the checkpoint fit wrote for this model"
            )
        if value.is_floating_point() and value.dtype != built.dtype:
            loaded[key] = value.to(built.dtype)  # float64 1e300 is inf in float32
    for key, built in model.named_parameters():
        value = loaded[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            refuse(
                f"ckpt_path {path!r}: the parameters {key!r} hold infinite values (in the "
                f"model's {built.dtype})"
            )
    check_running_statistics(path, loaded, model)
    check_normalization(path, loaded, model)


def check_running_statistics(path: str, state: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Refuse batch-norm running statistics that are infinite, or variances below 0.

    Eval mode divides by ``sqrt(running_var + eps)``: a negative variance gives NaN logits, which
    ``argmax`` reads as class 0 for every image.

    Raises:
        SettingError: Naming the file and the buffer.
    """
    for prefix, module in model.named_modules():
        if not isinstance(getattr(module, "running_var", None), torch.Tensor):
            continue  # not a normalization layer that tracks running statistics
        for name in ("running_mean", "running_var"):
            key = f"{prefix}.{name}" if prefix else name
            value = state.get(key)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            if not bool(torch.isfinite(value).all()):
                refuse(
                    f"ckpt_path {path!r}: the batch-norm statistics {key!r} hold infinite values"
                )
            if name == "running_var" and bool((value < 0).any()):
                refuse(f"ckpt_path {path!r}: the batch-norm variances {key!r} hold negative values")


def check_normalization(path: str, state: Mapping[str, Any], model: torch.nn.Module) -> None:
    """Refuse normalization buffers that differ from the model's (the data's mean and std).

    The model's first layer divides by the checkpoint's ``std`` once the weights load, so a std
    of 0 tests to NaN and another std silently normalizes differently from training.

    Raises:
        SettingError: Naming the file, the buffer, its values and the data's.
    """
    for prefix, module in model.named_modules():
        if not isinstance(module, Normalize):
            continue
        for buffer in ("mean", "std"):
            key = f"{prefix}.{buffer}" if prefix else buffer
            stored, built = state[key].double(), getattr(module, buffer).double()
            where = f"ckpt_path {path!r}: the normalization {buffer} {key!r}"
            if not bool(torch.isfinite(stored).all()) or (
                buffer == "std" and not bool((stored > 0).all())
            ):
                values = stored.flatten().tolist()
                allowed = "finite positive numbers" if buffer == "std" else "finite numbers"
                refuse(f"{where} is {values}; it must be {allowed}")
            if not torch.allclose(stored, built, rtol=1e-6, atol=0.0):
                refuse(
                    f"{where} is {stored.flatten().tolist()} but the data's {buffer} (the "
                    f"model's hyperparameters) is {built.flatten().tolist()}; use the data and "
                    "checkpoint trained together"
                )


def local_checkpoint_path(path: str) -> str:
    """The local file a ``ckpt_path`` names (``file://`` URLs included).

    Raises:
        SettingError: For a remote URL, or Lightning's ``hpc`` and ``registry`` checkpoints:
            none of them could be checked before Lightning loads it.
    """
    if path in {"hpc", "registry"} or path.startswith("registry:"):
        refuse(
            f"ckpt_path {path!r}: Lightning's hpc and registry checkpoints are not loaded, "
            "because they cannot be checked first; give the path of a .ckpt file, 'best' or "
            "'last'"
        )
    url = urllib.parse.urlparse(path)
    if url.scheme in {"file", "local"} and url.netloc in {"", "localhost"}:
        return urllib.parse.unquote(url.path)
    if "://" in path:
        refuse(
            f"ckpt_path {path!r}: remote checkpoints are not loaded, because they cannot be "
            "checked first; copy the file to this machine and give its path"
        )
    return path


def check_checkpoint(path: str, resuming: bool = False) -> dict[str, Any]:
    """Refuse unless the local file ``path`` is a safe, whole Lightning checkpoint; return it.

    Checks what can be checked without the built trainer: the structure, the training state for
    ``fit`` (:func:`check_resumable`), the loop and callback states. The rest is checked against
    what the settings build, before the subcommand runs (:meth:`cli.RobustCLI._run_trainer`).

    Args:
        path: A local path (see :func:`local_checkpoint_path` for URLs).
        resuming: ``fit`` resumes from it, so its training state must be whole.
    """
    checkpoint = load_checkpoint(path)
    if resuming:
        check_resumable(path, checkpoint)
    check_loop_states(path, checkpoint.get("loops"))
    check_callback_states(path, checkpoint.get("callbacks"))
    return checkpoint


def check_loop_states(path: str, loops: Any) -> None:
    """Refuse a ``loops`` entry that is not a mapping of loop states (each a mapping).

    The loop that runs is compared with the one Lightning builds later
    (:func:`check_loop_state_fits`).

    Raises:
        SettingError: Naming the file and the entry.
    """
    if loops is None:
        return
    if not isinstance(loops, Mapping):
        refuse(f"ckpt_path {path!r}: 'loops' must be a mapping; got a {type(loops).__name__}")
    for name, loop in loops.items():
        if not isinstance(loop, Mapping):
            refuse(
                f"ckpt_path {path!r}: its loop state 'loops.{name}' is a "
                f"{type(loop).__name__}, not a mapping (as fit writes it)"
            )
