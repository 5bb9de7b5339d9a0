"""DKD baseline on ImageNet, ResNet-34 → ResNet-18 (no GPD), with GPD's recipe for a like-for-like
comparison: batch 512, SGD 0.1, ×0.1 at 30/60/90, DKD α 1 β 0.5 T 1, no warm-up.

    python launch/train.py --config=configs/imagenet_ce.py:resnet34 --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_dkd.py --workdir=W

Expected (gpd_method.md §11.1): 71.70 % top-1 (mdistiller's DKD recipe).
"""
import os

from gpd_jax import config_base

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  c = config_base.imagenet_recipe(config_base.base_config(), model="resnet18")
  config_base.static_teacher(c, "resnet34")
  c.loss.base = "dkd"
  c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature = 1.0, 0.5, 1.0
  if "runlocal" in flags:
    config_base.imagenet_runlocal(c, teacher_config=os.path.join(HERE, "imagenet_ce.py:resnet34,runlocal"))
  return c
