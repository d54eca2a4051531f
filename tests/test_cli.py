import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import cli

ROOT = Path(__file__).resolve().parents[1]


def is_training_config(path: Path) -> bool:
    """A config that names the model and data classes (not an override or a compare config)."""
    config = yaml.safe_load(path.read_text()) or {}
    return all(
        isinstance(config.get(key), dict) and "class_path" in config[key]
        for key in ("model", "data")
    )


CONFIGS = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "configs").rglob("*.yaml")
    if is_training_config(p)
    and "cifar10" not in p.parts  # no CIFAR-10 files offline: test_cifar_config_on_tiny_files
)
FAST = ["--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI warns when sys.argv holds pytest's arguments besides ``args``."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def run_cli(*args: str):
    return cli.main(list(args))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_fits_then_tests(config, in_tmp):
    config = str(ROOT / config)
    fitted = run_cli("fit", "--config", config, *FAST)
    assert "train/loss" in fitted.trainer.callback_metrics
    tested = run_cli("test", "--config", config, *FAST)
    assert "test/acc" in tested.trainer.callback_metrics


def test_cifar_config_on_tiny_files(in_tmp, monkeypatch):
    from tests.test_datamodules import test_cifar10_format_read_from_disk

    test_cifar10_format_read_from_disk(in_tmp, monkeypatch)
    config = str(ROOT / "configs/cifar10/standard.yaml")
    args = ["--config", config, *FAST, "--data.init_args.data_dir", str(in_tmp)]
    args += ["--data.init_args.batch_size", "4", "--data.init_args.val_fraction", "0.2"]
    run_cli("fit", *args)
    tested = run_cli("test", *args)
    assert "test/acc" in tested.trainer.callback_metrics


def test_fast_dev_run_writes_no_checkpoint(in_tmp):
    fitted = run_cli(
        "fit",
        "--config",
        str(ROOT / "configs/mnist/standard.yaml"),
        *FAST[2:],
        "--trainer.fast_dev_run",
        "true",
    )
    assert fitted.trainer.fast_dev_run
    assert not list(in_tmp.rglob("*.ckpt"))


@pytest.mark.parametrize(("limit", "batches"), [("1", 1), ("2", 2), ("1.0", None), ("0.5", None)])
def test_limit_batches_reads_an_integer_as_a_batch_count(limit, batches, in_tmp):
    """``1`` is one batch and ``1.0`` all of them, as Lightning documents (float = fraction).

    Lightning's ``float | int`` annotation made jsonargparse read ``1`` as ``1.0``: all batches.
    """
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    standard = str(ROOT / "configs/mnist/standard.yaml")
    with pytest.warns(UserWarning, match="evaluates the model as built"):
        tested = run_cli(
            "test", "--config", standard, "--trainer.limit_test_batches", limit, *quiet
        )
    everything = len(tested.datamodule.test_dataloader())
    assert everything > 2
    expected = batches if batches is not None else round(everything * float(limit))
    assert tested.trainer.num_test_batches == [expected]
    # the same from a config file
    config = in_tmp / "limit.yaml"
    config.write_text(f"trainer:\n  limit_test_batches: {limit}\n")
    with pytest.warns(UserWarning, match="evaluates the model as built"):
        tested = run_cli("test", "--config", standard, "--config", str(config), *quiet)
    assert tested.trainer.num_test_batches == [expected]


def test_checkpoint_reproduces_test_accuracy(in_tmp):
    config = str(ROOT / "configs/mnist/standard.yaml")
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5"]
    short += ["--trainer.enable_progress_bar", "false"]
    fitted = run_cli("fit", "--config", config, *short)
    ckpt = Path(fitted.trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file() and ckpt.resolve().is_relative_to(in_tmp / "runs" / "mnist_standard")
    log_dir = Path(fitted.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()
    assert list(log_dir.glob("events.out.tfevents.*"))
    in_process = fitted.trainer.test(fitted.model, datamodule=fitted.datamodule, verbose=False)
    reloaded = run_cli("test", "--config", config, "--ckpt_path", str(ckpt), *short)
    assert float(reloaded.trainer.callback_metrics["test/acc"]) == pytest.approx(
        in_process[0]["test/acc"], abs=1e-6
    )


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.class_path", "lightning_modules.NoSuchClassifier"], "NoSuchClassifier"),
        (["--data.init_args.batch_size", "-1"], "batch_size must be an integer >= 1; got -1"),
        (
            ["--data.init_args.val_fraction", "1.5"],
            "val_fraction must be a number in (0, 1); got 1.5",
        ),
        (
            [
                "--model.init_args.backbone",
                "lightning_modules.backbones.LeNet",
                "--data",
                "datamodules.CIFAR10DataModule",
                "--data.init_args.data_dir",
                "nowhere",
            ],
            "CIFAR10 files not found",
        ),
        (["--ckpt_path", "does_not_exist.ckpt"], "does not exist"),
        (["--ckpt_path", "configs_copy.yaml"], "is not a checkpoint"),
    ],
)
def test_bad_input_fails_fast_with_one_clear_message(args, message, in_tmp, capsys):
    # in-process (a subprocess each cost 5 s of imports; test_console_script_runs_and_exits_zero
    # runs the script itself)
    (in_tmp / "configs_copy.yaml").write_text("not: a checkpoint\n")
    subcommand = "test" if "--ckpt_path" in args else "fit"
    with pytest.raises(SystemExit) as info:
        run_cli(subcommand, "--config", str(ROOT / "configs/mnist/standard.yaml"), *args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (in_tmp / "runs").exists()  # nothing started


def test_backbone_image_size_mismatch_is_a_clear_error(in_tmp, monkeypatch, capsys):
    from tests.test_datamodules import test_cifar10_format_read_from_disk

    test_cifar10_format_read_from_disk(in_tmp, monkeypatch)
    with pytest.raises(SystemExit) as info:
        run_cli(
            "fit",
            "--config",
            str(ROOT / "configs/mnist/standard.yaml"),
            "--model.init_args.backbone",
            "lightning_modules.backbones.LeNet",
            "--data",
            "datamodules.CIFAR10DataModule",
            "--data.init_args.data_dir",
            str(in_tmp),
        )
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert "backbone LeNet cannot take images of shape 3x32x32" in error, error


def test_console_script_runs_and_exits_zero(in_tmp):
    script = Path(sys.executable).with_name("robust")
    if not script.exists():
        pytest.skip("the project is not installed in this environment (pip install -e .)")
    result = subprocess.run(
        [str(script), "test", "--config", str(ROOT / "configs/mnist/standard.yaml"), *FAST],
        cwd=in_tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test/acc" in result.stdout


OVERRIDES = sorted(
    str(p.relative_to(ROOT))
    for folder in ("configs/callbacks", "configs/compare", "configs/mnist")
    for p in (ROOT / folder).glob("*.yaml")
    if not is_training_config(p) and "trainings" not in (yaml.safe_load(p.read_text()) or {})
)


@pytest.mark.parametrize("override", OVERRIDES)
def test_every_override_config_composes_with_a_noise_model(override, in_tmp):
    """Callback, certification and model overrides stack on a training config and run."""
    base = str(ROOT / "configs/mnist/smoothing.yaml")
    tested = run_cli("test", "--config", base, "--config", str(ROOT / override), *FAST)
    assert "test/acc" in tested.trainer.callback_metrics
    callbacks = {type(c).__name__ for c in tested.trainer.callbacks}
    text = (ROOT / override).read_text()
    for name in ("PerturbedAccuracy", "Certification", "SmoothedAttack"):
        assert (f"callbacks.{name}" in text) == (name in callbacks)


def test_a_certification_part_is_one_command_line_setting(in_tmp):
    """README's split run: ``--trainer.callbacks.first_image`` reaches the Certification."""
    configs = ("configs/mnist/smoothing.yaml", "configs/callbacks/certify_paper.yaml")
    args = [f"--config={ROOT / c}" for c in configs] + ["--trainer.callbacks.first_image", "6950"]
    checked = cli.main(["test", *args], check_only=True)
    parts = [c.first_image for c in checked.trainer.callbacks if hasattr(c, "first_image")]
    assert parts == [6950]
    refused = run_script("test", *args[:-1], "-1", cwd=in_tmp)
    assert refused.returncode == 2
    assert "first_image must be an integer >= 0; got -1" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize("code", [None, 143])
def test_a_fit_stopped_by_sigterm_exits_143_not_0(code, monkeypatch, capsys):
    """Lightning's loops stop on SIGTERM with SystemExit(None): status 0, as if finished."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def stopped(*args, **kwargs):
        raise SIGTERMException(code)

    monkeypatch.setattr(cli, "RobustCLI", stopped)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", "configs/mnist/standard.yaml"])
    assert exit_info.value.code == 143
    said = capsys.readouterr().err
    # the evaluation callbacks' own 143 comes with their own note: nothing added
    assert ("stopped by SIGTERM before the end" in said) == (code is None), said
