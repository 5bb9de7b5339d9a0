"""Plain CE training on CIFAR-100 (the baseline; also how the teachers are trained).

The argument picks the model (default resnet8x4), e.g. ``:resnet32x4`` for the teacher.
Expected: resnet32x4 79.42 %, resnet8x4 72.50 % (docs/kd_methods.md §8.1).

    python launch/train.py --config=configs/cifar100_ce.py --workdir=W

The validation split is the last 5k of train; the test split is evaluated once at the end.
``:runlocal`` runs 2 epochs on 1,024 images (CIFAR-100 must be prepared; tests use tfds mock data).
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.cifar100_config(arg, method='ce', config_dir=os.path.dirname(os.path.abspath(__file__)))
