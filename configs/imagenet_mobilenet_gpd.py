"""DKD + GPD on ImageNet, ResNet-50 → MobileNetV1 (docs/method.md §9.1; DKD β 2).

    python launch/train.py --config=configs/imagenet_ce.py:resnet50 --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_mobilenet_gpd.py --workdir=W

Expected (paper): 73.63 % top-1 vs 72.05 % for DKD.
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.imagenet_config(arg, model="mobilenet_v1", teacher="resnet50", dkd_beta=2.0,
                                     gpd=True,
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
