"""ReviewKD on ImageNet, ResNet-34 → ResNet-18: mdistiller's recipe (configs/imagenet/r34_r18/reviewkd.yaml).

    python launch/train.py --config=configs/imagenet_ce.py:resnet34 --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_reviewkd.py --workdir=W

100 epochs, global batch 256, SGD 0.1 momentum 0.9, wd 1e-4, ×0.1 at 30/60/90; CE + 1 · HCL with the
weight ramped over 1 epoch; student levels before their last ReLU, ABF width 512. The ABF stack is a
training-time connector: it is trained with the student and dropped at export.
Expected (ReviewKD paper, quoted by GPD Table 1): 71.61 % top-1.
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.imagenet_config(arg, model="resnet18", teacher="resnet34", reviewkd_mid=512,
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
