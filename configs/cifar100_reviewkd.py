"""ReviewKD on CIFAR-100, resnet32x4 → resnet8x4 (mdistiller: CE 1 + 5 · HCL, warm-up 20 epochs,
post-ReLU student levels, ABF width min(512, 256) = 256).
Expected (mdistiller README): 75.63 %.

    python launch/train.py --config=configs/cifar100_ce.py:resnet32x4 --workdir=W/teacher
    python launch/train.py --config=configs/cifar100_reviewkd.py --workdir=W

The validation split is the last 5k of train; the test split is evaluated once at the end.
``:runlocal`` runs 2 epochs on 1,024 images (CIFAR-100 must be prepared; tests use tfds mock data).
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.cifar100_config(arg, method="reviewkd",
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
