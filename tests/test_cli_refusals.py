"""Refusals reach the user as one ``error:`` line with exit status 2, wherever they happen."""

import ast
import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomllib
from lightning.pytorch import Callback

import cli
from robust.checks import SettingError

ROOT = Path(__file__).resolve().parents[1]
STANDARD = str(ROOT / "configs/mnist/standard.yaml")
SMOOTHING = str(ROOT / "configs/mnist/smoothing.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
ONE_BATCH = ["--trainer.limit_test_batches", "1", *QUIET]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI warns when sys.argv holds pytest's arguments besides ``args``."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def refusal(capsys, *args: str) -> str:
    """Run the CLI in-process, expect a refusal, and return its one ``error:`` line."""
    with pytest.raises(SystemExit) as info:
        cli.main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "Union subtypes" not in err
    return errors[0]


# --------------------------------------------------------------- refusals while the run is going


def test_certification_without_sigma_is_one_line_from_the_command_line(in_tmp):
    args = ["test", "--config", STANDARD, "--trainer.callbacks+=callbacks.Certification"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args, *ONE_BATCH],
        cwd=in_tmp,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: Certification sigma")


def test_certification_refusing_a_foreign_file_is_one_line(in_tmp, capsys):
    tsv = in_tmp / "certify.tsv"
    tsv.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t7\t7\t0.5\t1\t0:00:00.1\n")
    init_args = f"{{sigma: 0.25, output: {tsv}}}"
    callback = (
        f"--trainer.callbacks+={{class_path: callbacks.Certification, init_args: {init_args}}}"
    )
    line = refusal(capsys, "test", "--config", STANDARD, callback, *ONE_BATCH)
    assert str(tsv) in line and "settings file" in line


class Bug(Callback):
    """A callback with a bug: not a refusal, so it keeps its traceback."""

    def on_test_start(self, trainer, pl_module) -> None:
        raise RuntimeError("a bug, not a refusal")


class BrokenInit(Callback):
    """A callback whose construction has a bug."""

    def __init__(self) -> None:
        raise RuntimeError("a bug at construction")


def test_a_bug_at_construction_is_not_a_refusal(in_tmp):
    callback = "--trainer.callbacks+=tests.test_cli_refusals.BrokenInit"
    with pytest.raises(Exception) as info:
        cli.main(["test", "--config", STANDARD, callback, *ONE_BATCH])
    assert not isinstance(info.value, SettingError | SystemExit)
    assert "a bug at construction" in repr(info.value) + repr(info.value.__cause__)


def test_other_exceptions_keep_their_traceback(in_tmp):
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(
            [
                "test",
                "--config",
                STANDARD,
                "--trainer.callbacks+=tests.test_cli_refusals.Bug",
                *ONE_BATCH,
            ]
        )


# ----------------------------------------------------------------- jsonargparse's buried reasons


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--trainer.callbacks+=callbacks.Certification", "--trainer.callbacks.alpha", "1.5"],
            "error: Certification alpha must be a number in (0, 1); got 1.5",
        ),
        (
            ["--trainer.callbacks", "callbacks.Certification", "--trainer.callbacks.n0", "0"],
            "error: Certification n0 must be an integer >= 1; got 0",
        ),
        (
            ["--config", SMOOTHING, "--model.init_args.sigma", "-1"],
            "error: NoiseAugmentedClassifier sigma must be a number > 0; got -1",
        ),
        (
            ["--config", SMOOTHING, "--model.init_args.sigma", "abc"],
            "error: model.sigma: Expected a <class 'float'>. Got value: abc",
        ),
        (["--model.init_args.nope", "3"], "error: model: Option 'nope' is not accepted"),
        # Lightning's own refusals of trainer settings, and the seed numpy would refuse
        (
            ["--trainer.devices", "0"],
            "error: trainer: `Trainer(devices='0')` value is not a valid input",
        ),
        (["--trainer.max_epochs", "-5"], "error: trainer: `max_epochs` must be a non-negative"),
        (
            ["--seed_everything", "-1"],
            "error: seed_everything must be true, false or an integer in [0, 4294967295]",
        ),
        (["--seed_everything", str(2**32)], "error: seed_everything must be true"),
        # an unknown class of ours: the classes there are
        (
            ["--data", "datamodules.SVHNDataModule"],
            "error: data: module 'datamodules' has no attribute 'SVHNDataModule'; it has: "
            "CIFAR10DataModule, EmbeddedMNISTDataModule, FashionMNISTDataModule",
        ),
    ],
)
def test_the_reason_behind_a_refused_class_is_the_error_line(args, expected, in_tmp, capsys):
    config = [] if "--config" in args else ["--config", STANDARD]
    assert refusal(capsys, "test", *config, *args, *ONE_BATCH).startswith(expected)
    assert not (in_tmp / "runs").exists()


# ------------------------------------------------------------------------- compare and main()


def test_cli_does_not_import_compare_and_compare_has_its_own_script():
    tree = ast.parse((ROOT / "cli.py").read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "compare" not in imported
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"robust": "cli:console", "robust-compare": "compare:console"}


def test_compare_is_not_a_subcommand(in_tmp, capsys):
    line = refusal(capsys, "compare", "--config", str(ROOT / "configs/mnist/compare.yaml"))
    assert "invalid choice: 'compare'" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--config", STANDARD, "--data.init_args.batch_size", "0"], "batch_size"),
        (["fit", "--config", STANDARD, "--trainer.max_epochs", "x"], "max_epochs"),
        (["test", "--config", STANDARD, "--ckpt_path", "missing.ckpt"], "does not exist"),
        (
            [
                "test",
                "--config",
                STANDARD,
                "--trainer.callbacks+=callbacks.Certification",
                *ONE_BATCH,
            ],
            "Certification sigma",
        ),
    ],
)
def test_main_raises_setting_error_instead_of_exiting(args, message, in_tmp):
    with pytest.raises(SettingError, match=message):
        cli.main(args, exit_on_refusal=False)


# ------------------------------------------------------------------------------ output folders


def fit_args(*extra: str) -> list[str]:
    return ["fit", "--config", STANDARD, "--trainer.max_epochs", "1", *QUIET, *extra]


def test_output_folder_behind_a_file_is_refused_before_training(in_tmp, capsys):
    (in_tmp / "a_file").write_text("")
    folder = in_tmp / "a_file" / "runs"
    line = refusal(capsys, *fit_args("--trainer.logger.init_args.save_dir", str(folder)))
    assert f"output folder {folder}/mnist_standard (trainer.logger save_dir)" in line
    assert "is not a folder" in line


def test_default_root_dir_behind_a_file_is_refused(in_tmp, capsys):
    (in_tmp / "a_file").write_text("")
    folder = in_tmp / "a_file" / "out"
    args = fit_args("--trainer.logger", "false", "--trainer.default_root_dir", str(folder))
    assert f"output folder {folder} (trainer.default_root_dir)" in refusal(capsys, *args)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(in_tmp, capsys):
    folder = in_tmp / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        args = fit_args("--trainer.logger.init_args.save_dir", str(folder))
        assert "is not writable: Permission denied" in refusal(capsys, *args)
    finally:
        folder.chmod(0o755)


def test_unwritable_output_folder_is_refused_even_as_root(in_tmp, capsys, monkeypatch):
    """The same refusal where chmod cannot show it (root writes anywhere): the probe is denied."""
    folder = in_tmp / "denied"
    folder.mkdir()
    probe = tempfile.NamedTemporaryFile

    def denied(*args, dir=None, **kwargs):
        if Path(dir) == folder:
            raise PermissionError(errno.EACCES, "Permission denied")
        return probe(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    args = fit_args("--trainer.logger.init_args.save_dir", str(folder))
    assert "is not writable: Permission denied" in refusal(capsys, *args)
    assert not list(folder.iterdir())


def test_full_disk_is_refused_before_training(in_tmp, capsys, monkeypatch):
    usage = shutil.disk_usage(in_tmp)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    line = refusal(capsys, *fit_args("--checkpoint.dirpath", str(in_tmp / "ckpts")))
    assert "MiB free; a checkpoint of this model needs about" in line
    assert not list(in_tmp.rglob("*.ckpt"))
