"""LightningDataModules for the paper's datasets: Fashion-MNIST (the offline default), CIFAR-10/100, ImageNet; and
text for language models (by default the Python standard library's source)."""

from lightning_rigl.data.augment import ExampleKey, Transformed
from lightning_rigl.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_rigl.data.fashion_mnist import FashionMNISTDataModule
from lightning_rigl.data.imagenet import ImageNetDataModule
from lightning_rigl.data.text import TextDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "ExampleKey", "FashionMNISTDataModule", "ImageNetDataModule",
           "TextDataModule", "Transformed"]
