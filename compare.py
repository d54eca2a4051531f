"""``robust-compare``: train several models, attack and certify each, and write one report.

Every stage is the command line's own ``fit`` and ``test`` (:func:`cli.main`):

1. ``fit`` each training config (the same data and backbone for all, from ``common_args``);
2. ``test`` the best checkpoint of each with the evaluation configs (the attack list, the
   certification, the smoothed-classifier attack), appended to the model's callbacks; each
   callback writes its own files under the run's log directory, which is
   ``<output_dir>/tensorboard/<name>/test-<key>`` (``key``: a hash of everything the evaluation
   depends on), so an interrupted certification resumes and a changed one starts afresh;
3. write ``report.md``, the figures and a TensorBoard ``comparison`` run (:mod:`robust.report`).

A stage that already finished is reused when the command runs again.

    robust-compare --config configs/compare/mnist.yaml      # or: python compare.py --config ...
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

import cli
from robust.checks import SettingError
from robust.report import REPORT_RUN, write_report


@dataclass
class Training:
    """One model of the comparison.

    Attributes:
        name: Name in the report and folder under ``output_dir``.
        config: LightningCLI config file of the training.
        args: Extra CLI arguments for this model only (e.g. ``--model.init_args.sigma 0.5``).
        label: What the report calls the model (default: ``name``).
    """

    name: str
    config: str
    args: list[str] = field(default_factory=list)
    label: str | None = None


class CompareArgumentParser(ArgumentParser):
    """jsonargparse's parser whose errors raise a one-line :class:`SettingError` (no usage page)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Raise :class:`SettingError` with the essential line of ``message``."""
        if not self.exit_on_error:  # jsonargparse's internal parsers keep their own errors
            super().error(message, ex)
        raise SettingError(
            f"{cli.essential_message(ex, message)} (robust-compare --help lists the options)"
        ) from ex


def parse(argv: list[str]):
    """Settings of the comparison (from ``--config`` YAML and flags)."""
    parser = CompareArgumentParser(prog="robust-compare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--output_dir", type=str, default="results/mnist_compare")
    parser.add_argument("--trainings", type=list[Training], default=[])
    parser.add_argument("--common_args", type=list[str], default=[], help="CLI args for every run")
    parser.add_argument(
        "--evaluation", type=list[str], default=[], help="config files adding evaluation callbacks"
    )
    parser.add_argument("--eval_args", type=list[str], default=[], help="CLI args of every test")
    parser.add_argument(
        "--reference", type=str, default="embedded", help="reference rows: embedded or full"
    )
    settings = parser.parse_args(argv)
    if not settings.trainings:
        parser.error("trainings: give at least one {name, config} entry")
    for path in settings.evaluation:
        if not Path(path).is_file():
            parser.error(f"evaluation: config file {path!r} does not exist")
    for training in settings.trainings:
        if not Path(training.config).is_file():
            parser.error(
                f"trainings: config file {training.config!r} of {training.name} does not exist"
            )
    if settings.reference not in ("embedded", "full"):
        parser.error(f"reference must be 'embedded' or 'full'; got {settings.reference!r}")
    check_names(settings.trainings)
    out = Path(settings.output_dir)
    if any(p.exists() and not p.is_dir() for p in (out, *out.parents)):
        raise SettingError(f"output_dir {out} cannot be a folder: a file is in its place or path")
    cli.check_output_folder(out, "output_dir")  # creatable and writable, before any stage
    return settings


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_names(trainings: list[Training]) -> None:
    """Refuse repeated names or labels, or names that are not plain folder names (``../x``, ``a/b``).

    Raises:
        SettingError: Naming the training.
    """
    seen: set[str] = set()
    for training in trainings:
        if not NAME.fullmatch(training.name):
            raise SettingError(
                f"trainings: name {training.name!r} must be a plain folder name (letters, digits, "
                "'_', '-' and '.', not starting with '.' or '-'): it names the model's folder "
                "under output_dir"
            )
        if training.name == REPORT_RUN:  # the report rewrites that folder whole
            raise SettingError(
                f"trainings: name {REPORT_RUN!r} is the report's TensorBoard run "
                f"(output_dir/tensorboard/{REPORT_RUN}); give the training another name"
            )
        if training.name in seen:
            raise SettingError(f"trainings: name {training.name!r} is given twice")
        seen.add(training.name)
    shown: dict[str, str] = {}
    for training in trainings:  # the report's rows, keyed by label: one model would replace another
        label = training.label or training.name
        if label in shown:
            raise SettingError(
                f"trainings: {training.name!r} and {shown[label]!r} are both shown as {label!r}; "
                "give each a label of its own"
            )
        shown[label] = training.name


def check_stages(settings, out: Path) -> None:
    """Check the settings of every stage (parse and build, nothing run) before any training.

    So a typo in the last evaluation config is refused before the first model trains.

    Raises:
        SettingError: The stage's refusal, naming the training.
    """
    for training in settings.trainings:
        stages = {
            "training": stage_args("fit", settings, training, out, "check"),
            "evaluation": stage_args("test", settings, training, out, "check"),
        }
        for stage, args in stages.items():
            try:
                with quiet_lightning():
                    checked = run_cli(args, check_only=True)
                if stage == "training":
                    checked.check_optimizer()
            except SettingError as err:
                raise SettingError(f"{training.name} ({stage}): {err}") from None


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Without Lightning's notes (devices found, seed set, tips): a check prints nothing."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def read_record(path: Path, fields: dict[str, type]) -> dict | None:
    """A stage's record (``fit.json``, ``metrics.json``) if it is whole and well formed, else None.

    The records are files we read back, so they are checked: a JSON object with each field of
    the given type. A record that is not is ignored (its stage runs again), with a note.
    """
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in fields.items()):
        return record
    print(f"[compare] ignoring {path}: not a record this command wrote; the stage runs again")
    return None


def valid_metrics(metrics: dict) -> bool:
    """Numbers by name (NaN: nothing was evaluated), accuracies and rates in [0, 1], whole counts."""
    for name, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isinf(value):
            return False
        last = name.split("/")[-1]
        if ("acc" in last or "rate" in last) and not 0 <= value <= 1 and not math.isnan(value):
            return False
        if "num_images" in name and not (value >= 0 and float(value).is_integer()):
            return False  # an image count (NaN included: a count is never unknown)
    return True


def run_cli(args: list[str], check_only: bool = False) -> cli.RobustCLI:
    """:func:`cli.main` on a stage's arguments; a refusal raises :class:`SettingError`.

    The arguments are the stage's own, so LightningCLI's warning about the process's other
    arguments (which would echo the whole command) is not shown.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return cli.main(args, exit_on_refusal=False, check_only=check_only)


def stage_args(
    subcommand: str, settings, training: Training, out: Path, version: str, *extra: str
) -> list[str]:
    """The CLI arguments of one stage: ``fit`` of a training, or ``test`` with the evaluation."""
    evaluation = []
    if subcommand == "test":
        evaluation = [arg for path in settings.evaluation for arg in ("--config", path)]
        evaluation += settings.eval_args
    return [
        subcommand,
        "--config",
        training.config,
        *settings.common_args,
        *training.args,
        *evaluation,
        *logger_args(out, training.name, version),
        *extra,
    ]


def logger_args(out: Path, name: str, version: str) -> list[str]:
    """Log under ``<out>/tensorboard/<name>/<version>``."""
    return [
        "--trainer.logger.init_args.save_dir",
        str(out / "tensorboard"),
        "--trainer.logger.init_args.name",
        name,
        "--trainer.logger.init_args.version",
        version,
    ]


def stage_key(*parts: str) -> str:
    """Short hash of everything a stage's result depends on (file contents and arguments)."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def with_config_contents(args: list[str]) -> list[str]:
    """``args`` followed by the content of each ``--config`` file they name.

    So a stage whose arguments name a config file is redone when that file changes.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "extra.yaml"
        >>> _ = path.write_text("model: {init_args: {sigma: 0.5}}")
        >>> with_config_contents(["--seed_everything=0", f"--config={path}"])[2]
        'model: {init_args: {sigma: 0.5}}'
    """
    named = [a.removeprefix("--config=") for a in args if a.startswith("--config=")]
    named += [b for a, b in itertools.pairwise(args) if a == "--config"]
    return [*args, *(Path(path).read_text() for path in named if Path(path).is_file())]


def fit(settings, training: Training, out: Path) -> dict:
    """Train one model, or reuse the finished training of the same config and arguments."""
    arguments = with_config_contents([*settings.common_args, *training.args])
    key = stage_key(Path(training.config).read_text(), *arguments)
    marker = out / training.name / "fit.json"
    done = read_record(marker, {"key": str, "ckpt_path": str, "train_time_s": float})
    if done and done["key"] == key and Path(done["ckpt_path"]).is_file():
        print(f"[compare] {training.name}: reusing trained checkpoint {done['ckpt_path']}")
        return done
    print(f"[compare] {training.name}: training with {training.config}")
    start = time.perf_counter()
    checkpoints = str(out / training.name / "checkpoints" / key)
    run = run_cli(
        stage_args(
            "fit", settings, training, out, f"fit-{key}", "--checkpoint.dirpath", checkpoints
        )
    )
    best = run.trainer.checkpoint_callback
    done = {
        "key": key,
        "ckpt_path": best.best_model_path or best.last_model_path,
        "train_time_s": time.perf_counter() - start,
    }
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(done, indent=2))
    return done


def report_inputs(done: dict) -> list[Path]:
    """Files of a finished evaluation that the report reads: the certification TSV, if it ran.

    Examples:
        >>> report_inputs({"log_dir": "runs/x", "metrics": {"certify/acr": 0.5}})
        [PosixPath('runs/x/certify_test.tsv')]
        >>> report_inputs({"log_dir": "runs/x", "metrics": {"test/acc": 0.9}})
        []
    """
    certified = any(key.startswith("certify/") for key in done["metrics"])
    return [Path(done["log_dir"]) / "certify_test.tsv"] if certified else []


def evaluate(settings, training: Training, out: Path, trained: dict) -> dict:
    """Test one model with the evaluation callbacks, or reuse a finished identical evaluation."""
    marker = out / training.name / "metrics.json"
    texts = [Path(path).read_text() for path in settings.evaluation]
    arguments = with_config_contents(settings.eval_args)
    key = stage_key(trained["key"], trained["ckpt_path"], *texts, *arguments)
    done = read_record(marker, {"key": str, "log_dir": str, "metrics": dict})
    if done and done["key"] == key:
        inside = Path(done["log_dir"]).resolve().is_relative_to(out.resolve())
        missing = [path for path in report_inputs(done) if not path.is_file()]
        if inside and valid_metrics(done["metrics"]) and not missing:
            print(f"[compare] {training.name}: reusing evaluation {marker}")
            return done
        reason = (
            f"{missing[0]}, which the report reads, is gone"
            if inside and valid_metrics(done["metrics"])
            else "its metrics or folder are not ones this run wrote"
        )
        print(f"[compare] ignoring {marker}: {reason}")
    print(f"[compare] {training.name}: attacking and certifying {trained['ckpt_path']}")
    run = run_cli(
        stage_args(
            "test", settings, training, out, f"test-{key}", "--ckpt_path", trained["ckpt_path"]
        )
    )
    done = {
        "key": key,
        "log_dir": run.trainer.log_dir,
        "metrics": {k: float(v) for k, v in run.trainer.callback_metrics.items()},
    }
    marker.write_text(json.dumps(done, indent=2, sort_keys=True))
    return done


def compare(argv: list[str]) -> Path:
    """Run the whole comparison; return the path of ``report.md``.

    Raises:
        SettingError: When a stage refuses its settings or inputs.
    """
    settings = parse(argv)
    out = Path(settings.output_dir)
    check_stages(settings, out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for training in settings.trainings:
        trained = fit(settings, training, out)
        evaluated = evaluate(settings, training, out, trained)
        results[training.label or training.name] = {**evaluated, **trained, "name": training.name}
    recorded = {
        "trainings": [vars(t) for t in settings.trainings],
        "common_args": settings.common_args,
        "evaluation": {
            path: yaml.safe_load(Path(path).read_text()) for path in settings.evaluation
        },
        "eval_args": settings.eval_args,
    }
    report = write_report(out, results, recorded, reference=settings.reference)
    print(f"[compare] report written to {report}")
    return report


def console(argv: list[str] | None = None) -> None:
    """Entry point of ``robust-compare``: a refusal is one ``error:`` line and exit status 2."""
    try:
        compare(sys.argv[1:] if argv is None else argv)
    except SettingError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    console()
