import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer

import lightning_modules.adversarial as adversarial
from lightning_modules import AdversarialClassifier, SmallCNN
from robust.attacks import AttackSpec, attack
from robust.checks import SettingError
from robust.sharding import image_seed
from robust.trades import kl_divergence
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
                "generator": generator,
                "x_adv": x_adv.clone(),
                "spec": spec,
                "autocast": torch.is_autocast_enabled("cpu"),
                "param_grads": grads,
            }
        )
        return x_adv


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "half", True])
def test_perturbed_fraction_outside_0_1_is_rejected(value):
    with pytest.raises(
        SettingError, match=r"AdversarialClassifier perturbed_fraction must be a number in \[0, 1\]"
    ):
        AdversarialClassifier(perturbed_fraction=value)


TRADES = {"method": "trades", "attack": AttackSpec("pgd", "inf", 0.3, steps=10)}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps_warmup_epochs": -1}, "eps_warmup_epochs must be an integer >= 0"),
        ({"eps_warmup_epochs": 1.5}, "eps_warmup_epochs must be an integer >= 0"),
        ({"attack": AttackSpec(targeted=True)}, "targeted"),
        ({"attack": "fgm"}, "attack must be an AttackSpec"),
        ({"attack": {"method": "cw"}}, "method"),
        ({"method": "madry"}, "method must be one of 'at', 'trades'; got 'madry'"),
        ({**TRADES, "beta": -1.0}, "beta must be a number >= 0; got -1.0"),
        ({"beta": 6.0}, "beta must be unset"),
        ({**TRADES, "perturbed_fraction": 0.5}, "perturbed_fraction must be 1"),
        (
            {**TRADES, "attack": AttackSpec("pgd", "inf", 0.3, random_start=True)},
            "random_start must be unset",
        ),
        ({**TRADES, "grad_align_weight": 0.2}, "grad_align_weight must be 0 for method 'trades'"),
        (
            {**TRADES, "attack": AttackSpec("autoattack", "inf", 0.3)},
            "attack.method must be one of pgd, fgm for method 'trades'",
        ),
        (
            {**TRADES, "attack": AttackSpec("square", "inf", 0.3)},
            "attack.method must be one of pgd, fgm for method 'trades'",
        ),
        ({"grad_align_weight": -0.1}, "grad_align_weight must be a number >= 0"),
        ({"robust_val_images": -1}, "robust_val_images must be an integer >= 0"),
        ({"robust_val_attack": AttackSpec(targeted=True)}, "robust_val_attack.targeted"),
        ({"robust_val_seed": -1}, "robust_val_seed must be an integer >= 0"),
        ({"robust_val_batch_size": 0}, "robust_val_batch_size must be an integer >= 1"),
        ({"robust_val_collapse": 1.5}, r"robust_val_collapse must be a number in \[0, 1\]"),
        ({"stop_on_collapse": "yes"}, "stop_on_collapse must be true or false"),
    ],
)
def test_other_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdversarialClassifier(**kwargs)


def test_defaults_are_the_seed_attack_and_a_mapping_is_accepted():
    net = AdversarialClassifier()
    assert net.attack == AttackSpec("fgm", "2", 5.0)
    assert net.attack.key == "fgm_l2_eps5"
    assert (net.method, net.perturbed_fraction, net.grad_align_weight) == ("at", 0.5, 0.0)
    assert net.robust_val_images == 0  # robust validation is off unless asked for
    # the default robust validation attack: PGD-10 at the training attack's norm and full eps
    assert net.robust_val_attack == AttackSpec("pgd", "2", 5.0, steps=10)
    trades = AdversarialClassifier(**TRADES)
    assert (trades.beta, trades.perturbed_fraction) == (6.0, 1.0)
    assert trades.robust_val_attack.key == "pgd10_linf_eps0.3"
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


def fit_start(module, max_epochs: int | None, fast_dev_run: bool = False, rank: int = 0):
    """Run ``module.on_fit_start`` under a stand-in trainer of the given length."""
    module.trainer = SimpleNamespace(
        max_epochs=max_epochs, fast_dev_run=fast_dev_run, global_rank=rank
    )
    module.on_fit_start()


@pytest.mark.parametrize("warmup", [1, 2, 4])
def test_a_run_that_ends_before_the_full_eps_is_refused_at_fit_start(warmup):
    spec = AttackSpec("pgd", "inf", 0.3, steps=7)
    net = AdversarialClassifier(attack=spec, eps_warmup_epochs=warmup)
    for max_epochs in range(1, 8):
        # the oracle is the schedule itself: some epoch of the run trains at the full eps
        reaches = any(net.attack_at_epoch(e).eps == 0.3 for e in range(max_epochs))
        if reaches:
            fit_start(net, max_epochs)
            continue
        with pytest.raises(SettingError) as info:
            fit_start(net, max_epochs)
        assert str(info.value) == (
            f"model eps_warmup_epochs {warmup} leaves no epoch at full strength in "
            f"trainer.max_epochs {max_epochs}: it begins with epoch {warmup + 1} (counting from "
            f"1); set trainer.max_epochs >= {warmup + 1} or a shorter eps_warmup_epochs"
        )
        fit_start(net, max_epochs, fast_dev_run=True)  # a smoke run is not refused
    fit_start(net, -1)  # no epoch limit (max_steps ends the run)
    fit_start(
        AdversarialClassifier(attack=dataclasses.replace(spec, eps=0.0), eps_warmup_epochs=4), 1
    )


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


@pytest.mark.parametrize("method", ["at", "trades"])
def test_a_warm_up_epoch_at_eps_zero_logs_no_adversarial_accuracy(method):
    # it logged the clean accuracy of the images it did not attack as train/adv_acc
    class EpochKeys(Callback):
        def __init__(self) -> None:
            self.keys: list[set[str]] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.keys.append(set(trainer.callback_metrics))

    seen = EpochKeys()
    trades = {"method": "trades", "beta": 6.0} if method == "trades" else {}
    net = model(attack=L2, perturbed_fraction=1.0, eps_warmup_epochs=1, **trades)
    fit(net, max_epochs=2, limit_train_batches=1, callbacks=[seen])
    assert "train/adv_acc" not in seen.keys[0] and "train/clean_acc" in seen.keys[0]
    assert "train/adv_acc" in seen.keys[1]


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
    trainer = fit(net, max_epochs=4, limit_train_batches=1, default_root_dir=tmp_path)
    path = tmp_path / "adv.ckpt"
    trainer.save_checkpoint(path)
    hparams = torch.load(path, weights_only=False)["hyper_parameters"]
    assert hparams["attack"] == dataclasses.asdict(spec)
    # weights_only=False for the backbone function this test passes in Python (the CLI stores
    # its config instead); the attack itself is stored as a plain dict
    loaded = AdversarialClassifier.load_from_checkpoint(path, weights_only=False)
    assert (loaded.attack, loaded.perturbed_fraction, loaded.eps_warmup_epochs) == (spec, 0.25, 3)


# TRADES ------------------------------------------------------------------------------------------


class TradesSpy:
    """Wraps robust.trades.trades_perturb in the module under test and records its calls."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.real = adversarial.trades_perturb
        monkeypatch.setattr(adversarial, "trades_perturb", self)

    def __call__(self, net, x, **kwargs):
        x_adv = self.real(net, x, **kwargs)
        self.calls.append({"x": x.clone(), "x_adv": x_adv.clone(), **kwargs})
        return x_adv


@pytest.mark.filterwarnings(NO_TRAINER)
@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_trades_loss_is_ce_plus_beta_kl_of_the_inner_maximum(beta, monkeypatch):
    spy = TradesSpy(monkeypatch)
    spec = AttackSpec("pgd", "inf", 0.05, steps=3, step_size=0.02)
    net = model(method="trades", attack=spec, beta=beta).train()
    x, y = interior_batch(8)
    loss, logits, targets = net.training_loss(x, y)
    (call,) = spy.calls
    assert torch.equal(call["x"], x)  # the whole batch, clean
    assert (call["eps"], call["norm"], call["steps"], call["step_size"]) == (0.05, "inf", 3, 0.02)
    assert (call["x_adv"] - x).abs().max() <= 0.05 + 1e-7
    assert torch.equal(targets, y)
    torch.testing.assert_close(logits, net(x))  # train/acc is measured on the clean images
    ce = F.cross_entropy(net(x), y)
    kl = kl_divergence(net(x), net(call["x_adv"])).mean()
    assert kl.item() > 1e-4  # the KL term is not trivially 0
    if beta == 0:
        assert loss.item() == pytest.approx(ce.item(), rel=1e-6)
    else:
        assert loss.item() == pytest.approx((ce + beta * kl).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


# GradAlign ---------------------------------------------------------------------------------------


def binary_linear(in_channels: int, num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * 28 * 28, 2))


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_grad_align_is_zero_for_a_binary_linear_model_and_positive_for_a_cnn(norm):
    x, y = interior_batch(8)
    eps = 0.3 if norm == "inf" else 3.0
    torch.manual_seed(0)
    linear = AdversarialClassifier(backbone=binary_linear, num_classes=2)
    # the input gradient of a two-class linear model is (p_1 - 1[y = 1]) (w_1 - w_0): its
    # direction is the same everywhere, so the cosine is 1
    zero = adversarial.grad_align_penalty(linear, x, y % 2, eps, norm)
    assert abs(zero.item()) < 1e-6
    cnn = model()
    penalty = adversarial.grad_align_penalty(cnn, x, y, eps, norm)
    assert 0.01 < penalty.item() <= 2
    penalty.backward()  # double backprop reaches the weights
    assert sum(p.grad.abs().sum() for p in cnn.parameters() if p.grad is not None) > 0


@pytest.mark.filterwarnings(NO_TRAINER)
@pytest.mark.parametrize("method", ["at", "trades"])
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_the_training_loss_of_a_bf16_model_is_float32(method, eps):
    """bf16 logits, a float32 loss of float32 terms (eps 0: TRADES's warm-up, KL = 0)."""
    spec = AttackSpec("pgd", "inf", eps, steps=2)
    extra = {"beta": 6.0} if method == "trades" else {}
    net = model(method=method, attack=spec, perturbed_fraction=1.0, **extra).bfloat16()
    x, y = interior_batch(8)
    torch.manual_seed(0)
    loss, logits, _ = net.training_loss(x.bfloat16(), y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    if eps == 0:  # the clean cross-entropy, of the logits widened exactly
        assert loss.item() == pytest.approx(F.cross_entropy(logits.double(), y).item(), rel=1e-6)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_grad_align_is_the_papers_expectation_at_its_draw_of_eta(norm, monkeypatch):
    """1 - cos of the input gradients at x and x + eta (unclipped, as the authors' code)."""
    x, y = interior_batch(8)
    x[:, :, :14] = 0.0  # background pixels: x + eta leaves [0, 1] there
    eps = 0.3 if norm == "inf" else 3.0
    draws = []
    real = adversarial._uniform_ball
    monkeypatch.setattr(
        adversarial, "_uniform_ball", lambda *args: draws.append(real(*args)) or draws[-1]
    )
    cnn = model()
    penalty = adversarial.grad_align_penalty(cnn, x, y, eps, norm)
    (eta,) = draws
    cnn.eval()

    def input_gradient(points):  # the authors' get_input_grad: mean cross-entropy
        points = points.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(cnn(points), y), points)[0].flatten(1)

    g1, g2 = input_gradient(x), input_gradient(x + eta)
    expected = (1 - F.cosine_similarity(g1, g2, dim=1)).mean()
    clipped = input_gradient((x + eta).clamp(0, 1))
    wrong = (1 - F.cosine_similarity(g1, clipped, dim=1)).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    assert wrong.item() != pytest.approx(expected.item(), rel=1e-3)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_grad_align_eta_is_uniform_in_the_eps_ball(norm):
    from scipy import stats

    eps, x = 0.3, torch.zeros(4000, 1, 2, 2)  # 4 dimensions: the radius law is visible
    eta = adversarial._uniform_ball(x, eps, norm, torch.Generator().manual_seed(3))
    flat = eta.flatten(1).double()
    if norm == "inf":  # each coordinate uniform on [-eps, eps]
        assert flat.abs().max() <= eps
        assert stats.kstest(flat.flatten().numpy(), "uniform", args=(-eps, 2 * eps)).pvalue > 1e-3
    else:  # P(|eta| <= r) = (r / eps)^4, the direction uniform
        radius = torch.linalg.vector_norm(flat, dim=1)
        assert radius.max() <= eps * (1 + 1e-6)
        assert stats.kstest(((radius / eps) ** 4).numpy(), "uniform").pvalue > 1e-3
        mean_direction = (flat / radius[:, None]).mean(0)
        assert mean_direction.abs().max() < 4 / len(flat) ** 0.5


@pytest.mark.filterwarnings(NO_TRAINER)
def test_training_loss_adds_the_weighted_grad_align_term():
    spec = AttackSpec("fgm", "inf", 0.1)  # no random start: the penalty's eta is the first draw
    net = model(attack=spec, perturbed_fraction=1.0, grad_align_weight=0.5).train()
    x, y = interior_batch(8)
    torch.manual_seed(7)
    loss, *_ = net.training_loss(x, y)
    x_adv = attack(net, x, y, spec)
    torch.manual_seed(7)
    penalty = adversarial.grad_align_penalty(net, x, y, 0.1, "inf")
    ce = F.cross_entropy(net(x_adv), y)
    assert penalty.item() > 0.01
    assert loss.item() == pytest.approx((ce + 0.5 * penalty).item(), rel=1e-5)


# Robust validation -------------------------------------------------------------------------------


def tiny(in_channels: int, num_classes: int) -> torch.nn.Module:
    """A small nonlinear network: cheap attacks for the robust-validation tests."""
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(in_channels * 28 * 28, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, num_classes),
    )


def tiny_model(**kwargs) -> AdversarialClassifier:
    torch.manual_seed(0)
    return AdversarialClassifier(backbone=tiny, **kwargs)


def labelled_batch(n: int = 24):
    """The model's own predictions as labels, every 5th one wrong: clean and robust in (0, 1)."""
    x, _ = interior_batch(n)
    with torch.no_grad():
        y = tiny_model().eval()(x).argmax(dim=1)
    y[::5] = (y[::5] + 1) % 10
    return x, y


EPS_HALF = 0.003  # about half the correctly classified images keep their label under PGD-3


def robust_per_image(net, x, y, spec, seed=0):
    """1 where image i is right both clean and under the attack from its own seeded start."""
    flags = []
    for i in range(len(x)):
        g = torch.Generator().manual_seed(image_seed(seed, spec.key, i))
        x_adv = attack(net, x[i : i + 1], y[i : i + 1], spec, generator=[g])
        with torch.no_grad():
            clean = net(x[i : i + 1]).argmax(1).item()
            adv = net(x_adv).argmax(1).item()
        flags.append(float(clean == adv == y[i].item()))
    return torch.tensor(flags, dtype=torch.float64)


def validate(net, x, y, **kwargs):
    trainer = Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        **kwargs,
    )
    trainer.validate(net, datamodule=TensorData(x, y, batch_size=8), verbose=False)
    return float(trainer.callback_metrics["val/robust_acc"])


def test_robust_validation_accuracy_is_exact_and_deterministic(monkeypatch):
    x, y = labelled_batch(24)
    spec = AttackSpec("pgd", "inf", EPS_HALF, steps=3)
    net = tiny_model(
        attack=AttackSpec("fgm", "inf", 0.3), robust_val_attack=spec, robust_val_images=19
    )
    got = validate(net, x, y)
    robust = robust_per_image(net.eval(), x, y, spec)
    expected = robust[:19].mean().item()
    assert 0.2 < expected < 0.8  # neither every image nor none: the count matters
    assert got == pytest.approx(expected, abs=1e-6)  # logged as float32; one image is 1/19
    # another robust-validation batch size, another run: the same number, and each image's
    # random start seeded by its dataset index (not by its place in a batch)
    spy = Spy(monkeypatch)
    other = tiny_model(robust_val_attack=spec, robust_val_images=19, robust_val_batch_size=5)
    assert validate(other, x, y) == pytest.approx(got, abs=1e-6)
    assert [len(c["x"]) for c in spy.calls] == [5, 5, 5, 4]
    assert torch.equal(torch.cat([c["x"] for c in spy.calls]), x[:19])
    seeds = [g.initial_seed() for c in spy.calls for g in c["generator"]]
    assert seeds == [image_seed(0, spec.key, i) for i in range(19)]
    # limit_val_batches limits the images (2 loader batches of 8), and never more than the set
    limited = tiny_model(robust_val_attack=spec, robust_val_images=1000)
    assert validate(limited, x, y, limit_val_batches=2) == pytest.approx(
        robust[:16].mean().item(), abs=1e-6
    )
    # a fraction: Lightning runs int(3 * 0.5) = 1 of the 3 batches, so the first 8 images (it
    # used to be int(24 * 0.5) = 12, images the validation loop never evaluated)
    assert robust[:8].mean() != robust[:12].mean()
    limited = tiny_model(robust_val_attack=spec, robust_val_images=1000)
    assert validate(limited, x, y, limit_val_batches=0.5) == pytest.approx(
        robust[:8].mean().item(), abs=1e-6
    )


def test_robust_validation_runs_each_epoch_and_warns_and_stops_on_collapse(monkeypatch):
    scripted = iter([0.50, 0.80, 0.55, 0.30, 0.90])
    monkeypatch.setattr(
        AdversarialClassifier, "robust_validation_accuracy", lambda self: next(scripted)
    )
    x, y = interior_batch(24)
    net = tiny_model(
        attack=AttackSpec("fgm", "inf", 0.1, random_start=True),
        robust_val_images=8,
        robust_val_collapse=0.3,
        stop_on_collapse=True,
    )
    trainer = Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        max_epochs=5,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=1,  # the sanity check does not count
    )
    with pytest.warns(adversarial.RobustOverfittingWarning) as record:
        trainer.fit(net, datamodule=TensorData(x, y, batch_size=8))
    (warning,) = [w for w in record if w.category is adversarial.RobustOverfittingWarning]
    text = str(warning.message)
    assert "fell to 0.3000 in epoch 3 from its best 0.8000 in epoch 1" in text
    assert "catastrophic overfitting" in text  # one-step training
    assert trainer.current_epoch == 4  # stopped after epoch 3 (0-based), before the fifth
    assert float(trainer.callback_metrics["val/robust_acc"]) == pytest.approx(0.30)
    assert net.robust_val_best == (0.80, 1)


def test_trades_config_fits_with_robust_validation_and_loads_with_weights_only(in_tmp, monkeypatch):
    import sys

    import cli

    monkeypatch.setattr(sys, "argv", ["cli.py"])
    config = str(cli.Path(__file__).resolve().parents[1] / "configs/mnist/trades.yaml")
    run = cli.main(
        [
            "fit",
            "--config",
            config,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.batch_size=16",
            "--model.init_args.eps_warmup_epochs=0",
            "--model.init_args.attack.steps=2",
        ]
    )
    assert (run.model.method, run.model.beta, run.model.attack.resolved_steps) == ("trades", 6.0, 2)
    metrics = run.trainer.callback_metrics
    assert float(metrics["train/kl"]) > 0  # the TRADES term really ran
    assert 0 <= float(metrics["val/robust_acc"]) <= 1
    best = run.trainer.checkpoint_callback.best_model_path
    assert run.trainer.checkpoint_callback.monitor == "val/robust_acc"
    assert "best-epoch00" in best
    checkpoint = torch.load(best, weights_only=True)  # plain values only
    assert checkpoint["hyper_parameters"]["attack"] == dataclasses.asdict(run.model.attack)
    loaded = AdversarialClassifier.load_from_checkpoint(best)
    assert (loaded.method, loaded.beta, loaded.attack) == ("trades", 6.0, run.model.attack)
    assert loaded.robust_val_best == run.model.robust_val_best is not None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"robust_val_attack": AttackSpec("pgd", "inf", 0.3, steps=5)},
        {"robust_val_seed": 3},
        {"robust_val_batch_size": 64},
        {"robust_val_collapse": 0.5},
        {"stop_on_collapse": True},
    ],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_robust_validation_settings_without_robust_val_images_are_refused(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(
        SettingError,
        match=rf"AdversarialClassifier {name} applies only with robust_val_images > 0 .*"
        "with robust_val_images=0",
    ):
        tiny_model(**kwargs)
    tiny_model(robust_val_images=8, **kwargs)  # enabled: accepted


@pytest.mark.parametrize("setting", ["attack", "robust_val_attack"])
def test_more_target_classes_than_the_model_has_are_refused(setting):
    spec = AttackSpec("apgd-t", "inf", 0.3, steps=5, n_target_classes=50)
    with pytest.raises(
        SettingError,
        match=rf"AdversarialClassifier {setting} n_target_classes must be an integer in \[1, 9\]",
    ):
        tiny_model(robust_val_images=8, **{setting: spec})
