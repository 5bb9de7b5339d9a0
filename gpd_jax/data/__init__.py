"""TensorFlow-free data for gpd_jax: TFDS ArrayRecord sources + grain pipelines.

Public API::

    load_source(name, split, *, data_dir=None, source_dir=None)      # random-access source
    synthetic_source(num_examples, image_shape, num_classes, seed=0)  # same record format
    dataset_info(name, *, image_shape=None, num_classes=None)        # num_classes, image_shape, ...
    create_train_iterator(config, *, process_index=0, process_count=1)   # infinite, resumable
    create_eval_iterator(config, split, *, process_index=0, process_count=1)  # padded + mask
    steps_per_epoch(config), num_examples(config, split=None), eval_steps(config, split)
    train_subset_indices(config)      # the reduced-data subset (config.dataset.train_fraction) or None
    DatasetNotReadyError                                               # ValueError subclass

See :mod:`gpd_jax.data.pipeline` for the config fields read and the batch format.
"""
from gpd_jax.data.fashion_mnist_idx import FashionMnistIdx
from gpd_jax.data.pipeline import create_eval_iterator
from gpd_jax.data.pipeline import create_train_iterator
from gpd_jax.data.pipeline import eval_dataset
from gpd_jax.data.pipeline import eval_steps
from gpd_jax.data.pipeline import get_dataset_info
from gpd_jax.data.pipeline import num_examples
from gpd_jax.data.pipeline import steps_per_epoch
from gpd_jax.data.pipeline import train_dataset
from gpd_jax.data.pipeline import train_subset_indices
from gpd_jax.data.sources import DatasetInfo
from gpd_jax.data.sources import DatasetNotReadyError
from gpd_jax.data.sources import SUPPORTED_NAMES
from gpd_jax.data.sources import SyntheticSource
from gpd_jax.data.sources import dataset_info
from gpd_jax.data.sources import load_source
from gpd_jax.data.sources import synthetic_source

__all__ = [
    "DatasetInfo", "DatasetNotReadyError", "FashionMnistIdx", "SUPPORTED_NAMES",
    "SyntheticSource", "create_eval_iterator", "create_train_iterator", "dataset_info",
    "eval_dataset", "eval_steps", "get_dataset_info", "load_source", "num_examples",
    "steps_per_epoch", "synthetic_source", "train_dataset", "train_subset_indices",
]
