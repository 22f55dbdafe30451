"""``lightning-rigl`` with torchvision's CIFAR checksums off (``fake_datasets.allow_fake_cifar``), for tests that run
the command in processes of their own on a CIFAR folder they wrote: Lightning's DDP starts the other processes with
this script's command line, so each of them reads the folder too."""

import pytest
from fake_datasets import allow_fake_cifar

from lightning_rigl.cli import main

if __name__ == "__main__":
    with pytest.MonkeyPatch.context() as patch:
        allow_fake_cifar(patch)
        main()
