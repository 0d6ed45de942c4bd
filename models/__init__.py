"""slimfx reference model zoo: seeded models, bundled datasets, a quick trainer and a trained-weight cache.

Depends only on torch, numpy, scikit-learn, mlxtend and tqdm, never on other slimfx packages.
"""

from .data import Dataset, dataset_names, load_dataset
from .trainer import accuracy, cache_dir, train
from .zoo import UnknownModelError, ZooModel, get, names, register

__all__ = [
    "Dataset",
    "UnknownModelError",
    "ZooModel",
    "accuracy",
    "cache_dir",
    "dataset_names",
    "get",
    "load_dataset",
    "names",
    "register",
    "train",
]
