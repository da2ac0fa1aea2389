"""Name -> builder registry of the datasets: ``build_data('cifar10', batch_size=128, ...)``."""
from __future__ import annotations

from typing import Any, Callable

from esam.data.bundle import DataBundle
from esam.registry import Registry

DatasetBuilder = Callable[..., DataBundle]
DATASETS: Registry = Registry("dataset")


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Decorator adding a builder ``fn(**dataset config fields) -> DataBundle`` under ``name``."""
    def add(fn: DatasetBuilder) -> DatasetBuilder:
        return DATASETS.add(name, fn)

    return add


def build_data(name: str, **kwargs: Any) -> DataBundle:
    """Build a dataset by name; kwargs are the dataset config's fields (see esam.config)."""
    return DATASETS.lookup(name)(**kwargs)
