"""DKD + GPD on ImageNet, ResNet-34 → ResNet-18: the paper's recipe (docs/method.md §9.1).

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


def get_config(arg=None):
  return config_base.imagenet_config(arg, model="resnet18", teacher="resnet34", dkd_beta=0.5, gpd=True,
                                     config_dir=os.path.dirname(os.path.abspath(__file__)))
