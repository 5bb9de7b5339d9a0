"""DKD + GPD on ImageNet, DeiT-S → DeiT-Ti (a project extension: the paper reports RVT, not DeiT).

    python launch/train.py --config=configs/imagenet_vit_ce.py:deit_small --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_deit_gpd.py --workdir=W

The ViT recipe of ``imagenet_rvt_gpd.py`` at DeiT's batch 1024 (LR 1e-3) and drop-path 0.1 (DeiT-Ti's
own recipe); GPD r = 2 with the class token and position embedding stored /r in the DT
(docs/method.md §7); DKD α 1 β 0.5 T 1. No numbers are reported for this pair.
"""
import os

from gpd_jax import config_base

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  c = config_base.vit_recipe(config_base.base_config(), model="deit_tiny", batch_size=1024,
                             drop_path_rate=0.1)
  config_base.static_teacher(c, "deit_small")
  config_base.gpd_on(c, ratio=2, branches=False)
  c.loss.base = "dkd"
  c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature = 1.0, 0.5, 1.0
  if "runlocal" in flags:
    config_base.vit_runlocal(
        c, teacher_config=os.path.join(HERE, "imagenet_vit_ce.py:deit_small,runlocal"))
  return c
