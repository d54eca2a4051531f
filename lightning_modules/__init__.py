"""LightningModules (standard, adversarial, noise-augmented training) and their shared backbones."""

from lightning_modules.adversarial import AdversarialClassifier
from lightning_modules.backbones import CifarResNet18, LeNet, Normalize, SmallCNN
from lightning_modules.noise import NoiseAugmentedClassifier
from lightning_modules.standard import StandardClassifier

__all__ = [
    "AdversarialClassifier",
    "CifarResNet18",
    "LeNet",
    "NoiseAugmentedClassifier",
    "Normalize",
    "SmallCNN",
    "StandardClassifier",
]
