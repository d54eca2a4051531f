"""Multi-process runs through the real CLI: DDP on 2 CPU processes (gloo) equals 1 process."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

import cli
from robust.certificates import read_tsv

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # a hung collective fails the test instead of the whole CI run
EPOCH_METRICS = {"trades": ["train/kl"]}
"""Epoch-level metrics each process computes from its own batches (the same value on all only
when synchronized; torchmetrics' train/acc and train/eps are the same anyway)."""


def run_cli(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def logged(output: str, prefix: str) -> dict[str, float]:
    """Metrics from Lightning's printed results table, e.g. ``test/perturbed_acc/...``."""
    found = re.findall(rf"^[\s│|]*({re.escape(prefix)}\S*)[\s│|]+([-\d.e]+)", output, re.MULTILINE)
    return {k: float(v) for k, v in found}


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    args = ["fit", "--config", str(ROOT / "configs/mnist/standard.yaml")]
    args += ["--model.init_args.backbone", "lightning_modules.backbones.LeNet"]
    args += ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "25"]
    args += ["--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    args += ["--trainer.logger.init_args.save_dir", str(tmp / "runs")]
    old_argv = sys.argv
    sys.argv = ["cli.py"]
    try:
        run = cli.main(args)
    finally:
        sys.argv = old_argv
    return Path(run.trainer.checkpoint_callback.last_model_path)


def evaluation_config(path: Path, tsv: Path) -> Path:
    config = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "callbacks.PerturbedAccuracy",
                    "init_args": {
                        "attacks": [
                            {"method": "fgm", "norm": "2", "eps": 1.0},
                            {"method": "pgd", "norm": "inf", "eps": 0.1, "steps": 4},
                        ],
                        "max_images": 37,
                        "batch_size": 8,
                    },
                },
                {
                    "class_path": "callbacks.Certification",
                    "init_args": {
                        "sigma": 0.25,
                        "n0": 20,
                        "n": 300,
                        "alpha": 0.01,
                        "max_images": 9,
                        "batch_size": 128,
                        "output": str(tsv),
                    },
                },
            ]
        }
    }
    path.write_text(yaml.safe_dump(config))
    return path


def evaluated_on(checkpoint: Path, devices: int, strategy: str, tmp_path: Path, *extra: str) -> str:
    """``test`` of the trained LeNet on ``devices`` CPU processes; the printed output."""
    return run_cli(
        "test",
        "--config", str(ROOT / "configs/mnist/standard.yaml"),
        "--model.init_args.backbone", "lightning_modules.backbones.LeNet",
        *extra,
        "--ckpt_path", str(checkpoint),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", str(devices),
        "--trainer.strategy", strategy,
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        cwd=tmp_path,
    )  # fmt: skip


def test_two_processes_give_the_numbers_and_rows_of_one(trained_checkpoint, tmp_path):
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        tsv = tmp_path / f"certify_{devices}.tsv"
        config = evaluation_config(tmp_path / f"eval_{devices}.yaml", tsv)
        output = evaluated_on(
            trained_checkpoint, devices, strategy, tmp_path, "--config", str(config)
        )
        if devices == 2:
            assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
        rows, torn = read_tsv(tsv)
        assert not torn
        results[devices] = (
            logged(output, "test/perturbed_acc/"),
            logged(output, "certify/"),
            [(r.idx, r.label, r.predict, r.radius, r.correct) for r in rows],
        )
    one, two = results[1], results[2]
    assert set(one[0]) == {"test/perturbed_acc/fgm_l2_eps1", "test/perturbed_acc/pgd4_linf_eps0.1"}
    assert one[0] == two[0]  # same perturbed accuracies, random starts included
    assert one[1] == two[1] and "certify/acr" in one[1]
    assert one[2] == two[2]  # the same TSV rows, no duplicate from sampler padding
    assert [r[0] for r in one[2]] == list(range(9))


def test_clean_accuracy_and_loss_count_each_image_once_on_three_processes(
    trained_checkpoint, tmp_path
):
    # 500 test images on 3 processes: the sampler repeats one image to give each 167
    metrics = {}
    for devices, strategy in ((1, "auto"), (3, "ddp")):
        output = evaluated_on(
            trained_checkpoint, devices, strategy, tmp_path,
            "--trainer.callbacks", "[]", "--data.init_args.batch_size", "32",
        )  # fmt: skip
        metrics[devices] = logged(output, "test/")
    accuracy = metrics[1]["test/acc"]
    assert metrics[3]["test/acc"] == accuracy
    assert round(accuracy * 500, 3) == round(accuracy * 500)  # a count out of 500
    # the mean loss of the same 500 images (Lightning's sync_dist mean divided by 498, the
    # processes' 167, 167 and 166 images averaged in integers: 166)
    assert metrics[3]["test/loss"] == pytest.approx(metrics[1]["test/loss"], rel=1e-5)


def test_a_batch_of_the_samplers_repeats_alone_weighs_nothing(monkeypatch):
    """Batch size 1 (or 83 of 500 on 3 processes): a whole batch can be the repeat."""
    import lightning_modules.standard as standard
    from lightning_modules import StandardClassifier
    from lightning_modules.backbones import LeNet

    module = StandardClassifier(LeNet).eval()
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    module._trainer = object()  # the repeats come from the patched lookup below
    repeats = {0: torch.tensor([False] * 5), 1: torch.tensor([True] * 3)}
    monkeypatch.setattr(standard, "sampler_padding", lambda t, s, i, n: repeats[i])
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28, generator=generator), torch.arange(8)
    with torch.no_grad():
        module._evaluate((x[:5], y[:5]), 0, "test")
        module._evaluate((x[5:], y[5:]), 1, "test")  # the repeats: not counted
        expected = torch.nn.functional.cross_entropy(module(x[:5]), y[:5])
    torch.testing.assert_close(module.test_loss.compute(), expected)
    assert module.test_acc.tp.sum() + module.test_acc.fn.sum() == 5
    # NaN in a batch of repeats weighs nothing; in a counted batch the mean is NaN, not dropped
    x[5, 0, 0, 0] = float("nan")
    with torch.no_grad():
        module._evaluate((x[5:], y[5:]), 1, "test")
        torch.testing.assert_close(module.test_loss.compute(), expected)
        module._evaluate((x[5:], y[5:]), 0, "test")
    assert module.test_loss.compute().isnan()


class RecordTrainingRng(Callback):
    """Writes each process's first training draw and epoch-level train metrics to rank<r>.json."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.draw = torch.randn(4).tolist()

    def on_train_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        record = {k: float(v) for k, v in metrics.items() if k.startswith("train/")}
        record["draw"] = self.draw
        Path(f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("config", ["standard", "adversarial", "smoothing", "trades"])
def test_every_module_trains_with_ddp_on_two_processes(config, tmp_path):
    recorder = "[{class_path: tests.test_distributed.RecordTrainingRng}]"
    output = run_cli(
        "fit",
        "--config", str(ROOT / f"configs/mnist/{config}.yaml"),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.strategy", "ddp",
        "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", recorder,
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        cwd=tmp_path,
    )  # fmt: skip
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert list((tmp_path / "runs").rglob("last.ckpt"))
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # each process draws its own training noise and random starts (they were the same)
    assert first.pop("draw") != second.pop("draw")
    # epoch-level training metrics are the mean over both processes, the same on each
    for key in EPOCH_METRICS.get(config, []):
        assert first[key] == second[key], key


@pytest.mark.parametrize("config", ["standard", "adversarial", "smoothing"])
def test_every_module_trains_and_tests_in_bf16_mixed(config, in_tmp, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    common = ["--config", str(ROOT / f"configs/mnist/{config}.yaml")]
    common += ["--trainer.precision", "bf16-mixed", "--trainer.fast_dev_run", "2"]
    common += ["--trainer.enable_progress_bar", "false"]
    fitted = cli.main(["fit", *common])
    assert fitted.trainer.precision == "bf16-mixed"
    loss = fitted.trainer.callback_metrics["train/loss"]
    assert loss.isfinite()
    attacks = ["--config", str(ROOT / "configs/callbacks/attacks.yaml")]
    tested = cli.main(["test", *common, *attacks])
    metrics = tested.trainer.callback_metrics
    assert "test/acc" in metrics
    norms = {k: float(v) for k, v in metrics.items() if k.startswith("test/perturbation_norm/")}
    assert set(norms) == {
        f"test/perturbation_norm/{k}"
        for k in ("fgm_l2_eps5", "fgm_linf_eps0.3", "pgd40_l2_eps5", "pgd40_linf_eps0.3")
    }
    assert all(value > 0 for value in norms.values())  # the attacks move the images under bf16


def test_noisy_validation_on_two_processes_equals_one(tmp_path):
    common = ["--config", str(ROOT / "configs/mnist/smoothing.yaml")]
    common += ["--model.init_args.backbone", "lightning_modules.backbones.LeNet"]
    common += ["--model.init_args.noisy_val_images", "301", "--trainer.callbacks", "[]"]
    common += ["--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]
    common += ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    run_cli("fit", *common, "--trainer.max_steps", "20", "--trainer.limit_val_batches", "1",
            cwd=tmp_path)  # fmt: skip
    (checkpoint,) = (tmp_path / "runs").rglob("last.ckpt")
    accuracy = {}
    for devices, strategy in ((1, "auto"), (2, "ddp")):
        output = run_cli(
            "validate", *common, "--ckpt_path", str(checkpoint),
            "--trainer.devices", str(devices), "--trainer.strategy", strategy,
            cwd=tmp_path,
        )  # fmt: skip
        accuracy[devices] = logged(output, "val/noisy_acc")["val/noisy_acc"]
    assert accuracy[1] == accuracy[2]
    assert round(accuracy[1] * 301 * 4, 2) == round(accuracy[1] * 301 * 4)  # a count of 1,204
