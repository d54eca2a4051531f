"""Refusals reach the user as one ``error:`` line with exit status 2, wherever they happen."""

import ast
import errno
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomllib
import yaml
from lightning.pytorch import Callback, Trainer

import cli
from robust.checks import SettingError

ROOT = Path(__file__).resolve().parents[1]
STANDARD = str(ROOT / "configs/mnist/standard.yaml")
SMOOTHING = str(ROOT / "configs/mnist/smoothing.yaml")
ADVERSARIAL = str(ROOT / "configs/mnist/pgd_at.yaml")
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


@pytest.mark.parametrize(
    ("subcommand", "args", "words"),
    [
        ("test", ["--trainer.limit_test_batches", "0.1"], "0.1 of the `test_dataloader`"),
        ("fit", ["--trainer.limit_val_batches", "0.05"], "0.05 of the `val_dataloader`"),
        ("fit", ["--trainer.val_check_interval", "1000"], "`val_check_interval` (1000)"),
    ],
)
def test_lightnings_refusals_as_its_loops_start_are_one_line(
    in_tmp, capsys, subcommand, args, words
):
    """Too small a fraction of the batches, or more batches than an epoch has: Lightning finds
    them only as a loop starts (they were tracebacks)."""
    fit = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    line = refusal(
        capsys, subcommand, "--config", STANDARD, "--data.init_args.batch_size", "512",
        *(fit if subcommand == "fit" else []), *args, *QUIET,
    )  # fmt: skip
    assert line.startswith("error: trainer: ") and words in line


@pytest.mark.parametrize(
    ("subcommand", "limit"),
    [("test", "limit_test_batches"), ("validate", "limit_val_batches"), ("test", "limit_test_batches=0.0")],
)  # fmt: skip
def test_an_evaluation_of_no_batches_is_one_line(in_tmp, capsys, monkeypatch, subcommand, limit):
    # it evaluated nothing and exited 0, without a word
    for method in ("test", "validate"):
        monkeypatch.setattr(Trainer, method, _never("it was evaluated"))
    setting = f"--trainer.{limit}" if "=" in limit else f"--trainer.{limit}=0"
    line = refusal(capsys, subcommand, "--config", STANDARD, setting, *QUIET)
    name = limit.split("=")[0]
    assert line == (
        f"error: trainer.{name} 0 evaluates nothing; {subcommand} needs a number of batches "
        ">= 1 or a fraction in (0, 1]"
    )


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
        # a union of literals: the values it takes
        (
            ["--trainer.precision", "bf17"],
            "error: trainer.precision: must be one of 64, 32, 16, transformer-engine, "
            "transformer-engine-float16, 16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, "
            "64-true, bf16, null; got bf17",
        ),
        # a setting of a callback given as an inline dict: its own reason, not "a path"
        (
            [
                "--trainer.callbacks+={class_path: callbacks.PerturbedAccuracy, "
                "init_args: {attacks: 5}}"
            ],
            "error: trainer.callbacks.attacks: Expected a <class 'list'>. Got value: 5",
        ),
        # Lightning accepts these, then divides by them once training runs (or ignores them)
        (
            ["--trainer.accumulate_grad_batches", "0"],
            "error: trainer.accumulate_grad_batches must be an integer >= 1; got 0",
        ),
        (
            ["--trainer.check_val_every_n_epoch", "0"],
            "error: trainer.check_val_every_n_epoch must be an integer >= 1; got 0 (or null",
        ),
        (
            ["--trainer.gradient_clip_val", "-1"],
            "error: trainer.gradient_clip_val must be a number >= 0; got -1 (0 or null: no clipping)",
        ),
        # an L2 ball holding every 28x28 image: refused when the model is built, not mid-training
        (
            [
                "--config",
                str(ROOT / "configs/mnist/trades.yaml"),
                "--model.init_args.attack.norm=2",
                "--model.init_args.attack.eps=50",
                "--model.init_args.robust_val_images=0",
            ],
            "error: AdversarialClassifier attack eps for norm 2 must be <= 28, the diameter",
        ),
        (
            [
                "--config",
                str(ROOT / "configs/mnist/smoothadv.yaml"),
                "--model.init_args.smoothadv_eps=100",
            ],
            "error: NoiseAugmentedClassifier smoothadv eps for norm 2 must be <= 28",
        ),
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


def test_a_config_file_that_is_not_utf8_is_one_line(in_tmp, capsys):
    config = in_tmp / "latin1.yaml"
    config.write_bytes("# r\xe9sum\xe9\ntrainer:\n  max_epochs: 1\n".encode("latin-1"))
    line = refusal(capsys, "test", "--config", STANDARD, "--config", str(config), *ONE_BATCH)
    assert line.startswith(f"error: the file {config} is not UTF-8 text")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--model.init_args.lr_scheduler.init_args.step_size", "0"],
            "error: model lr_scheduler StepLR(step_size=0, gamma=0.1) fails on its first step "
            "(ZeroDivisionError: integer modulo by zero); step sizes and periods must be "
            "integers >= 1",
        ),
        (
            ["--model.init_args.lr_scheduler.init_args.gamma", "-1"],
            "error: model lr_scheduler StepLR(step_size=1, gamma=-1.0) sets the learning rate "
            "to -0.001 on its first step; it must stay >= 0",
        ),
    ],
)
def test_a_scheduler_failing_its_first_step_is_refused_before_training(
    args, expected, in_tmp, capsys, monkeypatch
):
    monkeypatch.setattr(Trainer, "fit", _never("it was trained"))
    scheduler = ["--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.StepLR"]
    scheduler += ["--model.init_args.lr_scheduler.init_args.step_size", "1"]
    line = refusal(capsys, "fit", "--config", STANDARD, *scheduler, *args, *QUIET)
    assert line == expected


def test_a_plateau_scheduler_must_raise_the_lr_on_falling_accuracy_not_rising(
    in_tmp, capsys, monkeypatch
):
    # ReduceLROnPlateau's default mode min read the rising val/acc as no progress: lr / 10 per epoch
    plateau = ["--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"]
    monkeypatch.setattr(Trainer, "fit", _never("it was trained"))
    line = refusal(capsys, "fit", "--config", STANDARD, *plateau, *QUIET)
    assert line.startswith("error: model lr_scheduler ReduceLROnPlateau(") and "mode='min'" in line
    assert line.endswith(
        "would lower the learning rate while val/acc, its monitor, rises; set its mode to max"
    )
    monkeypatch.setattr(Trainer, "fit", lambda *args, **kwargs: None)
    mode_max = ["--model.init_args.lr_scheduler.init_args.mode", "max"]
    fitted = cli.main(["fit", "--config", STANDARD, *plateau, *mode_max, *QUIET])
    assert fitted.model.configure_optimizers()["lr_scheduler"]["scheduler"].mode == "max"


def test_a_plateau_scheduler_follows_the_checkpoints_monitor_when_it_is_logged(in_tmp, capsys):
    # it followed val/acc whatever chose the checkpoint, and an epoch without validation
    # stopped the run ("ReduceLROnPlateau conditioned on metric val/acc which is not available")
    plateau = ["--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"]
    plateau += ["--model.init_args.lr_scheduler.init_args.mode", "max"]
    every_second = ["--trainer.check_val_every_n_epoch", "2", "--trainer.max_epochs", "2"]
    every_second += ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    fitted = cli.main(["fit", "--config", SMOOTHING, *plateau, *every_second, *QUIET])
    (schedule,) = fitted.trainer.lr_scheduler_configs
    assert (schedule.monitor, schedule.frequency) == ("val/noisy_acc", 2)
    assert fitted.trainer.current_epoch == 2  # both epochs trained
    by_loss = ["--checkpoint.monitor", "val/loss", "--checkpoint.mode", "min"]
    line = refusal(capsys, "fit", "--config", STANDARD, *plateau, *by_loss, *QUIET)
    assert line.endswith("while val/loss, its monitor, falls; set its mode to min"), line


EVERY_SECOND_EPOCH_ATTACK = """
trainer:
  callbacks+:
    - class_path: callbacks.PerturbedAccuracy
      init_args:
        attacks: [{method: pgd, norm: inf, eps: 0.1, steps: 3}]
        every_n_val_epochs: 2
        max_images: 8
        num_image_grid: 0
"""


def test_a_monitor_logged_every_second_epoch_ranks_only_those_epochs(in_tmp, capsys):
    """It was refused after epoch 0; ranking epoch 2 would have used epoch 1's number."""
    attack = in_tmp / "attack.yaml"
    attack.write_text(EVERY_SECOND_EPOCH_ATTACK)
    plateau = ["--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"]
    plateau += ["--model.init_args.lr_scheduler.init_args.mode", "max"]
    monitor = ["--checkpoint.monitor", "val/perturbed_acc/pgd3_linf_eps0.1"]
    monitor += ["--checkpoint.mode", "max", "--checkpoint.save_top_k", "-1"]
    short = ["--trainer.max_epochs", "4", "--trainer.limit_train_batches", "1"]
    short += ["--trainer.limit_val_batches", "1"]
    fitted = cli.main(
        ["fit", "--config", SMOOTHING, "--config", str(attack), *plateau, *monitor, *short, *QUIET]
    )
    (schedule,) = fitted.trainer.lr_scheduler_configs
    assert (schedule.monitor, schedule.frequency) == (monitor[1], 2)
    saved = sorted(p.name for p in Path(fitted.trainer.checkpoint_callback.dirpath).glob("*"))
    assert saved == ["best-epoch01.ckpt", "best-epoch03.ckpt", "last.ckpt"], saved
    # the module's own metric beside it is still ranked (and the plateau stepped) every epoch
    own = ["--checkpoint.mode", "max", "--checkpoint.save_top_k", "-1"]
    fitted = cli.main(
        ["fit", "--config", SMOOTHING, "--config", str(attack), *plateau, *own, *short, *QUIET,
         "--trainer.max_epochs", "2", "--trainer.logger.init_args.name", "own"]
    )  # fmt: skip
    (schedule,) = fitted.trainer.lr_scheduler_configs
    assert (schedule.monitor, schedule.frequency) == ("val/noisy_acc", 1)
    saved = sorted(p.name for p in Path(fitted.trainer.checkpoint_callback.dirpath).glob("*"))
    assert saved == ["best-epoch00.ckpt", "best-epoch01.ckpt", "last.ckpt"], saved


def test_a_key_given_twice_in_a_config_file_is_refused(in_tmp, capsys, monkeypatch):
    """YAML keeps the last of two keys: a copy-paste slip trained at the second sigma silently."""
    monkeypatch.setattr(Trainer, "fit", _never("it was trained"))
    twice = in_tmp / "twice.yaml"
    twice.write_text("model:\n  init_args:\n    sigma: 0.25\n    sigma: 0.5\n")
    line = refusal(capsys, "fit", "--config", SMOOTHING, "--config", str(twice), *QUIET)
    assert line == (
        f"error: the config file {twice} sets 'sigma' twice (lines 3 and 4): YAML keeps the last "
        "one silently"
    )
    from cli import _UniqueKeyLoader  # a merge key, overridden by a key of its own, is fine

    merged = yaml.load("a: &x {b: 1, d: 1}\nc:\n  <<: *x\n  d: 2\n", Loader=_UniqueKeyLoader)
    assert merged["c"] == {"b": 1, "d": 2}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--checkpoint.mode", "avg"], "error: checkpoint: `mode` can be min, max but got avg"),
        (["--checkpoint.save_top_k", "-2"], "error: checkpoint: Invalid value for save_top_k=-2"),
    ],
)
def test_the_checkpoints_own_refusals_name_the_checkpoint_section(args, expected, in_tmp, capsys):
    line = refusal(capsys, "fit", "--config", STANDARD, *args, *QUIET)  # it said "trainer:"
    assert line.startswith(expected), line


@pytest.mark.parametrize("value", ["[1, 2]", "[pgd, inf]"])
def test_an_attack_given_as_a_list_is_refused_not_a_traceback(value, in_tmp, capsys):
    # jsonargparse parsed it and failed building the dataclass: TypeError, exit status 1
    line = refusal(
        capsys, "fit", "--config", ADVERSARIAL, "--model.init_args.attack", value, *QUIET
    )
    assert line.startswith("error: model.init_args.attack must be a mapping of method, norm, eps")


def test_early_stopping_on_a_metric_logged_every_second_epoch_is_refused(
    in_tmp, capsys, monkeypatch
):
    """Lightning's EarlyStopping counted the epochs between as ones without improvement."""
    monkeypatch.setattr(Trainer, "fit", _never("it was trained"))
    attack = in_tmp / "attack.yaml"
    attack.write_text(EVERY_SECOND_EPOCH_ATTACK)
    stop = in_tmp / "stop.yaml"
    stop.write_text(
        "trainer:\n  callbacks+:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
        "      init_args: {monitor: val/perturbed_acc/pgd3_linf_eps0.1, mode: max}\n"
    )
    line = refusal(
        capsys, "fit", "--config", SMOOTHING, "--config", str(attack), "--config", str(stop), *QUIET
    )
    assert line.startswith(
        "error: EarlyStopping monitor 'val/perturbed_acc/pgd3_linf_eps0.1' is logged every 2 "
        "epochs by PerturbedAccuracy"
    ), line
    monkeypatch.setattr(Trainer, "fit", lambda *args, **kwargs: None)
    fresh = ["--trainer.check_val_every_n_epoch", "2"]  # each validation logs it afresh
    cli.main(["fit", "--config", SMOOTHING, "--config", str(attack), "--config", str(stop),
              *fresh, *QUIET])  # fmt: skip


@pytest.mark.parametrize(
    ("monitor", "mode", "wanted"),
    [("val/loss", "max", "min"), ("val/acc", "min", "max"), ("val/robust_acc", "min", "max")],
)
def test_a_checkpoint_mode_that_keeps_the_worst_epoch_is_refused(
    monitor, mode, wanted, in_tmp, capsys, monkeypatch
):
    monkeypatch.setattr(Trainer, "fit", _never("it was trained"))
    config = ADVERSARIAL if "robust" in monitor else STANDARD
    args = ["--checkpoint.monitor", monitor, "--checkpoint.mode", mode]
    line = refusal(capsys, "fit", "--config", config, *args, *QUIET)
    worst = "highest" if wanted == "min" else "lowest"
    assert line == (
        f"error: checkpoint.mode {mode!r} would keep the epoch of the {worst} {monitor}; "
        f"monitoring {monitor} needs checkpoint.mode {wanted}"
    )
    monkeypatch.setattr(Trainer, "fit", lambda *args, **kwargs: None)
    args[-1] = wanted
    fitted = cli.main(["fit", "--config", config, *args, *QUIET])
    assert fitted.trainer.checkpoint_callback.mode == wanted


def test_a_warm_up_longer_than_the_run_is_one_line_before_training(in_tmp, capsys):
    # a 1-epoch SmoothAdv run warmed up over 2 epochs never trained at its eps 0.5
    args = ["--config", str(ROOT / "configs/mnist/smoothadv.yaml"), *TINY_FIT]
    line = refusal(capsys, "fit", *args)
    assert line == (
        "error: model smoothadv_warmup_epochs 2 leaves no epoch at full strength in "
        "trainer.max_epochs 1: it begins with epoch 2 (counting from 1); set "
        "trainer.max_epochs >= 2 or a shorter smoothadv_warmup_epochs"
    )
    assert not list(in_tmp.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.devices", "-2"], "error: trainer: `devices` selected with `CPUAccelerator`"),
        (["--trainer.devices", "abc"], "error: trainer: `devices` selected with `CPUAccelerator`"),
        (["--trainer.accelerator", "tpu"], "error: trainer: Requirement 'torch_xla"),
        (["--trainer.val_check_interval", "0"], "error: trainer.val_check_interval must be an integer"),
        (["--trainer.val_check_interval", "0.0"], "error: trainer.val_check_interval must be a fraction"),
        (["--trainer.max_epochs", "0"], "error: trainer.max_epochs 0 trains nothing"),
        (["--trainer.max_epochs", "0", "--trainer.max_steps", "5"], "error: trainer.max_epochs 0 trains"),
        (["--trainer.limit_train_batches", "0"], "error: trainer.limit_train_batches 0 trains nothing"),
        (
            ["--trainer.limit_val_batches", "0"],
            "error: checkpoint.monitor 'val/acc' is never logged: no validation runs "
            "(trainer.limit_val_batches is 0)",
        ),
        (
            ["--trainer.check_val_every_n_epoch", "3", "--trainer.max_epochs", "2"],
            "error: checkpoint.monitor 'val/acc' is never logged: no validation runs "
            "(trainer.check_val_every_n_epoch 3 > trainer.max_epochs 2)",
        ),
    ],
)  # fmt: skip
def test_fit_settings_that_crash_or_train_nothing_are_one_line_before_training(
    args, expected, in_tmp, capsys, monkeypatch
):
    # each was a traceback (exit 1), or a fit that trained or kept nothing with exit 0
    monkeypatch.setattr(Trainer, "fit", _never("it was trained"))
    line = refusal(capsys, "fit", "--config", STANDARD, *args, *QUIET)
    assert line.startswith(expected), line


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_config_file_is_named(text, in_tmp, capsys, monkeypatch):
    # jsonargparse's line was "error: Unexpected config:"
    config = in_tmp / "empty.yaml"
    config.write_text(text)
    monkeypatch.setattr(Trainer, "fit", _never("it was trained"))
    line = refusal(capsys, "fit", "--config", STANDARD, f"--config={config}", *QUIET)
    assert line == f"error: the config file {config} holds no settings (empty, or only comments)"


@pytest.mark.parametrize("section", ["trainer:", "checkpoint: null"])
def test_an_empty_config_section_is_one_line(section, in_tmp, capsys, monkeypatch):
    # trainer: dropped the earlier file's trainer settings and trained (exit 0) where trainer
    # settings followed; checkpoint: null was a traceback
    config = in_tmp / "empty.yaml"
    config.write_text(f"{section}\n")
    monkeypatch.setattr(Trainer, "fit", _never("it was trained"))
    line = refusal(capsys, "fit", "--config", STANDARD, f"--config={config}", *QUIET)
    name = section.split(":")[0]
    assert line.startswith(f"error: {name} in {config} is empty (null)"), line


@pytest.mark.parametrize("section", ["trainer: [1, 2]", "trainer: 5", "checkpoint: [1]"])
def test_a_config_section_that_is_not_a_mapping_is_one_line(section, in_tmp, capsys, monkeypatch):
    # jsonargparse dropped it without a word where trainer settings followed: trained anyway
    config = in_tmp / "bad.yaml"
    config.write_text(
        f"{section}\nmodel: {{class_path: lightning_modules.StandardClassifier}}\n"
        "data: {class_path: datamodules.EmbeddedMNISTDataModule}\n"
    )
    line = refusal(capsys, "fit", "--config", str(config), *QUIET)  # --trainer.x follow
    name = section.split(":")[0]
    assert line.startswith(f"error: {name} in {config} must be a mapping of settings"), line
    monkeypatch.setattr(Trainer, "fit", _never("it was trained"))
    line = refusal(capsys, "fit", "--config", STANDARD, f"--config={config}")  # after another
    assert line.startswith(f"error: {name} in {config} must be a mapping of settings"), line
    # a section given as the path of a nested config file is jsonargparse's, and fine
    (in_tmp / "trainer.yaml").write_text("max_epochs: 3\n")
    nested = in_tmp / "nested.yaml"
    nested.write_text(f"trainer: {in_tmp / 'trainer.yaml'}\n")
    monkeypatch.setattr(Trainer, "fit", lambda *args, **kwargs: None)
    fitted = cli.main(["fit", "--config", STANDARD, "--config", str(nested), *QUIET])
    assert fitted.trainer.max_epochs == 3


def _never(failure: str):
    """``Trainer.fit``'s signature (LightningCLI reads it) with a body that fails the test."""

    @functools.wraps(Trainer.fit)
    def stand_in(*args, **kwargs):
        pytest.fail(failure)

    return stand_in


# ------------------------------------------------------------------- a monitor that is not logged

# 2, not 1: jsonargparse reads 1 as 1.0, all batches
TINY_FIT = ["--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2", *QUIET]
TINY_FIT += ["--trainer.limit_train_batches", "2"]


class BatchCounter(Callback):
    """Counts the training batches run (in a class attribute: the CLI builds the instance)."""

    batches = 0

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        type(self).batches += 1


@pytest.mark.parametrize(
    "args",
    [
        ["--model.init_args.num_classes", "5"],
        ["--model.init_args.std", "[0.5]"],
        ["--model", "{init_args: {in_channels: 1}}"],
    ],
)
def test_a_model_setting_linked_from_the_data_is_refused(args, in_tmp, capsys):
    # the data module's value would replace it silently
    line = refusal(capsys, "fit", "--config", STANDARD, *args, *TINY_FIT)
    name = next(n for n in ("num_classes", "std", "in_channels") if n in " ".join(args))
    assert line.startswith(f"error: model.init_args.{name} is linked from the data module")
    assert not (in_tmp / "runs").exists()


def test_a_monitor_the_settings_never_log_is_refused_before_training(in_tmp, capsys):
    trades = str(ROOT / "configs/mnist/trades.yaml")
    args = ["--model.init_args.robust_val_images", "0", *TINY_FIT]
    line = refusal(capsys, "fit", "--config", trades, *args)
    assert line == (
        "error: checkpoint.monitor 'val/robust_acc' is never logged: AdversarialClassifier logs "
        "it only with model.init_args.robust_val_images > 0 (here 0); set it, or monitor another "
        "key such as val/acc"
    )
    line = refusal(capsys, "fit", "--config", STANDARD, "--checkpoint.monitor", "val/robust_acc")
    assert "StandardClassifier has no robust_val_images setting" in line
    assert not (in_tmp / "runs").exists()


def test_a_monitor_never_logged_is_refused_after_the_first_batch(in_tmp, capsys):
    counter = "--trainer.callbacks+=tests.test_cli_refusals.BatchCounter"
    args = ["--checkpoint.monitor", "val/acx", "--trainer.num_sanity_val_steps", "1", counter]
    line = refusal(capsys, "fit", "--config", STANDARD, *args, *TINY_FIT)
    assert line == (
        "error: checkpoint.monitor 'val/acx' is not logged by this model and its callbacks; the "
        "keys logged are: epoch, step, train/acc, train/loss, val/acc, val/loss"
    )
    # jsonargparse imports this module as tests.test_cli_refusals (pytest may use another name)
    assert sys.modules["tests.test_cli_refusals"].BatchCounter.batches == 1
    assert not list(in_tmp.rglob("*.ckpt"))


def test_a_monitor_an_evaluation_callback_logs_after_the_sanity_check_is_kept(in_tmp):
    attacks = "attacks: [{method: fgm, norm: inf, eps: 0.1}], every_n_val_epochs: 1, max_images: 4"
    callback = f"--trainer.callbacks+={{class_path: callbacks.PerturbedAccuracy, init_args: {{{attacks}}}}}"
    monitor = ["--checkpoint.monitor", "val/perturbed_acc/fgm_linf_eps0.1"]
    fitted = cli.main(["fit", "--config", STANDARD, callback, *monitor, *TINY_FIT])
    assert Path(fitted.trainer.checkpoint_callback.best_model_path).name == "best-epoch00.ckpt"


def test_a_monitor_never_logged_without_a_sanity_check_is_one_line(in_tmp, capsys):
    args = ["--checkpoint.monitor", "train/los", "--trainer.num_sanity_val_steps", "0"]
    line = refusal(capsys, "fit", "--config", STANDARD, *args, *TINY_FIT)
    assert line.startswith("error: checkpoint.monitor 'train/los' is not logged by this model")
    assert "train/loss" in line and "val/acc" in line


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
