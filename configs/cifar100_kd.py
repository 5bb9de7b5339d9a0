"""KD on CIFAR-100, resnet32x4 → resnet8x4 (mdistiller: τ 4, CE 0.1, KD 0.9).
Expected: 73.33 % (docs/kd_methods.md §8.1).

    python launch/train.py --config=configs/cifar100_ce.py:resnet32x4 --workdir=W/teacher
    python launch/train.py --config=configs/cifar100_kd.py --workdir=W

The validation split is the last 5k of train; the test split is evaluated once at the end.
``:runlocal`` runs 2 epochs on 1,024 images (CIFAR-100 must be prepared; tests use tfds mock data).
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.cifar100_config(arg, method='kd', config_dir=os.path.dirname(os.path.abspath(__file__)))
