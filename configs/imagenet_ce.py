"""Plain CE training on ImageNet: the baseline, and how static teachers are trained.

    python launch/train.py --config=configs/imagenet_ce.py:resnet34 --workdir=W/teacher

The argument picks the model (default resnet18); add ``,runlocal`` for a synthetic smoke run.
Recipe: docs/method.md §9.1 without GPD (100 epochs, batch 512, SGD 0.1, ×0.1 at 30/60/90).
Expected: ResNet-18 ≈ 69.8 % top-1 (torchvision V1: 69.76), ResNet-34 ≈ 73.3 %.
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.imagenet_config(arg, model="resnet18",
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
