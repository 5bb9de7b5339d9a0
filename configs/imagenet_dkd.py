"""DKD baseline on ImageNet, ResNet-34 → ResNet-18 (no GPD), with GPD's recipe for a like-for-like
comparison: batch 512, SGD 0.1, ×0.1 at 30/60/90, DKD α 1 β 0.5 T 1, no warm-up.

    python launch/train.py --config=configs/imagenet_ce.py:resnet34 --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_dkd.py --workdir=W

Expected (docs/method.md §11): 71.70 % top-1 (mdistiller's DKD recipe).
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.imagenet_config(arg, model="resnet18", teacher="resnet34", dkd_beta=0.5,
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
