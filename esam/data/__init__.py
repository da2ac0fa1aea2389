"""Dataset builders: ``build_data(name, ...)`` -> :class:`DataBundle` of train/test loaders.

Loaders yield (images, labels) already on the training device and normalised;
``loader.batches(epoch, start)`` resumes at any batch, ``len(loader)`` counts batches.
Importing a builder module registers its datasets in ``DATASETS`` (esam/data/registry.py).
"""
from esam.data import cifar  # noqa: F401  (registers cifar10, cifar100)
from esam.data import digits  # noqa: F401  (registers digits)
from esam.data import imagenet  # noqa: F401  (registers imagenet)
from esam.data import mnist1d  # noqa: F401  (registers mnist1d)
from esam.data import synthetic  # noqa: F401  (registers synthetic)
from esam.data.bundle import (LOADER_KEYS, DataBundle, carve_validation, check_batch_sizes, loader_kwargs,
                              tensor_bundle)
from esam.data.registry import DATASETS, DatasetBuilder, build_data, register_dataset
from esam.data.tensor_loader import Augment, TensorLoader

__all__ = ["DATASETS", "DataBundle", "DatasetBuilder", "LOADER_KEYS", "Augment", "TensorLoader", "build_data",
           "carve_validation", "check_batch_sizes", "loader_kwargs", "register_dataset", "tensor_bundle"]
