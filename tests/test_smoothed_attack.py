"""SmoothedAttack: the smoothed classifier under SmoothAdv's attack, judged by PREDICT.

Oracles: for a linear classifier f(x) = argmax(w.x + b, 0) the smoothed classifier g is the same
linear classifier, its exact robust radius at x is the distance |w.x + b| / ||w|| to the boundary,
and the best L2 attack moves along -w. So an image farther from the boundary than r must survive
the attack at r and one nearer must fall. And on a trained network, no image certified at radius
>= r may be classified as another class after the attack at r (a certificate beaten by an attack
is a bug), hence certified accuracy <= 1 - misclassified; and on that model also <= the
abstention-as-wrong robust accuracy (which in general an abstention at a near-tie can undercut).
"""

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

from callbacks import Certification
from callbacks.smoothed_attack import SmoothedAttack
from datamodules import load_embedded_mnist
from lightning_modules import NoiseAugmentedClassifier
from lightning_modules.backbones import LeNet
from robust.checks import SettingError
from tests.tensor_data import TensorData

SIGMA = 0.25


class Linear(LightningModule):
    """Two classes: logits (0, w.x + b) on 1x4x4 images."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
        with torch.no_grad():
            self.model[1].weight.copy_(w.view(1, 16))
            self.model[1].bias.fill_(b)
        self.model = nn.Sequential(self.model, _TwoLogits())
        self.num_classes = 2
        self.sigma = SIGMA

    def forward(self, x):
        return self.model(x)

    def test_step(self, batch, batch_idx):
        pass


class _TwoLogits(nn.Module):
    def forward(self, z):
        return torch.cat([torch.zeros_like(z), z], dim=1)


def quiet_trainer(**kwargs) -> Trainer:
    settings = dict(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu"
    )
    return Trainer(**settings | kwargs, enable_model_summary=False)


def test_linear_classifier_falls_exactly_where_the_boundary_is():
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=generator)
    w = w / w.norm()
    # images at known signed distances from the boundary w.x + b = 0 along w
    distances = torch.tensor([0.1, 0.3, 0.45, 0.7, 0.9, 1.3, -0.2, -0.6, -0.95, -1.4])
    centre = torch.full((16,), 0.5)
    x = (centre + distances[:, None] * w).clamp(0, 1).view(-1, 1, 4, 4)
    b = -float(w @ centre)
    distances = (x.flatten(1) @ w) + b  # after clipping
    y = (distances > 0).long()
    radii = [0.25, 0.5, 1.0]
    callback = SmoothedAttack(
        radii=radii, steps=10, num_noise_samples=32, n=2000, alpha=0.001, batch_size=5
    )
    quiet_trainer(callbacks=[callback]).test(
        Linear(w, b), datamodule=TensorData(x, y), verbose=False
    )
    rows = callback.rows
    assert (rows[:, 2] == rows[:, 1]).all()  # PREDICT right on every clean image
    for j, r in enumerate(radii):
        predicted = rows[:, 3 + j]
        far = distances.abs() > r + 0.1  # PREDICT's margin: it may abstain close to the boundary
        near = distances.abs() < r - 0.05
        assert (predicted[far] == rows[far, 1]).all(), (r, distances[far], predicted[far])
        assert (predicted[near] != rows[near, 1]).all(), (r, distances[near], predicted[near])
        assert near.any() and far.any()


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_models_in_another_dtype_are_attacked(precision):
    # the dataset's float32 images are cast to the model's dtype, as PREDICT casts its noise
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=generator)
    w = w / w.norm()
    centre = torch.full((16,), 0.5)
    distances = torch.tensor([1.2, -1.2, 0.1, -0.1])
    x = (centre + distances[:, None] * w).clamp(0, 1).view(-1, 1, 4, 4)
    b = -float(w @ centre)
    distances = (x.flatten(1) @ w) + b
    y = (distances > 0).long()
    callback = SmoothedAttack(radii=[0.5], steps=10, num_noise_samples=32, n=2000, alpha=0.001)
    quiet_trainer(callbacks=[callback], precision=precision).test(
        Linear(w, b), datamodule=TensorData(x, y), verbose=False
    )
    rows = callback.rows
    far, near = distances.abs() > 0.6, distances.abs() < 0.4
    assert (rows[:, 2] == rows[:, 1])[far].all()
    assert (rows[far, 3] == rows[far, 1]).all()  # beyond 0.5 from the boundary: still right
    assert (rows[near, 3] != rows[near, 1]).all()  # within it: moved across


@pytest.fixture(scope="module")
def noise_model():
    """LeNet trained for 2 epochs on 1,000 shuffled embedded digits with noise sigma = 0.25."""
    torch.manual_seed(0)
    images, labels = load_embedded_mnist()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[perm], labels[perm]
    model = NoiseAugmentedClassifier(backbone=LeNet, sigma=SIGMA)
    data = TensorData(images[:1000], labels[:1000], batch_size=50)
    quiet_trainer(max_epochs=2, limit_val_batches=0).fit(model, datamodule=data)
    return model.eval(), images[4000:4024], labels[4000:4024]


def test_no_certificate_is_beaten_by_the_attack(noise_model, tmp_path):
    model, x, y = noise_model
    radii = [0.25, 0.5]
    certification = Certification(
        n0=50, n=2000, alpha=0.001, radii=[0.0, *radii], output=str(tmp_path / "c.tsv")
    )
    attack = SmoothedAttack(radii=radii, steps=10, num_noise_samples=16, n=2000, alpha=0.001)
    quiet_trainer(callbacks=[certification, attack]).test(
        model, datamodule=TensorData(x, y), verbose=False
    )
    rows = attack.rows
    for j, r in enumerate(radii):
        certified = [c.correct == 1 and c.radius >= r for c in certification.results]
        after = rows[:, 3 + j]
        assert sum(certified) >= 5, (r, certified)  # the check below is not vacuous
        for row, safe, predicted in zip(rows, certified, after, strict=True):
            if safe:  # g is constant on the ball: the attack may make PREDICT abstain, never flip
                assert predicted in (row[1], -1), (r, row)
        empirical = attack.results["test"][f"smoothed_robust_acc@{r:g}"]
        assert certification.summary[f"certified_acc@{r:g}"] <= empirical + 1e-12
        # what a certificate promises in general: no certified image is misclassified
        misclassified = attack.results["test"][f"smoothed_misclassified@{r:g}"]
        flipped = [p not in (row[1], -1) for row, p in zip(rows, after, strict=True)]
        assert misclassified == pytest.approx(sum(flipped) / len(flipped))
        assert certification.summary[f"certified_acc@{r:g}"] <= 1 - misclassified + 1e-12
    assert attack.results["test"]["smoothed_acc@0"] > 0.5  # a real model, not a trivial one
    assert (
        attack.results["test"]["smoothed_robust_acc@0.5"] < attack.results["test"]["smoothed_acc@0"]
    )


def test_results_do_not_depend_on_batch_size(noise_model):
    model, x, y = noise_model
    tables = []
    for batch_size in (5, 24):
        callback = SmoothedAttack(
            radii=[0.5], steps=3, num_noise_samples=8, n=200, batch_size=batch_size
        )
        quiet_trainer(callbacks=[callback]).test(
            model, datamodule=TensorData(x[:10], y[:10]), verbose=False
        )
        tables.append(callback.rows)
    assert torch.equal(tables[0], tables[1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigma": 0}, "sigma"),
        ({"radii": []}, "radii"),
        ({"radii": [0.0]}, "radii"),
        ({"radii": [0.25, 0.2500001]}, "radii holds 0.25 and 0.2500001, which name the same"),
        ({"steps": 0}, "steps"),
        ({"num_noise_samples": 0}, "num_noise_samples"),
        ({"n": 0}, "n "),
        ({"alpha": 1.0}, "alpha"),
    ],
)
def test_bad_settings_are_refused(kwargs, name):
    with pytest.raises(SettingError, match=f"SmoothedAttack {name}"):
        SmoothedAttack(**kwargs)


def test_too_many_samples_are_refused_at_construction_naming_the_owner():
    with pytest.raises(
        SettingError, match=r"SmoothedAttack n must be an integer in \[1, 1024000\]"
    ):
        SmoothedAttack(sigma=SIGMA, n=2_000_000)
    assert SmoothedAttack(sigma=SIGMA, n=2_000_000, noise_block=2000).n == 2_000_000
    with pytest.raises(SettingError, match="SmoothedAttack noise_block"):
        SmoothedAttack(sigma=SIGMA, noise_block=0)


class NoSigma(Linear):
    """The linear model without a sigma, recording the clean test loop's batches."""

    def __init__(self) -> None:
        super().__init__(torch.ones(16) / 4, -2.0)
        del self.sigma
        self.tested = 0

    def test_step(self, batch, batch_idx):
        self.tested += 1


def test_unset_sigma_is_refused_before_any_callback_or_the_clean_loop_works(monkeypatch):
    from callbacks import PerturbedAccuracy
    from robust.attacks import AttackSpec

    attacked = []
    monkeypatch.setattr(
        PerturbedAccuracy, "evaluate_batch", lambda self, *args: attacked.append(args)
    )
    first = PerturbedAccuracy([AttackSpec("fgm", "2", 0.5)])  # listed first: would run first
    module = NoSigma()
    x, y = torch.rand(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)
    with pytest.raises(
        SettingError, match=r"SmoothedAttack sigma is not set .*give SmoothedAttack"
    ):
        quiet_trainer(callbacks=[first, SmoothedAttack(radii=[0.5])]).test(
            module, datamodule=TensorData(x, y), verbose=False
        )
    assert module.tested == 0 and attacked == []
