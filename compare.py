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

import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

import cli
from robust.checks import SettingError
from robust.report import write_report


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


def parse(argv: list[str]):
    """Settings of the comparison (from ``--config`` YAML and flags)."""
    parser = ArgumentParser(prog="robust-compare", description=__doc__.splitlines()[0])
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
    return settings


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
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key and Path(done["ckpt_path"]).is_file():
            print(f"[compare] {training.name}: reusing trained checkpoint {done['ckpt_path']}")
            return done
    print(f"[compare] {training.name}: training with {training.config}")
    start = time.perf_counter()
    run = cli.main(
        [
            "fit",
            "--config",
            training.config,
            *settings.common_args,
            *training.args,
            *logger_args(out, training.name, f"fit-{key}"),
            "--checkpoint.dirpath",
            str(out / training.name / "checkpoints" / key),
        ],
        exit_on_refusal=False,
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


def evaluate(settings, training: Training, out: Path, trained: dict) -> dict:
    """Test one model with the evaluation callbacks, or reuse a finished identical evaluation."""
    marker = out / training.name / "metrics.json"
    texts = [Path(path).read_text() for path in settings.evaluation]
    arguments = with_config_contents(settings.eval_args)
    key = stage_key(trained["key"], trained["ckpt_path"], *texts, *arguments)
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("key") == key:
            print(f"[compare] {training.name}: reusing evaluation {marker}")
            return done
    print(f"[compare] {training.name}: attacking and certifying {trained['ckpt_path']}")
    evaluation = [arg for path in settings.evaluation for arg in ("--config", path)]
    run = cli.main(
        [
            "test",
            "--config",
            training.config,
            *settings.common_args,
            *training.args,
            *evaluation,
            *settings.eval_args,
            *logger_args(out, training.name, f"test-{key}"),
            "--ckpt_path",
            trained["ckpt_path"],
        ],
        exit_on_refusal=False,
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
