"""DKD + GPD on ImageNet, RVT-S → RVT-Ti: the paper's transformer row (docs/method.md §9.4).

    python launch/train.py --config=configs/imagenet_vit_ce.py:rvt_small --workdir=W/teacher
    python launch/train.py --config=configs/imagenet_rvt_gpd.py --workdir=W

Global batch 2048, AdamW LR 2e-3 (5e-4 × 2048/512) wd 0.05 (no decay on 1-D leaves), cosine with 5
warm-up epochs from 1e-6 to min 1e-5 over 300 + 10 cool-down epochs, label smoothing 0.1, drop-path 0,
no clipping, EMA 0.99996; GPD r = 2 (heads ×2, head width kept), SCE weight 3; DKD α 1 β 0.5 T 1.
No OREPA branches: RVT's rule converts only 3×3 stride-1 convs under 700 channels, and RVT-Ti's
conv-FFN depthwise convs have 768 and 1536, so the reference's ``--use_orepa`` changes nothing.
Augmentation: RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 (switch
0.5), repeated augmentation ×3 (docs/method.md §9.4). Deviations from the reference: bilinear
RandomResizedCrop, LR updated per step rather than per epoch, and BN statistics over the global batch.
Expected (paper, best epoch of max(raw, EMA)): 80.14 % top-1 for DKD + GPD.
"""
import os

from gpd_jax import config_base

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  c = config_base.vit_recipe(config_base.base_config(), model="rvt_tiny", batch_size=2048)
  config_base.static_teacher(c, "rvt_small")
  config_base.gpd_on(c, ratio=2, branches=False)
  c.loss.base = "dkd"
  c.loss.dkd.alpha, c.loss.dkd.beta, c.loss.dkd.temperature = 1.0, 0.5, 1.0
  if "runlocal" in flags:
    config_base.vit_runlocal(
        c, teacher_config=os.path.join(HERE, "imagenet_vit_ce.py:rvt_small,runlocal"))
  return c
