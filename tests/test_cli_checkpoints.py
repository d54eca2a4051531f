"""Checkpoints through the CLI: agreement with the settings, a true last.ckpt, safe loading, resume."""

import functools
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

import cli
from checkpoint_checks import check_running_statistics
from robust.checks import SettingError

ROOT = Path(__file__).resolve().parents[1]
STANDARD = str(ROOT / "configs/mnist/standard.yaml")
SMOOTHING = str(ROOT / "configs/mnist/smoothing.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", *QUIET]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """LightningCLI warns when sys.argv holds pytest's arguments besides ``args``."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """One-epoch checkpoints: a noise-trained LeNet at sigma 0.5 and a standard SmallCNN."""
    runs = tmp_path_factory.mktemp("ckpts") / "runs"
    one = ["--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0", *TINY]
    one += ["--trainer.logger.init_args.save_dir", str(runs)]
    sys_argv, sys.argv = sys.argv, ["cli.py"]
    try:
        noise = cli.main(["fit", "--config", SMOOTHING, "--model.init_args.sigma", "0.5", *one])
        standard = cli.main(["fit", "--config", STANDARD, *one])
    finally:
        sys.argv = sys_argv
    return {
        "noise": noise.trainer.checkpoint_callback.last_model_path,
        "standard": standard.trainer.checkpoint_callback.last_model_path,
    }


def refusal(capsys, *args: str) -> str:
    """Run the CLI in-process, expect a refusal, and return its one ``error:`` line."""
    with pytest.raises(SystemExit) as info:
        cli.main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


# --------------------------------------------------------------------------- item 2 of issue 10


@pytest.mark.parametrize(
    ("kind", "args", "expected"),
    [
        # the repro: a setting given on the command line was replaced by the checkpoint's
        (
            "noise",
            ["--config", SMOOTHING, "--model.init_args.sigma", "-1"],
            "model.init_args.sigma is -1.0 here but 0.5 in the checkpoint",
        ),
        # a setting given in the config file, although equal to the class default
        ("noise", ["--config", SMOOTHING], "model.init_args.sigma is 0.25 here but 0.5"),
        # the repro: the model class was switched by the checkpoint
        (
            "standard",
            ["--config", SMOOTHING],
            "model class is lightning_modules.noise.NoiseAugmentedClassifier here but "
            "lightning_modules.standard.StandardClassifier in the checkpoint",
        ),
        # a setting the data module links into the model
        (
            "standard",
            ["--config", STANDARD, "--data", "datamodules.FashionMNISTDataModule"],
            "the data module gives mean [0.286] but the checkpoint",
        ),
    ],
)
def test_checkpoint_disagreeing_with_the_settings_is_refused(
    kind, args, expected, checkpoints, in_tmp, capsys
):
    line = refusal(capsys, "test", *args, "--ckpt_path", checkpoints[kind], *QUIET)
    assert expected in line
    assert checkpoints[kind] in line
    assert not (in_tmp / "runs").exists()  # refused before anything ran


def test_checkpoint_with_settings_the_model_does_not_take_is_refused(checkpoints, in_tmp, capsys):
    checkpoint = torch.load(checkpoints["standard"], weights_only=True)
    checkpoint["hyper_parameters"]["dropout_rate"] = 0.3  # as if written by another version
    torch.save(checkpoint, in_tmp / "other_version.ckpt")
    args = ["--config", STANDARD, "--ckpt_path", str(in_tmp / "other_version.ckpt")]
    line = refusal(capsys, "test", *args)
    assert "StandardClassifier does not take: dropout_rate" in line


def test_a_bad_value_from_the_checkpoint_is_named_as_the_checkpoints(checkpoints, in_tmp, capsys):
    checkpoint = torch.load(checkpoints["noise"], weights_only=True)
    checkpoint["hyper_parameters"]["num_noise_samples"] = 0  # edited, or a bug in an old version
    torch.save(checkpoint, in_tmp / "bad_value.ckpt")
    args = ["--config", SMOOTHING, "--model.init_args.sigma", "0.5"]
    line = refusal(capsys, "test", *args, "--ckpt_path", str(in_tmp / "bad_value.ckpt"))
    assert "num_noise_samples must be an integer >= 1; got 0" in line
    assert f"(num_noise_samples=0 from the checkpoint {in_tmp / 'bad_value.ckpt'})" in line
    assert "sigma=" not in line  # given here, and not what was refused


def test_checkpoint_agreeing_with_the_settings_is_used(checkpoints, in_tmp):
    args = ["--config", SMOOTHING, "--model.init_args.sigma", "0.5", *QUIET]
    args += ["--ckpt_path", checkpoints["noise"], "--trainer.callbacks", "[]"]
    tested = cli.main(["test", *args, "--trainer.limit_test_batches", "1"])
    assert tested.model.sigma == 0.5
    assert "test/acc" in tested.trainer.callback_metrics


@pytest.mark.parametrize(
    ("data_args", "expected"),
    [
        # another split seed: most of its test images were training images under seed 0
        (["--data.init_args.seed", "7"], "seed 0 there, 7 here"),
        (["--data.init_args.test_fraction", "0.3"], "test_fraction 0.1 there, 0.3 here"),
    ],
)
def test_a_checkpoint_is_not_evaluated_on_other_data_without_a_word(
    data_args, expected, checkpoints, in_tmp, capsys
):
    recorded = torch.load(checkpoints["standard"], weights_only=True)["data_identity"]
    assert recorded["data_module"] == "EmbeddedMNISTDataModule" and recorded["seed"] == 0
    args = ["--config", STANDARD, "--ckpt_path", checkpoints["standard"], *QUIET, *data_args]
    line = refusal(capsys, "test", *args)
    assert "was trained on other data" in line and expected in line
    assert "--allow_other_data true" in line
    assert not (in_tmp / "runs").exists()  # refused before anything ran
    line = refusal(capsys, "fit", *args)  # resuming on another split: refused too
    assert expected in line
    cli.main(["predict", *args, "--trainer.limit_predict_batches", "1"])  # any images: not checked
    allowed = cli.main(
        ["test", *args, "--allow_other_data", "true", "--trainer.limit_test_batches", "1"]
    )
    assert "test/acc" in allowed.trainer.callback_metrics


# -------------------------------------------------------------------------- item 3b of issue 10


def test_last_checkpoint_is_the_last_epoch_and_resumes_from_it(in_tmp):
    # Best by the smallest step: epoch 0 is the best and is never replaced, so the old
    # save_last=True (written only beside a new best) kept last.ckpt at epoch 0.
    args = ["--config", STANDARD, "--checkpoint.monitor", "step", "--checkpoint.mode", "min"]
    args += TINY
    fitted = cli.main(["fit", *args, "--trainer.max_epochs", "3"])
    folder = in_tmp / "runs/mnist_standard/version_0/checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best-epoch00.ckpt", "last.ckpt"]
    assert torch.load(folder / "best-epoch00.ckpt", weights_only=True)["epoch"] == 0
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, 6)
    assert (
        Path(fitted.trainer.checkpoint_callback.last_model_path).resolve() == folder / "last.ckpt"
    )

    resumed = cli.main(["fit", *args, "--trainer.max_epochs", "4", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 8  # exactly one more epoch of 2 batches
    folder = in_tmp / "runs/mnist_standard/version_1/checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (3, 8)
    # the best is still epoch 0 of the first run: the resumed epoch did not beat it
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    best = Path(resumed.trainer.checkpoint_callback.best_model_path).resolve()
    assert best == in_tmp / "runs/mnist_standard/version_0/checkpoints/best-epoch00.ckpt"


def test_a_resumed_fit_trains_what_an_uninterrupted_fit_trains(in_tmp):
    """Its batches' order and its noise: a resumed run replayed epoch 0's (other weights)."""
    args = ["--config", SMOOTHING, *TINY, "--trainer.num_sanity_val_steps", "0"]
    version = "--trainer.logger.init_args.version"
    straight = cli.main(["fit", *args, "--trainer.max_epochs", "2", version, "straight"])
    first = cli.main(["fit", *args, "--trainer.max_epochs", "1", version, "first"])
    last = first.trainer.checkpoint_callback.last_model_path
    resumed = cli.main(
        ["fit", *args, "--trainer.max_epochs", "2", version, "resumed", "--ckpt_path", last]
    )
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    ours, theirs = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    one_epoch = first.model.state_dict()
    assert not all(torch.equal(ours[key], one_epoch[key]) for key in ours)  # it trained on


def test_last_follows_checkpoint_dirpath_not_an_older_run_of_the_logger(in_tmp, capsys):
    args = ["--config", STANDARD, *TINY, "--trainer.max_epochs", "1"]
    cli.main(["fit", *args])  # an older run, in runs/mnist_standard/version_0/checkpoints
    elsewhere = in_tmp / "elsewhere"
    line = refusal(
        capsys, "test", *args, "--checkpoint.dirpath", str(elsewhere), "--ckpt_path", "last"
    )
    assert f"no last*.ckpt under {elsewhere}" in line  # not the older run's file
    cli.main(["fit", *args, "--checkpoint.dirpath", str(elsewhere)])
    capsys.readouterr()
    test = ["test", *args, "--trainer.limit_test_batches", "1", "--ckpt_path", "last"]
    cli.main([*test, "--checkpoint.dirpath", str(elsewhere)])
    assert f"ckpt_path 'last' is {elsewhere / 'last.ckpt'}" in capsys.readouterr().err
    cli.main(test)  # without dirpath: the logger's runs, as before
    assert "version_" in capsys.readouterr().err
    cli.main(["fit", *args, "--checkpoint.dirpath", str(elsewhere)])  # a second run writes -v1
    assert (elsewhere / "last-v1.ckpt").exists()
    capsys.readouterr()
    cli.main([*test, "--checkpoint.dirpath", str(elsewhere)])
    assert f"ckpt_path 'last' is {elsewhere / 'last-v1.ckpt'}" in capsys.readouterr().err


def test_best_is_the_best_checkpoint_not_the_newest_of_the_top_k(in_tmp, capsys):
    # top-2 by the smallest step keeps epochs 0 and 1: the newer file, epoch 1, is not the best
    args = ["--config", STANDARD, *TINY, "--checkpoint.monitor", "step", "--checkpoint.mode", "min"]
    cli.main(["fit", *args, "--trainer.max_epochs", "3", "--checkpoint.save_top_k", "2"])
    folder = in_tmp / "runs/mnist_standard/version_0/checkpoints"
    assert {"best-epoch00.ckpt", "best-epoch01.ckpt"} <= {p.name for p in folder.iterdir()}
    capsys.readouterr()
    cli.main(["test", *args, "--trainer.limit_test_batches", "1", "--ckpt_path", "best"])
    chosen = capsys.readouterr().err
    assert (
        "ckpt_path 'best' is runs/mnist_standard/version_0/checkpoints/best-epoch00.ckpt" in chosen
    )


def test_best_of_a_newest_run_that_saved_none_is_refused_not_an_older_runs(in_tmp):
    run_dir = in_tmp / "runs" / "x"
    older, newer = (run_dir / f"version_{v}" / "checkpoints" for v in (0, 1))
    for folder in (older, newer):
        folder.mkdir(parents=True)
    torch.save({"callbacks": {}}, older / "best-epoch00.ckpt")
    torch.save({"callbacks": {}}, older / "last.ckpt")
    # a later run whose monitor was never logged: its ModelCheckpoint recorded no best
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}": {"best_model_path": ""}}},
               newer / "last.ckpt")  # fmt: skip
    os.utime(newer / "last.ckpt", (time.time() + 10, time.time() + 10))
    with pytest.raises(
        SettingError, match=r"newest checkpoint .*version_1/checkpoints/last\.ckpt records no best"
    ):
        cli.find_run_checkpoint("best", run_dir)
    assert cli.find_run_checkpoint("last", run_dir) == str(newer / "last.ckpt")
    torch.save({"callbacks": {}}, newer / "best-epoch01.ckpt")  # it did save one, and says so
    state = {"best_model_path": str(newer / "best-epoch01.ckpt")}
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}": state}}, newer / "last.ckpt")
    os.utime(newer / "last.ckpt", (time.time() + 10, time.time() + 10))
    assert cli.find_run_checkpoint("best", run_dir) == str(newer / "best-epoch01.ckpt")
    # a newest checkpoint with no ModelCheckpoint state: the newest best-*.ckpt beside it
    torch.save({"callbacks": {}}, newer / "last.ckpt")
    assert cli.find_run_checkpoint("best", run_dir) == str(newer / "best-epoch01.ckpt")


def test_last_and_best_search_only_the_logger_version_that_is_set(in_tmp, capsys):
    args = ["--config", STANDARD, *TINY, "--trainer.max_epochs", "1"]
    version = ["--trainer.logger.init_args.version", "exp2"]
    cli.main(["fit", *args, *version])
    cli.main(["fit", *args])  # a newer run in version_0 of the same logger folder
    test = ["test", *args, "--trainer.limit_test_batches", "1"]
    for which in ("last", "best"):
        capsys.readouterr()
        cli.main([*test, *version, "--ckpt_path", which])
        chosen = capsys.readouterr().err
        assert f"ckpt_path '{which}' is runs/mnist_standard/exp2/checkpoints/" in chosen
    line = refusal(capsys, *test, "--trainer.logger.init_args.version", "3", "--ckpt_path", "last")
    assert "no last*.ckpt under runs/mnist_standard/version_3/checkpoints" in line


# --------------------------------------------------------------------------- item 4 of issue 10


class Pwn:
    """Unpickling this runs a shell command: what an untrusted checkpoint can do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch '{self.target}'",))


def test_malicious_checkpoint_is_refused_without_running_it(in_tmp, capsys):
    pwned = in_tmp / "pwned"
    evil = in_tmp / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": Pwn(pwned)}, evil)
    for subcommand in ("test", "fit"):
        line = refusal(capsys, subcommand, "--config", STANDARD, "--ckpt_path", str(evil))
        assert "evil.ckpt" in line and "was refused" in line and "posix.system" in line
    assert not pwned.exists()
    line = refusal(capsys, "test", "--config", STANDARD, "--weights_only", "false")
    assert "weights_only false is not allowed" in line
    assert not (in_tmp / "runs").exists()


def test_every_checkpoint_load_uses_weights_only(checkpoints, in_tmp, monkeypatch):
    seen = []
    original = torch.load

    def recording_load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    args = ["--config", STANDARD, "--ckpt_path", checkpoints["standard"], *QUIET]
    cli.main(["test", *args, "--trainer.limit_test_batches", "1"])
    # ours (the check), Lightning's hyperparameters and Lightning's restore of the weights
    assert len(seen) >= 3
    assert set(seen) == {True}


# ------------------------------------------------------------ issue 10, beyond the list: kill -9


class EpochRecorder(Callback):
    """Records the epochs that this process trains."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append(trainer.current_epoch)


def test_fit_killed_with_sigkill_resumes_from_last(in_tmp):
    args = ["--config", STANDARD, "--trainer.max_epochs", "3", *QUIET]
    args += ["--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "1"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "fit", *args],
        cwd=in_tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = in_tmp / "runs/mnist_standard/version_0/checkpoints/last.ckpt"
    deadline = time.monotonic() + 120
    try:
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL  # killed, not finished
    done = torch.load(last, weights_only=True)["epoch"]
    assert done < 2

    args += ["--trainer.callbacks+=tests.test_cli_checkpoints.EpochRecorder"]
    resumed = cli.main(["fit", *args, "--ckpt_path", "last"])
    # jsonargparse imports this module as tests.test_cli_checkpoints (pytest may use another name)
    recorder = next(c for c in resumed.trainer.callbacks if type(c).__name__ == "EpochRecorder")
    assert recorder.epochs == list(range(done + 1, 3))  # only the epochs not finished
    assert resumed.trainer.global_step == 3 * 5
    final = torch.load(in_tmp / "runs/mnist_standard/version_1/checkpoints/last.ckpt")
    assert (final["epoch"], final["global_step"]) == (2, 15)


# ------------------------------------------------------- checkpoints with a malformed structure


def _edited(checkpoints, in_tmp, edit) -> str:
    """A copy of the standard checkpoint changed by ``edit(checkpoint)``; returns its path."""
    checkpoint = torch.load(checkpoints["standard"], weights_only=True)
    edit(checkpoint)
    path = in_tmp / "edited.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def replaced(method, failure: str | None):
    """``method``'s signature (LightningCLI reads it) with a body that fails or does nothing."""

    @functools.wraps(method)
    def stand_in(*args, **kwargs):
        if failure:
            pytest.fail(failure)

    return stand_in


def _first_weight(checkpoint) -> str:
    """The first parameter (not a buffer such as Normalize's mean) of the checkpoint."""
    return next(k for k in checkpoint["state_dict"] if k.endswith(".weight"))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda c: c["state_dict"][_first_weight(c)].view(-1).__setitem__(0, float("nan")),
            "hold NaN values",
        ),
        (lambda c: c.__setitem__("state_dict", {}), "'state_dict' must be a non-empty mapping"),
        (lambda c: c.__setitem__("state_dict", 5), "'state_dict' must be a non-empty mapping"),
        (lambda c: c["state_dict"].__setitem__("x", 3), "entry 'x' is not a named tensor"),
        (lambda c: c.pop("pytorch-lightning_version"), "no 'pytorch-lightning_version'"),
        (lambda c: c.__setitem__("hyper_parameters", [1]), "'hyper_parameters' must be a mapping"),
        (lambda c: c["state_dict"].pop(_first_weight(c)), "it lacks weights model."),
        (
            lambda c: c["state_dict"].__setitem__("model.9.weight", torch.zeros(2)),
            "it has extra weights model.9.weight",
        ),
        (
            lambda c: c["state_dict"].__setitem__(_first_weight(c), torch.zeros(2)),
            "it has reshaped weights model.",
        ),
        (
            lambda c: c.__setitem__("pytorch-lightning_version", "banana"),
            "its 'pytorch-lightning_version' is 'banana'; checkpoints written by Lightning 2.4 "
            "or a later 2.x are read",
        ),
        (
            lambda c: c.__setitem__("pytorch-lightning_version", "0.1.0"),
            "its 'pytorch-lightning_version' is '0.1.0'",
        ),
        (
            lambda c: next(iter(c["callbacks"].values())).__setitem__("best_k_models", 5),
            "has 'best_k_models' = 5; it must be a mapping of checkpoint paths to numbers",
        ),
        (
            lambda c: next(iter(c["callbacks"].values())).pop("best_model_path"),
            "lacks 'best_model_path'",
        ),
        (
            lambda c: c["callbacks"].__setitem__("BestAndLastCheckpoint{}", 3),
            "the state of callback 'BestAndLastCheckpoint{}' is a int, not a mapping",
        ),
        (lambda c: c["loops"].__setitem__("test_loop", 3), "'loops.test_loop' is a int"),
        (
            lambda c: c["loops"]["test_loop"]["batch_progress"].__setitem__("total", 1),
            "loops.test_loop.batch_progress.total is 1; it must be a mapping",
        ),
        (
            lambda c: c["state_dict"]["model.0.std"].fill_(0),
            "the normalization std 'model.0.std' is [0.0]; it must be finite positive numbers",
        ),
        (
            lambda c: c["state_dict"]["model.0.std"].fill_(float("inf")),
            "the normalization std 'model.0.std' is [inf]",
        ),
        (
            lambda c: c["state_dict"]["model.0.std"].fill_(0.5),
            "the normalization std 'model.0.std' is [0.5] but the data's std",
        ),
        (
            lambda c: c["state_dict"]["model.0.mean"].fill_(0.2),
            "the normalization mean 'model.0.mean' is [0.2",
        ),
        (
            lambda c: c.__setitem__("data_identity", {("seed",): 0}),
            "its 'data_identity' is not a mapping of plain values",
        ),
        (  # it was taken for no record, and the data check skipped
            lambda c: c.__setitem__("data_identity", "x"),
            "its 'data_identity' is a str, not the mapping fit writes",
        ),
        (
            lambda c: c["state_dict"].__setitem__(
                _first_weight(c), c["state_dict"][_first_weight(c)].to_sparse()
            ),
            "is a torch.sparse_coo tensor; checkpoints written by fit hold dense",
        ),
        (
            lambda c: c["state_dict"].__setitem__(
                _first_weight(c), (c["state_dict"][_first_weight(c)] * 10).long()
            ),
            "are torch.int64, but the model's are torch.float32",
        ),
        (  # finite in float64, infinite in the float32 model: it tested with loss nan
            lambda c: c["state_dict"].__setitem__(
                _first_weight(c),
                c["state_dict"][_first_weight(c)]
                .double()
                .view(-1)
                .index_fill(0, torch.tensor([0]), 1e300)
                .view_as(c["state_dict"][_first_weight(c)]),
            ),
            "hold infinite values (in the model's torch.float32)",
        ),
        (
            lambda c: c["state_dict"].__setitem__(
                _first_weight(c), c["state_dict"][_first_weight(c)].to(torch.float8_e4m3fn)
            ),
            "is torch.float8_e4m3fn; checkpoints written by fit hold torch.float32",
        ),
        (
            lambda c: c["state_dict"].__setitem__(
                _first_weight(c), torch.empty_like(c["state_dict"][_first_weight(c)], device="meta")
            ),
            "is a tensor on meta; checkpoints written by fit hold tensors with values",
        ),
        (lambda c: c["hyper_parameters"].__setitem__(1, 2), "has a key 1 of type int"),
    ],
    ids=[
        "nan",
        "empty",
        "not-a-dict",
        "not-a-tensor",
        "no-version",
        "hparams-list",
        "missing",
        "extra",
        "reshaped",
        "version-banana",
        "version-0.1",
        "callback-best-k-int",
        "callback-no-best-path",
        "callback-state-int",
        "loop-int",
        "loop-progress-int",
        "std-zero",
        "std-inf",
        "std-other",
        "mean-other",
        "identity-tuple-key",
        "identity-str",
        "sparse",
        "integer",
        "float64-overflow",
        "float8",
        "meta",
        "hparams-int-key",
    ],
)
def test_malformed_checkpoint_is_refused_before_testing(
    edit, expected, checkpoints, in_tmp, capsys, monkeypatch
):
    path = _edited(checkpoints, in_tmp, edit)
    monkeypatch.setattr(Trainer, "test", replaced(Trainer.test, "it was tested"))
    line = refusal(capsys, "test", "--config", STANDARD, "--ckpt_path", path, *QUIET)
    assert expected in line and path in line


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c.__setitem__("optimizer_states", []), "it holds no optimizer state"),
        (lambda c: c.__setitem__("optimizer_states", 5), "its 'optimizer_states' is a int"),
        (lambda c: c.pop("loops"), "its 'loops' is missing"),
        (lambda c: c.__setitem__("epoch", "abc"), "its 'epoch' is a str"),
        (lambda c: c.__setitem__("callbacks", [1]), "its 'callbacks' is a list"),
    ],
    ids=["no-optimizer", "optimizer-int", "no-loops", "epoch-str", "callbacks-list"],
)
def test_resuming_fit_needs_the_whole_training_state(edit, expected, checkpoints, in_tmp, capsys):
    path = _edited(checkpoints, in_tmp, edit)
    line = refusal(capsys, "fit", "--config", STANDARD, "--ckpt_path", path, *TINY)
    assert "cannot resume fit" in line and expected in line


def _second_optimizer(c) -> None:
    c["optimizer_states"].append(c["optimizer_states"][0])


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["loops"].__setitem__("fit_loop", 3), "'loops.fit_loop' is a int"),
        (
            lambda c: c["loops"]["fit_loop"]["epoch_progress"]["total"].__setitem__("ready", "x"),
            "loops.fit_loop.epoch_progress.total.ready is 'x'; it must be an integer >= 0",
        ),
        (
            lambda c: c["loops"]["fit_loop"]["epoch_loop.batch_progress"].pop("current"),
            "loops.fit_loop.epoch_loop.batch_progress lacks 'current'",
        ),
        (
            lambda c: c.__setitem__("optimizer_states", [{"state": {}, "param_groups": "x"}]),
            "optimizer_states[0] has 'param_groups' = 'x'; it must be a non-empty list",
        ),
        (
            lambda c: c["optimizer_states"][0].__setitem__("state", [1]),
            "optimizer_states[0] has 'state' = [1]; it must be a mapping",
        ),
        (
            lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("params", ["a"]),
            "param_groups[0]['params'] = ['a']; it must be a list of integers",
        ),
        (
            lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("lr", -1.0),
            "param_groups[0] lr = -1.0; it must be a finite number >= 0",
        ),
        (
            lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("lr", float("nan")),
            "param_groups[0] lr = nan",
        ),
        (
            lambda c: c["optimizer_states"][0]["state"][0]["exp_avg"].view(-1)[0].fill_(math.nan),
            "holds NaN or infinite values in 'state'[0]['exp_avg']",
        ),
        (_second_optimizer, "it holds 2 optimizer states but the settings build 1"),
        (
            lambda c: c["optimizer_states"][0]["param_groups"][0]["params"].pop(),
            "has parameter groups of [7] parameters but Adam here has [8]",
        ),
        (lambda c: c.__setitem__("lr_schedulers", [5]), "its lr_schedulers[0] is a int"),
        (
            lambda c: c.__setitem__("lr_schedulers", [{}]),
            "it holds 1 lr_scheduler states but the settings build 0",
        ),
        # each below trained to NaN or ascending weights, or failed mid-training with a traceback
        (
            lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("eps", math.nan),
            "param_groups[0] eps = nan; it must be a finite number >= 0",
        ),
        (
            lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("weight_decay", 0.5),
            "param_groups[0] weight_decay = 0.5 but Adam here has 0",
        ),
        (
            lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("maximize", True),
            "param_groups[0] maximize = True but Adam here has False",
        ),
        (
            lambda c: c["optimizer_states"][0]["param_groups"][0].__setitem__("betas", (2.0, 0.9)),
            "param_groups[0] betas[0] = 2.0; it must be in [0, 1]",
        ),
        (
            lambda c: c["optimizer_states"][0]["state"][0]["exp_avg_sq"].neg_().sub_(1),
            "holds negative values in 'state'[0]['exp_avg_sq']; it must be >= 0",
        ),
        (
            lambda c: c["optimizer_states"][0]["state"][0].__setitem__("step", torch.tensor(-5.0)),
            "holds negative values in 'state'[0]['step']; it must be >= 0",
        ),
        (
            lambda c: c["optimizer_states"][0]["state"][0].__setitem__("exp_avg", torch.zeros(3)),
            "has 'state'[0]['exp_avg'] of shape (3,) for a parameter of shape",
        ),
    ],
    ids=[
        "loop-int",
        "loop-counter-str",
        "loop-progress-missing",
        "param-groups-str",
        "state-list",
        "params-str",
        "lr-negative",
        "lr-nan",
        "moment-nan",
        "two-optimizers",
        "group-size",
        "scheduler-int",
        "scheduler-extra",
        "eps-nan",
        "weight-decay-other",
        "maximize",
        "beta-above-1",
        "second-moment-negative",
        "step-negative",
        "moment-shape",
    ],
)
def test_resuming_fit_refuses_a_broken_training_state(
    edit, expected, checkpoints, in_tmp, capsys, monkeypatch
):
    path = _edited(checkpoints, in_tmp, edit)
    monkeypatch.setattr(Trainer, "fit", replaced(Trainer.fit, "it was trained"))
    line = refusal(capsys, "fit", "--config", STANDARD, "--ckpt_path", path, *TINY)
    assert expected in line and path in line


@pytest.mark.parametrize("best", ["xy", 5, ["a", 1], [math.nan, 1], [2.0, 0], [0.5, -1]])
def test_a_damaged_best_robust_validation_is_refused(best, checkpoints, in_tmp, capsys):
    """AdversarialClassifier read it in every subcommand: a traceback, or a false collapse."""
    path = _edited(checkpoints, in_tmp, lambda c: c.__setitem__("robust_val_best", best))
    line = refusal(capsys, "test", "--config", STANDARD, "--ckpt_path", path, *QUIET)
    assert "'robust_val_best' is " in line and "it must be [accuracy in [0, 1], epoch >= 0]" in line


@pytest.mark.parametrize("ckpt_path", ["hpc", "registry", "registry:foo"])
def test_lightning_hpc_and_registry_checkpoints_are_refused(ckpt_path, in_tmp, capsys):
    line = refusal(capsys, "test", "--config", STANDARD, "--ckpt_path", ckpt_path, *QUIET)
    assert (
        f"ckpt_path {ckpt_path!r}: Lightning's hpc and registry checkpoints are not loaded" in line
    )


@pytest.mark.parametrize(
    "value",
    [
        "this.x",
        {"class_path": "this.X", "init_args": {}},
        "{class_path: this.X}",
        "os.system",
        "datamodules.idx.os.system",  # starts like ours, but is os.system
    ],
    ids=["function", "class-path", "yaml-in-a-string", "imported-function", "through-ours"],
)
def test_checkpoint_hyperparameters_import_nothing_before_they_are_checked(
    value, checkpoints, in_tmp, capsys, monkeypatch
):
    monkeypatch.delitem(sys.modules, "this", raising=False)
    path = _edited(
        checkpoints, in_tmp, lambda c: c["hyper_parameters"].__setitem__("backbone", value)
    )
    line = refusal(capsys, "test", "--config", STANDARD, "--ckpt_path", path, *QUIET)
    assert "hyper_parameters.backbone" in line and "a checkpoint may only name classes" in line
    assert "this" not in sys.modules  # `import this` prints the Zen of Python
    path = _edited(
        checkpoints, in_tmp, lambda c: c["hyper_parameters"].__setitem__("optimizer", value)
    )
    line = refusal(capsys, "test", "--config", STANDARD, "--ckpt_path", path, *QUIET)
    assert "hyper_parameters.optimizer" in line
    assert "this" not in sys.modules


def test_checkpoint_url_is_checked_as_the_local_file_or_refused(
    checkpoints, in_tmp, capsys, monkeypatch
):
    nan = _edited(
        checkpoints,
        in_tmp,
        lambda c: c["state_dict"][_first_weight(c)].view(-1).__setitem__(0, float("inf")),
    )
    line = refusal(capsys, "test", "--config", STANDARD, "--ckpt_path", f"file://{nan}", *QUIET)
    assert "the parameters 'model.1." in line and "hold infinite values" in line
    line = refusal(capsys, "test", "--config", STANDARD, "--ckpt_path", "s3://bucket/x.ckpt")
    assert "remote checkpoints are not loaded" in line
    for url in (f"file://{checkpoints['standard']}", f"file://localhost{checkpoints['standard']}"):
        args = ["--config", STANDARD, "--ckpt_path", url, *QUIET]
        tested = cli.main(["test", *args, "--trainer.limit_test_batches", "1"])
        assert "test/acc" in tested.trainer.callback_metrics
    # an infinite value in the normalization buffers (the model's only ones) is refused too
    masked = _edited(
        checkpoints, in_tmp, lambda c: c["state_dict"]["model.0.mean"].fill_(float("inf"))
    )
    args = ["--config", STANDARD, "--ckpt_path", masked, *QUIET]
    monkeypatch.setattr(Trainer, "test", replaced(Trainer.test, "it was tested"))
    line = refusal(capsys, "test", *args, "--trainer.limit_test_batches", "1")
    assert "the normalization mean 'model.0.mean' is [inf]; it must be finite numbers" in line


def test_testing_without_a_checkpoint_warns_that_the_model_is_untrained(in_tmp):
    with pytest.warns(UserWarning, match="without ckpt_path evaluates the model as built"):
        cli.main(["test", "--config", STANDARD, "--trainer.limit_test_batches", "1", *QUIET])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.optimizer.init_args.lr", "-1"], "Invalid learning rate: -1"),
        (["--model.init_args.optimizer.init_args.momentum", "-1"], "Invalid momentum value"),
    ],
)
def test_bad_optimizer_settings_are_refused_before_training(args, expected, in_tmp, capsys):
    base = ["fit", "--config", STANDARD, "--model.init_args.optimizer", "torch.optim.SGD"]
    line = refusal(capsys, *base, *args, *TINY)
    assert line.startswith("error: model optimizer or lr_scheduler settings:") and expected in line
    assert not list(in_tmp.rglob("*.ckpt"))


def test_a_folder_given_as_checkpoint_is_named_a_folder(in_tmp, capsys):
    (in_tmp / "ckpts").mkdir()
    line = refusal(capsys, "test", "--config", STANDARD, "--ckpt_path", str(in_tmp / "ckpts"))
    assert "is a folder; give a .ckpt file" in line


@pytest.mark.parametrize(
    ("buffer", "value", "expected"),
    [
        ("running_var", -1.0, "the batch-norm variances '1.running_var' hold negative values"),
        ("running_var", math.inf, "the batch-norm statistics '1.running_var' hold infinite"),
        ("running_mean", -math.inf, "the batch-norm statistics '1.running_mean' hold infinite"),
    ],
)
def test_broken_batch_norm_statistics_are_refused(buffer, value, expected):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    state = model.state_dict()
    check_running_statistics("x.ckpt", state, model)  # the control: fresh statistics pass
    state[f"1.{buffer}"][0] = value
    with pytest.raises(SettingError, match=re.escape(expected)):
        check_running_statistics("x.ckpt", state, model)
