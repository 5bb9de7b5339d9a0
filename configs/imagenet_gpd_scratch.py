"""GPD from scratch on ImageNet, ResNet-18, no static teacher (scenario b, "GPD*").

    python launch/train.py --config=configs/imagenet_gpd_scratch.py --workdir=W

DT loss CE, student loss CE + 3 × SCE(DT); the rest of the recipe as imagenet_gpd.py.
Expected (paper): 71.58 % vs 69.76 % for plain training (+1.8).
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.imagenet_config(arg, model="resnet18", gpd=True,
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
