import dataclasses

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

import lightning_modules.adversarial as adversarial
from lightning_modules import AdversarialClassifier, SmallCNN
from robust.attacks import AttackSpec
from tests.tensor_data import TensorData

NO_TRAINER = "ignore:You are trying to `self.log()`"

L2 = AttackSpec("fgm", "2", 0.5)
SPECS = [
    L2,
    AttackSpec("fgm", "inf", 0.03, random_start=True),  # FGSM-RS, Wong et al. 2020
    AttackSpec("pgd", "inf", 0.03, steps=3),  # Madry et al. 2018
    AttackSpec("pgd", "2", 0.5, steps=3),
]


def no_dropout(in_channels: int, num_classes: int) -> SmallCNN:
    return SmallCNN(in_channels, num_classes, dropout=False)


def model(**kwargs) -> AdversarialClassifier:
    torch.manual_seed(0)
    return AdversarialClassifier(backbone=no_dropout, **kwargs)


def interior_batch(n: int = 8):
    """Images in [0.3, 0.7]: an L2 step of 0.5 spread over 784 pixels is never clipped."""
    g = torch.Generator().manual_seed(1)
    return 0.3 + 0.4 * torch.rand(n, 1, 28, 28, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


class Spy:
    """Wraps robust.attacks.attack in the module under test and records its calls."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.real = adversarial.attack
        monkeypatch.setattr(adversarial, "attack", self)

    def __call__(self, net, x, y, spec, generator=None):
        x_adv = self.real(net, x, y, spec, generator)
        grads = [p.grad for p in net.parameters()]
        self.calls.append(
            {
                "x": x.clone(),
                "x_adv": x_adv.clone(),
                "spec": spec,
                "autocast": torch.is_autocast_enabled("cpu"),
                "param_grads": grads,
            }
        )
        return x_adv


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "half", True, None])
def test_perturbed_fraction_outside_0_1_is_rejected(value):
    with pytest.raises(ValueError, match=r"perturbed_fraction must be in \[0, 1\]"):
        AdversarialClassifier(perturbed_fraction=value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps_warmup_epochs": -1}, "eps_warmup_epochs"),
        ({"eps_warmup_epochs": 1.5}, "eps_warmup_epochs"),
        ({"attack": AttackSpec(targeted=True)}, "targeted"),
        ({"attack": "fgm"}, "attack must be an AttackSpec"),
        ({"attack": {"method": "cw"}}, "method"),
    ],
)
def test_other_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdversarialClassifier(**kwargs)


def test_defaults_are_the_seed_attack_and_a_mapping_is_accepted():
    net = AdversarialClassifier()
    assert net.attack == AttackSpec("fgm", "2", 5.0)
    assert net.attack.key == "fgm_l2_eps5"
    as_dict = AdversarialClassifier(attack={"method": "pgd", "norm": "linf", "eps": 0.3})
    assert as_dict.attack == AttackSpec("pgd", "inf", 0.3)
    assert as_dict.hparams["attack"] == dataclasses.asdict(as_dict.attack)


@pytest.mark.parametrize(
    ("fraction", "batch", "expected"),
    [(0.5, 64, 32), (0.5, 7, 4), (0.25, 7, 2), (0.0, 9, 0), (1.0, 9, 9), (0.1, 4, 0)],
)
def test_number_of_perturbed_images(fraction, batch, expected):
    assert AdversarialClassifier(perturbed_fraction=fraction).num_perturbed(batch) == expected


def test_eps_warmup_grows_linearly_then_stays():
    spec = AttackSpec("pgd", "inf", 0.3, steps=7)
    net = AdversarialClassifier(attack=spec, eps_warmup_epochs=4)
    eps = [net.attack_at_epoch(e).eps for e in range(7)]
    assert eps == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3, 0.3, 0.3])
    # only eps changes; the step size follows eps because it is derived, not stored
    warm = net.attack_at_epoch(2)
    assert dataclasses.replace(warm, eps=0.3) == spec
    assert warm.resolved_step_size == pytest.approx(2.5 * 0.15 / 7)
    assert AdversarialClassifier(attack=spec).attack_at_epoch(0) == spec


@pytest.mark.filterwarnings(NO_TRAINER)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.key)
def test_training_loss_perturbs_the_first_part_and_leaves_no_parameter_grads(spec, monkeypatch):
    spy = Spy(monkeypatch)
    net = model(attack=spec, perturbed_fraction=0.5).train()
    x, y = interior_batch(8)
    inputs = []
    net.model.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))
    loss, _, targets = net.training_loss(x, y)
    (call,) = spy.calls
    assert torch.equal(call["x"], x[:4])
    assert all(g is None for g in call["param_grads"])  # the attack left no parameter gradient
    assert all(p.grad is None for p in net.parameters())
    delta = (call["x_adv"] - x[:4]).flatten(1)
    norms = delta.norm(dim=1) if spec.norm == "2" else delta.abs().amax(dim=1)
    assert (norms > 0).all()
    assert (norms <= spec.eps * (1 + 1e-5)).all()
    if spec.method == "fgm" and not spec.resolved_random_start:
        assert norms == pytest.approx(torch.full((4,), spec.eps), rel=1e-5)  # ||delta|| = eps
    # the loss is the cross-entropy of the mixed batch: attacked images first, then clean ones
    mixed = torch.cat([call["x_adv"], x[4:]])
    assert torch.equal(inputs[-1], mixed)
    assert torch.equal(targets, y)
    assert loss.item() == pytest.approx(F.cross_entropy(net(mixed), y).item(), rel=1e-6)
    # the backward pass gives exactly the gradient of that loss (no stale attack gradient)
    loss.backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(mixed), y).backward()
    for a, b in zip(got, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings(NO_TRAINER)
def test_fraction_zero_is_clean_training(monkeypatch):
    spy = Spy(monkeypatch)
    net = model(perturbed_fraction=0.0).train()
    x, y = interior_batch(6)
    loss, _, _ = net.training_loss(x, y)
    assert spy.calls == []
    assert loss.item() == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-6)


def fit(net, **kwargs) -> Trainer:
    settings = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    trainer = Trainer(**{**settings, **kwargs})
    trainer.fit(net, datamodule=TensorData(*interior_batch(24), batch_size=8))
    return trainer


def test_fit_warms_up_eps_per_epoch_and_logs_clean_and_adversarial_accuracy(monkeypatch):
    spy = Spy(monkeypatch)
    net = model(attack=L2, perturbed_fraction=0.5, eps_warmup_epochs=2)
    trainer = fit(net, max_epochs=3, limit_train_batches=2)
    assert [c["spec"].eps for c in spy.calls] == [0.25, 0.25, 0.5, 0.5]  # epoch 0 is clean
    metrics = trainer.callback_metrics
    for name in ("train/acc", "train/adv_acc", "train/clean_acc", "train/loss"):
        assert 0 <= float(metrics[name]) <= (1 if "acc" in name else 100)
    assert float(metrics["train/eps"]) == pytest.approx(0.5)
    only_adv = fit(model(perturbed_fraction=1.0), max_epochs=1, limit_train_batches=1)
    assert "train/adv_acc" in only_adv.callback_metrics
    assert "train/clean_acc" not in only_adv.callback_metrics


def test_bf16_mixed_training_step_attacks_under_autocast(monkeypatch):
    spy = Spy(monkeypatch)
    net = model(attack=AttackSpec("pgd", "2", 0.5, steps=2), perturbed_fraction=1.0)
    before = [p.detach().clone() for p in net.parameters()]
    trainer = fit(net, max_epochs=1, limit_train_batches=2, precision="bf16-mixed")
    assert len(spy.calls) == 2
    for call in spy.calls:
        assert call["autocast"]  # the attack ran inside the training step's bf16 autocast
        assert call["x_adv"].dtype == torch.float32
        norms = (call["x_adv"] - call["x"]).flatten(1).norm(dim=1)
        assert (norms > 0.1).all() and (norms <= 0.5 * (1 + 1e-5)).all()
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_checkpoint_restores_the_attack(tmp_path):
    spec = AttackSpec("pgd", "inf", 0.1, steps=2)
    net = model(attack=spec, perturbed_fraction=0.25, eps_warmup_epochs=3)
    trainer = fit(net, max_epochs=1, limit_train_batches=1, default_root_dir=tmp_path)
    path = tmp_path / "adv.ckpt"
    trainer.save_checkpoint(path)
    hparams = torch.load(path, weights_only=False)["hyper_parameters"]
    assert hparams["attack"] == dataclasses.asdict(spec)
    # weights_only=False for the backbone function this test passes in Python (the CLI stores
    # its config instead); the attack itself is stored as a plain dict
    loaded = AdversarialClassifier.load_from_checkpoint(path, weights_only=False)
    assert (loaded.attack, loaded.perturbed_fraction, loaded.eps_warmup_epochs) == (spec, 0.25, 3)
