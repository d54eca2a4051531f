"""Command line: ``python cli.py {fit,validate,test,predict} --config configs/...`` (also ``robust``).

LightningCLI with subclass mode for model and data: the data module's class count, channels, image
size and normalization are linked into the model, a checkpoint callback (best ``val/acc`` and a true
last-epoch ``last.ckpt``) and a TensorBoardLogger under ``runs/`` are defaults that a config can
change, and devices, accelerator, precision and strategy pass straight to the Trainer.

Nothing goes silently wrong: every refusal (a bad setting, a checkpoint that disagrees with the
settings, an untrusted or unreadable checkpoint, an output folder that cannot be written, a
callback refusing its input while the subcommand runs) ends in one ``error: ...`` line on stderr
and exit status 2. Other exceptions are bugs and keep their traceback. Checkpoints are always
loaded with ``torch.load(weights_only=True)``.

From Python, :func:`main` runs the same command line and returns the :class:`RobustCLI`; with
``exit_on_refusal=False`` a refusal raises :class:`robust.checks.SettingError` instead of exiting.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import os
import re
import shutil
import signal
import sys
import tempfile
import traceback
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from checkpoint_checks import (
    _is_index,
    check_checkpoint,
    check_loop_state_fits,
    check_optimizers_fit,
    check_weights_fit_model,
    local_checkpoint_path,
)
from datamodules import DataNotFoundError, ImageDataModule
from lightning_modules import StandardClassifier
from lightning_modules.standard import (
    DATA_IDENTITY_KEY,
    plateau_mode_problem,
    validation_evaluation_of,
)
from robust.checks import SettingError, check_int, check_real, refuse
from robust.cpu_memory import retain_freed_memory

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default"},
    },
}

# Model settings that the CLI links from the data module (see RobustCLI.add_arguments_to_parser).
LINKED_SETTINGS = ("num_classes", "in_channels", "image_size", "mean", "std")

_MISSING = object()


class ParseRefusalError(SettingError):
    """A command line or config that the parser refused; ``tip`` says how to get the options."""

    def __init__(self, message: str, tip: str | None = None) -> None:
        super().__init__(message)
        self.tip = tip


# ----------------------------------------------------------------------------------------------
# One line out of jsonargparse's long error texts


_UNION = "Does not validate against any of the Union subtypes"
_GENERIC_PREFIXES = (
    "Expected a <class 'NoneType'>",
    "Expected a <class 'list'>",
    "Not a valid subclass of",
    "Subclass types expect one of",
    "a class path (str)",
    "a dict with class_path entry",
    "a dict without class_path",
    "a dict with parameters accepted",
)
_PARSER_KEY = re.compile(r'\s*Parser key "([^"]+)":\s*')
_CLASS_PROBLEM = re.compile(r"\s*Problem with given class_path '[^']*':\s*")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _exception_chain(err: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)


def _is_generic(text: str) -> bool:
    line = _one_line(text).lstrip("- ")
    return (
        not line
        or _UNION in line
        or line.startswith(_GENERIC_PREFIXES)
        or re.fullmatch(r"Problem with given class_path '[^']*':", line) is not None
    )


def _is_generic_type(text: str) -> bool:
    """A type expectation that :func:`_is_generic` counts as no reason (``Expected a list``)."""
    return _one_line(text).startswith(_GENERIC_PREFIXES[:2])


_SUBTYPES = re.compile(r"^\s*Subtypes: \[(.*)\]\s*$", re.MULTILINE)
_LITERAL = re.compile(r"typing\.Literal\[([^\]]*)\]")
_GIVEN = re.compile(r"^\s*Given value: (.*)$", re.MULTILINE)


def _literal_choices(text: str) -> str | None:
    r"""``must be one of ...; got ...`` for a value refused by a union of literals, or None.

    Examples:
        >>> _literal_choices("Subtypes: [typing.Literal[64, 'bf16'], <class 'NoneType'>]\n"
        ...                  "Given value: bf17")
        'must be one of 64, bf16, null; got bf17'
    """
    subtypes = _SUBTYPES.search(text)
    if subtypes is None:
        return None
    literals = _LITERAL.findall(subtypes.group(1))
    rest = _LITERAL.sub("", subtypes.group(1)).replace("<class 'NoneType'>", "")
    if not literals or rest.strip(" ,"):
        return None
    values = [v.strip().strip("'\"") for group in literals for v in group.split(",")]
    if "<class 'NoneType'>" in subtypes.group(1):
        values.append("null")
    given = _GIVEN.search(text)
    got = f"; got {given.group(1).strip()}" if given else ""
    return f"must be one of {', '.join(dict.fromkeys(values))}{got}"


def _split_keys(text: str) -> tuple[list[str], str]:
    """Leading ``Parser key "a":`` prefixes as keys, and the rest of the text."""
    keys = []
    while match := _PARSER_KEY.match(text) or _CLASS_PROBLEM.match(text):
        if match.re is _PARSER_KEY:
            keys.append(match.group(1))
        text = text[match.end() :]
    return keys, text


def _union_items(text: str) -> list[str]:
    """The ``- ...`` items of jsonargparse's error lists (each one reason a value was refused)."""
    return [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]


def essential_message(err: BaseException | None, message: str | None = None) -> str:
    """The one line that matters in an error, for an ``error: ...`` line.

    jsonargparse reports a refused class or union value (``--model.init_args.sigma -1``,
    ``--trainer.callbacks.alpha 1.5``) as a long text listing every subtype it tried, with the
    exception that the class itself raised chained as ``__cause__`` of the first subtype; a
    parse error comes with the inner exception as ``ex``. This returns, in order of preference:
    the message of a :class:`~robust.checks.SettingError` or
    :class:`~datamodules.DataNotFoundError` in the exception chain; the first specific (not
    "expected NoneType", not a union summary) message in the chain, prefixed with the parser keys
    it belongs to (``model.sigma: Expected a <class 'float'>. Got value: abc``); the first specific
    item of the union's error list; the whole text on one line.

    Args:
        err: The exception (may be None when only ``message`` is known).
        message: The text to condense when it is not ``str(err)`` (jsonargparse's ``error()``).

    Returns:
        One line without the ``error:`` prefix.
    """
    chain = list(_exception_chain(err))
    for link in chain:
        if isinstance(link, SettingError | DataNotFoundError):
            return _one_line(str(link))
    text = str(err) if message is None else message
    keys, _ = _split_keys(text)
    choices = _literal_choices(text)
    if choices:
        return f"{'.'.join(keys)}: {choices}" if keys else choices
    for link in chain:
        if not _is_generic(str(link)):
            inner_keys, rest = _split_keys(str(link))
            # "Expected a list" is no reason among a union's alternatives, but it is one for a
            # setting inside a class (a callback's attacks: 5)
            if not _is_generic(rest) or (inner_keys and _is_generic_type(rest)):
                prefix = ".".join(_joined_keys(keys, inner_keys))
                return f"{prefix}: {_one_line(rest)}" if prefix else _one_line(rest)
    for item in _union_items(text):
        if not _is_generic(item):
            return f"{'.'.join(keys)}: {_one_line(item)}" if keys else _one_line(item)
    return _one_line(text)


def _joined_keys(outer: list[str], inner: list[str]) -> list[str]:
    """Outer then inner parser keys, without the part the inner one repeats.

    jsonargparse's parser of a list of dataclasses (robust-compare's ``trainings``) names its
    errors with the outer key again; a nested key that truly repeats a name reads shorter too.

    Examples:
        >>> _joined_keys(["trainings"], ["trainings"]), _joined_keys(["model"], ["sigma"])
        (['trainings'], ['model', 'sigma'])
    """
    overlap = next(
        (k for k in range(min(len(outer), len(inner)), 0, -1) if outer[-k:] == inner[:k]), 0
    )
    return outer + inner[overlap:]


class RobustArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose user-facing errors raise :class:`ParseRefusalError` (one line).

    Parsers that jsonargparse makes internally (``exit_on_error=False``) keep raising its
    ``ArgumentError`` so its own fallbacks work; only an error that would end the program is
    turned into a refusal, which :func:`main` prints as ``error: ...`` with exit status 2 (no
    page of usage before it; the tip names ``--help``).
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Raise :class:`ParseRefusalError` with the essential line of ``message``."""
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        tip = f"for the accepted options run: {prog} --help"
        raise ParseRefusalError(with_choices(essential_message(ex, message)), tip=tip) from ex


_NO_ATTRIBUTE = re.compile(r"module '(\w+)' has no attribute '(\w+)'")
# The project's packages a class_path names; an unknown name in them is answered with the choices.
_KINDS = {"datamodules": "DataModule", "lightning_modules": "", "callbacks": ""}


def with_choices(message: str) -> str:
    """``message``, and for an unknown class of one of our packages, the classes it has.

    Examples:
        >>> with_choices("data: module 'datamodules' has no attribute 'SVHN'")  # doctest: +ELLIPSIS
        "data: module 'datamodules' has no attribute 'SVHN'; it has: CIFAR10DataModule, ..."
    """
    found = _NO_ATTRIBUTE.search(message)
    if found is None or found.group(1) not in _KINDS:
        return message
    module = sys.modules.get(found.group(1))
    names = [
        name
        for name in getattr(module, "__all__", [])
        if isinstance(getattr(module, name, None), type) and name.endswith(_KINDS[found.group(1)])
    ]
    return f"{message}; it has: {', '.join(names)}" if names else message


# ----------------------------------------------------------------------------------------------
# Checkpoints: the run's checkpoint, and agreement with the settings (checkpoint_checks.py
# checks the file itself)


def find_run_checkpoint(
    which: str, run_dir: Path, dirpath: str | os.PathLike | None = None, version: str | None = None
) -> str:
    """Newest ``last.ckpt`` (``which="last"``) or the best checkpoint of the runs in ``run_dir``.

    A new process logs to a new ``version_N`` folder, so Lightning's own ``"last"``/``"best"``
    would find nothing there and silently evaluate an untrained model; this finds the checkpoint
    that the latest ``fit`` of the same config wrote: in ``run_dir`` (the logger's
    ``save_dir/name``), or, where the logger's ``version`` folder is set, in that run only.
    Where ``checkpoint.dirpath`` is set (``dirpath``), ``fit`` wrote its checkpoints there, and
    only there is searched (the newest ``last*.ckpt``: a later run's is ``last-v1.ckpt``): an
    older run of the logger's folder is not this config's.

    ``"best"`` is the ``best_model_path`` that the newest checkpoint there records (with
    ``save_top_k > 1`` the newest ``best-*.ckpt`` need not be the best; a resumed run's best can
    be an earlier run's file), else the newest ``best-*.ckpt`` beside that checkpoint: a run
    that saved no best (its monitor never logged) is refused, not replaced by an older run's.

    Raises:
        SettingError: When no such checkpoint exists.
    """
    if dirpath:
        # a shared folder: Lightning names a later run's files last-v1.ckpt, best-...-v1.ckpt
        where = Path(os.path.expanduser(os.fspath(dirpath)))
        folders = [where]
        last = "last*.ckpt"
    else:  # a run's own folder, where a second fit into the same version writes last-v1.ckpt
        where = run_dir / (version or "version_*") / "checkpoints"
        folders = [where] if version else sorted(run_dir.glob("version_*/checkpoints"))
        last = "last*.ckpt" if version else "last.ckpt"
    pattern = last if which == "last" else "best-*.ckpt"
    newest = _newest([path for folder in folders for path in folder.glob(pattern)])
    if which == "best":
        # the newest run's best: an older run's best-*.ckpt is not this config's latest model
        latest = _newest([p for f in folders for p in f.glob("*.ckpt")])
        if latest is not None:
            where = latest.parent
            recorded = _recorded_best(latest)
            if recorded == Path():
                refuse(
                    f"ckpt_path 'best': the newest checkpoint {latest} records no best one (its "
                    "checkpoint.monitor was never logged, or save_top_k 0); give 'last' or a path"
                )
            newest = recorded or _newest(list(where.glob(pattern)))
    if newest is None:
        refuse(
            f"ckpt_path {which!r}: no {pattern} under {where}; "
            "run fit with this config first, or give the path of a .ckpt file"
        )
    print(f"ckpt_path {which!r} is {newest}", file=sys.stderr)
    return str(newest)


def _newest(paths: Sequence[Path]) -> Path | None:
    """The most recently written of ``paths`` (None for none)."""
    return max(paths, key=lambda p: p.stat().st_mtime, default=None)


def _recorded_best(checkpoint: Path | None) -> Path | None:
    """The ``best_model_path`` a checkpoint's ModelCheckpoint state records, if that file exists.

    Read with ``torch.load(weights_only=True)``; a file that does not load, or records no
    existing best, gives None (the caller falls back to the newest ``best-*.ckpt``); a state
    that records no best at all (``best_model_path`` empty) gives ``Path()``.
    """
    if checkpoint is None:
        return None
    try:
        states = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
        states = states.get("callbacks") if isinstance(states, dict) else None
    except Exception:  # checked properly once chosen; here only a hint is read
        return None
    for key, state in (states or {}).items():
        if "Checkpoint" in str(key) and isinstance(state, dict):
            best = state.get("best_model_path")
            if best == "":
                return Path()
            if isinstance(best, str) and Path(best).is_file():
                return Path(best)
    return None


def logger_run_dir(trainer_config) -> Path:
    """``save_dir/name`` of the configured TensorBoardLogger (``runs/default`` otherwise)."""
    logger = trainer_config.get("logger")
    init_args = getattr(logger, "init_args", None) or {}
    return Path(init_args.get("save_dir") or "runs") / str(init_args.get("name") or "default")


def logger_version(trainer_config) -> str | None:
    """The configured logger's run folder where its version is set (``version_N`` for a number)."""
    logger = trainer_config.get("logger")
    version = (getattr(logger, "init_args", None) or {}).get("version")
    if version is None or version == "":
        return None
    return version if isinstance(version, str) else f"version_{version}"


def _resolve(path: str) -> Any:
    """The object at dotted ``path`` among modules already imported (nothing is imported), or None."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if module is not None:
            obj: Any = module
            for attr in parts[cut:]:
                obj = getattr(obj, attr, _MISSING)
                if obj is _MISSING:
                    return None
            return obj
    return None


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _defaults(target: Any) -> dict[str, Any]:
    """Default values of the parameters of a class (or function) ``target``."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {
        name: p.default
        for name, p in parameters.items()
        if p.default is not inspect.Parameter.empty and p.kind not in variadic
    }


def _parameters(target: Any) -> set[str] | None:
    """Names that ``target`` accepts as keyword arguments (None: any, or unknown)."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return set(parameters)


def canonical(value: Any) -> Any:
    """A comparable form of a setting, whichever way jsonargparse or a checkpoint spells it.

    Classes become ``{"class_path": module.qualname, "init_args": {defaults | given}}`` (so
    ``lightning_modules.LeNet``, ``lightning_modules.backbones.LeNet`` and the class itself are the
    same), functions their ``module.qualname``, namespaces dicts and sequences lists. Dotted
    strings are looked up only among modules already imported: a checkpoint never imports code.
    """
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, Mapping):
        if "class_path" in value:
            init_args = dict(value.get("init_args") or {})
            init_args.update(value.get("dict_kwargs") or {})
            return _canonical_class(
                _resolve(str(value["class_path"])), value["class_path"], init_args
            )
        return {str(k): canonical(v) for k, v in value.items() if k != "__path__"}
    if isinstance(value, type):
        return _canonical_class(value, _qualified(value), {})
    if callable(value) and hasattr(value, "__qualname__") and hasattr(value, "__module__"):
        return _qualified(value)
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, str) and "." in value and value[:1].isidentifier():
        target = _resolve(value)
        if target is not None and callable(target):
            return canonical(target)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _canonical_class(target: Any, name: Any, init_args: dict[str, Any]) -> dict[str, Any]:
    if target is None:
        return {
            "class_path": str(name),
            "init_args": {k: canonical(v) for k, v in init_args.items()},
        }
    merged = {**_defaults(target), **init_args}
    return {
        "class_path": _qualified(target),
        "init_args": {k: canonical(v) for k, v in merged.items()},
    }


def same(a: Any, b: Any) -> bool:
    """Equality of two :func:`canonical` values (floats to 1e-9 relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        a, b = float(a), float(b)
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def show(value: Any) -> str:
    """A :func:`canonical` value as the user would write it (a class with its non-default args)."""
    if isinstance(value, dict) and "class_path" in value:
        defaults = canonical(_defaults(_resolve(value["class_path"])))
        extras = [
            f"{k}={show(v)}"
            for k, v in value["init_args"].items()
            if k not in defaults or not same(defaults[k], v)
        ]
        return value["class_path"] + (f"({', '.join(extras)})" if extras else "")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def _model_section_keys(section: Any) -> set[str]:
    """Init-arg names that a ``model:`` section of a config (or a ``--model`` value) gives."""
    if isinstance(section, str) and Path(section).is_file():
        try:
            section = yaml.safe_load(Path(section).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return set()
    if not isinstance(section, Mapping):
        return set()
    keys = set(section.get("init_args") or {}) | set(section.get("dict_kwargs") or {})
    return keys | {str(k) for k in section if k not in {"class_path", "init_args", "dict_kwargs"}}


def named_model_settings(args: Sequence[str] | Mapping | Namespace, subcommand: str) -> set[str]:
    """Names of the model's init args that a config file or the command line sets explicitly.

    Looks at ``--config`` files (their ``model:`` section, also under the subcommand's key),
    ``--model.init_args.NAME`` / ``--model.NAME`` arguments and ``--model`` values (a dict or a
    file); for a dict or Namespace given instead of arguments, at its ``model`` entry.
    """
    if isinstance(args, Namespace):
        args = args.as_dict()
    if isinstance(args, Mapping):
        config = args.get(subcommand, args)
        return _model_section_keys(config.get("model") if isinstance(config, Mapping) else None)
    names: set[str] = set()
    tokens = list(args)
    for i, token in enumerate(tokens):
        flag, has_value, inline = token.partition("=")
        value = inline if has_value else (tokens[i + 1] if i + 1 < len(tokens) else "")
        if flag in {"--config", "-c"}:
            try:
                loaded = yaml.safe_load(Path(value).read_text())
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue
            if isinstance(loaded, Mapping):
                names |= _model_section_keys(loaded.get("model"))
                if isinstance(loaded.get(subcommand), Mapping):
                    names |= _model_section_keys(loaded[subcommand].get("model"))
        elif flag == "--model":
            try:
                names |= _model_section_keys(yaml.safe_load(value))
            except yaml.YAMLError:
                continue
        elif flag.startswith("--model."):
            parts = flag.removeprefix("--model.").split(".")
            if parts[0] in {"init_args", "dict_kwargs"}:
                parts = parts[1:]
            if parts and parts[0] not in {"class_path", "help"}:
                names.add(parts[0])
    return names


def check_model_against_checkpoint(
    model_config: Namespace, hparams: Mapping[str, Any], named: set[str], path: str
) -> None:
    """Refuse when the model class or an explicit setting disagrees with the checkpoint's.

    Lightning replaces the model settings by the checkpoint's hyperparameters when given
    ``ckpt_path``, so a setting that the config or the command line gives would silently be
    ignored (or the model class switched). A setting counts as given when ``named`` lists it or
    its value differs from the class default; settings that only hold defaults take the
    checkpoint's values, as Lightning does. Linked settings are checked against the data module
    separately (:meth:`RobustCLI.check_linked_settings`).

    Raises:
        SettingError: Naming the setting, its value here and its value in the checkpoint.
    """
    config = model_config.as_dict() if isinstance(model_config, Namespace) else dict(model_config)
    class_path = config.get("class_path")
    target = _resolve(str(class_path)) if class_path else None
    stored_class = hparams.get("_class_path")
    if class_path and stored_class:
        here = _qualified(target) if target is not None else str(class_path)
        stored_target = _resolve(str(stored_class))
        there = _qualified(stored_target) if stored_target is not None else str(stored_class)
        if here != there:
            refuse(
                f"model class is {here} here but {there} in the checkpoint {path}: use the "
                "config the checkpoint was trained with (or a checkpoint of this model)"
            )
    init_args = (config.get("init_args") or {}) if class_path else config
    defaults = _defaults(target) if target is not None else {}
    accepted = _parameters(target)
    unknown = sorted(set(hparams) - {"_class_path", "_instantiator"} - (accepted or set(hparams)))
    if unknown:
        refuse(
            f"the checkpoint {path} holds model settings that {show(canonical(target))} does not "
            f"take: {', '.join(unknown)} (written by another version of the code?)"
        )
    for name, value in init_args.items():
        if name in LINKED_SETTINGS or name not in hparams:
            continue
        given = canonical(value)
        explicit = (
            name in named or name not in defaults or not same(given, canonical(defaults[name]))
        )
        stored = canonical(hparams[name])
        if explicit and not same(given, stored):
            refuse(
                f"model.init_args.{name} is {show(given)} here but {show(stored)} in the "
                f"checkpoint {path}: leave the setting out to use the checkpoint's, or give a "
                "checkpoint trained with it"
            )


# ----------------------------------------------------------------------------------------------
# A last.ckpt that is the last epoch


class BestAndLastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is the state after the latest epoch, always.

    Since Lightning 2.6, ``save_last=True`` writes ``last.ckpt`` only at a step where a top-k
    checkpoint was also written, so with top-1 by ``val/acc`` it was a copy of the best epoch and
    ``fit --ckpt_path last`` resumed from there. Here, when ``save_last`` is set, ``last.ckpt`` is
    also written at the end of every training epoch in which no top-k checkpoint was saved (after
    that epoch's validation), so it always holds the latest epoch and the best stays in
    ``best-epochNN.ckpt``. ``save_last="link"`` writes a file too (a link would point at the best
    checkpoint). The arguments are ModelCheckpoint's.
    """

    _validation_keys: set[str] | None = None  # logged in the sanity check's validation
    _monitor_checked = False

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:  # noqa: D102
        if self.save_last == "link":
            self.save_last = True
        self._validation_keys, self._monitor_checked = None, False
        super().setup(trainer, pl_module, stage)

    def on_sanity_check_end(self, trainer: Trainer, pl_module) -> None:
        """Note the keys that validation logs, for :meth:`check_monitor_logged`."""
        super().on_sanity_check_end(trainer, pl_module)
        self._validation_keys = set(trainer.callback_metrics)

    def on_train_batch_end(self, trainer: Trainer, pl_module, *args: Any, **kwargs: Any) -> None:
        """After the first training batch, refuse a monitor that is not logged; then save as usual."""
        if not self._monitor_checked:
            self._monitor_checked = True
            self.check_monitor_logged(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def check_monitor_logged(self, trainer: Trainer, pl_module) -> None:
        """Refuse a ``monitor`` that neither training so far nor the sanity check's validation logs.

        Without a sanity check the validation keys are unknown until the first validation, where
        :meth:`_save_topk_checkpoint` refuses instead. Keys logged only after the sanity check
        count when the model's setting turns them on (:data:`LOGGED_AFTER_SANITY_CHECK`), and
        so does any key under the validation prefix of an evaluation callback that evaluates
        the validation set (``every_n_val_epochs`` > 0); those too are checked at the first save.

        Raises:
            SettingError: Naming the monitor and the keys that are logged.
        """
        if self.monitor is None or self._validation_keys is None:
            return
        if validation_evaluation_of(trainer, self.monitor) is not None:
            return
        logged = set(trainer.callback_metrics) | self._validation_keys | {"epoch", "step"}
        results = getattr(trainer, "_results", None) or {}
        logged |= {
            name
            for result in results.values()
            if isinstance(name := getattr(getattr(result, "meta", None), "name", None), str)
        }
        for key, setting in LOGGED_AFTER_SANITY_CHECK.items():
            value = getattr(pl_module, setting, None)
            if _is_index(value) and value > 0:
                logged.add(key)
        if self.monitor not in logged:
            self._refuse_monitor(sorted(logged))

    def _refuse_monitor(self, logged: Sequence[str]) -> NoReturn:
        refuse(
            f"checkpoint.monitor {self.monitor!r} is not logged by this model and its callbacks; "
            f"the keys logged are: {', '.join(logged)}"
        )

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Any]) -> None:
        """ModelCheckpoint's, with its refusal of a monitor never logged as an ``error:`` line.

        A monitor that an evaluation callback logs every k-th epoch is ranked in those epochs
        only: in the others Lightning still holds an earlier epoch's value, which would rank this
        epoch's weights (``last.ckpt`` is written all the same).
        """
        evaluation = validation_evaluation_of(trainer, self.monitor) if self.monitor else None
        if evaluation is not None and not evaluation.evaluates_validation(trainer):
            return
        try:
            super()._save_topk_checkpoint(trainer, monitor_candidates)
        except MisconfigurationException:
            if self.monitor in monitor_candidates:
                raise
            self._refuse_monitor(sorted(monitor_candidates))

    def on_train_epoch_end(self, trainer: Trainer, pl_module) -> None:
        """Save top-k as ModelCheckpoint does, then ``last.ckpt`` unless saved at this step."""
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        """ModelCheckpoint's final ``last.ckpt``, except under ``fast_dev_run`` (which saves none)."""
        if not trainer.fast_dev_run:
            super().on_train_end(trainer, pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state; the best scores too when resuming into another run's folder.

        A resumed ``fit`` logs to a new ``version_N`` folder, and ModelCheckpoint then forgets
        the scores of the best checkpoints, so the first resumed epoch became the "best" however
        bad it was. Here the top-k bookkeeping carries over while its files still exist: a
        resumed epoch is saved as best only if it beats them, and the old files stay where they
        are (Lightning never deletes outside this run's folder).
        """
        super().load_state_dict(state_dict)
        best = state_dict.get("best_k_models") or {}
        if state_dict.get("dirpath", self.dirpath) == self.dirpath or not best:
            return
        if state_dict.get("monitor") == self.monitor and all(Path(p).is_file() for p in best):
            self.best_k_models = dict(best)
            self.best_model_score = state_dict.get("best_model_score")
            self.kth_best_model_path = state_dict.get("kth_best_model_path", "")
            self.kth_value = state_dict.get("kth_value", self.kth_value)


# ----------------------------------------------------------------------------------------------
# Output folders


def check_output_folder(folder: Path, setting: str, needed_bytes: int = 0) -> None:
    """Refuse unless files can be written in ``folder`` (created later if missing).

    Writes and removes a small probe file in the nearest existing ancestor, so a read-only
    folder, a file in the way or a full disk is found before any long work.

    Raises:
        SettingError: Naming the folder, the setting it comes from and the reason.
    """
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        refuse(f"output folder {folder} ({setting}) cannot be created: {existing} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".robust-write-test-") as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        reason = err.strerror or type(err).__name__
        refuse(f"output folder {folder} ({setting}) is not writable: {reason} (in {existing})")
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        refuse(
            f"output folder {folder} ({setting}) has {free / 2**20:.1f} MiB free; a checkpoint "
            f"of this model needs about {needed_bytes / 2**20:.1f} MiB"
        )


def _checkpoint_bytes(model: torch.nn.Module) -> int:
    """Rough size of one checkpoint: weights and two optimizer moments per parameter."""
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    return 3 * sum(sizes)


# ----------------------------------------------------------------------------------------------
# Settings that Lightning or torch accept but that fail or mislead once training runs


def check_trainer_settings(trainer: Mapping[str, Any]) -> None:
    """Refuse trainer settings that end in a ZeroDivisionError in training, or do nothing.

    Raises:
        SettingError: Naming the setting and its allowed values.
    """
    check_int(
        "trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1), minimum=1
    )
    every = trainer.get("check_val_every_n_epoch", 1)
    if every is not None:
        try:
            check_int("trainer.check_val_every_n_epoch", every, minimum=1)
        except SettingError as err:
            refuse(f"{err} (or null, to validate every val_check_interval steps)")
    clip = trainer.get("gradient_clip_val")
    if clip is not None:
        try:
            check_real("trainer.gradient_clip_val", clip, low=0, low_inclusive=True)
        except SettingError as err:
            refuse(f"{err} (0 or null: no clipping)")
    interval = trainer.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool) and interval < 1:
        refuse(
            f"trainer.val_check_interval must be an integer >= 1 (training batches) or a "
            f"fraction in (0, 1] of an epoch; got {interval}"
        )
    if isinstance(interval, float) and not 0 < interval <= 1:
        refuse(
            f"trainer.val_check_interval must be a fraction in (0, 1] of an epoch or an "
            f"integer >= 1 (training batches); got {interval}"
        )


def check_grouped_settings(model: Any) -> None:
    """Refuse a model setting of dataclass type (an attack) given as something else than a mapping.

    jsonargparse accepts ``--model.init_args.attack='[1, 2]'`` when parsing and fails when it
    builds the dataclass, with a ``TypeError`` (a traceback, exit status 1).

    Raises:
        SettingError: Naming the setting, its fields and the value given.
    """
    if not isinstance(model, Namespace | Mapping) or not model.get("class_path"):
        return
    target, given = _resolve(str(model.get("class_path"))), model.get("init_args") or {}
    try:
        hints = typing.get_type_hints(target.__init__) if target is not None else {}
    except Exception:  # annotations that do not resolve: jsonargparse reports those itself
        return
    for name, hint in hints.items():
        groups = [t for t in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(t)]
        value = given.get(name) if isinstance(given, Namespace | Mapping) else None
        plain = value is None or isinstance(value, Namespace | Mapping)
        if groups and not plain and not dataclasses.is_dataclass(value):
            fields = ", ".join(field.name for field in dataclasses.fields(groups[0]))
            refuse(f"model.init_args.{name} must be a mapping of {fields}; got {value!r}")


def check_early_stopping(trainer: Trainer) -> None:
    """Refuse an ``EarlyStopping`` that follows a metric an evaluation logs every k-th epoch.

    Between those epochs Lightning's ``callback_metrics`` keep the last value, so Lightning's
    EarlyStopping, which checks after every validation, would count each validation between as
    one without improvement and stop too early. Validating every k-th epoch (or a multiple of k)
    is fine: each validation then logs it afresh.

    Raises:
        SettingError: Naming the monitor, the callback and its schedule.
    """
    validations = trainer.check_val_every_n_epoch or 1  # None: by steps, in every epoch
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping) and callback.monitor:
            evaluation = validation_evaluation_of(trainer, callback.monitor)
            if evaluation is not None and validations % evaluation.every_n_val_epochs:
                refuse(
                    f"EarlyStopping monitor {callback.monitor!r} is logged every "
                    f"{evaluation.every_n_val_epochs} epochs by {type(evaluation).__name__}, and "
                    "between them it would count the last value again as no improvement; set "
                    f"that callback's every_n_val_epochs to 1, or stop on a metric logged every "
                    "epoch"
                )


def check_fit_trains(trainer: Mapping[str, Any]) -> None:
    """Refuse a ``fit`` that would train nothing (and so save no checkpoint) without a word.

    Raises:
        SettingError: Naming ``max_epochs`` or ``limit_train_batches``.
    """
    max_steps = trainer.get("max_steps")
    if trainer.get("max_epochs") == 0:  # Lightning stops at once, whatever max_steps says
        refuse("trainer.max_epochs 0 trains nothing; fit needs max_epochs >= 1 (or -1: no limit)")
    if trainer.get("limit_train_batches") in (0, 0.0):
        refuse(
            "trainer.limit_train_batches 0 trains nothing; fit needs a number of batches >= 1 "
            "or a fraction in (0, 1]"
        )
    if max_steps == 0:
        refuse("trainer.max_steps 0 trains nothing; fit needs max_steps >= 1 (or -1: no limit)")


EVALUATION_LIMITS = {"test": "limit_test_batches", "validate": "limit_val_batches",
                     "predict": "limit_predict_batches"}  # fmt: skip
"""The batch limit of the loop each evaluation subcommand runs."""


def check_evaluation_runs(subcommand: str, trainer: Mapping[str, Any]) -> None:
    """Refuse ``test``/``validate``/``predict`` with a batch limit of 0: an exit 0 with no numbers.

    Raises:
        SettingError: Naming the limit.
    """
    limit = EVALUATION_LIMITS.get(subcommand)
    if limit and trainer.get(limit) in (0, 0.0):
        refuse(
            f"trainer.{limit} 0 evaluates nothing; {subcommand} needs a number of batches >= 1 "
            "or a fraction in (0, 1]"
        )


def _optimizers_and_schedulers(built: Any) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """The optimizers and LR schedulers in what ``configure_optimizers`` returned, in order."""
    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[Any] = []

    def walk(item: Any) -> None:
        if isinstance(item, torch.optim.Optimizer):
            optimizers.append(item)
        elif isinstance(item, LRScheduler | ReduceLROnPlateau):
            schedulers.append(item)
        elif isinstance(item, Mapping):
            for value in item.values():
                walk(value)
        elif isinstance(item, list | tuple):
            for value in item:
                walk(value)

    walk(built)
    return optimizers, schedulers


def check_scheduler_steps(scheduler: Any, monitor: str = "val/acc", mode: str = "max") -> None:
    """Step a throwaway scheduler once; refuse its settings if that fails or the lr goes wrong.

    A ``ReduceLROnPlateau`` follows the checkpoint's ``monitor``; its mode must be that
    metric's ``mode``.

    Raises:
        SettingError: Naming the scheduler and its settings.
    """
    state = scheduler.state_dict()
    settings = ", ".join(
        f"{k}={v!r}"
        for k, v in state.items()
        if not k.startswith("_")
        and k not in {"last_epoch", "base_lrs", "verbose", "best"}
        and isinstance(v, int | float | str)
    )
    name = f"model lr_scheduler {type(scheduler).__name__}({settings})"
    if isinstance(scheduler, ReduceLROnPlateau):
        problem = plateau_mode_problem(scheduler, monitor, mode)
        if problem:
            refuse(f"{name} {problem}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping before the optimizer steps
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(0.0)
            else:
                scheduler.step()
    except (ArithmeticError, ValueError, TypeError) as err:
        hint = "step sizes and periods must be integers >= 1"
        refuse(
            f"{name} fails on its first step ({type(err).__name__}: {_one_line(str(err))}); "
            + (hint if isinstance(err, ZeroDivisionError) else "check its init_args")
        )
    for group in scheduler.optimizer.param_groups:
        lr = float(group["lr"])
        if not math.isfinite(lr) or lr < 0:
            refuse(f"{name} sets the learning rate to {lr} on its first step; it must stay >= 0")


# Keys that a model logs only in validation epochs after the sanity check, and the model setting
# that must be > 0 for it to log them.
LOGGED_AFTER_SANITY_CHECK = {
    "val/robust_acc": "robust_val_images",  # AdversarialClassifier
    "val/noisy_acc": "noisy_val_images",  # NoiseAugmentedClassifier
}


def monitor_direction(monitor: str) -> str | None:
    """``"min"`` for a loss, ``"max"`` for an accuracy or ACR key, None where the name says neither."""
    parts = monitor.split("/")
    if any("loss" in part for part in parts):
        return "min"
    if any(part.startswith(("acc", "acr")) or "_acc" in part for part in parts):
        return "max"
    return None


def check_monitor_mode(monitor: str | None, mode: str) -> None:
    """Refuse a checkpoint mode that would keep the worst epoch of the monitored key.

    Raises:
        SettingError: Naming the monitor, the mode and the mode it needs.
    """
    wanted = None if monitor is None else monitor_direction(monitor)
    if wanted is not None and mode != wanted:
        worst = "highest" if wanted == "min" else "lowest"
        refuse(
            f"checkpoint.mode {mode!r} would keep the epoch of the {worst} {monitor}; "
            f"monitoring {monitor} needs checkpoint.mode {wanted}"
        )


def check_validation_runs(monitor: str | None, trainer: Trainer) -> None:
    """Refuse a ``val/`` checkpoint monitor when no validation epoch will run in this fit.

    Lightning only warns, saves no best checkpoint, and ``--ckpt_path best`` would then find
    none of this run's.

    Raises:
        SettingError: Naming the monitor and the trainer setting that turns validation off.
    """
    if monitor is None or not monitor.startswith("val"):
        return
    every, max_epochs = trainer.check_val_every_n_epoch, trainer.max_epochs
    reason = None
    if not trainer.limit_val_batches:
        reason = f"trainer.limit_val_batches is {trainer.limit_val_batches}"
    elif every is not None and max_epochs is not None and 0 <= max_epochs < every:
        reason = f"trainer.check_val_every_n_epoch {every} > trainer.max_epochs {max_epochs}"
    if reason is not None:
        refuse(
            f"checkpoint.monitor {monitor!r} is never logged: no validation runs ({reason}); "
            "let validation run, or monitor another key (null keeps the last epoch)"
        )


def check_monitor_can_be_logged(monitor: str | None, model: Any) -> None:
    """Refuse a checkpoint monitor that the model's settings never log.

    Raises:
        SettingError: Naming the monitor and the model setting it needs.
    """
    setting = LOGGED_AFTER_SANITY_CHECK.get(str(monitor))
    if setting is None:
        return
    if not hasattr(model, setting):
        refuse(
            f"checkpoint.monitor {monitor!r} is never logged: {type(model).__name__} has no "
            f"{setting} setting to log it; monitor another key such as val/acc"
        )
    value = getattr(model, setting)
    if not (_is_index(value) and value > 0):
        refuse(
            f"checkpoint.monitor {monitor!r} is never logged: {type(model).__name__} logs it "
            f"only with model.init_args.{setting} > 0 (here {value!r}); set it, or monitor "
            "another key such as val/acc"
        )


def _named_values(args: Any) -> list[str]:
    """The values among command line ``args``: ``x`` of ``--key=x``, and the bare tokens."""
    tokens = [t for t in args if isinstance(t, str)] if isinstance(args, Sequence) else []
    return [token.partition("=")[2] if token.startswith("-") else token for token in tokens]


def _undecodable_file(args: Any) -> str:
    """The first file named among command line ``args`` that is not UTF-8 text, for a message."""
    for value in _named_values(args):
        try:
            if value and Path(value).is_file():
                Path(value).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            return f"the file {value}"
        except OSError:
            continue
    return "a config file"


class _RepeatedKey(yaml.YAMLError):
    """A mapping of a YAML file names one key twice."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: a key may override it
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise _RepeatedKey(f"{key!r} twice (lines {seen[key]} and {line})")
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def check_config_sections(args: Any) -> None:
    """Refuse a config file whose ``trainer`` or ``checkpoint`` section is not a mapping.

    jsonargparse drops such a section without a word when other trainer settings follow (a
    later ``--trainer.x``), so the files named on the command line are read here first; a key
    given twice in one mapping (a copy-paste slip: YAML keeps the last one silently) is refused.

    Raises:
        SettingError: Naming the file and the section or key.
    """
    for value in _named_values(args):
        try:
            if not (value.endswith((".yaml", ".yml")) and Path(value).is_file()):
                continue
            loaded = yaml.load(Path(value).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except _RepeatedKey as err:
            refuse(f"the config file {value} sets {err}: YAML keeps the last one silently")
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # jsonargparse reports what it cannot read
        if loaded is None:  # jsonargparse said only "Unexpected config:"
            refuse(f"the config file {value} holds no settings (empty, or only comments)")
        for section in ("trainer", "checkpoint"):
            if not isinstance(loaded, dict) or section not in loaded:
                continue
            found = loaded[section]
            if found is None:  # `trainer:` with nothing under it: the earlier settings vanished
                refuse(
                    f"{section} in {value} is empty (null); give its settings under it (e.g. "
                    f"{section}: {{...}}) or remove the line"
                )
            if not isinstance(found, dict | str):  # str: a nested file
                refuse(
                    f"{section} in {value} must be a mapping of settings (e.g. {section}: "
                    f"{{...}}); got the {type(found).__name__} {_one_line(repr(found))}"
                )


# ----------------------------------------------------------------------------------------------
# The CLI


class CountOrFractionTrainer(Trainer):
    """Lightning's Trainer, whose ``limit_*_batches`` read ``1`` as one batch on the command line.

    Lightning annotates these settings ``float | int | None``, so jsonargparse tries float first
    and turns ``--trainer.limit_test_batches 1`` into ``1.0``, which Lightning takes as *all*
    batches: a request for one batch silently ran the whole split. Annotated ``int | float |
    None`` here, ``1`` stays the batch count and ``1.0`` the fraction, as Lightning documents
    (float = fraction, int = number of batches). Everything else is Lightning's.

    Args:
        limit_train_batches: Training batches per epoch: an int is a count, a float a fraction.
        limit_val_batches: Validation batches: an int is a count, a float a fraction.
        limit_test_batches: Test batches: an int is a count, a float a fraction.
        limit_predict_batches: Prediction batches: an int is a count, a float a fraction.
        *args: Lightning's Trainer arguments.
        **kwargs: Lightning's Trainer arguments.
    """

    def __init__(
        self,
        *args: Any,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            *args,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )


class RobustCLI(LightningCLI):
    """LightningCLI with the data-to-model links, default checkpoints and early, clear refusals."""

    checkpoint_path: str | None = None
    checkpoint_hparams: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None  # the checked checkpoint of ckpt_path (local files)
    named_settings: frozenset[str] = frozenset()  # model settings the user gave explicitly

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102 (LightningCLI hook)
        for name in LINKED_SETTINGS:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        parser.add_argument(
            "--allow_other_data",
            type=bool,
            default=False,
            help="Evaluate or resume a checkpoint on data other than it was trained on (its "
            "test images may then have been among its training images); refused by default",
        )
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser, args) -> None:
        """Parse, then resolve ``ckpt_path`` and check it before Lightning reads its hyperparameters.

        Raises:
            SettingError: For ``weights_only false``; for a missing, unreadable or unsafe
                checkpoint, or one whose model class or hyperparameters disagree with the
                settings given.
        """
        check_config_sections(sys.argv[1:] if args is None else args)
        try:
            super().parse_arguments(parser, args)
        except UnicodeDecodeError as err:
            refuse(
                f"{_undecodable_file(sys.argv[1:] if args is None else args)} is not UTF-8 "
                f"text ({err.reason} at byte {err.start}); save it as UTF-8"
            )
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        for section in ("trainer", "checkpoint"):
            value = config.get(section)
            if section in config and not isinstance(value, Namespace | Mapping):
                refuse(
                    f"{section} must be a mapping of settings (e.g. {section}: {{...}} in YAML); "
                    f"got the {type(value).__name__} {_one_line(repr(value))}"
                )
        check_trainer_settings(config.get("trainer") or {})
        if subcommand == "fit":
            check_fit_trains(config.get("trainer") or {})
        check_evaluation_runs(subcommand, config.get("trainer") or {})
        if config.get("weights_only") is False:
            refuse(
                "weights_only false is not allowed: checkpoints are always loaded with "
                "torch.load(weights_only=True), which cannot run code hidden in a file"
            )
        seed = config.get("seed_everything")
        if not isinstance(seed, bool) and not (isinstance(seed, int) and 0 <= seed < 2**32):
            refuse(
                f"seed_everything must be true, false or an integer in [0, {2**32 - 1}]; "
                f"got {seed!r}"
            )
        given = sys.argv[1:] if args is None else args
        linked = sorted(set(LINKED_SETTINGS) & named_model_settings(given, subcommand or ""))
        if linked:
            refuse(
                f"model.init_args.{linked[0]} is linked from the data module, which would "
                f"silently replace the value given; choose the data (data.class_path and its "
                f"init_args) instead of setting {', '.join(linked)} on the model"
            )
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in {"last", "best"}:
            dirpath = (config.get("checkpoint") or {}).get("dirpath")
            ckpt_path = config.ckpt_path = find_run_checkpoint(
                ckpt_path, logger_run_dir(config.trainer), dirpath, logger_version(config.trainer)
            )
        if not ckpt_path:
            return
        local = local_checkpoint_path(str(ckpt_path))
        ckpt_path = config.ckpt_path = local
        self.checkpoint = check_checkpoint(local, resuming=subcommand == "fit")
        hparams = dict(self.checkpoint.get("hyper_parameters") or {})
        if not hparams:
            return
        self.checkpoint_path, self.checkpoint_hparams = str(ckpt_path), hparams
        named = named_model_settings(given, subcommand or "")
        self.named_settings = frozenset(named)
        check_model_against_checkpoint(config.model, hparams, named, str(ckpt_path))

    def _parse_ckpt_path(self) -> None:
        """Lightning's merge of the checkpoint's hyperparameters, its refusal naming the file."""
        try:
            super()._parse_ckpt_path()
        except SettingError as err:
            refuse(
                f"the hyperparameters in the checkpoint {self.checkpoint_path} do not fit: {err}"
            )

    def check_linked_settings(self, values: Mapping[str, Any]) -> None:
        """Refuse when the data module's linked values disagree with the checkpoint's.

        The data module's class count, channels, image size and normalization statistics are
        linked into the model and would replace the checkpoint's (or, for the normalization
        buffers, be replaced by them when the weights load).

        Raises:
            SettingError: Naming the setting and both values.
        """
        hparams = self.checkpoint_hparams or {}
        for name in LINKED_SETTINGS:
            value = values.get(name)
            if value is None or name not in hparams:
                continue
            if not same(canonical(value), canonical(hparams[name])):
                refuse(
                    f"the data module gives {name} {show(canonical(value))} but the checkpoint "
                    f"{self.checkpoint_path} was trained with {name} "
                    f"{show(canonical(hparams[name]))} (model.init_args.{name}, linked from "
                    "data): use the data the checkpoint was trained with"
                )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """LightningCLI's, with Lightning's refusals of ``devices``/``accelerator`` as one line.

        For a CPU ``devices`` of -2 or ``"abc"`` Lightning raises a ``TypeError``, for
        ``accelerator tpu`` without torch_xla a ``ModuleNotFoundError``.

        Raises:
            SettingError: With Lightning's reason.
        """
        try:
            return super().instantiate_trainer(**kwargs)
        except (TypeError, ModuleNotFoundError) as err:
            raise SettingError(f"trainer: {_one_line(str(err))}") from err

    def instantiate_classes(self) -> None:
        """Instantiate; a refused setting becomes a :class:`SettingError` with its one line.

        Before and after, the data module's linked values are checked against the checkpoint's.
        """
        if self.checkpoint_hparams:
            data_class = _resolve(str(self._get(self.config, "data").get("class_path", "")))
            self.check_linked_settings(
                {name: getattr(data_class, name, None) for name in LINKED_SETTINGS}
            )
        check_grouped_settings(self._get(self.config, "model"))
        try:
            super().instantiate_classes()
        except MisconfigurationException as err:  # Lightning's refusal of a trainer setting
            frames = traceback.extract_tb(err.__traceback__)
            checkpoint = any(frame.filename.endswith("model_checkpoint.py") for frame in frames)
            section = "checkpoint" if checkpoint else "trainer"  # ModelCheckpoint's own refusal
            raise SettingError(f"{section}: {_one_line(str(err))}") from err
        except ValueError as err:
            # jsonargparse wraps what a class raised in a ValueError listing the types it tried;
            # a refusal is a ValueError (or missing data), anything else a bug to show whole
            chain = list(_exception_chain(err))
            refusals = [e for e in chain if isinstance(e, SettingError | DataNotFoundError)]
            specific = next((e for e in chain if not _is_generic(str(e))), err)
            if not refusals and not isinstance(specific, ValueError):
                raise
            raise SettingError(self.with_checkpoint_source(essential_message(err))) from err
        if self.checkpoint_hparams and self.datamodule is not None:
            self.check_linked_settings(
                {name: getattr(self.datamodule, name, None) for name in LINKED_SETTINGS}
            )
        self.check_data_identity()
        if self.subcommand == "fit":
            for callback in self.trainer.checkpoint_callbacks:
                check_monitor_can_be_logged(getattr(callback, "monitor", None), self.model)
                check_monitor_mode(getattr(callback, "monitor", None), callback.mode)
                check_validation_runs(getattr(callback, "monitor", None), self.trainer)

    def check_data_identity(self) -> None:
        """Refuse a checkpoint trained on other data than the data module's (unless allowed).

        ``fit`` records the data module's ``identity()`` in every checkpoint (the class, dataset,
        split method, seed and fractions). Another seed or fraction makes another split, so the
        test images may have been training images: ``validate``, ``test`` and a resumed ``fit``
        are refused, naming what differs, unless ``--allow_other_data true`` (``predict``, which
        applies a model to any images, is not checked).
        Checkpoints without the record (older ones, or data modules without ``identity``) are
        not checked.

        Raises:
            SettingError: Naming the differing entries, both values and the way out.
        """
        subcommand = self.config.get("subcommand")
        if subcommand not in ("fit", "validate", "test"):
            return  # predict applies a model to whatever images it is given
        config = self.config[subcommand]
        path = self.checkpoint_path or config.get("ckpt_path")
        recorded = (self.checkpoint or {}).get(DATA_IDENTITY_KEY)
        identity = getattr(self.datamodule, "identity", None)
        if recorded is not None and not isinstance(recorded, Mapping):
            refuse(
                f"ckpt_path {path!r}: its '{DATA_IDENTITY_KEY}' is a {type(recorded).__name__}, "
                "not the mapping fit writes"
            )
        if recorded is None or not callable(identity):
            return
        # both as JSON values (tuples as lists); the file's may hold anything
        current = json.loads(json.dumps(identity(), default=repr))
        try:
            recorded = json.loads(json.dumps(recorded, default=repr))
        except (TypeError, ValueError):  # keys that are not strings, a cycle
            refuse(
                f"ckpt_path {path!r}: its '{DATA_IDENTITY_KEY}' is not a mapping of plain "
                "values (as fit writes it)"
            )
        names = sorted(
            set(current) | set(recorded),
            key=lambda k: (k not in ("data_module", "dataset", "seed"), str(k)),
        )
        differing = [k for k in names if not same(current.get(k), recorded.get(k))]
        if not differing or config.get("allow_other_data"):
            return
        shown = "; ".join(
            f"{k} {recorded.get(k)!r} there, {current.get(k)!r} here" for k in differing[:3]
        )
        refuse(
            f"the checkpoint {path} was trained on "
            f"other data than the data module gives ({shown}): its test images may have been "
            "among its training images; use the data settings it was trained with, or pass "
            "--allow_other_data true to use these images anyway"
        )

    def with_checkpoint_source(self, message: str) -> str:
        """``message``, plus the checkpoint's values of the settings it names that came from there.

        A value the user did not give (not in a config file or on the command line) but the
        checkpoint's hyperparameters did is refused in the class's words, which say nothing of the
        checkpoint; this names it, so the user knows which file to look at.
        """
        hparams = self.checkpoint_hparams or {}
        from_checkpoint = [
            f"{name}={hparams[name]!r}"
            for name in hparams
            if name not in self.named_settings and re.search(rf"\b{re.escape(name)}\b", message)
        ]
        if not from_checkpoint:
            return message
        return (
            f"{message} ({', '.join(from_checkpoint)} from the checkpoint {self.checkpoint_path})"
        )

    def check_output_folders(self, fitting: bool) -> None:
        """Refuse before any work when a folder the run writes to cannot be written.

        Checks each logger's folder, ``trainer.default_root_dir`` when it was given or there is
        no logger, and for ``fit`` the checkpoint folders (with room for a checkpoint).
        """
        trainer = self.trainer
        checkpoint_size = _checkpoint_bytes(self.model) if fitting else 0
        folders: list[tuple[Path, str, int]] = []
        for logger in trainer.loggers:
            folder = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
            if folder:
                folders.append((Path(folder), "trainer.logger save_dir", checkpoint_size))
        trainer_config = self._get(self.config, "trainer") or {}
        if not trainer.loggers or trainer_config.get("default_root_dir") is not None:
            folders.append((Path(trainer.default_root_dir), "trainer.default_root_dir", 0))
        if fitting:
            for callback in trainer.checkpoint_callbacks:
                if getattr(callback, "dirpath", None):
                    folders.append((Path(callback.dirpath), "checkpoint.dirpath", checkpoint_size))
        for folder, setting, needed in folders:
            check_output_folder(folder, setting, needed)

    def check_optimizer(self) -> tuple[list[torch.optim.Optimizer], list[Any]] | None:
        """Build the model's optimizers and schedulers once, so a bad setting is refused up front.

        Each scheduler takes one step on its throwaway optimizer, where a ``StepLR`` with
        ``step_size`` 0 fails, and the learning rates must stay finite and >= 0.

        Returns:
            The optimizers and schedulers built, or None when they need the running trainer.

        Raises:
            SettingError: With the optimizer's or scheduler's own reason (e.g. a negative lr).
        """
        try:
            built = self.model.configure_optimizers()
        except (ValueError, TypeError) as err:
            refuse(f"model optimizer or lr_scheduler settings: {_one_line(str(err))}")
        except RuntimeError:
            return None  # it needs the running trainer (e.g. its step count): fit builds it then
        optimizers, schedulers = _optimizers_and_schedulers(built)
        checkpoint = self.config[self.subcommand].get("checkpoint") or {}
        monitor = checkpoint.get("monitor")  # what a ReduceLROnPlateau follows (the model's)
        mode = checkpoint.get("mode", "max") if monitor else "max"
        for scheduler in schedulers:
            check_scheduler_steps(scheduler, monitor or "val/acc", mode)
        return optimizers, schedulers

    def _run_trainer(self, method: str, kwargs: dict[str, Any]) -> None:
        self.check_output_folders(fitting=method == "fit")
        ckpt_path = kwargs.get("ckpt_path")
        if self.checkpoint is not None:  # loaded and checked when parsing: the built model next
            check_weights_fit_model(str(ckpt_path), self.checkpoint["state_dict"], self.model)
            loops = self.checkpoint.get("loops")
            if loops is not None:
                loop = f"{method}_loop"
                expected = getattr(self.trainer, loop).state_dict()
                check_loop_state_fits(str(ckpt_path), loop, loops.get(loop), expected)
        elif not ckpt_path and method in ("validate", "test") and not self.trainer.fast_dev_run:
            warnings.warn(
                f"{method} without ckpt_path evaluates the model as built, with untrained "
                "weights; give --ckpt_path (a .ckpt written by fit, 'best' or 'last') to "
                "evaluate a trained model",
                UserWarning,
                stacklevel=2,
            )
        if method == "fit":
            check_early_stopping(self.trainer)
            built = self.check_optimizer()
            if self.checkpoint is not None and built is not None:
                check_optimizers_fit(str(ckpt_path), self.checkpoint, *built)
        kwargs["weights_only"] = True  # None (the default) or True: refused False when parsing
        try:
            getattr(self.trainer, method)(**kwargs)
        except MisconfigurationException as err:  # Lightning's refusal as a loop starts
            raise SettingError(f"trainer: {_one_line(str(err))}") from err
        except ValueError as err:  # val_check_interval beyond the training batches
            if "val_check_interval" not in str(err):
                raise
            raise SettingError(f"trainer: {_one_line(str(err))}") from err

    # LightningCLI runs ``self.<subcommand>`` when it exists instead of ``trainer.<subcommand>``.
    def fit(self, **kwargs: Any) -> None:
        """``Trainer.fit`` with ``weights_only=True`` after checking the output folders."""
        self._run_trainer("fit", kwargs)

    def validate(self, **kwargs: Any) -> None:
        """``Trainer.validate`` with ``weights_only=True`` after checking the output folders."""
        self._run_trainer("validate", kwargs)

    def test(self, **kwargs: Any) -> None:
        """``Trainer.test`` with ``weights_only=True`` after checking the output folders."""
        self._run_trainer("test", kwargs)

    def predict(self, **kwargs: Any) -> None:
        """``Trainer.predict`` with ``weights_only=True`` after checking the output folders."""
        self._run_trainer("predict", kwargs)


class SettingsCheckCLI(RobustCLI):
    """:class:`RobustCLI` that parses, checks and instantiates, and runs no subcommand."""

    def _run_subcommand(self, subcommand: str) -> None:
        return


def main(
    args: list[str] | dict | Namespace | None = None,
    *,
    exit_on_refusal: bool = True,
    check_only: bool = False,
) -> RobustCLI:
    """Run the CLI on ``args`` (``sys.argv`` when None) and return it.

    Args:
        args: Command line arguments, e.g. ``["fit", "--config", "configs/mnist/standard.yaml"]``.
        exit_on_refusal: When True (the command line), a refusal prints ``error: <one line>`` to
            stderr and exits with status 2. When False (callers in Python such as ``compare``),
            it raises :class:`robust.checks.SettingError` with that line instead, whether it
            happens while parsing, instantiating or running the subcommand.
        check_only: Parse and instantiate everything, then stop before the subcommand runs: a
            check of the settings before long work, as ``compare`` does for all its stages.

    Returns:
        The CLI, whose ``trainer``, ``model`` and ``datamodule`` hold the finished run.

    Raises:
        SettingError: Only with ``exit_on_refusal=False``.
    """
    retain_freed_memory()  # CPU forward passes reuse their memory (robust.cpu_memory)
    try:
        return (SettingsCheckCLI if check_only else RobustCLI)(
            StandardClassifier,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_class=CountOrFractionTrainer,
            trainer_defaults=TRAINER_DEFAULTS,
            parser_class=RobustArgumentParser,
            args=args,
        )
    except SIGTERMException as err:
        if err.code not in (None, 0):  # ours: the evaluation callbacks said what they kept
            raise
        # Lightning's loops stop a fit on SIGTERM with SystemExit(None): exit status 0, as if
        # the training had finished
        print(
            "stopped by SIGTERM before the end; what was saved is kept (a training goes on "
            "with `fit --ckpt_path last` and the same settings)",
            file=sys.stderr,
            flush=True,
        )
        raise SIGTERMException(128 + signal.SIGTERM) from None
    except (SettingError, DataNotFoundError) as err:
        message = essential_message(err)
        if not exit_on_refusal:
            if isinstance(err, SettingError):
                raise
            raise SettingError(message) from err
        tip = getattr(err, "tip", None)
        if tip:
            print(f"tip: {tip}", file=sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def console() -> None:
    """Entry point of the ``robust`` console script (returns nothing, so the exit status is 0)."""
    main()


if __name__ == "__main__":
    console()
