"""ReviewKD + GPD on CIFAR-100, resnet32x4 → resnet8x4: mdistiller's ReviewKD (CE 1 + 5 · HCL, warm-up 20
epochs, post-ReLU student levels) with GPD (r 2, OREPA branches, 3 × SCE, clip 5); the DT gets its own
ABF stack, as GPD's reference combines them.


    python launch/train.py --config=configs/cifar100_ce.py:resnet32x4 --workdir=W/teacher
    python launch/train.py --config=configs/cifar100_reviewkd_gpd.py --workdir=W

The validation split is the last 5k of train; the test split is evaluated once at the end.
``:runlocal`` runs 2 epochs on 1,024 images (CIFAR-100 must be prepared; tests use tfds mock data).
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.cifar100_config(arg, method="reviewkd_gpd",
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
