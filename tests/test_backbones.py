import pytest
import torch
from torch import nn

from lightning_modules import CifarResNet18, LeNet, Normalize, SmallCNN, StandardClassifier


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_lenet_has_published_parameter_count():
    assert n_params(LeNet(1, 10)) == 431_080


@pytest.mark.parametrize(
    ("backbone", "shape"),
    [
        (SmallCNN, (1, 28, 28)),
        (LeNet, (1, 28, 28)),
        (CifarResNet18, (3, 32, 32)),
        (SmallCNN, (3, 32, 32)),
    ],
)
def test_backbones_give_logits(backbone, shape):
    out = backbone(shape[0], 7)(torch.rand(2, *shape))
    assert out.shape == (2, 7)


def test_normalization_is_the_first_layer_of_the_model():
    model = StandardClassifier(LeNet, mean=(0.5,), std=(0.25,))
    assert isinstance(model.model[0], Normalize)
    x = torch.rand(3, 1, 28, 28)
    # the model takes pixels: its output equals the backbone applied to normalized pixels
    expected = model.model[1]((x - 0.5) / 0.25)
    torch.testing.assert_close(model.eval()(x), expected)
    # and normalization is part of the saved weights, so a checkpoint carries it
    assert "model.0.mean" in model.state_dict()
    assert "model.0.std" in model.state_dict()


def test_normalize_rejects_non_positive_std():
    with pytest.raises(ValueError, match="std"):
        Normalize((0.0,), (0.0,))


def test_backbone_that_cannot_take_the_image_size_fails_at_construction():
    with pytest.raises(ValueError, match=r"backbone LeNet cannot take images of shape 3x32x32"):
        StandardClassifier(LeNet, in_channels=3, image_size=(32, 32))


def test_building_the_module_keeps_a_backbones_own_frozen_submodule_modes():
    class FrozenNorm(nn.Sequential):
        def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
            super().__init__(nn.Flatten(), nn.BatchNorm1d(784), nn.Linear(784, num_classes))
            self[1].eval()  # frozen statistics, as a fine-tuning backbone keeps them

    model = StandardClassifier(FrozenNorm)
    assert model.training and not model.model[1][1].training


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("module_class", "kwargs"),
    [
        ("StandardClassifier", {}),
        ("AdversarialClassifier", {"method": "trades", "beta": 6.0}),
        ("NoiseAugmentedClassifier", {"sigma": 0.5, "num_noise_samples": 2}),
    ],
)
def test_a_module_built_in_python_reloads_with_a_safe_load(module_class, kwargs, tmp_path):
    """Its backbone class and optimizer function were pickled references, which torch.load's
    default weights_only=True refuses; they are saved as the CLI saves them (import paths)."""
    from lightning.pytorch import Trainer

    import lightning_modules

    cls = getattr(lightning_modules, module_class)
    torch.manual_seed(0)
    module = cls(backbone=LeNet, **kwargs)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, loader)
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    loaded = torch.load(tmp_path / "python.ckpt", weights_only=True)  # no pickled code inside
    assert (
        loaded["hyper_parameters"]["backbone"]["class_path"] == "lightning_modules.backbones.LeNet"
    )
    reloaded = cls.load_from_checkpoint(tmp_path / "python.ckpt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), module.eval()(x))
    assert {k: getattr(reloaded, k, None) for k in kwargs} == kwargs
    assert isinstance(reloaded.configure_optimizers(), torch.optim.Adam)
    # saved again from the reloaded module (built from jsonargparse's factories): as safe
    trainer.fit(reloaded, loader)
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    again = cls.load_from_checkpoint(tmp_path / "again.ckpt", weights_only=True)
    assert type(again.model[1]) is LeNet


class Activated(StandardClassifier):
    """A user's module with another class-valued setting: its rebuilding depends on its type."""

    def __init__(self, activation: type[nn.Module] = nn.ReLU, **kwargs) -> None:
        super().__init__(**kwargs)
        self.activation = activation


def test_modules_whose_settings_have_no_import_path_are_saved_as_before(tmp_path):
    """A lambda, a class defined in a function, another class-valued setting: left as given
    (pickled; they reload with weights_only=False, as before)."""

    def local():
        class Local(StandardClassifier):
            pass

        return Local

    for module in (
        StandardClassifier(backbone=lambda c, k: LeNet(c, k)),
        local()(backbone=LeNet),
        Activated(activation=nn.GELU, backbone=LeNet),
    ):
        assert "_instantiator" not in module.hparams and "_class_path" not in module.hparams
        assert not isinstance(module.hparams["backbone"], dict)
    checkpoint = tmp_path / "activated.ckpt"
    module = Activated(activation=nn.GELU, backbone=LeNet)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6"}, checkpoint)  # fmt: skip
    reloaded = Activated.load_from_checkpoint(checkpoint, weights_only=False)
    assert reloaded.activation is nn.GELU and type(reloaded.model[1]) is LeNet
