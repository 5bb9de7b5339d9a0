"""Plain CE training of a vision transformer on ImageNet: the ViT baseline and how ViT teachers are trained.

    python launch/train.py --config=configs/imagenet_vit_ce.py:rvt_small --workdir=W/teacher

The argument picks the model (default rvt_tiny; also deit_tiny, deit_small, rvt_small); add
``,runlocal`` for a synthetic smoke run. Recipe: ``config_base.vit_recipe`` (docs/method.md §9.4 without
GPD); DeiT models use batch 1024 and drop-path 0.1, as DeiT's own recipe.
Expected (RVT paper): RVT-Ti 78.4 %, RVT-S 81.7 % with the full augmentation (RandAugment, random
erasing, mixup/cutmix, repeated augmentation: all on here, docs/method.md §9.4).
"""
from gpd_jax import config_base

VIT_MODELS = ("rvt_tiny", "rvt_small", "deit_tiny", "deit_small")


def get_config(arg=None):
  flags = config_base.parse_arg(arg)
  names = [f for f in flags if f in VIT_MODELS]
  model = names[0] if names else "rvt_tiny"
  deit = model.startswith("deit")
  c = config_base.vit_recipe(config_base.base_config(), model=model,
                             batch_size=1024 if deit else 2048, drop_path_rate=0.1 if deit else 0.0)
  if "runlocal" in flags:
    config_base.vit_runlocal(c)
  return c
