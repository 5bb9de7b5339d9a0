"""DKD + GPD on ImageNet, ResNet-34 → ResNet-18: the paper's recipe (gpd_method.md §9.1).

    python launch/train.py --config=configs/imagenet_ce.py:resnet34 --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_gpd.py --workdir=W

100 epochs, global batch 512, SGD 0.1 momentum 0.9, wd 1e-4 on all params, ×0.1 at 30/60/90, clip 5,
EMA 0.99996, r = 2, OREPA branches, SCE weight 3, DKD α 1 β 0.5 T 1. The static teacher is read from
<workdir>/teacher (set --config.teacher.workdir to use another). ImageNet must be prepared the tfds
way (manual download); without it the run stops with the instructions.
Expected (paper, best epoch of max(raw, EMA)): 72.65 % top-1 vs 71.70 % for DKD.
"""
import os

from gpd_jax import config_base

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  c = config_base.imagenet_recipe(config_base.base_config(), model="resnet18")
  config_base.static_teacher(c, "resnet34")
  config_base.imagenet_gpd(c)
  c.loss.base = "dkd"
  c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature = 1.0, 0.5, 1.0
  if "runlocal" in flags:
    config_base.imagenet_runlocal(c, teacher_config=os.path.join(HERE, "imagenet_ce.py:resnet34,runlocal"))
  return c
