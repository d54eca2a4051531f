"""NoiseAugmentedClassifier: Gaussian augmentation in pixel space and consistency regularization.

Oracles: the noise recovered from what the backbone receives (pixel-space noise of std sigma, not
normalized-space noise), a hand computation of Jeong & Shin's (2020) L_con on a two-class example,
and the authors' formulation (``F.kl_div`` against the mean softmax, entropy of the mean).
"""

import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch import nn

import cli
import lightning_modules.noise as noise_module
from lightning_modules import NoiseAugmentedClassifier
from lightning_modules.noise import consistency_terms
from robust.checks import SettingError
from robust.sharding import image_seed
from tests.tensor_data import TensorData

MEAN, STD = 0.1307, 0.3081


class Recorder(nn.Module):
    """Backbone that remembers its input (the normalized noisy images) and its logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(in_channels * 28 * 28, num_classes)
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        self.inputs.append(x.detach().clone())
        self.outputs.append(logits.detach().clone())
        return logits


def make(**kwargs) -> NoiseAugmentedClassifier:
    module = NoiseAugmentedClassifier(backbone=Recorder, mean=(MEAN,), std=(STD,), **kwargs)
    module.model[1].inputs.clear()  # drop the shape check's forward
    module.model[1].outputs.clear()
    return module


def images(batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, 28, 28, generator=generator)
    return x, torch.randint(0, 10, (batch,), generator=generator)


@pytest.mark.parametrize("m", [1, 3])
def test_noise_is_pixel_space_gaussian_added_before_normalization(m):
    sigma = 0.5
    module = make(sigma=sigma, num_noise_samples=m)
    x, y = images()
    loss, logits, targets = module.training_loss(x, y)
    seen = module.model[1].inputs[-1]
    assert seen.shape == (m * len(x), 1, 28, 28)
    assert logits.shape == (m * len(x), 10)
    assert torch.equal(targets, y.repeat(m))
    # Undo the normalization: what is left over the clean images is the noise, in pixel units.
    noise = (seen * STD + MEAN).view(m, *x.shape) - x
    assert abs(noise.mean().item()) < 0.01
    # Pixel-space noise has std sigma; noise added after normalization would show sigma * STD.
    assert noise.std().item() == pytest.approx(sigma, rel=0.02)
    assert (x + noise).min() < 0  # no clipping to [0, 1] (Smooth certifies unclipped noise)
    if m > 1:  # each copy gets its own noise, uncorrelated with the others
        corr = torch.corrcoef(noise.reshape(m, -1))
        assert (corr - torch.eye(m)).abs().max() < 0.02
    assert loss.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


def test_noise_is_fresh_every_step():
    module = make(sigma=0.25)
    x, y = images(8)
    module.training_loss(x, y)
    module.training_loss(x, y)
    first, second = module.model[1].inputs[-2:]
    assert not torch.allclose(first, second)


def test_consistency_terms_by_hand():
    # Two copies of one image, two classes: p1 = (1/2, 1/2), p2 = (3/4, 1/4), p_hat = (5/8, 3/8).
    logits = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])
    kl, entropy = consistency_terms(logits)
    kl1 = 5 / 8 * math.log((5 / 8) / (1 / 2)) + 3 / 8 * math.log((3 / 8) / (1 / 2))
    kl2 = 5 / 8 * math.log((5 / 8) / (3 / 4)) + 3 / 8 * math.log((3 / 8) / (1 / 4))
    assert kl.item() == pytest.approx((kl1 + kl2) / 2, rel=1e-6)
    assert entropy.item() == pytest.approx(-(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8)))


def test_consistency_terms_match_the_authors_formulation():
    logits = torch.randn(4, 16, 10, generator=torch.Generator().manual_seed(2)) * 3
    kl, entropy = consistency_terms(logits)
    p_hat = logits.softmax(-1).mean(0)
    # Jeong & Shin's code: F.kl_div(log_softmax(logits_i), p_hat) summed over classes, averaged.
    kl_ref = sum(
        F.kl_div(logit.log_softmax(-1), p_hat, reduction="none").sum(1) for logit in logits
    ) / len(logits)
    entropy_ref = -(p_hat * p_hat.log()).sum(1)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(entropy, entropy_ref, rtol=1e-5, atol=1e-6)
    same = consistency_terms(logits[:1].repeat(3, 1, 1))[0]  # identical copies agree: KL = 0
    torch.testing.assert_close(same, torch.zeros(16), atol=1e-6, rtol=0)


def test_consistency_terms_of_bf16_logits_are_computed_in_float32():
    """Nearby copies (the usual case): in bf16 the KL was mostly rounding, often negative."""
    generator = torch.Generator().manual_seed(4)
    base = 4 * torch.randn(256, 10, generator=generator, dtype=torch.float64)
    logits = base + 0.05 * torch.randn(2, 256, 10, generator=generator, dtype=torch.float64)
    kl_exact, entropy_exact = consistency_terms(logits)
    kl, entropy = consistency_terms(logits.bfloat16())
    assert kl.dtype == entropy.dtype == torch.float32
    assert (kl >= 0).all()
    # the logits' own rounding to bf16 moves each KL by a little, no longer by 7x
    exact_of_rounded, _ = consistency_terms(logits.bfloat16().double())
    torch.testing.assert_close(kl.double(), exact_of_rounded, rtol=1e-3, atol=1e-7)
    assert (kl.double() - kl_exact).abs().median() < 0.5 * kl_exact.median()
    torch.testing.assert_close(entropy.double(), entropy_exact, rtol=2e-2, atol=1e-3)


def test_the_training_loss_of_a_bf16_model_is_float32():
    module = make(sigma=0.25, num_noise_samples=2, consistency_weight=10.0, entropy_weight=0.5)
    x, y = images(16)
    loss, logits, _ = module.bfloat16().training_loss(x.bfloat16(), y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    wide = logits.double().view(2, 16, 10)
    ce = F.cross_entropy(wide.flatten(0, 1), y.repeat(2))
    kl, entropy = consistency_terms(wide)
    expected = ce + 10.0 * kl.mean() + 0.5 * entropy.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_consistency_loss_value():
    lam, eta, m = 10.0, 0.5, 2
    module = make(sigma=0.25, num_noise_samples=m, consistency_weight=lam, entropy_weight=eta)
    x, y = images(16)
    loss, *_ = module.training_loss(x, y)
    out = module.model[1].outputs[-1].double().view(m, 16, 10)
    p = out.softmax(-1)
    p_hat = p.mean(0)
    ce = -(out.log_softmax(-1).gather(2, y.repeat(m, 1).unsqueeze(2))).mean()
    kl = (p_hat * (p_hat.log() - p.log())).sum(-1).mean()  # mean over copies and images
    entropy = -(p_hat * p_hat.log()).sum(-1).mean()
    assert loss.item() == pytest.approx((ce + lam * kl + eta * entropy).item(), rel=1e-5)
    assert kl.item() > 0 and entropy.item() > 0  # both terms really contribute
    loss.backward()  # differentiable through p_hat
    assert module.model[1].linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "sigma must be a number > 0; got 0.0"),
        ({"sigma": -0.25}, "sigma must be a number > 0"),
        ({"sigma": float("nan")}, "sigma must be a number > 0"),
        ({"sigma": float("inf")}, "sigma must be a number > 0"),
        ({"sigma": True}, "sigma must be a number > 0"),
        ({"num_noise_samples": 0}, "num_noise_samples must be an integer >= 1"),
        ({"num_noise_samples": 1.5}, "num_noise_samples must be an integer >= 1"),
        ({"consistency_weight": -1.0}, "consistency_weight must be a number >= 0"),
        ({"entropy_weight": float("nan")}, "entropy_weight must be a number >= 0"),
        ({"consistency_weight": 1.0, "num_noise_samples": 1}, "num_noise_samples must be >= 2"),
        ({"smoothadv_eps": -0.5}, "smoothadv_eps must be a number >= 0"),
        ({"smoothadv_steps": 0}, "smoothadv_steps must be an integer >= 1"),
        ({"smoothadv_step_size": 0.0}, "smoothadv_step_size must be a number > 0"),
        ({"smoothadv_warmup_epochs": -1}, "smoothadv_warmup_epochs must be an integer >= 0"),
        ({"noisy_val_images": -1}, "noisy_val_images must be an integer >= 0"),
        ({"noisy_val_samples": 0}, "noisy_val_samples must be an integer >= 1"),
        ({"noisy_val_seed": -2}, "noisy_val_seed must be an integer >= 0"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    with pytest.raises(SettingError, match=f"NoiseAugmentedClassifier {message}"):
        NoiseAugmentedClassifier(**kwargs)


def test_cli_rejects_bad_sigma_before_training(in_tmp, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    config = str(cli.Path(__file__).resolve().parents[1] / "configs/mnist/smoothing.yaml")
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--config", config, "--model.init_args.sigma", "0"])
    assert info.value.code == 2
    assert "NoiseAugmentedClassifier sigma must be a number > 0" in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()


# SmoothAdv ---------------------------------------------------------------------------------------


def test_smoothadv_eps_warms_up_as_in_the_authors_code():
    module = make(smoothadv_eps=1.0, smoothadv_warmup_epochs=4)
    eps = [module.smoothadv_eps_at_epoch(e) for e in range(6)]
    assert eps == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])  # min(1, (e + 1) / W)
    assert make(smoothadv_eps=1.0).smoothadv_eps_at_epoch(0) == 1.0


@pytest.mark.parametrize("warmup", [2, 3, 5])
def test_a_run_that_ends_before_smoothadvs_full_eps_is_refused_at_fit_start(warmup):
    module = make(smoothadv_eps=1.0, smoothadv_warmup_epochs=warmup)
    for max_epochs in range(1, 7):
        module.trainer = SimpleNamespace(max_epochs=max_epochs, fast_dev_run=False, global_rank=0)
        if any(module.smoothadv_eps_at_epoch(e) == 1.0 for e in range(max_epochs)):
            module.on_fit_start()
            continue
        with pytest.raises(SettingError, match=rf"^model smoothadv_warmup_epochs {warmup} leaves "):
            module.on_fit_start()
    one_epoch = SimpleNamespace(max_epochs=1, fast_dev_run=False, global_rank=0)
    for other in (
        make(smoothadv_eps=1.0, smoothadv_warmup_epochs=1),  # full eps from the first epoch
        make(),  # no SmoothAdv: nothing warms up
    ):
        other.trainer = one_epoch
        other.on_fit_start()


class AttackSpy:
    """Wraps smoothadv_attack in the module under test and records its calls."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.real = noise_module.smoothadv_attack
        monkeypatch.setattr(noise_module, "smoothadv_attack", self)

    def __call__(self, net, x, y, **kwargs):
        x_adv = self.real(net, x, y, **kwargs)
        self.calls.append({"x": x.clone(), "x_adv": x_adv.clone(), **kwargs})
        return x_adv


@pytest.mark.parametrize("consistency", [0.0, 5.0])
def test_smoothadv_trains_on_the_attacks_noisy_copies(consistency, monkeypatch):
    spy = AttackSpy(monkeypatch)
    m, sigma, eps = 3, 0.25, 0.5
    module = make(
        sigma=sigma,
        num_noise_samples=m,
        smoothadv_eps=eps,
        smoothadv_steps=2,
        consistency_weight=consistency,
    )
    x, y = images(8)
    loss, logits, targets = module.training_loss(x, y)
    (call,) = spy.calls
    assert (call["sigma"], call["eps"], call["steps"], call["num_noise_samples"]) == (
        sigma,
        eps,
        2,
        m,
    )
    x_adv, noise = call["x_adv"], call["noise"]
    assert noise.shape == (m, 8, 1, 28, 28)
    assert noise.std().item() == pytest.approx(sigma, rel=0.05)
    delta = (x_adv - x).flatten(1).norm(dim=1)
    assert (delta > 0.4).all() and (delta <= eps * (1 + 1e-5)).all()
    # the backbone's last input is the m noisy copies of x_adv, with the attack's own noise
    seen = module.model[1].inputs[-1] * STD + MEAN
    torch.testing.assert_close(seen.view(m, 8, 1, 28, 28), x_adv + noise, atol=1e-5, rtol=0)
    assert torch.equal(targets, y.repeat(m))
    out = module.model[1].outputs[-1]
    assert torch.equal(logits, out)
    expected = F.cross_entropy(out, targets)
    if consistency:
        kl, _ = consistency_terms(out.view(m, 8, -1))
        expected = expected + consistency * kl.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the attack made the copies worse for the model than the clean images' copies
    with torch.no_grad():
        clean_ce = F.cross_entropy(module((x.unsqueeze(0) + noise).flatten(0, 1)), targets)
    assert F.cross_entropy(out, targets).item() > clean_ce.item()


def test_smoothadv_off_leaves_gaussian_training_unchanged(monkeypatch):
    spy = AttackSpy(monkeypatch)
    x, y = images(4)
    module = make(sigma=0.25, num_noise_samples=2, smoothadv_eps=0.0)
    torch.manual_seed(3)
    loss = module.training_loss(x, y)[0]
    assert spy.calls == []
    # the oracle: cross-entropy on x + sigma z for two copies, z the same draws from seed 3
    torch.manual_seed(3)
    copies = x.repeat(2, 1, 1, 1)
    noisy = copies + 0.25 * torch.randn_like(copies)
    expected = F.cross_entropy(module(noisy), y.repeat(2))
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"smoothadv_steps": 10},
        {"smoothadv_step_size": 0.1},
        {"smoothadv_warmup_epochs": 5},
    ],
)
def test_smoothadv_settings_without_smoothadv_eps_are_refused(kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(
        SettingError,
        match=rf"NoiseAugmentedClassifier {name} applies only with smoothadv_eps > 0 .*"
        rf"got {name}={value!r} with smoothadv_eps=0",
    ):
        make(**kwargs)
    assert getattr(make(smoothadv_eps=0.5, **kwargs), name) == value  # enabled: accepted
    make(smoothadv_steps=1, smoothadv_step_size=None, smoothadv_warmup_epochs=0)  # the defaults


# Noisy validation --------------------------------------------------------------------------------


def noisy_correct(model, x, y, sigma, copies, seed=0):
    """Correct noisy copies per image, each image's noise from its own seeded generator, by hand."""
    counts = []
    for i in range(len(x)):
        generator = torch.Generator().manual_seed(image_seed(seed, f"noise_sigma{sigma:g}", i))
        noise = torch.randn((copies, *x.shape[1:]), generator=generator)
        with torch.no_grad():
            counts.append(int((model(x[i] + sigma * noise).argmax(1) == y[i]).sum()))
    return torch.tensor(counts, dtype=torch.float64)


def noisy_validate(net, x, y, **kwargs) -> float:
    trainer = Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )
    trainer.validate(net, datamodule=TensorData(x, y, batch_size=8), verbose=False)
    return float(trainer.callback_metrics["val/noisy_acc"])


def test_noisy_validation_accuracy_is_exact_and_does_not_depend_on_the_batch(monkeypatch):
    x, y = images(24)
    with torch.no_grad():  # labels that the clean model gets right, so the noise matters
        y = make()(x).argmax(1)
    net = make(sigma=0.5, noisy_val_images=19, noisy_val_samples=3)
    got = noisy_validate(net, x, y)
    correct = noisy_correct(net.eval(), x, y, 0.5, 3)
    expected = correct[:19].sum().item() / (19 * 3)
    assert 0.2 < expected < 0.9  # the noise changes predictions: the count matters
    assert got == pytest.approx(expected, abs=1e-6)
    monkeypatch.setattr(noise_module, "NOISY_VAL_BATCH_IMAGES", 5)
    assert noisy_validate(make(sigma=0.5, noisy_val_images=19, noisy_val_samples=3), x, y) == got
    other_seed = make(sigma=0.5, noisy_val_images=19, noisy_val_samples=3, noisy_val_seed=1)
    assert noisy_validate(other_seed, x, y) == pytest.approx(
        noisy_correct(net, x, y, 0.5, 3, seed=1)[:19].sum().item() / 57, abs=1e-6
    )
    # limit_val_batches: the first 2 loader batches of 8 images
    limited = make(sigma=0.5, noisy_val_images=1000, noisy_val_samples=3)
    assert noisy_validate(limited, x, y, limit_val_batches=2) == pytest.approx(
        correct[:16].sum().item() / 48, abs=1e-6
    )


def test_noisy_validation_logs_each_epoch_but_not_in_the_sanity_check():
    x, y = images(16)
    logged = []

    class Spy(Callback):
        def on_validation_end(self, trainer, pl_module):
            logged.append((trainer.sanity_checking, "val/noisy_acc" in trainer.callback_metrics))

    trainer = Trainer(
        max_epochs=2,
        num_sanity_val_steps=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[Spy()],
    )
    trainer.fit(make(noisy_val_images=8), datamodule=TensorData(x, y, batch_size=8))
    assert logged == [(True, False), (False, True), (False, True)]
    off = make(noisy_val_images=0)
    trainer = Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    trainer.validate(off, datamodule=TensorData(x, y, batch_size=8), verbose=False)
    assert "val/noisy_acc" not in trainer.callback_metrics


@pytest.mark.parametrize("kwargs", [{"noisy_val_samples": 2}, {"noisy_val_seed": 3}])
def test_noisy_validation_settings_without_noisy_val_images_are_refused(kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(
        SettingError,
        match=rf"NoiseAugmentedClassifier {name} applies only with noisy_val_images > 0 .*"
        rf"got {name}={value!r} with noisy_val_images=0",
    ):
        make(noisy_val_images=0, **kwargs)
    assert getattr(make(**kwargs), name) == value  # on by default: accepted


def test_noise_configs_keep_the_checkpoint_of_best_noisy_accuracy():
    root = cli.Path(__file__).resolve().parents[1] / "configs/mnist"
    for name in ("smoothing", "smoothadv"):  # the sigma and consistency configs extend smoothing
        text = (root / f"{name}.yaml").read_text()
        assert "monitor: val/noisy_acc" in text, name
    cli.check_monitor_can_be_logged("val/noisy_acc", make())
    with pytest.raises(SettingError, match=r"only with model\.init_args\.noisy_val_images > 0"):
        cli.check_monitor_can_be_logged("val/noisy_acc", make(noisy_val_images=0))
