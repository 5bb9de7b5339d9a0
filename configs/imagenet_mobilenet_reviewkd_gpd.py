"""ReviewKD + GPD on ImageNet, ResNet-50 → MobileNetV1 (GPD ``CNN/train_reviewkd.py``).

    python launch/train.py --config=configs/imagenet_ce.py:resnet50 --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_mobilenet_reviewkd_gpd.py --workdir=W

As configs/imagenet_reviewkd_gpd.py, with the MobileNet student: ABF width 256 (the reference's
``build_review_kd`` for MobileNet), ABF out-widths the teacher's 256/512/1024/2048/2048.
Expected (paper Table 1): 73.21 % top-1 vs 72.56 % for ReviewKD.
"""
import os

from gpd_jax import config_base


def get_config(arg=None):
  return config_base.imagenet_config(arg, model="mobilenet_v1", teacher="resnet50", gpd=True,
                                     reviewkd_mid=256,
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
