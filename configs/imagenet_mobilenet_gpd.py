"""DKD + GPD on ImageNet, ResNet-50 → MobileNetV1 (gpd_method.md §9.1; DKD β 2).

    python launch/train.py --config=configs/imagenet_ce.py:resnet50 --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_mobilenet_gpd.py --workdir=W

Expected (paper): 73.63 % top-1 vs 72.05 % for DKD.
"""
import os

from gpd_jax import config_base

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  c = config_base.imagenet_recipe(config_base.base_config(), model="mobilenet_v1")
  config_base.static_teacher(c, "resnet50")
  config_base.imagenet_gpd(c)
  c.loss.base = "dkd"
  c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature = 1.0, 2.0, 1.0
  if "runlocal" in flags:
    config_base.imagenet_runlocal(c, teacher_config=os.path.join(HERE, "imagenet_ce.py:resnet50,runlocal"))
  return c
