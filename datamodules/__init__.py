"""Data modules yielding float images in [0, 1] and integer labels."""

from datamodules.base import DataNotFoundError, ImageDataModule, stratified_split
from datamodules.embedded_mnist import EmbeddedMNISTDataModule, load_embedded_mnist
from datamodules.torchvision_data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    IDXDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "DataNotFoundError",
    "EmbeddedMNISTDataModule",
    "FashionMNISTDataModule",
    "IDXDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "TorchvisionDataModule",
    "load_embedded_mnist",
    "stratified_split",
]
